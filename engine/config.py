"""Engine configuration: what model, on what device, with how much KV cache and batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"                # auto: cuda when present, else cpu
    block_size: int = 16                # tokens per KV block
    num_kv_blocks: int | None = None    # explicit pool size; wins over the memory budgets below
    kv_cache_gb: float | None = None    # CPU budget for the pool (default 2 GiB); on CUDA an upper cap
    gpu_memory_utilization: float = 0.85  # share of free GPU memory after loading the model
    max_num_seqs: int = 256             # requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (decode tokens + prefill chunks)
    max_model_len: int | None = None    # prompt + output; default: the model's max positions
    enable_prefix_caching: bool = True
    seed: int = 0                       # for requests without their own seed
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
             "block_size must be a positive power of two"),
            (self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks must be > 0"),
            (self.kv_cache_gb is None or self.kv_cache_gb > 0, "kv_cache_gb must be > 0"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.max_num_seqs > 0, "max_num_seqs must be > 0"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens must be > 0"),
            (self.max_model_len is None or self.max_model_len > 0, "max_model_len must be > 0"),
            (self.dtype == "auto" or self.dtype in _DTYPES, f"unknown dtype {self.dtype!r}"),
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"unknown device {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"EngineConfig: {message}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
