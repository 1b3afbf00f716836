"""The run database (SQLAlchemy 2.x): runs, their shards, resume and shard claims.

Shards belong to a *job* (job key = hash of the config and the dataset fingerprint), not to a
run: every run of the same job sees the same shard rows, which is what makes resume and
exclusion work. A shard is done once, by whichever run claimed it. A claim is one conditional
UPDATE (status pending/failed, or a claim gone stale) whose row count says who won, so two
runs of the same job at once never both write a shard, on SQLite and PostgreSQL alike.

A claim names its holder (host, pid, process start time: holder.py). A run that finds a claim
whose holder is a process of its own host that no longer exists takes it over at once; claims of
other hosts are taken over only when their heartbeat is stale. The tables are in rundb_schema.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lmbatch.io.holder import Holder
from lmbatch.io.rundb_schema import Base, Run, Shard, Status, add_missing_columns
from lmbatch.io.writer import count_rows

DB_URL_ENV = "LMBATCH_DB_URL"
DEFAULT_OUTPUT_PATH = "outputs"   # output.path's default; the SQLite run database sits in it


def job_key(config: dict[str, Any], fingerprint: str) -> str:
    """Hash of the settings that change the outputs (canonical JSON) and the dataset fingerprint.

    The flow passes JobConfig.key_values() plus the output folder (flows/job.py:job_identity);
    a setting that does not change outputs (a batch size, the database URL) would defeat resume."""
    blob = json.dumps({"config": config, "fingerprint": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def configured_db_url(url: str | None = None) -> str | None:
    """The run database the user named: an explicit URL, else $LMBATCH_DB_URL, else None."""
    return url or os.environ.get(DB_URL_ENV) or None


def resolve_db_url(url: str | None = None, output_dir: str | None = None) -> str:
    """The one rule for which run database a job uses: the configured one (configured_db_url),
    else a SQLite file in the output folder (created when RunDB opens it)."""
    configured = configured_db_url(url)
    if configured:
        return configured
    if output_dir is None:
        raise ValueError(f"no database URL: pass one, set {DB_URL_ENV}, or give an output directory")
    return f"sqlite:///{os.path.join(output_dir, 'lmbatch.db')}"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # naive UTC: same on every backend


class RunDB:
    """Run and shard bookkeeping on any SQLAlchemy URL (`sqlite:///...`, `postgresql+psycopg://...`)."""

    def __init__(self, url: str | None = None, output_dir: str | None = None):
        self.url = make_url(resolve_db_url(url, output_dir))
        sqlite = self.url.get_backend_name() == "sqlite"
        if sqlite and self.url.database and self.url.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.url.database)), exist_ok=True)
        connect_args = {"timeout": 30} if sqlite else {}
        self.engine = create_engine(self.url, pool_pre_ping=True, connect_args=connect_args)
        Base.metadata.create_all(self.engine)
        add_missing_columns(self.engine)

    def __repr__(self) -> str:  # never show credentials in logs
        return f"RunDB({self.url.render_as_string(hide_password=True)})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- runs -----------------------------------------------------------------------------------
    def start_run(self, job_key: str, *, run_name: str | None = None, model: str | None = None,
                  fingerprint: str | None = None, config: dict | None = None,
                  output_dir: str | None = None, run_id: str | None = None) -> str:
        run_id = run_id or uuid.uuid4().hex
        with Session(self.engine) as s, s.begin():
            s.add(Run(run_id=run_id, job_key=job_key, run_name=run_name, model=model, status=Status.RUNNING,
                      fingerprint=fingerprint, output_dir=output_dir, config=config, started_at=_now()))
        return run_id

    def finish_run(self, run_id: str, status: str = Status.DONE, metrics: dict | None = None,
                   error: str | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(Run).where(Run.run_id == run_id).values(
                status=status, metrics=metrics, error=error, finished_at=_now()))
            if status != Status.DONE:  # let the next run take over this run's shards at once
                s.execute(_release(Shard.run_id == run_id))

    def release_claims(self, job_key: str) -> list[dict[str, Any]]:
        """Free every running claim of a job (`lmbatch status RUN --release`, for a host gone for
        good); returns what was released: shard index, run id, holder host and pid."""
        with Session(self.engine) as s, s.begin():
            held = s.scalars(select(Shard).where(Shard.job_key == job_key, Shard.status == Status.RUNNING)
                             .order_by(Shard.shard_index)).all()
            released = [{"shard": h.shard_index, "run_id": h.run_id, "host": h.holder_host, "pid": h.holder_pid}
                        for h in held]
            s.execute(_release(Shard.job_key == job_key))
        return released

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with Session(self.engine) as s:
            run = s.get(Run, run_id)
            return None if run is None else _as_dict(run)

    # ---- shards ---------------------------------------------------------------------------------
    def register_shards(self, job_key: str, plans: Iterable) -> None:
        """Insert the job's shards that are not there yet (another run may insert the same)."""
        rows = [{"job_key": job_key, "shard_key": p.key, "shard_index": p.index,
                 "row_start": p.row_start, "row_end": p.row_end, "status": Status.PENDING} for p in plans]
        if not rows:
            return
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            mod = __import__(f"sqlalchemy.dialects.{dialect}", fromlist=["insert"])
            stmt = mod.insert(Shard).on_conflict_do_nothing(index_elements=["job_key", "shard_key"])
            with Session(self.engine) as s, s.begin():
                s.execute(stmt, rows)
            return
        for row in rows:  # other backends: the unique constraint decides
            try:
                with Session(self.engine) as s, s.begin():
                    s.execute(insert(Shard), [row])
            except IntegrityError:
                pass

    def find_run(self, run: str) -> dict[str, Any]:
        """The latest run whose id or name is `run`; LookupError if none."""
        with Session(self.engine) as s:
            found = s.scalars(select(Run).where(or_(Run.run_id == run, Run.run_name == run))
                              .order_by(Run.started_at.desc())).first()
            if found is None:
                raise LookupError(f"no run named {run!r} in the run database")
            return _as_dict(found)

    def recent_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            return [_as_dict(r) for r in s.scalars(select(Run).order_by(Run.started_at.desc()).limit(limit))]

    def shards(self, job_key: str) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            rows = s.scalars(select(Shard).where(Shard.job_key == job_key).order_by(Shard.shard_index))
            return [_as_dict(r) for r in rows]

    def resume(self, job_key: str, plans: list, storage_options: dict | None = None) -> tuple[list, list]:
        """Split a plan into (to_run, done). A shard counts as done only if its output file
        exists with the recorded row count; otherwise it is reset to pending and redone.
        `storage_options`: the output's, as the shard files were written with them."""
        self.register_shards(job_key, plans)
        by_key = {r["shard_key"]: r for r in self.shards(job_key)}
        to_run, done = [], []
        for p in plans:
            row = by_key[p.key]
            path = row["output_path"]
            if row["status"] == Status.DONE and path and count_rows(path, storage_options) == row["num_rows"]:
                done.append(p)
                continue
            if row["status"] == Status.DONE:
                self._reset(job_key, p.key)
            to_run.append(p)
        return to_run, done

    def _reset(self, job_key: str, shard_key: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(Shard).where(Shard.job_key == job_key, Shard.shard_key == shard_key,
                                          Shard.status == Status.DONE)
                      .values(status=Status.PENDING, run_id=None, output_path=None, num_rows=None))

    def claim_shard(self, run_id: str, job_key: str, shard_key: str, stale_after_s: float = 3600.0,
                    holder: Holder | None = None) -> bool:
        """Take the shard for this run; True if this run won it.

        One atomic conditional UPDATE: free shards (pending, failed) and claims not refreshed
        for `stale_after_s` (a crashed run) can be taken; running and done ones cannot. A
        running claim whose holder is a dead process of this host is taken over at once, by a
        second UPDATE conditional on the claim being unchanged since it was read."""
        now = _now()
        holder = holder or Holder.current()
        stale = now - timedelta(seconds=stale_after_s)
        claimable = (Shard.status.in_([Status.PENDING, Status.FAILED])
                     | ((Shard.status == Status.RUNNING) & (Shard.claimed_at < stale)))
        this = (Shard.job_key == job_key) & (Shard.shard_key == shard_key)
        if self._take(this & claimable, run_id, holder, now):
            return True
        current = self.claim_holder(job_key, shard_key)
        if current is None or current["status"] != Status.RUNNING or not _holder(current).is_dead_here():
            return False
        unchanged = this & (Shard.status == Status.RUNNING) & (Shard.run_id == current["run_id"]) \
            & (Shard.claimed_at == current["claimed_at"])
        return self._take(unchanged, run_id, holder, now)

    def _take(self, condition, run_id: str, holder: Holder, now: datetime) -> bool:
        with Session(self.engine) as s, s.begin():
            res = s.execute(update(Shard).where(condition).values(
                status=Status.RUNNING, run_id=run_id, claimed_at=now, error=None, holder_host=holder.host,
                holder_pid=holder.pid, holder_start=holder.start))
            return res.rowcount == 1

    def claim_holder(self, job_key: str, shard_key: str) -> dict[str, Any] | None:
        """The shard's claim: status, run_id, claimed_at and the holder's host, pid and start."""
        with Session(self.engine) as s:
            row = s.scalars(select(Shard).where(Shard.job_key == job_key, Shard.shard_key == shard_key)).first()
            if row is None:
                return None
            return {k: getattr(row, k) for k in ("status", "run_id", "claimed_at", "holder_host", "holder_pid",
                                                 "holder_start")}

    def release_shard(self, run_id: str, job_key: str, shard_key: str, note: str) -> None:
        """Give an interrupted shard back (pending, at once claimable), with a note of why."""
        with Session(self.engine) as s, s.begin():
            s.execute(_release((Shard.run_id == run_id) & (Shard.job_key == job_key)
                               & (Shard.shard_key == shard_key)).values(error=note[:10000]))

    def heartbeat(self, run_id: str) -> None:
        """Refresh this run's claims, so a long shard is not mistaken for a crashed one."""
        with Session(self.engine) as s, s.begin():
            s.execute(update(Shard).where(Shard.run_id == run_id, Shard.status == Status.RUNNING)
                      .values(claimed_at=_now()))

    def complete_shard(self, run_id: str, job_key: str, shard_key: str, *, output_path: str,
                       num_rows: int, error_rows: int = 0, metrics: dict | None = None) -> bool:
        """Mark done (after the output file is in place); False if this run no longer held it."""
        with Session(self.engine) as s, s.begin():
            res = s.execute(update(Shard).where(
                Shard.job_key == job_key, Shard.shard_key == shard_key,
                Shard.run_id == run_id, Shard.status == Status.RUNNING).values(
                status=Status.DONE, finished_at=_now(), output_path=output_path, num_rows=num_rows,
                error_rows=error_rows, metrics=metrics))
            return res.rowcount == 1

    def fail_shard(self, run_id: str, job_key: str, shard_key: str, error: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(Shard).where(Shard.job_key == job_key, Shard.shard_key == shard_key,
                                          Shard.run_id == run_id, Shard.status == Status.RUNNING)
                      .values(status=Status.FAILED, error=error[:10000], finished_at=_now()))

    def done_metrics(self, job_key: str, shard_keys: Iterable[str] | None = None) -> list[dict]:
        """Metrics of the done shards of the job (this run's and resumed ones), for the roll-up;
        `shard_keys`: only these (one plan's shards: an older plan's rows must not count)."""
        query = select(Shard.metrics).where(Shard.job_key == job_key, Shard.status == Status.DONE)
        if shard_keys is not None:
            query = query.where(Shard.shard_key.in_(list(shard_keys)))
        with Session(self.engine) as s:
            return [m for m in s.scalars(query.order_by(Shard.shard_index)) if m]


def _release(condition):
    """The UPDATE that frees the running shards matching `condition`."""
    return (update(Shard).where(condition, Shard.status == Status.RUNNING)
            .values(status=Status.PENDING, run_id=None, claimed_at=None, holder_host=None, holder_pid=None,
                    holder_start=None))


def _holder(claim: dict[str, Any]) -> Holder:
    return Holder(claim["holder_host"] or "", claim["holder_pid"] or 0, claim["holder_start"] or "")


def describe_claim(claim: dict[str, Any], stale_after_s: float) -> str:
    """What happens next to a shard another run holds, for the message that leaves it alone."""
    holder = _holder(claim)
    who = f"run {claim['run_id']} ({holder.describe()})" if holder.host else f"run {claim['run_id']}"
    if holder.is_local():
        return f"held by {who}, which is alive: it is that run's to finish"
    free_at = claim["claimed_at"] + timedelta(seconds=stale_after_s) if claim["claimed_at"] else None
    when = f"at {free_at:%Y-%m-%d %H:%M:%S} UTC" if free_at else "once its heartbeat stops"
    return (f"held by {who}; another host's claim becomes claimable {when} if its heartbeat stops "
            f"(`lmbatch status <run> --release` frees it if that host is gone)")


def _as_dict(obj: Base) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}
