"""Side-by-side benchmark: transformers peers and lmbatch, same model, same prompts, same process.

    .venv/bin/python bench/run.py                       # CPU default (make bench)
    .venv/bin/python bench/run.py --preset quick        # a couple of minutes
    .venv/bin/python bench/run.py --preset gpu          # cuda + bfloat16, larger model and workload

Systems run round-robin inside each repeat (the start rotates per repeat), medians over repeats
are reported. Writes bench/results/<timestamp>.json (everything, per-request times of the last
repeat included) and bench/results/latest.md, and prints the markdown table.

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
from datetime import UTC, datetime
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()  # before torch loads libgomp: same threading for every system

import torch

from lmbatch.io.metrics import percentile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from flops import floors, ideal_skippable, measure_matmul_rate, model_shape
from lmbatch_system import POLICIES, run_lmbatch
from peers import RunResult, load_model, reference_tokens, run_hf_cb, run_hf_static
from workload import WorkloadSpec, make_workload

MODELS = {
    # ~24M parameters, Llama-shaped, 32k vocabulary (16.4M of it in embedding + LM head)
    "cpu": {"vocab_size": 32000, "hidden": 256, "layers": 10, "heads": 8, "kv_heads": 4, "max_positions": 4096},
    # ~270M parameters for an H200
    "gpu": {"vocab_size": 32000, "hidden": 1024, "layers": 16, "heads": 16, "kv_heads": 8, "max_positions": 4096},
    # scaling runs
    "small": {"vocab_size": 4096, "hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "max_positions": 1024},
}
PEERS = ["hf_static", "hf_static_sorted", "hf_cb"]
PEER_LABELS = {"hf_static": "vs (1) static", "hf_static_sorted": "vs (2) sorted", "hf_cb": "vs (3) HF CB"}


def ensure_model(name: str, root: Path) -> Path:
    path = root / f"model-{name}"
    if not (path / "config.json").exists():
        from lmbatch.testing import build_toy_model

        build_toy_model(path, tokenizer_vocab=min(32000, MODELS[name]["vocab_size"]), **MODELS[name])
    return path


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
        nocache = POLICIES if args.nocache_policies == "all" else [
            p for p in args.nocache_policies.split(",") if p]
        for pol in nocache:
            out.append((f"lmbatch[{pol},nocache]", {"policy": pol, "prefix_caching": False}))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=["default", "quick", "gpu"])
    ap.add_argument("--requests", type=int, help="override the preset's number of requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, help="max repeats (default 3 on CPU, 1 on GPU)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: after the first repeat, a system runs again only if it is expected to end "
                         "within the budget (default 1080 on CPU, 240 on GPU); the first repeat always runs")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cpu, cuda for --preset gpu)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on cpu, bf16 on cuda)")
    ap.add_argument("--model", default=None, help="cpu | gpu | small (toy model built under bench/results)")
    ap.add_argument("--systems", default=None,
                    help="comma list: hf_static,hf_static_sorted,hf_cb,peers,lmbatch (default all)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--nocache-policies", default="all", help="policies also run without prefix caching")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None)
    ap.add_argument("--cb-page-size", type=int, default=None)
    ap.add_argument("--verify", type=int, default=6, help="requests checked against unpadded model.generate")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--model-dir", default=None, help="where toy models are built (default: --out)")
    args = ap.parse_args()

    gpu = args.preset == "gpu"
    device = args.device or ("cuda" if gpu else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or (1 if gpu else 3)
    model_name = args.model or ("gpu" if gpu else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda requested but not available", file=sys.stderr)
        return 2

    t_start = time.monotonic()
    load_start = list(os.getloadavg())
    git_start = _git_state()  # what is imported below; HEAD may move while the benchmark runs
    model_path = ensure_model(model_name, Path(args.model_dir) if args.model_dir else out_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    spec = WorkloadSpec.preset(args.preset, num_requests=args.requests, seed=args.seed, token_hi=len(tok))
    wl = make_workload(spec)
    prompts, max_tokens = wl.prompts(), wl.max_tokens()
    prompt_tokens, output_tokens = wl.prompt_tokens, wl.output_tokens
    print(f"workload: {json.dumps(wl.summary())}", flush=True)

    model = load_model(str(model_path), device, dtype)
    cb_model = load_model(str(model_path), device, dtype)  # CB switches the attention implementation
    shape = model_shape(model)
    n_params = sum(p.numel() for p in model.parameters())
    mm_rows = (1024, 4096, 8192) if device.startswith("cuda") else (256, 512, 1024)
    rate = measure_matmul_rate(shape, device, dtype, rows=mm_rows)
    skippable = ideal_skippable(wl.requests)
    floor = floors(shape, [len(p) for p in prompts], max_tokens, skippable, rate["flops_per_s"])
    print(f"model: {n_params / 1e6:.1f}M params; matmul rate {rate['flops_per_s'] / 1e9:.1f} GFLOP/s; "
          f"floor {floor['floor_s_all']:.2f}s (all prompt tokens), "
          f"{floor['floor_s_prefix_skipped']:.2f}s (prefix-cache-skippable removed)", flush=True)

    # same KV capacity (tokens) for hf_cb and lmbatch: room for 32 (CPU) / 256 (GPU) longest requests
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    kv_tokens = longest * (256 if device.startswith("cuda") else 32)
    cb_kwargs = {}
    if args.cb_max_batch_tokens:
        cb_kwargs["max_batch_tokens"] = args.cb_max_batch_tokens
    if args.cb_page_size:
        cb_kwargs["page_size"] = args.cb_page_size
    page = args.cb_page_size or (32 if not device.startswith("cuda") else 256)
    cb_kwargs["num_blocks"] = -(-kv_tokens // page)
    eng_kwargs = {"num_kv_blocks": -(-kv_tokens // 16), "max_model_len": spec.max_model_len}
    if args.max_num_batched_tokens:
        eng_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_num_seqs:
        eng_kwargs["max_num_seqs"] = args.max_num_seqs

    def run_one(name: str, opts: dict, P, M) -> RunResult:
        if name == "hf_static":
            return run_hf_static(model, P, M, args.static_batch, False, device)
        if name == "hf_static_sorted":
            return run_hf_static(model, P, M, args.static_batch, True, device)
        if name == "hf_cb":
            return run_hf_cb(cb_model, P, M, device, cb_kwargs)
        return run_lmbatch(str(model_path), P, M, opts["policy"], opts["prefix_caching"], device, dtype_name,
                           eng_kwargs)

    systems = systems_list(args)
    # warm-up: every system once on a few short requests (first-call allocations, lazy imports)
    wp, wm = [p[:64] for p in prompts[:4]], [4] * min(4, len(prompts))
    failed: dict[str, str] = {}
    for name, opts in systems:
        try:
            run_one(name, opts, wp, wm)
        except Exception as e:  # noqa: BLE001 - a system that cannot run is reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"[skip] {name}: {failed[name]}", flush=True)
            traceback.print_exc()
    systems = [s for s in systems if s[0] not in failed]

    budget = args.time_budget or (240.0 if gpu else 1080.0)
    runs: dict[str, list[dict]] = {s[0]: [] for s in systems}
    last: dict[str, RunResult] = {}
    rates = [rate["flops_per_s"]]
    for rep in range(repeats):
        k = rep % max(len(systems), 1)
        for name, opts in systems[k:] + systems[:k]:
            # after the first repeat a system runs again only if it is expected to end inside the budget
            if rep > 0 and (not runs[name] or time.monotonic() - t_start + runs[name][-1]["wall_s"] + 5 > budget):
                continue
            gc.collect()
            try:
                r = run_one(name, opts, prompts, max_tokens)
            except Exception as e:  # noqa: BLE001
                failed[name] = f"{type(e).__name__}: {e}"
                print(f"[fail] {name}: {failed[name]}", flush=True)
                traceback.print_exc()
                continue
            s = summarize(r, prompt_tokens, output_tokens, floor)
            s["work_ok"] = all(len(t) == m for t, m in zip(r.tokens, max_tokens))
            s["extra"] = r.extra
            s["rep"] = rep
            runs[name].append(s)
            last[name] = r
            print(f"rep {rep + 1}/{repeats} {name:34s} wall {r.wall_s:7.2f}s  out {s['output_tok_s']:7.1f} tok/s"
                  f"  x floor {s['x_floor_all']:.2f}  hit {_hit(s['prefix_hit_rate'])}"
                  f"  {'' if s['work_ok'] else 'WORK MISMATCH'}", flush=True)
        # the machine may be shared: the floor uses the best matmul rate seen during the run
        rates.append(measure_matmul_rate(shape, device, dtype, rows=mm_rows, reps=3, min_time_s=0.1)["flops_per_s"])
    if max(rates) > rate["flops_per_s"]:
        rate["flops_per_s"] = max(rates)
        floor = floors(shape, [len(p) for p in prompts], max_tokens, skippable, rate["flops_per_s"])
        for lst in runs.values():
            for s in lst:
                s["x_floor_all"] = s["wall_s"] / floor["floor_s_all"]
                s["x_floor_skip"] = s["wall_s"] / floor["floor_s_prefix_skipped"]
    rate["all_measurements"] = rates
    # on a shared machine the best rate is a quiet moment; the median is what the systems mostly saw
    med_rate = statistics.median(rates)
    floor["floor_s_all_at_median_rate"] = floor["floor_s_all"] * rate["flops_per_s"] / med_rate
    floor["floor_s_prefix_skipped_at_median_rate"] = floor["floor_s_prefix_skipped"] * rate["flops_per_s"] / med_rate
    rate["median_flops_per_s"] = med_rate

    # greedy verification
    n_ver = min(args.verify, len(prompts))
    ver_idx = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + 8 * max_tokens[i])[:n_ver]
    refs = {i: reference_tokens(model, prompts[i], max_tokens[i], device) for i in ver_idx}
    verification = {}
    cb_tokens = last["hf_cb"].tokens if "hf_cb" in last else None
    for name, r in last.items():
        v = {"work_identical": all(len(t) == m for t, m in zip(r.tokens, max_tokens)),
             "output_tokens": sum(len(t) for t in r.tokens),
             "ref_match": f"{sum(r.tokens[i] == refs[i] for i in ver_idx)}/{n_ver}"}
        if cb_tokens is not None:
            v["match_hf_cb"] = f"{sum(a == b for a, b in zip(r.tokens, cb_tokens))}/{len(prompts)}"
        verification[name] = v

    medians = {}
    for name, lst in runs.items():
        if not lst:
            continue
        first = lst[0]
        keys = [k for k in first
                if isinstance(first[k], (int, float)) and not isinstance(first[k], bool) and k != "rep"]
        med = {k: statistics.median(x[k] for x in lst) for k in keys}
        med["output_tok_s"] = output_tokens / med["wall_s"]
        med["total_tok_s"] = (prompt_tokens + output_tokens) / med["wall_s"]
        med["repeats"] = len(lst)
        med["walls"] = [x["wall_s"] for x in lst]
        med["work_ok"] = all(x["work_ok"] for x in lst)
        medians[name] = med
    for name, med in medians.items():
        med["ratios_of_medians"] = {p: med["output_tok_s"] / medians[p]["output_tok_s"] for p in PEERS if p in medians}
        # paired: the peer's wall over this system's wall within the same repeat (the machine's load drifts
        # between repeats), median over the repeats both ran in; falls back to the ratio of medians
        med["ratios"] = {}
        mine = {x["rep"]: x["wall_s"] for x in runs[name]}
        for p in PEERS:
            if p not in medians:
                continue
            pairs = [x["wall_s"] / mine[x["rep"]] for x in runs[p] if x["rep"] in mine]
            med["ratios"][p] = statistics.median(pairs) if pairs else med["ratios_of_medians"][p]

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": device, "dtype": dtype_name,
               "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg()),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    machine["transformers"] = transformers.__version__
    machine["git"] = git_start
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "timestamp": stamp, "machine": machine, "args": vars(args), "repeats": repeats,
        "model": {"name": model_name, "params": n_params, "shape": shape.to_dict(), **MODELS[model_name]},
        "workload": wl.summary(), "workload_spec": wl.spec.__dict__,
        "matmul_rate": rate, "floor": floor, "medians": medians, "runs": runs,
        "verification": verification, "failed": failed,
        "per_request": {n: {"ttft_s": r.ttft_s, "e2e_s": r.e2e_s} for n, r in last.items()},
        "engine_kwargs": eng_kwargs, "cb_kwargs": cb_kwargs,
        "bench_wall_s": time.monotonic() - t_start,
    }
    md = render_markdown(result)
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "latest.md").write_text(md)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=1, default=str))
    print()
    print(md)
    print(f"wrote {out_dir / (stamp + '.json')} and {out_dir / 'latest.md'}")
    return 0 if not failed else 1


def _git_state() -> dict:
    """The commit measured and whether engine/ or io/ had uncommitted changes (then it is not that commit)."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, check=False)
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
