#!/usr/bin/env bash
# Every GPU check in one call (make bench-gpu runs it): the CUDA tests of the engine, then the
# side-by-side benchmark on cuda/bfloat16. Works in the project's venv or, on a bare GPU box
# whose python already has torch and transformers, with lmbatch installed from a wheel:
#   bash bench/gpu_checks.sh [python]        # results and logs under $OUT or bench/results
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

echo "== CUDA tests (pytest -m gpu)"
"$PY" -P -m pytest -q -p no:cacheprovider tests/engine -m gpu 2>&1 | tee "$RESULTS/gpu-tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}

echo "== benchmark (cuda, bfloat16)"
"$PY" -m bench.run --preset gpu --device cuda --dtype bfloat16 --out "$RESULTS" --model-dir "${LMBATCH_MODEL_DIR:-${TMPDIR:-/tmp}/lmbatch-models}" ${BENCH_GPU_ARGS:-} 2>&1 \
  | tee "$RESULTS/gpu-bench.log" | grep -v "Loading weights" | tail -n 40
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
