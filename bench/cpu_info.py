"""What CPU a benchmark ran on, its ISA's peak matmul rate and its measured streaming bandwidth.

The machines are Intel Xeons with AMX or AMD EPYCs, and results differ between them: every CPU
table names the model, the flags that decide the fast paths and the run's load.
"""

from __future__ import annotations

import os
import subprocess
import time

import torch

from lmbatch.engine.cpu_kernels import cpuinfo

FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict:
    fields = dict(line.split(":", 1) for line in _lscpu().splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    return {"model": fields.get("Model name", "unknown"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "isa_flags": [f for f in FLAGS_OF_NOTE if f in flags],
            "mhz": _clock_mhz(fields), "load_before": os.getloadavg()[0]}


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _clock_mhz(fields: dict) -> float:
    """The clock the cores run at now, measured; else what lscpu or /proc/cpuinfo reports.

    A VM reports its nominal clock (2.7 GHz on the EPYC of bench/NOTES.md) while the cores boost
    well above it: a floor from the reported clock was beaten by a real run.
    """
    measured = measured_clock_mhz()
    if measured:
        return measured
    for key in ("CPU max MHz", "CPU MHz"):
        if fields.get(key):
            return float(fields[key])
    return float(cpuinfo().get("cpu MHz") or 0.0)


_CHAIN = r"""
long chain(long n) {  /* 8 dependent one-cycle adds per iteration: 8 n cycles */
  long x = 0;
  for (long i = 0; i < n; ++i)
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                     "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return x;
}
"""


def measured_clock_mhz(iterations: int = 50_000_000) -> float | None:
    """Cycles per second of a chain of dependent integer adds (one cycle each on x86), best of 3;
    None without a C compiler or off x86."""
    import ctypes
    import platform
    import tempfile

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "chain.c"), os.path.join(tmp, "chain.so")
        with open(src, "w") as f:
            f.write(_CHAIN)
        try:
            subprocess.run(["cc", "-O1", "-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True,
                           timeout=60)
            chain = ctypes.CDLL(lib).chain
        except (OSError, subprocess.SubprocessError):
            return None
        chain.argtypes, chain.restype = [ctypes.c_long], ctypes.c_long
        chain(iterations // 10)   # wake the core up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            chain(iterations)
            best = min(best, time.perf_counter() - t0)
    return 8 * iterations / best / 1e6


def isa_peak_flops(info: dict, dtype: str) -> float:
    """cores x clock x FLOP per cycle per core of the widest matmul instructions the flags name.

    Per core and cycle, two FMA ports: AVX2 8 float32 lanes (32 FLOP), AVX-512 16 lanes (64);
    AVX512-BF16's dot products twice that in bf16 (128); AMX-BF16 1024. Without bf16 instructions
    bf16 runs at the float32 rate at best (converted to float32).
    """
    flags = set(info["isa_flags"])
    fp32 = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    if dtype == "float32":
        per_cycle = fp32
    elif "amx_bf16" in flags:
        per_cycle = 1024
    elif "avx512_bf16" in flags:
        per_cycle = 128
    else:
        per_cycle = fp32
    return info["cores"] * info["mhz"] * 1e6 * per_cycle


def stream_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Best bytes/s of a large tensor copy (read + write), the rate decode's weight reads approach."""
    n = int(gib * 2**30 / 4)
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best
