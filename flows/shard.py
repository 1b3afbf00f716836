"""One shard, start to finish, in the process that runs its task.

claim -> read -> tokenize/validate -> order + engine -> atomic Parquet write (and, for
output.format openai_jsonl, the shard's OpenAI JSONL parts) -> mark done.
The shard is marked done only after its file is in place, so a crash anywhere never leaves a
partial file or a false "done". Finished rows are checkpointed as hidden part files while the
shard runs (io/parts.py), so a crash costs the rows in flight, and a retry, in this run or the
next, runs only the rows that are missing. A SIGTERM / SIGINT drains the shard (flows/stop.py):
it is given back, its finished rows kept.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

from lmbatch import io
from lmbatch.flows import stop
from lmbatch.flows.config import JobConfig
from lmbatch.flows.engine_cache import get_engine
from lmbatch.flows.manifests import RunPlan, ShardManifest, ShardOutcome
from lmbatch.flows.progress import ShardProgress
from lmbatch.io import openai_output

# A claim is refreshed every HEARTBEAT_S by a background thread; one not refreshed for STALE_S
# belongs to a run that died (killed, OOM, lost node), and the next run may take the shard over.
HEARTBEAT_S = 20.0
STALE_S = 180.0


class InjectedFailure(RuntimeError):
    """Raised for shards listed in `testing.fail_shards` (tests and failure drills)."""


class ShardInterrupted(Exception):
    """The shard was drained by a signal: its finished rows are checkpointed, the rest is not done."""


def _attempt() -> int:
    try:
        from prefect.runtime import task_run

        return int(task_run.run_count or 1)
    except Exception:  # noqa: BLE001 - outside Prefect: the first attempt
        return 1


def _maybe_fail(cfg: JobConfig, index: int) -> None:
    t = cfg.testing
    attempt = _attempt()
    if index in t.fail_shards and (t.fail_attempts is None or attempt <= t.fail_attempts):
        raise InjectedFailure(f"injected failure in shard {index} (attempt {attempt})")


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - called outside a task (tests of the function itself)
        import logging

        return logging.getLogger("lmbatch.flows")


@contextmanager
def _heartbeat(cfg: JobConfig, run_id: str):
    """Refresh this run's claims while the shard runs (model loads and long steps included)."""
    stop = threading.Event()

    def beat() -> None:
        with io.RunDB(cfg.db.url, cfg.output.path) as db:  # its own connection pool, for its own thread
            while not stop.wait(HEARTBEAT_S):
                try:
                    db.heartbeat(run_id)
                except Exception as e:  # noqa: BLE001 - a missed beat is not worth failing the shard
                    _logger().warning("heartbeat failed: %s", e)

    thread = threading.Thread(target=beat, name="lmbatch-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def process_shard(cfg: JobConfig, run: RunPlan, shard: io.ShardPlan, progress: bool | None = None) -> ShardManifest:
    """Run one shard; returns its manifest. Raises on failure (after marking it failed).

    A shard that a live run holds is left to it: the manifest says so and the flow counts the
    shard as not done by this run.
    """
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        if not db.claim_shard(run.run_id, run.job_key, shard.key, stale_after_s=STALE_S):
            claim = db.claim_holder(run.job_key, shard.key)
            reason = io.describe_claim(claim, STALE_S) if claim else "held by another run"
            _logger().warning("shard %d is %s; leaving it to that run", shard.index, reason)
            return ShardManifest(shard.index, shard.key, ShardOutcome.HELD, reason=reason)
        try:
            with _heartbeat(cfg, run.run_id):
                return _run_claimed(cfg, run, shard, db, progress)
        except (ShardInterrupted, KeyboardInterrupt) as e:   # given back, claimable at once
            db.release_shard(run.run_id, run.job_key, shard.key, f"interrupted: {e}")
            if isinstance(e, KeyboardInterrupt):
                raise
            return ShardManifest(shard.index, shard.key, ShardOutcome.INTERRUPTED, reason=str(e))
        except BaseException as e:
            db.fail_shard(run.run_id, run.job_key, shard.key, f"{type(e).__name__}: {e}")
            raise


def _run_claimed(cfg: JobConfig, run: RunPlan, shard: io.ShardPlan, db: io.RunDB,
                 progress: bool | None) -> ShardManifest:
    t0 = time.monotonic()
    _maybe_fail(cfg, shard.index)
    spec = run.spec
    engine = get_engine(cfg.engine_kwargs())
    table = io.read_shard(spec, shard)
    prepared = io.prepare_requests(table, spec, engine.tokenizer, cfg.sampling_kwargs(),
                                   engine.max_model_len)
    storage = dict(cfg.output.storage_options) or None
    parts = io.ShardParts(run.output_dir, shard.key, storage)
    result = _run_checkpointed(cfg, engine, prepared, parts, f"shard {shard.index}", progress)
    if result.interrupted:
        raise ShardInterrupted(f"shard {shard.index}: {result.num_finished} of {prepared.num_rows} rows "
                               "finished and kept; the rerun runs the rest")
    out = io.build_output_table(prepared.input_columns, result.rows, engine.model_name, run.run_id,
                                prepared.with_logprobs)
    path = f"{run.output_dir}/{shard.filename}"
    rows = _write_outputs(cfg, run, out, path, storage)
    device = str(engine.config.resolved_device())
    metrics = io.shard_metrics(result, device=device, price_per_device_hour=cfg.cost.price_per_device_hour)
    if not db.complete_shard(run.run_id, run.job_key, shard.key, output_path=path, num_rows=rows,
                             error_rows=result.num_errors, metrics=metrics):
        raise RuntimeError(f"shard {shard.index} lost its claim while running (another run took it "
                           "over as stale); its file was written but is not recorded as done")
    parts.remove()
    _logger().info("shard %d: %d rows (%d errors), %d output tokens in %.2f s -> %s", shard.index, rows,
                   result.num_errors, metrics["completion_tokens"], result.wall_s, path)
    return ShardManifest(shard.index, shard.key, ShardOutcome.DONE, path=path, rows=rows,
                         error_rows=result.num_errors, completion_tokens=metrics["completion_tokens"],
                         resumed_rows=result.resumed_rows, wall_s=round(time.monotonic() - t0, 3),
                         host=socket.gethostname(), pid=os.getpid())


def _write_outputs(cfg: JobConfig, run: RunPlan, out, path: str, storage: dict | None) -> int:
    """The shard's Parquet file, then (output.format has openai_jsonl) its OpenAI JSONL parts from
    the same rows; returns the file's row count. Parts of an earlier write of this shard are
    dropped first, so a shard's parts never hold other rows than its file."""
    openai_output.remove_parts(path, storage)
    rows = io.write_shard(out, path, storage)
    if cfg.output.openai_jsonl:
        openai_output.write_parts(out, path, run.spec.id_column, run.chat, storage)
    return rows


def _run_checkpointed(cfg: JobConfig, engine, prepared, parts: io.ShardParts, label: str,
                      progress: bool | None) -> io.ShardResult:
    """Run the rows the parts do not hold yet, checkpointing finished rows as they come."""
    done = parts.load()
    checkpoint = io.Checkpointer(parts, cfg.runner.checkpoint_rows, cfg.runner.checkpoint_s)
    with ShardProgress(prepared.num_rows, label, progress) as bar:
        def on_progress(finished: int, total: int, tokens: int) -> None:
            bar.update(finished - bar.rows, tokens - bar.tokens)

        try:
            return io.run_shard(engine, prepared, cfg.ordering, on_progress, done=done, on_row=checkpoint.add,
                                stop=stop.current())
        finally:   # also on a second signal or a crash of the engine: what finished is kept
            checkpoint.flush()
