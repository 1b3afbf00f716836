"""lmbatch.engine: continuous batching over a paged KV cache for stock transformers models.

    from lmbatch.engine import LLMEngine, EngineConfig, SamplingParams
    engine = LLMEngine(EngineConfig(model="path/or/hub-id"))
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))

The names below load on first use (PEP 562): io and flows read the settings (EngineConfig,
SamplingParams) and the block hasher without importing torch or transformers.
"""

from importlib import import_module

_EXPORTS = {
    "LLMEngine": ".engine", "EngineConfig": ".config", "SamplingParams": ".sampling_params",
    "RequestOutput": ".outputs", "CompletionOutput": ".outputs", "RequestMetrics": ".sequence",
    "UnsupportedModelError": ".model_check", "EngineStats": ".stats", "PromptError": ".requests",
    "StructuredOutputsParams": ".structured_outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
