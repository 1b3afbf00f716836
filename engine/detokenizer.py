"""Incremental detokenization and stop strings.

Decoding a growing token list from scratch each step is quadratic; decoding each token alone is
wrong for byte-level BPE (a character may span tokens). As vLLM does, each step decodes a short
window twice, with and without the newest tokens, and emits the difference once it no longer ends
in an incomplete character (U+FFFD). Ids the tokenizer does not know (a model vocabulary larger
than the tokenizer's) decode to nothing instead of crashing.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop: bool):
        self.tokenizer = tokenizer
        self.vocab_limit = len(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""
        # A few prompt tokens of context make the first output tokens decode as they would in place.
        self.context = [t for t in prompt_ids[-4:] if t < self.vocab_limit]
        self.prefix_offset = 0
        self.read_offset = len(self.context)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        """Add one output token; returns True when a stop string was found (text is then cut)."""
        if token_id >= self.vocab_limit or token_id < 0:
            return False
        self.context.append(token_id)
        prefix = self._decode(self.context[self.prefix_offset:self.read_offset])
        full = self._decode(self.context[self.prefix_offset:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return False  # an incomplete character, or a token that renders as nothing yet
        new_text = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.context)
        self.text += new_text
        return check_stop and bool(self.stop) and self._check_stop(len(new_text))

    def _check_stop(self, new_len: int) -> bool:
        # Only the new text and the max_stop_len - 1 characters before it can hold a new match.
        window_start = max(0, len(self.text) - new_len - self.max_stop_len + 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stopped = True
        return True

    def flush(self) -> None:
        """At the end: emit whatever is still held back (e.g. a dangling partial character)."""
        if self.stopped:
            return
        rest = self._decode(self.context[self.prefix_offset:])
        prefix = self._decode(self.context[self.prefix_offset:self.read_offset])
        if len(rest) > len(prefix):
            self.text += rest[len(prefix):]
