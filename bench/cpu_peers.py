"""lmbatch against vLLM's CPU build at real model sizes, float32 and bfloat16, side by side.

    .venv/bin/python -m bench.cpu_peers                                # both shapes, 3 workloads
    .venv/bin/python -m bench.cpu_peers --models qwen2-0.5b --workloads generation --repeats 2

Random-weight models shaped like Qwen2-0.5B and Llama-3.2-1B (their real configs; no download),
the workloads of bench/workload.py's `mixed`, `labelling` and `generation` presets. Each repeat
runs every (system, dtype) once, the order rotating per repeat; vLLM runs in a subprocess of its
own virtualenv (`make bench-peers`), lmbatch in this process on a fresh engine, both on the same
token ids, greedy, EOS ignored, prefix caching on, the same max_num_seqs and
max_num_batched_tokens. When vLLM is not installed the table says so and lmbatch still runs.

Reported per workload: wall time (min / median / max over repeats), output tokens/s, the ratio
of lmbatch's best dtype to vLLM's best and float32 to float32, greedy agreement with vLLM, and
three floors: the workload's matmul FLOPs at torch's best GEMM rate per dtype measured in this
run, the same at the ISA's peak (cores x clock x FLOP/cycle), and the decode steps' weight bytes
at the measured streaming bandwidth. Writes bench/results/cpu-peers-<time>.json and .md.
Run from the repository root; bench/vllm_peer.py, which runs in vLLM's virtualenv, is started as
a script there (it imports nothing of lmbatch or of this package).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()

import torch

from bench.cli import BENCH, RESULTS, parser
from bench.cpu_info import cpu_info, isa_peak_flops, stream_bandwidth
from bench.flops import ideal_skippable, measure_matmul_rate, model_shape, workload_flops
from bench.lmbatch_system import run_lmbatch
from bench.toy_models import SHAPES, ensure_shaped_model
from bench.workload import WorkloadSpec, make_workload

VLLM_PYTHON = BENCH / ".peers" / "vllm" / "bin" / "python"
VLLM_PEER = BENCH / "vllm_peer.py"   # a plain script: vLLM's virtualenv has neither lmbatch nor this package
MODELS_DIR = BENCH / ".models"
ENGINE = {"max_num_seqs": 256, "max_num_batched_tokens": 2048}
MAX_MODEL_LEN = 4096

def run_vllm(model: Path, dtype: str, prompts, max_tokens) -> dict:
    job = {"model": str(model), "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens,
           "max_model_len": MAX_MODEL_LEN, **ENGINE}
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        # -P: the script's folder (this package's modules) stays off the peer's sys.path
        proc = subprocess.run([str(VLLM_PYTHON), "-P", str(VLLM_PEER), str(job_path), str(result_path)],
                              capture_output=True, text=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM exited {proc.returncode}: {proc.stderr[-2000:]}")
        return json.loads(result_path.read_text())


def run_ours(model: Path, dtype: str, prompts, max_tokens) -> dict:
    r = run_lmbatch(str(model), prompts, max_tokens, policy="prefix_longest_first", dtype=dtype,
                    engine_kwargs={**ENGINE, "max_model_len": MAX_MODEL_LEN})
    return {"wall_s": r.wall_s, "tokens": r.tokens}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of tokens before two runs' continuations first differ (bf16 runs drift apart late)."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        same, total = same + n, total + max(len(x), len(y))
    return same / max(total, 1)


def run_workload(model: Path, workload_name: str, dtypes, repeats: int, with_vllm: bool) -> dict:
    w = make_workload(WorkloadSpec.preset(workload_name, token_hi=1024, max_model_len=MAX_MODEL_LEN))
    prompts, max_tokens = w.prompts(), w.max_tokens()
    systems = [("lmbatch", d) for d in dtypes] + ([("vllm", d) for d in dtypes] if with_vllm else [])
    runs: dict[str, list[dict]] = {f"{s}:{d}": [] for s, d in systems}
    for rep in range(repeats):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]
        for system, dtype in order:
            fn = run_ours if system == "lmbatch" else run_vllm
            try:
                runs[f"{system}:{dtype}"].append(fn(model, dtype, prompts, max_tokens))
            except Exception as e:  # a peer that fails is reported, the others still run
                runs[f"{system}:{dtype}"].append({"error": str(e)[-1500:]})
            print(f"  {workload_name} rep {rep} {system}:{dtype}: "
                  f"{runs[f'{system}:{dtype}'][-1].get('wall_s', 'failed')}", flush=True)
    return {"summary": w.summary(), "runs": runs, "requests": w.requests}


def summarize(result: dict) -> dict:
    out_tokens = result["summary"]["output_tokens"]
    table = {}
    for key, runs in result["runs"].items():
        walls = [r["wall_s"] for r in runs if "wall_s" in r]
        if not walls:
            table[key] = {"error": runs[-1].get("error", "no run")}
            continue
        table[key] = {"wall_min": min(walls), "wall_median": statistics.median(walls), "wall_max": max(walls),
                      "out_tok_s_best": out_tokens / min(walls), "tokens": runs[-1]["tokens"]}
    return table


def ratios(table: dict, dtypes) -> dict:
    def best(system):
        walls = [table[f"{system}:{d}"]["wall_min"] for d in dtypes if "wall_min" in table.get(f"{system}:{d}", {})]
        return min(walls) if walls else None

    out = {}
    ours, theirs = best("lmbatch"), best("vllm")
    if ours and theirs:
        out["best_dtype_vs_vllm_best"] = theirs / ours
    f32 = (table.get("lmbatch:float32", {}).get("wall_min"), table.get("vllm:float32", {}).get("wall_min"))
    if all(f32):
        out["float32_vs_float32"] = f32[1] / f32[0]
    for d in dtypes:
        a, b = table.get(f"lmbatch:{d}", {}), table.get(f"vllm:{d}", {})
        if "tokens" in a and "tokens" in b:
            out[f"greedy_agreement_{d}"] = agreement(a["tokens"], b["tokens"])
            out[f"common_prefix_{d}"] = prefix_agreement(a["tokens"], b["tokens"])
    return out


def floors_for(model_path: Path, result: dict, rates: dict, peak: dict, bandwidth: float) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    shape = model_shape(model)
    weight_bytes = {d: sum(p.numel() for p in model.parameters()) * (4 if d == "float32" else 2) for d in rates}
    del model
    reqs = result["requests"]
    skip = ideal_skippable(reqs)
    flops = workload_flops(shape, [len(r.prompt) for r in reqs], [r.max_tokens for r in reqs], skip)["total"]
    # Decode reads every weight once per step; the steps of a run are at least its longest output.
    steps = max(r.max_tokens for r in reqs)
    return {d: {"gemm_floor_s": flops / rates[d], "isa_peak_floor_s": flops / peak[d],
                "weight_bytes_floor_s": steps * weight_bytes[d] / bandwidth} for d in rates}


def markdown(info: dict, results: dict, dtypes) -> str:
    lines = [f"CPU: {info['model']}, {info['cores']} cores, flags {', '.join(info['isa_flags']) or 'none of note'}; "
             f"load {info['load_before']} -> {info['load_after']}; torch {torch.__version__}; "
             f"vLLM {results.get('vllm_version', 'not installed')}", ""]
    lines += ["| model | workload | system | wall min / med / max s | out tok/s | x GEMM floor | x ISA floor "
              "| x bytes floor |", "|---|---|---|---|---:|---:|---:|---:|"]
    for (model, workload), res in results["workloads"].items():
        for key, row in res["table"].items():
            if "error" in row:
                lines.append(f"| {model} | {workload} | {key} | failed: {row['error'][:80]} | | | | |")
                continue
            fl = res["floors"][key.split(":")[1]]
            w = row["wall_min"]
            lines.append(f"| {model} | {workload} | {key} | {w:.2f} / {row['wall_median']:.2f} / "
                         f"{row['wall_max']:.2f} | {row['out_tok_s_best']:.1f} | {w / fl['gemm_floor_s']:.2f} | "
                         f"{w / fl['isa_peak_floor_s']:.2f} | {w / fl['weight_bytes_floor_s']:.2f} |")
        lines.append(f"| {model} | {workload} | ratios | " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items())
                     + " | | | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--models", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--workloads", default="mixed,labelling,generation")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true", help="lmbatch alone (e.g. a before/after of its own)")
    return ap.parse_args(argv)


def measure_model(model_name: str, a: argparse.Namespace, info: dict, bandwidth: float, with_vllm: bool) -> dict:
    """Every workload on one model shape: per workload its table, ratios, floors and rates."""
    dtypes = a.dtypes.split(",")
    path = ensure_shaped_model(model_name, MODELS_DIR)
    from transformers import AutoModelForCausalLM

    shape = model_shape(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    rates = {d: measure_matmul_rate(shape, dtype=getattr(torch, d), rows=(512,))["flops_per_s"] for d in dtypes}
    peak = {d: isa_peak_flops(info, d) for d in dtypes}
    out = {}
    for workload in a.workloads.split(","):
        res = run_workload(path, workload, dtypes, a.repeats, with_vllm)
        table = summarize(res)
        out[(model_name, workload)] = {
            "summary": res["summary"], "table": table, "ratios": ratios(table, dtypes),
            "floors": floors_for(path, res, rates, peak, bandwidth), "gemm_rates": rates, "isa_peak": peak}
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    dtypes = a.dtypes.split(",")
    with_vllm = VLLM_PYTHON.exists() and not a.no_vllm
    if not with_vllm and not a.no_vllm:
        print(f"vLLM's CPU build is not installed ({VLLM_PYTHON}): `make bench-peers`; running lmbatch alone")
    info = cpu_info()
    bandwidth = stream_bandwidth()
    results = {"cpu": info, "bandwidth_bytes_per_s": bandwidth, "workloads": {}, "dtypes": dtypes}
    for model_name in a.models.split(","):
        results["workloads"].update(measure_model(model_name, a, info, bandwidth, with_vllm))
    info["load_after"] = os.getloadavg()[0]
    if with_vllm:
        results["vllm_version"] = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm; print(vllm.__version__)"],
                                                 capture_output=True, text=True).stdout.strip()
    report = markdown(info, results, dtypes)
    print(report)
    save(results, report)


def save(results: dict, report: str) -> None:
    out = RESULTS
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    serial = {**results, "workloads": {f"{m}/{w}": {k: v for k, v in r.items()}
                                       for (m, w), r in results["workloads"].items()}}
    for r in serial["workloads"].values():
        for row in r["table"].values():
            row.pop("tokens", None)
    (out / f"cpu-peers-{stamp}.json").write_text(json.dumps(serial, indent=1, default=str))
    (out / f"cpu-peers-{stamp}.md").write_text(report + "\n")
    print(f"wrote bench/results/cpu-peers-{stamp}.json and .md ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
