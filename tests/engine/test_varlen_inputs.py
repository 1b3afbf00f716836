"""The step arrays of the varlen path against a per-token reference (prefill chunks, decode, padding)."""

from __future__ import annotations

import torch

from lmbatch.engine.sequence import Sequence
from lmbatch.engine.varlen_inputs import tile_queries, varlen_arrays, write_index

BS, KVH, GROUP, SCRATCH = 4, 2, 4, 99


def _seq(seq_id: int, prompt_len: int, computed: int, table: list[int]) -> Sequence:
    seq = Sequence(seq_id, seq_id, list(range(100 * seq_id, 100 * seq_id + prompt_len)), None, block_table=table)
    seq.num_computed_tokens = computed
    return seq


def test_arrays_match_a_per_token_reference_with_padding():
    # a first chunk, a chunk with past context, two decodes (one on a block boundary), then 2 padding rows
    batch = [(_seq(0, 7, 0, [5, 6]), 7), (_seq(1, 11, 6, [8, 2, 9]), 5),
             (_seq(2, 4, 3, [1]), 1), (_seq(3, 9, 8, [4, 7, 3]), 1)]
    got = varlen_arrays(batch, BS, KVH, GROUP, [6, 11, 12, 13], pad_to=6, table_width=4, scratch_block=SCRATCH)
    ids, pos, slots = [], [], []
    for seq, n in batch:
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            ids.append(seq.prompt_token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // BS] * BS + p % BS)
    ids += [0, 0]
    pos += [0, 0]
    slots += [SCRATCH * BS] * 2
    assert got["input_ids"].tolist() == ids
    assert got["positions"].tolist() == pos
    assert torch.equal(got["write_index"], write_index(torch.tensor(slots), BS, KVH))
    assert got["cu_q"].tolist() == [0, 7, 12, 13, 14, 15, 16]
    assert got["seq_lens"].tolist() == [7, 11, 4, 9, 1, 1]
    assert got["block_tables"].tolist() == [[5, 6, 0, 0], [8, 2, 9, 0], [1, 0, 0, 0], [4, 7, 3, 0],
                                            [SCRATCH, 0, 0, 0], [SCRATCH, 0, 0, 0]]
    per_tile = tile_queries(GROUP)
    tiles = [(s, q0) for s, n in enumerate([7, 5, 1, 1, 1, 1]) for q0 in range(0, n, per_tile)]
    assert list(zip(got["tile_seq"].tolist(), got["tile_q0"].tolist())) == tiles
    assert got["sample_rows"].tolist() == [6, 11, 12, 13]


def test_table_width_defaults_to_the_longest_context():
    got = varlen_arrays([(_seq(0, 9, 8, [4, 7, 3]), 1)], BS, KVH, GROUP, [0])
    assert got["block_tables"].tolist() == [[4, 7, 3]]
