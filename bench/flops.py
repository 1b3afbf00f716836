"""FLOP floor: the matrix-multiply work a workload needs at minimum, over a matmul rate measured now.

Work per request with a prompt of P tokens and O output tokens (greedy, EOS ignored):

- the model is fed P + O - 1 tokens (the last output token is never fed back);
- each fed token costs 2 * (parameters of every linear layer in the decoder blocks) FLOPs;
- the LM head runs only where a token is sampled: O positions, 2 * vocab * hidden each;
- attention (causal, minimum): a token at position i attends to i + 1 keys, per layer
  2 * heads * head_dim * (i + 1) for QK^T and the same for PV.

Embedding lookups, norms, RoPE, activations and the softmax are not matmuls and are ignored, so
this is a floor no implementation can beat at the measured matmul rate.

"Prefix-skipped" floor: the prompt tokens that a block-granular prefix cache legitimately skips
(every later use of a shared prefix, whole blocks of 16, never the last prompt token) are removed
from the fed tokens; the remaining tokens still attend to the whole prefix.

The matmul rate is measured in the same process with torch.matmul at the model's linear shapes
(all linear layers of one decoder block and the LM head) for a batch of T token rows, best of a few
repetitions, for a few T; the best aggregate rate (FLOPs / seconds over the whole set of shapes) is
the rate of the floor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from bench.peers import sync


@dataclass
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linear_params: int          # all nn.Linear weights inside the decoder blocks (all layers)
    lm_head_params: int
    linear_shapes: list          # (out, in) of every linear of ONE decoder block

    def to_dict(self) -> dict:
        return asdict(self)


def model_shape(model) -> ModelShape:
    cfg = model.config.get_text_config()
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = model.model.layers
    linear_params = 0
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                linear_params += mod.weight.numel()
    shapes = [tuple(m.weight.shape) for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
    lm = model.get_output_embeddings().weight
    return ModelShape(hidden, len(layers), heads, kv, head_dim, lm.shape[0], linear_params, lm.numel(), shapes)


def _pos_sum(a: int, b: int) -> int:
    """sum of (i + 1) for i in [a, b)"""
    return (b * (b + 1) - a * (a + 1)) // 2


def request_flops(shape: ModelShape, prompt_len: int, out_len: int, skipped: int = 0) -> dict:
    fed_end = prompt_len + out_len - 1            # positions [skipped, fed_end) are computed
    fed = max(fed_end - skipped, 0)
    linear = 2 * shape.linear_params * fed
    head = 2 * shape.lm_head_params * out_len
    attn = 4 * shape.heads * shape.head_dim * shape.layers * _pos_sum(skipped, fed_end)
    return {"linear": linear, "lm_head": head, "attention": attn, "total": linear + head + attn}


def workload_flops(shape: ModelShape, prompt_lens: list[int], out_lens: list[int],
                   skipped: list[int] | None = None) -> dict:
    skipped = skipped or [0] * len(prompt_lens)
    tot = {"linear": 0, "lm_head": 0, "attention": 0, "total": 0}
    for p, o, s in zip(prompt_lens, out_lens, skipped):
        for k, v in request_flops(shape, p, o, s).items():
            tot[k] += v
    return tot


def measure_matmul_rate(shape: ModelShape, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        rows=(256, 512, 1024), reps: int = 5, min_time_s: float = 0.2) -> dict:
    """Best aggregate FLOP/s of torch.matmul over the model's linear shapes (one block + LM head)."""
    shapes = list(shape.linear_shapes) + [(shape.vocab, shape.hidden)]
    weights = [torch.randn(o, i, device=device, dtype=dtype) * 0.02 for o, i in shapes]
    per_rows = {}
    best_rate = 0.0
    for t in rows:
        xs = {i: torch.randn(t, i, device=device, dtype=dtype) for _, i in shapes}
        flops = sum(2 * t * o * i for o, i in shapes)
        for w in weights:  # warm-up
            torch.matmul(xs[w.shape[1]], w.t())
        sync(device)
        best = float("inf")
        for _ in range(reps):
            n = 0
            t0 = time.perf_counter()
            while True:
                for w in weights:
                    torch.matmul(xs[w.shape[1]], w.t())
                n += 1
                sync(device)
                if time.perf_counter() - t0 >= min_time_s:
                    break
            best = min(best, (time.perf_counter() - t0) / n)
        rate = flops / best
        per_rows[t] = rate
        best_rate = max(best_rate, rate)
    return {"flops_per_s": best_rate, "by_rows": {str(k): v for k, v in per_rows.items()},
            "dtype": str(dtype).replace("torch.", ""), "device": device,
            "threads": torch.get_num_threads()}


def floors(shape: ModelShape, prompt_lens: list[int], out_lens: list[int], skippable: list[int],
           rate: float) -> dict:
    full = workload_flops(shape, prompt_lens, out_lens)
    skip = workload_flops(shape, prompt_lens, out_lens, skippable)
    return {
        "flops_all_prompt_tokens": full,
        "flops_prefix_skipped": skip,
        "floor_s_all": full["total"] / rate,
        "floor_s_prefix_skipped": skip["total"] / rate,
        "skipped_prompt_tokens": int(sum(skippable)),
    }


def ideal_skippable(requests, block_size: int = 16) -> list[int]:
    """Per request: prompt tokens a block-granular prefix cache can skip (later uses of a shared prefix)."""
    seen: set[int] = set()
    out = []
    for r in requests:
        s = 0
        if r.prefix_id >= 0:
            if r.prefix_id in seen:
                s = min(r.prefix_len, len(r.prompt) - 1) // block_size * block_size
            seen.add(r.prefix_id)
        out.append(s)
    return out
