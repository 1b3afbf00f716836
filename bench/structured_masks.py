"""Structured outputs: what the grammar masks cost, and which library fills them.

    python -m bench.structured_masks                  # the bench's 24M model (32k vocab), 256 sequences

1. Libraries side by side on the bench model's tokenizer: llguidance (the engine's backend) and
   xgrammar (if installed: pip install xgrammar). Per step, the time to fill the bitmasks of 256
   matchers of a JSON schema, and whether random walks through each library's masks give JSON
   that a strict parser accepts.
2. The engine: the mean decode step time with 256 running constrained requests against the same
   256 requests unconstrained, interleaved, as a ratio (the issue's target: <= 1.10).

Writes bench/results/structured_masks-<time>.json and prints a table.
"""

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()   # before torch loads

import json
import random
import statistics
import time
from pathlib import Path

from bench.cli import RESULTS, parser
from bench.cpu_info import cpu_info
from bench.toy_models import ensure_model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 400},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "tags"]}
CONSTRAINTS = [{"json": SCHEMA}, {"regex": "[a-z ]{1,400}"}]


def library_fill_times(tokenizer, vocab: int, rows: int, steps: int) -> dict:
    """Per-step fill time (ms) of each library over `rows` matchers of SCHEMA, and walk validity."""
    steps = max(steps, 64)   # long walks: a rare bad token needs room to show
    results = {"llguidance": _walk(_guidance(tokenizer, vocab), rows, steps, vocab, tokenizer)}
    try:
        results["xgrammar"] = _walk(_xgrammar(tokenizer, vocab), rows, steps, vocab, tokenizer)
    except ImportError:
        results["xgrammar"] = {"skipped": "xgrammar not installed (pip install xgrammar)"}
    return results


def _guidance(tokenizer, vocab: int):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[tokenizer.eos_token_id])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    base = llguidance.LLMatcher(tok, grammar)
    executor = llguidance.LLExecutor()
    return {"new": base.deep_copy, "accept": lambda m, t: m.consume_token(t),
            "fill": lambda ms, mask: lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)],
                                                                     mask)}


def _xgrammar(tokenizer, vocab: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    batch = xgr.BatchGrammarMatcher()
    return {"new": lambda: xgr.GrammarMatcher(compiled), "accept": lambda m, t: m.accept_token(t),
            "fill": lambda ms, mask: batch.batch_fill_next_token_bitmask(ms, mask)}


def _walk(lib: dict, rows: int, steps: int, vocab: int, tokenizer) -> dict:
    """Random walks through the masks: each step every matcher takes a random allowed token (EOS
    only when nothing else is allowed; the walk then starts over)."""
    import torch

    matchers = [lib["new"]() for _ in range(rows)]
    mask = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int32)
    outputs, texts, rng, fill = [[] for _ in range(rows)], [], random.Random(0), []
    eos = tokenizer.eos_token_id
    for _ in range(steps):
        t0 = time.perf_counter()
        lib["fill"](matchers, mask)
        fill.append(time.perf_counter() - t0)
        bits = ((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)[:, :vocab]
        for i in range(rows):
            allowed = bits[i].nonzero().flatten().tolist()
            token = rng.choice([t for t in allowed if t != eos] or [eos])
            if token == eos:
                texts.append(tokenizer.decode(outputs[i]))
                matchers[i], outputs[i] = lib["new"](), []
                continue
            lib["accept"](matchers[i], token)
            outputs[i].append(token)
    texts += [tokenizer.decode(ids) for ids in outputs]
    # JSON allows no control character but \t \n \r, and those only between tokens.
    raw_control = sum(any(ord(c) < 0x20 and c not in "\t\n\r" for c in t) for t in texts)
    return {"fill_ms_per_step": 1000 * statistics.median(fill), "walks": len(texts),
            "walks_with_raw_control_characters": raw_control}


def engine_step_ratio(model: Path, requests: int, steps: int, repeats: int) -> dict:
    """Mean decode step time, constrained over unconstrained, interleaved per repeat."""
    from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model), max_num_seqs=requests, max_num_batched_tokens=4096,
                                    kv_cache_gb=2.0))
    times = {"constrained": [], "unconstrained": []}
    for r in range(repeats):
        for kind in (("constrained", "unconstrained") if r % 2 == 0 else ("unconstrained", "constrained")):
            params = [SamplingParams(temperature=1.0, seed=i, max_tokens=steps + 4, ignore_eos=True,
                                     structured_outputs=CONSTRAINTS[i % 2] if kind == "constrained" else None)
                      for i in range(requests)]
            times[kind].append(_decode_step_time(engine, params, steps))
    ratio = statistics.median(times["constrained"]) / statistics.median(times["unconstrained"])
    return {"requests": requests, "decode_steps": steps, "step_s": times, "ratio": ratio}


def _decode_step_time(engine, params, steps: int) -> float:
    """Mean time of `steps` steps once every request is decoding."""
    for i, p in enumerate(params):
        engine.add_request(i, f"record {i}: ", p)
    engine.step()   # the prefill of every prompt
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - t0) / steps
    engine.abort_all()
    return elapsed


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model = ensure_model("cpu", Path(args.out))
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = 32000
    result = {"cpu": cpu_info(), "libraries": library_fill_times(tokenizer, vocab, args.requests, args.steps),
              "engine": engine_step_ratio(model, args.requests, args.steps, args.repeats)}
    print(_table(result))
    out = Path(args.out) / f"structured_masks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _table(result: dict) -> str:
    lines = [f"CPU: {result['cpu']}", "| library | fill ms/step (256 rows) | walks with raw control chars |",
             "|---|---:|---:|"]
    for name, r in result["libraries"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | |")
        else:
            lines.append(f"| {name} | {r['fill_ms_per_step']:.2f} | {r['walks_with_raw_control_characters']} "
                         f"of {r['walks']} |")
    e = result["engine"]
    lines.append(f"engine decode step, {e['requests']} running requests: constrained / unconstrained = "
                 f"{e['ratio']:.3f}x (median of {len(e['step_s']['constrained'])} interleaved repeats)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
