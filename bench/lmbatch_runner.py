"""lmbatch through its public API (docs/engine-api.md), with an ordering policy from lmbatch.io.

Ordering comes from ``lmbatch.io.ordering``; if that module (or a policy) is not importable the
runner falls back to a local sort and says so in the result (``extra["ordering_source"]``), so a
benchmark never silently measures something other than the product's ordering.
"""

from __future__ import annotations

import gc
import time

from peers import RunResult, sync

POLICIES = ["input", "length_desc", "length_asc", "prefix", "prefix_longest_first"]


def _local_order(policy: str, prompts: list[list[int]], max_tokens: list[int]) -> list[int]:
    idx = list(range(len(prompts)))
    if policy == "input":
        return idx
    if policy == "length_desc":
        return sorted(idx, key=lambda i: len(prompts[i]) + max_tokens[i], reverse=True)
    if policy == "length_asc":
        return sorted(idx, key=lambda i: len(prompts[i]) + max_tokens[i])
    if policy == "prefix":
        return sorted(idx, key=lambda i: prompts[i])
    if policy == "prefix_longest_first":
        # group by the first block of tokens, biggest groups first, longest requests first inside a group
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(tuple(prompts[i][:16]), []).append(i)
        out = []
        for g in sorted(groups.values(), key=lambda g: -sum(len(prompts[i]) + max_tokens[i] for i in g)):
            out += sorted(g, key=lambda i: len(prompts[i]) + max_tokens[i], reverse=True)
        return out
    raise ValueError(f"unknown policy {policy!r}")


def order_indices(policy: str, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[int], str]:
    """Permutation of request indices for `policy`, and where it came from."""
    try:
        from lmbatch.io import ordering
    except Exception:  # noqa: BLE001 - the module may not exist yet
        return _local_order(policy, prompts, max_tokens), "local-fallback"
    fn = getattr(ordering, "order_requests", None) or getattr(ordering, "order_indices", None)
    if fn is None:
        return _local_order(policy, prompts, max_tokens), "local-fallback"
    try:
        try:
            order = fn(prompts, policy, max_tokens=max_tokens)
        except TypeError:
            order = fn(prompts, policy)
    except Exception:  # noqa: BLE001
        return _local_order(policy, prompts, max_tokens), "local-fallback"
    order = list(order)
    if order and not isinstance(order[0], int):  # a function that returns reordered prompts
        pos: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            pos.setdefault(id(p), []).append(i)
        order = [pos[id(p)].pop(0) for p in order]
    if sorted(order) != list(range(len(prompts))):
        raise RuntimeError(f"lmbatch.io.ordering returned an invalid permutation for {policy!r}")
    return order, "lmbatch.io.ordering"


def make_engine(model_path: str, device: str, dtype: str, prefix_caching: bool, **engine_kwargs):
    from lmbatch.engine import EngineConfig, LLMEngine

    cfg = EngineConfig(model=model_path, device=device, dtype=dtype, enable_prefix_caching=prefix_caching,
                       **engine_kwargs)
    return LLMEngine(cfg)


def run_lmbatch(model_path: str, prompts: list[list[int]], max_tokens: list[int], policy: str = "input",
                prefix_caching: bool = True, device: str = "cpu", dtype: str = "float32",
                engine_kwargs: dict | None = None, engine=None) -> RunResult:
    """One timed run on a fresh engine (a fresh prefix cache); engine construction is not timed."""
    from lmbatch.engine import SamplingParams

    n = len(prompts)
    order, source = order_indices(policy, prompts, max_tokens)
    own = engine is None
    if own:
        engine = make_engine(model_path, device, dtype, prefix_caching, **(engine_kwargs or {}))
    engine.reset_stats()
    sps = [SamplingParams(max_tokens=max_tokens[i], temperature=0.0, ignore_eos=True) for i in order]
    batch = [prompts[i] for i in order]
    sync(device)
    t0 = time.monotonic()
    outs = engine.generate(batch, sps)
    sync(device)
    wall = time.monotonic() - t0
    stats = dict(engine.stats())
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
                    extra={"policy": policy, "prefix_caching": prefix_caching, "ordering_source": source,
                           "engine_stats": stats})
    if own:
        del engine
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # the next run's engine sizes its KV pool from free memory
    return res
