"""SamplingParams: how one request is decoded. Names, defaults and meanings follow vLLM's."""

from __future__ import annotations

from dataclasses import dataclass

from .settings import Check, at_least, between, check_settings, greater_than, setting
from .structured_outputs import StructuredOutputsParams

_TOP_K = Check(lambda v: v >= -1, "must be -1, 0 (off) or >= 1")
_STOP = Check(lambda v: isinstance(v, str) or all(isinstance(s, str) and s for s in v),
              "must be non-empty strings")


@dataclass
class SamplingParams:
    # Every field changes what is generated, so every field is part of a job's key.
    n: int = setting(1, at_least(1), affects_outputs=True)
    max_tokens: int | None = setting(16, at_least(1), affects_outputs=True)
    min_tokens: int = setting(0, at_least(0), affects_outputs=True)
    temperature: float = setting(1.0, at_least(0), affects_outputs=True)
    top_p: float = setting(1.0, between(0, 1, open_lo=True), affects_outputs=True)
    top_k: int = setting(0, _TOP_K, affects_outputs=True)              # 0 or -1: off
    min_p: float = setting(0.0, between(0, 1), affects_outputs=True)
    seed: int | None = setting(None, affects_outputs=True)
    stop: list[str] | str | None = setting(None, _STOP, affects_outputs=True)
    stop_token_ids: list[int] | None = setting(None, affects_outputs=True)
    ignore_eos: bool = setting(False, affects_outputs=True)
    include_stop_str_in_output: bool = setting(False, affects_outputs=True)
    repetition_penalty: float = setting(1.0, greater_than(0), affects_outputs=True)
    presence_penalty: float = setting(0.0, between(-2, 2), affects_outputs=True)
    frequency_penalty: float = setting(0.0, between(-2, 2), affects_outputs=True)
    # top-k logprobs returned with each sampled token
    logprobs: int | None = setting(None, at_least(0), affects_outputs=True)
    skip_special_tokens: bool = setting(True, affects_outputs=True)
    # the output must satisfy this constraint (a JSON schema, regex, choice, grammar)
    structured_outputs: StructuredOutputsParams | None = setting(None, affects_outputs=True)
    # reasoning models: close the thinking section after this many tokens (EngineConfig.reasoning_parser)
    max_reasoning_tokens: int | None = setting(None, at_least(1), affects_outputs=True)

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        check_settings(self, self.cross_field_problems(self.max_tokens, self.min_tokens))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0

    @staticmethod
    def cross_field_problems(max_tokens: int | None, min_tokens: int) -> list[str | None]:
        too_many = max_tokens is not None and min_tokens > max_tokens
        return [f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})" if too_many else None]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
