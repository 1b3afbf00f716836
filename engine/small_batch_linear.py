"""Routes the linear layers of a CPU model to the native small-batch kernels for few rows.

A decode step feeds each linear layer one row per decoding sequence. At that size the layer is
bound by reading its weight, and MKL's sgemm reads it at 3-10 GB/s, oneDNN's bf16 GEMM at ~15 where
the machine streams ~70 (both pack the weight for a blocked GEMM that small inputs never amortize);
the kernels stream it once: on AVX-512 CPUs csrc/packed_linear.cpp, on a copy of the weight packed
at load (float32, and bfloat16 with AVX512-BF16); elsewhere csrc/small_batch_linear.cpp (float32,
AVX2), and inputs of more rows (prefill) stay on torch's GEMM.

`install` turns plain nn.Linear modules into SmallBatchLinear in place (a class swap, as
torch.ao's module swaps do): the weights and state dict stay as they are, copies of the model
stay correct, and subclasses of nn.Linear with a forward of their own are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels

MAX_ROWS = 128  # register-tiled: 1.56x MKL at 128 rows, 1.12x at 256 (bench.small_linear, AMD EPYC AVX2)
# The packed AVX-512 kernel's row limits, measured with bench.small_linear at the Llama-3.2-1B shapes:
# - AMD EPYC (Zen 5, AVX512-BF16): it beat oneDNN's bf16 GEMM and MKL's sgemm at every size
#   measured, 1 to 2048 rows: prefill chunks take it too.
MAX_ROWS_PACKED = 1 << 16
# - Intel Xeon (5th gen, AMX): the packed bf16 kernel peaks at ~60 GFLOP/s a core there, and oneDNN's
#   AMX tile GEMM overtakes it past 8 rows (packed 1.03x at 8 rows, 0.29x at 16);
MAX_ROWS_PACKED_BF16_AMX = 8
#   MKL's sgemm overtakes it in float32 past 32 rows (1.38x at 32, 0.87x at 64).
MAX_ROWS_PACKED_FLOAT32_INTEL = 32


class SmallBatchLinear(torch.nn.Linear):
    """An nn.Linear whose inference forward uses the native kernel for at most `max_rows` rows."""

    max_rows: int = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        kernels = cpu_kernels.load() if self._kernel_applies(x, rows) else None
        if kernels is None:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, x.shape[-1])
        if self.packed_weight is None:
            y = kernels.small_batch_linear(x2, self.weight, self.bias)
        else:
            y = kernels.packed_linear(x2, self._packed(), self.bias, self.out_features)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _packed(self) -> torch.Tensor:
        # Packed again if the weight changed since (in place, or a copy of the module with its own).
        key = _weight_key(self.weight)
        if getattr(self, "_packed_key", None) != key:
            self.packed_weight = pack(self.weight.detach())
            self._packed_key = key
        return self.packed_weight

    def _kernel_applies(self, x: torch.Tensor, rows: int) -> bool:
        # The kernel has no autograd and ignores autocast: both fall back to torch.
        return (0 < rows <= self.max_rows and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def _weight_key(w: torch.Tensor) -> tuple:
    try:
        return w.data_ptr(), w._version
    except RuntimeError:   # an inference tensor has no version counter (and cannot be changed in place)
        return w.data_ptr(), None


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes this machine's kernels take (bf16 only where they were built with AVX512-BF16)."""
    return (torch.float32,) + ((torch.bfloat16,) if torch.bfloat16 in packed_dtypes() else ())


def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes of the packed kernel here: float32 with AVX-512, bfloat16 with AVX512-BF16."""
    kernels = cpu_kernels.load()
    return tuple(getattr(torch, d) for d in kernels.packed_linear_dtypes()) if kernels is not None else ()


def install(model: torch.nn.Module, max_rows: int | None = None) -> int:
    """Swap every eligible nn.Linear of `model` to SmallBatchLinear; returns how many."""
    if cpu_kernels.load() is None:
        return 0
    dtypes, packed = kernel_dtypes(), packed_dtypes()
    count = 0
    for module in model.modules():
        if _eligible(module, dtypes):
            module.__class__ = SmallBatchLinear
            dtype = module.weight.dtype
            module.max_rows = max_rows or (packed_max_rows(dtype) if dtype in packed else MAX_ROWS)
            # The packed copy is derived from the weight: no state dict entry; packed now, not at the first step.
            module.register_buffer("packed_weight", None, persistent=False)
            if dtype in packed:
                module._packed()
            count += 1
    return count


def packed_max_rows(dtype: torch.dtype) -> int:
    """The most rows the packed kernel takes on this CPU; torch's GEMM takes more."""
    if dtype == torch.bfloat16 and "amx_bf16" in cpu_kernels.cpu_flags():
        return MAX_ROWS_PACKED_BF16_AMX
    if dtype == torch.float32 and cpu_kernels.cpu_vendor() == "GenuineIntel":
        return MAX_ROWS_PACKED_FLOAT32_INTEL
    return MAX_ROWS_PACKED


def pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K/P, 16, P]: one 64-byte row holds P consecutive k of 16 features (P = 2 in
    bf16, the pair VDPBF16PS multiplies; 1 in float32). Done once at load; the original weight stays
    for whatever the kernel does not take."""
    n, k = w.shape
    p = 2 if w.dtype == torch.bfloat16 else 1
    padded = torch.nn.functional.pad(w, (0, 0, 0, -n % 16))
    return padded.view(-1, 16, k // p, p).permute(0, 2, 1, 3).contiguous()


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
