"""lmbatch.engine: continuous batching over a paged KV cache for stock transformers models.

    from lmbatch.engine import LLMEngine, EngineConfig, SamplingParams
    engine = LLMEngine(EngineConfig(model="path/or/hub-id"))
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))

The names below load on first use (PEP 562): io and flows read the settings (EngineConfig,
SamplingParams) and the block hasher without importing torch or transformers.
"""

from lmbatch.lazy import lazy_getattr

_EXPORTS = {
    "LLMEngine": ".engine", "EngineConfig": ".config", "SamplingParams": ".sampling_params",
    "RequestOutput": ".outputs", "CompletionOutput": ".outputs", "RequestMetrics": ".sequence",
    "UnsupportedModelError": ".model_check", "EngineStats": ".stats", "PromptError": ".requests",
    "StructuredOutputsParams": ".structured_outputs",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
