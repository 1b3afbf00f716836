"""Prompts and transformers' greedy reference outputs, shared by the engine tests."""

from __future__ import annotations

import random

import torch

from lmbatch.testing import synthetic_text, synthetic_words


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
