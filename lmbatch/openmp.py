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
OMP_WAIT_POLICY=PASSIVE. Either variable set by the user wins.
"""

from __future__ import annotations

import os

SHORT_SPIN = "1000"


def set_default_wait_policy() -> None:
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN
