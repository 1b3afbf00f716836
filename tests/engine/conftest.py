"""Engine test fixtures: tiny models built and saved once per session, and their greedy references."""

from __future__ import annotations

import pytest
import torch
from greedy import hf_greedy, make_prompts, max_tokens_for

from lmbatch.testing import build_toy_model

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
