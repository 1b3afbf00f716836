"""Which attention path a runner takes: the native CPU kernel, the Triton kernel, or PyTorch's SDPA.

- native: float32 or bfloat16 on the CPU (cpu_kernels.py), decode read through the block tables;
- triton: CUDA (or Triton's interpreter on the CPU, for the tests), prefill and decode read through
  the block tables in one launch (triton_attention.py);
- sdpa: everything else, and the fallback: contexts gathered into padded tensors, GQA-packed.

`auto` takes the fastest path the device, dtype and model allow. A backend asked for by name that
cannot run here is an error, not a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "native", "triton", "sdpa")
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def triton_usable(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on `device` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the device is {device.type} (the kernel runs there only under TRITON_INTERPRET=1)"
    return None


def choose(name: str, device: torch.device, dtype: torch.dtype, layout, block_size: int) -> str:
    if name == "auto":
        if device.type == "cpu":
            return "native" if dtype in NATIVE_DTYPES else "sdpa"
        return "triton" if _triton_problem(device, layout, block_size) is None else "sdpa"
    if name == "native" and (device.type != "cpu" or dtype not in NATIVE_DTYPES):
        raise ValueError(f"attention_backend native runs float32 or bfloat16 on the CPU, not {dtype} on {device.type}")
    if name == "triton" and (problem := _triton_problem(device, layout, block_size)):
        raise ValueError(f"attention_backend triton cannot run here: {problem}")
    return name


def _triton_problem(device, layout, block_size: int) -> str | None:
    problem = triton_usable(device)
    if problem:
        return problem
    from .triton_attention import supports  # lazily: triton loads only when it may run

    return supports(block_size, layout.head_dim, layout.sinks or None)
