#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU-only tests (half precision, CUDA graphs, xformers, Triton and
# CUDA kernels against the references), then the step benchmark of issue 4 (SD1.5-shaped UNet, random
# weights, 512x512 fp16, batch 1 and 4: CFG only, exact and batched SAG, each with and without CUDA
# graphs, peak memory in the JSON), fp16/bf16 against fp32 beside diffusers, and the kernel
# benchmark. Results land in ${OUT:-gpu-results}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
python -m sagfast.info | tee "$out/info.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.txt"
for batch in 1 4; do
  python -m bench step --device cuda --dtype fp16 --models sd15 --size 512 --batch "$batch" \
    --variants cfg,floor,sagfast_exact,sagfast_batched,sagfast_exact_graph,sagfast_batched_graph \
    --out "$out/step_b$batch"
done
python -m bench.half_precision --device cuda --out "$out"
python -m bench kernels --device cuda --out "$out"
python -m bench memory --device cuda --out "$out"
