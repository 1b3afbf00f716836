"""Prefect artifacts of a run: a progress bar in the UI and a table of the run's metrics.

Artifacts are a convenience for the UI, never the record (the run database is): any failure to
write one is logged and ignored so that a flaky API cannot fail a night's job.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """Prefect keys allow only lowercase letters, digits and dashes."""
    key = "-".join(re.sub(r"[^a-z0-9-]+", "-", str(p).lower()) for p in parts)
    return re.sub(r"-+", "-", key).strip("-")[:100] or "lmbatch"


def create_progress(run_name: str, total_shards: int) -> UUID | None:
    from prefect.artifacts import create_progress_artifact

    try:
        return create_progress_artifact(
            progress=0.0, key=artifact_key("lmbatch-progress", run_name),
            description=f"Shards done of {total_shards} for run {run_name}",
        )
    except Exception as e:  # noqa: BLE001 - see module docstring
        log.warning("could not create the progress artifact: %s", e)
        return None


def update_progress(artifact_id: UUID | None, done: int, total: int) -> None:
    if artifact_id is None:
        return
    from prefect.artifacts import update_progress_artifact

    try:
        update_progress_artifact(artifact_id, progress=100.0 * done / max(total, 1))
    except Exception as e:  # noqa: BLE001
        log.warning("could not update the progress artifact: %s", e)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value if isinstance(value, (int, str, bool)) or value is None else str(value)


def metrics_rows(metrics: dict) -> list[dict]:
    """A flat {metric, value} table of a (possibly nested) metrics dict."""
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            rows += [{"metric": f"{name}.{k}", "value": _cell(v)} for k, v in value.items()]
        else:
            rows.append({"metric": name, "value": _cell(value)})
    return rows


def create_metrics_table(run_name: str, metrics: dict, shards: list[dict]) -> UUID | None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    try:
        aid = create_table_artifact(
            table=metrics_rows(metrics), key=artifact_key("lmbatch-metrics", run_name),
            description=f"Metrics of run {run_name}",
        )
        lines = ["| shard | status | rows | errors | output |", "|---|---|---|---|---|"]
        lines += [f"| {s.get('shard')} | {s.get('status')} | {s.get('rows', '')} | "
                  f"{s.get('error_rows', '')} | {s.get('path', '')} |" for s in shards]
        create_markdown_artifact("\n".join(lines), key=artifact_key("lmbatch-shards", run_name),
                                 description=f"Shards of run {run_name}")
        return aid
    except Exception as e:  # noqa: BLE001
        log.warning("could not create the metrics artifacts: %s", e)
        return None
