#!/usr/bin/env bash
# Every GPU check in one call (make bench-gpu runs it), on a bare GPU box whose python has only torch,
# transformers and triton (no network): lmbatch is installed with --no-deps, pytest from the wheels
# under bench/wheels if they were carried there (`make gpu-wheels` on a machine with the index), then
#   1. python -m bench.gpu: nano-vllm's shape on a 1B model, float32 exactness, bf16 agreement;
#   2. the CUDA tests (tests -m gpu, and the Triton kernel against its float64 reference on CUDA).
# The bench goes first: its figures are what a short lease is for; each stage is bounded.
# JSON, table and logs under $OUT (or bench/results). The whole call keeps under 8 minutes by
# construction: GPU_DEADLINE_S (470) for everything, GPU_TESTS_S (80) of it kept for the tests;
# transformers' static batch runs first and stops early enough to leave its CB 180 s (but runs at
# least 45 s; its rate so far then reported as partial), CB stops at the bench's deadline, and a
# stage not run says so in the JSON.
#   bash bench/gpu_checks.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
START=$SECONDS
DEADLINE_S=${GPU_DEADLINE_S:-470}
TESTS_S=${GPU_TESTS_S:-80}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

if ! "$PY" -c "import lmbatch.engine" 2>/dev/null; then
  echo "== installing lmbatch (--no-deps)"
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index .; then
    # No setuptools on the box: the package's folders, mapped as pyproject.toml maps them.
    SHIM=$(mktemp -d); mkdir -p "$SHIM/lmbatch"; cp src/lmbatch/*.py "$SHIM/lmbatch/"
    for d in engine io flows; do ln -s "$PWD/$d" "$SHIM/lmbatch/$d"; done
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import lmbatch.engine" || exit 1
  fi
fi
if ! "$PY" -c "import pytest" 2>/dev/null && ls bench/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index bench/wheels/*.whl
fi

BENCH_S=${GPU_BENCH_S:-$(( DEADLINE_S - (SECONDS - START) - TESTS_S ))}
echo "== benchmark (python -m bench.gpu), at most $BENCH_S s"
timeout "$BENCH_S" "$PY" -m bench.gpu --out "$RESULTS" --deadline-s $(( BENCH_S - 5 )) --budget-s $(( BENCH_S - 60 )) \
  ${BENCH_GPU_ARGS:-} 2>&1 \
  | tee "$RESULTS/gpu-bench.log" | grep -v "Loading weights\|Writing model" | tail -n 30
bench_rc=${PIPESTATUS[0]}
"$PY" - "$RESULTS/bench-gpu.json" <<'PYEOF' || true
import json, sys   # seconds per stage: what to trim when the call nears its 8 minutes
r = json.load(open(sys.argv[1]))
stages = {"model_build": r.get("model_build_s"), "parity": r.get("parity", {}).get("stage_s"),
          "kernel": r.get("kernel", {}).get("stage_s"), **{n: s.get("stage_s") for n, s in r["systems"].items()}}
print("stage seconds:", stages, "bench total:", round(r.get("total_s", 0)))
PYEOF
tests_rc=0
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== CUDA tests"
  timeout $(( DEADLINE_S - (SECONDS - START) )) "$PY" -P -m pytest -q -p no:cacheprovider --durations=8 tests/engine/test_gpu.py tests/engine/test_triton_attention.py \
    2>&1 | tee "$RESULTS/gpu-tests.log" | tail -n 15
  tests_rc=${PIPESTATUS[0]}
else
  echo "== CUDA tests not run: no pytest here (carry its wheels in bench/wheels: make gpu-wheels)" | tee "$RESULTS/gpu-tests.log"
fi

echo "tests rc=$tests_rc bench rc=$bench_rc, $(( SECONDS - START )) s in all"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
