#!/usr/bin/env bash
# The GPU checks in one run, on a CUDA machine that may have no network and no diffusers (torch and
# triton are enough). On a machine with network first: `bash bench/gpu_kit.sh` (writes .gpu-kit/);
# copy the tree with .gpu-kit/ to the CUDA machine, then there:
#
#   bash bench/gpu_checks.sh [--out DIR]     # results in DIR (default: $OUT, else gpu-results)
#
# Installs the kit into /tmp/sagfast-kit when diffusers is missing, then runs the stages of
# `bench/stages.py` (info, C++/CUDA extension built for this device's architecture only, the GPU
# tests, the SD1.5-shaped 512x512 fp16 step benchmark at batch 1 and 4 with and without CUDA graphs and
# the guidance engine's variants (PAG, SAG+PAG) at batch 1,
# half precision, kernels, memory), each under its own time limit, all within GPU_CHECKS_BUDGET
# seconds (default 480). A stage that fails or times out is recorded and the next one runs.
# Into ${OUT:-gpu-results}: gpu_checks.log, summary.md and gpu-results.tar.gz (every JSON, markdown and
# PNG). GPU_CHECKS_ONLY=a,b runs only those stages (a re-run after a fix).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
why="$("$PY" - <<'PYEOF' 2>&1
try:
    import torch
except Exception as e:
    print(f"torch is not importable ({type(e).__name__}: {e})")
else:
    if not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA device")
PYEOF
)"
if [ -n "$why" ]; then
  echo "no CUDA device: $why; bench/gpu_checks.sh runs only on a machine with a CUDA GPU" >&2
  exit 2
fi
out="${OUT:-gpu-results}"
if [ "${1:-}" = "--out" ] && [ -n "${2:-}" ]; then
  out="$2"
elif [ $# -gt 0 ]; then
  echo "usage: bash bench/gpu_checks.sh [--out DIR]" >&2
  exit 2
fi
mkdir -p "$out"
work="$(mktemp -d)"
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  if ! ls .gpu-kit/*.whl >/dev/null 2>&1; then
    echo "diffusers is missing here and .gpu-kit/ has no wheels: run bash bench/gpu_kit.sh on a machine with network and copy .gpu-kit/ here" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/kit" .gpu-kit/*.whl || exit 2
  export PYTHONPATH="$work/kit${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m bench.stages gpu --results "$work/gpu-results" --log "$out/gpu_checks.log" \
  --budget "${GPU_CHECKS_BUDGET:-480}" ${GPU_CHECKS_ONLY:+--only "$GPU_CHECKS_ONLY"}
rc=$?
cp "$work/gpu-results/summary.md" "$out/" 2>/dev/null
tar -czf "$out/gpu-results.tar.gz" -C "$work" gpu-results
exit $rc
