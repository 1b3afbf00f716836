"""The OpenMP wait policy default: a short spin unless the user chose a policy."""

import os
import subprocess
import sys

import pytest


def _run(code: str, env: dict) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@pytest.mark.parametrize("env, expected", [
    ({}, ["None", "1000"]),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, ["PASSIVE", "None"]),
    ({"GOMP_SPINCOUNT": "0"}, ["None", "0"]),
])
def test_short_spin_unless_the_user_chose(env, expected):
    code = ("import os; from lmbatch.openmp import set_default_wait_policy; set_default_wait_policy(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    assert _run(code, env) == expected


def test_the_cli_sets_it_on_import():
    code = "import os, lmbatch.flows.cli; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _run(code, {}) == ["1000"]
