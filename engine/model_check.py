"""Load-time checks: the paged attention runs this model exactly, or the model is refused.

lmbatch runs stock transformers models by registering its paged attention with transformers'
AttentionInterface. That only works when the model sends every layer's attention through it
with every argument that changes the result. Some do not: Falcon picks its attention classes
itself (building it fails), Bloom computes its own attention with an ALiBi bias (the paged
function is never called, and the completions would be silently wrong), a remote-code model may
do anything. So before the first request:

1. `probe_layout` runs one token through the model with a recording attention: every layer must
   call it exactly once, and the calls give the pool's true shape (KV heads, head size: a config
   attribute the model ignores must not size the pool) and each layer's sliding window, checked
   against the windows the config declares.
2. `check_outputs` runs a warm-up prompt through the engine's own path (a prefill chunk, a chunk
   with past context, a decode step) and through the model with transformers' eager attention, and
   compares the logits at every position: within float rounding in float32, within a bf16
   tolerance in half precision.

A failure raises UnsupportedModelError (a ValueError) naming the model type and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attention
from .sequence import Sequence

# Per position: the largest logit difference over the largest reference logit. float32: kernels that
# sum in another order differ by ~3e-7 (28 families measured); a wrong window, cap or sink moves
# logits by 1e-1 to 1. Half precision: bf16 keeps 8 bits of mantissa and the paged and eager paths
# round at different points (measured 4e-3 to 1e-2), and a rounding can flip a near-tied MoE route,
# which moves that one position a lot (gpt-oss: 0.29 at 1 of 64): so there a share of the positions
# must be within the tolerance, every position in float32.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}
SHARE_WITHIN = {torch.float32: 1.0, torch.float16: 0.9, torch.bfloat16: 0.9}
WARMUP_TOKENS = 40          # warm-up prompt length without a declared window
MAX_WARMUP_TOKENS = 256     # longest warm-up: a longer window is not exercised here (unit tests do)


class UnsupportedModelError(ValueError):
    def __init__(self, model_type: str, reason: str):
        super().__init__(f"{model_type}: {reason}; lmbatch cannot run this model exactly, so it refuses to load it")


@dataclass(frozen=True)
class KVLayout:
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]   # per layer
    sinks: bool = False               # some layer adds attention sinks (gpt-oss)


def load_model(config, dtype: torch.dtype):
    """from_pretrained with the paged attention; a family that cannot take it is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    name = attention.register()
    try:
        return AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, attn_implementation=name,
                                                    trust_remote_code=config.trust_remote_code)
    except Exception as e:
        if quant_method(hf) is not None:
            raise UnsupportedModelError(hf.model_type, f"its quantized checkpoint ({quant_method(hf)}) "
                                        f"does not load in transformers here ({type(e).__name__}: {e})") from e
        if name not in str(e) and "attn_implementation" not in str(e):
            raise
        raise UnsupportedModelError(hf.model_type, "transformers cannot build it with a registered attention "
                                    f"function ({type(e).__name__}: {e}): its attention does not go through "
                                    "AttentionInterface") from e


def probe_layout(model, num_layers: int, device) -> KVLayout:
    """One token through the model with a recording attention; see the module docstring."""
    model_type = model.config.model_type
    trace: list[attention.LayerCall] = []
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    try:
        with torch.inference_mode(), attention.step_context(attention.probe_metadata(trace)):
            model(input_ids=ids, position_ids=ids, use_cache=False, logits_to_keep=1)
    except Exception as e:
        raise UnsupportedModelError(model_type, f"its forward pass fails with the paged attention "
                                    f"({type(e).__name__}: {e})") from e
    if not trace:
        raise UnsupportedModelError(model_type, _bypass_reason(model.config))
    layers = sorted(c.layer for c in trace if c.layer is not None)
    if len(layers) != len(trace) or layers != list(range(num_layers)):
        raise UnsupportedModelError(model_type, f"its attention was called for layers {layers} of "
                                    f"{num_layers}, not once per layer")
    shapes = {(c.kv_heads, c.head_dim) for c in trace}
    if len(shapes) > 1:
        raise UnsupportedModelError(model_type, f"its layers have different K/V shapes {sorted(shapes)}")
    by_layer = sorted(trace, key=lambda c: c.layer)
    windows = tuple(c.variant.window for c in by_layer)
    declared = declared_windows(model.config, num_layers)
    if windows != declared:
        raise UnsupportedModelError(model_type, f"its config declares sliding windows {list(declared)} per layer "
                                    f"but its attention passed {list(windows)}")
    (kv_heads, head_dim), = shapes
    return KVLayout(kv_heads, head_dim, windows, any(c.variant.sinks is not None for c in trace))


def declared_windows(hf, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window as the config declares it (transformers' conventions)."""
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if not window or getattr(hf, "use_sliding_window", True) is False:
        return (None,) * num_layers
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * num_layers


def _bypass_reason(hf) -> str:
    if _uses_alibi(hf):
        return "attention adds an ALiBi bias that lmbatch's paged attention does not apply"
    return ("its attention does not go through transformers' AttentionInterface, so lmbatch's paged attention "
            "is never called")


def _uses_alibi(hf) -> bool:
    """Bloom always; Falcon with `alibi`; MPT with `attn_config.alibi` (an object or a dict)."""
    attn = getattr(hf, "attn_config", None)
    attn_alibi = attn.get("alibi", False) if isinstance(attn, dict) else getattr(attn, "alibi", False)
    return hf.model_type == "bloom" or bool(getattr(hf, "alibi", False)) or bool(attn_alibi)


def check_outputs(runner, layout: KVLayout) -> float:
    """Engine logits vs eager transformers on a warm-up prompt; returns the largest relative difference."""
    model = runner.model
    length = warmup_length(layout.windows, runner)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.vocab_size, (length,), generator=gen).tolist()
    model_type = model.config.model_type
    try:
        got = _engine_logits(runner, ids)
    except Exception as e:
        raise UnsupportedModelError(model_type, f"the paged attention fails on it ({type(e).__name__}: {e})") from e
    try:
        ref = _eager_logits(model, ids, runner.device)
    except Exception as e:
        raise UnsupportedModelError(model_type, "its own eager attention, the reference of the load-time check, "
                                    f"does not run ({type(e).__name__}: {e})") from e
    per_position = (got - ref).abs().amax(-1) / ref.abs().max().clamp(min=1.0)
    tolerance, share = TOLERANCE[runner.dtype], SHARE_WITHIN[runner.dtype]
    within = float((per_position <= tolerance).float().mean())   # NaN compares False
    if within < share:
        worst = float(per_position.nan_to_num(float("inf")).max())
        raise UnsupportedModelError(model_type, f"its logits through lmbatch's engine differ from transformers' "
                                    f"eager forward by up to {worst:.2g} (relative), with {within:.0%} of the "
                                    f"positions within {tolerance:g} in {runner.dtype} (needed: {share:.0%}): "
                                    f"{_mismatch_cause(model.config)}")
    return float(per_position.max())


def _mismatch_cause(hf) -> str:
    if quant_method(hf) is not None:
        return (f"it is quantized ({quant_method(hf)}), and a scheme whose result depends on how many tokens a "
                "step runs (activations quantized per step) cannot give transformers' output")
    return "it passes attention something the paged function does not apply"


def quant_method(hf) -> str | None:
    """The checkpoint's quantization method ("torchao", "bitsandbytes", ...), None when not quantized."""
    quant = getattr(hf, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "unknown")
    return str(getattr(method, "value", method))


def warmup_length(windows, runner) -> int:
    """Long enough that the smallest window slides, as far as MAX_WARMUP_TOKENS allows."""
    smallest = min((w for w in windows if w), default=None)
    length = WARMUP_TOKENS if smallest is None else smallest + WARMUP_TOKENS
    capacity = runner.num_blocks * runner.block_size
    limit = getattr(runner.model.config, "max_position_embeddings", None) or length
    return max(4, min(length, MAX_WARMUP_TOKENS, capacity, limit))


def _engine_logits(runner, ids: list[int]) -> torch.Tensor:
    """Logits at every position, in three steps: a prefill chunk, a chunk with past context, a decode."""
    from .sampling_params import SamplingParams

    n = len(ids)
    seq = Sequence(-1, -1, ids, SamplingParams(), block_table=list(range(-(-n // runner.block_size))))
    first = max(1, n // 2 + 3 if n > 8 else n // 2)   # ends inside a block: the next chunk's past is partial
    parts = []
    for size in (first, n - 1 - first, 1):
        if size <= 0:
            continue
        parts.append(runner.execute([(seq, size)], list(range(size))))
        seq.num_computed_tokens += size
    return torch.cat(parts)


def _eager_logits(model, ids: list[int], device) -> torch.Tensor:
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            return model(input_ids=x, use_cache=False).logits[0].float()
    finally:
        model.set_attn_implementation(previous)
