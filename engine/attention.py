"""Paged attention for stock transformers models, registered with transformers' AttentionInterface.

A step's tokens from all sequences arrive as one ragged batch ([1, heads, T, head_dim], no
padding). For each layer the function first writes the step's K/V into the paged pool, then reads
every sequence's whole context back through its block table:

- prefill chunks (several query tokens of one sequence) attend causally to their context, one
  scaled-dot-product call per chunk;
- decode tokens (one query token each) are batched. On the CPU in float32 a native kernel
  (cpu_kernels.py) reads their contexts straight from the pool through the block tables.
  Elsewhere their contexts are gathered into a padded [S, kv_heads, L, head_dim] tensor with a
  length mask; sequences are sorted by context length and grouped so that padding stays small.

Writing before reading means a sequence may use blocks that another sequence of the same step fills.
The per-step index tensors are built once (AttentionMetadata) and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_NAME = "lmbatch_paged"


@dataclass
class PrefillChunk:
    q_start: int                       # offset of the chunk's first query token in the step
    q_len: int
    start: int = 0                     # tokens of the sequence before the chunk (already in the pool)
    past_blocks: torch.Tensor | None = None  # [ceil(start / block_size)] blocks holding them
    # [q_len, start + q_len] bool for a chunk with past context on CUDA; None at position 0 (plain
    # causal) and on the CPU, where the past and the chunk are attended separately and merged.
    mask: torch.Tensor | None = None


@dataclass
class DecodeGroup:
    q_index: torch.Tensor              # [S] offsets of the query tokens in the step
    block_tables: torch.Tensor         # [S, max_blocks]
    context_lens: torch.Tensor         # [S]
    mask: torch.Tensor | None = None   # [S, 1, 1, L] bool for the padded PyTorch path
    kernel: object | None = None       # the compiled module, when this group uses it


@dataclass
class AttentionMetadata:
    # The pool is [num_blocks, kv_heads, block_size, head_dim] per layer for K and for V (vLLM's
    # layout): one (block, KV head) is a contiguous run, what the decode kernel streams.
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]
    write_index: torch.Tensor          # [kv_heads * T] rows of the flat pool for the step's K/V, head-major
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[DecodeGroup] = field(default_factory=list)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    meta: AttentionMetadata = kwargs["lmbatch_meta"]
    k_cache, v_cache = meta.kv_cache[module.layer_idx]
    dim = key.shape[-1]
    # key[0] is [kv_heads, T, D]: head-major rows, as write_index is laid out.
    k_cache.view(-1, dim).index_copy_(0, meta.write_index, key[0].reshape(-1, dim))
    v_cache.view(-1, dim).index_copy_(0, meta.write_index, value[0].reshape(-1, dim))

    q = query[0]                                   # [heads, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)
    for chunk in meta.prefills:
        _prefill(out, q, key, value, k_cache, v_cache, chunk, scaling)
    for group in meta.decodes:
        _decode(out, q, k_cache, v_cache, group, scaling)
    return out.unsqueeze(0), None                   # [1, T, heads, D]


def _prefill(out, q, key, value, k_cache, v_cache, chunk: PrefillChunk, scaling):
    span = slice(chunk.q_start, chunk.q_start + chunk.q_len)
    qs = q[:, span].unsqueeze(0)                                           # [1, H, n, D]
    # The chunk's own K/V are at hand; only the context before it comes from the pool.
    k, v = key[:, :, span], value[:, :, span]                              # [1, KVH, n, D]
    if chunk.past_blocks is None:
        o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        k_past = _gather(k_cache, chunk.past_blocks, chunk.start).unsqueeze(0)
        v_past = _gather(v_cache, chunk.past_blocks, chunk.start).unsqueeze(0)
        if chunk.mask is None:
            o = _merged_past_and_causal(qs, k_past, v_past, k, v, scaling)
        else:
            o = F.scaled_dot_product_attention(qs, torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2),
                                               attn_mask=chunk.mask, scale=scaling, enable_gqa=True)
    out[span] = o[0].transpose(0, 1)


def _merged_past_and_causal(q, k_past, v_past, k, v, scaling):
    """Attention over [past | chunk] with the chunk causal, as two unmasked kernels merged by LSE.

    On the CPU a masked SDPA runs about 1.3x slower than these two calls: the flash kernel skips
    the masked half only when the causal structure is given as is_causal.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    groups = q.shape[1] // k.shape[1]  # the kernel wants as many K/V heads as query heads
    o1, lse1 = flash(q, k_past.repeat_interleave(groups, 1), v_past.repeat_interleave(groups, 1),
                     0.0, False, scale=scaling)
    o2, lse2 = flash(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.0, True,
                     scale=scaling)
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse).unsqueeze(-1) + o2 * torch.exp(lse2 - lse).unsqueeze(-1)


def _decode(out, q, k_cache, v_cache, group: DecodeGroup, scaling):
    if group.kernel is not None:
        qs = q[:, group.q_index].transpose(0, 1)                           # [S, H, D]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        out[group.q_index] = group.kernel.paged_decode_attention(
            qs, k_cache, v_cache, group.block_tables, group.context_lens, scale)
        return
    qs = q[:, group.q_index].transpose(0, 1).unsqueeze(2)                  # [S, H, 1, D]
    length = group.mask.shape[-1]
    k = _gather(k_cache, group.block_tables, length)                       # [S, KVH, L, D]
    v = _gather(v_cache, group.block_tables, length)
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=True)
    out[group.q_index] = o.squeeze(2)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens held by `blocks` ([..., n]) as [..., kv_heads, length, D]."""
    x = cache[blocks]                                  # [..., n, KVH, bs, D]
    x = x.transpose(-4, -3)                            # [..., KVH, n, bs, D]
    return x.flatten(-3, -2)[..., :length, :]


def register() -> str:
    """Register the function with transformers (idempotent); returns the attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
