"""The host arrays of one step for the ragged (varlen) attention path: built in Python, sent in one copy.

For every scheduled (sequence, n tokens): its n token ids and positions, the pool rows its new K/V
go to, its query offsets and context length, and its block table. A CUDA graph replays a padded
decode batch: `pad_to` adds sequences of one token that write into a scratch block and read it
back (finite garbage, never sampled), and `table_width` fixes the table's width to the graph's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_TILE_ROWS = 16        # tl.dot needs at least 16 rows
MAX_SEGMENTS = 16
BLOCKS_PER_SEGMENT = 16   # split a context only past this many blocks per segment


@dataclass
class VarlenBatch:
    """The step's layout for the kernel, on the device: built once per step, shared by all layers."""
    cu_q: torch.Tensor          # [S + 1] query offsets of each sequence in the step
    seq_lens: torch.Tensor      # [S] context lengths after the step
    block_tables: torch.Tensor  # [S, max_blocks]
    tile_seq: torch.Tensor      # [tiles] the sequence of each query tile
    tile_q0: torch.Tensor       # [tiles] its first query within the sequence
    num_segments: int = 1


def tile_queries(group: int) -> int:
    """Queries per tile: enough rows for tl.dot, (query, head) rows of one GQA group."""
    return max(1, max(MIN_TILE_ROWS, next_power_of_2(group)) // group)


def plan_tiles(q_lens, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seq, tile_q0): every query of every sequence lands in exactly one tile."""
    per_tile = tile_queries(group)
    tiles = -(-np.asarray(q_lens, dtype=np.int64) // per_tile)
    tile_seq = np.repeat(np.arange(len(tiles)), tiles)
    first_tile = np.cumsum(tiles) - tiles
    return tile_seq, (np.arange(len(tile_seq)) - first_tile[tile_seq]) * per_tile


def choose_segments(num_tiles: int, kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Split-K only when the tiles alone leave the GPU idle and the contexts are long."""
    if num_tiles * kv_heads >= 2 * num_sms:
        return 1
    by_length = max(1, max_blocks // BLOCKS_PER_SEGMENT)
    return int(min(MAX_SEGMENTS, next_power_of_2(by_length)))



def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()



class TableRows:
    """Block tables kept between steps, row by row (a CUDA graph's static host buffer).

    Converting every table of a 256-sequence decode step from Python lists costs ~0.3 ms of host time
    each step, yet a row changes only when its sequence gains a block (one step in 16) or another
    sequence takes the row. A row remembers the list it copied and how much of it: the block
    manager only appends to a sequence's table and replaces the list when it frees the blocks, so
    the same list object with more entries means "append these". Entries past a row's length may be
    stale; the kernel reads only the blocks of the row's context.
    """

    def __init__(self, table: np.ndarray):
        self.table = table                                   # [max rows, width]
        self.written: list[tuple[list | None, int]] = [(None, 0)] * table.shape[0]

    def update(self, batch, used: np.ndarray, rows: int, scratch_block: int) -> np.ndarray:
        table, written = self.table, self.written
        for i, ((seq, _), n) in enumerate(zip(batch, used.tolist())):
            blocks = seq.block_table
            source, done = written[i]
            if source is not blocks or done > n:
                done = 0
            if done < n:
                table[i, done:n] = blocks[done:n]
                written[i] = (blocks, n)
        for i in range(len(batch), rows):                     # padding: one token in the scratch block
            if written[i][0] is not None or table[i, 0] != scratch_block:
                table[i, 0] = scratch_block
                written[i] = (None, 0)
        return table[:rows]


def varlen_arrays(batch, block_size: int, kv_heads: int, group: int, sample_rows: list[int],
                  pad_to: int | None = None, table_width: int | None = None,
                  scratch_block: int = 0, table_rows: TableRows | None = None) -> dict[str, torch.Tensor]:
    """The step's arrays. Python touches each sequence once; per-token work is numpy (a decode step of
    256 sequences built with per-token lists and one tensor per table row cost ~2.5 ms of host time).
    With `table_rows` the tables are written into (and returned from) its persistent rows."""
    rows = pad_to or len(batch)
    q_lens = np.ones(rows, dtype=np.int64)
    seq_lens = np.ones(rows, dtype=np.int64)
    ids: list[int] = []
    for i, (seq, n) in enumerate(batch):
        start = seq.num_computed_tokens
        ids.extend(seq.tokens_between(start, start + n))
        q_lens[i], seq_lens[i] = n, start + n
    ids.extend([0] * (rows - len(batch)))
    used = -(-seq_lens // block_size)
    if table_rows is not None:
        tables = table_rows.update(batch, used, rows, scratch_block)
    else:
        tables = np.zeros((rows, table_width or int(used.max(initial=1))), dtype=np.int64)
        for i, (seq, _) in enumerate(batch):
            tables[i, :used[i]] = seq.block_table[:used[i]]
        tables[len(batch):, 0] = scratch_block      # padding: one token in the scratch block
    cu_q = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu_q[1:])
    owner = np.repeat(np.arange(rows), q_lens)                  # each token's sequence
    positions = np.arange(cu_q[-1]) - cu_q[owner] + (seq_lens - q_lens)[owner]
    slots = tables[owner, positions // block_size] * block_size + positions % block_size
    tile_seq, tile_q0 = plan_tiles(q_lens, group)
    t = torch.from_numpy
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "positions": t(positions),
            "write_index": write_index(t(slots), block_size, kv_heads),
            "cu_q": t(cu_q), "seq_lens": t(seq_lens), "block_tables": t(tables),
            "tile_seq": t(tile_seq), "tile_q0": t(tile_q0),
            "sample_rows": torch.tensor(sample_rows, dtype=torch.long)}


def write_index(slots: torch.Tensor, block_size: int, kv_heads: int) -> torch.Tensor:
    """Flat pool rows ([blocks * kv_heads * block_size]) of each new token, head-major."""
    blocks, offsets = slots // block_size, slots % block_size
    heads = torch.arange(kv_heads, dtype=torch.long)[:, None]
    return ((blocks[None, :] * kv_heads + heads) * block_size + offsets[None, :]).flatten()
