"""`make bench-gpu` runs on a bare GPU box: torch, transformers and triton, nothing else.

Its benchmark module is run here on the CPU (--smoke: a tiny model and workload) in a python where
SQLAlchemy, Prefect, Ray and DuckDB cannot be imported, so an import of lmbatch.io's database layer
or of the flows from the GPU path fails this test rather than the one GPU session that has a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("sqlalchemy", "prefect", "prefect_ray", "ray", "duckdb", "psycopg", "pandas")
BARE = "import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\nsys.argv = {argv!r}\n" \
       "import runpy\nrunpy.run_module('bench.gpu', run_name='__main__')\n"


def test_bench_gpu_runs_without_the_job_stack(tmp_path):
    argv = ["bench.gpu", "--device", "cpu", "--smoke", "--out", str(tmp_path / "out")]
    env = {**os.environ, "LMBATCH_MODEL_DIR": str(tmp_path / "models")}
    proc = subprocess.run([sys.executable, "-c", BARE.format(blocked=BLOCKED, argv=argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench-gpu.json").read_text())
    systems = report["systems"]
    assert set(systems) == {"lmbatch_graphs", "lmbatch_async", "lmbatch_eager", "hf_static", "hf_cb"}
    assert systems["lmbatch_async"]["async_scheduling"] and not systems["lmbatch_graphs"]["async_scheduling"]
    for name, r in systems.items():
        assert "error" not in r, (name, r)
        assert r["out_tokens"] == report["workload"]["output_tokens"]
        # float32 greedy on the CPU: every system gives lmbatch's tokens
        assert r["same_tokens_as_lmbatch_graphs"] == 1.0, name
        assert r["same_first_token_as_lmbatch_graphs"] == 1.0, name
        assert r["median_common_prefix_with_lmbatch_graphs"] >= 10, name   # smoke outputs: 10-40 tokens
    assert systems["lmbatch_eager"]["engine_downloads_per_step"] == 1
    assert systems["lmbatch_async"]["engine_downloads_per_step"] == 1
    assert (tmp_path / "out" / "bench-gpu.md").read_text().startswith("| system |")


def test_a_peer_cut_at_the_deadline_keeps_its_tokens_and_says_it_is_partial(tmp_path):
    """bench-gpu's 8-minute bound stops transformers' static batch at the deadline: what it generated
    by then is kept (a prefix of the whole run's tokens) and the rate is marked partial, never "not run"."""
    import time

    from bench.gpu import nano_vllm_workload, run_peer
    from bench.peers import load_model, run_hf_static
    from lmbatch.testing import build_toy_model

    path = build_toy_model(tmp_path / "m", hidden=64, layers=2, heads=4, kv_heads=2, max_positions=512)
    prompts, max_tokens = nano_vllm_workload(6, 10, 30, vocab=1024)
    whole = run_hf_static(load_model(str(path)), prompts, max_tokens, batch_size=6, sort_by_length=True)
    assert not whole.extra["stopped_at_deadline"]
    assert [len(t) for t in whole.tokens] == max_tokens

    cut = run_peer("hf_static", path, prompts, max_tokens, "cpu", deadline=time.monotonic())
    assert "partial" in cut and cut["out_tokens"] == len(prompts)   # one step: the deadline had passed
    assert [t[:1] for t in whole.tokens] == cut["tokens"]
