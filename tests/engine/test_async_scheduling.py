"""Async scheduling (engine/overlap.py): step N+1 is launched before step N's tokens are read back.

On the CPU the device work is done by the time a step returns, but the bookkeeping is the same as
on a GPU: a sampled token stays pending until the next call reads it, the step after takes it as
input from the device tensor (the carry), a row whose sequence the step before ended is dropped.
So greedy float32 output must still equal transformers' token for token, and equal the synchronous
engine's under stops, preemption, chunked prefill and prefix caching.
"""

from __future__ import annotations

import pytest

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.overlap import Carry


def engine_for(model_dir, async_scheduling=True, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), async_scheduling=async_scheduling,
                                  **overrides))


@pytest.fixture
def carries(monkeypatch):
    """The carries the engine applies (input ids only the device knows), recorded as it runs them."""
    seen = []
    apply = Carry.apply

    def recording(self, ids, transfers):
        seen.append(len(self.dst))
        return apply(self, ids, transfers)

    monkeypatch.setattr(Carry, "apply", recording)
    return seen


def run(engine, prompts, params):
    outs = engine.generate(prompts, params)
    engine.block_manager.assert_no_leaks()
    assert not engine.has_unfinished()
    return outs


@pytest.mark.parametrize("regime", [
    dict(num_kv_blocks=1024),                                  # prefix hits
    dict(num_kv_blocks=24, max_num_batched_tokens=64),         # chunked prefill and preemption
    dict(num_kv_blocks=1024, max_num_seqs=3),                  # admissions while steps run ahead
])
def test_greedy_matches_transformers(model_dirs, references, carries, regime):
    prompts, max_tokens, refs = references("llama")
    engine = engine_for(model_dirs["llama"], **regime)
    outs = run(engine, prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    assert [o.token_ids for o in outs] == refs
    assert sum(carries) > 0                          # steps did take their inputs from the device
    if regime["num_kv_blocks"] == 24:
        assert engine.stats().preemptions > 0


def test_without_the_carry_the_output_is_wrong(model_dirs, references, monkeypatch):
    """The check above can fail: a step that ignores the device-side ids reads a pending token as 0."""
    prompts, max_tokens, refs = references("llama")
    monkeypatch.setattr(Carry, "apply", lambda self, ids, transfers: None)
    outs = engine_for(model_dirs["llama"], num_kv_blocks=1024).generate(
        prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    assert sum(o.token_ids != r for o, r in zip(outs, refs)) > len(refs) // 2


@pytest.mark.parametrize("regime", [dict(num_kv_blocks=1024), dict(num_kv_blocks=20, max_num_batched_tokens=48)])
def test_stops_mid_flight_drop_the_row_that_ran_ahead(model_dirs, references, regime):
    """Stop ids end sequences at steps the engine has already run past (some of them preempted by the
    step that ran ahead): the same outputs as step by step."""
    prompts, max_tokens, refs = references("llama")
    stop_ids = sorted({r[len(r) // 2] for r in refs if len(r) > 2})[:4]
    params = [SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=stop_ids) for m in max_tokens]
    sync = run(engine_for(model_dirs["llama"], False, **regime), prompts, params)
    ahead = run(engine_for(model_dirs["llama"], **regime), prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in ahead] == [(o.token_ids, o.finish_reason) for o in sync]
    assert sum(o.finish_reason == "stop" for o in sync) >= 4


def test_stop_strings_end_the_same_text(model_dirs, references, carries):
    """A stop string is seen by the detokenizer one read later than the token that completes it."""
    prompts, _, _ = references("llama")
    long = [SamplingParams(max_tokens=20, temperature=0.0)] * len(prompts)
    texts = [o.text for o in run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024), prompts, long)]
    stops = sorted({t[len(t) // 2:len(t) // 2 + 2] for t in texts if len(t.strip()) > 8})[:3]
    params = [SamplingParams(max_tokens=20, temperature=0.0, stop=stops)] * len(prompts)
    sync = run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024), prompts, params)
    ahead = run(engine_for(model_dirs["llama"], num_kv_blocks=1024), prompts, params)
    assert [(o.text, o.token_ids, o.finish_reason) for o in ahead] == [(o.text, o.token_ids, o.finish_reason)
                                                                        for o in sync]
    assert sum(o.finish_reason == "stop" for o in sync) >= 3 and sum(carries) > 0


def test_context_limit_and_seeded_sampling_equal_the_synchronous_engine(model_dirs, references):
    prompts, _, _ = references("llama")
    limit = max(map(len, prompts)) + 6               # the longest prompts end at the model's length
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i) for i in range(len(prompts))]
    sync = run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024, max_model_len=limit), prompts, params)
    ahead = run(engine_for(model_dirs["llama"], num_kv_blocks=1024, max_model_len=limit), prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in ahead] == [(o.token_ids, o.finish_reason) for o in sync]
    assert any(len(p) + len(o.token_ids) == limit for p, o in zip(prompts, sync))


def test_cached_blocks_hold_only_tokens_the_host_has_read(model_dirs, references):
    """A block that a pending token fills is named a step later, by its real ids, never by the 0 the
    host holds for a pending token; a second pass over the same prompts hits the cache and agrees."""
    prompts, max_tokens, refs = references("llama")
    engine = engine_for(model_dirs["llama"], num_kv_blocks=1024, block_size=4)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    outs = run(engine, prompts, params)
    bs = engine.block_size
    real = {tuple(ids[i:i + bs]) for p, o in zip(prompts, outs) for ids in [p + o.token_ids]
            for i in range(0, len(ids) - bs + 1, bs)}
    cached = [engine.block_manager.blocks[b].token_ids for b in engine.block_manager.cached.values()]
    output_blocks = [b for b in cached if b not in {tuple(p[i:i + bs]) for p in prompts
                                                     for i in range(0, len(p) - bs + 1, bs)}]
    assert output_blocks and all(b in real for b in cached)
    hits = engine.stats().prefix_cache_hits
    assert [o.token_ids for o in run(engine, prompts, params)] == refs
    assert engine.stats().prefix_cache_hits > hits


def test_logprobs_and_min_tokens_run_ahead(model_dirs, references, carries):
    """Logprobs come back with the tokens (one copy); min_tokens counts the pending token."""
    prompts, max_tokens, refs = references("llama")
    stop_ids = sorted({r[1] for r in refs if len(r) > 2})[:6]      # would end many requests at their 2nd token
    params = [SamplingParams(max_tokens=m, temperature=0.0, logprobs=2 if i % 2 else 0, min_tokens=i % 4,
                             stop_token_ids=stop_ids) for i, m in enumerate(max_tokens)]
    sync = run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024), prompts, params)
    ahead = run(engine_for(model_dirs["llama"], num_kv_blocks=1024), prompts, params)
    assert sum(carries) > 0
    for a, b in zip(ahead, sync):
        assert (a.token_ids, a.finish_reason, a.outputs[0].logprobs) == (b.token_ids, b.finish_reason,
                                                                         b.outputs[0].logprobs)
        assert len(a.outputs[0].logprobs) == len(a.token_ids)
    assert any(len(o.token_ids) < p.min_tokens + 2 and o.finish_reason == "stop" for o, p in zip(sync, params))


def test_penalties_count_the_pending_token_on_the_device(model_dirs, references, carries):
    prompts, max_tokens, _ = references("llama")
    params = [SamplingParams(max_tokens=m, temperature=0.0, repetition_penalty=1.6, frequency_penalty=0.7,
                             presence_penalty=0.3 * (i % 2)) for i, m in enumerate(max_tokens)]
    sync = run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024), prompts, params)
    outs = run(engine_for(model_dirs["llama"], num_kv_blocks=1024), prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in sync] and sum(carries) > 0
    plain = run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024), prompts,
                [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    assert sum(a.token_ids != b.token_ids for a, b in zip(plain, sync)) > len(prompts) // 2   # they do bite


def test_a_request_that_needs_every_token_arriving_mid_flight_drains_the_step(model_dirs, references, carries):
    """A grammar (like a reasoning budget) needs each token on the host before the next step's mask."""
    from lmbatch.engine.structured_outputs import StructuredOutputsParams

    prompts, max_tokens, _ = references("llama")
    choice = StructuredOutputsParams(choice=["yes", "no"])
    params = [SamplingParams(max_tokens=m, temperature=0.0, structured_outputs=choice if i % 5 == 4 else None)
              for i, m in enumerate(max_tokens)]
    sync = run(engine_for(model_dirs["llama"], False, num_kv_blocks=1024, max_num_seqs=3), prompts, params)
    engine = engine_for(model_dirs["llama"], num_kv_blocks=1024, max_num_seqs=3)
    drains, step = [], engine.step      # steps that begin with a step in flight and a grammar in the engine
    engine.step = lambda: drains.append(engine._inflight is not None and engine._stepwise > 0) or step()
    outs = sorted(engine.stream(zip(prompts, params)), key=lambda o: o.index)
    assert [(o.token_ids, o.text) for o in outs] == [(o.token_ids, o.text) for o in sync]
    assert all(outs[i].text in ("yes", "no") for i in range(4, len(prompts), 5))
    assert sum(carries) > 0 and any(drains) and engine._stepwise == 0
    engine.block_manager.assert_no_leaks()


def test_one_sync_per_step_and_nothing_left_after_a_caller_walks_away(model_dirs, references):
    prompts, max_tokens, refs = references("llama")
    engine = engine_for(model_dirs["llama"], num_kv_blocks=256, max_num_seqs=4)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    syncs = engine.runner.transfers.syncs
    run(engine, prompts, params)
    assert engine.runner.transfers.syncs - syncs <= engine.stats().steps
    stream = engine.stream(zip(prompts, params))
    next(stream)
    stream.close()                                   # a step is in flight: its sequences are freed too
    engine.block_manager.assert_no_leaks()
    assert not engine.has_unfinished()
    assert [o.token_ids for o in run(engine, prompts, params)] == refs


@pytest.mark.parametrize("fail_at, set_aside", [(3, False), (9, True)])   # the 9th: one sequence is ending
def test_a_step_that_raises_with_a_step_in_flight_leaves_no_block_behind(model_dirs, references, fail_at, set_aside):
    """The stream's cleanup frees what the failed step scheduled, the step in flight and the sequences it
    set aside as ending; the engine then runs the same prompts exactly."""
    prompts, max_tokens, refs = references("llama")
    engine = engine_for(model_dirs["llama"], num_kv_blocks=256, max_num_seqs=6)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    execute, calls = engine.runner.execute, []

    def failing(*args):
        calls.append(len(engine.scheduler.ending))
        if len(calls) == fail_at:
            raise RuntimeError("device lost")
        return execute(*args)

    engine.runner.execute = failing
    with pytest.raises(RuntimeError, match="device lost"):
        list(engine.stream(zip(prompts, params)))
    assert (calls[-1] > 0) == set_aside
    engine.block_manager.assert_no_leaks()
    assert not engine.has_unfinished() and not engine.scheduler.ending
    engine.runner.execute = execute
    assert [o.token_ids for o in run(engine, prompts, params)] == refs


def test_an_error_reading_a_step_back_drops_what_is_in_flight(model_dirs, references):
    """A caller driving step() itself: when reading step N back fails, step N+1 is already launched on
    tokens the host never saw, so the engine drops the requests in flight instead of going on wrong."""
    prompts, max_tokens, refs = references("llama")
    engine = engine_for(model_dirs["llama"], num_kv_blocks=256, max_num_seqs=6)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(i, prompt, p)
    complete, calls = engine._complete, []

    def failing(launched):
        calls.append(engine._inflight is not None)
        if len(calls) == 4:
            raise RuntimeError("detokenizer failed")
        return complete(launched)

    engine._complete = failing
    with pytest.raises(RuntimeError, match="detokenizer failed"):
        while engine.has_unfinished():
            engine.step()
    assert calls[-1]                                # a step was in flight when reading failed
    engine.block_manager.assert_no_leaks()
    assert not engine.has_unfinished()
    del engine._complete
    assert [o.token_ids for o in run(engine, prompts, params)] == refs
