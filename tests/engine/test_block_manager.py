"""The KV block pool on its own: allocation, ref counts, the prefix cache's hash chain and LRU."""

from __future__ import annotations

import pytest

from lmbatch.engine.block_manager import BlockManager
from lmbatch.engine.sampling_params import SamplingParams
from lmbatch.engine.sequence import Sequence

BS = 4


def seq(tokens, seq_id=0):
    return Sequence(seq_id, seq_id, list(tokens), SamplingParams())


def admit(bm, s):
    """What the scheduler does: take the cached prefix, allocate the rest of the prompt."""
    hits = bm.match_prefix(s)
    assert bm.allocate(s, s.num_tokens - len(hits) * BS, hits)
    s.num_computed_tokens = s.num_tokens
    return hits


def test_allocation_and_free_counts():
    bm = BlockManager(8, BS)
    a = seq(range(10))
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []
    bm.assert_no_leaks()


def test_allocation_fails_without_side_effects_when_short():
    bm = BlockManager(2, BS)
    a = seq(range(12))
    assert not bm.allocate(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_hits_and_ref_counts():
    bm = BlockManager(16, BS)
    a, b = seq(range(10), 0), seq([*range(8), 99, 98, 97], 1)
    admit(bm, a)
    hits = admit(bm, b)
    assert hits == a.block_table[:2]                 # two full blocks shared, the third differs
    assert [bm.blocks[h].ref_count for h in hits] == [2, 2]
    assert b.block_table[:2] == hits and b.block_table[2] != a.block_table[2]
    bm.free(a)
    assert [bm.blocks[h].ref_count for h in hits] == [1, 1]
    bm.free(b)
    bm.assert_no_leaks()


def test_hash_chain_depends_on_the_parent():
    bm = BlockManager(16, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    admit(bm, a)
    # Same second block, different first block: no hit at all (the chain breaks at block 0).
    assert bm.match_prefix(seq([9, 9, 9, 9, 5, 6, 7, 8, 0])) == []
    assert bm.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8, 1])) == a.block_table[:2]


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(16, BS)
    a = seq(range(8))
    admit(bm, a)
    # An identical 8-token prompt may reuse only the first block: the step that computes the
    # last token is the one that samples.
    assert bm.match_prefix(seq(range(8))) == a.block_table[:1]


def test_hit_after_free_until_evicted_in_lru_order():
    bm = BlockManager(4, BS)
    a = seq(range(9))            # blocks for tokens 0-3, 4-7 and 8
    admit(bm, a)
    first, second, third = a.block_table
    bm.free(a)
    # Freed in reverse: the partial tail block is evicted first, then the second block, then the first.
    assert list(bm.free_queue)[-3:] == [third, second, first]
    assert bm.match_prefix(seq(range(9))) == [first, second]
    b = seq(range(100, 106))     # needs 2 blocks: takes the untouched one, then evicts `third`
    admit(bm, b)
    assert bm.match_prefix(seq(range(9))) == [first, second]
    c = seq(range(200, 203))     # one more block: evicts `second`, the chain now stops after `first`
    admit(bm, c)
    assert bm.match_prefix(seq(range(9))) == [first]
    assert bm.blocks[second].block_hash is None


def test_collision_check_compares_token_ids():
    bm = BlockManager(8, BS)
    a = seq(range(9))
    admit(bm, a)
    other = seq([7, 7, 7, 7, 7])
    # Forge a collision: make the other sequence's first block hash equal to a's.
    other.block_hashes = [a.block_hashes[0]]
    assert bm.match_prefix(other) == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq(range(9))
    admit(bm, a)
    assert bm.match_prefix(seq(range(9))) == [] and bm.num_cached_blocks == 0


def test_leak_check_catches_a_held_block():
    bm = BlockManager(4, BS)
    admit(bm, seq(range(5)))
    with pytest.raises(AssertionError, match="leak"):
        bm.assert_no_leaks()


def test_blocks_of_a_step_that_never_ran_leave_the_cache():
    # Allocation registers the blocks a step will fill; if the step raises, they were never written.
    bm = BlockManager(8, BS)
    a = seq(range(13))
    assert bm.allocate(a, 13) and bm.num_cached_blocks == 3
    bm.free(a)  # num_computed_tokens still 0: the step did not complete
    assert bm.num_cached_blocks == 0 and bm.match_prefix(seq(range(13), 1)) == []
    bm.assert_no_leaks()
    b = seq(range(13), 2)
    admit(bm, b)  # the step ran: its blocks stay cached after free
    bm.free(b)
    assert bm.num_cached_blocks == 3 and len(bm.match_prefix(seq(range(13), 3))) == 3
