"""Reasoning models: the `<think>...</think>` convention of Qwen3 and DeepSeek-R1.

A sequence is "thinking" until its thinking section closes. The section is open at the start
when the prompt opens one that it does not close (DeepSeek-R1's template ends in `<think>`), or
when nothing in the prompt says otherwise (Qwen3 thinks by default and writes `<think>` itself);
it is closed from the start when the prompt already closes it (Qwen3 with enable_thinking=False
puts an empty `<think></think>` in the prompt). As in vLLM, a constraint on the output
(structured outputs) applies to the answer only, once thinking has ended.

`max_reasoning_tokens` bounds a looping think: when the section has taken that many tokens, the
engine makes `</think>` the next token and the answer continues within max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

PARSERS = ("think",)
START, END = "<think>", "</think>"


@dataclass
class ReasoningState:
    thinking: bool                 # inside the thinking section now
    num_tokens: int = 0            # output tokens that belong to it (its tags included)
    end_index: int | None = None   # position in the output just past `</think>`


class ThinkParser:
    def __init__(self, tokenizer):
        self.start_id = _single_token(tokenizer, START)
        self.end_id = _single_token(tokenizer, END)

    def initial_state(self, prompt_ids: list[int]) -> ReasoningState:
        last_start = _last_index(prompt_ids, self.start_id)
        last_end = _last_index(prompt_ids, self.end_id)
        thinking = last_end < 0 or last_start > last_end
        return ReasoningState(thinking=thinking, end_index=None if thinking else 0)

    def advance(self, state: ReasoningState, token: int, position: int) -> None:
        """Account for output token `token` at output position `position`."""
        if not state.thinking:
            return
        state.num_tokens += 1
        if token == self.end_id:
            state.thinking, state.end_index = False, position + 1

    def forced_token(self, state: ReasoningState, max_reasoning_tokens: int | None) -> int | None:
        """`</think>` when the budget leaves room for no other thinking token, else None."""
        if state.thinking and max_reasoning_tokens is not None and state.num_tokens >= max_reasoning_tokens - 1:
            return self.end_id
        return None

    def split(self, state: ReasoningState, output_ids: list[int]) -> tuple[list[int], list[int]]:
        """(reasoning ids without the tags, answer ids)."""
        end = len(output_ids) if state.end_index is None else state.end_index
        reasoning = [t for t in output_ids[:end] if t not in (self.start_id, self.end_id)]
        return reasoning, output_ids[end:]


def build_parser(name: str | None, tokenizer) -> ThinkParser | None:
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning_parser {name!r}; choose one of {', '.join(PARSERS)}")
    return ThinkParser(tokenizer)


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(ids, int) or ids == tokenizer.unk_token_id or ids is None:
        raise ValueError(f"reasoning_parser think: the tokenizer has no single {text} token")
    return ids


def _last_index(ids: list[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1
