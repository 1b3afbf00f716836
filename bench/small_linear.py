"""The small-batch linear kernels against torch's GEMM at a model's decode shapes (issue 11).

    .venv/bin/python -m bench.small_linear [--model qwen2-0.5b] [--rows 1,4,16,64] [--dtype bfloat16]

Times y = x @ w.T for every distinct linear shape of the model (weights cold: a fresh copy per
call would measure allocation, so the weights of all shapes together exceed the caches instead),
through torch's F.linear (MKL/oneDNN), the kernel's one-row loop (LMBATCH_TILED_LINEAR=0 in a
subprocess) and its register-tiled loop; in bfloat16 (a CPU with AVX512-BF16) torch's oneDNN GEMM
against the kernel on weights packed at load. The step estimate weights each shape by its count per
forward pass. Writes bench/results/small-linear-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from lmbatch.openmp import set_default_wait_policy

set_default_wait_policy()

import torch
import torch.nn.functional as F

from bench.cli import RESULTS, parser
from bench.cpu_info import cpu_info
from bench.toy_models import SHAPES


def linear_shapes(name: str) -> list[tuple[int, int, int]]:
    """(out features, in features, count per forward) of a SHAPES model, LM head included."""
    _, c = SHAPES[name]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes = {(q, h): 0, (kv, h): 0, (h, q): 0, (i, h): 0, (h, i): 0}
    for key, n in (((q, h), 1), ((kv, h), 2), ((h, q), 1), ((i, h), 2), ((h, i), 1)):
        shapes[key] += n * layers
    return [(n, k, cnt) for (n, k), cnt in shapes.items()] + [(c["vocab_size"], h, 1)]


def time_shapes(shapes, rows: int, how: str, dtype: torch.dtype = torch.float32, repeats: int = 5
                ) -> dict[str, float]:
    from lmbatch.engine import cpu_kernels
    from lmbatch.engine.small_batch_linear import pack

    kernels = cpu_kernels.load()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen).to(dtype) for n, k, _ in shapes]
    inputs = [torch.randn(rows, k, generator=gen).to(dtype) for _, k, _ in shapes]
    if how == "mkl":
        fn = lambda x, w: F.linear(x, w)
    elif how == "packed":
        weights = [(pack(w), w.shape[0]) for w in weights]
        fn = lambda x, w: kernels.packed_linear(x, w[0], None, w[1])
    else:
        fn = lambda x, w: kernels.small_batch_linear(x, w, None)
    out = {}
    for (n, k, _), w, x in zip(shapes, weights, inputs):
        fn(x, w)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x, w)
            times.append(time.perf_counter() - t0)
        out[f"{n}x{k}"] = statistics.median(times)
    return out


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--model", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    shapes = linear_shapes(a.model)
    dtype = getattr(torch, a.dtype)
    if a.child:   # how=..., rows=...: one measurement in this process, printed as JSON
        how, rows = a.child.split(":")
        print(json.dumps(time_shapes(shapes, int(rows), how, dtype)))
        return 0
    result = {"cpu": cpu_info(), "model": a.model, "dtype": a.dtype, "torch_threads": torch.get_num_threads(),
              "rows": {}}
    systems = (("mkl", {}), ("kernel_one_row", {"LMBATCH_TILED_LINEAR": "0"}), ("kernel_tiled", {}),
               ("packed", {}))
    if dtype == torch.bfloat16:   # one bf16 kernel (packed tiles); torch's GEMM is oneDNN's
        systems = (("mkl", {}), ("packed", {}))
    for rows in map(int, a.rows.split(",")):
        per = {}
        for how, env in systems:
            how_arg = how if how in ("mkl", "packed") else "kernel"
            proc = subprocess.run([sys.executable, "-m", "bench.small_linear", "--model", a.model, "--dtype", a.dtype,
                                   "--child", f"{how_arg}:{rows}"], capture_output=True, text=True,
                                  env={**os.environ, **env}, check=True)
            per[how] = json.loads(proc.stdout.strip().splitlines()[-1])
        step = {how: sum(per[how][f"{n}x{k}"] * cnt for n, k, cnt in shapes) for how in per}
        result["rows"][rows] = {"per_shape_s": per, "forward_linears_s": step}
        print(f"rows {rows:3d}: " + ", ".join(f"{h} {s * 1e3:.1f} ms" for h, s in step.items())
              + f"  (packed vs torch {step['mkl'] / step['packed']:.2f}x)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"small-linear-{stamp}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
