"""Ordering policies on a crafted shard, and the reusable-prefix estimate they are judged by."""

from __future__ import annotations

import pytest

from lmbatch import io

BS = 4  # a small block size keeps the crafted prompts readable
A, B = [1, 1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, 2]  # two shared 2-block prefixes
# Interleaved in input order: group A (3 requests), group B (2), and two loners.
PROMPTS = [A + [5], B + [6, 6, 6, 6, 6, 6], A + [7, 7], [9, 9, 9], B + [8], A + [3, 3, 3, 3, 3], [0, 4]]


def _groups_adjacent(order, groups):
    pos = {i: k for k, i in enumerate(order)}
    return all(max(pos[i] for i in g) - min(pos[i] for i in g) == len(g) - 1 for g in groups)


def test_input_and_length_policies():
    assert io.order_requests(PROMPTS, "input") == list(range(7))
    desc = io.order_requests(PROMPTS, "length_desc", BS)
    assert [len(PROMPTS[i]) for i in desc] == sorted(map(len, PROMPTS), reverse=True)
    assert desc[:2] == [1, 5]  # 14 and 13 tokens
    asc = io.order_requests(PROMPTS, "length_asc", BS)
    assert [len(PROMPTS[i]) for i in asc] == sorted(map(len, PROMPTS))
    with pytest.raises(ValueError, match="unknown ordering policy 'random'"):
        io.order_requests(PROMPTS, "random")


def test_prefix_policy_puts_shared_prefixes_together():
    order = io.order_requests(PROMPTS, "prefix", BS)
    assert order == sorted(range(7), key=lambda i: PROMPTS[i])
    assert _groups_adjacent(order, [[0, 2, 5], [1, 4]])


def test_prefix_longest_first_orders_groups_then_requests_by_length():
    groups = io.prefix_groups(PROMPTS, BS)
    assert sorted(map(sorted, groups)) == [[0, 2, 5], [1, 4], [3], [6]]
    order = io.order_requests(PROMPTS, "prefix_longest_first", BS)
    assert _groups_adjacent(order, [[0, 2, 5], [1, 4]])
    # Group A holds 32 prompt tokens, B 23, then the loners; longest requests first inside a group.
    assert order == [5, 2, 0, 1, 4, 3, 6]


def test_output_budgets_count_in_the_length_policies():
    # Request 3 has the shortest prompt but by far the largest output budget: it must start first.
    max_tokens = [1, 1, 1, 50, 1, 1, 1]
    assert io.order_requests(PROMPTS, "length_desc", BS, max_tokens)[0] == 3
    assert io.order_requests(PROMPTS, "length_asc", BS, max_tokens)[-1] == 3
    # Inside group A, request 0 (9 prompt tokens) outranks request 5 (13) once it may write 20 more.
    order = io.order_requests(PROMPTS, "prefix_longest_first", BS, [20, 1, 1, 1, 1, 1, 1])
    assert order.index(0) < order.index(5)


def test_every_policy_is_a_permutation():
    for policy in io.ORDERINGS:
        assert sorted(io.order_requests(PROMPTS, policy, BS)) == list(range(len(PROMPTS)))


def test_reusable_prefix_share_rewards_grouping_under_a_small_cache():
    # 4 groups x 5 requests, each a 32-token shared prefix + 4 own tokens, fed round-robin.
    groups = [[g] * 32 for g in range(4)]
    prompts = [groups[g] + [100 + 10 * g + k] * 4 for k in range(5) for g in range(4)]
    total = sum(map(len, prompts))
    ordered = lambda policy: [prompts[i] for i in io.order_requests(prompts, policy, BS)]
    # A cache of one group's prefix: round-robin evicts it before its reuse, grouping keeps it.
    small = 36
    assert io.reusable_prefix_share(ordered("input"), small, BS) == 0.0
    grouped = io.reusable_prefix_share(ordered("prefix_longest_first"), small, BS)
    assert grouped == pytest.approx(4 * 4 * 32 / total)  # every request but a group's first
    # With room for every prefix the order no longer matters.
    assert io.reusable_prefix_share(ordered("input"), 10_000, BS) == pytest.approx(grouped)
    # Never the whole prompt: the last token is always computed.
    assert io.reusable_prefix_share([[1] * 8, [1] * 8], 100, BS) == pytest.approx(4 / 16)


def test_the_cache_simulation_keys_blocks_as_the_engine_does():
    # reusable_prefix_share names blocks with the engine's public hasher; the block manager's
    # prefix cache must name them the same way.
    from lmbatch.engine.block_hash import block_hashes
    from lmbatch.engine.block_manager import BlockManager
    from lmbatch.engine.sampling_params import SamplingParams
    from lmbatch.engine.sequence import Sequence

    prompt = list(range(100, 171))
    bm, seq = BlockManager(16, BS), Sequence(0, 0, prompt, SamplingParams())
    assert block_hashes(prompt, BS) == [bm._block_hash(seq, i) for i in range(len(prompt) // BS)]
