"""The native CPU kernels against PyTorch: decode attention against SDPA, small-batch linear against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmbatch.engine import cpu_kernels, small_batch_linear


def test_kernel_builds_here():
    # CI machines have a C++ compiler: a silent fallback there would hide a broken kernel.
    assert cpu_kernels.load() is not None


# Head sizes with a compiled specialisation (32, 64, 128, 256) and without (48); GQA groups that
# take one pass (2 or 8 of 32, 1 of 64), several (8 of 128, 2 of 256), a mix of pass sizes (7 of 64:
# 4+2+1) and several passes on the run-time path (7 of 48).
@pytest.mark.parametrize("kv_heads, heads, dim", [(4, 8, 32), (1, 8, 32), (2, 2, 64), (1, 8, 128), (1, 2, 256),
                                                  (2, 8, 48), (2, 14, 64), (1, 7, 48)])
def test_paged_decode_attention_matches_sdpa(kv_heads, heads, dim):
    kernel = cpu_kernels.load()
    torch.manual_seed(0)
    bs, blocks = 16, 64
    k = torch.randn(blocks, kv_heads, bs, dim)
    v = torch.randn(blocks, kv_heads, bs, dim)
    lens = torch.tensor([1, 15, 16, 17, 200, 511])
    q = torch.randn(len(lens), heads, dim)
    max_blocks = 32
    tables = torch.stack([torch.randperm(blocks)[:max_blocks] for _ in lens])  # scattered blocks
    out = kernel.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5)
    for s, n in enumerate(lens.tolist()):
        # The sequence's context, contiguous: [kv_heads, n, dim].
        ks = k[tables[s]].transpose(0, 1).flatten(1, 2)[:, :n]
        vs = v[tables[s]].transpose(0, 1).flatten(1, 2)[:, :n]
        ref = F.scaled_dot_product_attention(q[s][None, :, None], ks[None], vs[None], enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(out[s], ref, rtol=1e-5, atol=1e-5)


def test_prefill_with_past_merged_by_lse_equals_masked_attention():
    from lmbatch.engine.attention import _merged_past_and_causal

    torch.manual_seed(1)
    heads, kv_heads, dim, start, n = 8, 2, 16, 37, 21
    q = torch.randn(1, heads, n, dim)
    k_past, v_past = torch.randn(1, kv_heads, start, dim), torch.randn(1, kv_heads, start, dim)
    k, v = torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)
    mask = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
    ref = F.scaled_dot_product_attention(q, torch.cat([k_past, k], 2), torch.cat([v_past, v], 2),
                                         attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(_merged_past_and_causal(q, k_past, v_past, k, v, None), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 6, 17, 64])   # the tiled loop: 4-row blocks and 1-3 row tails
@pytest.mark.parametrize("features_in, features_out, bias", [(256, 130, False), (100, 5, True), (768, 257, True),
                                                            (512, 64, False), (1024, 3, True)])
def test_small_batch_linear_matches_linear(rows, features_in, features_out, bias):
    kernel = cpu_kernels.load()
    torch.manual_seed(2)
    x = torch.randn(rows, features_in)
    w = torch.randn(features_in, features_out).t() if features_out == 130 else torch.randn(features_out, features_in)
    b = torch.randn(features_out) if bias else None
    torch.testing.assert_close(kernel.small_batch_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


class CountingKernels:
    """The real compiled module, counting the rows of each small_batch_linear call."""

    def __init__(self):
        self.real, self.calls = cpu_kernels.load(), []

    def small_batch_linear(self, x, w, b):
        self.calls.append(x.shape[0])
        return self.real.small_batch_linear(x, w, b)

    def packed_linear(self, x, packed, b, n):
        self.calls.append(x.shape[0])
        return self.real.packed_linear(x, packed, b, n)

    def packed_linear_dtypes(self):
        return self.real.packed_linear_dtypes()


class Doubled(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_install_routes_few_rows_to_the_kernel_and_keeps_results(monkeypatch):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32, bias=False),
                                Doubled(32, 8), torch.nn.Linear(8, 4).double())
    counting = CountingKernels()
    monkeypatch.setattr(cpu_kernels, "load", lambda: counting)
    rows = small_batch_linear.packed_max_rows(torch.float32) if "float32" in counting.packed_linear_dtypes() \
        else small_batch_linear.MAX_ROWS   # AVX-512: the packed kernel; else the AVX2 one
    few, many = torch.randn(1, 4, 64), torch.randn(1, rows + 1, 64)
    keys = list(model.state_dict())
    with torch.inference_mode():
        ref_few, ref_many = model[:4](few), model[:4](many)

    # Plain float32 Linears only: the subclass with its own forward and the float64 one stay.
    assert small_batch_linear.install(model) == 2
    assert model[0].max_rows == rows
    assert [type(m).__name__ for m in model] == ["SmallBatchLinear", "SiLU", "SmallBatchLinear", "Doubled", "Linear"]
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(model[:4](few), ref_few, rtol=1e-5, atol=1e-5)
        assert counting.calls == [4, 4]
        torch.testing.assert_close(model[:4](many), ref_many)
        assert counting.calls == [4, 4]  # more rows than MAX_ROWS: torch's GEMM
    model[:4](few)  # grad mode: torch (the kernel has no autograd)
    assert counting.calls == [4, 4]


@pytest.mark.parametrize("vendor, flags, bf16_rows, float32_rows", [
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, small_batch_linear.MAX_ROWS_PACKED,
     small_batch_linear.MAX_ROWS_PACKED),
    ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_bf16"}, small_batch_linear.MAX_ROWS_PACKED_BF16_AMX,
     small_batch_linear.MAX_ROWS_PACKED_FLOAT32_INTEL),
    ("GenuineIntel", {"avx512f", "avx512_bf16"}, small_batch_linear.MAX_ROWS_PACKED,
     small_batch_linear.MAX_ROWS_PACKED_FLOAT32_INTEL),
])
def test_the_packed_kernel_leaves_large_inputs_to_the_gemm_that_wins_on_this_cpu(monkeypatch, vendor, flags,
                                                                                  bf16_rows, float32_rows):
    """oneDNN's AMX GEMM (bf16) and MKL (float32, Intel) overtake the packed kernel past a few rows
    there; on AMD the packed kernel took every size measured."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(flags))
    assert small_batch_linear.packed_max_rows(torch.bfloat16) == bf16_rows
    assert small_batch_linear.packed_max_rows(torch.float32) == float32_rows


def test_a_copy_of_an_installed_model_computes_with_its_own_weights():
    import copy

    layer = torch.nn.Linear(16, 8)
    small_batch_linear.install(layer)
    twin = copy.deepcopy(layer)
    torch.nn.init.zeros_(twin.weight)
    torch.nn.init.zeros_(twin.bias)
    with torch.inference_mode():
        x = torch.randn(2, 16)
        assert torch.count_nonzero(twin(x)) == 0
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_kernels_refuse_inputs_they_would_read_out_of_bounds():
    kernel = cpu_kernels.load()
    q, pool = torch.randn(2, 8, 32), torch.randn(10, 4, 16, 32)
    tables = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(RuntimeError, match="context length 0"):
        kernel.paged_decode_attention(q, pool, pool, tables, torch.tensor([0, 5]), 0.1)
    with pytest.raises(RuntimeError, match="context length 33"):
        kernel.paged_decode_attention(q, pool, pool, tables, torch.tensor([33, 5]), 0.1)
    with pytest.raises(RuntimeError, match="block id 40"):
        kernel.paged_decode_attention(q, pool, pool, torch.tensor([[1, 2], [3, 40]]), torch.tensor([3, 5]), 0.1)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernel.small_batch_linear(torch.randn(2, 0), torch.randn(3, 0), None)
