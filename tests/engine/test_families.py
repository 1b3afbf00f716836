"""Every family of tests/engine/families.py: exact against transformers' generate, or refused at load.

For each family, greedy outputs under default settings, a small token budget (prefills in chunks
with past context), the prefix cache (prompts share long prefixes) and preemption, on both the
native decode kernel and the PyTorch path, equal transformers' `generate` with the family's default
attention (eager for Gemma 2 and gpt-oss, SDPA elsewhere). Prompts run to ~150 tokens, past the
24-token windows of the sliding-window configs.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build_family_model
from greedy import hf_greedy, make_prompts, max_tokens_for

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.model_check import UnsupportedModelError

REGIMES = {
    "default": dict(num_kv_blocks=512),
    "chunked_prefill": dict(num_kv_blocks=512, max_num_batched_tokens=32),
    "preemption": dict(num_kv_blocks=20, max_num_batched_tokens=128),
    "pytorch_attention": dict(num_kv_blocks=512, max_num_batched_tokens=48),
}
EXACT = [name for name, (_, _, expected) in FAMILIES.items() if expected == "exact"]
REFUSED = [name for name in FAMILIES if name not in EXACT]
NUM_PROMPTS = 10


@pytest.fixture(scope="session")
def family_tokenizer(tmp_path_factory):
    from lmbatch.testing import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("family-tokenizer"))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, family_tokenizer):
    """name -> (model dir, prompts, max_tokens, transformers' greedy outputs), built on first use."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name: str):
        if name not in cache:
            path = build_family_model(root / name, name, family_tokenizer)
            prompts = make_prompts(family_tokenizer, n=NUM_PROMPTS)
            max_tokens = max_tokens_for(NUM_PROMPTS)
            refs = None
            if name in EXACT:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                refs = [hf_greedy(model, p, m) for p, m in zip(prompts, max_tokens)]
            cache[name] = (path, prompts, max_tokens, refs)
        return cache[name]

    return get


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("name", EXACT)
def test_family_is_exact(family_models, name, regime, monkeypatch):
    if regime == "pytorch_attention":
        monkeypatch.setenv("LMBATCH_CPU_KERNELS", "0")
    path, prompts, max_tokens, refs = family_models(name)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), **REGIMES[regime]))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    engine.block_manager.assert_no_leaks()
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.token_ids == ref, f"{name}, {regime}: prompt {i} ({len(prompts[i])} tokens) diverged"
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0
    if regime == "preemption":
        assert stats.preemptions > 0
    assert (engine.runner.kernels is None) == (regime == "pytorch_attention")


@pytest.mark.parametrize("name", REFUSED)
def test_family_is_refused_with_its_reason(family_models, name):
    path, *_ = family_models(name)
    expected = FAMILIES[name][2]
    with pytest.raises(UnsupportedModelError, match=f"^{expected}") as err:
        LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64))
    assert "lmbatch cannot run this model exactly" in str(err.value)


def test_bloom_names_alibi(family_models):
    path, *_ = family_models("bloom")
    with pytest.raises(ValueError, match="bloom: attention adds an ALiBi bias that lmbatch's paged attention "
                                         "does not apply"):
        LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64))


def test_window_layers_get_their_own_windows(family_models):
    # Gemma 3's layer_types: two sliding layers then a global one; the pool serves all three.
    path, *_ = family_models("gemma3_text")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64))
    assert engine.max_model_len == 512                       # not capped at the 24-token window
    from lmbatch.engine.model_check import probe_layout

    layout = probe_layout(engine.runner.model, engine.runner.num_layers, engine.runner.device)
    assert layout.windows == (24, 24, None)


# Each variant, switched off in the paged attention: the family's model must then give other tokens
# (the test models are sensitive to it, the sharpened LM head hides nothing), and the load-time
# check must refuse the model rather than run it so.
VARIANT_MODELS = {"sliding_window": "mistral_swa", "softcap": "gemma2", "s_aux": "gpt_oss"}


def switch_off(monkeypatch, argument: str):
    from lmbatch.engine.attention_variants import Variant

    original = Variant.of.__func__

    def without(cls, **kwargs):
        return original(cls, **{k: v for k, v in kwargs.items() if k != argument})

    monkeypatch.setattr(Variant, "of", classmethod(lambda cls, sliding_window=None, softcap=None, s_aux=None:
                                                   without(cls, sliding_window=sliding_window, softcap=softcap,
                                                           s_aux=s_aux)))


@pytest.mark.parametrize("argument", list(VARIANT_MODELS))
def test_switching_a_variant_off_changes_tokens_and_is_refused(family_models, argument, monkeypatch):
    from lmbatch.engine import model_check

    path, prompts, max_tokens, refs = family_models(VARIANT_MODELS[argument])
    switch_off(monkeypatch, argument)
    with pytest.raises(UnsupportedModelError, match="lmbatch cannot run this model exactly"):
        LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=512))

    # Past the checks, the engine would run it wrong.
    if argument == "sliding_window":
        monkeypatch.setattr(model_check, "declared_windows", lambda hf, n: (None,) * n)
    monkeypatch.setattr(model_check, "check_outputs", lambda runner, layout: 0.0)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=512))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    wrong = sum(o.token_ids != r for o, r in zip(outs, refs))
    assert wrong >= 2, f"only {wrong} of {len(refs)} prompts tell {argument} on from off"


@pytest.mark.parametrize("argument", list(VARIANT_MODELS))
def test_bf16_check_loads_the_model_and_refuses_it_with_the_variant_off(family_models, argument, monkeypatch):
    # bf16: the load-time check's tolerance (model_check.TOLERANCE, SHARE_WITHIN) passes the model as
    # it is and still tells a variant switched off.
    path, *_ = family_models(VARIANT_MODELS[argument])
    LLMEngine(EngineConfig(model=str(path), num_kv_blocks=128, dtype="bfloat16"))
    switch_off(monkeypatch, argument)
    if argument == "sliding_window":   # past the probe's window check: the logits must tell
        from lmbatch.engine import model_check

        monkeypatch.setattr(model_check, "declared_windows", lambda hf, n: (None,) * n)
    with pytest.raises(UnsupportedModelError, match="positions within 0.05 in torch.bfloat16"):
        LLMEngine(EngineConfig(model=str(path), num_kv_blocks=128, dtype="bfloat16"))
