"""The peer systems lmbatch is measured against, all on the same stock transformers model.

1. ``hf_static``        model.generate, static batches of 16 in input order (what most users write)
2. ``hf_static_sorted`` the same, requests sorted by prompt length first (the usual trick)
3. ``hf_cb``            transformers' own continuous batching (init_continuous_batching + add_request,
                        per-request max_new_tokens, paged cache sized explicitly for the CPU)

Every runner takes the workload's prompts (token-id lists) and per-request max_tokens and returns a
``RunResult``: per-request output tokens in input order, TTFT and E2E measured from the start of
the run (the "shard start": queueing counts), and the wall time. Decoding is greedy with EOS
ignored so every system produces exactly max_tokens tokens per request.

Static batches generate up to the largest max_tokens in the batch (that is how model.generate
works); each request's output is cut to its own max_tokens, its E2E is the end of its batch (that
is when the caller gets it) and its TTFT the time of the batch's first decoding step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch


@dataclass
class RunResult:
    system: str
    wall_s: float
    tokens: list[list[int]]                 # per request, input order
    ttft_s: list[float]                     # from run start
    e2e_s: list[float]                      # from run start
    cached_tokens: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def _greedy_config(model, max_new_tokens: int):
    """Greedy, EOS ignored (never stops early, never suppressed), exactly max_new_tokens."""
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    gc.eos_token_id = None          # ignore_eos: no stopping token at all
    gc.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gc.use_cache = True
    return gc


class _StepTimes:
    """A streamer that records when each decoding step's tokens come out (batch of any size)."""

    def __init__(self):
        self.times: list[float] = []
        self._first = True

    def put(self, value):  # first call: the prompt; then one call per generated token (whole batch)
        if self._first:
            self._first = False
            return
        self.times.append(time.monotonic())

    def end(self):
        pass


class _Deadline:
    """A stopping criterion: every row stops at the first step past `deadline` (time.monotonic())."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.hit = self.hit or time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)


def run_hf_static(model, prompts: list[list[int]], max_tokens: list[int], batch_size: int = 16,
                  sort_by_length: bool = False, device: str = "cpu", deadline: float | None = None) -> RunResult:
    """Static batches through model.generate. With a `deadline` the run stops at the first step past
    it and says so (`extra["stopped_at_deadline"]`): requests keep the tokens they got by then, and
    the batches not started get none."""
    from transformers import StoppingCriteriaList

    n = len(prompts)
    order = list(range(n))
    if sort_by_length:
        order.sort(key=lambda i: len(prompts[i]), reverse=True)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens: list[list[int]] = [[] for _ in range(n)]
    ttft = [0.0] * n
    e2e = [0.0] * n
    generated_total = 0
    sync(device)
    t0 = time.monotonic()
    stop = _Deadline(deadline if deadline is not None else float("inf"))
    with torch.inference_mode():
        for b in range(0, n, batch_size):
            if stop.hit:
                break
            idx = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            new = max(max_tokens[i] for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding
                p = prompts[i]
                ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p):] = 1
            st = _StepTimes()
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=_greedy_config(model, new), streamer=st,
                                 stopping_criteria=StoppingCriteriaList([stop]))
            out = out[:, width:].tolist()
            sync(device)
            t_end = time.monotonic()
            generated_total += len(idx) * len(out[0])
            for r, i in enumerate(idx):
                tokens[i] = out[r][:max_tokens[i]]
                ttft[i] = (st.times[0] if st.times else t_end) - t0
                e2e[i] = t_end - t0
    wall = time.monotonic() - t0
    name = "hf_static_sorted" if sort_by_length else "hf_static"
    return RunResult(name, wall, tokens, ttft, e2e, [],
                     extra={"generated_incl_waste": generated_total, "batch_size": batch_size,
                            "stopped_at_deadline": stop.hit})


def cb_config_for(prompts: list[list[int]], max_tokens: list[int], device: str = "cpu",
                  page_size: int | None = None, num_blocks: int | None = None,
                  max_batch_tokens: int | None = None, prefix_sharing: bool = True,
                  max_requests_per_batch: int | None = None):
    """A ContinuousBatchingConfig sized for the workload (never the 60%-of-RAM default on a CPU)."""
    from transformers import ContinuousBatchingConfig

    cpu = not device.startswith("cuda")
    page_size = page_size or (32 if cpu else 256)
    max_batch_tokens = max_batch_tokens or (512 if cpu else 4096)
    if num_blocks is None:
        # room for ~32 (CPU) / 256 (GPU) of the workload's longest sequences at once, plus a page each
        longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
        per_req = -(-longest // page_size) + 1
        num_blocks = per_req * (32 if cpu else 256)
    # transformers 5.17 (the GPU box's) names the page `block_size`; later releases `page_size`.
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page = {"page_size" if "page_size" in fields else "block_size": page_size}
    return ContinuousBatchingConfig(
        **page, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
        allow_block_sharing=prefix_sharing, use_cuda_graph=False if cpu else None,
        max_requests_per_batch=max_requests_per_batch or (16 if cpu else 256),
    )


def run_hf_cb(model, prompts: list[list[int]], max_tokens: list[int], device: str = "cpu",
              cb_kwargs: dict | None = None, timeout_s: float = 3600.0) -> RunResult:
    """transformers continuous batching, per-request max_new_tokens, EOS ignored (eos id -1)."""
    n = len(prompts)
    cfg = cb_config_for(prompts, max_tokens, device, **(cb_kwargs or {}))
    gc = _greedy_config(model, max(max_tokens))
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cfg)
    manager.start()
    # perf_counter is the clock of transformers' timestamps; map it onto our monotonic run clock
    sync(device)
    t0 = time.monotonic()
    p0 = time.perf_counter()
    try:
        ids = []
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            ids.append(manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=m,
                                           record_timestamps=True, eos_token_id=-1))
        results = {}
        deadline = time.monotonic() + timeout_s
        while len(results) < n and time.monotonic() < deadline:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers continuous batching thread died")
        sync(device)
        wall = time.monotonic() - t0
        if len(results) < n:
            done = sum(len(r.generated_tokens) for r in results.values())
            raise TimeoutError(f"hf_cb: {len(results)}/{n} requests finished ({done} output tokens, "
                               f"{done / wall:.0f} tok/s of finished requests) in the {timeout_s:.0f} s allowed")
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    tokens, ttft, e2e = [], [], []
    for i in range(n):
        r = results.get(f"r{i}")
        if r is None or r.error:
            raise RuntimeError(f"hf_cb request {i} failed: {None if r is None else r.error}")
        tokens.append(list(r.generated_tokens))
        ttft.append((r.timestamps[0] - p0) if r.timestamps else wall)
        e2e.append(r.lifespan[1] - p0 if r.lifespan[1] > 0 else wall)
    return RunResult("hf_cb", wall, tokens, ttft, e2e, [],
                     extra={"page_size": getattr(cfg, "page_size", getattr(cfg, "block_size", None)),
                            "num_blocks": cfg.num_blocks,
                            "max_batch_tokens": cfg.max_batch_tokens})


def reference_tokens(model, prompt: list[int], max_tokens: int, device: str = "cpu") -> list[int]:
    """Ground truth: model.generate on one unpadded prompt."""
    with torch.inference_mode():
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=_greedy_config(model, max_tokens))
    return out[0, len(prompt):].tolist()
