"""The job as a Prefect flow: plan -> one task per shard -> roll-up.

Tasks exchange small manifests (paths, counts, metrics), never tables: a shard's rows stay in
the process that reads, runs and writes them. The run database, not Prefect's result storage,
is the record of what is done, so resume works the same from the CLI, a deployment or Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lmbatch import io
from lmbatch.flows import artifacts, stop
from lmbatch.flows.config import JobConfig, validate_config
from lmbatch.flows.manifests import RunPlan, ShardFailure, ShardManifest, ShardOutcome
from lmbatch.flows.preflight import input_spec, preflight
from lmbatch.flows.ray_runner import ray_states
from lmbatch.flows.shard import InjectedFailure, process_shard  # noqa: F401 (re-exported)
from lmbatch.io import openai_output


class ShardsFailed(RuntimeError):
    """Raised by the flow after the roll-up when shards failed; `.result` holds the run summary."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def job_identity(cfg: JobConfig, fingerprint: str, run_name: str | None) -> tuple[str, str, str]:
    """(job key, run name, output folder): the one place a job's identity is computed.

    The key hashes the settings that change the outputs (JobConfig.key_values: each field of the
    config says whether it counts) and the dataset's fingerprint. The default run name is stable
    across reruns of the same config and data, so a rerun resumes into the same folder. The output
    folder is part of the key: `--run-name other` starts a fresh job in its own folder instead of
    "resuming" shards whose files live elsewhere.
    """
    # The output columns count too: a job resumed across a release that changed them would mix
    # shard files of two schemas in one folder.
    values = {**cfg.key_values(), "output_columns": list(io.writer.RESULT_COLUMNS)}
    run_name = run_name or f"{cfg.name}-{io.job_key(values, fingerprint)[:8]}"
    output_dir = f"{cfg.output.path.rstrip('/')}/{run_name}"
    return io.job_key({**values, "output_dir": output_dir}, fingerprint), run_name, output_dir


def _plan(cfg: JobConfig, run_name: str | None, input_checked: bool = False):
    """(input info, shard plans, job key, run name, output folder): metadata only, no compute.

    `input_checked`: the caller's preflight has streamed the id column already (the CLI does);
    on a huge input that is the costly part of the inspection, so it is not done twice.
    """
    spec = input_spec(cfg)
    if input_checked:
        spec = replace(spec, check_duplicate_ids=False)
    info = io.inspect_input(spec)
    shards = io.plan_shards(info, target_tokens=cfg.shards.target_tokens,
                            target_rows=cfg.shards.target_rows)
    return info, shards, *job_identity(cfg, info.fingerprint, run_name)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(cfg: JobConfig, run_name: str | None, input_checked: bool = False) -> RunPlan:
    """Inspect the input, cut shards, register the run; returns what the shard tasks need."""
    logger = get_run_logger()
    info, shards, key, run_name, output_dir = _plan(cfg, run_name, input_checked)
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        run_id = db.start_run(key, run_name=run_name, model=cfg.model.id, fingerprint=info.fingerprint,
                              config=cfg.model_dump(mode="json"), output_dir=output_dir)
        to_run, done = db.resume(key, shards, dict(cfg.output.storage_options) or None)
    logger.info("run %s (%s): %d rows in %d shards; %d to run, %d already done", run_name, run_id,
                info.num_rows, len(shards), len(to_run), len(done))
    return RunPlan(run_id=run_id, run_name=run_name, job_key=key, output_dir=output_dir, spec=info.spec,
                   num_rows=info.num_rows, num_shards=len(shards), to_run=list(to_run),
                   skipped=[s.index for s in done], shard_keys=[s.key for s in shards],
                   prompt_kind=info.prompt_kind)


@task(name="shard", cache_policy=NO_CACHE, task_run_name="shard-{shard.index}")
def shard_task(cfg: JobConfig, run: RunPlan, shard: io.ShardPlan, progress: bool | None = None) -> ShardManifest:
    return process_shard(cfg, run, shard, progress)


@task(name="roll-up", cache_policy=NO_CACHE)
def rollup_task(cfg: JobConfig, run: RunPlan, manifests: list[ShardManifest], failed: list[ShardFailure],
                wall_s: float, interrupted: bool = False) -> dict:
    """Run metrics over every done shard of the job (this run's and earlier runs')."""
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        # Only this plan's shards: rows of an older plan of the same job must not be counted.
        done = db.done_metrics(run.job_key, shard_keys=run.shard_keys)
        metrics = io.rollup_metrics(done, device=_device(cfg),
                                    price_per_device_hour=cfg.cost.price_per_device_hour)
        metrics.update({"run_wall_s": wall_s, "shards_total": run.num_shards,
                        "shards_run": len(manifests), "shards_skipped": len(run.skipped),
                        "shards_failed": len(failed), "input_rows": run.num_rows})
        io.write_metrics_json(metrics, f"{run.output_dir}/metrics.json")
        status = io.Status.INTERRUPTED if interrupted else io.Status.FAILED if failed else io.Status.DONE
        error = "; ".join(f.message for f in failed) or None
        try:
            if cfg.output.openai_jsonl:
                _publish_openai_jsonl(cfg, run, db)
        except Exception as e:
            # The shards are done and recorded; only the joined files are missing: the run says
            # so instead of staying "running", and a rerun (every shard skipped) publishes them.
            db.finish_run(run.run_id, io.Status.FAILED, metrics, error=f"OpenAI JSONL files not written: {e}")
            raise
        db.finish_run(run.run_id, status, metrics, error=error)
    metrics.pop("histograms", None)
    return metrics


def _publish_openai_jsonl(cfg: JobConfig, run: RunPlan, db: io.RunDB) -> None:
    """<run>/output.jsonl and errors.jsonl from every done shard of this plan, in shard order.

    Rebuilt whole at each roll-up, so after a failed shard they hold the done shards' rows and the
    rerun that finishes the job completes them.
    """
    keys = set(run.shard_keys)
    paths = [s["output_path"] for s in db.shards(run.job_key)
             if s["status"] == io.Status.DONE and s["shard_key"] in keys and s["output_path"]]
    output, errors = openai_output.publish(run.output_dir, paths, run.spec.id_column, run.chat,
                                           dict(cfg.output.storage_options) or None)
    get_run_logger().info("OpenAI batch files from %d shard(s): %s, %s", len(paths), output, errors)


def _device(cfg: JobConfig) -> str:
    from lmbatch.engine import EngineConfig

    return str(EngineConfig(**cfg.engine_kwargs()).resolved_device())


def _shard_states(cfg: JobConfig, run: RunPlan, progress: bool | None) -> Iterator[tuple[io.ShardPlan, Any]]:
    """Run the shard tasks; yields (shard, final state) pairs as shards finish."""
    task_ = shard_task.with_options(retries=cfg.runner.retries,
                                    retry_delay_seconds=cfg.runner.retry_delay_s)
    if cfg.runner.kind == "ray":
        return ray_states(cfg, task_, run)
    # One engine, one shard after another: the engine is the batching, so running shards
    # concurrently in threads would only split the same device between them. After a SIGTERM /
    # SIGINT (flows/stop.py) no further shard starts.
    return ((s, task_(cfg, run, s, progress, return_state=True)) for s in run.to_run
            if not stop.current().draining())


@flow(name="lmbatch-batch-inference", log_prints=False)
def batch_inference(config: dict, run_name: str | None = None, progress: bool | None = None,
                    input_checked: bool = False) -> dict:
    """Run a batch-inference job; resumes a previous run of the same job.

    `config` is the job config as plain data (what a deployment stores); it is validated once,
    here, and the tasks get the JobConfig itself. `input_checked`: the caller has run preflight
    with the input check (the CLI does), so the plan does not stream the id column a second time.

    Ends Failed (raising ShardsFailed) naming the shards that failed after their retries, once
    every other shard has finished and the metrics are rolled up.
    """
    t0 = time.monotonic()
    stop.reclaim()   # SIGTERM drains the job (flows/stop.py), not Prefect's crash-style termination
    cfg = validate_config(config)
    # The CLI has checked all this already; a deployment's run has not. The input itself is
    # inspected by the plan task.
    if cfg.demo:
        from lmbatch.flows.demo import ensure_demo

        ensure_demo(cfg.demo.dir, cfg.demo.rows)
    preflight(cfg, check_input=False)
    run = plan_task(cfg, run_name, input_checked)
    manifests, failed = _run_shards(cfg, run, progress)
    interrupted = stop.current().draining()
    metrics = rollup_task(cfg, run, manifests, failed, time.monotonic() - t0, interrupted)
    artifacts.create_metrics_table(run.run_name, metrics, _shard_rows(run, manifests, failed))
    return _finish(cfg, run, metrics, manifests, failed, interrupted)


def _run_shards(cfg: JobConfig, run: RunPlan, progress: bool | None
                ) -> tuple[list[ShardManifest], list[ShardFailure]]:
    """Every shard to run, as they finish: the manifests of those done and the failures."""
    logger = get_run_logger()
    progress_id = artifacts.create_progress(run.run_name, run.num_shards)
    artifacts.update_progress(progress_id, len(run.skipped), run.num_shards)
    manifests, failed = [], []
    for shard, state in _shard_states(cfg, run, progress):
        manifest, failure = _outcome(shard, state)
        if manifest:
            manifests.append(manifest)
            artifacts.update_progress(progress_id, len(run.skipped) + len(manifests), run.num_shards)
        else:
            failed.append(failure)
            (logger.warning if failure.interrupted else logger.error)("%s", failure.message)
    return manifests, failed


def _shard_rows(run: RunPlan, manifests: list[ShardManifest], failed: list[ShardFailure]) -> list[dict]:
    return ([{"shard": i, "status": "skipped (done before)"} for i in run.skipped]
            + [m.as_dict() for m in manifests] + [{**f.as_dict(), "status": "failed"} for f in failed])


def _finish(cfg: JobConfig, run: RunPlan, metrics: dict, manifests: list[ShardManifest],
            failed: list[ShardFailure], interrupted: bool) -> dict:
    """The flow's result (plain data), raised inside ShardsFailed when not every shard is done."""
    result = {"run_id": run.run_id, "run_name": run.run_name, "output_dir": run.output_dir,
              "num_shards": run.num_shards, "skipped": run.skipped, "metrics": metrics,
              "shards": [m.as_dict() for m in manifests], "failed_shards": [f.as_dict() for f in failed],
              "interrupted": interrupted}
    if interrupted:
        not_done = run.num_shards - len(run.skipped) - len(manifests)
        raise ShardsFailed(f"interrupted by {_signal_name()}: {len(manifests)} shard(s) finished, {not_done} "
                           "not done (their finished rows are kept); rerun to resume", result)
    if failed:
        raise ShardsFailed(_failure_message(failed, cfg.runner.retries), result)
    get_run_logger().info("run %s done: %d rows, %.1f output tokens/s", run.run_name, metrics.get("rows", 0),
                          metrics.get("output_tokens_per_s") or 0.0)
    return result


def _outcome(shard: io.ShardPlan, state) -> tuple[ShardManifest | None, ShardFailure | None]:
    """(manifest, None) for a shard done by this run, else (None, failure)."""
    manifest: ShardManifest | None = state.result() if state.is_completed() else None
    if manifest and manifest.status == ShardOutcome.DONE:
        return manifest, None
    if manifest and manifest.status == ShardOutcome.INTERRUPTED:
        return None, ShardFailure(shard.index, shard.key, manifest.reason, interrupted=True)
    if manifest:  # held by another live run of the same job: not done by this one
        return None, ShardFailure(shard.index, shard.key, f"shard {shard.index} ({shard.key}): {manifest.reason}",
                                  held=True)
    return None, ShardFailure(shard.index, shard.key, f"shard {shard.index} ({shard.key}): {state.message}")


def _signal_name() -> str:
    import signal

    signum = stop.current().signum
    return signal.Signals(signum).name if signum else "a signal"


def _failure_message(failed: list[ShardFailure], retries: int) -> str:
    def names(items):
        return ", ".join(f"shard {f.shard}" for f in items)

    errored = [f for f in failed if not f.held]
    held = [f for f in failed if f.held]
    parts = [f"{names(errored)} failed after {retries + 1} attempt(s), rerun to retry"] if errored else []
    parts += [f.message for f in held]
    return f"{'; '.join(parts)}; the other shards are done (first failure: {failed[0].message})"


# ---- entry points used by the CLI and tests ------------------------------------------------------

def run_job(cfg: JobConfig, run_name: str | None = None, progress: bool | None = None,
            input_checked: bool = False) -> dict:
    """Run the flow; returns its summary, with `failed_shards` and `message` set on failure."""
    try:
        return {**batch_inference(cfg.model_dump(mode="json"), run_name, progress, input_checked), "message": None}
    except ShardsFailed as e:
        return {**e.result, "message": str(e)}


def plan_only(cfg: JobConfig, run_name: str | None = None, input_checked: bool = False) -> dict:
    """The shard plan and what a run would skip, without registering a run or loading a model."""
    info, shards, key, run_name, _ = _plan(cfg, run_name, input_checked)
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        by_key = {r["shard_key"]: r for r in db.shards(key)}
    return {"input": cfg.input.path, "num_rows": info.num_rows, "est_tokens": info.est_tokens,
            "job_key": key, "run_name": run_name,
            "shards": [{"shard": s.index, "key": s.key, "rows": s.num_rows, "row_start": s.row_start,
                        "est_tokens": s.est_tokens,
                        "status": by_key.get(s.key, {}).get("status", "new")} for s in shards]}
