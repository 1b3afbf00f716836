"""Routes the linear layers of a CPU model to the native small-batch kernels for few rows.

A decode step feeds each linear layer one row per decoding sequence. At that size the layer is
bound by reading its weight, and MKL's sgemm reads it at 3-10 GB/s, oneDNN's bf16 GEMM at ~15 where
the machine streams ~70 (both pack the weight for a blocked GEMM that small inputs never amortize);
the kernels stream it once: csrc/small_batch_linear.cpp in float32, csrc/small_batch_linear_bf16.cpp
in bfloat16 on CPUs with AVX512-BF16. Inputs of more rows (prefill) stay on torch's GEMM, the rate
the benchmark's FLOP floor is measured with.

`install` turns plain nn.Linear modules into SmallBatchLinear in place (a class swap, as
torch.ao's module swaps do): the weights and state dict stay as they are, copies of the model
stay correct, and subclasses of nn.Linear with a forward of their own are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels

MAX_ROWS = 128  # register-tiled: 1.56x MKL at 128 rows, 1.12x at 256 (bench.small_linear, AMD EPYC AVX2)
MAX_ROWS_BF16 = 32   # AVX512-BF16 tiles vs oneDNN: see bench.small_linear (measured in bench/NOTES.md)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class SmallBatchLinear(torch.nn.Linear):
    """An nn.Linear whose inference forward uses the native kernel for at most `max_rows` rows."""

    max_rows: int = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        kernels = cpu_kernels.load() if self._kernel_applies(x, rows) else None
        if kernels is None:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, x.shape[-1])
        if x.dtype == torch.float32:
            y = kernels.small_batch_linear(x2, self.weight, self.bias)
        else:
            y = kernels.small_batch_linear_bf16(x2, self._packed(), self.bias, self.out_features)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _packed(self) -> torch.Tensor:
        # Packed again if the weight changed since (in place, or a copy of the module with its own).
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_packed_key", None) != key:
            self.packed_weight = pack_bf16(self.weight.detach())
            self._packed_key = key
        return self.packed_weight

    def _kernel_applies(self, x: torch.Tensor, rows: int) -> bool:
        # The kernel has no autograd and ignores autocast: both fall back to torch.
        return (0 < rows <= self.max_rows and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes this machine's kernels take: bf16 only where they were built with AVX512-BF16."""
    kernels = cpu_kernels.load()
    if kernels is None:
        return ()
    return KERNEL_DTYPES if kernels.bf16_dot_available() else (torch.float32,)


def install(model: torch.nn.Module, max_rows: int | None = None) -> int:
    """Swap every eligible nn.Linear of `model` to SmallBatchLinear; returns how many."""
    dtypes = kernel_dtypes()
    count = 0
    for module in model.modules():
        if _eligible(module, dtypes):
            module.__class__ = SmallBatchLinear
            module.max_rows = max_rows or (MAX_ROWS if module.weight.dtype == torch.float32 else MAX_ROWS_BF16)
            if module.weight.dtype == torch.bfloat16:   # packed now, not at the first step; no state dict entry
                module.register_buffer("packed_weight", None, persistent=False)
                module._packed()
            count += 1
    return count


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K/2, 16, 2]: 64 bytes hold two k of 16 features, VDPBF16PS's operand.

    Done once at load; the original weight stays for the rows the kernel does not take (prefill).
    """
    n, k = w.shape
    padded = torch.nn.functional.pad(w, (0, 0, 0, -n % 16))
    return padded.view(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def _eligible(module: torch.nn.Module, dtypes: tuple[torch.dtype, ...]) -> bool:
    # Exactly nn.Linear: a subclass may compute something else in its forward.
    if type(module) is not torch.nn.Linear or module.in_features == 0:
        return False
    w = module.weight
    # A plain tensor: a quantized checkpoint's weights are tensor subclasses (torchao's Int8Tensor
    # reports float32 too) whose storage the kernel cannot read.
    plain = type(w) is torch.nn.Parameter and type(w.data) is torch.Tensor
    even = w.dtype == torch.float32 or w.shape[1] % 2 == 0   # bf16 packs k in pairs
    return plain and w.dtype in dtypes and w.device.type == "cpu" and w.is_contiguous() and even
