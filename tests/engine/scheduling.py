"""Scheduler test helpers: the real Scheduler and BlockManager with no model behind them.

Like vLLM's `create_scheduler` (tests/v1/core/utils.py): a step is simulated by doing to the
scheduled sequences exactly what LLMEngine.step does after its forward pass, with a made-up
token in place of a sampled one. Import by module name: `from scheduling import create_scheduler`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lmbatch.engine.block_manager import BlockManager
from lmbatch.engine.config import EngineConfig
from lmbatch.engine.overlap import LaunchedStep
from lmbatch.engine.sampling_params import SamplingParams
from lmbatch.engine.scheduler import Scheduler
from lmbatch.engine.sequence import Sequence
from lmbatch.engine.transfers import Transfers

_HOST = Transfers(torch.device("cpu"))   # the "device" of async_step's read-backs


def create_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16,
                     max_num_batched_tokens: int = 64,
                     enable_prefix_caching: bool = True) -> tuple[Scheduler, BlockManager]:
    """A Scheduler over a BlockManager of `num_blocks` blocks; EngineConfig loads nothing."""
    config = EngineConfig(dtype="float32", model="no-model-scheduler-test", device="cpu", block_size=block_size,
                          num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=enable_prefix_caching)
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(config, block_manager), block_manager


def make_sequence(seq_id: int, prompt_token_ids, max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, seq_id, list(prompt_token_ids), SamplingParams(max_tokens=max_tokens, temperature=0.0))


def add_all(scheduler: Scheduler, *seqs: Sequence) -> None:
    """Queue the sequences in this order (first come, first served)."""
    for seq in seqs:
        scheduler.add(seq)


def fake_token_at(seq_id: int, position: int) -> int:
    """The made-up output token of sequence `seq_id` at output `position`: no prompt here uses it."""
    return 100_000 + seq_id * 1_000 + position


def fake_token(seq: Sequence) -> int:
    """The next output token of seq, as the helper's stand-in for sampling."""
    return fake_token_at(seq.seq_id, len(seq.output_token_ids))


@dataclass
class Step:
    batch: list[tuple[int, int]]                       # (seq_id, tokens scheduled), in batch order
    sampled: list[int] = field(default_factory=list)   # seq_ids that got a token this step
    finished: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.batch)


def step(scheduler: Scheduler, next_token=fake_token) -> Step:
    """One engine step without a model, mirroring LLMEngine.step / _append_token.

    A sequence samples when this step computes its last token; the computed counts advance for the
    whole batch; a sampled sequence finishes with reason "length" at max_tokens (no EOS here).
    """
    batch = scheduler.schedule()
    if not batch:
        raise RuntimeError("scheduler produced an empty step with requests pending (pool too small?)")
    sampled = _advance(batch)
    finished = _append_tokens(scheduler, sampled, next_token)
    return Step([(seq.seq_id, n) for seq, n in batch], [s.seq_id for s in sampled], [s.seq_id for s in finished])


def async_step(scheduler: Scheduler, previous: LaunchedStep | None, check_batch=None) -> LaunchedStep | None:
    """One overlapped step without a model, mirroring LLMEngine._overlapped_step (async scheduling).

    The next step is scheduled and launched before the tokens of `previous` are read back: a sampled
    token is pending (counted in num_tokens, not yet in the outputs) until the next call reads it, and
    a sequence that will end by length is set aside at launch. `check_batch(batch, previous)` sees each
    schedule before its counts advance. Returns the step now in flight (None if it sampled nothing).
    """
    batch = scheduler.schedule()
    if check_batch is not None:
        check_batch(batch, previous)
    sampled = _advance(batch)
    launched = None
    if sampled:
        ids = torch.tensor([seq.seq_id for seq in sampled])
        launched = LaunchedStep(sampled, _HOST.download_later(ids))
        for seq in sampled:
            seq.num_pending += 1
        scheduler.set_aside([s for s in sampled if len(s.output_token_ids) + s.num_pending >= s.params.max_tokens])
    if previous is not None:
        for seq in previous.sampled:
            seq.num_pending -= 1
        _append_tokens(scheduler, previous.sampled, fake_token)
    return launched


def _advance(batch: list[tuple[Sequence, int]]) -> list[Sequence]:
    """Advance the computed counts; returns the sequences that sample (their chunk reaches the end)."""
    sampled = [seq for seq, n in batch if seq.num_computed_tokens + n == seq.num_tokens]
    for seq, n in batch:
        seq.num_computed_tokens += n
    return sampled


def _append_tokens(scheduler: Scheduler, sampled: list[Sequence], next_token) -> list[Sequence]:
    """Append each sampled sequence's token; those at max_tokens finish with reason "length"."""
    now = time.monotonic()
    finished = []
    for seq in sampled:
        seq.output_token_ids.append(next_token(seq))
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        m.num_output_tokens += 1
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
            m.finish_time = now
            finished.append(seq)
    scheduler.finish(finished)
    return finished


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000, check=None) -> list[Step]:
    """Steps until nothing is waiting or running; `check(scheduler, step)` runs after each step."""
    steps = []
    while scheduler.has_unfinished():
        if len(steps) >= max_steps:
            raise AssertionError(f"not finished after {max_steps} steps")
        steps.append(step(scheduler))
        if check is not None:
            check(scheduler, steps[-1])
    return steps
