"""Plots of a benchmark result (matplotlib, PNG): throughput per system, TTFT and E2E CDFs.

    .venv/bin/python -m bench.charts [bench/results/<timestamp>.json]   # default: bench/results/latest.json

Writes <stem>-throughput.png and <stem>-latency.png next to the JSON (and latest-*.png copies).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.cli import RESULTS, parser


def throughput_chart(plt, res: dict, title: str, png: str) -> None:
    """Output tokens/s per system, with the FLOP-floor throughput as a reference line."""
    med = res["medians"]
    names = list(med)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.8))
    vals = [med[n]["output_tok_s"] for n in names]
    colors = ["#888888" if not n.startswith("lmbatch") else "#1f77b4" for n in names]
    ax.barh(names, vals, color=colors)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    floor_tps = res["workload"]["output_tokens"] / res["floor"]["floor_s_all"]
    ax.axvline(floor_tps, color="red", ls="--", lw=1, label=f"FLOP floor ({floor_tps:.0f} tok/s)")
    ax.invert_yaxis()
    ax.set_xlabel("output tokens / s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def latency_chart(plt, res: dict, title: str, png: str) -> None:
    """CDFs of TTFT and E2E (last repeat of each system), times from the start of the run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n, pr in res["per_request"].items():
        ls = "-" if n.startswith("lmbatch") else "--"
        for ax, key in zip(axes, ["ttft_s", "e2e_s"]):
            xs = sorted(pr[key])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", ls=ls, lw=1.2, label=n)
    for ax, lab in zip(axes, ["TTFT (s from run start)", "E2E latency (s from run start)"]):
        ax.set_xlabel(lab)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("result", nargs="?", default=str(RESULTS / "latest.json"), help="a bench.run result JSON")
    path = Path(ap.parse_args(argv).result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    stem = path.parent / res["timestamp"]
    title = (f"{res['model']['params'] / 1e6:.0f}M-param model, {res['workload']['requests']} requests, "
             f"{res['machine']['device']} {res['machine']['dtype']}")
    throughput_chart(plt, res, title, f"{stem}-throughput.png")
    latency_chart(plt, res, title, f"{stem}-latency.png")
    for kind in ("throughput", "latency"):
        shutil.copyfile(f"{stem}-{kind}.png", path.parent / f"latest-{kind}.png")
    print(f"wrote {stem}-throughput.png, {stem}-latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
