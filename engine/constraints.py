"""Per-step token constraints: structured outputs' grammar masks and the reasoning budget.

Each step, before the forward pass, `begin` starts filling the grammar masks of the sequences
about to sample (in a thread: the masks depend only on tokens already chosen, so they are
computed while the model runs), and notes which sequences must close their thinking section.
The sampler then calls `apply` on the logits; `on_token` advances each sequence's matcher and
reasoning state with the token it drew.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .grammar import GrammarError, Grammars, apply_bitmask
from .reasoning import build_parser
from .requests import PromptError
from .sequence import Sequence


@dataclass
class StepConstraints:
    grammar_rows: list[int]                # rows of the sampled batch under a grammar
    masks: Future | None                   # their bitmask rows, being filled
    forced: list[tuple[int, int]]          # (row, token) that must be drawn
    early: list[int]                       # grammar rows still below min_tokens (EOS suppressed)

    def apply(self, logits: torch.Tensor, raw_logits: torch.Tensor, keep_raw: bool) -> torch.Tensor:
        """The constrained logits; in place, unless they are the raw logits and `keep_raw` (logprobs)."""
        logits = logits.clone() if keep_raw and logits is raw_logits else logits
        if self.grammar_rows:
            bitmask = self.masks.result()
            apply_bitmask(logits, self.grammar_rows, bitmask)
            self._unless_dead(logits, raw_logits, bitmask)
        for row, token in self.forced:
            keep = logits[row, token].clone() if torch.isfinite(logits[row, token]) else torch.tensor(0.0)
            logits[row] = float("-inf")
            logits[row, token] = keep
        return logits

    def _unless_dead(self, logits: torch.Tensor, raw_logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        # min_tokens may forbid the only tokens the grammar allows (its end): the grammar wins.
        # Only a row still below min_tokens can be left with nothing, so only those are looked at;
        # its EOS was suppressed on a copy, so raw_logits still holds the model's values.
        for row in self.early:
            if torch.isinf(logits[row]).all():
                k = self.grammar_rows.index(row)
                logits[row] = apply_bitmask(raw_logits[row:row + 1].clone(), [0], bitmask[k:k + 1])[0]


class OutputConstraints:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], reasoning_parser: str | None,
                 max_rows: int):
        self.grammars = Grammars(tokenizer, vocab_size, sorted(stop_ids), max_rows)
        self.reasoning = build_parser(reasoning_parser, tokenizer)
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="lmbatch-masks")

    def attach(self, seq: Sequence) -> None:
        """Give a new sequence its matcher and reasoning state; PromptError if it cannot run."""
        params = seq.params
        if params.max_reasoning_tokens is not None and self.reasoning is None:
            raise PromptError("max_reasoning_tokens needs a reasoning model: set EngineConfig.reasoning_parser",
                              seq.prompt_token_ids)
        if self.reasoning is not None:
            seq.reasoning = self.reasoning.initial_state(seq.prompt_token_ids)
        if params.structured_outputs is not None:
            try:
                seq.matcher = self.grammars.matcher(params.structured_outputs)
            except GrammarError as e:
                raise PromptError(f"structured_outputs: {e}", seq.prompt_token_ids) from None

    def begin(self, sampled: list[Sequence]) -> StepConstraints | None:
        grammar_rows = [i for i, s in enumerate(sampled) if s.matcher is not None and not _thinking(s)]
        forced = []
        if self.reasoning is not None:
            for i, s in enumerate(sampled):
                token = self.reasoning.forced_token(s.reasoning, s.params.max_reasoning_tokens)
                if token is not None:
                    forced.append((i, token))
        if not grammar_rows and not forced:
            return None
        matchers = [sampled[i].matcher for i in grammar_rows]
        masks = self._filler.submit(self.grammars.masks, matchers) if matchers else None
        early = [i for i in grammar_rows if len(sampled[i].output_token_ids) < sampled[i].params.min_tokens]
        return StepConstraints(grammar_rows, masks, forced, early)

    def on_token(self, seq: Sequence, token: int) -> str | None:
        """After `token` joined seq's output: "stop" when its grammar is complete, else None."""
        thinking = _thinking(seq)
        if seq.reasoning is not None:
            self.reasoning.advance(seq.reasoning, token, len(seq.output_token_ids) - 1)
        if seq.matcher is None or thinking:
            return None
        seq.matcher.accept(token)
        return "stop" if seq.matcher.is_terminated() else None

    def split_reasoning(self, seq: Sequence) -> tuple[list[int], list[int]] | None:
        if seq.reasoning is None:
            return None
        return self.reasoning.split(seq.reasoning, seq.output_token_ids)


def _thinking(seq: Sequence) -> bool:
    return seq.reasoning is not None and seq.reasoning.thinking
