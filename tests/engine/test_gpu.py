"""The same engine on CUDA: exact greedy parity in float32, and bf16 agreement with transformers' bf16.

Run with `pytest -m gpu` on a machine with an NVIDIA GPU (`make bench-gpu` does); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("regime", [dict(), dict(max_num_batched_tokens=32), dict(num_kv_blocks=24),
                                    dict(async_scheduling=True), dict(async_scheduling=True, num_kv_blocks=24)])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_float32_greedy_matches_cpu_reference(model_dirs, references, arch, regime):
    prompts, max_tokens, refs = references(arch)
    # 24 prompts: graphs up to 32 sequences (6 captures, not 20) keep this file short on the GPU box.
    cfg = EngineConfig(model=str(model_dirs[arch]), device="cuda", dtype="float32",
                       **{"num_kv_blocks": 1024, "max_num_seqs": 32, **regime})
    engine = LLMEngine(cfg)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens])
    assert [o.token_ids for o in outs] == refs
    engine.block_manager.assert_no_leaks()


def test_cuda_bf16_agrees_with_transformers_bf16(model_dirs, references, hf_reference):
    from transformers import AutoModelForCausalLM

    prompts, max_tokens, _ = references("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16).cuda().eval()
    refs = [hf_reference(model, p, m) for p, m in zip(prompts, max_tokens)]
    engine = LLMEngine(EngineConfig(model=str(model_dirs["llama"]), device="cuda", dtype="bfloat16",
                                    num_kv_blocks=1024, max_num_seqs=32))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens])
    # bf16 kernels round differently; the first tokens of (nearly) every prompt must still agree.
    first = sum(o.token_ids[:1] == r[:1] for o, r in zip(outs, refs))
    assert first >= len(prompts) - 1


def test_an_error_in_a_launch_leaves_nothing_queued_on_the_stream(model_dirs, references):
    """abort_all drains the whole stream, not only the read-back of the step in flight: a launch that
    fails after queueing its work must not leave copies behind that read a pinned buffer the next step
    refills. The failing launch keeps the GPU busy (~30 ms) so that an abort that does not wait shows."""
    prompts, max_tokens, refs = references("llama")
    engine = LLMEngine(EngineConfig(model=str(model_dirs["llama"]), device="cuda", dtype="float32",
                                    num_kv_blocks=1024, max_num_seqs=32, async_scheduling=True))
    params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
    execute, calls = engine.runner.execute, []

    def failing(*args):
        out = execute(*args)
        calls.append(1)
        if len(calls) == 6:
            torch.cuda._sleep(50_000_000)
            raise RuntimeError("device lost")
        return out

    engine.runner.execute = failing
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(prompts, params)
    assert torch.cuda.current_stream().query()
    engine.block_manager.assert_no_leaks()
    engine.runner.execute = execute
    assert [o.token_ids for o in engine.generate(prompts, params)] == refs
