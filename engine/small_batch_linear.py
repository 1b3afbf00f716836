"""Routes the linear layers of a CPU float32 model to the native small-batch kernel for few rows.

A decode step feeds each linear layer one row per decoding sequence. At that size the layer is
bound by reading its weight, and MKL's sgemm reads it at 3-10 GB/s (it packs the weight for a
blocked GEMM that small inputs never amortize); the kernel streams it once (csrc/
small_batch_linear.cpp). Prefill steps (hundreds of rows or more) stay on torch's GEMM, which is
what the benchmark's FLOP floor is measured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 64  # the kernel was faster than MKL at every size up to 256 rows measured; keep a margin


def install(model: torch.nn.Module, kernels, max_rows: int = MAX_ROWS) -> int:
    """Give every float32 nn.Linear of `model` a forward that uses `kernels` for <= max_rows rows."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            module.forward = _small_batch_forward(module, kernels, max_rows)
            count += 1
    return count


def _small_batch_forward(module: torch.nn.Linear, kernels, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > max_rows or x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, module.weight, module.bias)
        y = kernels.small_batch_linear(x.reshape(rows, x.shape[-1]), module.weight, module.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    return forward
