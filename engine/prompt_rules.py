"""What makes a tokenized prompt runnable: the one rule set, for the engine and io alike.

io checks a shard's rows with it before they reach the engine (an error row names the reason),
and the engine checks every request it is given, so both say the same thing in the same words.
Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence


def prompt_problem(token_ids: Sequence[int], max_model_len: int, vocab_size: int) -> str | None:
    """Why this prompt cannot run, or None. It must leave room for one output token."""
    n = len(token_ids)
    if n == 0:
        return "empty prompt"
    if n >= max_model_len:
        return (f"prompt too long: {n} tokens; max_model_len is {max_model_len} "
                "(the prompt and at least one output token must fit)")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        return f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})"
    return None
