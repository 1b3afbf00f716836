"""Paged attention for stock transformers models, registered with transformers' AttentionInterface.

A step's tokens from all sequences arrive as one ragged batch ([1, heads, T, head_dim], no
padding). For each layer the function first writes the step's K/V into the paged pool, then reads
every sequence's whole context back through its block table:

- prefill chunks (several query tokens of one sequence) attend causally to their context, one
  scaled-dot-product call per chunk; on a CPU with AVX512-BF16 in bf16, one native kernel call for
  all of a step's chunks instead (csrc/paged_prefill_attention.cpp), reading through the tables;
- decode tokens (one query token each) are batched. On the CPU in float32 a native kernel
  (cpu_kernels.py) reads their contexts straight from the pool through the block tables.
  Elsewhere their contexts are gathered into a padded [S, kv_heads, L, head_dim] tensor with a
  length mask; sequences are sorted by context length and grouped so that padding stays small.

Writing before reading means a sequence may use blocks that another sequence of the same step fills.
The per-step index tensors are built once (AttentionMetadata) and shared by all layers. The model
runner sets them for the step with `step_context` rather than passing them down as a keyword
argument: some families (StableLM) do not forward extra arguments from the model to its layers.

On CUDA (and under Triton's interpreter) the step instead goes as one ragged batch to the Triton
kernel (triton_attention.py), which reads prefill and decode contexts through the block tables; the
paths above are then the fallback (attention_backend.py).

A layer with a sliding window, soft-capped scores or attention sinks (attention_variants.py) takes
the eager formulation over only the keys its window reaches; the native decode kernel takes the
same three parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention_variants import Variant, attend, attend_padded

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
    windowed: dict = field(default_factory=dict)  # window -> (tables, visible [S, L]), PyTorch path


@dataclass
class PrefillBatch:
    """The step's prefill chunks for the native bf16 kernel, which reads every key (the chunk's own
    included) through the chunk's table: one call per layer for all of them."""
    kernel: object                     # the compiled module
    block_tables: torch.Tensor         # [C, max_blocks] blocks of positions 0 .. start + q_len
    q_starts: torch.Tensor             # [C]
    q_lens: torch.Tensor               # [C]
    starts: torch.Tensor               # [C]
    longest: int                       # the longest start + q_len: whether a window acts on any chunk


@dataclass
class AttentionMetadata:
    # The pool is [num_blocks, kv_heads, block_size, head_dim] per layer for K and for V (vLLM's
    # layout): one (block, KV head) is a contiguous run, what the decode kernel streams.
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]
    write_index: torch.Tensor          # [kv_heads * T] rows of the flat pool for the step's K/V, head-major
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefill_batch: PrefillBatch | None = None   # the same chunks, when the native bf16 kernel serves them
    # The Triton path: the whole step as one ragged batch read through the block tables (no
    # prefills/decodes lists then).
    varlen: object | None = None        # triton_attention.VarlenBatch
    block_size: int = 16
    # When a list, each call appends a LayerCall: what the load-time checks (model_check.py) read.
    trace: list | None = None


@dataclass(frozen=True)
class LayerCall:
    layer: int | None
    variant: Variant
    kv_heads: int
    head_dim: int


def probe_metadata(trace: list) -> AttentionMetadata:
    """Metadata of a forward pass that only records its calls (no pool yet): see model_check.py."""
    return AttentionMetadata(kv_cache=[], write_index=torch.empty(0, dtype=torch.long), trace=trace)


_current: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar("lmbatch_step", default=None)


@contextlib.contextmanager
def step_context(meta: AttentionMetadata):
    """Make `meta` the metadata of every paged attention call inside the block."""
    token = _current.set(meta)
    try:
        yield meta
    finally:
        _current.reset(token)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, s_aux=None, **kwargs):
    meta = _current.get()
    if meta is None:
        raise RuntimeError("lmbatch's paged attention was called outside an engine step")
    variant = Variant.of(sliding_window, softcap, s_aux)
    if meta.trace is not None:
        meta.trace.append(LayerCall(getattr(module, "layer_idx", None), variant, key.shape[1], key.shape[-1]))
        if not meta.kv_cache:  # a probe before the pool exists: the layer's output is not used
            return torch.zeros_like(query).transpose(1, 2), None
    k_cache, v_cache = meta.kv_cache[module.layer_idx]
    dim = key.shape[-1]
    # key[0] is [kv_heads, T, D]: head-major rows, as write_index is laid out.
    k_cache.view(-1, dim).index_copy_(0, meta.write_index, key[0].reshape(-1, dim))
    v_cache.view(-1, dim).index_copy_(0, meta.write_index, value[0].reshape(-1, dim))

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if meta.varlen is not None:
        from .triton_attention import paged_attention as triton_paged

        out = triton_paged(query[0].transpose(0, 1), k_cache, v_cache, meta.varlen, scale,
                           variant.window, variant.softcap)
        return out.unsqueeze(0), None               # [1, T, heads, D]
    q = query[0]                                   # [heads, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)
    prefills = meta.prefills
    if meta.prefill_batch is not None and not variant.acts_on(meta.prefill_batch.longest):
        b = meta.prefill_batch
        b.kernel.paged_prefill_attention(q.transpose(0, 1), k_cache, v_cache, b.block_tables, b.q_starts, b.q_lens,
                                         b.starts, scale, out)
        prefills = []
    for chunk in prefills:
        if variant.acts_on(chunk.start + chunk.q_len):
            _prefill_variant(out, q, key, value, k_cache, v_cache, chunk, scale, variant, meta.block_size)
        else:
            _prefill(out, q, key, value, k_cache, v_cache, chunk, scale)
    for group in meta.decodes:
        _decode(out, q, k_cache, v_cache, group, scale, variant, meta.block_size)
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
            # K/V repeated per query head: with a mask, enable_gqa would send CUDA to the math kernel.
            groups = q.shape[0] // k.shape[1]
            o = F.scaled_dot_product_attention(qs, torch.cat([k_past, k], dim=2).repeat_interleave(groups, 1),
                                               torch.cat([v_past, v], dim=2).repeat_interleave(groups, 1),
                                               attn_mask=chunk.mask, scale=scaling)
    out[span] = o[0].transpose(0, 1)


def _prefill_variant(out, q, key, value, k_cache, v_cache, chunk: PrefillChunk, scale, variant: Variant,
                     block_size: int):
    """A chunk of a layer with a variant: the past it reads starts at the block its window reaches."""
    span = slice(chunk.q_start, chunk.q_start + chunk.q_len)
    k, v = key[0, :, span], value[0, :, span]                              # [KVH, n, D]
    k_pos0 = chunk.start
    if chunk.past_blocks is not None and variant.first_key(chunk.start) < chunk.start:
        first_block = variant.first_key(chunk.start) // block_size
        k_pos0 = first_block * block_size
        blocks = chunk.past_blocks[first_block:]
        k = torch.cat([_gather(k_cache, blocks, chunk.start - k_pos0), k], dim=1)
        v = torch.cat([_gather(v_cache, blocks, chunk.start - k_pos0), v], dim=1)
    out[span] = attend(q[:, span], k, v, chunk.start, k_pos0, variant, scale)


def _merged_past_and_causal(q, k_past, v_past, k, v, scaling):
    """Attention over [past | chunk] with the chunk causal, as two unmasked kernels merged by LSE.

    On the CPU a masked SDPA runs about 1.3x slower than these two calls: the flash kernel skips
    the masked half only when the causal structure is given as is_causal.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads  # the kernel wants as many K/V heads as query heads
    # Every query sees the whole past (no mask), so a GQA group's heads fold into the query length and
    # the past K/V are read as they are, not copied once per query head (7 at Qwen2-0.5B). Memory, not
    # speed: labelling and mixed at that shape measured the same either way (bench/NOTES.md).
    o1, lse1 = flash(q.reshape(b, kv_heads, groups * n, dim), k_past, v_past, 0.0, False, scale=scaling)
    o1, lse1 = o1.reshape(b, heads, n, dim), lse1.reshape(b, heads, n)
    o2, lse2 = flash(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.0, True,
                     scale=scaling)
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse).unsqueeze(-1) + o2 * torch.exp(lse2 - lse).unsqueeze(-1)


def _decode(out, q, k_cache, v_cache, group: DecodeGroup, scaling, variant: Variant, block_size: int):
    if group.kernel is not None:
        qs = q[:, group.q_index].transpose(0, 1)                           # [S, H, D]
        out[group.q_index] = group.kernel.paged_decode_attention(
            qs, k_cache, v_cache, group.block_tables, group.context_lens, scaling,
            variant.window or 0, variant.softcap or 0.0, variant.sinks)
        return
    if variant.acts_on(int(group.context_lens.max())):
        tables, visible = _decode_window(group, variant.window, block_size)
        length = visible.shape[-1]
        k, v = _gather(k_cache, tables, length), _gather(v_cache, tables, length)
        out[group.q_index] = attend_padded(q[:, group.q_index].transpose(0, 1), k, v, visible, variant, scaling)
        return
    length = group.mask.shape[-1]
    k = _gather(k_cache, group.block_tables, length)                       # [S, KVH, L, D]
    v = _gather(v_cache, group.block_tables, length)
    # The query heads of a GQA group act as that K/V head's queries ([S, KVH, G, D]): a plain call
    # that CUDA's memory-efficient kernel takes, where a bool mask with enable_gqa falls to the math
    # kernel (upcast, K/V repeated per head, scores materialised).
    s, heads, dim = len(group.q_index), q.shape[0], q.shape[2]
    qs = q[:, group.q_index].transpose(0, 1).reshape(s, k.shape[1], heads // k.shape[1], dim)
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=group.mask, scale=scaling)
    out[group.q_index] = o.reshape(s, heads, dim)


def _decode_window(group: DecodeGroup, window: int | None, block_size: int):
    """Block tables that start at each sequence's first block inside the window, and the keys visible.

    Computed once per step and window; the tables of a window-less variant are the group's own.
    """
    if window in group.windowed:
        return group.windowed[window]
    lens = group.context_lens                                   # on the host
    first_key = (lens - window).clamp(min=0) if window else torch.zeros_like(lens)
    first_block = first_key // block_size
    n = int((-(-(lens - first_block * block_size) // block_size)).max())
    max_col = group.block_tables.shape[1] - 1
    cols = (first_block[:, None] + torch.arange(n)[None, :]).clamp(max=max_col)
    tables = group.block_tables.gather(1, cols.to(group.block_tables.device))
    key_pos = first_block[:, None] * block_size + torch.arange(n * block_size)[None, :]
    visible = (key_pos < lens[:, None]) & (key_pos >= first_key[:, None])
    group.windowed[window] = (tables, visible.to(group.block_tables.device))
    return group.windowed[window]


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
