"""Side-by-side benchmark: transformers peers and lmbatch, same model, same prompts, same process.

    .venv/bin/python -m bench.run                       # CPU default (make bench)
    .venv/bin/python -m bench.run --preset quick        # a couple of minutes
    .venv/bin/python -m bench.run --preset gpu          # cuda + bfloat16, larger model and workload

Run from the repository root. Systems run round-robin inside each repeat (the start rotates per
repeat), medians over repeats are reported. Writes bench/results/<timestamp>.json (everything,
per-request times of the last repeat included) and bench/results/latest.md, and prints the
markdown table.

Checks (in the JSON and under the table):
- identical work: every system produced exactly max_tokens tokens for every request;
- greedy equality: every system's tokens vs model.generate on single unpadded prompts (a sample),
  and vs transformers' continuous batching on every request.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()  # before torch loads libgomp: same threading for every system

import torch

from bench.cli import REPO, RESULTS, add_device_options, parser
from bench.flops import floors, ideal_skippable, measure_matmul_rate, model_shape
from bench.lmbatch_system import run_lmbatch
from bench.peers import RunResult, load_model, reference_tokens, run_hf_cb, run_hf_static
from bench.toy_models import MODELS, ensure_model
from bench.workload import Workload, WorkloadSpec, make_workload
from lmbatch.io.metrics import percentile
from lmbatch.io.ordering import ORDERINGS

PEERS = ["hf_static", "hf_static_sorted", "hf_cb"]
PEER_LABELS = {"hf_static": "vs (1) static", "hf_static_sorted": "vs (2) sorted", "hf_cb": "vs (3) HF CB"}


def pct(xs, q) -> float:
    p = percentile(xs, q)
    return float("nan") if p is None else p


def _hit(x: float) -> str:
    return "n/a" if x < 0 else f"{x:.2f}"


def summarize(r: RunResult, prompt_tokens: int, output_tokens: int, floor: dict) -> dict:
    return {
        "wall_s": r.wall_s,
        "output_tok_s": output_tokens / r.wall_s,
        "total_tok_s": (prompt_tokens + output_tokens) / r.wall_s,
        "ttft_p50": pct(r.ttft_s, 50), "ttft_p99": pct(r.ttft_s, 99),
        "e2e_p50": pct(r.e2e_s, 50), "e2e_p99": pct(r.e2e_s, 99),
        "prefix_hit_rate": sum(r.cached_tokens) / prompt_tokens if r.cached_tokens else -1.0,
        "x_floor_all": r.wall_s / floor["floor_s_all"],
        "x_floor_skip": r.wall_s / floor["floor_s_prefix_skipped"],
    }


def systems_list(args) -> list[tuple[str, dict]]:
    out = []
    wanted = set(args.systems.split(",")) if args.systems else None
    for p in PEERS:
        if wanted is None or p in wanted or "peers" in wanted:
            out.append((p, {}))
    if wanted is None or "lmbatch" in wanted or any(w.startswith("lmbatch") for w in wanted):
        for pol in args.policies.split(","):
            out.append((f"lmbatch[{pol}]", {"policy": pol, "prefix_caching": True}))
        nocache = ORDERINGS if args.nocache_policies == "all" else [
            p for p in args.nocache_policies.split(",") if p]
        for pol in nocache:
            out.append((f"lmbatch[{pol},nocache]", {"policy": pol, "prefix_caching": False}))
    return out


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="default", choices=["default", "quick", "gpu"])
    ap.add_argument("--requests", type=int, help="override the preset's number of requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, help="max repeats (default 3 on CPU, 1 on GPU)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: after the first repeat, a system runs again only if it is expected to end "
                         "within the budget (default 1080 on CPU, 240 on GPU); the first repeat always runs")
    add_device_options(ap, None, None, device_default="cpu, cuda for --preset gpu",
                       dtype_default="float32 on cpu, bf16 on cuda")
    ap.add_argument("--model", default=None, help="cpu | gpu | small (toy model built under bench/results)")
    ap.add_argument("--systems", default=None,
                    help="comma list: hf_static,hf_static_sorted,hf_cb,peers,lmbatch (default all)")
    ap.add_argument("--policies", default=",".join(ORDERINGS))
    ap.add_argument("--nocache-policies", default="all", help="policies also run without prefix caching")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None)
    ap.add_argument("--cb-page-size", type=int, default=None)
    ap.add_argument("--verify", type=int, default=6, help="requests checked against unpadded model.generate")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--model-dir", default=None, help="where toy models are built (default: --out)")
    return ap.parse_args(argv)


@dataclass
class Plan:
    """What the command line resolves to (the preset decides what is not given)."""
    device: str
    dtype_name: str
    repeats: int
    model_name: str
    budget_s: float
    out_dir: Path

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def plan_of(args: argparse.Namespace) -> Plan:
    gpu = args.preset == "gpu"
    device = args.device or ("cuda" if gpu else "cpu")
    return Plan(device=device, dtype_name=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                repeats=args.repeats or (1 if gpu else 3), model_name=args.model or ("gpu" if gpu else "cpu"),
                budget_s=args.time_budget or (240.0 if gpu else 1080.0), out_dir=Path(args.out))


# ---- the systems and what they share ------------------------------------------------------------
@dataclass
class Bench:
    """The model, the workload and the settings every timed run of every system shares."""
    args: argparse.Namespace
    plan: Plan
    model_path: Path
    workload: Workload
    prompts: list[list[int]]
    max_tokens: list[int]
    model: torch.nn.Module
    cb_model: torch.nn.Module
    eng_kwargs: dict
    cb_kwargs: dict

    def run(self, name: str, opts: dict, prompts, max_tokens) -> RunResult:
        device = self.plan.device
        if name == "hf_static":
            return run_hf_static(self.model, prompts, max_tokens, self.args.static_batch, False, device)
        if name == "hf_static_sorted":
            return run_hf_static(self.model, prompts, max_tokens, self.args.static_batch, True, device)
        if name == "hf_cb":
            return run_hf_cb(self.cb_model, prompts, max_tokens, device, self.cb_kwargs)
        return run_lmbatch(str(self.model_path), prompts, max_tokens, opts["policy"], opts["prefix_caching"],
                           device, self.plan.dtype_name, self.eng_kwargs)


def load_bench(args: argparse.Namespace, plan: Plan) -> Bench:
    model_path = ensure_model(plan.model_name, Path(args.model_dir) if args.model_dir else plan.out_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    spec = WorkloadSpec.preset(args.preset, num_requests=args.requests, seed=args.seed, token_hi=len(tok))
    wl = make_workload(spec)
    print(f"workload: {json.dumps(wl.summary())}", flush=True)
    dtype = getattr(torch, plan.dtype_name)
    model = load_model(str(model_path), plan.device, dtype)
    cb_model = load_model(str(model_path), plan.device, dtype)  # CB switches the attention implementation
    cb_kwargs, eng_kwargs = kv_settings(args, plan, wl)
    return Bench(args, plan, model_path, wl, wl.prompts(), wl.max_tokens(), model, cb_model, eng_kwargs, cb_kwargs)


def kv_settings(args: argparse.Namespace, plan: Plan, wl: Workload) -> tuple[dict, dict]:
    """hf_cb's and lmbatch's settings: the same KV capacity (tokens), room for 32 (CPU) / 256 (GPU)
    of the longest requests."""
    longest = max(len(p) + m for p, m in zip(wl.prompts(), wl.max_tokens()))
    kv_tokens = longest * (256 if plan.cuda else 32)
    cb_kwargs = {}
    if args.cb_max_batch_tokens:
        cb_kwargs["max_batch_tokens"] = args.cb_max_batch_tokens
    if args.cb_page_size:
        cb_kwargs["page_size"] = args.cb_page_size
    page = args.cb_page_size or (32 if not plan.cuda else 256)
    cb_kwargs["num_blocks"] = -(-kv_tokens // page)
    eng_kwargs = {"num_kv_blocks": -(-kv_tokens // 16), "max_model_len": wl.spec.max_model_len}
    if args.max_num_batched_tokens:
        eng_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_num_seqs:
        eng_kwargs["max_num_seqs"] = args.max_num_seqs
    return cb_kwargs, eng_kwargs


# ---- the FLOP floor -----------------------------------------------------------------------------
class FloorMeter:
    """The workload's FLOP floor at the best matmul rate measured in the run (the machine may be shared)."""

    def __init__(self, bench: Bench):
        self.device, self.dtype = bench.plan.device, getattr(torch, bench.plan.dtype_name)
        self.shape = model_shape(bench.model)
        self.n_params = sum(p.numel() for p in bench.model.parameters())
        self.rows = (1024, 4096, 8192) if bench.plan.cuda else (256, 512, 1024)
        self.prompt_lens = [len(p) for p in bench.prompts]
        self.max_tokens = bench.max_tokens
        self.skippable = ideal_skippable(bench.workload.requests)
        self.rate = measure_matmul_rate(self.shape, self.device, self.dtype, rows=self.rows)
        self.rates = [self.rate["flops_per_s"]]
        self.floor = self._floor()
        print(f"model: {self.n_params / 1e6:.1f}M params; matmul rate {self.rate['flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s; floor {self.floor['floor_s_all']:.2f}s (all prompt tokens), "
              f"{self.floor['floor_s_prefix_skipped']:.2f}s (prefix-cache-skippable removed)", flush=True)

    def _floor(self) -> dict:
        return floors(self.shape, self.prompt_lens, self.max_tokens, self.skippable, self.rate["flops_per_s"])

    def remeasure(self) -> None:
        self.rates.append(measure_matmul_rate(self.shape, self.device, self.dtype, rows=self.rows, reps=3,
                                              min_time_s=0.1)["flops_per_s"])

    def settle(self, runs: dict[str, list[dict]]) -> None:
        """The floor at the best rate seen, the runs' x-floor columns against it, and the median rate."""
        if max(self.rates) > self.rate["flops_per_s"]:
            self.rate["flops_per_s"] = max(self.rates)
            self.floor = self._floor()
            for lst in runs.values():
                for s in lst:
                    s["x_floor_all"] = s["wall_s"] / self.floor["floor_s_all"]
                    s["x_floor_skip"] = s["wall_s"] / self.floor["floor_s_prefix_skipped"]
        self.rate["all_measurements"] = self.rates
        # on a shared machine the best rate is a quiet moment; the median is what the systems mostly saw
        med_rate = statistics.median(self.rates)
        best = self.rate["flops_per_s"]
        self.floor["floor_s_all_at_median_rate"] = self.floor["floor_s_all"] * best / med_rate
        self.floor["floor_s_prefix_skipped_at_median_rate"] = self.floor["floor_s_prefix_skipped"] * best / med_rate
        self.rate["median_flops_per_s"] = med_rate


# ---- the timed runs -----------------------------------------------------------------------------
def warm_up(bench: Bench, systems: list[tuple[str, dict]], failed: dict[str, str]) -> list[tuple[str, dict]]:
    """Every system once on a few short requests (first-call allocations, lazy imports); the systems
    that ran."""
    wp, wm = [p[:64] for p in bench.prompts[:4]], [4] * min(4, len(bench.prompts))
    for name, opts in systems:
        try:
            bench.run(name, opts, wp, wm)
        except Exception as e:  # noqa: BLE001 - a system that cannot run is reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"[skip] {name}: {failed[name]}", flush=True)
            traceback.print_exc()
    return [s for s in systems if s[0] not in failed]


def timed_run(bench: Bench, name: str, opts: dict, rep: int, floor: dict, failed: dict[str, str]
              ) -> tuple[dict, RunResult] | None:
    """One run of one system on the whole workload, summarized; None (and `failed` says why) if it fails."""
    wl = bench.workload
    gc.collect()
    try:
        r = bench.run(name, opts, bench.prompts, bench.max_tokens)
    except Exception as e:  # noqa: BLE001
        failed[name] = f"{type(e).__name__}: {e}"
        print(f"[fail] {name}: {failed[name]}", flush=True)
        traceback.print_exc()
        return None
    s = summarize(r, wl.prompt_tokens, wl.output_tokens, floor)
    s["work_ok"] = all(len(t) == m for t, m in zip(r.tokens, bench.max_tokens))
    s["extra"] = r.extra
    s["rep"] = rep
    print(f"rep {rep + 1}/{bench.plan.repeats} {name:34s} wall {r.wall_s:7.2f}s  out {s['output_tok_s']:7.1f} tok/s"
          f"  x floor {s['x_floor_all']:.2f}  hit {_hit(s['prefix_hit_rate'])}"
          f"  {'' if s['work_ok'] else 'WORK MISMATCH'}", flush=True)
    return s, r


def run_repeats(bench: Bench, systems: list[tuple[str, dict]], meter: FloorMeter, failed: dict[str, str],
                t_start: float) -> tuple[dict[str, list[dict]], dict[str, RunResult]]:
    """The repeats, round-robin with a rotating start; per system its summaries and its last RunResult."""
    runs: dict[str, list[dict]] = {s[0]: [] for s in systems}
    last: dict[str, RunResult] = {}
    for rep in range(bench.plan.repeats):
        k = rep % max(len(systems), 1)
        for name, opts in systems[k:] + systems[:k]:
            # after the first repeat a system runs again only if it is expected to end inside the budget
            if rep > 0 and (not runs[name]
                            or time.monotonic() - t_start + runs[name][-1]["wall_s"] + 5 > bench.plan.budget_s):
                continue
            done = timed_run(bench, name, opts, rep, meter.floor, failed)
            if done is not None:
                runs[name].append(done[0])
                last[name] = done[1]
        meter.remeasure()  # the machine may be shared: the floor uses the best matmul rate seen during the run
    return runs, last


# ---- checks and statistics ----------------------------------------------------------------------
def verify(bench: Bench, last: dict[str, RunResult]) -> dict[str, dict]:
    """Per system: identical work, greedy tokens vs unpadded model.generate (a sample) and vs hf_cb."""
    prompts, max_tokens = bench.prompts, bench.max_tokens
    n_ver = min(bench.args.verify, len(prompts))
    ver_idx = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + 8 * max_tokens[i])[:n_ver]
    refs = {i: reference_tokens(bench.model, prompts[i], max_tokens[i], bench.plan.device) for i in ver_idx}
    verification = {}
    cb_tokens = last["hf_cb"].tokens if "hf_cb" in last else None
    for name, r in last.items():
        v = {"work_identical": all(len(t) == m for t, m in zip(r.tokens, max_tokens)),
             "output_tokens": sum(len(t) for t in r.tokens),
             "ref_match": f"{sum(r.tokens[i] == refs[i] for i in ver_idx)}/{n_ver}"}
        if cb_tokens is not None:
            v["match_hf_cb"] = f"{sum(a == b for a, b in zip(r.tokens, cb_tokens))}/{len(prompts)}"
        verification[name] = v
    return verification


def medians_of(runs: dict[str, list[dict]], wl: Workload) -> dict[str, dict]:
    """Per system that ran: the median of every numeric column over its repeats, and its ratios to the peers."""
    medians = {}
    for name, lst in runs.items():
        if not lst:
            continue
        first = lst[0]
        keys = [k for k in first
                if isinstance(first[k], (int, float)) and not isinstance(first[k], bool) and k != "rep"]
        med = {k: statistics.median(x[k] for x in lst) for k in keys}
        med["output_tok_s"] = wl.output_tokens / med["wall_s"]
        med["total_tok_s"] = (wl.prompt_tokens + wl.output_tokens) / med["wall_s"]
        med["repeats"] = len(lst)
        med["walls"] = [x["wall_s"] for x in lst]
        med["work_ok"] = all(x["work_ok"] for x in lst)
        medians[name] = med
    for name, med in medians.items():
        med["ratios_of_medians"] = {p: med["output_tok_s"] / medians[p]["output_tok_s"] for p in PEERS if p in medians}
        med["ratios"] = paired_ratios(runs, medians, name)
    return medians


def paired_ratios(runs: dict[str, list[dict]], medians: dict[str, dict], name: str) -> dict[str, float]:
    """The peer's wall over this system's wall within the same repeat (the machine's load drifts between
    repeats), median over the repeats both ran in; falls back to the ratio of medians."""
    ratios = {}
    mine = {x["rep"]: x["wall_s"] for x in runs[name]}
    for p in PEERS:
        if p not in medians:
            continue
        pairs = [x["wall_s"] / mine[x["rep"]] for x in runs[p] if x["rep"] in mine]
        ratios[p] = statistics.median(pairs) if pairs else medians[name]["ratios_of_medians"][p]
    return ratios


# ---- the result ---------------------------------------------------------------------------------
def machine_info(plan: Plan, load_start: list[float], git_start: dict) -> dict:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": plan.device, "dtype": plan.dtype_name,
               "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg()),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    if plan.cuda:
        machine["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    machine["transformers"] = transformers.__version__
    machine["git"] = git_start
    return machine


def write_result(result: dict, out_dir: Path) -> None:
    """<timestamp>.json, latest.json and latest.md under out_dir; prints the table."""
    stamp = result["timestamp"]
    md = render_markdown(result)
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "latest.md").write_text(md)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=1, default=str))
    print()
    print(md)
    print(f"wrote {out_dir / (stamp + '.json')} and {out_dir / 'latest.md'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_of(args)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if plan.cuda and not torch.cuda.is_available():
        print("cuda requested but not available", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    load_start = list(os.getloadavg())
    git_start = _git_state()  # what is imported below; HEAD may move while the benchmark runs
    bench = load_bench(args, plan)
    meter = FloorMeter(bench)
    failed: dict[str, str] = {}
    systems = warm_up(bench, systems_list(args), failed)
    runs, last = run_repeats(bench, systems, meter, failed, t_start)
    meter.settle(runs)
    verification = verify(bench, last)
    wl = bench.workload
    result = {
        "timestamp": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": machine_info(plan, load_start, git_start), "args": vars(args), "repeats": plan.repeats,
        "model": {"name": plan.model_name, "params": meter.n_params, "shape": meter.shape.to_dict(),
                  **MODELS[plan.model_name]},
        "workload": wl.summary(), "workload_spec": wl.spec.__dict__,
        "matmul_rate": meter.rate, "floor": meter.floor, "medians": medians_of(runs, wl), "runs": runs,
        "verification": verification, "failed": failed,
        "per_request": {n: {"ttft_s": r.ttft_s, "e2e_s": r.e2e_s} for n, r in last.items()},
        "engine_kwargs": bench.eng_kwargs, "cb_kwargs": bench.cb_kwargs,
        "bench_wall_s": time.monotonic() - t_start,
    }
    write_result(result, plan.out_dir)
    return 0 if not failed else 1


def _git_state() -> dict:
    """The commit measured and whether engine/ or io/ had uncommitted changes (then it is not that commit)."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty_paths": git("status", "--porcelain", "--", "engine", "io").splitlines()}


def render_markdown(res: dict) -> str:
    m, w, f = res["machine"], res["workload"], res["floor"]
    med = res["medians"]
    lines = [
        f"### Benchmark {res['timestamp']}",
        "",
        (f"Machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; "
        f"device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['dtype']}, torch {m['torch']}, "
        f"transformers {m.get('transformers', '?')}; lmbatch at {m.get('git', {}).get('commit', '?')}"
        f"{' + uncommitted engine/io changes' if m.get('git', {}).get('dirty_paths') else ''}."),
        (f"Model: Llama-shaped, {res['model']['params'] / 1e6:.1f}M params (hidden {res['model']['hidden']}, "
        f"{res['model']['layers']} layers, vocab {res['model']['vocab_size']})."),
        (f"Workload: {w['requests']} requests, {w['prompt_tokens']} prompt tokens, {w['output_tokens']} output tokens "
        f"(greedy, EOS ignored), {w['requests_with_shared_prefix']} with a shared prefix; "
        "medians of n repeats (column n), systems interleaved."),
        (f"FLOP floor: {f['floor_s_all']:.2f} s with all prompt tokens, {f['floor_s_prefix_skipped']:.2f} s with the "
        f"{f['skipped_prompt_tokens']} prefix-cache-skippable tokens removed "
        f"(best matmul rate measured in this run: {res['matmul_rate']['flops_per_s'] / 1e9:.1f} GFLOP/s; "
        f"median of {len(res['matmul_rate'].get('all_measurements', []))} measurements "
        f"{res['matmul_rate'].get('median_flops_per_s', 0) / 1e9:.1f} GFLOP/s, floors at the median rate "
        f"{f.get('floor_s_all_at_median_rate', 0):.2f} / {f.get('floor_s_prefix_skipped_at_median_rate', 0):.2f} s)."),
        "",
        "| system | n | out tok/s | total tok/s | wall s | TTFT p50 / p99 s | E2E p50 / p99 s | prefix hit "
        "| x floor (all / skip) | " + " | ".join(PEER_LABELS[p] for p in PEERS if p in med) + " | greedy = ref |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * sum(p in med for p in PEERS) + "---|",
    ]
    best = max(med, key=lambda n: med[n]["output_tok_s"]) if med else None
    for name, s in med.items():
        v = res["verification"].get(name, {})
        ratios = " | ".join(f"{s['ratios'][p]:.2f}x" for p in PEERS if p in med)
        label = f"**{name}**" if name == best else name
        lines.append(
            f"| {label} | {s['repeats']} | {s['output_tok_s']:.1f} | {s['total_tok_s']:.0f} | {s['wall_s']:.2f} "
            f"| {s['ttft_p50']:.2f} / {s['ttft_p99']:.2f} | {s['e2e_p50']:.2f} / {s['e2e_p99']:.2f} "
            f"| {_hit(s['prefix_hit_rate'])} | {s['x_floor_all']:.2f} / {s['x_floor_skip']:.2f} | {ratios} "
            f"| {v.get('ref_match', '-')}{'' if s['work_ok'] else ' WORK MISMATCH'} |")
    lines.append("")
    lines.append("Ratios: peer wall / system wall within the same repeat, median over the repeats both ran in.")
    lines.append("Identical work: " + ("every system produced exactly max_tokens tokens for every request."
                                       if all(s["work_ok"] for s in med.values()) else "MISMATCH, see JSON."))
    agree = {n: v.get("match_hf_cb") for n, v in res["verification"].items() if "match_hf_cb" in v}
    if agree:
        lines.append("Greedy tokens equal to transformers continuous batching (requests): "
                     + ", ".join(f"{n} {a}" for n, a in agree.items()) + ".")
    if res["failed"]:
        lines.append("Failed / skipped: " + "; ".join(f"{n}: {e}" for n, e in res["failed"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
