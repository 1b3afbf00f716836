"""Shard planning from metadata, and reading one shard's rows in bounded batches.

A shard is a contiguous row range of the input, made of whole or partial units. Planning uses
only the units' row counts and estimated tokens, so it is instant on any dataset size and
deterministic: the same dataset and targets give the same shards and the same keys, which is
what lets a rerun of a job skip the shards it already finished.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import pyarrow as pa

from lmbatch.io import inputs
from lmbatch.io.spec import InputInfo, InputSpec, Unit
from lmbatch.io.validate import read_columns

DEFAULT_TARGET_TOKENS = 1_000_000


@dataclass(frozen=True)
class Piece:
    unit: Unit
    start: int  # first row within the unit
    length: int


@dataclass(frozen=True)
class ShardPlan:
    index: int
    key: str
    row_start: int  # global row range [row_start, row_end) in input order
    row_end: int
    est_tokens: int
    pieces: tuple[Piece, ...] = field(default_factory=tuple)

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def filename(self) -> str:
        return f"part-{self.index:05d}.parquet"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardPlan:
        pieces = tuple(Piece(Unit(**p["unit"]), p["start"], p["length"]) for p in d["pieces"])
        return cls(**{**d, "pieces": pieces})


def plan_shards(info: InputInfo, target_tokens: int | None = None,
                target_rows: int | None = None) -> list[ShardPlan]:
    """Cut the input into shards of about `target_tokens` estimated prompt tokens, each of at
    most `target_rows` rows. The count is fixed first and the target spread evenly over it, so
    shards come out balanced instead of n-1 full ones and a small straggler."""
    if target_tokens is None and target_rows is None:
        target_tokens = DEFAULT_TARGET_TOKENS
    if target_tokens:
        n = min(max(1, math.ceil(info.est_tokens / target_tokens)), info.num_rows)
        cuts = _cut_rows(info.units, n)
    else:
        cuts = [0, info.num_rows]
    if target_rows:
        cuts = _cap_rows(cuts, target_rows)
    shards = []
    for i, (lo, hi) in enumerate(pairwise(cuts)):
        pieces = _pieces(info.units, lo, hi)
        est = sum(round(p.unit.est_tokens * p.length / p.unit.num_rows) for p in pieces)
        key = hashlib.sha256(f"{info.fingerprint}:{lo}:{hi}".encode()).hexdigest()[:16]
        shards.append(ShardPlan(i, key, lo, hi, est, tuple(pieces)))
    return shards


def _cut_rows(units: list[Unit], n: int) -> list[int]:
    """Row boundaries [0, ..., num_rows] that split the estimated tokens into n equal parts,
    assuming tokens spread evenly over the rows of a unit."""
    total_tokens = sum(u.est_tokens for u in units)
    cuts, row0, tok0 = [0], 0, 0.0
    for u in units:
        per_row = u.est_tokens / u.num_rows if u.num_rows else 0.0
        while len(cuts) < n and per_row > 0:
            goal = total_tokens * len(cuts) / n
            if tok0 + u.est_tokens < goal:
                break
            row = row0 + max(0, math.ceil((goal - tok0) / per_row))
            cuts.append(min(max(row, cuts[-1] + 1), row0 + u.num_rows))
        row0, tok0 = row0 + u.num_rows, tok0 + u.est_tokens
    num_rows = row0
    cuts = [c for c in cuts if c < num_rows]
    return sorted(set(cuts)) + [num_rows]


def _cap_rows(cuts: list[int], target_rows: int) -> list[int]:
    """Split every shard longer than target_rows into equal parts."""
    out = [0]
    for lo, hi in pairwise(cuts):
        parts = math.ceil((hi - lo) / target_rows)
        out.extend(lo + round((hi - lo) * k / parts) for k in range(1, parts + 1))
    return out


def _pieces(units: list[Unit], lo: int, hi: int) -> list[Piece]:
    pieces, row0 = [], 0
    for u in units:
        a, b = max(lo, row0), min(hi, row0 + u.num_rows)
        if b > a:
            pieces.append(Piece(u, a - row0, b - a))
        row0 += u.num_rows
        if row0 >= hi:
            break
    return pieces


def iter_shard_batches(spec: InputSpec, shard: ShardPlan, columns: list[str] | None = None,
                       batch_rows: int = inputs.READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The shard's rows in input order, at most `batch_rows` at a time (one unit in memory)."""
    fs, _ = inputs.get_fs(spec)
    columns = columns or read_columns(spec)
    parts = ((p.unit, p.start, p.length) for p in shard.pieces)
    yield from inputs.read_units(fs, spec.format, parts, columns, batch_rows)


def read_shard(spec: InputSpec, shard: ShardPlan, columns: list[str] | None = None) -> pa.Table:
    """The whole shard as one table (a shard is sized to fit in memory; the dataset is not).

    `spec` must be the resolved one, `InputInfo.spec`."""
    columns = columns or read_columns(spec)
    batches = list(iter_shard_batches(spec, shard, columns))
    if not batches:
        raise ValueError(f"shard {shard.index} ({shard.key}) read no rows")
    return pa.Table.from_batches(batches).combine_chunks()
