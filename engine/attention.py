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
    q_start: int                      # offset of the chunk's first query token in the step
    q_len: int
    past_slots: torch.Tensor | None   # [start] slots of the context before the chunk; None at position 0
    mask: torch.Tensor | None         # [q_len, start + q_len] bool; None at position 0 (plain causal)


@dataclass
class DecodeGroup:
    q_index: torch.Tensor                 # [S] offsets of the query tokens in the step
    kv_slots: torch.Tensor | None = None  # [S, L] padded context slots (PyTorch path)
    mask: torch.Tensor | None = None      # [S, 1, 1, L] bool, True where a slot is in the context
    block_tables: torch.Tensor | None = None  # [S, max_blocks] (native kernel path)
    context_lens: torch.Tensor | None = None  # [S]
    kernel: object | None = None          # the compiled module, when this group uses it
    block_size: int = 16


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                     # [T] where each new token's K/V go
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K and V, [num_slots, kv_heads, D]
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[DecodeGroup] = field(default_factory=list)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    meta: AttentionMetadata = kwargs["lmbatch_meta"]
    k_cache, v_cache = meta.kv_cache[module.layer_idx]
    # [1, kv_heads, T, D] -> [T, kv_heads, D]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))

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
    if chunk.past_slots is not None:
        k = torch.cat([k_cache[chunk.past_slots].transpose(0, 1).unsqueeze(0), k], dim=2)
        v = torch.cat([v_cache[chunk.past_slots].transpose(0, 1).unsqueeze(0), v], dim=2)
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                       scale=scaling, enable_gqa=True)
    out[chunk.q_start:chunk.q_start + chunk.q_len] = o[0].transpose(0, 1)


def _decode(out, q, k_cache, v_cache, group: DecodeGroup, scaling):
    if group.kernel is not None:
        qs = q[:, group.q_index].transpose(0, 1)                           # [S, H, D]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        out[group.q_index] = group.kernel.paged_decode_attention(
            qs, k_cache, v_cache, group.block_tables, group.context_lens, group.block_size, scale)
        return
    qs = q[:, group.q_index].transpose(0, 1).unsqueeze(2)                  # [S, H, 1, D]
    k = k_cache[group.kv_slots].transpose(1, 2)                            # [S, KVH, L, D]
    v = v_cache[group.kv_slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=True)
    out[group.q_index] = o.squeeze(2)


def register() -> str:
    """Register the function with transformers (idempotent); returns the attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
