"""lmbatch.engine: continuous batching over a paged KV cache for stock transformers models.

    from lmbatch.engine import LLMEngine, EngineConfig, SamplingParams
    engine = LLMEngine(EngineConfig(model="path/or/hub-id"))
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from .config import EngineConfig
from .engine import LLMEngine
from .model_check import UnsupportedModelError
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .sequence import RequestMetrics

__all__ = ["LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "UnsupportedModelError"]
