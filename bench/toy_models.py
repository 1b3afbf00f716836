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


# The real configs' shapes (Qwen/Qwen2-0.5B, meta-llama/Llama-3.2-1B config.json), random weights.
SHAPES = {
    "qwen2-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768, rope_theta=1000000.0,
                                       tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                          "factor": 32.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192})),
}


def ensure_shaped_model(name: str, root: Path, device: str = "cpu") -> Path:
    """A model of SHAPES under root/name (bf16 on disk, a small tokenizer), built there on first use.

    device="cuda" initialises the random weights on the GPU: seconds instead of a minute for 1B.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from lmbatch.testing import build_tokenizer

    path = root / name
    if (path / "config.json").exists():
        return path
    cls_name, kwargs = SHAPES[name]
    tokenizer = build_tokenizer(path)
    config = getattr(transformers, cls_name)(**kwargs, bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    return path
