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


def test_warns_when_torch_is_already_loaded():
    code = ("import warnings, torch; warnings.simplefilter('error'); from lmbatch.openmp import "
            "set_default_wait_policy\ntry:\n    set_default_wait_policy(); print('silent')\n"
            "except UserWarning:\n    print('warned')")
    assert _run(code, {}) == ["warned"]


def test_the_cli_sets_it_before_torch_is_loaded():
    code = "import os, sys, lmbatch.flows.cli; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    assert _run(code, {}) == ["1000", "False"]


def test_ray_workers_get_the_wait_policy_and_the_config_wins(monkeypatch):
    from lmbatch.flows.ray_runner import _ray_init_kwargs

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert _ray_init_kwargs({})["runtime_env"]["env_vars"]["GOMP_SPINCOUNT"] == "1000"
    mine = {"num_cpus": 2, "runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "0", "X": "1"}, "pip": ["a"]}}
    kwargs = _ray_init_kwargs(mine)
    assert kwargs["num_cpus"] == 2 and kwargs["runtime_env"]["pip"] == ["a"]
    assert kwargs["runtime_env"]["env_vars"]["GOMP_SPINCOUNT"] == "0" and kwargs["runtime_env"]["env_vars"]["X"] == "1"
