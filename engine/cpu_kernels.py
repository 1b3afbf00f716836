"""Native CPU kernels, compiled on first use with the machine's C++ compiler.

- paged decode attention reads K/V straight from the pool through block tables; the pure-PyTorch
  path has to gather each sequence's context into a padded copy first, which on the CPU costs
  more memory traffic than the attention itself;
- small-batch linear runs the linears of decode steps (a few rows) at the speed of reading the
  weights, which MKL's sgemm does not (small_batch_linear.py);
- the token bitmask of structured outputs is applied to the logits in one pass (grammar.py):
  unpacking it with torch ops costs ~20x more at 256 rows of a 32k vocabulary.

Building takes ~25 s once per machine (cached by torch under TORCH_EXTENSIONS_DIR). When no
compiler is found, or LMBATCH_CPU_KERNELS=0, the engine uses the PyTorch path: same results, slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_lock = threading.Lock()
_module = None
_failed = False


def cpu_kernels_enabled() -> bool:
    return os.environ.get("LMBATCH_CPU_KERNELS", "1") not in ("0", "false", "no")


def load():
    """The compiled module, or None when it is disabled or cannot be built."""
    global _module, _failed
    if not cpu_kernels_enabled():
        return None
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                _module = _build()
            except Exception as e:  # no compiler, no ninja, ...: fall back, loudly once
                _failed = True
                log.warning("lmbatch CPU kernels unavailable, using the PyTorch path: %s", e)
    return _module


def _build():
    from torch.utils.cpp_extension import load as load_extension

    _put_ninja_on_path()
    csrc = Path(__file__).with_name("csrc")
    sources = [str(csrc / f) for f in ("paged_decode_attention.cpp", "paged_prefill_attention.cpp",
                                       "small_batch_linear.cpp", "packed_linear.cpp", "rms_norm.cpp",
                                       "token_bitmask.cpp", "bindings.cpp")]
    # -ffast-math vectorizes exp and the dot-product reductions; the kernels have no inf/NaN logic.
    flags = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
    return load_extension(name=f"lmbatch_cpu_kernels_{cpu_signature()}", sources=sources, extra_cflags=flags,
                          extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo; empty where it cannot be read)."""
    info = cpuinfo()
    return frozenset(info.get("flags", info.get("Features", "")).split())


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"; empty where it cannot be read)."""
    return cpuinfo().get("vendor_id", "")


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, read once."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def has_bf16_dot() -> bool:
    """bf16 dot-product instructions (AVX512-BF16, AMX-BF16), where bf16 is the faster dtype: 1.6-1.7x
    float32 end to end at the Qwen2-0.5B shape on an AMD EPYC with AVX512-BF16, both on the packed
    kernels (bench/NOTES.md; not measured on an AMX machine)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_signature() -> str:
    """A short hash of this CPU's instruction-set flags, part of the build's name.

    The build is cached by torch under its name and -march=native bakes the CPU into it: a cache
    shared by two machines (a home directory, an image) must never hand an AVX-512 build to a CPU
    without AVX-512, where it would die on an illegal instruction.
    """
    import platform

    flags = " ".join(sorted(cpu_flags())) or platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    # torch builds extensions with ninja, found on PATH; the `ninja` wheel puts it in the venv's
    # bin directory, which is not on PATH when the venv's python is run without activating it.
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
