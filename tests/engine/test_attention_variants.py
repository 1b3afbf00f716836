"""Sliding windows, soft-capping and sinks in every attention path, against a float64 eager reference.

The reference is transformers' eager formulation written out densely (full score matrix, mask,
softmax with the sink column), in float64; the engine's paths are the native decode kernel, the
padded PyTorch decode path and the tiled prefill (with and without past context).
"""

from __future__ import annotations

import pytest
import torch

from lmbatch.engine import cpu_kernels
from lmbatch.engine.attention import DecodeGroup, _decode
from lmbatch.engine.attention_variants import Variant, attend

VARIANTS = {
    "window": dict(window=24),
    "window_in_block": dict(window=5),
    "softcap": dict(softcap=0.5),
    "sinks": dict(sinks=True),
    "all": dict(window=20, softcap=2.0, sinks=True),
}


def make_variant(heads: int, window=None, softcap=None, sinks=False) -> Variant:
    return Variant(window, softcap, torch.randn(heads) * 2 if sinks else None)


def reference(q, k, v, q_pos, variant: Variant, scale):
    """q [H, n, D] at positions q_pos [n]; k, v [KVH, L, D] at positions 0 .. L-1. Float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = q @ k.transpose(1, 2) * scale
    if variant.softcap:
        scores = torch.tanh(scores / variant.softcap) * variant.softcap
    j = torch.arange(k.shape[1])[None, :]
    visible = j <= q_pos[:, None]
    if variant.window:
        visible &= j > q_pos[:, None] - variant.window
    scores = scores.masked_fill(~visible, float("-inf"))
    if variant.sinks is not None:
        sink = variant.sinks.double()[:, None, None].expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ v).transpose(0, 1).float()        # [n, H, D]


def random_pool(kv_heads, dim, blocks=64, bs=16, seed=0):
    torch.manual_seed(seed)
    return torch.randn(blocks, kv_heads, bs, dim), torch.randn(blocks, kv_heads, bs, dim)


def context(cache, table, n):
    """A sequence's first n tokens out of the pool, contiguous: [KVH, n, D]."""
    return cache[table].transpose(0, 1).flatten(1, 2)[:, :n]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("kv_heads, heads, dim", [(2, 8, 32), (1, 7, 64), (2, 4, 48)])
def test_decode_paths_match_reference(name, kv_heads, heads, dim):
    k_cache, v_cache = random_pool(kv_heads, dim)
    variant = make_variant(heads, **VARIANTS[name])
    lens = torch.tensor([1, 5, 16, 17, 25, 200, 511])
    tables = torch.stack([torch.randperm(64)[:32] for _ in lens])
    q = torch.randn(len(lens), heads, dim)
    scale = dim ** -0.5
    expected = torch.stack([reference(q[s][:, None], context(k_cache, tables[s], n), context(v_cache, tables[s], n),
                                      torch.tensor([n - 1]), variant, scale)[0] for s, n in enumerate(lens.tolist())])
    kernel = cpu_kernels.load()
    got = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, variant.window or 0,
                                        variant.softcap or 0.0, variant.sinks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    out = torch.empty(len(lens), heads, dim)
    group = DecodeGroup(torch.arange(len(lens)), tables, lens)
    _decode(out, q.transpose(0, 1), k_cache, v_cache, group, scale, variant, block_size=16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("start, n", [(0, 70), (0, 300), (37, 21), (100, 280)])
def test_prefill_matches_reference(name, start, n, monkeypatch):
    import lmbatch.engine.attention_variants as av

    monkeypatch.setattr(av, "QUERY_TILE", 64)   # several tiles at test lengths
    torch.manual_seed(1)
    heads, kv_heads, dim = 8, 2, 16
    variant = make_variant(heads, **VARIANTS[name])
    q = torch.randn(heads, n, dim)
    k, v = torch.randn(kv_heads, start + n, dim), torch.randn(kv_heads, start + n, dim)
    expected = reference(q, k, v, torch.arange(start, start + n), variant, 0.3)
    # The caller passes the keys from the first one the span's window reaches.
    k_pos0 = variant.first_key(start)
    got = attend(q, k[:, k_pos0:], v[:, k_pos0:], start, k_pos0, variant, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_window_skips_the_keys_outside_it():
    # Keys before the window are never read: poisoning them changes nothing.
    k_cache, v_cache = random_pool(2, 32)
    tables, lens = torch.arange(32)[None], torch.tensor([200])
    q = torch.randn(1, 4, 32)
    kernel = cpu_kernels.load()
    clean = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2, 24)
    k_cache[:10], v_cache[:10] = 1e4, 1e4           # blocks 0-9: tokens 0-159, before 200 - 24
    torch.testing.assert_close(kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2, 24), clean)
