"""What the CLI prints and draws: plan tables, run status, the metrics table and PNG plots.

Reads the run database through io.RunDB and the outputs through pyarrow; it
never needs Prefect or the engine, so `status` and `report` work on any machine that sees the
database and the output folder.
"""

from __future__ import annotations

import glob
import os

from lmbatch import io

# (label, metric key, sub-key or None, unit)
TABLE = [
    ("rows", "rows", None, ""), ("error rows", "error_rows", None, ""),
    ("output rows (one per sample)", "output_rows", None, ""),
    ("shards run / skipped / failed", None, None, ""),
    ("wall time (shards)", "wall_s", None, "s"), ("requests/s", "requests_per_s", None, ""),
    ("input tokens/s", "input_tokens_per_s", None, ""), ("output tokens/s", "output_tokens_per_s", None, ""),
    ("total tokens/s", "total_tokens_per_s", None, ""),
    ("TTFT p50 / p90 / p99", "ttft_s", "pcts", "s"), ("ITL p50 / p90 / p99", "itl_s", "pcts", "s"),
    ("E2E p50 / p90 / p99", "e2e_s", "pcts", "s"),
    ("prefix cache hit rate", "prefix_cache_hit_rate", "pct", ""), ("preemptions", "preemptions", None, ""),
    ("device", "device", None, ""), ("cost per 1k requests", "cost_per_1k_requests", None, ""),
    ("cost per 1M output tokens", "cost_per_1m_output_tokens", None, ""),
]


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _value(metrics: dict, key, sub, unit: str) -> str:
    if key is None:
        return " / ".join(_num(metrics.get(k)) for k in ("shards_run", "shards_skipped", "shards_failed"))
    v = metrics.get(key)
    if sub == "pcts":
        v = v or {}
        return " / ".join(_num(v.get(p)) for p in ("p50", "p90", "p99")) + f" {unit}"
    if sub == "pct":
        return "-" if v is None else f"{100 * v:.1f} %"
    return f"{_num(v)} {unit}".rstrip()


def format_metrics(metrics: dict, title: str = "metrics") -> str:
    rows = [(label, _value(metrics, key, sub, unit)) for label, key, sub, unit in TABLE]
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * (width + 30)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def format_plan(plan: dict) -> str:
    lines = [(f"input {plan['input']}: {plan['num_rows']:,} rows, ~{plan['est_tokens']:,} prompt tokens "
              "(estimated from bytes)"), f"job key {plan['job_key']}, run name {plan['run_name']}",
             f"{'shard':>5}  {'rows':>9}  {'row range':>19}  {'est tokens':>11}  status"]
    for s in plan["shards"]:
        rng = f"{s['row_start']}-{s['row_start'] + s['rows']}"
        lines.append(f"{s['shard']:>5}  {s['rows']:>9,}  {rng:>19}  {s['est_tokens']:>11,}  {s['status']}")
    return "\n".join(lines)


def open_db(db_url: str) -> io.RunDB:
    """The run database; LookupError (not a new empty file) when a SQLite file is missing."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and not os.path.exists(url.database):
        raise LookupError(f"no run database at {url.database} (no run yet, or pass --db / --config)")
    return io.RunDB(db_url)


def release_text(db_url: str, run: str) -> str:
    """Free the claims on the run's job; says which were freed and who held them."""
    with open_db(db_url) as db:
        released = db.release_claims(db.find_run(run)["job_key"])
    if not released:
        return "no shard of this job is claimed"
    return "\n".join(f"released shard {r['shard']} (run {r['run_id']}, pid {r['pid']} on {r['host']})"
                     for r in released)


def status_text(db_url: str, run: str | None = None, limit: int = 20) -> str:
    with open_db(db_url) as db:
        if run is None:
            return _runs_table(db.recent_runs(limit))
        r = db.find_run(run)
        return _run_status(r, db.shards(r["job_key"]))


def _runs_table(runs: list[dict]) -> str:
    if not runs:
        return "no runs yet"
    lines = [f"{'started (UTC)':<19}  {'status':<8}  {'rows':>8}  {'run name':<28}  run id"]
    lines += [f"{r['started_at']:%Y-%m-%d %H:%M:%S}  {r['status']:<8}  "
              f"{_num((r['metrics'] or {}).get('rows')):>8}  {r['run_name'] or '':<28}  {r['run_id']}"
              for r in runs]
    return "\n".join(lines)


def _run_status(r: dict, shards: list[dict]) -> str:
    lines = [f"run {r['run_name']} ({r['run_id']}): {r['status']}; model {r['model']}; outputs {r['output_dir']}"]
    if r["error"]:
        lines.append(f"error: {r['error']}")
    lines.append(f"{'shard':>5}  {'status':<8}  {'rows':>8}  {'errors':>6}  output / error")
    for sh in shards:
        detail = sh["output_path"] or sh["error"] or ""
        lines.append(f"{sh['shard_index']:>5}  {sh['status']:<8}  {_num(sh['num_rows']):>8}  "
                     f"{_num(sh['error_rows']):>6}  {detail}")
    return "\n".join(lines)


def write_report(db_url: str, run: str, out_dir: str | None = None) -> tuple[str, list[str]]:
    """The metrics table of a run and PNG plots of its latency distributions and throughput."""
    with open_db(db_url) as db:
        r = db.find_run(run)
        name, metrics, output_dir = r["run_name"], dict(r["metrics"] or {}), r["output_dir"]
        paths = [sh["output_path"] for sh in db.shards(r["job_key"]) if sh["status"] == io.Status.DONE]
    text = format_metrics(metrics, title=f"run {name}")
    paths = [p for p in paths if p and os.path.exists(p)] or sorted(
        glob.glob(os.path.join(output_dir or "", "*.parquet")))
    if not paths:
        return text + "\n(no output files found: no plots)", []
    from lmbatch.flows.plots import write_plots

    return text, write_plots(paths, out_dir or output_dir, name)
