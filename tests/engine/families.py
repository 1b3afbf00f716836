"""Tiny models of stock transformers families, built from their own config classes.

Each entry is a config class name and the keyword arguments that make it tiny; `common` fills in
the sizes that every family takes under the same name. Variants that matter to attention are
made to matter at test lengths: sliding windows of 24 tokens (prompts run to ~150), a Gemma 2
soft-cap of 0.5, attention sinks of gpt-oss as they are initialised.
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 24  # shorter than most test prompts, longer than one 16-token block

def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


COMMON = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)

# name -> (config class, overrides of COMMON, expected: "exact" or the refusal's start)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", {}, "exact"),
    "mistral": ("MistralConfig", dict(sliding_window=None), "exact"),
    "mistral_swa": ("MistralConfig", dict(sliding_window=WINDOW), "exact"),
    "qwen2": ("Qwen2Config", {}, "exact"),
    "qwen2_swa": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                  "exact"),
    "qwen3": ("Qwen3Config", dict(head_dim=16), "exact"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32), "exact"),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None), "exact"),
    "gemma": ("GemmaConfig", dict(head_dim=16), "exact"),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.5,
                                    final_logit_softcapping=None, query_pre_attn_scalar=16), "exact"),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                             final_logit_softcapping=None, num_hidden_layers=3,
                                             layer_types=["sliding_attention", "sliding_attention",
                                                          "full_attention"]), "exact"),
    "cohere2": ("Cohere2Config", dict(sliding_window=WINDOW, num_hidden_layers=4,
                                      layer_types=["sliding_attention"] * 3 + ["full_attention"]), "exact"),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, sliding_window=WINDOW, num_local_experts=4,
                                     num_experts_per_tok=2), "exact"),
    "phi3": ("Phi3Config", dict(sliding_window=None), "exact"),
    "phi": ("PhiConfig", {}, "exact"),
    "gpt2": ("GPT2Config", {}, "exact"),
    "gpt_neox": ("GPTNeoXConfig", {}, "exact"),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64), "exact"),
    "olmo": ("OlmoConfig", {}, "exact"),
    "olmo2": ("Olmo2Config", {}, "exact"),
    "granite": ("GraniteConfig", {}, "exact"),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=None), "exact"),
    "cohere": ("CohereConfig", {}, "exact"),
    "smollm3": ("SmolLM3Config", {}, "exact"),
    "glm": ("GlmConfig", dict(head_dim=16), "exact"),
    "stablelm": ("StableLmConfig", {}, "exact"),
    # transformers 5.25 sends Falcon's attention through AttentionInterface: run exactly there, refused before
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2),
               "exact" if _transformers_at_least("5.25") else "falcon:"),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4), "bloom:"),
}


def family_config(name: str, tokenizer):
    import transformers

    cls_name, overrides, _ = FAMILIES[name]
    kwargs = {**COMMON, **overrides, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
              "tie_word_embeddings": False}
    return getattr(transformers, cls_name)(**kwargs)


QK_SCALE = 6.0   # query/key projections scaled up: attention scores of several units, not ~0.01


def build_family_model(path: Path, name: str, tokenizer, seed: int = 0) -> Path:
    """A random model of the family with a sharpened LM head (decisive greedy logits), saved.

    At random init the attention scores are ~0.01 and every layer's attention is nearly uniform,
    so a wrong window, cap or sink would hardly move the output. Scaling the query and key
    projections makes attention peaked, and what changes attention changes the tokens.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, tokenizer), dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)
        for module_name, param in model.named_parameters():
            if module_name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(QK_SCALE)
    model.generation_config.do_sample = False
    model.save_pretrained(str(path))
    return path
