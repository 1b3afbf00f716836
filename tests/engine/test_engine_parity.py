"""Greedy output equals transformers' generate, token for token, under every scheduling regime."""

from __future__ import annotations

import pytest

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams

REGIMES = {
    "default": dict(num_kv_blocks=1024),
    "chunked_prefill": dict(num_kv_blocks=1024, max_num_batched_tokens=32),
    "preemption": dict(num_kv_blocks=24, max_num_batched_tokens=256),
    "no_prefix_cache": dict(num_kv_blocks=1024, enable_prefix_caching=False),
    "few_seqs": dict(num_kv_blocks=1024, max_num_seqs=3, max_num_batched_tokens=64),
    "pytorch_attention": dict(num_kv_blocks=24, max_num_batched_tokens=64),  # native CPU kernel off
}


def run_engine(model_dir, prompts, max_tokens, **overrides):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), **overrides))
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    outs = engine.generate(prompts, params)
    engine.block_manager.assert_no_leaks()
    return engine, outs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_matches_transformers(model_dirs, references, arch, regime, monkeypatch):
    if regime == "pytorch_attention":
        monkeypatch.setenv("LMBATCH_CPU_KERNELS", "0")
    prompts, max_tokens, refs = references(arch)
    engine, outs = run_engine(model_dirs[arch], prompts, max_tokens, **REGIMES[regime])
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.index == i
        assert out.token_ids == ref, f"prompt {i} ({len(prompts[i])} tokens) diverged"
        assert out.finish_reason in ("stop", "length")
    stats = engine.stats()
    if regime in ("preemption", "pytorch_attention"):
        assert stats.preemptions > 0
    assert (engine.runner.kernels is None) == (regime == "pytorch_attention")
    if regime == "no_prefix_cache":
        assert stats.prefix_cache_hits == 0
    else:
        assert stats.prefix_cache_hits > 0
        assert sum(o.num_cached_tokens for o in outs) == stats.prefix_cache_hits
    if regime == "chunked_prefill":
        # Some prompt had more uncached tokens than one step's budget: it was prefilled in chunks.
        assert any(len(p) - o.num_cached_tokens > 32 for p, o in zip(prompts, outs))


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_other_families_match_transformers(model_dirs, references, arch):
    prompts, max_tokens, refs = references(arch)
    _, outs = run_engine(model_dirs[arch], prompts[:12], max_tokens[:12], num_kv_blocks=256,
                         max_num_batched_tokens=48)
    assert [o.token_ids for o in outs] == refs[:12]


def test_string_prompts_equal_token_prompts(model_dirs, references):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dirs["llama"])
    texts = ["Hello there. How are you", "Ba be bi", "Mo mu ma, ka ke ki."]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=128))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    by_text = engine.generate(texts, params)
    by_ids = engine.generate([tok(t).input_ids for t in texts], params)
    assert [o.token_ids for o in by_text] == [o.token_ids for o in by_ids]
    assert by_text[0].text == tok.decode(by_text[0].token_ids, skip_special_tokens=True)


def test_error_rows_do_not_disturb_the_rest(model_dirs, references):
    prompts, max_tokens, refs = references("llama")
    too_long = list(prompts[0]) * 40
    mixed = [prompts[0], [], prompts[1], too_long, prompts[2]]
    mt = [max_tokens[0], 5, max_tokens[1], 5, max_tokens[2]]
    engine, outs = run_engine(model_dirs["llama"], mixed, mt, num_kv_blocks=256, max_model_len=512)
    assert [o.finish_reason == "error" for o in outs] == [False, True, False, True, False]
    assert outs[1].error == "empty prompt"
    assert "max_model_len is 512" in outs[3].error
    assert [outs[i].token_ids for i in (0, 2, 4)] == refs[:3]
    assert all(outs[i].error is None for i in (0, 2, 4))


def test_stream_pulls_lazily_and_tags_indices(model_dirs, references):
    prompts, max_tokens, refs = references("llama")
    pulled = []

    def source():
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            pulled.append(i)
            yield p, SamplingParams(max_tokens=m, temperature=0.0)

    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=256, max_num_seqs=4))
    stream = engine.stream(source())
    first = next(stream)
    # With room for 4 running and 4 waiting, the engine must not have drained the 24 prompts.
    assert len(pulled) <= 9
    rest = list(stream)
    outs = sorted([first, *rest], key=lambda o: o.index)
    assert [o.index for o in outs] == list(range(len(prompts)))
    assert [o.token_ids for o in outs] == refs


def test_stop_token_ids_and_ignore_eos(model_dirs, references):
    prompts, _, refs = references("llama")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=256))
    ref = refs[0]
    stop_at = ref[2]
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[: ref.index(stop_at) + 1]
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 30 and out.finish_reason == "length"


def test_stopping_a_stream_early_frees_everything(model_dirs, references):
    prompts, max_tokens, refs = references("llama")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=256, max_num_seqs=4))
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    stream = engine.stream(zip(prompts, params))
    next(stream)
    stream.close()                      # the caller walks away with requests in flight
    engine.block_manager.assert_no_leaks()
    assert not engine.scheduler.has_unfinished()
    assert [o.token_ids for o in engine.generate(prompts, params)] == refs
