"""What the engine returns for each request."""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import RequestMetrics


@dataclass
class CompletionOutput:
    """One of a request's n samples."""

    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str                       # "stop" | "length" | "error"
    logprobs: list[dict[int, float]] | None = None
    # With a reasoning parser (EngineConfig.reasoning_parser): the thinking section's text apart
    # from the answer in `text`, and how many of token_ids it took (OpenAI's reasoning_tokens).
    reasoning: str | None = None
    num_reasoning_tokens: int = 0


@dataclass
class RequestOutput:
    index: int                               # position of the request in the caller's input
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    metrics: RequestMetrics
    error: str | None = None

    # The first sample, flattened: what a caller with n=1 reads.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason if self.outputs else "error"

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs if self.outputs else None

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
