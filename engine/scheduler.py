"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

There are no prefill and decode phases (as in vLLM v1): every running sequence asks for the tokens
it has not computed yet (one for a decoding sequence, the rest of its prompt for a prefilling one),
granted in order under the step's token budget; a prompt longer than what is left is cut into
chunks over several steps. Waiting sequences are admitted after that, taking their cached prefix
from the block manager. When the pool runs dry the newest running sequence is preempted: its
blocks are freed (their cached prefix survives) and it is recomputed later, outputs kept.
"""

from __future__ import annotations

import time
from collections import deque

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.ending: list[Sequence] = []   # set aside: their last token is on its way (async scheduling)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.ending)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, number of new tokens) pairs, running sequences first."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._allocate_or_preempt(seq, num_new):
                batch.append((seq, num_new))
                budget -= num_new
                i += 1
            else:
                preempted = True
        # After a preemption the pool is exhausted: admitting new work would only thrash.
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _allocate_or_preempt(self, seq: Sequence, num_new: int) -> bool:
        """Allocate for seq, preempting the newest running sequences until it fits.

        Returns False when seq itself had to be preempted.
        """
        while not self.block_manager.allocate(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, batch: list[tuple[Sequence, int]], budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * bm.block_size, budget)
            if not bm.allocate(seq, num_new, hits):
                break
            self.waiting.popleft()
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = len(hits) * bm.block_size
                bm.record_lookup(seq.num_prompt_tokens, seq.num_cached_tokens)
            self.running.append(seq)
            batch.append((seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        done = {id(s) for s in seqs}
        before = len(self.running)
        self.running = [s for s in self.running if id(s) not in done]
        if before - len(self.running) < len(done):
            # Async scheduling: set aside at launch, or preempted while its last token was pending.
            self.ending = [s for s in self.ending if id(s) not in done]
            if self.waiting:
                self.waiting = deque(s for s in self.waiting if id(s) not in done)
        for seq in seqs:
            self.block_manager.free(seq)

    def set_aside(self, seqs: list[Sequence]) -> None:
        """Stop scheduling seqs: they end once their pending tokens are read (finish frees them)."""
        if seqs:
            aside = {id(s) for s in seqs}
            self.running = [s for s in self.running if id(s) not in aside]
            self.ending.extend(seqs)
