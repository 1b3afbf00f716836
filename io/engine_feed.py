"""Run one prepared shard through the engine and collect one result per input row.

Requests are fed lazily in the chosen order (`engine.stream` pulls them only as it has room,
so a shard never sits in the engine's queue all at once), results come back as they finish
and are put back in input order. Latencies are measured from the shard start, as the design's
metric definitions say: a request's TTFT includes its wait behind the requests fed before it,
which is exactly what the ordering trades.

A shard can resume (`done`: rows finished by an earlier attempt, not fed again), report each row
as it finishes (`on_row`: the durable checkpoints of parts.py) and drain (`stop`: once it says
draining, no new request enters the engine and the ones in flight finish; once it says aborted,
the run stops there and the result is marked interrupted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lmbatch.io.ordering import DEFAULT_ORDERING, order_requests
from lmbatch.io.prepare import PreparedShard, prompt_token_lists

if TYPE_CHECKING:
    from lmbatch.engine import EngineStats

ProgressCallback = Callable[[int, int, int], None]  # (rows done, rows total, output tokens so far)


class StopSignal(Protocol):
    def draining(self) -> bool: ...   # admit no new request
    def aborted(self) -> bool: ...    # stop now, even with requests in flight


@dataclass
class Sample:
    """One completion of a row; with n > 1 a row has n of them (OpenAI's `choices`)."""

    completion: str | None
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict] | None = None
    reasoning: str | None = None    # a reasoning model's thinking section (the answer is `completion`)
    reasoning_tokens: int = 0       # of completion_tokens, those of the thinking section


@dataclass
class RowResult:
    """The outcome of one input row (one request); field names match the output columns.

    The completion fields (completion, finish_reason, completion_tokens, logprobs) are its first
    sample's; a row run with n > 1 keeps samples 1..n-1 in `extra_samples`. The other fields
    describe the request: the samples share its prompt, and it finishes when its last sample does.
    """

    completion: str | None = None
    finish_reason: str = "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: float | None = None
    queue_s: float | None = None  # shard start -> first scheduled (metrics only, not written)
    ttft_sched_s: float | None = None  # first scheduled -> first token (metrics only)
    logprobs: list[dict] | None = None
    reasoning: str | None = None
    reasoning_tokens: int = 0
    extra_samples: list[Sample] = field(default_factory=list)   # n > 1: samples 1..n-1

    @property
    def samples(self) -> list[Sample]:
        """Every sample in sample_index order (an error row has one)."""
        first = Sample(self.completion, self.finish_reason, self.completion_tokens, self.logprobs,
                       self.reasoning, self.reasoning_tokens)
        return [first, *self.extra_samples]

    @property
    def all_completion_tokens(self) -> int:
        return self.completion_tokens + sum(s.completion_tokens for s in self.extra_samples)


@dataclass
class ShardResult:
    rows: list[RowResult | None]  # input order, one per input row; None: not finished (interrupted)
    ordering: str
    wall_s: float
    engine_stats: EngineStats | None = None   # this shard's share of engine.stats()
    interrupted: bool = False
    resumed_rows: int = 0          # rows taken from an earlier attempt's checkpoints

    @property
    def num_errors(self) -> int:
        return sum(r is not None and r.finish_reason == "error" for r in self.rows)

    @property
    def num_finished(self) -> int:
        return sum(r is not None for r in self.rows)


def run_shard(engine, prepared: PreparedShard, ordering: str = DEFAULT_ORDERING,
              progress_callback: ProgressCallback | None = None, *, done: dict[int, RowResult] | None = None,
              on_row: Callable[[int, RowResult], None] | None = None, stop: StopSignal | None = None) -> ShardResult:
    """Feed the shard's valid rows to `engine.stream` in `ordering` order; error rows pass through."""
    rows = [RowResult(error=e, prompt_tokens=len(prepared.prompt_ids[i] or []))
            if e is not None else None for i, e in enumerate(prepared.errors)]
    done = done or {}
    for i, result in done.items():
        rows[i] = result
    valid = prepared.valid_rows
    max_tokens = [prepared.sampling[r].max_tokens for r in valid]
    order = order_requests(prompt_token_lists(prepared), ordering, engine.block_size, max_tokens)
    feed_rows = [valid[k] for k in order if valid[k] not in done]  # fed position -> input row
    finished, total = sum(r is not None for r in rows), prepared.num_rows
    tokens = 0
    if progress_callback:
        progress_callback(finished, total, tokens)
    stats_before = engine.stats()
    shard_start = time.monotonic()  # before the first request reaches the engine
    interrupted = False
    for out in engine.stream(_feed(prepared, feed_rows, stop)):
        row = feed_rows[out.index]
        rows[row] = _row_result(out, shard_start)
        if on_row:
            on_row(row, rows[row])
        finished += 1
        tokens += out.num_output_tokens   # every sample's
        if progress_callback:
            progress_callback(finished, total, tokens)
        if stop is not None and stop.aborted():
            interrupted = True
            break   # the stream's cleanup drops the requests in flight
    interrupted = interrupted or any(r is None for r in rows)
    wall_s = time.monotonic() - shard_start
    return ShardResult(rows, ordering, wall_s, engine.stats().since(stats_before), interrupted, len(done))


def _feed(prepared: PreparedShard, feed_rows: list[int], stop: StopSignal | None):
    for r in feed_rows:
        if stop is not None and stop.draining():
            return   # nothing new enters the engine; what is in flight finishes
        yield prepared.prompt_ids[r], prepared.sampling[r]


def _row_result(out, shard_start: float) -> RowResult:
    """The request's row: its first sample in the flat fields, the others as extra samples.

    Latencies are the request's (engine RequestOutput.metrics): TTFT and ITL of its first sample,
    E2E until its last sample finished, which is when its output arrives.
    """
    m = out.metrics
    since = (lambda t: None if t is None else t - shard_start)
    failed = out.finish_reason == "error"
    samples = [_sample(o) for o in sorted(out.outputs, key=lambda o: o.sample_index)] if not failed else []
    first = samples[0] if samples else Sample(None, "error", 0)
    return RowResult(
        completion=first.completion,
        finish_reason=first.finish_reason,
        error=(out.error or "engine error") if failed else None,
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=first.completion_tokens,
        cached_tokens=out.num_cached_tokens or 0,
        ttft_s=since(m.first_token_time),
        e2e_s=since(m.finish_time),
        itl_s=m.itl_mean,
        queue_s=since(m.first_scheduled_time),
        ttft_sched_s=(None if m.first_token_time is None or m.first_scheduled_time is None
                      else m.first_token_time - m.first_scheduled_time),
        logprobs=first.logprobs,
        reasoning=first.reasoning,
        reasoning_tokens=first.reasoning_tokens,
        extra_samples=samples[1:],
    )


def _sample(o) -> Sample:
    return Sample(o.text, o.finish_reason, len(o.token_ids), _logprobs(o.token_ids, o.logprobs),
                  o.reasoning, o.num_reasoning_tokens)


def _logprobs(token_ids: list[int], logprobs: list[dict[int, float]] | None) -> list[dict] | None:
    """Engine logprobs (one {token_id: logprob} per generated token) in the output's struct form."""
    if logprobs is None:
        return None
    out = []
    for tok, top in zip(token_ids, logprobs):
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        out.append({"token_id": tok, "logprob": top.get(tok),
                    "top": [{"token_id": t, "logprob": lp} for t, lp in ranked]})
    return out
