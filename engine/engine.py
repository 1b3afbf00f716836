"""LLMEngine: requests in, continuous batching over the paged KV pool, outputs out."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from .block_manager import BlockManager
from .config import EngineConfig
from .constraints import OutputConstraints
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .overlap import LaunchedStep, carry_into, runs_ahead
from .requests import PromptError, Request, RequestFactory
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import RequestMetrics, Sequence
from .stats import EngineStats


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        self.model_name = config.model
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler(self.runner.device, config.seed, self.runner.transfers)
        self.requests = RequestFactory(self.tokenizer, self._eos_token_ids(), self.max_model_len,
                                       self.runner.vocab_size, self.block_manager)
        self.constraints = OutputConstraints(self.tokenizer, self.runner.vocab_size, self._eos_token_ids(),
                                             config.reasoning_parser, config.max_num_seqs)
        self._pending: dict[int, Request] = {}
        self._next_seq_id = 0
        self._inflight: LaunchedStep | None = None   # async scheduling: the step whose tokens are not read yet
        self._stepwise = 0       # sequences in the engine that cannot run ahead (overlap.runs_ahead)
        self.reset_stats()

    # ---- setup ----------------------------------------------------------------------------------
    def _eos_token_ids(self) -> set[int]:
        ids = set()
        gen = getattr(self.runner.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- public API -----------------------------------------------------------------------------
    def generate(self, prompts: list, sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        sampling = sampling or SamplingParams()
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        results: list[RequestOutput | None] = [None] * len(prompts)
        for out in self.stream(zip(prompts, params)):
            results[out.index] = out
        return results

    def stream(self, pairs: Iterable[tuple[object, SamplingParams]]) -> Iterator[RequestOutput]:
        """Yield outputs as requests finish, pulling new requests only while the engine has room.

        If the caller stops early (or a step raises), the requests still in flight are dropped
        and their KV blocks freed, so the engine is ready for the next call.
        """
        source = enumerate(pairs)
        exhausted = False
        try:
            while True:
                while not exhausted and len(self.scheduler.waiting) < self.config.max_num_seqs:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    index, (prompt, params) = item
                    rejected = self.add_request(index, prompt, params)
                    if rejected is not None:
                        yield rejected
                if not self.has_unfinished():
                    return
                yield from self.step()
        finally:
            self.abort_all()

    def close(self) -> None:
        """Drop every request and free the model, the KV pool and the graphs (the engine is unusable after)."""
        self.abort_all()
        self.runner.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def abort_all(self) -> None:
        """Drop every request in flight and free its KV blocks."""
        # A step in flight, or a launch that failed half-way, may still have copies queued: the
        # graphs' next upload must not refill a pinned twin they read.
        self.runner.transfers.drain()
        self._inflight = None
        sched = self.scheduler
        sched.finish(list(sched.running) + list(sched.waiting) + sched.ending)
        self.scheduler.waiting.clear()
        self._pending.clear()
        self._stepwise = 0

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(**self._counters, prefix_cache_queries=bm.prefix_queries,
                           prefix_cache_hits=bm.prefix_hits, preemptions=self.scheduler.num_preemptions,
                           kv_blocks_total=bm.num_blocks, kv_blocks_in_use=bm.num_blocks - bm.num_free_blocks,
                           kv_blocks_cached=bm.num_cached_blocks)

    def reset_stats(self) -> None:
        self._counters = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self.block_manager.prefix_queries = self.block_manager.prefix_hits = 0
        self.scheduler.num_preemptions = 0

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, index: int, prompt, params: SamplingParams) -> RequestOutput | None:
        """Queue a request; a request that cannot run comes back at once as an error output."""
        try:
            request = self.requests.build(index, prompt, params)
            request.seqs = [self._new_sequence(request, index, params, sample) for sample in range(params.n)]
        except PromptError as e:
            now = time.monotonic()
            return RequestOutput(index, e.prompt_token_ids, [CompletionOutput(0, [], "", "error")], 0,
                                 RequestMetrics(arrival_time=now, finish_time=now), error=str(e))
        for seq in request.seqs:
            self.scheduler.add(seq)
            self._stepwise += not runs_ahead(seq)
        self._pending[index] = request
        return None

    def _new_sequence(self, request: Request, index: int, params: SamplingParams, sample: int) -> Sequence:
        seq = Sequence(self._next_seq_id, index, request.prompt_token_ids, params, sample_index=sample)
        self._next_seq_id += 1
        seq.metrics.arrival_time = request.arrival_time
        if params.seed is not None:
            seq.generator = self.sampler.new_request_generator(params.seed, sample)
        if params.stop:
            seq.detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                               params.skip_special_tokens, params.stop,
                                               params.include_stop_str_in_output)
        self.constraints.attach(seq)
        return seq

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the requests it finished.

        With async scheduling the step launched here is read back by the next call, which first
        launches its own (overlap.py): a call returns what the step before it finished. An error
        while a step is in flight drops the requests in flight (abort_all) and is raised.
        """
        if self.runner.model is None:
            raise RuntimeError("this engine was closed; build a new LLMEngine")
        previous = self._inflight
        if previous is None and not (self.config.async_scheduling and self._stepwise == 0):
            return self._complete(self._launch(self._schedule(), None, overlap=False))
        try:
            return self._overlapped_step(previous)
        except BaseException:
            # A step in flight holds tokens the host never read: its requests cannot go on consistently.
            self.abort_all()
            raise

    def _overlapped_step(self, previous: LaunchedStep | None) -> list[RequestOutput]:
        if previous is not None and self._stepwise:
            self._inflight = None
            return self._complete(previous)   # a request that needs every token came in: drain first
        batch = self.scheduler.schedule() if previous is not None else self._schedule()
        self._inflight = self._launch(batch, previous, overlap=True) if batch else None
        return self._complete(previous) if previous is not None else []

    def _schedule(self) -> list[tuple[Sequence, int]]:
        batch = self.scheduler.schedule()
        if not batch:   # with nothing in flight either, nothing will ever free a block
            raise RuntimeError("scheduler produced an empty step with requests pending (pool too small?)")
        return batch

    def _launch(self, batch: list[tuple[Sequence, int]], previous: LaunchedStep | None,
                overlap: bool) -> LaunchedStep:
        """Queue the step's forward and sampling; an overlapped step does not wait for its tokens."""
        rows, sampled = [], []
        offset = 0
        for seq, n in batch:
            offset += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(offset - 1)
                sampled.append(seq)
            prefill = seq.num_computed_tokens < seq.num_prompt_tokens
            self._counters["prefill_tokens" if prefill else "decode_tokens"] += n
        constraints = self.constraints.begin(sampled) if sampled and not overlap else None  # fill during the forward
        carry = carry_into(batch, previous)
        logits = self.runner.execute(batch, rows, carry)
        for seq, n in batch:
            seq.num_computed_tokens += n
        self._counters["steps"] += 1
        stop_ids = [self.requests.suppressed_ids(s) for s in sampled]
        if not sampled:
            return LaunchedStep([], [[]])     # prefill chunks only: nothing to read back
        if not overlap:
            return LaunchedStep(sampled, self.sampler.sample(logits, sampled, stop_ids, constraints))
        launched = LaunchedStep(sampled, self.sampler.launch(logits, sampled, stop_ids, carry))
        for seq in sampled:
            seq.num_pending += 1
        # Ended by length once these tokens land: not scheduled again (the others may end by a stop).
        self.scheduler.set_aside([s for s in sampled if self.requests.ends_by_length(s)])
        return launched

    def _complete(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Read the step's tokens back, append them, and return the requests that finished."""
        tokens, logprobs = launched.read()
        now = time.monotonic()
        finished = []
        for seq, token, entry in zip(launched.sampled, tokens, logprobs):
            if seq.finish_reason is not None:
                continue    # the step before ended it; this row ran ahead of that news (overlap.py)
            if entry is not None:
                seq.add_logprobs(entry)
            if self._append_token(seq, token, now):
                finished.append(seq)
        self.scheduler.finish(finished)
        self._stepwise -= sum(not runs_ahead(s) for s in finished)
        done_requests = dict.fromkeys(seq.index for seq in finished)  # n > 1: samples may end together
        return [out for index in done_requests if (out := self._collect(index)) is not None]

    def _append_token(self, seq: Sequence, token: int, now: float) -> bool:
        """Record a sampled token; returns True when the sequence is finished."""
        seq.output_token_ids.append(token)
        if seq.num_pending:
            seq.num_pending -= 1
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        m.num_output_tokens += 1
        reason = self.constraints.on_token(seq, token) or self.requests.finish_reason(seq, token)
        if reason is None and seq.detok is not None:
            if seq.detok.add(token, check_stop=len(seq.output_token_ids) >= seq.params.min_tokens):
                reason = "stop"
        if reason is None:
            return False
        seq.finish_reason = reason
        seq.num_pending = 0      # a token the step after sampled for it is dropped
        m.finish_time = now
        return True

    def _collect(self, index: int) -> RequestOutput | None:
        """Once all samples of the request are finished, its RequestOutput."""
        request = self._pending[index]
        if not all(s.finish_reason is not None for s in request.seqs):
            return None
        del self._pending[index]
        outputs = [self._completion(s) for s in request.seqs]
        first = request.seqs[0]
        metrics = first.metrics
        metrics.finish_time = max(s.metrics.finish_time for s in request.seqs)
        return RequestOutput(index, request.prompt_token_ids, outputs, first.num_cached_tokens, metrics)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        out = CompletionOutput(seq.sample_index, seq.output_token_ids, self._text(seq), seq.finish_reason,
                               seq.logprobs)
        split = self.constraints.split_reasoning(seq)
        if split is not None:
            reasoning_ids, answer_ids = split
            out.reasoning = self._decode(reasoning_ids, seq)
            out.num_reasoning_tokens = seq.reasoning.num_tokens
            # The answer: what follows the thinking section (a stop string may have cut the text).
            full_reasoning = self._decode(seq.output_token_ids[: len(seq.output_token_ids) - len(answer_ids)], seq)
            out.text = out.text[len(full_reasoning):] if out.text.startswith(full_reasoning) else self._decode(
                answer_ids, seq)
        return out

    def _text(self, seq: Sequence) -> str:
        if seq.detok is not None:
            seq.detok.flush()
            return seq.detok.text
        return self._decode(seq.output_token_ids, seq)

    def _decode(self, ids: list[int], seq: Sequence) -> str:
        vocab = len(self.tokenizer)
        return self.tokenizer.decode([t for t in ids if t < vocab], skip_special_tokens=seq.params.skip_special_tokens)

