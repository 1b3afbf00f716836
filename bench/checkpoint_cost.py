"""What making finished rows durable costs: io.run_shard with and without part-file checkpoints.

    .venv/bin/python -m bench.checkpoint_cost [--repeats 3]     # from the repository root

The default CPU bench model and workload (100 requests), one engine, runs interleaved per repeat:
no checkpoints; the job's defaults (a part every 1000 rows or 15 s, runner.checkpoint_rows /
checkpoint_s); and every 8 rows (an upper bound: 13 parts in a 12 s run). Reports the median wall
of each and the ratio to no checkpoints, and writes bench/results/checkpoint-cost-<time>.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()

import pyarrow as pa

from bench.cli import REPO, RESULTS, parser
from bench.cpu_info import cpu_info
from bench.toy_models import ensure_model
from bench.workload import WorkloadSpec, make_workload
from lmbatch import io
from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams

SETTINGS = {"none": None, "defaults (1000 rows / 15 s)": (1000, 15.0), "every 8 rows": (8, 1e9)}


def prepared_shard(workload) -> io.PreparedShard:
    n = len(workload.requests)
    sampling = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in workload.requests]
    return io.PreparedShard(pa.table({"id": list(range(n))}), workload.prompts(), sampling, [None] * n, False)


def timed_run(engine, prepared, setting, scratch: Path) -> tuple[float, int]:
    checkpoint = None
    if setting is not None:
        parts = io.ShardParts(str(scratch), f"shard-{time.time_ns()}")
        checkpoint = io.Checkpointer(parts, *setting)
    t0 = time.monotonic()
    result = io.run_shard(engine, prepared, "prefix_longest_first", on_row=checkpoint.add if checkpoint else None)
    if checkpoint:
        checkpoint.flush()
    wall = time.monotonic() - t0
    assert result.num_finished == prepared.num_rows
    return wall, checkpoint.parts_written if checkpoint else 0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = ensure_model("cpu", RESULTS)
    workload = make_workload(WorkloadSpec.preset("default"))
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", max_model_len=4096))
    prepared = prepared_shard(workload)
    walls: dict[str, list[float]] = {k: [] for k in SETTINGS}
    parts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        timed_run(engine, prepared, None, Path(scratch))   # warm-up: kernels, allocator
        for rep in range(a.repeats):
            names = list(SETTINGS)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                wall, parts[name] = timed_run(engine, prepared, SETTINGS[name], Path(scratch))
                walls[name].append(wall)
                print(f"rep {rep} {name}: {wall:.2f} s, {parts[name]} parts", flush=True)
    base = statistics.median(walls["none"])
    report = {"cpu": cpu_info(), "repeats": a.repeats, "requests": len(workload.requests),
              "results": {k: {"walls": v, "median": statistics.median(v), "vs_none": statistics.median(v) / base,
                              "parts": parts[k]} for k, v in walls.items()}}
    for k, r in report["results"].items():
        print(f"{k:28s} median {r['median']:.2f} s  x{r['vs_none']:.3f}  ({r['parts']} parts)")
    out = RESULTS
    out.mkdir(exist_ok=True)
    path = out / f"checkpoint-cost-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
