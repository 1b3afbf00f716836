"""One sequence's state inside the engine: its tokens, its KV blocks and its timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


@dataclass
class RequestMetrics:
    """Monotonic-clock times of one request (time.monotonic())."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    num_output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def itl_mean(self) -> float | None:
        # The mean of consecutive gaps telescopes to (last - first) / (n - 1): no per-token list needed.
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class Sequence:
    seq_id: int
    index: int                      # position of the request in the caller's input
    prompt_token_ids: list[int]
    params: SamplingParams
    sample_index: int = 0           # which of the request's n samples this is
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0    # tokens whose K/V are in the cache
    # Sampled on the device but not yet read back (async scheduling): counted in num_tokens, so the
    # next step schedules them, while output_token_ids holds only the tokens the host has seen.
    num_pending: int = 0
    num_cached_tokens: int = 0      # prompt tokens served by the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of this sequence's full blocks
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list[dict[int, float]] | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    detok: object | None = None     # incremental detokenizer state, owned by the engine
    penalty_state: tuple | None = None  # (prompt mask, output counts, tokens counted), see sampler
    matcher: object | None = None   # structured outputs: this sequence's grammar state (constraints.py)
    reasoning: object | None = None  # ReasoningState with a reasoning parser (reasoning.py)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, pending ones included (what min_tokens counts)."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def add_logprobs(self, entry: dict[int, float]) -> None:
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.append(entry)

    def tokens_between(self, start: int, end: int) -> list[int]:
        """Token ids of positions start..end; a pending token (not read back yet) reads as 0: the step
        that takes it as input gets its id on the device (engine.overlap.Carry)."""
        # Slices each part separately: this runs for every sequence on every step.
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            out = self.output_token_ids[start - n:end - n]
        else:
            out = self.prompt_token_ids[start:] + self.output_token_ids[:end - n]
        return out if len(out) == end - start else out + [0] * (end - start - len(out))
