"""Request semantics: stop strings, detokenization, min_tokens, n > 1, chat prompts, timings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.detokenizer import IncrementalDetokenizer
from lmbatch.testing import build_toy_model


@pytest.fixture(scope="module")
def engine(model_dirs):
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=512))


def greedy_text(engine, prompt, n=24):
    return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]


def test_incremental_detokenization_matches_full_decode_on_multibyte_text(model_dirs):
    tok = AutoTokenizer.from_pretrained(model_dirs["llama"])
    text = "Ba ké 你好 🙂 über – ok?"
    ids = tok(text).input_ids
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=[], include_stop=False)
    for t in ids:
        detok.add(t)
        assert "\ufffd" not in detok.text      # never emits half a character
    detok.flush()
    assert detok.text == tok.decode(ids)


def test_stop_string_across_token_boundaries(engine):
    prompt = "Ka ke ki ko ku. Mo ma"
    base = greedy_text(engine, prompt)
    tok = engine.tokenizer
    # Pick a stop string that starts inside one output token and ends inside a later one.
    pieces = [tok.decode([t]) for t in base.token_ids]
    start = next(i for i, p in enumerate(pieces) if len(p) >= 2 and i + 1 < len(pieces))
    stop = pieces[start][1:] + pieces[start + 1][:1]
    cut = base.text.find(stop)
    assert stop not in pieces and cut > 0  # it spans two tokens, and the unstopped output reaches it
    out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[:cut]
    kept = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop=[stop],
                                                    include_stop_str_in_output=True))[0]
    assert kept.text == base.text[: cut + len(stop)]


def test_min_tokens_keeps_stop_tokens_away(engine, references):
    prompts, _, _ = references("llama")
    base = greedy_text(engine, prompts[3])
    stop_tok = base.token_ids[2]
    eos = engine.tokenizer.eos_token_id
    early = engine.generate([prompts[3]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert early.token_ids == base.token_ids[:3] and early.finish_reason == "stop"
    out = engine.generate([prompts[3]], SamplingParams(max_tokens=24, min_tokens=6, temperature=0,
                                                       stop_token_ids=[stop_tok]))[0]
    assert out.token_ids[:2] == base.token_ids[:2]
    assert stop_tok not in out.token_ids[:6] and eos not in out.token_ids[:6]
    assert len(out.token_ids) >= 6


def test_n_samples_share_prefix_blocks(model_dirs, references):
    prompts, _, _ = references("llama")
    prompt = prompts[0] + prompts[1]          # > 3 full blocks
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=256))
    out = engine.generate([prompt], SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=1,
                                                   ignore_eos=True))[0]
    assert len(out.outputs) == 4 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    full_blocks = (len(prompt) - 1) // 16
    stats = engine.stats()
    # One sample computed the prompt's full blocks; the three others took them from the cache.
    assert stats.prefill_tokens <= len(prompt) + 3 * (len(prompt) - full_blocks * 16)
    engine.block_manager.assert_no_leaks()


def test_chat_prompt_uses_the_template(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ka ke ki?"}]
    expected = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"])
    out = engine.generate([messages], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.prompt_token_ids == expected
    assert out.token_ids == engine.generate([expected], SamplingParams(max_tokens=4, temperature=0))[0].token_ids


def test_chat_prompt_without_template_is_an_error_row(tmp_path):
    path = build_toy_model(tmp_path / "m", hidden=32, layers=1, heads=2, kv_heads=1)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = None
    tok.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64))
    outs = engine.generate([[{"role": "user", "content": "hi"}], "hi"], SamplingParams(max_tokens=2, temperature=0))
    assert outs[0].finish_reason == "error" and "chat template" in outs[0].error
    assert outs[1].finish_reason != "error"


def test_model_vocab_larger_than_tokenizer(tmp_path):
    path = build_toy_model(tmp_path / "wide", vocab_size=1536, hidden=32, layers=1, heads=2, kv_heads=1,
                           decisive=False)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64))
    outs = engine.generate(["Ka ke"] * 8, SamplingParams(max_tokens=40, temperature=5.0, seed=0, ignore_eos=True,
                                                         stop=["zzz"]))
    ids = [t for o in outs for t in o.token_ids]
    assert max(ids) >= len(engine.tokenizer)         # unknown ids were sampled ...
    known = len(engine.tokenizer)  # ... and the text is that of the ids the tokenizer knows
    assert [o.text for o in outs] == [engine.tokenizer.decode([t for t in o.token_ids if t < known],
                                                              skip_special_tokens=True) for o in outs]


def test_request_timings_are_ordered(engine, references):
    prompts, max_tokens, _ = references("llama")
    outs = engine.generate(prompts[:8], [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
                                         for m in max_tokens[:8]])
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
        assert m.num_output_tokens == len(o.token_ids)
        assert m.itl_mean == pytest.approx((m.last_token_time - m.first_token_time) / (len(o.token_ids) - 1))
        assert m.ttft > 0 and m.e2e >= m.ttft
