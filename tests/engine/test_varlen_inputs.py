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


def test_table_rows_follow_appends_new_owners_freed_tables_and_padding():
    """The graph path's persistent tables equal freshly built ones step after step, and a row whose
    sequence did not change is not written again."""
    import numpy as np

    from lmbatch.engine.varlen_inputs import TableRows

    width = 6
    rows = TableRows(np.zeros((5, width), dtype=np.int64))
    a, b, c = _seq(0, 5, 4, [3, 8]), _seq(1, 2, 1, [6]), _seq(2, 9, 8, [1, 2, 7])

    def step(batch, pad_to):
        got = varlen_arrays(batch, BS, KVH, GROUP, list(range(len(batch))), pad_to=pad_to,
                            scratch_block=SCRATCH, table_rows=rows)["block_tables"]
        fresh = varlen_arrays(batch, BS, KVH, GROUP, list(range(len(batch))), pad_to=pad_to, table_width=width,
                              scratch_block=SCRATCH)["block_tables"]
        for i, (seq, _) in enumerate(batch):      # a row's context blocks; what lies past them is not read
            used = -(-(seq.num_computed_tokens + 1) // BS)
            assert got[i, :used].tolist() == fresh[i, :used].tolist() == seq.block_table[:used]
        assert got[len(batch):, 0].tolist() == [SCRATCH] * (pad_to - len(batch))

    step([(a, 1), (b, 1)], 4)
    rows.table[1, 0] = -1                         # b's row, unchanged next step: must not be rewritten
    step_b_unchanged = [(a, 1), (b, 1)]
    a.num_computed_tokens = 8                     # a crosses into a third block
    a.output_token_ids = [0] * 4
    a.block_table.append(5)
    got = varlen_arrays(step_b_unchanged, BS, KVH, GROUP, [0, 1], pad_to=4, scratch_block=SCRATCH,
                        table_rows=rows)["block_tables"]
    assert got[0, :3].tolist() == [3, 8, 5] and got[1, 0] == -1
    rows.table[1, 0] = 6
    step([(c, 1), (a, 1)], 4)                     # rows change owners; the old padding rows are real now
    b.block_table = [9]                           # b freed (preempted) and given new blocks: a new list
    step([(b, 1), (c, 1), (a, 1)], 5)
    step([(a, 1)], 2)                             # rows 1.. back to padding
