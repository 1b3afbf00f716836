"""Where lmbatch's time goes, per step: the model forward (MLPs, attention layers, LM head, the
rest), the rest of the step (scheduling, input preparation, sampling, bookkeeping), and steps by
kind (with prefill chunks, decode-only by the number of decoding sequences).

    .venv/bin/python -m bench.profile_lmbatch [--requests 40] [--policy input] [--no-prefix-caching]

Two views of one run of the benchmark workload, through public means only (the engine is neither
modified nor patched):
1. wall-clock timers: LLMEngine.step() timed by a subclass that overrides it (each step's prefill
   and decode tokens from engine.stats()), and torch forward hooks on the transformers model's
   modules (the whole forward, every layer's MLP and attention, the LM head);
2. torch.profiler op totals inside the same run, grouped into categories.
Prints both and writes bench/results/profile-<timestamp>.json and profile-latest.json (+ the torch
profiler table as text, profile-latest-ops.txt). Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()  # before torch loads libgomp

import torch

from bench.cli import BENCH, RESULTS, parser
from bench.toy_models import MODELS, ensure_model, ensure_shaped_model
from bench.workload import WorkloadSpec, make_workload
from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.io import order_requests

FORWARD = "model forward"
MLP = "MLP"
ATTENTION = "attention (projections, RoPE, KV write, paged attention)"
LM_HEAD = "LM head"


class ModuleTimers:
    """Seconds spent inside torch modules, by key, from forward pre- and post-hooks (torch's public API)."""

    def __init__(self):
        self.s: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}

    def add(self, module: torch.nn.Module, key: str) -> None:
        def before(mod, args):
            self._started[id(mod)] = time.perf_counter()

        def after(mod, args, out):
            self.s[key] += time.perf_counter() - self._started.pop(id(mod))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


@dataclass(frozen=True)
class StepRecord:
    prefill_tokens: int     # prompt tokens computed in the step (engine.stats())
    decode_tokens: int      # one per decoding sequence
    step_s: float
    forward_s: float        # inside the step: the model forward
    attention_s: float      # inside the forward: the attention layers


class TimedEngine(LLMEngine):
    """LLMEngine whose public step() is timed once `timers` is set: one StepRecord per step."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.timers: ModuleTimers | None = None
        self.step_log: list[StepRecord] = []

    def step(self):
        tm = self.timers
        if tm is None:
            return super().step()
        before, fwd, att = self.stats(), tm.s[FORWARD], tm.s[ATTENTION]
        t0 = time.perf_counter()
        try:
            return super().step()
        finally:
            step_s = time.perf_counter() - t0
            d = self.stats().since(before)
            self.step_log.append(StepRecord(d.prefill_tokens, d.decode_tokens, step_s, tm.s[FORWARD] - fwd,
                                            tm.s[ATTENTION] - att))


def attach_timers(eng: TimedEngine) -> ModuleTimers:
    """Hooks on the model (Llama-shaped: model.model.layers[i].mlp / .self_attn) and timing of step()."""
    model = eng.runner.model
    tm = ModuleTimers()
    tm.add(model, FORWARD)
    tm.add(model.get_output_embeddings(), LM_HEAD)
    for layer in model.model.layers:
        tm.add(layer.mlp, MLP)
        tm.add(layer.self_attn, ATTENTION)
    eng.timers = tm
    return tm


def categorize(name: str) -> str:
    n = name.lower()
    if "scaled_dot_product" in n or "_flash_attention" in n or n in ("aten::softmax", "aten::_softmax"):
        return "attention: sdpa"
    if n in ("aten::index", "aten::index_select", "aten::gather"):
        return "KV gather (index)"
    if n in ("aten::index_copy_", "aten::index_put_", "aten::index_copy"):
        return "KV write (index_copy_)"
    if n in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm"):
        return "matmul"
    if n in ("aten::argmax", "aten::topk", "aten::sort", "aten::multinomial", "aten::max"):
        return "sampling ops"
    if n in ("aten::silu", "aten::mul", "aten::add", "aten::rsqrt", "aten::pow", "aten::mean", "aten::neg",
             "aten::cat", "aten::cos", "aten::sin", "aten::embedding"):
        return "elementwise (norm, rope, act)"
    if n in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::empty",
             "aten::zeros", "aten::tensor", "aten::lift_fresh", "aten::pad", "aten::constant_pad_nd",
             "aten::stack", "aten::arange"):
        return "copies/alloc"
    return "other ops"


def step_buckets(log: list[StepRecord]) -> dict:
    """Steps with prefill chunks, then decode-only steps by the number of decoding sequences."""
    kinds = {"steps with prefill chunks": lambda p, d: p > 0}
    for lo, hi in ((1, 8), (8, 32), (32, 64), (64, 10**9)):
        kinds[f"decode-only, {lo}-{hi - 1 if hi < 10**9 else 'more'} sequences"] = (
            lambda p, d, lo=lo, hi=hi: p == 0 and lo <= d < hi)
    out = {}
    for name, match in kinds.items():
        recs = [r for r in log if match(r.prefill_tokens, r.decode_tokens)]
        s = sum(r.step_s for r in recs)
        out[name] = {"steps": len(recs), "s": s, "ms_per_step": 1000 * s / max(len(recs), 1),
                     "forward_s": sum(r.forward_s for r in recs), "attention_s": sum(r.attention_s for r in recs)}
    return out


def phases_of(tm: ModuleTimers, log: list[StepRecord], wall: float) -> tuple[dict, dict]:
    """The run's wall split into phases, and the model forward split into its modules."""
    step_t = sum(r.step_s for r in log)
    fwd = tm.s[FORWARD]
    phases = {
        FORWARD: fwd,
        "rest of step (schedule, inputs, sampling, bookkeeping)": step_t - fwd,
        "outside step (request intake, generate loop)": wall - step_t,
    }
    inside = {MLP: tm.s[MLP], ATTENTION: tm.s[ATTENTION], LM_HEAD: tm.s[LM_HEAD]}
    inside["rest of forward (embeddings, norms, residuals, Python)"] = fwd - sum(inside.values())
    return phases, inside


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--model", default="cpu", help="cpu (the 24M bench model) or a real shape: "
                    "qwen2-0.5b, llama-3.2-1b (random weights)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--policy", default="input")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--torch-profiler", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(RESULTS))
    return ap.parse_args(argv)


def build_engine(a: argparse.Namespace, out_dir: Path) -> tuple[TimedEngine, list]:
    """The engine on the CPU bench model, warmed up, and the workload's (prompt, SamplingParams) pairs."""
    path = str(ensure_model(a.model, out_dir) if a.model in MODELS else ensure_shaped_model(a.model, BENCH / ".models"))
    kw = {"max_num_batched_tokens": a.max_num_batched_tokens} if a.max_num_batched_tokens else {}
    eng = TimedEngine(EngineConfig(model=path, device="cpu", dtype=a.dtype, num_kv_blocks=5000,
                                   enable_prefix_caching=not a.no_prefix_caching, **kw))
    wl = make_workload(WorkloadSpec.preset("default", num_requests=a.requests, token_hi=len(eng.tokenizer)))
    P, M = wl.prompts(), wl.max_tokens()
    order = order_requests(P, a.policy, max_tokens=M)
    pairs = [(P[i], SamplingParams(max_tokens=M[i], temperature=0, ignore_eos=True)) for i in order]
    # warm-up on prompts that share no block with the workload (the prefix cache stays cold)
    eng.generate([[7] * 40] * 2, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * 2)
    return eng, pairs


def timed_generate(eng: TimedEngine, pairs: list, with_profiler: bool):
    """One generate over the workload: its outputs, its wall time, and the torch profiler (or None)."""
    prof = None
    if with_profiler:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
    with prof if prof is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        outs = eng.generate([p for p, _ in pairs], [s for _, s in pairs])
        wall = time.perf_counter() - t0
    return outs, wall, prof


def ops_by_category(prof, out_dir: Path) -> dict[str, float]:
    """torch.profiler self CPU seconds by op category; writes the profiler's own table next to the JSON."""
    if prof is None:
        return {}
    cat = defaultdict(float)
    for ev in prof.key_averages():
        cat[categorize(ev.key)] += ev.self_cpu_time_total / 1e6
    (out_dir / "profile-latest-ops.txt").write_text(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    return dict(sorted(cat.items(), key=lambda kv: -kv[1]))


def print_report(res: dict, n_out: int) -> None:
    wall, steps, stats = res["wall_s"], res["steps"], res["stats"]
    step_t = res["step_s"]
    print(f"{res['requests']} requests, policy {res['policy']}, prefix caching {res['prefix_caching']}: "
          f"wall {wall:.2f}s, {steps} steps ({1000 * step_t / max(steps, 1):.1f} ms/step), {n_out} output tokens, "
          f"prefill tokens {stats['prefill_tokens']}, decode tokens {stats['decode_tokens']}")
    if res["steps_timed"] != steps:
        print(f"warning: {res['steps_timed']} of {steps} steps went through the timed LLMEngine.step()")
    print("\nphases of the run (wall clock):")
    for k, v in res["phases_s"].items():
        print(f"  {k:55s} {v:8.2f}s  {100 * v / wall:5.1f}%  {1000 * v / max(steps, 1):7.2f} ms/step")
    print("\ninside the model forward:")
    for k, v in res["forward_s"].items():
        print(f"  {k:55s} {v:8.2f}s  {100 * v / wall:5.1f}% of wall")
    print("\nsteps by kind (whole step; the model forward and its attention layers inside it; wall clock):")
    for k, b in res["step_kinds"].items():
        print(f"  {k:55s} {b['steps']:5d} steps {b['s']:8.2f}s  {b['ms_per_step']:6.1f} ms/step  "
              f"forward {b['forward_s']:7.2f}s  attention {b['attention_s']:7.2f}s")
    ops = res["ops_self_cpu_s"]
    if ops:
        print("\ntorch.profiler self CPU time by op category (profiler overhead included):")
        tot = sum(ops.values())
        for k, v in ops.items():
            print(f"  {k:55s} {v:8.2f}s  {100 * v / tot:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    eng, pairs = build_engine(a, out_dir)
    timers = attach_timers(eng)
    eng.reset_stats()
    outs, wall, prof = timed_generate(eng, pairs, a.torch_profiler)
    stats = eng.stats()
    phases, inside = phases_of(timers, eng.step_log, wall)
    res = {"requests": a.requests, "policy": a.policy, "prefix_caching": not a.no_prefix_caching, "wall_s": wall,
           "steps": stats.steps, "steps_timed": len(eng.step_log), "step_s": sum(r.step_s for r in eng.step_log),
           "stats": stats.as_dict(), "phases_s": phases,
           "forward_s": inside, "step_kinds": step_buckets(eng.step_log),
           "ops_self_cpu_s": ops_by_category(prof, out_dir), "profiler_on": bool(prof),
           "load_avg": list(os.getloadavg())}
    print_report(res, sum(len(o.token_ids) for o in outs))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in (f"profile-{stamp}.json", "profile-latest.json"):
        (out_dir / name).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
