"""Engine test fixtures: tiny models built and saved once per session, and their greedy references."""

from __future__ import annotations

import random

import pytest
import torch

from lmbatch.engine.toy_models import build_toy_model, synthetic_text, synthetic_words

ARCHS = {
    "llama": dict(arch="llama", hidden=64, layers=2, heads=4, kv_heads=2),
    "qwen2": dict(arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2),
    "qwen3": dict(arch="qwen3", hidden=64, layers=2, heads=4, kv_heads=1),
    "mistral": dict(arch="mistral", hidden=64, layers=2, heads=8, kv_heads=2),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: build_toy_model(root / name, seed=i, **kw) for i, (name, kw) in enumerate(ARCHS.items())}


def make_prompts(tokenizer, n: int = 24, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of mixed lengths (3 to ~150 tokens); most start with one of three shared prefixes."""
    rng = random.Random(seed)
    words = synthetic_words(500, seed)
    prefixes = [tokenizer(synthetic_text(rng, words, k)).input_ids for k in (30, 45, 60)]
    prompts = []
    for i in range(n):
        suffix = tokenizer(" " + synthetic_text(rng, words, rng.randint(1, 40))).input_ids
        prompts.append(suffix if i % 4 == 3 else prefixes[i % 3] + suffix)
    return prompts


def max_tokens_for(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(4, 24) for _ in range(n)]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def hf_reference():
    return hf_greedy


@pytest.fixture(scope="session")
def references(model_dirs):
    """Per model: (prompts, max_tokens, greedy outputs of transformers' generate, one prompt at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(name: str):
        if name not in cache:
            tok = AutoTokenizer.from_pretrained(model_dirs[name])
            model = AutoModelForCausalLM.from_pretrained(model_dirs[name], dtype=torch.float32).eval()
            prompts = make_prompts(tok)
            max_tokens = max_tokens_for(len(prompts))
            refs = [hf_greedy(model, p, m) for p, m in zip(prompts, max_tokens)]
            cache[name] = (prompts, max_tokens, refs)
        return cache[name]

    return get
