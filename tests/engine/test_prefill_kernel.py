"""The native bf16 prefill attention kernel (csrc/paged_prefill_attention.cpp) against a float64 reference.

Tolerance, and why: the kernel multiplies bf16 inputs exactly and sums in float32; it rounds the softmax
probabilities to bf16 before they weight the values (relative error <= 2^-9 each, so <= 2^-9 * max|v| on
an output) and rounds the output once (<= 2^-9 of it). Beyond that, float32 summation and the exp
polynomial (~2e-7) add ~1e-5 of max|v| at most. A wrong block, a wrong head or a causal edge off by one
key is off by O(|v|): the guard tests below show the bound catches them.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmbatch.engine import cpu_kernels

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.paged_prefill_attention_available(),
                                reason="the prefill kernel needs AVX512-BF16, which this CPU lacks (hardware)")


def _case(heads, kv_heads, dim, block_size, chunks, gap=3, seed=0, garbage=True):
    """Random bf16 queries and pool; chunks (start, q_len) with `gap` unrelated step rows between them and
    shuffled block tables. Slots no table covers, and slots past each chunk's last key, hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-(s + n) // block_size) for s, n in chunks]
    num_blocks = sum(widths) + 4
    k = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen).bfloat16()
    v = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen).bfloat16()
    order = torch.randperm(num_blocks, generator=gen)
    tables, q_starts, at, row = [], [], 0, gap
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for (start, n), w in zip(chunks, widths):
        blocks = order[at:at + w].tolist()
        at += w
        tables.append(blocks + [num_blocks - 1] * (max(widths) - w))
        for pos in range(start + n):
            written[blocks[pos // block_size], pos % block_size] = True
        q_starts.append(row)
        row += n + gap
    if garbage:
        k.permute(0, 2, 1, 3)[~written] = float("nan")
        v.permute(0, 2, 1, 3)[~written] = float("nan")
    # q as the engine passes it: a [T, H, D] view of a [H, T, D] tensor
    q = torch.randn(heads, row, dim, generator=gen).bfloat16().transpose(0, 1)
    return q, k, v, torch.tensor(tables), torch.tensor(q_starts), chunks


def _run(q, k, v, tables, q_starts, chunks):
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)     # rows outside the chunks must keep this
    kernels.paged_prefill_attention(q, k, v, tables, q_starts, torch.tensor([n for _, n in chunks]),
                                    torch.tensor([s for s, _ in chunks]), q.shape[-1] ** -0.5, out)
    return out


def _reference(q, k, v, tables, q_starts, chunks, see_ahead=0):
    """float64 causal attention of each chunk over its sequence's positions (see_ahead: a wrong edge)."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k.shape[1], k.shape[2]
    out = {}
    for c, (start, n) in enumerate(chunks):
        length = start + n
        blocks = tables[c, : -(-length // block_size)]
        keys = k[blocks].double().permute(1, 0, 2, 3).reshape(kv_heads, -1, dim)
        values = v[blocks].double().permute(1, 0, 2, 3).reshape(kv_heads, -1, dim)
        last = min(length + see_ahead, keys.shape[1])
        keys = keys[:, :last].repeat_interleave(heads // kv_heads, 0)
        values = values[:, :last].nan_to_num().repeat_interleave(heads // kv_heads, 0)
        rows = slice(int(q_starts[c]), int(q_starts[c]) + n)
        scores = q[rows].double().transpose(0, 1) @ keys.nan_to_num().transpose(1, 2) * dim ** -0.5
        visible = torch.arange(last)[None, :] <= torch.arange(start, length)[:, None] + see_ahead
        scores = scores.masked_fill(~visible, -math.inf)
        out[rows.start] = (rows, (scores.softmax(-1) @ values).transpose(0, 1))
    return out


def _excess(got, reference, v) -> float:
    """How far beyond the stated bound the kernel is (<= 0: within)."""
    vmax = float(v.nan_to_num().abs().max())
    worst = -math.inf
    for rows, exact in reference.values():
        bound = 2**-9 * (exact.abs() + vmax) + 1e-5 * vmax
        worst = max(worst, float(((got[rows].double() - exact).abs() - bound).max()))
    return worst


SHAPES = [  # heads, kv_heads, dim, block_size
    (14, 2, 64, 16),    # Qwen2-0.5B: GQA 7
    (32, 8, 64, 16),    # Llama-3.2-1B: GQA 4
    (8, 8, 128, 16),    # no GQA, head 128
    (4, 1, 128, 32),    # blocks of 32
]
CHUNKS = [
    [(0, 2)],                                  # a short prompt: one partial key step
    [(0, 37), (100, 20), (5, 2), (33, 70)],    # past context not on a block edge, chunks crossing blocks
    [(16, 16), (0, 16), (47, 1 + 16)],         # chunks on block edges
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_prefill_kernel_is_the_exact_attention_within_bf16_rounding(shape, chunks):
    q, k, v, tables, q_starts, chunks = _case(*shape, chunks, seed=len(chunks) * 10 + shape[0])
    got = _run(q, k, v, tables, q_starts, chunks)
    reference = _reference(q, k, v, tables, q_starts, chunks)
    assert torch.isfinite(got).all(), "a NaN in an unused pool slot leaked into the output"
    assert _excess(got, reference, v) <= 0
    covered = torch.zeros(q.shape[0], dtype=torch.bool)
    for rows, _ in reference.values():
        covered[rows] = True
    assert (got[~covered] == 7.0).all(), "rows outside the chunks were written"


def test_a_causal_edge_off_by_one_key_is_caught():
    """A guard on the bound: a reference that lets each query see one key ahead differs by far more."""
    q, k, v, tables, q_starts, chunks = _case(14, 2, 64, 16, [(0, 37), (33, 40)], garbage=False)
    got = _run(q, k, v, tables, q_starts, chunks)
    assert _excess(got, _reference(q, k, v, tables, q_starts, chunks), v) <= 0
    assert _excess(got, _reference(q, k, v, tables, q_starts, chunks, see_ahead=1), v) > 0.1


def test_a_block_outside_the_pool_is_refused():
    q, k, v, tables, q_starts, chunks = _case(4, 1, 64, 16, [(0, 20)], garbage=False)
    tables[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="outside the pool"):
        _run(q, k, v, tables, q_starts, chunks)
