"""Async scheduling: the host prepares step N+1 while the device still runs step N.

A synchronous step waits for its sampled tokens before the host schedules the next one, so the GPU
idles through the host's share of every step (~3 ms of a 6.7 ms decode step at 256 sequences on an
H200, bench.gpu). With `async_scheduling` the engine launches step N, then schedules and launches
step N+1 before it reads step N's tokens back (vLLM's async scheduling does the same):

- a token sampled at step N is *pending* until read: `Sequence.num_pending` counts it in num_tokens,
  so the scheduler gives the sequence its next decode step, while output_token_ids, stop checks and
  block hashes see only tokens the host has read;
- step N+1's input for that position is taken on the device from step N's sampled tokens (`Carry`);
- a sequence that step N ends (EOS, a stop id or string) still runs in step N+1: that row is dropped
  (its K/V land in its own blocks, which no cached hash names yet). One that step N ends by length is
  known at launch and is not scheduled again (`ends_by_length`).

The overlap needs a launch path that never waits on the device: the Triton path, CUDA's default
(a step's arrays go through pinned buffers). The sdpa fallback copies pageable host tensors, which
wait for the stream: there async scheduling runs correctly but overlaps nothing.

Requests whose next step needs the host to have read the token run step by step: structured
output and reasoning budgets (`runs_ahead`); while one is in the engine, every step is synchronous.
Logprobs come back with the tokens; min_tokens counts pending tokens; penalties count a pending
token from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import logprob_entries
from .sequence import Sequence
from .transfers import PendingDownload, Transfers


def runs_ahead(seq: Sequence) -> bool:
    """Whether seq's next step may be scheduled before its last sampled token is read back."""
    p = seq.params
    # A reasoning parser without a budget only splits the text afterwards: no step needs its state.
    return seq.matcher is None and (seq.reasoning is None or p.max_reasoning_tokens is None)


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued: its sampled sequences and what Sampler.sample
    reads back (read already for a synchronous step, on its way for an overlapped one)."""
    sampled: list[Sequence]
    parts: list[list] | PendingDownload

    @property
    def in_flight(self) -> PendingDownload | None:
        return self.parts if isinstance(self.parts, PendingDownload) else None

    def read(self) -> tuple[list[int], list[dict[int, float] | None]]:
        """The tokens, and per row the logprobs to record (None where none were asked for)."""
        parts = self.parts if self.in_flight is None else self.in_flight.result()
        return parts[0], logprob_entries(self.sampled, *parts)


@dataclass
class Carry:
    """Input ids that only the device knows yet: step ids[dst[i]] = previous step's tokens[src[i]];
    `rows`: each of the previous step's sequences, its row of `tokens`."""
    tokens: torch.Tensor
    dst: list[int]
    src: list[int]
    rows: dict[int, int]

    def row_of(self, seq: Sequence) -> int:
        """The row of `tokens` holding seq's pending token; -1 when it has none (penalties count it)."""
        return self.rows.get(id(seq), -1) if seq.num_pending else -1

    def apply(self, ids: torch.Tensor, transfers: Transfers) -> None:
        index = transfers.upload({"dst": self.dst, "src": self.src})
        ids[index["dst"]] = self.tokens[index["src"]]


def carry_into(batch: list[tuple[Sequence, int]], previous: LaunchedStep | None) -> Carry | None:
    """The pending tokens the batch takes as input: each is its sequence's last token.

    Mostly a decode row (n == 1). A sequence preempted by this very schedule and readmitted at once
    from its cached prefix recomputes a chunk that ends at its pending token, or stops short of it
    (then the token is read back before the sequence's next step).
    """
    if previous is None or previous.in_flight is None:
        return None
    rows = {id(seq): i for i, seq in enumerate(previous.sampled)}
    dst, src = [], []
    offset = 0
    for seq, n in batch:
        offset += n
        if seq.num_pending and seq.num_computed_tokens + n == seq.num_tokens:
            dst.append(offset - 1)
            src.append(rows[id(seq)])
    return Carry(previous.in_flight.tensor, dst, src, rows) if dst else None
