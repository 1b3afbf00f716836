"""The engine in bfloat16 on the CPU against transformers in bfloat16, on the same inputs.

Tolerances, stated and why. The test model's logits span about +-40 (decisive, so that float32 greedy
parity is not a coin toss) and bf16 keeps 8 significant bits, so bf16 moves next-token logprobs by
tenths of a nat: transformers' own bf16 forward differs from its float32 forward by ~0.2 here. Two bf16
implementations that round at different points (ours accumulates in float32 in another order than
oneDNN, runs rows in other batch shapes, reads a bf16 pool) differ by as much again, not more: the
bound is the measured bf16 <-> float32 gap of transformers itself on the same tokens, times
GAP_FACTOR. Measured (AMD EPYC, AVX512-BF16): engine vs transformers bf16 0.244, transformers bf16
vs float32 0.176 (1.4x); greedy continuations equal to transformers' bf16 generate on 18 of 24
prompts (transformers' bf16 vs its float32: 22; the engine with torch's kernels: 21), first tokens on
24 of 24. A wrong attention (a shifted block table) is off by several nats.
"""

from __future__ import annotations

import pytest
import torch

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams, cpu_kernels

GAP_FACTOR = 2.0           # engine vs transformers bf16 <= 2 x transformers' own bf16 vs float32 gap
STEPS = 6                  # a prefill and five decode steps per prompt
MIN_GREEDY_EQUAL = 16      # of 24 prompts (two thirds), whole continuations equal to transformers' bf16


# Head dim 16 (the shared test models) takes torch's prefill attention; head dim 64 takes the native bf16
# prefill kernel on CPUs with AVX512-BF16, in chunks of at most 48 tokens so that chunks start after past
# context (and prefix-cache hits) and cross blocks.
MODELS = {"llama": {}, "llama_hd64": {"max_num_batched_tokens": 48}}


@pytest.fixture(scope="module")
def bf16_models(model_dirs, tmp_path_factory):
    from lmbatch.testing import build_toy_model

    hd64 = build_toy_model(tmp_path_factory.mktemp("hd64") / "llama_hd64", arch="llama", hidden=256, layers=2,
                           heads=4, kv_heads=1, seed=5)
    return {"llama": model_dirs["llama"], "llama_hd64": hd64}


def _engine(path, name: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", num_kv_blocks=512, **MODELS[name]))


@pytest.fixture(scope="module", params=list(MODELS))
def bf16_runs(request, bf16_models, references, hf_reference):
    from greedy import make_prompts, max_tokens_for
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bf16_models[request.param]
    prompts = make_prompts(AutoTokenizer.from_pretrained(path))
    max_tokens = max_tokens_for(len(prompts))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = _engine(path, request.param)
    if request.param == "llama_hd64" and "avx512_bf16" in cpu_kernels.cpu_flags() and cpu_kernels.load():
        assert engine.runner.prefill_kernel is not None, "the native bf16 prefill kernel must serve this model"
    with engine:
        greedy = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens])
        scored = engine.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0, logprobs=3,
                                                         ignore_eos=True))
    hf_greedy = [hf_reference(hf, p, m) for p, m in zip(prompts, max_tokens)]
    # transformers' own bf16 rounding on the same tokens: the scale of an honest bf16 difference
    bf16_noise = max(_gap(_teacher_forced_logprobs(hf, p, o.outputs[0].token_ids),
                          _teacher_forced_logprobs(hf32, p, o.outputs[0].token_ids), o)
                     for p, o in zip(prompts, scored))
    return prompts, hf, greedy, hf_greedy, scored, bf16_noise, request.param


def _gap(a: torch.Tensor, b: torch.Tensor, out) -> float:
    """The largest difference of two logprob tables at the tokens the engine reported."""
    return max(abs(float(a[step, token]) - float(b[step, token]))
               for step, entries in enumerate(out.outputs[0].logprobs) for token in entries)


def _engine_gap(hf, prompts, scored) -> float:
    worst = 0.0
    for prompt, out in zip(prompts, scored):
        ref = _teacher_forced_logprobs(hf, prompt, out.outputs[0].token_ids)
        for step, entries in enumerate(out.outputs[0].logprobs):
            worst = max(worst, max(abs(lp - float(ref[step, token])) for token, lp in entries.items()))
    return worst


def _teacher_forced_logprobs(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' bf16 next-token log-probabilities at the prompt's end and after each token."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, dim=-1)


def test_bf16_logprobs_of_prefill_and_decode_steps_match_transformers(bf16_runs):
    prompts, hf, _, _, scored, bf16_noise, _ = bf16_runs
    worst = _engine_gap(hf, prompts, scored)
    assert 0 < bf16_noise < 1.0        # the scale itself is sane: bf16 rounding, not a broken model
    assert worst <= GAP_FACTOR * bf16_noise, f"largest logprob gap {worst:.4f}, bf16 noise {bf16_noise:.4f}"


def test_bf16_greedy_tokens_agree_with_transformers_on_most_prompts(bf16_runs):
    _, _, greedy, hf_greedy, _, _, _ = bf16_runs
    equal = sum(o.token_ids == r for o, r in zip(greedy, hf_greedy))
    first = sum(o.token_ids[:1] == r[:1] for o, r in zip(greedy, hf_greedy))
    assert first == len(greedy), "the first token (a prefill's argmax) must agree on every prompt"
    assert equal >= MIN_GREEDY_EQUAL, f"{equal}/{len(greedy)} continuations equal"


def test_the_logprob_comparison_tells_a_wrong_attention(bf16_runs, bf16_models, monkeypatch):
    """A guard on the test: attention reading shifted block tables (decode's, and the prefill kernel's
    where it serves) fails the tolerance by far."""
    from lmbatch.engine import model_runner

    prompts, hf, _, _, _, bf16_noise, name = bf16_runs
    real_decode, real_prefill = model_runner.ModelRunner._block_tables, model_runner.ModelRunner._prefill_batch

    def shifted_decode(self, decodes):
        tables, lengths = real_decode(self, decodes)
        return tables.roll(1, dims=1), lengths

    def shifted_prefill(self, *chunks_and_tables):
        b = real_prefill(self, *chunks_and_tables)
        if b is not None:
            b.block_tables = b.block_tables.roll(1, dims=1)
        return b

    engine = _engine(bf16_models[name], name)
    monkeypatch.setattr(model_runner.ModelRunner, "_block_tables", shifted_decode)
    monkeypatch.setattr(model_runner.ModelRunner, "_prefill_batch", shifted_prefill)
    with engine:
        scored = engine.generate(prompts[:8], SamplingParams(max_tokens=STEPS, temperature=0, logprobs=0,
                                                             ignore_eos=True))
    assert _engine_gap(hf, prompts, scored) > 5 * GAP_FACTOR * bf16_noise


@pytest.mark.parametrize("bf16_runs", ["llama_hd64"], indirect=True)
def test_only_the_prefill_kernel_wrong_is_caught(bf16_runs, bf16_models, monkeypatch):
    """The prefill kernel alone reading a shifted table (decode right) still fails the tolerance: the
    prefill's logprobs are part of what the comparison checks."""
    from lmbatch.engine import model_runner

    prompts, hf, _, _, _, bf16_noise, name = bf16_runs
    if "avx512_bf16" not in cpu_kernels.cpu_flags() or not cpu_kernels.load():
        pytest.skip("the native bf16 prefill kernel needs AVX512-BF16, which this CPU lacks")
    engine = _engine(bf16_models[name], name)
    assert engine.runner.prefill_kernel is not None
    real = model_runner.ModelRunner._prefill_batch

    def shifted(self, *chunks_and_tables):
        b = real(self, *chunks_and_tables)
        if b is not None:
            b.block_tables = b.block_tables.roll(1, dims=1)
        return b

    monkeypatch.setattr(model_runner.ModelRunner, "_prefill_batch", shifted)
    with engine:
        scored = engine.generate(prompts[:8], SamplingParams(max_tokens=STEPS, temperature=0, logprobs=0,
                                                             ignore_eos=True))
    assert _engine_gap(hf, prompts, scored) > 5 * GAP_FACTOR * bf16_noise
