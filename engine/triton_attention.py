"""Paged attention in Triton: every query token of a step, prefill and decode, in one launch.

The kernel reads K/V straight from the pool through the block tables (no gather, no padding) and
works on a ragged batch: sequence s owns the query tokens cu_q[s] .. cu_q[s + 1] of the step, which
sit at the last positions of its context of seq_lens[s] tokens (the step's K/V are written to the
pool before the kernel runs, so a chunk's own keys are read from the pool like its past).

One program takes a tile of one sequence's queries for one KV head: the rows of its score matrix are
(query, query head of the group) pairs, so the heads of a GQA group share each K/V load (vLLM's
unified attention packs the same way). Long contexts are split over blocks (split-K, the third grid
axis); each segment keeps its own running max and sum, and `merge_segments` combines them by
log-sum-exp. A sliding window and soft-capped scores are kernel arguments; attention sinks are not
(the layer takes the PyTorch path).

Float32 dots run in IEEE precision, not TF32: the float32 engine is greedy-exact against transformers.
On the CPU the kernel runs under TRITON_INTERPRET=1, which is how the tests check it (half-precision
inputs are upcast to float32 there: the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .varlen_inputs import MIN_TILE_ROWS, VarlenBatch, tile_queries

# Triton's interpreter computes half-precision dots wrongly (numpy has no bf16): it upcasts first.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KEYS_PER_ITERATION = 64   # keys each loop iteration reads (whole blocks); bench.gpu's kernel stage compares


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, m_ptr, l_ptr,
        block_tables_ptr, seq_lens_ptr, cu_q_ptr, tile_seq_ptr, tile_q0_ptr,
        scale, softcap, window,
        stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_bt,
        stride_ot, stride_oh, stride_os, stride_mt, stride_mh,
        GROUP: tl.constexpr, TILE_Q: tl.constexpr, TILE_ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_SEGMENTS: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, TILE_BLOCKS: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    past = seq_len - q_len                       # the tile's queries sit at positions past + i

    rows = tl.arange(0, TILE_ROWS)
    q_idx = q0 + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (q_idx < q_len) & (rows < TILE_Q * GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    token = q_begin + q_idx
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = past + q_idx

    # Keys this tile may see: up to its last query; with a window, from its first query's window on.
    last_q = tl.minimum(q0 + TILE_Q, q_len) - 1
    num_blocks = tl.cdiv(past + last_q + 1, BLOCK_SIZE)
    first_block = 0
    if USE_WINDOW:
        first_block = tl.maximum(past + q0 - window + 1, 0) // BLOCK_SIZE
    per_segment = tl.cdiv(num_blocks - first_block, NUM_SEGMENTS)
    b_start = first_block + segment * per_segment
    b_end = tl.minimum(b_start + per_segment, num_blocks)

    m_i = tl.full([TILE_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE_ROWS], tl.float32)
    acc = tl.zeros([TILE_ROWS, HEAD_DIM_PAD], tl.float32)
    # One iteration reads TILE_BLOCKS blocks: 16-key iterations leave an H200's memory system idle.
    offs = tl.arange(0, TILE_BLOCKS * BLOCK_SIZE)
    in_block = offs % BLOCK_SIZE
    for b in range(b_start, b_end, TILE_BLOCKS):
        block_idx = b + offs // BLOCK_SIZE
        key_ok = block_idx < b_end             # the segment's own blocks only (split-K counts each once)
        block = tl.load(block_tables_ptr + seq * stride_bt + block_idx, mask=key_ok, other=0).to(tl.int64)
        kv_off = block[:, None] * stride_kb + kv_head * stride_kh + in_block[:, None] * stride_ks + dims[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if USE_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)   # softcap * tanh(s / softcap)
        k_pos = b * BLOCK_SIZE + offs
        seen = (k_pos[None, :] <= q_pos[:, None]) & row_ok[:, None] & key_ok[None, :]
        if USE_WINDOW:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row that has seen no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = token[:, None] * stride_ot + head[:, None] * stride_oh + segment * stride_os + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if NUM_SEGMENTS > 1:
        ml_off = token * stride_mt + head * stride_mh + segment
        tl.store(m_ptr + ml_off, m_i, mask=row_ok)
        tl.store(l_ptr + ml_off, l_i, mask=row_ok)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: VarlenBatch,
                    scale: float, window: int | None = None, softcap: float | None = None,
                    keys_per_iteration: int = KEYS_PER_ITERATION) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; caches [blocks, kv_heads, block_size, D]."""
    tokens, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    per_tile = tile_queries(group)
    rows = max(MIN_TILE_ROWS, triton.next_power_of_2(per_tile * group))
    segments = batch.num_segments
    if segments == 1:
        out = torch.empty_like(q)
        o_view, m, sums = out.unsqueeze(2), out, out    # m and sums are not written with one segment
    else:
        o_view = torch.empty(tokens, heads, segments, dim, dtype=torch.float32, device=q.device)
        m = torch.empty(tokens, heads, segments, dtype=torch.float32, device=q.device)
        sums = torch.empty_like(m)
    grid = (batch.tile_seq.shape[0], kv_heads, segments)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, o_view, m, sums,
        batch.block_tables, batch.seq_lens, batch.cu_q, batch.tile_seq, batch.tile_q0,
        scale, softcap or 0.0, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        batch.block_tables.stride(0),
        o_view.stride(0), o_view.stride(1), o_view.stride(2), m.stride(0), m.stride(1),
        GROUP=group, TILE_Q=per_tile, TILE_ROWS=rows, HEAD_DIM=dim,
        HEAD_DIM_PAD=triton.next_power_of_2(dim), BLOCK_SIZE=block_size, NUM_SEGMENTS=segments,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None, IEEE=q.dtype == torch.float32,
        UPCAST=INTERPRETED and q.dtype != torch.float32, TILE_BLOCKS=max(1, keys_per_iteration // block_size))
    if segments == 1:
        return out
    return merge_segments(o_view, m, sums).to(q.dtype)


def merge_segments(o: torch.Tensor, m: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Combine split-K partials: o [T, H, S, D] (each normalised by its own sum), m, sums [T, H, S]."""
    top = m.amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(m - top) * sums                  # an empty segment: exp(-inf) * 0 = 0
    total = weight.sum(-1, keepdim=True)
    weight = weight / torch.where(total == 0, torch.ones_like(total), total)
    return (o * weight.unsqueeze(-1)).sum(2)


def supports(block_size: int, head_dim: int, sinks) -> str | None:
    """Why the kernel cannot take a layer (None when it can)."""
    if block_size < MIN_TILE_ROWS:
        return f"block_size {block_size} < {MIN_TILE_ROWS} (tl.dot needs 16-wide tiles)"
    if head_dim < 16:
        return f"head_dim {head_dim} < 16"
    if sinks is not None:
        return "attention sinks"
    return None
