"""Where lmbatch's time goes, per step: scheduling, input preparation, forward (MLP, LM head,
prefill and decode attention, the rest), sampling, bookkeeping; and steps by kind (with prefill
chunks, decode-only by the number of decoding sequences).

    .venv/bin/python bench/profile_lmbatch.py [--requests 40] [--policy input] [--no-prefix-caching]

Two views of one run of the benchmark workload (the engine is not modified, only wrapped):
1. wall-clock timers around the engine's phases (scheduler.schedule, runner._prepare, the model
   forward, the LM head, the attention function's parts, the sampler, the rest of the step);
2. torch.profiler op totals inside the same run, grouped into categories.
Prints both and writes bench/results/profile-<timestamp>.json and profile-latest.json (+ the torch
profiler table as text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()  # before torch loads libgomp

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Timers:
    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)

    def wrap(self, obj, name: str, key: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0
                self.n[key] += 1

        setattr(obj, name, timed)


def categorize(name: str, shapes) -> str:
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


def log_steps(eng) -> list[tuple[int, int, float]]:
    """Wrap the runner: one (prefill tokens, decoding sequences, seconds) entry per step."""
    log, execute = [], eng.runner.execute

    def timed(batch, rows):
        t0 = time.perf_counter()
        try:
            return execute(batch, rows)
        finally:
            log.append((sum(n for _, n in batch if n > 1), sum(1 for _, n in batch if n == 1),
                        time.perf_counter() - t0))

    eng.runner.execute = timed
    return log


def step_buckets(log) -> dict:
    """Steps with prefill chunks, then decode-only steps by the number of decoding sequences."""
    kinds = {"steps with prefill chunks": lambda p, d: p > 0}
    for lo, hi in ((1, 8), (8, 32), (32, 64), (64, 10**9)):
        kinds[f"decode-only, {lo}-{hi - 1 if hi < 10**9 else 'more'} sequences"] = (
            lambda p, d, lo=lo, hi=hi: p == 0 and lo <= d < hi)
    out = {}
    for name, match in kinds.items():
        times = [t for p, d, t in log if match(p, d)]
        out[name] = {"steps": len(times), "s": sum(times), "ms_per_step": 1000 * sum(times) / max(len(times), 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--policy", default="input")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--torch-profiler", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from run import ensure_model
    from workload import WorkloadSpec, make_workload

    from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
    from lmbatch.engine import attention as attn_mod
    from lmbatch.io import order_requests

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = str(ensure_model("cpu", out_dir))
    kw = {"max_num_batched_tokens": a.max_num_batched_tokens} if a.max_num_batched_tokens else {}
    eng = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=5000,
                                 enable_prefix_caching=not a.no_prefix_caching, **kw))
    wl = make_workload(WorkloadSpec.preset("default", num_requests=a.requests, token_hi=len(eng.tokenizer)))
    P, M = wl.prompts(), wl.max_tokens()
    order = order_requests(P, a.policy, max_tokens=M)
    pairs = [(P[i], SamplingParams(max_tokens=M[i], temperature=0, ignore_eos=True)) for i in order]
    # warm-up on prompts that share no block with the workload (the prefix cache stays cold)
    eng.generate([[7] * 40] * 2, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * 2)

    tm = Timers()
    tm.wrap(eng, "step", "step (total)")
    tm.wrap(eng.scheduler, "schedule", "schedule")
    tm.wrap(eng.runner, "_prepare", "prepare inputs + attention metadata")
    tm.wrap(eng.runner, "execute", "execute (prepare + forward)")
    tm.wrap(eng, "sampler", "sampling")
    lm = eng.runner.model.get_output_embeddings()
    tm.wrap(lm, "forward", "LM head (inside forward)")
    for name, key in (("_prefill", "attention: prefill chunks"),
                      ("_decode", "attention: decode (native kernel on the CPU)")):
        tm.wrap(attn_mod, name, key)
    for layer in eng.runner.model.model.layers:
        tm.wrap(layer.mlp, "forward", "MLP")
    step_log = log_steps(eng)
    eng.reset_stats()

    prof = None
    if a.torch_profiler:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
        prof.__enter__()
    t0 = time.perf_counter()
    outs = eng.generate([p for p, _ in pairs], [s for _, s in pairs])
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    stats = eng.stats()

    steps = stats["steps"]
    step_t = tm.t["step (total)"]
    phases = {
        "schedule": tm.t["schedule"],
        "prepare inputs + attention metadata": tm.t["prepare inputs + attention metadata"],
        "model forward": tm.t["execute (prepare + forward)"] - tm.t["prepare inputs + attention metadata"],
        "sampling": tm.t["sampling"],
    }
    phases["rest of step (append tokens, finish, outputs)"] = step_t - sum(phases.values())
    phases["outside step (request intake, generate loop)"] = wall - step_t
    fwd = phases["model forward"]
    inside = {
        "MLP": tm.t["MLP"],
        "LM head": tm.t["LM head (inside forward)"],
        "attention: prefill chunks": tm.t["attention: prefill chunks"],
        "attention: decode (native kernel on the CPU)": tm.t["attention: decode (native kernel on the CPU)"],
    }
    inside["rest of forward (attention projections, norms, RoPE, KV write, Python)"] = fwd - sum(inside.values())
    buckets = step_buckets(step_log)

    ops = {}
    if prof is not None:
        cat = defaultdict(float)
        for ev in prof.key_averages():
            cat[categorize(ev.key, None)] += ev.self_cpu_time_total / 1e6
        ops = dict(sorted(cat.items(), key=lambda kv: -kv[1]))
        (out_dir / "profile-latest-ops.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))

    n_out = sum(len(o.token_ids) for o in outs)
    print(f"{a.requests} requests, policy {a.policy}, prefix caching {not a.no_prefix_caching}: wall {wall:.2f}s, "
          f"{steps} steps ({1000 * step_t / max(steps, 1):.1f} ms/step), {n_out} output tokens, "
          f"prefill tokens {stats['prefill_tokens']}, decode tokens {stats['decode_tokens']}")
    print("\nphases of the run (wall clock):")
    for k, v in phases.items():
        print(f"  {k:55s} {v:8.2f}s  {100 * v / wall:5.1f}%  {1000 * v / max(steps, 1):7.2f} ms/step")
    print("\ninside the model forward:")
    for k, v in inside.items():
        print(f"  {k:55s} {v:8.2f}s  {100 * v / wall:5.1f}% of wall")
    print("\nsteps by kind (forward + preparation, wall clock):")
    for k, b in buckets.items():
        print(f"  {k:55s} {b['steps']:5d} steps {b['s']:8.2f}s  {b['ms_per_step']:6.1f} ms/step")
    if ops:
        print("\ntorch.profiler self CPU time by op category (profiler overhead included):")
        tot = sum(ops.values())
        for k, v in ops.items():
            print(f"  {k:55s} {v:8.2f}s  {100 * v / tot:5.1f}%")
    res = {"requests": a.requests, "policy": a.policy, "prefix_caching": not a.no_prefix_caching, "wall_s": wall,
           "steps": steps, "stats": stats, "phases_s": phases, "forward_s": inside, "step_kinds": buckets,
           "ops_self_cpu_s": ops, "profiler_on": bool(prof), "load_avg": list(os.getloadavg())}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in (f"profile-{stamp}.json", "profile-latest.json"):
        (out_dir / name).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
