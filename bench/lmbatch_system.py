"""lmbatch through its public API (docs/engine-api.md), fed in the order of lmbatch.io's policies."""

from __future__ import annotations

import gc
import time

from bench.peers import RunResult, sync
from lmbatch.io.ordering import order_requests


def make_engine(model_path: str, device: str, dtype: str, prefix_caching: bool, **engine_kwargs):
    from lmbatch.engine import EngineConfig, LLMEngine

    cfg = EngineConfig(model=model_path, device=device, dtype=dtype, enable_prefix_caching=prefix_caching,
                       **engine_kwargs)
    return LLMEngine(cfg)


def run_lmbatch(model_path: str, prompts: list[list[int]], max_tokens: list[int], policy: str = "input",
                prefix_caching: bool = True, device: str = "cpu", dtype: str = "float32",
                engine_kwargs: dict | None = None) -> RunResult:
    """One timed run on a fresh engine (a fresh prefix cache); engine construction is not timed."""
    from lmbatch.engine import SamplingParams

    n = len(prompts)
    order = order_requests(prompts, policy, max_tokens=max_tokens)
    engine = make_engine(model_path, device, dtype, prefix_caching, **(engine_kwargs or {}))
    engine.reset_stats()
    sps = [SamplingParams(max_tokens=max_tokens[i], temperature=0.0, ignore_eos=True) for i in order]
    batch = [prompts[i] for i in order]
    sync(device)
    t0 = time.monotonic()
    outs = engine.generate(batch, sps)
    sync(device)
    wall = time.monotonic() - t0
    stats = engine.stats().as_dict()
    tokens = [None] * n
    ttft = [0.0] * n
    e2e = [0.0] * n
    cached = [0] * n
    for j, out in enumerate(outs):
        i = order[j]
        if out.finish_reason == "error":
            raise RuntimeError(f"lmbatch request {i} failed: {out.error}")
        tokens[i] = list(out.token_ids)
        m = out.metrics
        ttft[i] = (m.first_token_time - t0) if m.first_token_time else wall
        e2e[i] = (m.finish_time - t0) if m.finish_time else wall
        cached[i] = int(out.num_cached_tokens or 0)
    name = f"lmbatch[{policy}{'' if prefix_caching else ',nocache'}]"
    res = RunResult(name, wall, tokens, ttft, e2e, cached,
                    extra={"policy": policy, "prefix_caching": prefix_caching,
                           "engine_stats": stats})
    del engine
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the next run's engine sizes its KV pool from free memory
    return res
