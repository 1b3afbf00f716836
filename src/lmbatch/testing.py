"""Small models and tokenizers built locally, for tests, the demo job and benchmarks.

Nothing here downloads: a byte-level BPE tokenizer is trained on a generated corpus in about a
second and a stock transformers architecture is initialised from a config, then both are saved
with `save_pretrained` so that every user of them goes through the real loading path.

`decisive=True` scales the LM head so that the gap between the best and second-best logit is
large compared to float32 rounding noise: exact greedy comparisons against transformers then
test the engine, not the luck of near-ties.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# A reasoning model's tokenizer (reasoning=True): thinking tags, and a template that opens the
# thinking section in the prompt unless enable_thinking=False closes it there (as Qwen3's does).
THINK_TOKENS = ["<think>", "</think>"]
THINKING_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|assistant|>{% endif %}",
    "<|assistant|>{% if enable_thinking is defined and not enable_thinking %}<think></think>"
    "{% else %}<think>{% endif %}{% endif %}")

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def synthetic_words(n: int, seed: int = 0) -> list[str]:
    """A deterministic vocabulary of pronounceable pseudo-words."""
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)))
    return sorted(words)


def synthetic_text(rng: random.Random, words: list[str], n_words: int) -> str:
    out = []
    for i in range(n_words):
        w = rng.choice(words)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += rng.choice([".", ",", "?", "!"])
    return " ".join(out)


def build_tokenizer(path: str | Path, vocab_size: int = 1024, seed: int = 0, reasoning: bool = False):
    """Train a byte-level BPE tokenizer on generated text and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = synthetic_words(2000, seed)
    corpus = [synthetic_text(rng, words, 60) for _ in range(2000)]
    corpus += ["0123456789 +-*/=()[]{}<>:;'\"#@&%$ éàüö 你好 🙂"] * 20
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + (THINK_TOKENS if reasoning else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    hf.chat_template = THINKING_CHAT_TEMPLATE if reasoning else CHAT_TEMPLATE
    hf.save_pretrained(str(path))
    return hf


def _model_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                  intermediate: int | None, max_positions: int, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = hidden // heads
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return cls(**kwargs)


def build_toy_model(
    path: str | Path,
    arch: str = "llama",
    vocab_size: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 2048,
    tokenizer_vocab: int = 1024,
    seed: int = 0,
    decisive: bool = True,
    reasoning: bool = False,
) -> Path:
    """Build and save a randomly initialised causal LM with its tokenizer; returns the directory.

    `vocab_size` may exceed the tokenizer's vocabulary (as real models' often do); by default the
    model's vocabulary is the tokenizer's rounded up to a multiple of 64.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path, vocab_size=tokenizer_vocab, seed=seed, reasoning=reasoning)
    vocab_size = vocab_size or (len(tokenizer) + 63) // 64 * 64
    config = _model_config(arch, vocab_size, hidden, layers, heads, kv_heads, intermediate,
                           max_positions, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if decisive:
        with torch.no_grad():
            model.lm_head.weight.mul_(50.0)
    model.generation_config.do_sample = False
    model.save_pretrained(str(path))
    return path
