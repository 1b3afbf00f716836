"""The GPU benchmark of `make bench-gpu`: nano-vllm's shape on a Llama-3.2-1B-shaped model.

    python -m bench.gpu [--out DIR] [--num-seqs 256] [--budget-s 340]
    python -m bench.gpu --device cpu --smoke      # the same code path in seconds, on the CPU

It needs only torch, transformers (and triton for lmbatch's kernel): lmbatch is installed with
--no-deps and nothing here imports lmbatch.io or Prefect. One run does:

1. float32 exactness: lmbatch's greedy tokens equal transformers' `generate` on a small model,
   with CUDA graphs on and off, and with async scheduling;
2. bf16 agreement with transformers' bf16 `generate`: the share of prompts whose first 32 tokens
   agree, and the largest logprob gap of the first step;
3. nano-vllm's benchmark (256 sequences, input 100-1024, output 100-1024 tokens, EOS ignored,
   random token ids) on random weights of the Llama-3.2-1B shape, through lmbatch with and without
   CUDA graphs and with async scheduling (graphs on), transformers' `generate` in one static batch,
   and transformers' continuous batching: output tok/s, peak memory, and for lmbatch host syncs and
   kernel launches per step;
4. the ratios, and the JSON under $OUT (or bench/results).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
import warnings
from pathlib import Path

import torch

from bench.peers import load_model, reference_tokens, run_hf_cb, run_hf_static
from bench.toy_models import ensure_shaped_model

NANO_VLLM_A100_OUT_TOK_S = 14_300   # the target issue 15 names: nano-vllm's published A100 figure, this shape
ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096)
# The throughput systems of lmbatch: engine settings each (the peers follow them).
LMBATCH_SYSTEMS = {"lmbatch_graphs": dict(cuda_graphs=True),
                   "lmbatch_async": dict(cuda_graphs=True, async_scheduling=True),
                   "lmbatch_eager": dict(cuda_graphs=False)}
# Under a deadline, transformers' static batch runs at least STATIC_WINDOW_S (enough steps for a
# rate: ~120 ms a step at 256 rows on the H200) and otherwise leaves CB_RESERVE_S to CB, which
# gives no rate when cut (147 s on the H200).
STATIC_WINDOW_S = 45.0
CB_RESERVE_S = 180.0
# Parity runs 24 prompts: engines for 32 capture 6 graph sizes, not 20.
PARITY_ENGINE = dict(max_model_len=1024, max_num_seqs=32)


def nano_vllm_workload(num_seqs: int, lo: int, hi: int, seed: int = 0, vocab: int = 10001
                       ) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    top = min(10000, vocab - 1)   # nano-vllm's token ids: 0..10000
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(lo, hi))] for _ in range(num_seqs)]
    return prompts, [rng.randint(lo, hi) for _ in range(num_seqs)]


def lmbatch_engine(model: Path, device: str, dtype: str, **overrides):
    from lmbatch.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(model), device=device, dtype=dtype, **{**ENGINE, **overrides}))


def greedy(engine, prompts, max_tokens):
    from lmbatch.engine import SamplingParams

    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                                     for m in max_tokens])
    return [o.token_ids for o in outs]


# ---- 1 and 2: parity ------------------------------------------------------------------------------
def parity(root: Path, device: str) -> dict:
    from lmbatch.testing import build_toy_model

    small = build_toy_model(root / "parity-llama", arch="llama", hidden=256, layers=4, heads=8, kv_heads=2,
                            tokenizer_vocab=2048, seed=1)
    rng = random.Random(1)
    prompts = [[rng.randint(3, 2000) for _ in range(rng.randint(5, 300))] for _ in range(24)]
    steps = 32
    out = {"float32_prompts": len(prompts)}
    out.update(_stage(lambda: _float32_parity(small, prompts, steps, device)))
    out.update(_stage(lambda: _bf16_parity(small, prompts, steps, device)))
    _free()
    return out


def _float32_parity(small: Path, prompts, steps: int, device: str) -> dict:
    ref_model = load_model(str(small), device, torch.float32)
    refs = [reference_tokens(ref_model, p, steps, device) for p in prompts]
    del ref_model
    out = {}
    for name, settings in (("graphs_on", {}), ("graphs_off", dict(cuda_graphs=False)),
                           ("async", dict(async_scheduling=True))):
        with lmbatch_engine(small, device, "float32", **settings, **PARITY_ENGINE) as engine:
            got = greedy(engine, prompts, [steps] * len(prompts))
        out[f"float32_exact_{name}"] = sum(g == r for g, r in zip(got, refs))
    return out


def _bf16_parity(small: Path, prompts, steps: int, device: str) -> dict:
    bf16_model = load_model(str(small), device, torch.bfloat16)
    refs = [reference_tokens(bf16_model, p, steps, device) for p in prompts]
    with lmbatch_engine(small, device, "bfloat16", **PARITY_ENGINE) as engine:
        got = greedy(engine, prompts, [steps] * len(prompts))
        gap = _first_step_logprob_gap(engine, bf16_model, prompts[:8], device)
    return {"bf16_first32_equal": sum(g == r for g, r in zip(got, refs)),
            "bf16_first_token_equal": sum(g[:1] == r[:1] for g, r in zip(got, refs)),
            "bf16_logprob_gap_first_step": gap}


def _first_step_logprob_gap(engine, model, prompts, device) -> float:
    from lmbatch.engine import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    gap = 0.0
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            ref = torch.log_softmax(model(torch.tensor([p], device=device)).logits[0, -1].float(), -1)
            for token, lp in o.outputs[0].logprobs[0].items():
                gap = max(gap, abs(lp - float(ref[token])))
    return gap


# ---- 3: throughput --------------------------------------------------------------------------------
def run_lmbatch_system(model: Path, prompts, max_tokens, device: str, settings: dict) -> dict:
    dtype = "bfloat16" if device == "cuda" else "float32"
    with lmbatch_engine(model, device, dtype, **settings) as engine:   # closed even if a step fails
        _reset_peak(device)
        _sync(device)
        t0 = time.monotonic()
        tokens = greedy(engine, prompts, max_tokens)
        _sync(device)
        wall = time.monotonic() - t0
        result = {"wall_s": wall, "out_tokens": sum(map(len, tokens)), "peak_gib": _peak(device),
                  "kv_blocks": engine.runner.num_blocks, "graphs": engine.runner.graphs is not None,
                  "async_scheduling": engine.config.async_scheduling,
                  "steps": engine.stats().steps,
                  # the async system replays the same graphs: its launches are lmbatch_graphs' (the profiler
                  # costs seconds)
                  **_per_step(engine, device, count_launches=not engine.config.async_scheduling)}
        if engine.runner.memory is not None:
            result["kv_sizing"] = engine.runner.memory.describe()
    result["tokens"] = tokens
    return result


def _per_step(engine, device: str, batch: int = 256, steps: int = 8, count_launches: bool = True) -> dict:
    """Host syncs (CUDA's sync debug mode) and launches (the profiler) of decode steps of `batch` rows."""
    from lmbatch.engine import SamplingParams

    rng = random.Random(2)
    batch = min(batch, engine.config.max_num_seqs)
    for i in range(batch):
        engine.add_request(i, [rng.randint(0, min(10000, engine.runner.vocab_size - 1)) for _ in range(200)],
                           SamplingParams(max_tokens=4 * steps, temperature=0.0, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    engine.step()
    counted = {"per_step_batch": batch}
    if device == "cuda":     # the async system too: an overlapped launch must not wait on the device
        per_step = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    seen = len(caught)
                    engine.step()
                    per_step.append([w for w in caught[seen:] if "synchroniz" in str(w.message)])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counted["syncs_per_step"] = sum(map(len, per_step)) / steps
        # Where each sync came from, per step: a step with more than the sampler's one names the line.
        counted["sync_sites"] = [[f"{w.filename}:{w.lineno}" for w in ws] for ws in per_step]
        if count_launches:
            counted.update(_launches(engine, steps))
    transfers = engine.runner.transfers
    before = transfers.syncs
    engine.step()
    counted["engine_downloads_per_step"] = transfers.syncs - before
    _sync(device)
    t0 = time.monotonic()
    for _ in range(steps):
        engine.step()
    _sync(device)
    counted["decode_step_ms"] = (time.monotonic() - t0) / steps * 1e3
    graphs = engine.runner.graphs
    if graphs is not None and device == "cuda":   # the GPU's share of a step: the last step's graph again
        graph = graphs.graphs[graphs.sizes[-1]][0]    # the step filled its static inputs: valid rows
        t0 = time.monotonic()
        for _ in range(steps):
            graph.replay()
        _sync(device)
        counted["graph_replay_ms"] = (time.monotonic() - t0) / steps * 1e3
    engine.abort_all()
    return counted


def _launches(engine, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    launch = sum(("LaunchKernel" in n) or n in ("cuLaunchKernel", "cuLaunchKernelEx") for n in names)
    graph = sum("GraphLaunch" in n for n in names)
    kernels = sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return {"launches_per_step": launch / steps, "graph_launches_per_step": graph / steps,
            "gpu_kernels_per_step": kernels / steps}


def run_peer(name: str, model_path: Path, prompts, max_tokens, device: str, deadline: float) -> dict:
    """One transformers peer on the workload, stopped at `deadline` (time.monotonic())."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(str(model_path), device, dtype, attn="sdpa")
    _reset_peak(device)
    try:
        if name == "hf_static":
            r = run_hf_static(model, prompts, max_tokens, batch_size=len(prompts), sort_by_length=True,
                              device=device, deadline=deadline)
        else:
            r = run_hf_cb(model, prompts, max_tokens, device, timeout_s=deadline - time.monotonic())
        out = {"wall_s": r.wall_s, "out_tokens": sum(map(len, r.tokens)), "peak_gib": _peak(device),
               "tokens": r.tokens}
        if r.extra.get("stopped_at_deadline"):
            # Its later steps carry fewer useful rows (short requests done, the batch still padded to
            # the longest) over longer contexts: the rate so far is an upper bound of the whole run's.
            out["partial"] = (f"stopped at the deadline after {r.wall_s:.0f} s: out tok/s is that of its first "
                              f"steps, an upper bound of a whole run's")
    except Exception as e:  # noqa: BLE001 - a failing peer is a line in the table, not the end of the run
        out = {"error": f"{type(e).__name__}: {e}"[:500]}
    del model
    _free()
    return out


def kernel_bench(device: str, num_seqs: int = 256, seed: int = 0) -> dict:
    """The Triton attention kernel alone at the 1B shape's decode (32 heads over 8, head 64, blocks of 16):
    microseconds per layer and the bandwidth it reaches, for several keys per loop iteration."""
    import triton

    from lmbatch.engine import triton_attention
    from lmbatch.engine.varlen_inputs import VarlenBatch, choose_segments, plan_tiles

    rng = random.Random(seed)
    lens = [rng.randint(100, 1024) + rng.randint(1, 1024) for _ in range(num_seqs)]   # prompt + output so far
    bs, kv_heads, heads, dim = 16, 8, 32, 64
    blocks = [-(-n // bs) for n in lens]
    pool = torch.randperm(sum(blocks) + 1, device=device)
    width = max(blocks)
    tables = torch.zeros(num_seqs, width, dtype=torch.long, device=device)
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = pool[at:at + n]
        at += n
    k = torch.randn(sum(blocks) + 1, kv_heads, bs, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(num_seqs, heads, dim, device=device, dtype=torch.bfloat16)
    tile_seq, tile_q0 = plan_tiles([1] * num_seqs, heads // kv_heads)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    batch = VarlenBatch(torch.arange(num_seqs + 1, device=device), torch.tensor(lens, device=device), tables,
                        torch.from_numpy(tile_seq).to(device), torch.from_numpy(tile_q0).to(device),
                        choose_segments(len(tile_seq), kv_heads, width, sms))
    kv_bytes = sum(lens) * kv_heads * dim * 2 * k.element_size()
    out = {"kv_mib_per_layer": round(kv_bytes / 2**20, 1), "segments": batch.num_segments}
    for keys in (32, 64, 128):   # 16 measured slowest on the H200 (run 3): not worth its compile
        run = lambda: triton_attention.paged_attention(q, k, v, batch, 0.125, keys_per_iteration=keys)  # noqa: B023
        us = triton.testing.do_bench(run) * 1e3
        out[f"keys_{keys}"] = {"us_per_layer": round(us, 1), "gb_s": round(kv_bytes / us / 1e3, 1)}
    return out


# ---- helpers --------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def machine() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    return info


def table(report: dict) -> str:
    rows = ["| system | out tok/s | wall s | peak GiB | syncs/step | launches/step | decode step ms | vs hf_cb |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    cb = report["systems"].get("hf_cb", {}).get("out_tok_s")
    for name, r in report["systems"].items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:60]} | | | | | | |")
            continue
        ratio = f"{r['out_tok_s'] / cb:.2f}x" if cb else "-"
        bound = " (partial: at most)" if r.get("partial") else ""
        rows.append(f"| {name} | {r['out_tok_s']:,.0f}{bound} | {r['wall_s']:.1f} | {_fmt(r.get('peak_gib'))} | "
                    f"{_fmt(r.get('syncs_per_step'))} | {_fmt(r.get('launches_per_step'))} | "
                    f"{_fmt(r.get('decode_step_ms'))} | {ratio} |")
    return "\n".join(rows)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=340.0, help="no system is started past this")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="the run's hard limit: transformers' CB and static batch stop there (the static batch's "
                         "rate so far is reported as partial)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and workload (a CPU check of this file)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    a = ap.parse_args(argv)
    start = time.monotonic()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(os.environ.get("LMBATCH_MODEL_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "lmbatch-models")
    report = {"machine": machine(), "engine": ENGINE, "parity": {}, "systems": {}}
    save = lambda: _write(report, out_dir, start)   # after every stage: a run cut short keeps what it measured
    if a.smoke:
        ENGINE.update(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512)
        report["parity"] = {"skipped": "smoke run"}
        from lmbatch.testing import build_toy_model

        model = build_toy_model(root / "smoke", hidden=64, layers=2, heads=4, kv_heads=2, max_positions=512)
        prompts, max_tokens = nano_vllm_workload(8, 10, 40, vocab=1024)
    else:
        model = ensure_shaped_model("llama-3.2-1b", root, device=a.device)
        report["model_build_s"] = round(time.monotonic() - start, 1)
        prompts, max_tokens = nano_vllm_workload(a.num_seqs, 100, 1024)
    report["workload"] = {"num_seqs": len(prompts), "input_tokens": sum(map(len, prompts)),
                          "output_tokens": sum(max_tokens)}
    # CB last with the time left: cut, it gives no rate. The static batch before it, cut at its window
    # when time is short, still gives one (partial).
    for name in (*LMBATCH_SYSTEMS, "hf_static", "hf_cb"):
        elapsed = time.monotonic() - start
        if elapsed > a.budget_s and not (name == "hf_static" and a.deadline_s):
            report["systems"][name] = {"error": f"not run: the budget of {a.budget_s:.0f} s was spent"}
            continue
        end = start + max(elapsed + 30.0, (a.deadline_s or a.budget_s) - 10)
        if name == "hf_static" and a.deadline_s:
            end = min(end, max(time.monotonic() + STATIC_WINDOW_S, end - CB_RESERVE_S))
        if name in LMBATCH_SYSTEMS:
            r = _stage(lambda: run_lmbatch_system(model, prompts, max_tokens, a.device, LMBATCH_SYSTEMS[name]))  # noqa: B023
        else:
            r = _stage(lambda: run_peer(name, model, prompts, max_tokens, a.device, end))  # noqa: B023 - called now
        if "wall_s" in r:
            r["out_tok_s"] = r["out_tokens"] / r["wall_s"]
        report["systems"][name] = r
        print(name, {k: v for k, v in r.items() if k != "tokens"}, flush=True)
        if name == "lmbatch_eager" and not a.smoke:   # before the peers, whose time is open-ended
            report["parity"] = _stage(lambda: parity(root, a.device))
            print("parity:", json.dumps(report["parity"]), flush=True)
            report["kernel"] = _stage(lambda: kernel_bench(a.device))
            print("kernel:", json.dumps(report["kernel"]), flush=True)
        save()
    print(table(report))
    print("targets:", report["targets"], "parity:", report["parity"])
    return 0


def _stage(fn) -> dict:
    """One stage's result, or its error with the traceback's end: one failure does not end the run.
    Each result carries its seconds (`stage_s`): what to trim when the call nears its 8 minutes."""
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001
        import traceback

        _free()
        out = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    out["stage_s"] = round(time.monotonic() - t0, 1)
    return out


def _write(report: dict, out_dir: Path, start: float) -> None:
    _agreement(report)
    ours = report["systems"].get("lmbatch_graphs", {}).get("out_tok_s")
    ahead = report["systems"].get("lmbatch_async", {}).get("out_tok_s")
    report["targets"] = {"vs_hf_cb": _ratio(ours, report["systems"].get("hf_cb", {}).get("out_tok_s")),
                         "vs_nano_vllm_a100": _ratio(ours, NANO_VLLM_A100_OUT_TOK_S),
                         "async_vs_graphs": _ratio(ahead, ours)}
    report["total_s"] = time.monotonic() - start
    clean = {**report, "systems": {n: {k: v for k, v in r.items() if k != "tokens"}
                                   for n, r in report["systems"].items()}}
    (out_dir / "bench-gpu.json").write_text(json.dumps(clean, indent=2))
    (out_dir / "bench-gpu.md").write_text(table(report) + "\n")


def _agreement(report: dict) -> None:
    """Greedy bf16 tokens of each system against lmbatch's with graphs (bf16: not all equal)."""
    base = report["systems"].get("lmbatch_graphs", {}).get("tokens")
    if not base:
        return
    for r in report["systems"].values():
        if r.get("tokens"):
            # Whole sequences of up to 1024 bf16 tokens on random weights rarely stay equal (one near tie
            # and the rest differs), so the first token and the common prefix say more than equality.
            prefixes = sorted(_common_prefix(a, b) for a, b in zip(base, r["tokens"]))
            r["same_tokens_as_lmbatch_graphs"] = sum(a == b for a, b in zip(base, r["tokens"])) / len(base)
            r["same_first_token_as_lmbatch_graphs"] = sum(p > 0 for p in prefixes) / len(base)
            r["median_common_prefix_with_lmbatch_graphs"] = prefixes[len(prefixes) // 2]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _ratio(a, b):
    return None if not a or not b else round(a / b, 3)


if __name__ == "__main__":
    raise SystemExit(main())
