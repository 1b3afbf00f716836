"""One engine per process, reused across shards.

Loading a model costs seconds to minutes, so a process that runs several shards (the local
runner, or a Ray worker that Ray reuses) must load it once. The cache lives in this module and
tasks read it through `get_engine`: a Prefect task shipped to Ray is pickled by value, so a
global of the task's own module would be a fresh copy on every call, while this imported module
stays loaded in the worker process.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

_lock = threading.Lock()
_engines: dict[str, Any] = {}
_loads = 0  # how many times an engine was built in this process (tests check reuse)


def _key(engine_kwargs: dict) -> str:
    return json.dumps(engine_kwargs, sort_keys=True, default=str)


def get_engine(engine_kwargs: dict):
    """The LLMEngine for these EngineConfig kwargs, built on first use in this process.

    Only one engine is kept: a different config replaces the old one, so that a long-lived worker
    switching models does not hold two models' weights and KV caches.
    """
    global _loads
    key = _key(engine_kwargs)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            from lmbatch.engine import EngineConfig, LLMEngine

            _close_all()
            _quiet_loading()
            engine = LLMEngine(EngineConfig(**engine_kwargs))
            _engines[key] = engine
            _loads += 1
        return engine


def _quiet_loading() -> None:
    # transformers draws a "Loading weights" bar even into log files; keep it for terminals only,
    # like our own shard bar.
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_count() -> int:
    return _loads


def clear() -> None:
    with _lock:
        _close_all()


def _close_all() -> None:
    # Freed now, not when the collector gets to them: a GPU worker needs that memory for the next engine.
    for engine in _engines.values():
        engine.close()
    _engines.clear()
