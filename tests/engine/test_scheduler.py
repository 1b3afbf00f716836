"""The scheduler's promises, without a model: the real Scheduler and BlockManager, steps simulated
as LLMEngine.step does them (tests/engine/scheduling.py). Every expected batch below is worked out
by hand from the policy in engine/scheduler.py's docstring and the block arithmetic (block size 4).
"""

from __future__ import annotations

import random

import pytest
from scheduling import add_all, async_step, create_scheduler, fake_token_at, make_sequence, run_to_completion, step

BS = 4


def _ids(seqs) -> list[int]:
    return [s.seq_id for s in seqs]


# ---- admission ----------------------------------------------------------------------------------

def test_fcfs_admission_under_max_num_seqs():
    sched, bm = create_scheduler(num_blocks=64, block_size=BS, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        sched.add(make_sequence(i, range(10 * i + 1, 10 * i + 6), max_tokens=2))   # 5 distinct tokens
    steps = run_to_completion(sched)
    # Two at a time, in the order added: prefill (5 tokens, samples the 1st token), one decode
    # (samples the 2nd, max_tokens reached), then the next two are admitted.
    assert [s.batch for s in steps] == [
        [(0, 5), (1, 5)], [(0, 1), (1, 1)],
        [(2, 5), (3, 5)], [(2, 1), (3, 1)],
        [(4, 5)], [(4, 1)],
    ]
    assert [s.finished for s in steps] == [[], [0, 1], [], [2, 3], [], [4]]
    bm.assert_no_leaks()


def test_fcfs_head_of_line_request_blocks_smaller_ones_behind_it():
    sched, bm = create_scheduler(num_blocks=6, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_sequence(0, range(1, 13), max_tokens=2)            # 12 tokens: 3 blocks
    add_all(sched, a)
    assert step(sched).batch == [(0, 12)]                       # a samples; 13 tokens now
    big, small = make_sequence(1, range(20, 36), max_tokens=1), make_sequence(2, [40, 41, 42], max_tokens=1)
    sched.add(big)
    sched.add(small)
    s = step(sched)
    # a's decode needs a 4th block (2 left); big needs 4 blocks and does not fit, and small (1 block)
    # is not admitted past it: admission is strictly first come, first served.
    assert s.batch == [(0, 1)] and s.finished == [0]
    assert _ids(sched.waiting) == [1, 2] and bm.num_free_blocks == 6    # a finished and freed 4
    assert step(sched).batch == [(1, 16), (2, 3)]
    bm.assert_no_leaks()


# ---- the token budget and chunked prefill --------------------------------------------------------

def test_token_budget_chunks_a_long_prompt_across_steps():
    sched, bm = create_scheduler(num_blocks=64, block_size=BS, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = make_sequence(0, range(1, 21), max_tokens=2), make_sequence(1, range(30, 36), max_tokens=1)
    add_all(sched, a, b)
    s1 = step(sched)
    assert s1.batch == [(0, 8)] and s1.sampled == []             # budget spent: b waits
    assert a.num_computed_tokens == 8 and len(a.block_table) == 2 and _ids(sched.waiting) == [1]
    s2 = step(sched)
    assert s2.batch == [(0, 8)] and s2.sampled == [] and len(a.block_table) == 4
    s3 = step(sched)
    # a's last 4 prompt tokens complete its prompt (it samples); b gets the 4 tokens left, a chunk.
    assert s3.batch == [(0, 4), (1, 4)] and s3.sampled == [0]
    assert len(a.block_table) == 5 and len(b.block_table) == 1
    s4 = step(sched)
    assert s4.batch == [(0, 1), (1, 2)] and s4.sampled == [0, 1] and s4.finished == [0, 1]
    assert len(a.output_token_ids) == 2 and len(b.output_token_ids) == 1
    bm.assert_no_leaks()


def test_running_decodes_are_granted_before_a_new_prefill():
    sched, bm = create_scheduler(num_blocks=64, block_size=BS, max_num_seqs=8, max_num_batched_tokens=8)
    sched.add(make_sequence(0, [1, 2, 3], max_tokens=5))
    sched.add(make_sequence(1, [4, 5, 6], max_tokens=5))
    assert step(sched).batch == [(0, 3), (1, 3)]
    sched.add(make_sequence(2, range(10, 20), max_tokens=5))   # 10 prompt tokens
    # Running sequences first (one decode token each), the newcomer's prefill in what is left.
    s = step(sched)
    assert s.batch == [(0, 1), (1, 1), (2, 6)] and s.sampled == [0, 1]
    s = step(sched)
    assert s.batch == [(0, 1), (1, 1), (2, 4)] and s.sampled == [0, 1, 2]
    assert step(sched).batch == [(0, 1), (1, 1), (2, 1)]
    run_to_completion(sched)
    bm.assert_no_leaks()


# ---- preemption by recompute ---------------------------------------------------------------------

@pytest.mark.parametrize("caching", [True, False])
def test_preemption_frees_the_newest_and_recomputes_it_later(caching):
    sched, bm = create_scheduler(num_blocks=4, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64,
                                 enable_prefix_caching=caching)
    a, b = make_sequence(0, range(1, 8), max_tokens=4), make_sequence(1, range(11, 18), max_tokens=3)
    add_all(sched, a, b)
    assert step(sched).batch == [(0, 7), (1, 7)]                 # 2 blocks each: the pool is full
    assert step(sched).batch == [(0, 1), (1, 1)]                 # token 8 still fits in 2 blocks
    assert bm.num_free_blocks == 0 and sched.num_preemptions == 0
    s = step(sched)
    # a needs a 3rd block for its 9th token: b, the newest running, is preempted. Its blocks go
    # back to the pool, its outputs stay, it waits at the front and cannot come back yet.
    assert s.batch == [(0, 1)] and sched.num_preemptions == 1
    assert _ids(sched.running) == [0] and _ids(sched.waiting) == [1]
    assert b.block_table == [] and b.num_computed_tokens == 0 and len(b.output_token_ids) == 2
    assert bm.num_free_blocks == 1                               # b's 2 blocks, minus a's new one
    s = step(sched)
    assert s.batch == [(0, 1)] and s.finished == [0]
    s = step(sched)
    # b comes back: prompt and its 2 outputs are recomputed (9 tokens), less its first block,
    # still in the prefix cache (its second was evicted for a's third block).
    assert s.batch == [(1, 5 if caching else 9)] and s.finished == [1]
    assert b.output_token_ids == [fake_token_at(b.seq_id, i) for i in range(3)]   # kept across preemption
    assert sched.num_preemptions == 1 and not sched.has_unfinished()
    # The prefix-cache statistics count first admissions only (prompt tokens 7 + 7, no hits): b's
    # cached block at readmission is not a prompt token served by the cache.
    assert (bm.prefix_queries, bm.prefix_hits) == (14, 0)
    assert b.num_cached_tokens == 0
    bm.assert_no_leaks()


def test_a_sequence_that_does_not_fit_preempts_itself_and_goes_to_the_front():
    sched, bm = create_scheduler(num_blocks=5, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_sequence(0, range(1, 8), max_tokens=4), make_sequence(1, range(11, 18), max_tokens=4)
    add_all(sched, a, b)
    assert step(sched).batch == [(0, 7), (1, 7)]                 # 4 of 5 blocks
    assert step(sched).batch == [(0, 1), (1, 1)]
    c = make_sequence(2, [21, 22, 23], max_tokens=1)
    sched.add(c)
    s = step(sched)
    # a takes the last block; b, the newest, finds none and is itself preempted: no admission
    # this step, and b waits ahead of c.
    assert s.batch == [(0, 1)] and sched.num_preemptions == 1
    assert _ids(sched.waiting) == [1, 2] and b.block_table == [] and bm.num_free_blocks == 2
    s = step(sched)
    # b (its 2 full blocks cached, 1 new needed: 3 > 2 free) still does not fit, so c waits too.
    assert s.batch == [(0, 1)] and s.finished == [0]
    s = step(sched)
    # b recomputes only its 9th token (8 from its own cached blocks); c gets its prompt.
    assert s.batch == [(1, 1), (2, 3)] and s.finished == [2]
    assert len(b.output_token_ids) == 3
    run_to_completion(sched)
    assert b.output_token_ids == [fake_token_at(b.seq_id, i) for i in range(4)]
    bm.assert_no_leaks()


# ---- the prefix cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("caching", [True, False])
def test_shared_full_block_prefix_is_admitted_from_the_cache(caching):
    sched, bm = create_scheduler(num_blocks=16, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64,
                                 enable_prefix_caching=caching)
    a = make_sequence(0, range(1, 11), max_tokens=3)             # 10 tokens: 2 full blocks + 2
    add_all(sched, a)
    assert step(sched).batch == [(0, 10)]
    assert len(a.block_table) == 3 and bm.num_free_blocks == 13
    b = make_sequence(1, [*range(1, 9), 50, 51, 52], max_tokens=2)   # a's 8 first tokens, then its own
    sched.add(b)
    s = step(sched)
    if caching:
        # 2 full blocks from the cache: 3 tokens computed, 1 new block (3 for 11 tokens, less 2).
        assert s.batch == [(0, 1), (1, 3)]
        assert b.num_cached_tokens == 8 and bm.num_free_blocks == 12
        assert (bm.prefix_queries, bm.prefix_hits) == (10 + 11, 8)
    else:
        assert s.batch == [(0, 1), (1, 11)]
        assert b.num_cached_tokens == 0 and bm.num_free_blocks == 10
    run_to_completion(sched)
    bm.assert_no_leaks()


def test_blocks_filled_this_step_are_shared_by_a_later_sequence_in_the_same_step():
    sched, bm = create_scheduler(num_blocks=16, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_sequence(0, range(1, 11), max_tokens=2)
    b = make_sequence(1, [*range(1, 9), 50, 51, 52], max_tokens=2)
    add_all(sched, a, b)
    assert step(sched).batch == [(0, 10), (1, 3)]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    run_to_completion(sched)
    bm.assert_no_leaks()


def test_the_last_prompt_token_is_always_computed_even_on_a_full_hit():
    sched, bm = create_scheduler(num_blocks=16, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make_sequence(0, range(1, 9), max_tokens=1))      # exactly 2 full blocks
    assert step(sched).batch == [(0, 8)]
    b = make_sequence(1, range(1, 9), max_tokens=1)             # the same prompt
    sched.add(b)
    # Only the first block may hit: the second holds the last token, whose step must sample.
    assert step(sched).batch == [(1, 4)] and b.num_cached_tokens == 4
    bm.assert_no_leaks()


# ---- everything at once ------------------------------------------------------------------------------

def test_random_workload_keeps_the_invariants_and_finishes_everything():
    rng = random.Random(7)
    budget, max_seqs, num_blocks = 16, 6, 12
    sched, bm = create_scheduler(num_blocks=num_blocks, block_size=BS, max_num_seqs=max_seqs,
                                 max_num_batched_tokens=budget)
    prefixes = [list(range(1, 9)), list(range(200, 212)), []]
    seqs = []
    for i in range(24):
        prompt = rng.choice(prefixes) + [rng.randrange(1000, 2000) for _ in range(rng.randint(1, 14))]
        seqs.append(make_sequence(i, prompt, max_tokens=rng.randint(1, 8)))
        assert bm.blocks_needed(len(prompt) + seqs[-1].params.max_tokens) <= num_blocks  # fits alone
        sched.add(seqs[-1])
    first_admitted: list[int] = []

    def check(s, st):
        assert 0 < st.num_tokens <= budget and all(n > 0 for _, n in st.batch)
        assert len({i for i, _ in st.batch}) == len(st.batch)
        assert len(s.running) <= max_seqs
        first_admitted.extend(i for i, _ in st.batch if i not in first_admitted)
        refs = [0] * num_blocks
        for seq in s.running:
            assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens)
            assert seq.num_computed_tokens <= seq.num_tokens
            for b in seq.block_table:
                refs[b] += 1
        for seq in s.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        assert not set(map(id, s.running)) & set(map(id, s.waiting))
        assert [bm.blocks[i].ref_count for i in range(num_blocks)] == refs
        assert set(bm.free_queue) == {i for i in range(num_blocks) if refs[i] == 0}

    run_to_completion(sched, check=check)
    assert sched.num_preemptions > 0          # the pool is small enough for this workload to preempt
    assert first_admitted == list(range(24))  # first admissions in arrival order
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == [fake_token_at(seq.seq_id, i) for i in range(seq.params.max_tokens)]
    bm.assert_no_leaks()


# ---- async scheduling: tokens pending on the device (engine/overlap.py) --------------------------

def _prefill_with_pending_token(sched, *seqs):
    """One step that prefills seqs and samples a token each, left pending as an overlapped launch does."""
    batch = sched.schedule()
    assert [s for s, _ in batch] == list(seqs)
    for seq, n in batch:
        seq.num_computed_tokens += n
        seq.num_pending += 1


def test_a_block_that_a_pending_token_fills_is_cached_a_step_later_by_its_real_ids():
    sched, bm = create_scheduler(num_blocks=8, block_size=BS)
    seq = make_sequence(0, [1, 2, 3], max_tokens=8)
    sched.add(seq)
    _prefill_with_pending_token(sched, seq)
    assert sched.schedule() == [(seq, 1)]      # position 3, the pending token: fills block 0
    seq.num_computed_tokens += 1
    assert bm.num_cached_blocks == 0           # the host holds 0 for that token, not its id
    seq.output_token_ids.append(77)            # read back; the step after samples the next
    seq.num_pending = 0
    sched.schedule()
    assert [b.token_ids for b in bm.blocks if b.block_hash is not None] == [(1, 2, 3, 77)]


def test_a_sequence_preempted_with_a_pending_token_that_ends_it_leaves_the_queue():
    sched, bm = create_scheduler(num_blocks=3, block_size=BS)
    a, b = make_sequence(0, [1, 2, 3, 4]), make_sequence(1, [5, 6, 7, 8])
    add_all(sched, a, b)
    _prefill_with_pending_token(sched, a, b)
    assert sched.schedule() == [(a, 1)]        # a takes the last block; b, the newest, is preempted
    assert list(sched.waiting) == [b] and b.num_pending == 1
    sched.finish([b])                          # b's pending token was a stop token
    assert not sched.waiting and sched.running == [a]
    sched.finish([a])
    bm.assert_no_leaks()


def test_the_carry_puts_each_pending_token_at_its_own_position():
    """A sequence preempted by a schedule can be readmitted by the same schedule from its cached prefix,
    recomputing a chunk that ends at its pending token: the carry must fill that chunk's last row."""
    from lmbatch.engine.overlap import carry_into

    readmitted = 0

    def check(batch, previous):
        nonlocal readmitted
        carry = carry_into(batch, previous)
        expected, start = [], 0
        for seq, n in batch:   # the row of the pending token, by position, where the chunk holds it
            pending_position = seq.num_tokens - 1
            if seq.num_pending and seq.num_computed_tokens <= pending_position < seq.num_computed_tokens + n:
                expected.append(start + pending_position - seq.num_computed_tokens)
                readmitted += n > 1
            start += n
        assert (carry.dst if carry else []) == expected

    for seed in range(600):
        rng = random.Random(seed)
        sched, _ = create_scheduler(num_blocks=rng.randint(6, 14), block_size=BS,
                                    max_num_batched_tokens=rng.choice([8, 16, 32]), max_num_seqs=rng.choice([3, 4, 8]))
        shared = [rng.randrange(1, 50) for _ in range(12)]
        for i in range(rng.randint(3, 8)):
            prompt = shared[: rng.randint(4, 12)] + [rng.randrange(1, 50) for _ in range(rng.randint(0, 3))]
            sched.add(make_sequence(i, prompt, max_tokens=rng.randint(2, 10)))
        previous = None
        for _ in range(300):
            if not sched.has_unfinished() and previous is None:
                break
            previous = async_step(sched, previous, check)
        assert not sched.has_unfinished() and previous is None
    assert readmitted > 0   # the case above did occur
