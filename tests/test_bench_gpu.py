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
