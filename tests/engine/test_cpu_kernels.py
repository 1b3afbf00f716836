"""The native CPU decode-attention kernel against PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmbatch.engine import cpu_kernels


def test_kernel_builds_here():
    # CI machines have a C++ compiler: a silent fallback there would hide a broken kernel.
    assert cpu_kernels.load() is not None


def test_paged_decode_attention_matches_sdpa():
    kernel = cpu_kernels.load()
    torch.manual_seed(0)
    bs, blocks, kv_heads, heads, dim = 16, 64, 2, 8, 48
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
