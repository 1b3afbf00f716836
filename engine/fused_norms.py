"""Routes a bf16 CPU model's RMSNorm modules to one native kernel call each (csrc/rms_norm.cpp).

transformers' Llama-family RMSNorm forward is eight tensor ops; at decode sizes each costs a few
microseconds of dispatch, and a Qwen2-0.5B step runs 49 norms. Only a module whose forward is, to
the character, the formulation the kernel computes is routed (many families copy Llama's; a
family with another one, such as Gemma's 1 + weight, or a future rewrite of it, keeps its own
forward). bf16 only: in float32 the engine's greedy output equals transformers' token for token,
and a sum of squares in another order could move a near tie.
"""

from __future__ import annotations

import inspect
import textwrap

import torch

from . import cpu_kernels

# transformers' LlamaRMSNorm.forward (Qwen2, Qwen3, Mistral, ... copy it), the formulation the kernel computes.
LLAMA_RMS_NORM_FORWARD = '''
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
'''

_known: dict[type, bool] = {}


def computes_llama_rms_norm(module: torch.nn.Module) -> bool:
    """Whether the module's class has exactly Llama's RMSNorm forward (checked once per class)."""
    cls = type(module)
    if cls not in _known:
        try:
            source = textwrap.dedent(inspect.getsource(cls.forward))
        except (OSError, TypeError):
            source = ""
        _known[cls] = _normalized(source) == _normalized(LLAMA_RMS_NORM_FORWARD)
    return _known[cls]


def _normalized(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines() if not line.strip().startswith("@"))


def install(model: torch.nn.Module) -> int:
    """Route every bf16 RMSNorm of Llama's formulation to the kernel (a class swap, as
    small_batch_linear's: weights, state dict and copies stay as they are); returns how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.dim() == 1
                and hasattr(module, "variance_epsilon") and computes_llama_rms_norm(module)):
            module.__class__ = _fused_class(type(module))
            count += 1
    return count


_fused: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _fused:
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            kernels = cpu_kernels.load()
            if (kernels is None or hidden_states.dtype != torch.bfloat16 or hidden_states.device.type != "cpu"
                    or torch.is_grad_enabled()):
                return cls.forward(self, hidden_states)
            return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)

        _fused[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward})
    return _fused[cls]
