"""The host arrays of one step for the ragged (varlen) attention path: built in Python, sent in one copy.

For every scheduled (sequence, n tokens): its n token ids and positions, the pool rows its new K/V
go to, its query offsets and context length, and its block table. A CUDA graph replays a padded
decode batch: `pad_to` adds sequences of one token that write into a scratch block and read it
back (finite garbage, never sampled), and `table_width` fixes the table's width to the graph's.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def plan_tiles(q_lens: list[int], group: int) -> tuple[list[int], list[int]]:
    """(tile_seq, tile_q0): every query of every sequence lands in exactly one tile."""
    per_tile = tile_queries(group)
    tile_seq, tile_q0 = [], []
    for s, n in enumerate(q_lens):
        for q0 in range(0, n, per_tile):
            tile_seq.append(s)
            tile_q0.append(q0)
    return tile_seq, tile_q0


def choose_segments(num_tiles: int, kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Split-K only when the tiles alone leave the GPU idle and the contexts are long."""
    if num_tiles * kv_heads >= 2 * num_sms:
        return 1
    by_length = max(1, max_blocks // BLOCKS_PER_SEGMENT)
    return int(min(MAX_SEGMENTS, next_power_of_2(by_length)))



def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()



def varlen_arrays(batch, block_size: int, kv_heads: int, group: int, sample_rows: list[int],
                  pad_to: int | None = None, table_width: int | None = None,
                  scratch_block: int = 0) -> dict[str, torch.Tensor]:
    ids, pos, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
    for seq, n in batch:
        start = seq.num_computed_tokens
        ids.extend(seq.tokens_between(start, start + n))
        pos.extend(range(start, start + n))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        q_lens.append(n)
        seq_lens.append(start + n)
        tables.append(table)
    for _ in range((pad_to or len(batch)) - len(batch)):
        ids.append(0)
        pos.append(0)
        slots.append(scratch_block * block_size)
        q_lens.append(1)
        seq_lens.append(1)
        tables.append([scratch_block])
    width = table_width or max(-(-n // block_size) for n in seq_lens)
    table_rows = torch.zeros(len(tables), width, dtype=torch.long)
    for i, (t, n) in enumerate(zip(tables, seq_lens)):
        used = -(-n // block_size)
        table_rows[i, :used] = torch.tensor(t[:used], dtype=torch.long)
    tile_seq, tile_q0 = plan_tiles(q_lens, group)
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    return {"input_ids": torch.tensor(ids), "positions": torch.tensor(pos),
            "write_index": write_index(torch.tensor(slots, dtype=torch.long), block_size, kv_heads),
            "cu_q": torch.tensor(cu_q), "seq_lens": torch.tensor(seq_lens), "block_tables": table_rows,
            "tile_seq": torch.tensor(tile_seq), "tile_q0": torch.tensor(tile_q0),
            "sample_rows": torch.tensor(sample_rows, dtype=torch.long)}


def write_index(slots: torch.Tensor, block_size: int, kv_heads: int) -> torch.Tensor:
    """Flat pool rows ([blocks * kv_heads * block_size]) of each new token, head-major."""
    blocks, offsets = slots // block_size, slots % block_size
    heads = torch.arange(kv_heads, dtype=torch.long)[:, None]
    return ((blocks[None, :] * kv_heads + heads) * block_size + offsets[None, :]).flatten()
