"""PNG plots of a run from its output files: latency distributions and throughput over time.

Per-row times in the outputs are measured from each shard's start, so shards are laid end to
end (as they ran on one engine) to draw throughput over the run.
"""

from __future__ import annotations

import os

import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = ["ttft_s", "e2e_s", "completion_tokens", "finish_reason"]


def _load(paths: list[str]) -> list[dict]:
    shards = []
    for p in paths:
        t = pq.read_table(p, columns=COLUMNS)
        t = t.filter(pc.not_equal(t["finish_reason"], "error"))
        shards.append({c: t[c].to_pylist() for c in COLUMNS[:3]})
    return shards


def _latency_plot(plt, shards: list[dict], path: str, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, col, label in zip(axes, ("ttft_s", "e2e_s"), ("TTFT", "end-to-end latency")):
        values = [v for s in shards for v in s[col] if v is not None]
        ax.hist(values, bins=40, color="#4477aa")
        ax.set_xlabel(f"{label} from shard start (s)")
        ax.set_ylabel("requests")
        ax.set_title(f"{label} ({len(values)} requests)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_plot(plt, shards: list[dict], path: str, title: str) -> None:
    """Cumulative output tokens of finished requests over time: the slope is the throughput.
    (A binned rate is all spikes, since a batch of requests finishes in the same step.)"""
    events, offset, bounds = [], 0.0, []
    for s in shards:
        pairs = [(e, n) for e, n in zip(s["e2e_s"], s["completion_tokens"]) if e is not None]
        events += [(offset + e, n) for e, n in pairs]
        offset += max((e for e, _ in pairs), default=0.0)
        bounds.append(offset)
    events.sort()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    total, xs, ys = 0, [0.0], [0]
    for t, n in events:
        total += n
        xs.append(t)
        ys.append(total)
    ax.step(xs, ys, where="post", color="#228833")
    for b in bounds[:-1]:
        ax.axvline(b, color="#bbbbbb", linestyle="--", linewidth=0.8)
    rate = f"{total / offset:,.0f} output tokens/s overall" if offset > 0 else "no tokens"
    ax.set_xlabel("time (s; shards laid end to end, dashed lines between shards)")
    ax.set_ylabel("output tokens (finished requests)")
    ax.set_title(f"{title}: {rate}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(paths: list[str], out_dir: str, run_name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on batch machines
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    shards = _load(paths)
    latency = os.path.join(out_dir, "report-latency.png")
    throughput = os.path.join(out_dir, "report-throughput.png")
    _latency_plot(plt, shards, latency, f"run {run_name}")
    _throughput_plot(plt, shards, throughput, f"run {run_name}")
    return [latency, throughput]
