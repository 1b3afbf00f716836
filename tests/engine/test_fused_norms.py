"""bf16 RMSNorm through the native kernel (fused_norms.py, csrc/rms_norm.cpp) against transformers' own forward.

Tolerance, and why: the kernel computes transformers' formulation step by step with the same roundings
(x * rsqrt(mean(x^2) + eps) rounded to bf16, then times the weight rounded to bf16); only the sum of
squares runs in another order, which can move the normalized value across a bf16 rounding boundary:
one unit in the last place (2^-7 relative) on a few elements, never more. A wrong epsilon, a missing
weight or a wrong row is off by far more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from lmbatch.engine import cpu_kernels, fused_norms

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ compiler: the engine keeps transformers' norms")
ULP = 2**-7


def _norm(cls, n: int, seed: int = 0):
    torch.manual_seed(seed)
    norm = cls(n, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n) * 0.5 + 1)
    return norm


def _within_one_ulp(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    diff = (got.float() - ref.float()).abs()
    ok = bool((diff <= ULP * ref.float().abs() + 1e-30).all())
    return ok, float((got == ref).float().mean())


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, Qwen3RMSNorm])
def test_the_llama_family_norms_are_recognized(cls):
    assert fused_norms.computes_llama_rms_norm(cls(8))


def test_another_formulation_is_not():
    assert not fused_norms.computes_llama_rms_norm(GemmaRMSNorm(8))   # weight is (1 + w) there


@pytest.mark.parametrize("shape", [(1, 1, 896), (1, 7, 896), (3, 64), (2, 5, 2048), (4, 100)])
def test_kernel_equals_transformers_forward_within_one_ulp(shape):
    norm = _norm(Qwen2RMSNorm, shape[-1], seed=shape[-1])
    x = (torch.randn(shape) * 3).bfloat16()
    with torch.inference_mode():
        ref = norm(x)
        got = kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    ok, equal = _within_one_ulp(got, ref)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert ok, "more than one bf16 ulp from transformers' forward"
    # measured: 100% bit-equal on every shape here (torch 2.13, AVX-512); one flip per hundred elements is
    # the most a different summation order of the same float32 squares should move
    assert equal >= 0.99, f"only {equal:.1%} of the elements bit-equal"


def test_a_wrong_norm_is_caught():
    """A guard on the bound: the kernel with the weight left out, or with a 1e-2 epsilon, fails it."""
    norm = _norm(Qwen2RMSNorm, 256)
    x = (torch.randn(4, 256) * 0.05).bfloat16()        # small rows: epsilon matters
    with torch.inference_mode():
        ref = norm(x)
        no_weight = kernels.rms_norm(x, torch.ones_like(norm.weight), norm.variance_epsilon)
        wrong_eps = kernels.rms_norm(x, norm.weight, 1e-2)
    assert not _within_one_ulp(no_weight, ref)[0]
    assert not _within_one_ulp(wrong_eps, ref)[0]


def test_install_swaps_only_bf16_norms_of_that_formulation():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _norm(Qwen2RMSNorm, 64), _norm(GemmaRMSNorm, 64)
            self.c = Qwen2RMSNorm(64)                     # float32

    block = Block()
    assert fused_norms.install(block) == 1
    assert type(block.a).__name__ == "FusedQwen2RMSNorm" and isinstance(block.a, Qwen2RMSNorm)
    assert type(block.b) is GemmaRMSNorm and type(block.c) is Qwen2RMSNorm
    x = torch.randn(3, 64).bfloat16()
    twin = _norm(Qwen2RMSNorm, 64)
    with torch.inference_mode():
        assert _within_one_ulp(block.a(x), twin(x))[0]
        assert torch.equal(copy.deepcopy(block).a(x), block.a(x))   # copies keep the fused forward
    assert set(block.state_dict()) == {"a.weight", "b.weight", "c.weight"}
