"""The toy Llama-shaped models the side-by-side benchmark runs on (random weights, built locally)."""

from __future__ import annotations

from pathlib import Path

MODELS = {
    # ~24M parameters, Llama-shaped, 32k vocabulary (16.4M of it in embedding + LM head)
    "cpu": {"vocab_size": 32000, "hidden": 256, "layers": 10, "heads": 8, "kv_heads": 4, "max_positions": 4096},
    # ~270M parameters for an H200
    "gpu": {"vocab_size": 32000, "hidden": 1024, "layers": 16, "heads": 16, "kv_heads": 8, "max_positions": 4096},
    # scaling runs
    "small": {"vocab_size": 4096, "hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "max_positions": 1024},
}


def ensure_model(name: str, root: Path) -> Path:
    """The model `name` of MODELS under root/model-<name>, built there on first use."""
    path = root / f"model-{name}"
    if not (path / "config.json").exists():
        from lmbatch.testing import build_toy_model

        build_toy_model(path, tokenizer_vocab=min(32000, MODELS[name]["vocab_size"]), **MODELS[name])
    return path
