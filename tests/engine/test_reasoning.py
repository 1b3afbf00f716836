"""Reasoning models: the thinking section apart from the answer, and a budget that closes it."""

from __future__ import annotations

import pytest

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.structured_outputs import StructuredOutputsParams
from lmbatch.testing import build_toy_model

MESSAGES = [{"role": "user", "content": "is the sky green?"}]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    path = build_toy_model(tmp_path_factory.mktemp("think") / "llama", decisive=False, seed=5, reasoning=True)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64, max_num_seqs=8,
                                    reasoning_parser="think"))
    return engine, engine.tokenizer.convert_tokens_to_ids("</think>")


def test_the_budget_closes_the_thinking_section_and_the_answer_follows(thinker):
    engine, end_id = thinker
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, max_reasoning_tokens=4) for s in range(6)]
    for out in engine.generate([MESSAGES] * 6, params):
        sample = out.outputs[0]
        end = sample.token_ids.index(end_id)
        assert end <= 3 and sample.num_reasoning_tokens == end + 1   # </think> is the 4th token at most
        assert sample.reasoning == engine.tokenizer.decode(sample.token_ids[:end], skip_special_tokens=True)
        assert sample.text == engine.tokenizer.decode(sample.token_ids[end + 1:], skip_special_tokens=True)
        assert len(sample.token_ids) == 12 or sample.finish_reason == "stop"   # the answer runs on


def test_a_constraint_applies_to_the_answer_only(thinker):
    engine, end_id = thinker
    choice = StructuredOutputsParams(choice=["yes", "no"])
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=20, max_reasoning_tokens=5,
                             structured_outputs=choice) for s in range(6)]
    outs = engine.generate([MESSAGES] * 6, params)
    assert all(o.finish_reason == "stop" and o.text in ("yes", "no") for o in outs)
    # The thinking part was drawn freely: it is not made of the choice's tokens alone.
    assert any(o.outputs[0].reasoning not in ("", "yes", "no") for o in outs)


def test_a_prompt_that_closes_thinking_has_no_reasoning(thinker):
    engine, _ = thinker
    ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                               enable_thinking=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    (out,) = engine.generate([ids], [SamplingParams(temperature=1.0, seed=1, max_tokens=6, max_reasoning_tokens=2)])
    assert out.outputs[0].reasoning == "" and out.outputs[0].num_reasoning_tokens == 0
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_thinking_that_never_closes_is_all_reasoning(thinker):
    engine, end_id = thinker
    (out,) = engine.generate([MESSAGES], [SamplingParams(temperature=0.0, max_tokens=8)])
    assert end_id not in out.token_ids   # this greedy output never closes its thinking section
    assert out.text == "" and out.outputs[0].num_reasoning_tokens == 8
    assert out.outputs[0].reasoning == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_a_budget_without_a_reasoning_parser_is_an_error_output(tmp_path):
    path = build_toy_model(tmp_path / "plain")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=32))
    (out,) = engine.generate(["hi"], [SamplingParams(max_tokens=4, max_reasoning_tokens=2)])
    assert out.finish_reason == "error" and "reasoning_parser" in out.error


def test_reasoning_parser_needs_the_thinking_tokens(tmp_path):
    path = build_toy_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="no single <think> token"):
        LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=32, reasoning_parser="think"))


def test_async_scheduling_splits_the_same_reasoning(thinker, monkeypatch):
    """Without a budget the parser only splits the text afterwards: such requests run ahead (overlap.py);
    with a budget the engine must see each token, and runs step by step."""
    from lmbatch.engine.overlap import Carry

    engine, _ = thinker
    ahead = LLMEngine(EngineConfig(dtype="float32", model=engine.model_name, num_kv_blocks=64, max_num_seqs=8,
                                   reasoning_parser="think", async_scheduling=True))
    carried = []
    apply = Carry.apply
    monkeypatch.setattr(Carry, "apply", lambda self, ids, t: carried.append(len(self.dst)) or apply(self, ids, t))
    for budget, runs_ahead in ((None, True), (3, False)):
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=10, max_reasoning_tokens=budget)
                  for s in range(6)]
        want = [(o.token_ids, o.outputs[0].reasoning, o.text) for o in engine.generate([MESSAGES] * 6, params)]
        carried.clear()
        got = ahead.generate([MESSAGES] * 6, params)
        assert [(o.token_ids, o.outputs[0].reasoning, o.text) for o in got] == want
        assert bool(carried) == runs_ahead
