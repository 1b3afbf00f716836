"""The run-level cost at a nonzero price, as io/metrics.py (_derived) and docs/design.md define it:

    cost                      = price_per_device_hour * num_devices * wall_s / 3600
    cost_per_1k_requests      = cost / ok rows * 1000        (error rows are not served requests)
    cost_per_1m_output_tokens = cost / output tokens * 1e6

first on hand-made shard metrics, then on a real flow run of the toy model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmbatch import io
from lmbatch.engine import EngineStats
from lmbatch.flows.config import validate_config
from lmbatch.flows.job import run_job
from lmbatch.io.engine_feed import RowResult

PRICE = 3.6   # per device-hour: 0.001 per device-second


def _shard(ok_rows: int, error_rows: int, wall_s: float) -> io.ShardResult:
    rows = [RowResult(completion="x", finish_reason="stop", prompt_tokens=20, completion_tokens=10, ttft_s=0.1,
                      e2e_s=0.5, itl_s=0.04, queue_s=0.05, ttft_sched_s=0.05) for _ in range(ok_rows)]
    rows += [RowResult(error="empty prompt") for _ in range(error_rows)]
    return io.ShardResult(rows=rows, ordering="input", wall_s=wall_s, engine_stats=EngineStats())


def _stored(metrics: dict) -> dict:
    """A shard's metrics as the run database hands them back (JSON)."""
    return json.loads(json.dumps(metrics, default=str))


def test_shard_cost_follows_the_definition():
    # 3 ok rows (30 output tokens) and an error row in 7 s: 7 device-seconds at 0.001 = 0.007.
    m = io.shard_metrics(_shard(3, 1, 7.0), price_per_device_hour=PRICE)
    assert m["cost"] == pytest.approx(0.007)
    assert m["cost_per_1k_requests"] == pytest.approx(0.007 / 3 * 1000)        # not / 4: the error row
    assert m["cost_per_1m_output_tokens"] == pytest.approx(0.007 / 30 * 1e6)
    two = io.shard_metrics(_shard(3, 1, 7.0), price_per_device_hour=PRICE, num_devices=2)
    assert two["cost"] == pytest.approx(0.014)


def test_rollup_cost_over_two_shards():
    a = _stored(io.shard_metrics(_shard(3, 1, 7.0), price_per_device_hour=PRICE))
    b = _stored(io.shard_metrics(_shard(5, 0, 13.0), price_per_device_hour=PRICE))
    # Run wall 20 s on 2 devices: 40 device-seconds = 0.04; 8 ok requests, 80 output tokens.
    run = io.rollup_metrics([a, b], wall_s=20.0, price_per_device_hour=PRICE, num_devices=2)
    assert (run["ok_rows"], run["error_rows"], run["completion_tokens"]) == (8, 1, 80)
    assert run["cost"] == pytest.approx(0.04)
    assert run["cost_per_1k_requests"] == pytest.approx(5.0)       # 0.04 / 8 * 1000
    assert run["cost_per_1m_output_tokens"] == pytest.approx(500.0)  # 0.04 / 80 * 1e6
    # Without a run wall time the shards' walls add up (7 + 13 s, one device after another),
    # so the run costs what its shards cost.
    seq = io.rollup_metrics([a, b], price_per_device_hour=PRICE)
    assert seq["wall_s"] == pytest.approx(20.0) and seq["cost"] == pytest.approx(0.02)
    assert seq["cost"] == pytest.approx(a["cost"] + b["cost"])
    assert seq["cost_per_1k_requests"] == pytest.approx(2.5) and seq["cost_per_1m_output_tokens"] == pytest.approx(250)
    # No price: no cost; a zero price costs nothing.
    assert io.rollup_metrics([a, b])["cost_per_1k_requests"] is None
    assert io.rollup_metrics([a, b], price_per_device_hour=0.0)["cost_per_1k_requests"] == 0.0


@pytest.mark.usefixtures("prefect_harness")
def test_flow_run_reports_cost_at_a_nonzero_price(job_config):
    cfg = validate_config(job_config(cost={"price_per_device_hour": PRICE}))
    result = run_job(cfg, run_name="cost")
    assert result["message"] is None
    metrics = result["metrics"]
    on_disk = json.loads((Path(result["output_dir"]) / "metrics.json").read_text())
    for m in (metrics, on_disk):
        rows, tokens, wall = m["ok_rows"], m["completion_tokens"], m["wall_s"]
        assert rows == m["rows"] == 36 and tokens > 0 and wall > 0
        assert m["cost"] == pytest.approx(PRICE * wall / 3600) and m["cost"] > 0
        assert m["cost_per_1k_requests"] == pytest.approx(PRICE * wall / 3600 / rows * 1000)
        assert m["cost_per_1m_output_tokens"] == pytest.approx(PRICE * wall / 3600 / tokens * 1e6)
        assert m["cost_per_1k_requests"] > 0
    assert on_disk["cost"] == pytest.approx(metrics["cost"])
    # The wall time billed is the shards' (as recorded in the run database), within the run's.
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        job_key = db.get_run(result["run_id"])["job_key"]
        shards = db.done_metrics(job_key)
    assert len(shards) == 3 and sum(s["ok_rows"] for s in shards) == metrics["ok_rows"]
    assert metrics["wall_s"] == pytest.approx(sum(s["wall_s"] for s in shards))
    assert metrics["cost"] == pytest.approx(sum(s["cost"] for s in shards))
    assert metrics["wall_s"] <= metrics["run_wall_s"]
