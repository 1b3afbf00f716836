"""Turning a caller's prompt into a request the engine can run, and deciding when it is done."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .prompt_rules import prompt_problem
from .sampling_params import SamplingParams
from .sequence import Sequence


class PromptError(ValueError):
    """A request that cannot run; it becomes an error output, never an exception of the engine."""

    def __init__(self, message: str, prompt_token_ids: list[int] | None = None):
        super().__init__(message)
        self.prompt_token_ids = prompt_token_ids or []


@dataclass
class Request:
    index: int
    prompt_token_ids: list[int]
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)


class RequestFactory:
    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int, vocab_size: int,
                 block_manager: BlockManager):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.block_manager = block_manager

    def build(self, index: int, prompt, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise PromptError(f"expected SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        self._validate(ids, params)
        return Request(index, ids)

    def tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._apply_chat_template(list(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]
        if hasattr(prompt, "tolist"):  # numpy / torch / arrow arrays of token ids
            return self.tokenize(prompt.tolist())
        raise PromptError(f"unsupported prompt type {type(prompt).__name__}: expected str, token ids "
                          "or chat messages")

    def _apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError("prompt is a list of chat messages but the model's tokenizer has no chat template")
        try:
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template error is the row's fault, not the engine's
            raise PromptError(f"chat template failed: {e}") from e
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        problem = prompt_problem(ids, self.max_model_len, self.vocab_size)
        if problem:
            raise PromptError(problem, ids)
        total = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        need = self.block_manager.blocks_needed(total)
        if need > self.block_manager.num_blocks:
            raise PromptError(f"request needs {need} KV blocks ({total} tokens) but the pool has "
                              f"{self.block_manager.num_blocks}", ids)

    def suppressed_ids(self, seq: Sequence) -> list[int]:
        """Ids that must not be sampled while seq is below min_tokens."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return []
        eos = [] if seq.params.ignore_eos else list(self.eos_ids)
        return eos + seq.params.stop_token_ids

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return "stop"
        if self._length_reached(seq, n_out):
            return "length"
        return None

    def ends_by_length(self, seq: Sequence) -> bool:
        """Whether seq ends by length once its pending tokens land (async scheduling)."""
        return self._length_reached(seq, seq.num_output_tokens)

    def _length_reached(self, seq: Sequence, num_output: int) -> bool:
        max_tokens = seq.params.max_tokens
        return ((max_tokens is not None and num_output >= max_tokens)
                or len(seq.prompt_token_ids) + num_output >= self.max_model_len)
