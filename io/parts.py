"""A shard's finished rows made durable as they go, so a kill costs the rows in flight, not the shard.

While a shard runs, its finished rows are written every `every_rows` rows or `every_s` seconds
as hidden part files under `<output_dir>/.parts/<shard key>/` (each written atomically, like the
shard file). A retry of the shard, in this run or the next, loads them, feeds the engine only the
rows that are missing, and writes the one visible shard file from both; the parts are removed once
the shard is recorded as done. The visible layout (one Parquet file per shard under the run
folder, read as `<run>/*.parquet`) does not change: the parts live in a hidden folder that such
globs do not reach.

A part holds each row's position in the shard (`_row`) and its RowResult fields, so the shard's
metrics over resumed rows are the ones measured when they ran. The row, with all of its n
samples, is the unit: the engine returns a request once every sample is done, so a part never
holds some samples of a row, and a resumed row is never run again for its missing samples.
"""

from __future__ import annotations

import posixpath
import time
import uuid
from dataclasses import fields

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lmbatch.io.engine_feed import RowResult, Sample
from lmbatch.io.writer import LOGPROBS_TYPE, write_shard

PARTS_DIR = ".parts"
_TYPES = {"completion": pa.string(), "finish_reason": pa.string(), "error": pa.string(),
          "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(), "cached_tokens": pa.int64(),
          "ttft_s": pa.float64(), "e2e_s": pa.float64(), "itl_s": pa.float64(), "queue_s": pa.float64(),
          "ttft_sched_s": pa.float64(), "logprobs": LOGPROBS_TYPE, "reasoning": pa.string(),
          "reasoning_tokens": pa.int64(),
          "extra_samples": pa.list_(pa.struct([("completion", pa.string()), ("finish_reason", pa.string()),
                                               ("completion_tokens", pa.int64()), ("logprobs", LOGPROBS_TYPE),
                                               ("reasoning", pa.string()), ("reasoning_tokens", pa.int64())]))}
if set(_TYPES) != {f.name for f in fields(RowResult)}:   # a field added to RowResult needs its type here
    raise ImportError("lmbatch.io.parts: the part columns do not match RowResult's fields")
PART_SCHEMA = pa.schema([pa.field("_row", pa.int64())] + [pa.field(k, t) for k, t in _TYPES.items()])


class ShardParts:
    """The part files of one shard of one job (the shard key names the job's row range)."""

    def __init__(self, output_dir: str, shard_key: str, storage_options: dict | None = None):
        self.storage_options = storage_options
        self.dir = f"{output_dir.rstrip('/')}/{PARTS_DIR}/{shard_key}"
        self.fs, self.root = fsspec.core.url_to_fs(self.dir, **(storage_options or {}))

    def load(self) -> dict[int, RowResult]:
        """Row position in the shard -> its result, over every part written so far."""
        done: dict[int, RowResult] = {}
        for path in self._part_paths():
            with self.fs.open(path, "rb") as f:
                for rec in pq.read_table(f, schema=PART_SCHEMA).to_pylist():
                    row = rec.pop("_row")
                    # A part written before samples were stored has no extra_samples: read as null.
                    rec["extra_samples"] = [Sample(**x) for x in rec["extra_samples"] or []]
                    done[row] = RowResult(**rec)
        return done

    def write(self, rows: dict[int, RowResult]) -> None:
        if not rows:
            return
        records = [{"_row": i, **{k: getattr(r, k) for k in _TYPES}} for i, r in sorted(rows.items())]
        for rec in records:
            rec["extra_samples"] = [vars(x) for x in rec["extra_samples"]]
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
        write_shard(pa.Table.from_pylist(records, schema=PART_SCHEMA), f"{self.dir}/{name}", self.storage_options)

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def _part_paths(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)]
        # Hidden names are a writer's temporary files (a kill between write and rename).
        return sorted(f"{self.root}/{n}" for n in names if n.startswith("part-") and n.endswith(".parquet"))


class Checkpointer:
    """Collects a shard's finished rows and writes them as a part every `every_rows` or `every_s`."""

    def __init__(self, parts: ShardParts, every_rows: int, every_s: float, clock=time.monotonic):
        self.parts, self.every_rows, self.every_s, self.clock = parts, every_rows, every_s, clock
        self.pending: dict[int, RowResult] = {}
        self.last = clock()
        self.parts_written = 0

    def add(self, row: int, result: RowResult) -> None:
        self.pending[row] = result
        if len(self.pending) >= self.every_rows or self.clock() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.parts.write(self.pending)
            self.parts_written += 1
            self.pending = {}
        self.last = self.clock()
