"""Quantized checkpoints: run exactly as transformers runs them, or refused with the reason.

torchao int8 weight-only (per-row scales, float activations) is exact: every token's result depends
on its own row only. torchao int8 dynamic activation quantization is not: the engine's steps and
transformers' single forward pass quantize activations over different sets of tokens, so the
load-time check refuses it and says that the checkpoint is quantized.
"""

from __future__ import annotations

import pytest
import torch
from families import build_family_model
from greedy import hf_greedy, make_prompts, max_tokens_for

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.model_check import UnsupportedModelError


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from lmbatch.testing import build_tokenizer

    root = tmp_path_factory.mktemp("quantized")
    tokenizer = build_tokenizer(root / "tokenizer")
    return build_family_model(root / "float", "llama", tokenizer), tokenizer


def quantize(src, tokenizer, dst, quant_config):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                 quantization_config=TorchAoConfig(quant_config))
    model.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    return dst


def test_torchao_int8_weight_only_is_exact(float_model, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM

    src, tokenizer = float_model
    path = quantize(src, tokenizer, tmp_path / "int8", Int8WeightOnlyConfig())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model.model.layers[0].mlp.up_proj.weight.data).__name__ != "Tensor"   # really quantized
    prompts, max_tokens = make_prompts(tokenizer, n=10), max_tokens_for(10)
    refs = [hf_greedy(model, p, m) for p, m in zip(prompts, max_tokens)]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64, max_num_batched_tokens=48))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    assert [o.token_ids for o in outs] == refs
    assert engine.stats().prefix_cache_hits > 0
    # The small-batch kernel reads plain float32 weights only: installed on the float LM head, not on
    # the quantized projections.
    layer = engine.runner.model.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == "Linear"
    assert type(engine.runner.model.lm_head).__name__ == "SmallBatchLinear"


def test_torchao_dynamic_activation_quantization_is_refused(float_model, tmp_path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    src, tokenizer = float_model
    path = quantize(src, tokenizer, tmp_path / "int8dyn", Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedModelError, match=r"^llama: .* it is quantized \(torchao\)"):
        LLMEngine(EngineConfig(dtype="float32", model=str(path), num_kv_blocks=64))
