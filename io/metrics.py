"""Per-shard and per-run metrics, as defined in docs/design.md.

Per request (from the shard start): queue time, TTFT (also from first scheduled), ITL (mean
gap between output tokens, first excluded), E2E. Per shard and run: requests/s, input, output
and total tokens/s, p50/p90/p99 of the latencies, prefix-cache hit rate (cached prompt tokens /
prompt tokens), preemptions, error rows, wall time, device, and cost per 1k requests and per 1M
output tokens from a price per device-hour.

A request is an input row: with n > 1 its n samples are one request, so `rows`, `ok_rows`,
requests/s, cost per 1k requests, prompt and cached tokens and the latencies count it once (TTFT
is its first sample's first token, ITL its first sample's, E2E until its last sample finished:
the engine returns a request when all its samples are done), while `completion_tokens`, output
tokens/s and cost per 1M output tokens count the tokens of every sample. `output_rows` and
`finish_reasons` count the rows written (one per sample; one for an error row).

Run percentiles must combine shards that may have run in other processes or an earlier
(resumed) run, without keeping every latency: each shard stores a log-bucketed histogram
(40 buckets per decade: a merged percentile is within 3% of the nearest-rank one; with few
requests the nearest rank itself can differ from the interpolated shard percentile).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

LATENCIES = ("ttft_s", "ttft_sched_s", "itl_s", "e2e_s", "queue_s")
QUANTILES = (50, 90, 99)
BUCKETS_PER_DECADE = 40
MIN_LATENCY_S = 1e-6


def shard_metrics(result, device: str | None = None, price_per_device_hour: float | None = None,
                  num_devices: int = 1) -> dict[str, Any]:
    """Metrics of one finished shard (`result` is an engine_feed.ShardResult)."""
    ok = [r for r in result.rows if r.finish_reason != "error"]
    totals = {
        "rows": len(result.rows), "ok_rows": len(ok), "error_rows": len(result.rows) - len(ok),
        "output_rows": sum(len(r.extra_samples) + 1 for r in result.rows),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens": sum(r.all_completion_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "preemptions": result.engine_stats.preemptions if result.engine_stats else 0,
    }
    latencies = {name: [v for r in ok if (v := getattr(r, name)) is not None] for name in LATENCIES}
    m = _derived(totals, result.wall_s, device, price_per_device_hour, num_devices)
    m.update({name: summarize(vals) for name, vals in latencies.items()})
    m["histograms"] = {name: histogram(vals) for name, vals in latencies.items()}
    m["finish_reasons"] = dict(Counter(s.finish_reason for r in result.rows for s in r.samples))  # per output row
    m["ordering"] = result.ordering
    m["engine"] = _counters(result.engine_stats)
    return m


def rollup_metrics(shards: Iterable[dict[str, Any]], wall_s: float | None = None,
                   device: str | None = None, price_per_device_hour: float | None = None,
                   num_devices: int = 1) -> dict[str, Any]:
    """Run metrics from its shards' metrics. `wall_s` is the run's wall time (default: the sum of
    the shards', right when shards ran one after another on one device)."""
    shards = list(shards)
    keys = ("rows", "ok_rows", "error_rows", "prompt_tokens", "completion_tokens", "cached_tokens",
            "preemptions")
    totals = {k: sum(s.get(k, 0) for s in shards) for k in keys}
    # Shards recorded before output_rows existed wrote one row per input row.
    totals["output_rows"] = sum(s.get("output_rows", s.get("rows", 0)) for s in shards)
    wall = wall_s if wall_s is not None else sum(s.get("wall_s", 0.0) for s in shards)
    m = _derived(totals, wall, device, price_per_device_hour, num_devices)
    for name in LATENCIES:
        merged = merge_histograms(s.get("histograms", {}).get(name, {}) for s in shards)
        m[name] = summarize_histogram(merged)
    m["finish_reasons"] = dict(sum((Counter(s.get("finish_reasons", {})) for s in shards), Counter()))
    m["num_shards"] = len(shards)
    return m


def _derived(totals: dict, wall_s: float, device: str | None, price: float | None,
             num_devices: int) -> dict[str, Any]:
    per_s = (lambda x: x / wall_s if wall_s > 0 else None)
    out_tokens = totals["completion_tokens"]
    m = dict(totals)
    m.update({
        "total_tokens": totals["prompt_tokens"] + out_tokens,
        "wall_s": wall_s,
        "requests_per_s": per_s(totals["ok_rows"]),
        "input_tokens_per_s": per_s(totals["prompt_tokens"]),
        "output_tokens_per_s": per_s(out_tokens),
        "total_tokens_per_s": per_s(totals["prompt_tokens"] + out_tokens),
        "prefix_cache_hit_rate": (totals["cached_tokens"] / totals["prompt_tokens"]
                                  if totals["prompt_tokens"] else 0.0),
        "device": device,
    })
    cost = None if price is None else price * num_devices * wall_s / 3600.0
    m["cost"] = cost
    m["cost_per_1k_requests"] = (cost / totals["ok_rows"] * 1000
                                 if cost is not None and totals["ok_rows"] else None)
    m["cost_per_1m_output_tokens"] = (cost / out_tokens * 1e6 if cost is not None and out_tokens else None)
    return m


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    out = {f"p{q}": percentile(values, q) for q in QUANTILES}
    out["mean"] = sum(values) / len(values) if values else None
    return out


def _bucket(v: float) -> int:
    return math.floor(math.log10(max(v, MIN_LATENCY_S)) * BUCKETS_PER_DECADE)


def histogram(values: Iterable[float]) -> dict[str, int]:
    """Sparse log-bucketed counts; keys are strings so the histogram round-trips through JSON."""
    counts = Counter(_bucket(v) for v in values)
    return {str(k): c for k, c in sorted(counts.items())}


def merge_histograms(hists: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for h in hists:
        total.update({k: int(c) for k, c in h.items()})
    return {str(k): c for k, c in sorted(total.items(), key=lambda kv: int(kv[0]))}


def summarize_histogram(hist: dict[str, int]) -> dict[str, float | None]:
    """Percentiles from a histogram: the geometric middle of the bucket holding the quantile."""
    items = sorted((int(k), c) for k, c in hist.items())
    n = sum(c for _, c in items)
    out: dict[str, float | None] = {}
    for q in QUANTILES:
        out[f"p{q}"] = None
        rank, seen = q / 100.0 * n, 0
        for k, c in items:
            seen += c
            if seen >= rank and n:
                out[f"p{q}"] = 10 ** ((k + 0.5) / BUCKETS_PER_DECADE)
                break
    out["mean"] = (sum(10 ** ((k + 0.5) / BUCKETS_PER_DECADE) * c for k, c in items) / n) if n else None
    return out


def write_metrics_json(metrics: dict[str, Any], path: str) -> None:
    """Write metrics atomically (temp file + rename), as the shard outputs are written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _counters(stats) -> dict[str, int]:
    """An EngineStats' counters (the shard's share; gauges describe the pool, not the shard)."""
    return {} if stats is None else {k: getattr(stats, k) for k in stats.counters()}
