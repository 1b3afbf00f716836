"""The Triton paged attention kernel against a float64 PyTorch reference, on random pools and tables.

On a machine without CUDA the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it before
triton loads), so CI checks the same kernel source the GPU compiles.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmbatch.engine import varlen_inputs

triton_attention = pytest.importorskip("lmbatch.engine.triton_attention")

BLOCK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pool_and_tables(seq_lens, kv_heads, dim, gen, dtype=torch.float32):
    """A pool with random contents; each sequence's blocks are scattered at random over it."""
    need = [math.ceil(n / BLOCK) for n in seq_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, kv_heads, BLOCK, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, BLOCK, dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.long)
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(order[:n])
        order = order[n:]
    return k_cache, v_cache, tables


def reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale, window=None, softcap=None):
    """float64 attention of each sequence's queries (its last q_len positions) over its context."""
    out = torch.empty(q.shape, dtype=torch.float64)
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    start = 0
    for s, (n_ctx, n_q) in enumerate(zip(seq_lens, q_lens)):
        blocks = tables[s, : math.ceil(n_ctx / BLOCK)]
        k = k_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :n_ctx].double()    # [KVH, L, D]
        v = v_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :n_ctx].double()
        k = k.repeat_interleave(heads // kv_heads, 0)
        v = v.repeat_interleave(heads // kv_heads, 0)
        qs = q[start:start + n_q].double().transpose(0, 1)                         # [H, n, D]
        scores = qs @ k.transpose(1, 2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(n_ctx - n_q, n_ctx)[:, None]
        k_pos = torch.arange(n_ctx)[None, :]
        seen = k_pos <= q_pos
        if window:
            seen &= k_pos > q_pos - window
        scores = scores.masked_fill(~seen, float("-inf"))
        out[start:start + n_q] = (scores.softmax(-1) @ v).transpose(0, 1)
        start += n_q
    return out


def _batch(seq_lens, q_lens, tables, group, segments):
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    tile_seq, tile_q0 = varlen_inputs.plan_tiles(q_lens, group)
    return varlen_inputs.VarlenBatch(cu_q.to(DEVICE), torch.tensor(seq_lens).to(DEVICE), tables.to(DEVICE),
                                        torch.tensor(tile_seq).to(DEVICE), torch.tensor(tile_q0).to(DEVICE),
                                        num_segments=segments)


CASES = {
    # (seq_lens, q_lens): decode-only, contexts across block boundaries, lengths 1 and "max" (many blocks)
    "decode": ([1, 15, 16, 17, 33, 200], [1, 1, 1, 1, 1, 1]),
    "prefill": ([1, 16, 40], [1, 16, 40]),
    "chunk-with-past": ([37, 64, 90], [5, 16, 21]),
    "mixed": ([1, 50, 17, 129, 31], [1, 1, 17, 9, 1]),
}


@pytest.mark.parametrize("case,segments", [(c, 1) for c in sorted(CASES)] + [("decode", 4), ("mixed", 4)])
# head dims 64 and 128; GQA groups 1, 4, 7 (Qwen2-0.5B: 14 heads over 2) and 8
@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 8, 8), (64, 8, 2), (128, 8, 1), (64, 14, 2)])
def test_kernel_matches_float64_reference(case, dim, heads, kv_heads, segments):
    seq_lens, q_lens = CASES[case]
    gen = torch.Generator().manual_seed(hash((case, dim, heads, kv_heads)) & 0xFFFF)
    k_cache, v_cache, tables = _pool_and_tables(seq_lens, kv_heads, dim, gen)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    scale = dim ** -0.5
    batch = _batch(seq_lens, q_lens, tables, heads // kv_heads, segments)
    got = triton_attention.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), batch, scale)
    want = reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("keys", [16, 32, 128])
@pytest.mark.parametrize("case,segments", [("mixed", 1), ("decode", 4), ("mixed", 3)])
def test_keys_per_iteration_never_reads_a_key_twice_or_past_its_segment(keys, case, segments):
    # 3 segments of a 9-block context end mid-iteration: a key of the next segment must stay masked
    seq_lens, q_lens = CASES[case]
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, tables = _pool_and_tables(seq_lens, 2, 64, gen)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen)
    batch = _batch(seq_lens, q_lens, tables, 4, segments)
    got = triton_attention.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), batch, 0.125,
                                           keys_per_iteration=keys)
    want = reference(q, k_cache, v_cache, tables, seq_lens, q_lens, 0.125)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window,softcap", [(8, None), (None, 5.0), (20, 30.0)])
def test_kernel_window_and_softcap(window, softcap):
    seq_lens, q_lens = CASES["mixed"]
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, tables = _pool_and_tables(seq_lens, 2, 64, gen)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen) * 3   # large scores: the cap bites
    batch = _batch(seq_lens, q_lens, tables, 4, 2)
    got = triton_attention.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), batch, 0.125,
                                           window=window, softcap=softcap)
    want = reference(q, k_cache, v_cache, tables, seq_lens, q_lens, 0.125, window, softcap)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4)
    plain = reference(q, k_cache, v_cache, tables, seq_lens, q_lens, 0.125)
    assert (plain - want).abs().max() > 1e-2   # the variant changes the result: the test can tell


def test_kernel_bf16_within_bf16_rounding():
    seq_lens, q_lens = CASES["mixed"]
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, tables = _pool_and_tables(seq_lens, 2, 64, gen, dtype=torch.bfloat16)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).to(torch.bfloat16)
    batch = _batch(seq_lens, q_lens, tables, 4, 1)
    got = triton_attention.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), batch, 0.125)
    want = reference(q, k_cache, v_cache, tables, seq_lens, q_lens, 0.125)
    # bf16 keeps 8 mantissa bits: P is rounded to bf16 before P @ V, outputs are O(1).
    assert got.dtype == torch.bfloat16
    assert (got.cpu().double() - want).abs().max() < 3e-2


def test_wrong_table_is_detected():
    """A guard on the reference itself: a kernel reading the wrong blocks would not pass."""
    seq_lens, q_lens = CASES["decode"]
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, tables = _pool_and_tables(seq_lens, 2, 64, gen)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen)
    batch = _batch(seq_lens, q_lens, tables.roll(1, dims=1), 4, 1)
    got = triton_attention.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), batch, 0.125)
    want = reference(q, k_cache, v_cache, tables, seq_lens, q_lens, 0.125)
    assert (got.cpu().double() - want).abs().max() > 1e-2


def test_tiles_cover_every_query_once():
    for group in (1, 2, 4, 7, 8, 32):
        q_lens = [1, 3, 17, 40, 1]
        tile_seq, tile_q0 = varlen_inputs.plan_tiles(q_lens, group)
        per_tile = varlen_inputs.tile_queries(group)
        assert per_tile * group <= max(16, group) * 2
        covered = sorted((s, q0 + i) for s, q0 in zip(tile_seq, tile_q0) for i in range(per_tile)
                         if q0 + i < q_lens[s])
        assert covered == [(s, i) for s, n in enumerate(q_lens) for i in range(n)]


def test_segments_only_when_the_grid_is_small_and_contexts_long():
    assert varlen_inputs.choose_segments(num_tiles=512, kv_heads=8, max_blocks=4096, num_sms=132) == 1
    assert varlen_inputs.choose_segments(num_tiles=4, kv_heads=8, max_blocks=8, num_sms=132) == 1
    assert varlen_inputs.choose_segments(num_tiles=4, kv_heads=8, max_blocks=256, num_sms=132) == 16
    assert varlen_inputs.choose_segments(num_tiles=4, kv_heads=8, max_blocks=64, num_sms=132) == 4
