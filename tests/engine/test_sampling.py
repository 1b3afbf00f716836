"""The batched sampler and SamplingParams: parameter checks, sets, frequencies, penalties, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.sampler import Sampler, apply_penalties
from lmbatch.engine.sequence import Sequence


def seqs_for(params_list, outputs=None):
    out = []
    for i, p in enumerate(params_list):
        s = Sequence(i, i, [1, 2, 3], p)
        s.output_token_ids = list((outputs or {}).get(i, []))
        out.append(s)
    return out


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(n=0), dict(top_k=-2),
    dict(min_p=1.5), dict(max_tokens=0), dict(min_tokens=5, max_tokens=2), dict(repetition_penalty=0),
    dict(presence_penalty=3), dict(logprobs=-1), dict(stop=[""]),
])
def test_invalid_params_raise_when_built(bad):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**bad)


def test_samples_stay_inside_top_k_top_p_min_p_sets():
    torch.manual_seed(0)
    sampler = Sampler(torch.device("cpu"), seed=0)
    cases = [SamplingParams(top_k=5), SamplingParams(top_p=0.6), SamplingParams(min_p=0.2),
             SamplingParams(top_k=8, top_p=0.9, min_p=0.05, temperature=0.7)]
    seqs = seqs_for(cases)
    for _ in range(200):
        logits = torch.randn(len(cases), 50) * 3
        tokens = sampler(logits, seqs, [[] for _ in seqs])
        for row, (p, tok) in enumerate(zip(cases, tokens)):
            scaled = logits[row] / p.temperature
            probs = torch.softmax(scaled, -1)
            order = probs.argsort(descending=True)
            rank = (order == tok).nonzero().item()
            if p.top_k:
                assert rank < p.top_k
            if p.top_p < 1:
                kept = probs[order][: p.top_k or None] if p.top_k else probs[order]
                kept = kept / kept.sum()
                assert kept[:rank].sum() < p.top_p + 1e-6
            if p.min_p:
                assert probs[tok] >= p.min_p * probs.max() - 1e-6


def test_temperature_sampling_frequencies_match_softmax():
    sampler = Sampler(torch.device("cpu"), seed=123)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = SamplingParams(temperature=0.8)
    draws = 20000
    seqs = seqs_for([p] * 100)
    counts = torch.zeros(5)
    for _ in range(draws // 100):
        toks = sampler(logits.repeat(100, 1), seqs, [[]] * 100)
        counts += torch.bincount(torch.tensor(toks), minlength=5)
    expected = torch.softmax(logits / 0.8, -1) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts, expected)   # 4 dof: p < 1e-4 of a false alarm


def test_top_k_one_is_greedy():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(64, 100)
    seqs = seqs_for([SamplingParams(top_k=1, temperature=1.3)] * 64)
    assert sampler(logits, seqs, [[]] * 64) == logits.argmax(-1).tolist()


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    p = SamplingParams(repetition_penalty=1.7)
    seqs = seqs_for([p, p], outputs={0: [5, 9, 9], 1: [29]})
    # Two steps: the sampler keeps per-request counts and must fold in the tokens of the second.
    for new_tokens in ([], [11, 5]):
        for s in seqs:
            s.output_token_ids.extend(new_tokens)
        logits = torch.randn(2, 30)
        ours = apply_penalties(logits.clone(), seqs)
        for i, s in enumerate(seqs):
            ids = torch.tensor([s.prompt_token_ids + s.output_token_ids])
            ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[i:i + 1].clone())
            torch.testing.assert_close(ours[i], ref[0])


def test_presence_and_frequency_penalties_follow_their_definition():
    logits = torch.zeros(1, 10)
    seqs = seqs_for([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], outputs={0: [4, 4, 4, 7]})
    out = apply_penalties(logits.clone(), seqs)[0]
    assert out[4] == pytest.approx(-(0.5 + 3 * 0.25))
    seqs[0].output_token_ids.append(7)            # the next step counts the new token too
    assert apply_penalties(logits.clone(), seqs)[0][7] == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[7] == pytest.approx(-(0.5 + 0.25))
    assert out[1] == 0 and out[1] == out[2]   # prompt tokens are not counted by these two


def test_min_tokens_suppression():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(1, 10)
    logits[0, 2] = 100.0                          # EOS would win by far
    s = seqs_for([SamplingParams(temperature=0, min_tokens=3)])
    assert sampler(logits, s, [[2]]) != [2]
    assert sampler(logits, s, [[]]) == [2]


# ---- engine-level ------------------------------------------------------------------------------

def seeded_tokens(model_dir, prompts, target, **cfg):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), **cfg))
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, ignore_eos=True,
                             seed=7 if i == target else None) for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    engine.block_manager.assert_no_leaks()
    return outs[target].token_ids, engine.stats()


def test_seeded_request_is_reproducible_under_any_batching(model_dirs, references):
    prompts, _, _ = references("llama")
    target = prompts[5]
    alone, _ = seeded_tokens(model_dirs["llama"], [target], 0, num_kv_blocks=256)
    crowd, _ = seeded_tokens(model_dirs["llama"], prompts[:12] + [target], 12, num_kv_blocks=256)
    chunked, _ = seeded_tokens(model_dirs["llama"], [target] + prompts[:12], 0, num_kv_blocks=256,
                               max_num_batched_tokens=16)
    preempted, stats = seeded_tokens(model_dirs["llama"], prompts[:12] + [target], 12, num_kv_blocks=14,
                                     max_num_batched_tokens=128)
    assert stats.preemptions > 0
    assert alone == crowd == chunked == preempted
    other_seed = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=256)).generate(
        [target], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, ignore_eos=True, seed=8))[0]
    assert other_seed.token_ids != alone


def test_logprobs_equal_transformers_log_softmax(model_dirs, references):
    from transformers import AutoModelForCausalLM

    prompts, _, _ = references("llama")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs["llama"]), num_kv_blocks=256))
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=3,
                                                       ignore_eos=True))[0]
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    full = torch.tensor([prompts[0] + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(full).logits[0].float(), -1)
    n = len(prompts[0])
    assert len(out.logprobs) == 6
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n - 1 + j]
        assert entry[tok] == pytest.approx(float(row[tok]), abs=1e-4)
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(entry)
        assert math.isclose(sum(math.exp(v) for v in row.topk(3).values.tolist()),
                            sum(math.exp(entry[t]) for t in top3), abs_tol=1e-4)
