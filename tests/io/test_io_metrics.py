"""Metrics as docs/design.md defines them, and run roll-ups that merge shards without raw latencies."""

from __future__ import annotations

import json
import random

import pytest

from lmbatch import io
from lmbatch.engine import EngineStats
from lmbatch.io.engine_feed import RowResult, ShardResult
from lmbatch.io.metrics import percentile


def _result(ttfts, wall_s=2.0, errors=0):
    rows = [RowResult(completion="x", finish_reason="stop", prompt_tokens=100, completion_tokens=10,
                      cached_tokens=25, ttft_s=t, e2e_s=t + 1.0, itl_s=0.01, queue_s=t / 2, ttft_sched_s=t / 2)
            for t in ttfts]
    rows += [RowResult(error="empty prompt") for _ in range(errors)]
    return ShardResult(rows, "input", wall_s, EngineStats(preemptions=1))


def test_shard_metrics_follow_the_definitions():
    m = io.shard_metrics(_result([0.1, 0.2, 0.3, 0.4], errors=1), device="cpu", price_per_device_hour=3.6)
    assert (m["rows"], m["ok_rows"], m["error_rows"]) == (5, 4, 1)
    assert m["requests_per_s"] == pytest.approx(2.0) and m["input_tokens_per_s"] == pytest.approx(200)
    assert m["output_tokens_per_s"] == pytest.approx(20) and m["total_tokens_per_s"] == pytest.approx(220)
    assert m["prefix_cache_hit_rate"] == pytest.approx(0.25) and m["preemptions"] == 1
    assert m["ttft_s"]["p50"] == pytest.approx(0.25) and m["e2e_s"]["p99"] == pytest.approx(1.397)
    assert m["cost"] == pytest.approx(0.002) and m["cost_per_1k_requests"] == pytest.approx(0.5)
    assert m["cost_per_1m_output_tokens"] == pytest.approx(50.0)
    assert m["finish_reasons"] == {"stop": 4, "error": 1}


def test_rollup_merges_histograms_within_three_percent(tmp_path):
    rng = random.Random(0)
    shards = [[rng.lognormvariate(-1, 1) for _ in range(500)] for _ in range(4)]
    run = io.rollup_metrics([io.shard_metrics(_result(s)) for s in shards], wall_s=4.0)
    everything = [t for s in shards for t in s]
    for q in (50, 90, 99):
        assert run["ttft_s"][f"p{q}"] == pytest.approx(percentile(everything, q), rel=0.03)
    assert run["rows"] == 2000 and run["requests_per_s"] == pytest.approx(500) and run["num_shards"] == 4
    assert run["cost"] is None and run["preemptions"] == 4
    path = tmp_path / "run" / "metrics.json"
    io.write_metrics_json(run, str(path))
    assert json.loads(path.read_text())["ttft_s"] == run["ttft_s"]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp left behind
