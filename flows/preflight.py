"""Checks before compute: everything that can be known wrong without loading a model.

A bad engine or sampling value, a model that is not there, a missing column or an unreadable
input becomes one ConfigError with a one-line message, and nothing has been written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lmbatch import io
from lmbatch.flows.config import ConfigError, JobConfig, load_config


def input_spec(cfg: JobConfig) -> io.InputSpec:
    cols = cfg.input.columns
    return io.InputSpec(path=cfg.input.path, format=cfg.input.format, id_column=cols.id,
                        prompt_column=cols.prompt, sampling_columns=cols.sampling,
                        passthrough_columns=list(cols.passthrough),
                        storage_options=dict(cfg.input.storage_options),
                        chat_template_kwargs=dict(cfg.input.chat_template_kwargs),
                        chat_template_kwargs_column=cols.chat_template_kwargs)


def preflight(cfg: JobConfig, check_input: bool = True) -> None:
    """Everything that can be checked before compute, as ConfigError with a one-line message.

    The engine and sampling settings are checked already: the config's sections are the engine's
    own dataclasses' fields and checks (flows/sections.py)."""
    _check_model(cfg.model.id)
    if cfg.runner.kind == "ray":
        _check_ray(cfg)
    if not check_input:
        return
    try:
        io.inspect_input(input_spec(cfg))
    except io.InputError as e:
        raise ConfigError(f"input: {e}") from None


def _check_model(model_id: str) -> None:
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if Path(model_id).expanduser().is_dir():
        return
    if looks_local:
        raise ConfigError(f"model.id: {model_id!r} is not a directory")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            raise ConfigError(f"model.id: {model_id!r} is not in the local Hugging Face cache "
                              "(HF_HUB_OFFLINE=1); download it first or give a local directory")


def _check_ray(cfg: JobConfig) -> None:
    from prefect.settings import PREFECT_API_URL

    if importlib.util.find_spec("prefect_ray") is None:
        raise ConfigError("runner.kind: ray needs prefect-ray and ray: pip install 'lmbatch[ray]'")
    if cfg.runner.ray.address is None:
        _check_local_ray(cfg)
        return
    # Without a real server every Ray worker would start its own temporary Prefect server.
    if not (PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")):
        raise ConfigError("runner.kind: ray needs a real Prefect server: set PREFECT_API_URL")
    if not io.configured_db_url(cfg.db.url):
        raise ConfigError("runner.kind: ray needs a run database all workers reach: set db.url or "
                          f"{io.rundb.DB_URL_ENV} (a SQLite file beside the outputs is per machine)")


def _check_local_ray(cfg: JobConfig) -> None:
    """No address: a Ray of this machine's own, one shard task per GPU. Its workers share the job's
    Prefect server (`lmbatch run` starts a temporary one) and the SQLite file beside the outputs."""
    per_task = cfg.runner.ray.num_gpus_per_task
    if per_task > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < per_task:
            raise ConfigError(f"runner.kind: ray with no address starts a Ray on this machine, which has {gpus} "
                              f"GPU(s), but each shard task asks for {per_task:g} "
                              "(runner.ray.num_gpus_per_task: 0 runs the tasks on the CPU)")


def prepare(config_path: str, overrides: list[str] | None = None, build_demo: bool = True) -> JobConfig:
    """Load, build the demo assets if the config asks for them, and preflight."""
    cfg = load_config(config_path, overrides)
    if cfg.demo and build_demo:
        from lmbatch.flows.demo import ensure_demo

        ensure_demo(cfg.demo.dir, cfg.demo.rows)
    preflight(cfg)
    return cfg


