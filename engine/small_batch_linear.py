"""Routes the linear layers of a CPU float32 model to the native small-batch kernel for few rows.

A decode step feeds each linear layer one row per decoding sequence. At that size the layer is
bound by reading its weight, and MKL's sgemm reads it at 3-10 GB/s (it packs the weight for a
blocked GEMM that small inputs never amortize); the kernel streams it once (csrc/
small_batch_linear.cpp). Inputs of more rows (prefill) stay on torch's GEMM, the rate the
benchmark's FLOP floor is measured with.

`install` turns plain nn.Linear modules into SmallBatchLinear in place (a class swap, as
torch.ao's module swaps do): the weights and state dict stay as they are, copies of the model
stay correct, and subclasses of nn.Linear with a forward of their own are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels

MAX_ROWS = 128  # register-tiled: 1.56x MKL at 128 rows, 1.12x at 256 (bench.small_linear, AMD EPYC AVX2)


class SmallBatchLinear(torch.nn.Linear):
    """An nn.Linear whose inference forward uses the native kernel for at most `max_rows` rows."""

    max_rows: int = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        kernels = cpu_kernels.load() if self._kernel_applies(x, rows) else None
        if kernels is None:
            return F.linear(x, self.weight, self.bias)
        y = kernels.small_batch_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _kernel_applies(self, x: torch.Tensor, rows: int) -> bool:
        # The kernel has no autograd and ignores autocast: both fall back to torch.
        return (0 < rows <= self.max_rows and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def install(model: torch.nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Swap every eligible nn.Linear of `model` to SmallBatchLinear; returns how many."""
    count = 0
    for module in model.modules():
        if _eligible(module):
            module.__class__ = SmallBatchLinear
            module.max_rows = max_rows
            count += 1
    return count


def _eligible(module: torch.nn.Module) -> bool:
    # Exactly nn.Linear: a subclass may compute something else in its forward.
    if type(module) is not torch.nn.Linear or module.in_features == 0:
        return False
    w = module.weight
    # A plain tensor: a quantized checkpoint's weights are tensor subclasses (torchao's Int8Tensor
    # reports float32 too) whose storage the kernel cannot read.
    plain = type(w) is torch.nn.Parameter and type(w.data) is torch.Tensor
    return plain and w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
