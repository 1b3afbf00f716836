"""The run database's tables: runs and their shards, and the columns added since the first release.

rundb.py holds the operations on them (resume, claims, heartbeats); this file only what is stored.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text, UniqueConstraint, inspect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Status(StrEnum):
    """A run's or a shard's state in the run database (stored as its string value)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"   # a run stopped by a signal: its finished rows are kept


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "lmbatch_runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_key: Mapped[str] = mapped_column(String(64), index=True)
    run_name: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), default=Status.RUNNING)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    output_dir: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict | None] = mapped_column(JSON)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Shard(Base):
    __tablename__ = "lmbatch_shards"
    # The unique key is the exclusion: one row per (job, shard), claimed by one run at a time.
    __table_args__ = (UniqueConstraint("job_key", "shard_key", name="uq_lmbatch_shard"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_key: Mapped[str] = mapped_column(String(64))
    shard_key: Mapped[str] = mapped_column(String(64))
    shard_index: Mapped[int] = mapped_column(Integer)
    row_start: Mapped[int] = mapped_column(BigInteger)
    row_end: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=Status.PENDING)
    run_id: Mapped[str | None] = mapped_column(String(64))  # the run holding or having done it
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    output_path: Mapped[str | None] = mapped_column(Text)
    num_rows: Mapped[int | None] = mapped_column(BigInteger)
    error_rows: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    holder_host: Mapped[str | None] = mapped_column(String(255))
    holder_pid: Mapped[int | None] = mapped_column(Integer)
    holder_start: Mapped[str | None] = mapped_column(String(32))


# Columns added after the first release: databases created before get them at open.
_ADDED_COLUMNS = {"lmbatch_shards": {"holder_host": "VARCHAR(255)", "holder_pid": "INTEGER",
                                     "holder_start": "VARCHAR(32)"}}


def add_missing_columns(engine) -> None:
    """Give a database created by an earlier release the columns added since."""
    inspector = inspect(engine)
    for table, columns in _ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        with engine.begin() as conn:
            for name, sql_type in columns.items():
                if name not in present:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
