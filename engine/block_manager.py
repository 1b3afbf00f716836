"""The paged KV block pool: allocation, reference counts and the prefix cache.

A block holds `block_size` consecutive tokens of one or more sequences. Full blocks are named by a
hash chain (parent block's hash, this block's token ids), so two sequences that start with the same
tokens name the same blocks and share them. Unreferenced blocks go to the tail of an LRU free queue
but keep their hash: a later sequence can take them back out until they are reused (evicted).
"""

from __future__ import annotations

from collections import OrderedDict

from .block_hash import ROOT, hash_block
from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the head is the least recently freed block.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}   # block hash -> block id
        self.prefix_queries = 0            # prompt tokens looked up in the cache
        self.prefix_hits = 0               # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, i: int) -> int:
        """Hash of the seq's i-th full block; computed once per sequence and block."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else ROOT
            seq.block_hashes.append(hash_block(parent, seq.tokens_between(j * self.block_size,
                                                                          (j + 1) * self.block_size)))
        return seq.block_hashes[i]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of seq, longest first match; nothing is taken yet.

        At least the last token is always left to compute: the step that computes it samples.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_known_tokens - 1) // self.block_size):
            block_id = self.cached.get(self._block_hash(seq, i))
            if block_id is None:
                break
            block = self.blocks[block_id]
            start = i * self.block_size
            if block.token_ids != tuple(seq.tokens_between(start, start + self.block_size)):
                break  # a hash collision: same hash, other tokens
            hits.append(block_id)
        return hits

    def _register_full_blocks(self, seq: Sequence, num_tokens_after: int) -> None:
        # Only blocks whose tokens the host knows: a block that a pending token (async scheduling)
        # fills is named one step later, hence the start one token back.
        bs = self.block_size
        first = max(seq.num_computed_tokens - 1, 0) // bs
        if not self.enable_prefix_caching or num_tokens_after // bs <= first:
            return                                # most steps: no block boundary crossed
        for i in range(first, min(num_tokens_after, seq.num_known_tokens) // bs):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue
            block_hash = self._block_hash(seq, i)
            if block_hash in self.cached:
                continue  # another sequence computed the same block first; keep that one
            start = i * self.block_size
            block.block_hash = block_hash
            block.token_ids = tuple(seq.tokens_between(start, start + self.block_size))
            self.cached[block_hash] = block.block_id

    # ---- allocation -----------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        computed = seq.num_computed_tokens + len(hits) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(hits)
        hits_from_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return max(needed, 0) + hits_from_free <= len(self.free_queue)

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Give seq the blocks for `num_new_tokens` more tokens (after taking the prefix hits).

        `hits` come from match_prefix for a sequence that holds no blocks yet; taking them
        advances seq.num_computed_tokens. Returns False, changing nothing, when the pool is short.
        """
        end = seq.num_computed_tokens + num_new_tokens
        if not hits and end <= len(seq.block_table) * self.block_size:
            # Most steps: a decoding sequence whose last block has room (15 steps in 16).
            self._register_full_blocks(seq, end)
            return True
        if not self.can_allocate(seq, num_new_tokens, hits):
            return False
        for block_id in hits:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens += len(hits) * self.block_size
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._pop_free())
        # Blocks this step fills are registered now: the step writes their K/V before any
        # attention reads them, so a sequence scheduled later in the same step may share them.
        self._register_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        return True

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def free(self, seq: Sequence) -> None:
        # Blocks are registered when allocated, before the step writes them. Blocks past the
        # computed tokens belong to a step that never completed (it raised): their K/V were
        # never written, so they must not stay in the cache.
        written = seq.num_computed_tokens // self.block_size
        # Reverse order: a sequence's last blocks are the least likely to be shared, evict them first.
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            if i >= written:
                self._uncache(block)
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        self._uncache(block)  # evict: its contents are about to be overwritten
        block.ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) == block.block_id:
            del self.cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None

    def assert_no_leaks(self) -> None:
        """Every block free (possibly still cached) with no references: true whenever the engine is idle."""
        in_use = [b.block_id for b in self.blocks if b.ref_count != 0]
        if in_use or len(self.free_queue) != len(self.blocks):
            raise AssertionError(f"KV block leak: {len(in_use)} blocks still referenced: {in_use[:10]}")
