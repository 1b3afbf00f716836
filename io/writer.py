"""Shard outputs: the fixed output schema, atomic files and an atomic Parquet writer.

A shard's file is written under a hidden temporary name in its final directory and renamed into
place only when complete, so a reader (`select * from 'out/run/*.parquet'`) never sees a partial
file, and a crash leaves at most a hidden temp file that no glob of `*.parquet` matches. The
schema is fixed and typed whatever the data: an all-null `error` column is still a string
column, so shards concatenate and downstream readers never see a type flip between files.

An input row run with n samples becomes n output rows, ordered (input order, sample_index); the
`sample_index` column is always there (0 for n = 1 and for error rows), so the schema does not
depend on whether any row of a shard asked for n > 1 (a per-row n column can differ by row).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Sequence
from typing import Self

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

TOP_LOGPROB_TYPE = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64())])
# One entry per generated token: the sampled token's log-probability and the top alternatives.
LOGPROBS_TYPE = pa.list_(pa.struct([
    ("token_id", pa.int64()), ("logprob", pa.float64()), ("top", pa.list_(TOP_LOGPROB_TYPE)),
]))
RESULT_FIELDS = [
    pa.field("sample_index", pa.int64()),   # 0 .. n-1 within an input row; with the id, the row's key
    pa.field("completion", pa.string()),     # the answer (a reasoning model's thinking is in `reasoning`)
    pa.field("reasoning", pa.string()),      # null unless engine.reasoning_parser is set
    pa.field("finish_reason", pa.string()),  # stop | length | error
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),   # of completion_tokens, the thinking section's
    pa.field("cached_tokens", pa.int64()),
    pa.field("ttft_s", pa.float64()),
    pa.field("e2e_s", pa.float64()),
    pa.field("itl_s", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
]
RESULT_COLUMNS = [f.name for f in RESULT_FIELDS] + ["logprobs"]
# Columns that differ between the samples of one input row; the others describe the request
# (its prompt, cache hits and latencies) and repeat on each of its sample rows.
SAMPLE_COLUMNS = ("completion", "reasoning", "finish_reason", "completion_tokens", "reasoning_tokens", "logprobs")
COMPRESSION = "zstd"


def output_schema(input_fields: Sequence[pa.Field], with_logprobs: bool = False) -> pa.Schema:
    """Id and passthrough columns (their input types), then the result columns."""
    fields = list(input_fields) + RESULT_FIELDS
    if with_logprobs:
        fields.append(pa.field("logprobs", LOGPROBS_TYPE))
    return pa.schema(fields)


def build_output_table(input_columns: pa.Table, rows: Sequence, model: str, run_id: str,
                       with_logprobs: bool = False) -> pa.Table:
    """One output row per sample of each input row, ordered (input order, sample_index).

    `input_columns` holds the id and passthrough columns of the shard; `rows` the RowResult of
    each input row at the same position (`RowResult.samples`: one, or n with n > 1).
    """
    if len(rows) != input_columns.num_rows:
        raise ValueError(f"{len(rows)} results for {input_columns.num_rows} input rows")
    schema = output_schema(input_columns.schema, with_logprobs)
    per_sample = [(row, k, sample) for row in rows for k, sample in enumerate(row.samples)]
    source = [i for i, row in enumerate(rows) for _ in row.samples]   # input row of each output row
    inputs = input_columns if len(source) == len(rows) else input_columns.take(source)
    arrays = list(inputs.columns)
    for field in RESULT_FIELDS:
        arrays.append(pa.array(_column(field.name, per_sample, model, run_id), type=field.type))
    if with_logprobs:
        arrays.append(pa.array([s.logprobs for _, _, s in per_sample], type=LOGPROBS_TYPE))
    return pa.Table.from_arrays(arrays, schema=schema)


def _column(name: str, per_sample: list, model: str, run_id: str) -> list:
    if name == "sample_index":
        return [k for _, k, _ in per_sample]
    if name in ("model", "run_id"):
        return [model if name == "model" else run_id] * len(per_sample)
    if name in SAMPLE_COLUMNS:
        return [getattr(s, name) for _, _, s in per_sample]
    return [getattr(row, name) for row, _, _ in per_sample]


class AtomicFile:
    """`with AtomicFile(path) as f: f.write(...)`: the file appears under `path` whole or not at all.

    It is written under a hidden temporary name in its final directory, flushed to disk and
    renamed into place when the block exits cleanly, and removed when it raises.
    """

    def __init__(self, path: str, storage_options: dict | None = None):
        self.fs, self.path = fsspec.core.url_to_fs(path, **(storage_options or {}))
        name = posixpath.basename(self.path)
        self.tmp_path = posixpath.join(posixpath.dirname(self.path), f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self._file = None

    def __enter__(self):
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self._file = self.fs.open(self.tmp_path, "wb")
        return self._file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and isinstance(self.fs, LocalFileSystem):
                self._file.flush()
                os.fsync(self._file.fileno())  # the rename must never publish unwritten bytes
            self._file.close()
        except BaseException:
            self._discard()
            raise
        if exc_type is None:
            self._publish()
        else:
            self._discard()

    def _discard(self) -> None:
        if self.fs.exists(self.tmp_path):
            self.fs.rm(self.tmp_path)

    def _publish(self) -> None:
        if isinstance(self.fs, LocalFileSystem):
            os.replace(self.tmp_path, self.path)  # atomic on POSIX within one directory
            dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        else:  # object stores: the final object appears whole on its single upload/copy
            self.fs.mv(self.tmp_path, self.path)


class ShardWriter:
    """Write one Parquet file atomically: `with ShardWriter(path, schema) as w: w.write(table)`.

    The file becomes visible under `path` only when the block exits without an exception.
    """

    def __init__(self, path: str, schema: pa.Schema, storage_options: dict | None = None):
        self._target = AtomicFile(path, storage_options)
        self.fs, self.path, self.tmp_path = self._target.fs, self._target.path, self._target.tmp_path
        self.schema = schema
        self.num_rows = 0
        self._writer = None

    def __enter__(self) -> Self:
        self._writer = pq.ParquetWriter(self._target.__enter__(), self.schema, compression=COMPRESSION)
        return self

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        self._writer.write(table.cast(self.schema) if table.schema != self.schema else table)
        self.num_rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()   # writes the footer: a file without one must never be published
        except BaseException as e:
            self._target.__exit__(type(e), e, e.__traceback__)
            raise
        self._target.__exit__(exc_type, exc, tb)


def write_shard(table: pa.Table, path: str, storage_options: dict | None = None) -> int:
    """Write a whole output table atomically; returns the row count written."""
    with ShardWriter(path, table.schema, storage_options) as w:
        w.write(table)
    return w.num_rows


def count_rows(path: str, storage_options: dict | None = None) -> int | None:
    """Rows of a finished shard file from its footer, or None when it is missing or unreadable."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    try:
        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowException):
        return None
