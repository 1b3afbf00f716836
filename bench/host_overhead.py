"""The host's share of a CUDA-graph decode step, measured on any machine (the CPU too).

On the H200 a decode step of 256 sequences took 6.7 ms of which the graph's replay was 3.7 ms
(bench/NOTES.md, GPU run 3): the rest is Python on the host: scheduling, the step's arrays, the
static buffers, the sampler, the bookkeeping of each new token. This runs exactly that code, the
engine's own `step()` with the graph path's bookkeeping (DecodeGraphs, capture off), over a forward
that returns a fixed logits tensor instead of running the model: what is left is the host's time.

    python -m bench.host_overhead [--seqs 256] [--steps 200] [--profile] [--async-scheduling]

With --async-scheduling the same steps run overlapped (engine/overlap.py): on a GPU that time hides
behind the replay of the step before; here it shows what the overlap's own bookkeeping costs.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import tempfile
import time
from pathlib import Path

import torch


def build_engine(root: Path, seqs: int, async_scheduling: bool = False):
    from lmbatch.engine import EngineConfig, LLMEngine
    from lmbatch.engine.cuda_graphs import DecodeGraphs
    from lmbatch.testing import build_toy_model

    model = build_toy_model(root / "host-overhead", hidden=64, layers=2, heads=4, kv_heads=2, max_positions=4096)
    engine = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="float32", attention_backend="triton",
                                    max_num_seqs=seqs, max_num_batched_tokens=8192, num_kv_blocks=seqs * 80,
                                    max_model_len=4096, async_scheduling=async_scheduling))
    graphs = DecodeGraphs(engine.runner, seqs, capture=False)
    logits = torch.zeros(1, graphs.sizes[-1], engine.runner.vocab_size)
    logits[..., 5] = 1.0
    graphs._forward = lambda meta: logits     # the model's forward, on the GPU a replay: not host time
    engine.runner.graphs = graphs
    return engine


def decode_steps(engine, seqs: int, steps: int, prompt_len: int, profile: bool) -> dict:
    from lmbatch.engine import SamplingParams

    rng = random.Random(0)
    for i in range(seqs):
        engine.add_request(i, [rng.randint(10, 900) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=steps + 64, temperature=0.0, ignore_eos=True))
    runner = engine.runner
    execute = runner.execute      # prefill steps skip the model too (their KV is never read here)
    runner.execute = lambda batch, rows, carry=None: torch.zeros(len(rows), runner.vocab_size)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    runner.execute = execute
    engine.step()
    replays = engine.runner.graphs.replays
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(steps):
        engine.step()
    if profiler:
        profiler.disable()
    ms = (time.perf_counter() - t0) / steps * 1e3
    assert engine.runner.graphs.replays - replays == steps, "a step left the graph path"
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    return {"seqs": seqs, "context": prompt_len, "async_scheduling": engine.config.async_scheduling,
            "host_ms_per_step": round(ms, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps")
    ap.add_argument("--async-scheduling", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)                  # the host's thread: the GPU needs no CPU threads
    os.environ.setdefault("TRITON_INTERPRET", "1")   # the graph path's checks on a machine without CUDA
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(Path(tmp), a.seqs, a.async_scheduling)
        print(decode_steps(engine, a.seqs, a.steps, a.context, a.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
