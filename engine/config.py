"""Engine configuration: what model, on what device, with how much KV cache and batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .block_hash import DEFAULT_BLOCK_SIZE
from .settings import Check, at_least, between, check_settings, greater_than, one_of, power_of_two, setting

if TYPE_CHECKING:
    import torch

# Names a config may give -> torch dtype attribute. torch loads only when a dtype is resolved, so
# io and flows read these settings without it.
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
           "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_DEVICE = Check(lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda"), "must be auto, cpu or cuda[:N]")


@dataclass
class EngineConfig:
    model: str = setting(affects_outputs=True)
    # auto: bfloat16 on CUDA and on CPUs with bf16 dot products (AVX512-BF16, AMX), else float32
    dtype: str = setting("auto", one_of("auto", *_DTYPES), affects_outputs=True)
    # auto: cuda when present, else cpu
    device: str = setting("auto", _DEVICE, affects_outputs=True)
    # tokens per KV block
    block_size: int = setting(DEFAULT_BLOCK_SIZE, power_of_two(), affects_outputs=False)
    # explicit pool size; wins over the memory budgets below
    num_kv_blocks: int | None = setting(None, at_least(1), affects_outputs=False)
    # CPU budget for the pool (default 2 GiB); on CUDA an upper cap
    kv_cache_gb: float | None = setting(None, greater_than(0), affects_outputs=False)
    # share of free GPU memory after loading the model
    gpu_memory_utilization: float = setting(0.85, between(0, 1, open_lo=True), affects_outputs=False)
    # requests running at once
    max_num_seqs: int = setting(256, at_least(1), affects_outputs=False)
    # token budget of one step (decode tokens + prefill chunks)
    max_num_batched_tokens: int = setting(2048, at_least(1), affects_outputs=False)
    # prompt + output; default: the model's max positions. It caps max_tokens, so it counts.
    max_model_len: int | None = setting(None, at_least(1), affects_outputs=True)
    enable_prefix_caching: bool = setting(True, affects_outputs=False)
    # auto | native (CPU float32 and bf16 kernels) | triton (CUDA) | sdpa: engine/attention_backend.py
    attention_backend: str = setting("auto", one_of("auto", "native", "triton", "sdpa"), affects_outputs=False)
    # capture decode-only steps as CUDA graphs (per padded batch size); off: every step eager
    cuda_graphs: bool = setting(True, affects_outputs=False)
    # launch step N+1 before reading step N's tokens back (engine/overlap.py); requests with structured
    # output or a reasoning budget still run step by step
    async_scheduling: bool = setting(False, affects_outputs=False)
    # for requests without their own seed
    seed: int = setting(0, affects_outputs=True)
    trust_remote_code: bool = setting(False, affects_outputs=True)
    # "think": split <think>...</think> from the answer (Qwen3, DeepSeek-R1; engine/reasoning.py)
    reasoning_parser: str | None = setting(None, one_of("think"), affects_outputs=True)

    def __post_init__(self) -> None:
        check_settings(self)

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return getattr(torch, _DTYPES[self.dtype])
        if self.resolved_device().type == "cuda":
            return torch.bfloat16
        from .cpu_kernels import has_bf16_dot  # measured: bench/NOTES.md, "CPU, bfloat16 and packed ..."

        return torch.bfloat16 if has_bf16_dot() else torch.float32
