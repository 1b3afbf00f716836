"""Attention variants of stock transformers models, as transformers' attention functions get them.

A layer's attention may differ from plain causal softmax attention in three ways, each passed by
the model to the registered attention function as a keyword argument:

- `sliding_window=W` (Mistral, Qwen2, Gemma 2/3, Cohere 2, gpt-oss, ...): query i sees keys j
  with i - W < j <= i (transformers' `sliding_window_overlay`);
- `softcap=c` (Gemma 2): scores become c * tanh(scores / c) before the softmax;
- `s_aux=sinks` (gpt-oss): one learned logit per query head joins the softmax's denominator
  as a key without a value.

`attend` computes attention with any of them over a span of query positions and a span of key
positions, in the eager formulation transformers uses, with the queries in tiles so that a window
bounds both the FLOPs and the score memory: a tile of queries reads only the keys its window
reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUERY_TILE = 256  # queries per score matrix: bounds memory at long prompts


@dataclass(frozen=True)
class Variant:
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None   # [heads]

    @classmethod
    def of(cls, sliding_window=None, softcap=None, s_aux=None) -> Variant:
        window = int(sliding_window) if sliding_window else None
        return cls(window, float(softcap) if softcap else None, s_aux)

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None and self.sinks is None

    def acts_on(self, length: int) -> bool:
        """Whether attention over a context of `length` tokens differs from plain causal attention:
        a window only once the context is longer than it (then the fast plain paths serve)."""
        if self.softcap is not None or self.sinks is not None:
            return True
        return self.window is not None and length > self.window

    def first_key(self, query_pos: int) -> int:
        """The first key position that query position `query_pos` sees."""
        return 0 if self.window is None else max(0, query_pos - self.window + 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int, k_pos0: int,
           variant: Variant, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's queries at positions q_pos0 .. q_pos0 + n - 1.

    q [H, n, D]; k, v [KVH, L, D] hold the keys at positions k_pos0 .. k_pos0 + L - 1 (every key a
    query of the span may see, and none after the last query). Returns [n, H, D].
    """
    n = q.shape[1]
    out = torch.empty(n, q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)
    for a in range(0, n, QUERY_TILE):
        b = min(n, a + QUERY_TILE)
        lo = max(variant.first_key(q_pos0 + a) - k_pos0, 0)   # keys before lo: outside every window of the tile
        hi = q_pos0 + b - k_pos0                               # causal: no key after the tile's last query
        out[a:b] = _attend_tile(q[:, a:b], k[:, lo:hi], v[:, lo:hi], q_pos0 + a, k_pos0 + lo, variant, scale)
    return out


def _attend_tile(q, k, v, q_pos0, k_pos0, variant: Variant, scale):
    heads, n, dim = q.shape
    kv_heads, length, _ = k.shape
    groups = heads // kv_heads
    # GQA without repeating K/V: each KV head's query heads become rows of one matrix.
    qg = q.reshape(kv_heads, groups * n, dim)
    scores = torch.matmul(qg, k.transpose(1, 2)).float().mul_(scale).view(kv_heads, groups, n, length)
    q_pos = torch.arange(q_pos0, q_pos0 + n, device=q.device)[:, None]
    k_pos = torch.arange(k_pos0, k_pos0 + length, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if variant.window is not None:
        visible &= k_pos > q_pos - variant.window
    probs = _probs(scores, visible, variant, sink_shape=(kv_heads, groups, 1, 1))
    o = torch.matmul(probs.to(v.dtype).view(kv_heads, groups * n, length), v)   # [KVH, G*n, D]
    return o.view(heads, n, dim).transpose(0, 1)


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                  variant: Variant, scale: float) -> torch.Tensor:
    """One query per sequence over padded contexts: q [S, H, D], k/v [S, KVH, L, D], visible [S, L]."""
    seqs, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    qg = q.view(seqs, kv_heads, groups, dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)          # [S, KVH, G, L]
    probs = _probs(scores, visible[:, None, None, :], variant, sink_shape=(1, kv_heads, groups, 1))
    return torch.matmul(probs.to(v.dtype), v).view(seqs, heads, dim)


def _probs(scores: torch.Tensor, visible: torch.Tensor, variant: Variant, sink_shape) -> torch.Tensor:
    """Softmax over the visible keys of float32 scores, soft-capped first and with the sinks."""
    if variant.softcap is not None:
        scores = torch.tanh(scores / variant.softcap) * variant.softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    if variant.sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = variant.sinks.float().view(sink_shape).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
