"""The shard tasks on Ray (prefect-ray's RayTaskRunner): a cluster at an address, or a Ray of this
machine's own when there is none, one shard task per GPU either way."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger

from lmbatch import io
from lmbatch.flows.config import JobConfig
from lmbatch.flows.manifests import RunPlan
from lmbatch.openmp import wait_policy_env


def ray_states(cfg: JobConfig, task_, run: RunPlan) -> Iterator[tuple[io.ShardPlan, Any]]:
    from prefect.futures import as_completed
    from prefect_ray import RayTaskRunner  # pip install 'lmbatch[ray]'
    from prefect_ray.context import remote_options

    if not run.to_run:  # everything done before: no need to reach the cluster
        return
    ray = cfg.runner.ray
    # No address: a new Ray of this machine's own ("local"; never a cluster found by chance),
    # one shard task per GPU, reporting to this job's Prefect server.
    address = ray.address or "local"
    init_kwargs = _ray_init_kwargs(ray.init_kwargs)
    if ray.address is None:
        init_kwargs.setdefault("include_dashboard", False)
        if not _prefect_api_url():
            raise RuntimeError("runner.kind: ray with no address needs the job's Prefect server URL for its "
                               "workers: run it with `lmbatch run` (which starts one) or set PREFECT_API_URL")
    runner = RayTaskRunner(address=address, init_kwargs=init_kwargs)
    token = _local_ray_token() if ray.address is None else contextlib.nullcontext()
    with token, runner, remote_options(num_gpus=ray.num_gpus_per_task):
        _warn_if_no_gpus(ray.num_gpus_per_task)
        futures = [(s, runner.submit(task_, parameters={"cfg": cfg, "run": run, "shard": s,
                                                          "progress": False}))
                   for s in run.to_run]
        for done in as_completed([f for _, f in futures]):
            # wait() takes the final state from Ray, with the manifest in it; `.state` alone reads
            # the server's copy, which has no result data (nothing is persisted) and may lag.
            done.wait()
            yield next(s for s, f in futures if f is done), done.state


def _ray_init_kwargs(init_kwargs: dict) -> dict:
    """ray.init kwargs that export this process's Prefect server URL and OpenMP wait settings.

    A worker without PREFECT_API_URL starts a temporary Prefect server of its own; the task
    context carries the URL, but Prefect's background log and event clients must see it too.
    Ray workers are started by the raylet, not by this process, so they would not inherit the
    OpenMP wait policy (src/lmbatch/openmp.py) either. Variables the config sets itself win.
    """
    exported = wait_policy_env()
    url = _prefect_api_url()
    if url:
        exported["PREFECT_API_URL"] = url
    kwargs = dict(init_kwargs)
    if exported:
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["env_vars"] = {**exported, **(runtime_env.get("env_vars") or {})}
        kwargs["runtime_env"] = runtime_env
    return kwargs


@contextlib.contextmanager
def _local_ray_token():
    """Token authentication for the local Ray, with a token of this run in the environment only.

    A new local Ray (2.5x+) turns token auth on and, without a token, writes one to
    ~/.ray/auth_token; every later `ray start` of the user then requires it. The raylet and its
    workers inherit this process's environment, so the token travels without a file.
    """
    import secrets

    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _prefect_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _warn_if_no_gpus(num_gpus: float) -> None:
    # Ray queues a task until a node offers its GPUs: on a CPU-only cluster that is a silent hang
    # (an autoscaling cluster may add GPU nodes later, so this only warns).
    import ray

    available = ray.cluster_resources().get("GPU", 0)
    if num_gpus > available:
        get_run_logger().warning("each shard task asks Ray for %s GPU(s) but the cluster has %s; tasks "
                                 "wait until GPU nodes join (runner.ray.num_gpus_per_task: 0 on CPU)",
                                 num_gpus, available)
