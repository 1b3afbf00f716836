"""The order in which a shard's requests are fed to the engine ("packing").

With a paged KV cache there is no padding to pack away; what the order decides is (a) whether
requests sharing a prefix run while that prefix is still cached, and (b) whether the longest
requests start early instead of straggling alone at the end of the shard. Orders are returned as
permutations (lists of positions) so that results can always be put back in input order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from lmbatch.engine.block_hash import DEFAULT_BLOCK_SIZE, block_hashes

ORDERINGS = ("input", "length_desc", "length_asc", "prefix", "prefix_longest_first")
DEFAULT_ORDERING = "prefix_longest_first"  # chosen from the benchmark: README, bench/NOTES.md


def order_requests(prompts: Sequence[Sequence[int]], ordering: str = DEFAULT_ORDERING,
                   block_size: int = DEFAULT_BLOCK_SIZE, max_tokens: Sequence[int] | None = None) -> list[int]:
    """A permutation of range(len(prompts)): the feeding order under `ordering`.

    A request's length is its prompt plus its `max_tokens` when given: in a batch job the output
    budget is known up front, and a long output started late runs alone at the end of the shard.
    Ties always break by input position, so every order is deterministic.
    """
    idx = range(len(prompts))
    length = _lengths(prompts, max_tokens)
    if ordering == "input":
        return list(idx)
    if ordering == "length_desc":
        return sorted(idx, key=lambda i: (-length[i], i))
    if ordering == "length_asc":
        return sorted(idx, key=lambda i: (length[i], i))
    if ordering == "prefix":
        return sorted(idx, key=lambda i: (tuple(prompts[i]), i))
    if ordering == "prefix_longest_first":
        return _prefix_longest_first(prompts, block_size, length)
    raise ValueError(f"unknown ordering policy {ordering!r}; choose one of {', '.join(ORDERINGS)}")


def prefix_groups(prompts: Sequence[Sequence[int]], block_size: int = DEFAULT_BLOCK_SIZE) -> list[list[int]]:
    """Groups of positions whose prompts share at least one full cache block of prefix.

    Only full blocks are cached, so a shared prefix shorter than `block_size` saves nothing:
    groups are the runs of the lexicographic order whose neighbours share a full first block.
    """
    lex = sorted(range(len(prompts)), key=lambda i: (tuple(prompts[i]), i))
    groups: list[list[int]] = []
    for i in lex:
        head = tuple(prompts[i][:block_size])
        if groups and len(head) == block_size and head == tuple(prompts[groups[-1][-1]][:block_size]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _lengths(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int | None] | None) -> list[int]:
    if max_tokens is None:
        return [len(p) for p in prompts]
    return [len(p) + (m or 0) for p, m in zip(prompts, max_tokens, strict=True)]


def _prefix_longest_first(prompts: Sequence[Sequence[int]], block_size: int, length: list[int]) -> list[int]:
    # Groups with the most tokens first (they dominate the shard's time), and within a group the
    # longest requests first; the group's shared prefix stays cached while it runs.
    groups = prefix_groups(prompts, block_size)
    groups.sort(key=lambda g: (-sum(length[i] for i in g), g[0]))
    return [i for g in groups for i in sorted(g, key=lambda i: (-length[i], i))]


def reusable_prefix_share(ordered_prompts: Sequence[Sequence[int]], cache_tokens: int,
                          block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """Share of prompt tokens a prefix cache of `cache_tokens` could serve, fed in this order.

    Simulates the engine's cache: chained hashes of full blocks, LRU eviction, and (as vLLM)
    never a hit on the whole prompt, since the last prompt token must be computed for logits.
    It ignores blocks pinned by running requests, so it is an upper bound for a real run.
    """
    capacity = cache_tokens // block_size
    cache: OrderedDict[int, None] = OrderedDict()
    hit_tokens = total_tokens = 0
    for prompt in ordered_prompts:
        total_tokens += len(prompt)
        keys = block_hashes(prompt, block_size)
        hits = 0
        for k in keys[: (len(prompt) - 1) // block_size]:
            if k not in cache:
                break
            hits += 1
        hit_tokens += hits * block_size
        for k in keys:
            cache[k] = None
            cache.move_to_end(k)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hit_tokens / total_tokens if total_tokens else 0.0
