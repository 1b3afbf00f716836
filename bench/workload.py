"""Seeded generator of offline-batch workloads shaped like real ones.

- prompt and output lengths are log-normal (ShareGPT-like: a long right tail), clipped;
- a configurable share of prompts start with one of a few long shared system prefixes
  (few-shot templates, long system prompts), the rest are unique;
- every request carries its own ``max_tokens``; decoding is greedy with EOS ignored, so every
  system generates exactly ``max_tokens`` tokens per request: identical work.

Prompts are token-id lists (the harness measures engines, not tokenizers); ids are drawn from
the tokenizer's ordinary (non-special) range so that every id decodes.

    python -m bench.workload --requests 100          # prints the summary of the default workload
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.cli import parser


@dataclass
class WorkloadSpec:
    num_requests: int = 100
    seed: int = 0
    # unique part of each prompt: log-normal with this mean (tokens) and sigma (of the log)
    prompt_mean: float = 520.0
    prompt_sigma: float = 0.9
    prompt_min: int = 8
    prompt_max: int = 2048
    # output: log-normal per-request max_tokens
    output_mean: float = 60.0
    output_sigma: float = 0.8
    output_min: int = 4
    output_max: int = 400
    # shared prefixes: `prefix_share` of the requests start with one of `num_prefixes` prefixes
    prefix_share: float = 0.6
    num_prefixes: int = 4
    prefix_len_min: int = 300
    prefix_len_max: int = 600
    # token-id range the prompts are drawn from [lo, hi)
    token_lo: int = 10
    token_hi: int = 1024
    max_model_len: int = 4096

    @classmethod
    def preset(cls, name: str, **overrides) -> WorkloadSpec:
        presets = {
            # default CPU benchmark: ~100 requests, ~70k prompt tokens, ~6k output tokens
            "default": {},
            "quick": {"num_requests": 32},
            # GPU (H200, ~270M-param model, 11x the CPU model): same request shapes; sized so that the
            # whole `make bench-gpu` stays near 4 minutes (the static-batch peers are step-bound:
            # ~16 layers of Python per decode step). More: BENCH_GPU_ARGS="--requests 512".
            "gpu": {"num_requests": 128},
            # scaling runs: short requests so that 10k requests fit in minutes on a CPU
            "small": {"prompt_mean": 48.0, "prompt_sigma": 0.6, "prompt_max": 256, "output_mean": 12.0,
                          "output_sigma": 0.5, "output_max": 48, "prefix_len_min": 32, "prefix_len_max": 64,
                          "num_prefixes": 8, "max_model_len": 512},
        }
        presets.update({
            # issue-11 workloads at real model sizes (bench/cpu_peers.py), sized for a 2-core CPU:
            # labelling: ~1k-token prompts sharing a few long prefixes, 1-8 output tokens
            "labelling": {"num_requests": 32, "prompt_mean": 200.0, "prompt_sigma": 0.3, "prefix_share": 1.0,
                          "num_prefixes": 3, "prefix_len_min": 700, "prefix_len_max": 900,
                          "output_mean": 4.0, "output_sigma": 0.6, "output_min": 1, "output_max": 8},
            # generation: short prompts, 256 output tokens each
            "generation": {"num_requests": 16, "prompt_mean": 32.0, "prompt_sigma": 0.4, "prompt_max": 96,
                           "prefix_share": 0.0, "output_mean": 256.0, "output_sigma": 0.0, "output_min": 256,
                           "output_max": 256},
            # the mixed default, fewer requests
            "mixed": {"num_requests": 24},
        })
        kw = dict(presets[name])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


@dataclass
class Request:
    index: int
    prompt: list[int]
    max_tokens: int
    prefix_id: int = -1          # which shared prefix it starts with, -1 if none
    prefix_len: int = 0


@dataclass
class Workload:
    spec: WorkloadSpec
    requests: list[Request] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def prompts(self) -> list[list[int]]:
        return [r.prompt for r in self.requests]

    def max_tokens(self) -> list[int]:
        return [r.max_tokens for r in self.requests]

    def summary(self) -> dict:
        p = np.array([len(r.prompt) for r in self.requests])
        o = np.array([r.max_tokens for r in self.requests])
        with_prefix = sum(r.prefix_id >= 0 for r in self.requests)
        from bench.flops import ideal_skippable  # later uses of a prefix, whole blocks

        skippable = sum(ideal_skippable(self.requests))
        return {
            "requests": len(self.requests),
            "prompt_tokens": int(p.sum()),
            "output_tokens": int(o.sum()),
            "prompt_len_p50": float(np.median(p)),
            "prompt_len_max": int(p.max()),
            "output_len_p50": float(np.median(o)),
            "output_len_max": int(o.max()),
            "requests_with_shared_prefix": int(with_prefix),
            "ideal_prefix_skippable_tokens": int(skippable),
        }

    def to_json(self) -> dict:
        return {"spec": asdict(self.spec), "requests": [asdict(r) for r in self.requests]}


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    # choose mu so that the mean of the (unclipped) distribution is `mean`
    mu = math.log(mean) - sigma * sigma / 2
    return rng.lognormal(mu, sigma, n)


def iter_requests(spec: WorkloadSpec):
    """The workload's requests one at a time (lazily: memory does not grow with num_requests)."""
    rng = np.random.default_rng(spec.seed)
    lo, hi = spec.token_lo, spec.token_hi
    prefixes = [
        rng.integers(lo, hi, int(rng.integers(spec.prefix_len_min, spec.prefix_len_max + 1))).tolist()
        for _ in range(spec.num_prefixes)
    ]
    n = spec.num_requests
    plens = np.clip(_lognormal(rng, spec.prompt_mean, spec.prompt_sigma, n), spec.prompt_min, spec.prompt_max)
    olens = np.clip(_lognormal(rng, spec.output_mean, spec.output_sigma, n), spec.output_min, spec.output_max)
    has_prefix = rng.random(n) < spec.prefix_share
    which = rng.integers(0, max(spec.num_prefixes, 1), n)
    for i in range(n):
        unique = rng.integers(lo, hi, int(plens[i])).tolist()
        pid = int(which[i]) if (has_prefix[i] and spec.num_prefixes > 0) else -1
        prompt = (prefixes[pid] + unique) if pid >= 0 else unique
        max_tokens = int(olens[i])
        # everything must fit in the model's context
        limit = spec.max_model_len - max_tokens
        if len(prompt) > limit:
            prompt = prompt[:limit]
        yield Request(index=i, prompt=prompt, max_tokens=max_tokens, prefix_id=pid,
                      prefix_len=len(prefixes[pid]) if pid >= 0 else 0)


def make_workload(spec: WorkloadSpec) -> Workload:
    return Workload(spec=spec, requests=list(iter_requests(spec)))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true", help="print the whole workload as JSON")
    a = ap.parse_args()
    w = make_workload(WorkloadSpec.preset(a.preset, num_requests=a.requests, seed=a.seed))
    print(json.dumps(w.to_json() if a.json else w.summary(), indent=1))


if __name__ == "__main__":
    main()
