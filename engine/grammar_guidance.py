"""The llguidance backend (vLLM's `guidance`): an Earley parser over a lexer, masks on demand."""

from __future__ import annotations

import json

import torch

from .grammar import GrammarError
from .structured_outputs import StructuredOutputsParams


class GuidanceBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_ids)
        self.executor = llguidance.LLExecutor()

    def compile(self, params: StructuredOutputsParams):
        grammar = self._grammar(params)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"{params.kind}: {error}".splitlines()[0])
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def _grammar(self, params: StructuredOutputsParams) -> str:
        m = self.llg.LLMatcher
        if params.kind == "json":
            return m.grammar_from_json_schema(json.dumps(params.json), defaults={"whitespace_flexible": False})
        if params.kind == "json_object":
            return m.grammar_from_json_schema('{"type": "object"}')
        if params.kind == "regex":
            return m.grammar_from_regex(params.regex)
        if params.kind == "choice":
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in params.choice))
        return m.grammar_from_lark(self.llg.gbnf_to_lark.any_to_lark(params.grammar))   # EBNF, as xgrammar takes it

    def matcher(self, compiled) -> GuidanceMatcher:
        return GuidanceMatcher(compiled.deep_copy())

    def fill(self, matchers: list[GuidanceMatcher], bitmask: torch.Tensor) -> None:
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(m.inner, i) for i, m in enumerate(matchers)],
                                                   bitmask)


class GuidanceMatcher:
    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def accept(self, token: int) -> bool:
        return self.inner.consume_token(token)

    def is_terminated(self) -> bool:
        return self.inner.is_stopped()
