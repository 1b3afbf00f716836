"""How the prefix cache names a block of tokens: one hash chain, shared by the engine and io.

Block j of a token sequence is named by hash((name of block j-1, the block's token ids)), so its
name depends on every token before it and two prompts share a block only if they share the whole
prefix up to its end. Python's hash of int tuples is not salted, so names are stable across
processes. This module imports nothing heavy: io's ordering simulates the cache with it.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 16   # tokens per KV block (EngineConfig.block_size)
ROOT = 0                  # the "parent" of a sequence's first block


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    return hash((parent, tuple(token_ids)))


def block_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """The names of the full blocks of `token_ids` (a trailing partial block has none)."""
    names, parent = [], ROOT
    for j in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[j * block_size:(j + 1) * block_size])
        names.append(parent)
    return names
