"""How OpenMP threads wait between parallel ops on the CPU. Call before torch is imported.

A decode step on the CPU is hundreds of small parallel ops (a 4-row matmul takes ~10 us). With
passive waiting every op pays a futex wake-up of the sibling threads (~70 us: the 4-row matmul
took 81 us); with GNU OpenMP's default spin (300,000 iterations) threads whose sibling was
descheduled on a loaded node burn whole scheduler ticks (measured 40x slower at load 5). A short
spin (1,000 iterations, tens of microseconds) covers the gap between two ops of one step and then
sleeps. Measured on 2 cores, 4 / 32 decoding sequences per step (bench/NOTES.md):

    idle machine:     passive 16.9 / 37.2 ms per step, short spin 12.0 / 30.0
    3 busy processes: passive 28.8 / 88.0 ms per step, short spin 37.8 / 110.7

The short spin is the default for dedicated machines; on a node shared with busier jobs set
OMP_WAIT_POLICY=PASSIVE. Either variable set by the user wins. GOMP_SPINCOUNT is read by GNU
libgomp (what torch's Linux wheels ship), once, when it loads: hence before torch. Builds on
Intel's or LLVM's OpenMP (conda MKL builds, macOS) ignore it.
"""

from __future__ import annotations

import os
import sys
import warnings

SHORT_SPIN = "1000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_default_wait_policy() -> None:
    if any(v in os.environ for v in WAIT_VARIABLES):
        return
    if "torch" in sys.modules:
        warnings.warn("lmbatch.openmp.set_default_wait_policy() called after torch was imported: OpenMP has "
                      "already read its settings, so the short spin does not apply to this process", stacklevel=2)
    os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN


def wait_policy_env() -> dict[str, str]:
    """This process's OpenMP wait settings, for worker processes started elsewhere (Ray)."""
    return {v: os.environ[v] for v in WAIT_VARIABLES if v in os.environ}
