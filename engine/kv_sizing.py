"""How many KV blocks fit: a fixed budget on the CPU, a measured one on CUDA.

On CUDA the pool gets what is left of `total x gpu_memory_utilization` once the weights, the CUDA
context and the peak activations of one full step are accounted for. The peak is measured: a
warm-up forward of a whole token budget (max_num_batched_tokens prefill tokens, logits for up to
max_num_seqs rows) with the allocator's peak counter reset (vLLM's profile run). A guess such as
`free - 1 GiB` either wastes memory on small models or runs out on large vocabularies, where the
logits alone of 256 rows of 152k entries in float32 are 150 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
GRAPH_RESERVE = 256 * 2**20   # CUDA graphs' own pool: static inputs, one logits buffer per size


@dataclass(frozen=True)
class MemoryReport:
    total: int            # the device's memory
    used_before_kv: int   # by this process and others once the model is loaded (total - free)
    peak_activation: int  # measured by the warm-up step, beyond what was allocated before it
    utilization: float
    reserve: int = GRAPH_RESERVE

    @property
    def kv_budget(self) -> int:
        return int(self.total * self.utilization) - self.used_before_kv - self.peak_activation - self.reserve

    def describe(self) -> str:
        return (f"{self.total / GiB:.1f} GiB x gpu_memory_utilization {self.utilization:g} = "
                f"{self.total * self.utilization / GiB:.2f} GiB; in use after loading the model "
                f"{self.used_before_kv / GiB:.2f} GiB, one step's activations {self.peak_activation / GiB:.2f} GiB, "
                f"graphs {self.reserve / GiB:.2f} GiB")


def blocks_that_fit(budget_bytes: float, bytes_per_block: int, what: str) -> int:
    blocks = int(budget_bytes // bytes_per_block)
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache ({what}); lower max_num_batched_tokens or "
                           "max_num_seqs, raise gpu_memory_utilization, or use a smaller model or dtype")
    return blocks


def cuda_kv_blocks(report: MemoryReport, bytes_per_block: int, cap_gb: float | None) -> int:
    budget = report.kv_budget
    if cap_gb:
        budget = min(budget, cap_gb * GiB)
    return blocks_that_fit(budget, bytes_per_block, report.describe())


def model_too_large(model_bytes: int, total: int, device) -> str:
    return (f"the model's weights need {model_bytes / GiB:.1f} GiB but {device} has {total / GiB:.1f} GiB in all; "
            "use a smaller dtype, a quantized checkpoint or a larger GPU")
