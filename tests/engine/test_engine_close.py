"""close() frees the engine's memory at once, even while something still holds the engine."""

from __future__ import annotations

import weakref

import pytest

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams


def test_close_frees_the_pool_and_the_model_while_the_engine_is_still_referenced(model_dirs):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=64))
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    pool, model = weakref.ref(engine.runner.kv_pool), weakref.ref(engine.runner.model)
    engine.add_request(1, [8, 9, 10], SamplingParams(max_tokens=3))   # in flight when closed
    holder = [engine]                                # a stray reference does not keep the memory
    engine.close()
    assert pool() is None and model() is None
    assert not holder[0].scheduler.has_unfinished()
    with pytest.raises(RuntimeError, match="closed"):
        holder[0].step()


def test_engine_as_a_context_manager_closes_on_exit(model_dirs):
    with LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=64)) as engine:
        pool = weakref.ref(engine.runner.kv_pool)
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
    assert pool() is None
