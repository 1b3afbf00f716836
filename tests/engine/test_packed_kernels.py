"""The packed linear kernel (AVX-512 float32, AVX512-BF16 bfloat16) and the bf16-pool decode attention
against float64 references.

Tolerances, and why: a bf16 output carries 8 significant bits, so rounding the exact result once
moves it by at most 2^-8 of its magnitude (half an ulp). The kernels multiply bf16 pairs exactly and
accumulate in float32, so beyond that single rounding they differ from the float64 reference only
by float32 summation order (~1e-6 of the largest output, measured; bounded here by 1e-5). In float32
that summation order is all there is. A kernel that read a wrong weight, a wrong block or a wrong
head is off by O(1).
"""

from __future__ import annotations

import pytest
import torch

from lmbatch.engine import cpu_kernels, small_batch_linear

kernels = cpu_kernels.load()
PACKED = kernels.packed_linear_dtypes() if kernels is not None else []
needs_bf16 = pytest.mark.skipif("bfloat16" not in PACKED, reason="this CPU has no AVX512-BF16 (hardware, like a GPU)")
needs_avx512 = pytest.mark.skipif("float32" not in PACKED, reason="this CPU has no AVX-512 (hardware, like a GPU)")


def _within_one_rounding(got: torch.Tensor, exact: torch.Tensor) -> None:
    exact = exact.double()
    rounding = 2**-8 if got.dtype == torch.bfloat16 else 2**-24
    bound = exact.abs() * rounding + 1e-5 * exact.abs().max()
    excess = (got.double() - exact).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond one bf16 rounding"


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_bf16),
                                   pytest.param(torch.float32, marks=needs_avx512)])
@pytest.mark.parametrize("n,k", [(100, 70), (48, 64), (4864, 896), (33, 4864)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_linear_is_one_rounding_of_the_exact_product(dtype, n, k, rows, with_bias):
    gen = torch.Generator().manual_seed(n * 1000 + k + rows)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    got = kernels.packed_linear(x, small_batch_linear.pack(w), b, n)
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0)
    assert got.dtype == dtype and got.shape == (rows, n)
    _within_one_rounding(got, exact)


@needs_bf16
def test_a_weight_packed_in_the_plain_layout_is_caught():
    """A guard on the test: the kernel reading an unpacked [N, K] weight fails the bound."""
    w, x = torch.randn(32, 64).bfloat16(), torch.randn(4, 64).bfloat16()
    wrong = w.reshape(2, 32, 16, 2)         # the packed shape over the plain [N, K] order
    got = kernels.packed_linear(x, wrong.contiguous(), None, 32)
    with pytest.raises(AssertionError, match="beyond one bf16 rounding"):
        _within_one_rounding(got, x.double() @ w.double().T)


@needs_bf16
def test_install_packs_bf16_weights_and_repacks_a_changed_weight():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40)).bfloat16()
    keys = list(model.state_dict())
    x = torch.randn(5, 64).bfloat16()
    assert small_batch_linear.install(model) == 2
    assert list(model.state_dict()) == keys           # the packed copy is not a checkpoint entry
    with torch.inference_mode():
        first = model[0](x)
        _within_one_rounding(first, x.double() @ model[0].weight.double().T + model[0].bias.double())
        model[0].weight.mul_(-1)                       # in place: the kernel must not use the old packing
        _within_one_rounding(model[0](x), x.double() @ model[0].weight.double().T + model[0].bias.double())


@pytest.mark.skipif(kernels is None, reason="no C++ compiler")
def test_bf16_pool_decode_attention_equals_the_float32_kernel_on_the_widened_pool():
    gen = torch.Generator().manual_seed(9)
    blocks, kv_heads, bs, dim, heads = 12, 2, 16, 64, 8
    k = torch.randn(blocks, kv_heads, bs, dim, generator=gen).bfloat16()
    v = torch.randn(blocks, kv_heads, bs, dim, generator=gen).bfloat16()
    q = torch.randn(3, heads, dim, generator=gen).bfloat16()
    tables = torch.tensor([[3, 7, 1, 0], [5, 0, 0, 0], [2, 4, 6, 8]])
    lens = torch.tensor([40, 9, 64])
    got = kernels.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5)
    widened = kernels.paged_decode_attention(q.float(), k.float(), v.float(), tables, lens, dim ** -0.5)
    assert got.dtype == torch.bfloat16
    _within_one_rounding(got, widened)
    shuffled = kernels.paged_decode_attention(q, k, v, tables.roll(1, dims=1), lens, dim ** -0.5)
    assert (shuffled.float() - widened).abs().max() > 0.05   # the comparison can tell a wrong block


@needs_bf16
def test_bf16_linear_refuses_an_odd_k_or_a_misshapen_pack():
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="packed as"):
        kernels.packed_linear(x, torch.zeros(2, 16, 16, 2, dtype=torch.bfloat16), None, 32)
    odd = torch.nn.Linear(63, 8).bfloat16()
    assert small_batch_linear.install(odd) == 0        # K odd: bf16 pairs do not tile it; torch runs it


@pytest.mark.skipif(kernels is None, reason="no C++ compiler")
def test_the_build_has_the_instructions_the_cpu_reports():
    # dtype auto picks bf16 from the CPU's flags; the kernels must then have been built with them
    flags = cpu_kernels.cpu_flags()
    assert ("float32" in PACKED) == ({"avx512f", "avx512bw"} <= flags)
    assert ("bfloat16" in PACKED) == ({"avx512f", "avx512bw", "avx512_bf16"} <= flags)
