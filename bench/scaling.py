"""Scaling: lmbatch throughput and peak memory versus the number of requests (100, 1k, 10k).

    .venv/bin/python -m bench.scaling                     # 100, 1000, 10000 requests (a few minutes)
    .venv/bin/python -m bench.scaling --counts 100,1000   # quicker

Run from the repository root. Small model (bench/toy_models.py MODELS["small"]) and short
requests (workload preset "small"). Each count runs in its own process so that its peak RSS is
its own; requests are generated lazily and fed through ``engine.stream`` and every output is
dropped once counted, as a batch job over a huge shard does. Reports wall, tokens/s, seconds per
1k requests, the RSS after the engine is built (model + KV pool) and the peak RSS during the
run. Cost must grow linearly (seconds per request flat) and peak memory must stay bounded (peak
minus baseline flat in the count). Writes bench/results/scaling-<timestamp>.json and
scaling-latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()  # before torch loads libgomp

from bench.cli import RESULTS, add_device_options, parser
from bench.toy_models import ensure_model
from bench.workload import WorkloadSpec, iter_requests


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pairs(spec: WorkloadSpec, counts: dict | None = None, max_tokens: int | None = None):
    """The workload's (prompt, SamplingParams) pairs, made lazily; `counts` adds up the prompt tokens."""
    from lmbatch.engine import SamplingParams

    for r in iter_requests(spec):
        if counts is not None:
            counts["prompt_tokens"] += len(r.prompt)
        yield r.prompt, SamplingParams(max_tokens=max_tokens or r.max_tokens, temperature=0, ignore_eos=True)


def _stream_counted(engine, spec: WorkloadSpec, max_rss: float) -> tuple[dict, float, float, str | None]:
    """Stream the workload, each output dropped once counted: the counts, the wall, the largest RSS seen,
    the first error."""
    counts = {"requests": 0, "prompt_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "errors": 0}
    first_error = None
    t0 = time.monotonic()
    for i, out in enumerate(engine.stream(_pairs(spec, counts))):
        counts["requests"] += 1
        counts["output_tokens"] += len(out.token_ids)
        counts["cached_tokens"] += int(out.num_cached_tokens or 0)
        if out.finish_reason == "error":
            counts["errors"] += 1
            first_error = first_error or out.error
        if i % 256 == 0:
            max_rss = max(max_rss, _rss_mb())
    return counts, time.monotonic() - t0, max_rss, first_error


def one(count: int, model_path: str, device: str, dtype: str, seed: int, kv_blocks: int) -> dict:
    """One count in this process: throughput, the RSS after the engine is built and the peak RSS."""
    from lmbatch.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model_path, device=device, dtype=dtype, num_kv_blocks=kv_blocks,
                                    max_model_len=512))
    spec = WorkloadSpec.preset("small", num_requests=count, seed=seed, token_hi=len(engine.tokenizer))
    # warm-up on a handful of requests, then a fresh stats window
    warm = WorkloadSpec.preset("small", num_requests=4, seed=99, token_hi=len(engine.tokenizer))
    for _ in engine.stream(_pairs(warm, max_tokens=2)):
        pass
    engine.reset_stats()
    base_rss = _rss_mb()
    base_peak = _peak_mb()
    counts, wall, max_rss, first_error = _stream_counted(engine, spec, base_rss)
    stats = engine.stats().as_dict()
    return {
        "count": count, "wall_s": wall, **counts,
        "requests_per_s": counts["requests"] / wall,
        "output_tok_s": counts["output_tokens"] / wall,
        "total_tok_s": (counts["prompt_tokens"] + counts["output_tokens"]) / wall,
        "s_per_1k_requests": 1000 * wall / counts["requests"],
        "us_per_token": 1e6 * wall / (counts["prompt_tokens"] + counts["output_tokens"]),
        "prefix_hit_rate": counts["cached_tokens"] / max(counts["prompt_tokens"], 1),
        "rss_after_engine_mb": base_rss, "peak_rss_before_run_mb": base_peak,
        "peak_rss_mb": max(_peak_mb(), max_rss), "peak_growth_mb": max(_peak_mb(), max_rss) - base_rss,
        "engine_stats": stats, "first_error": first_error,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--counts", default="100,1000,10000")
    add_device_options(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    return ap.parse_args(argv)


def measure(count: int, a: argparse.Namespace, model_path: Path) -> dict | None:
    """`one` in a process of its own (its peak RSS is its own); None if it failed (its output printed)."""
    cmd = [sys.executable, "-m", "bench.scaling", "--one", str(count), "--model-path", str(model_path),
           "--device", a.device, "--dtype", a.dtype, "--seed", str(a.seed), "--kv-blocks", str(a.kv_blocks)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        return None
    r = json.loads(line[0][len("RESULT "):])
    print(f"{count:6d} requests: wall {r['wall_s']:7.2f}s  {r['requests_per_s']:7.1f} req/s  "
          f"{r['total_tok_s']:8.0f} tok/s  {r['s_per_1k_requests']:.2f} s/1k req  "
          f"rss after engine {r['rss_after_engine_mb']:.0f} MB  peak {r['peak_rss_mb']:.0f} MB "
          f"(+{r['peak_growth_mb']:.0f})  errors {r['errors']}", flush=True)
    return r


def render_markdown(rows: list[dict], a: argparse.Namespace) -> str:
    base = rows[0]
    lines = [
        f"### Scaling {datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')} (lmbatch, small model, {a.device})",
        "",
        (f"KV pool: {a.kv_blocks} blocks of 16 tokens. Cost per request relative to the smallest run should stay"
        " near 1 (linear cost); peak growth over the RSS after the engine is built should stay flat (bounded)."),
        "",
        ("| requests | prompt tok | output tok | wall s | req/s | total tok/s | s / 1k req | cost per req vs first "
        "| prefix hit | RSS after engine MB | peak RSS MB | peak growth MB |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['count']} | {r['prompt_tokens']} | {r['output_tokens']} | {r['wall_s']:.2f} "
            f"| {r['requests_per_s']:.1f} | {r['total_tok_s']:.0f} | {r['s_per_1k_requests']:.2f} "
            f"| {r['s_per_1k_requests'] / base['s_per_1k_requests']:.2f} | {r['prefix_hit_rate']:.2f} "
            f"| {r['rss_after_engine_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_growth_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.model_path, a.device, a.dtype, a.seed, a.kv_blocks)))
        return 0
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = ensure_model("small", out_dir)
    rows = []
    for c in [int(x) for x in a.counts.split(",")]:
        r = measure(c, a, model_path)
        if r is None:
            return 1
        rows.append(r)
        if r["errors"]:
            print(f"{r['errors']} requests failed: {r.get('first_error')}", file=sys.stderr)
            return 1
    md = render_markdown(rows, a)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"scaling-{stamp}.json").write_text(json.dumps({"rows": rows, "args": vars(a)}, indent=1))
    (out_dir / "scaling-latest.md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
