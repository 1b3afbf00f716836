"""The grammar backend interface: compile a constraint once, one matcher per sequence, batch masks.

A backend turns StructuredOutputsParams into a compiled grammar (cached by the constraint's key,
so a shard of 100k rows with one schema compiles once), hands out a matcher per sequence, and
fills a batch's token bitmask: bit t of row i is set when token t may follow sequence i's output
so far. The stop (EOS) tokens are allowed only where the grammar accepts, so a constrained
output ends with "stop" only when it is complete.

The backend is llguidance (grammar_guidance.py), chosen by measurement against xgrammar
(bench/structured_masks.py, README "Structured outputs"): xgrammar fills masks faster but lets
raw control characters into JSON strings, which JSON parsers reject. A backend is imported only
when a request asks for a constraint.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

import torch

from . import cpu_kernels
from .structured_outputs import StructuredOutputsParams

COMPILED_CACHE_SIZE = 256   # distinct constraints kept compiled (a per-row schema column may have many)


class GrammarError(ValueError):
    """The backend refused the constraint (unsupported or invalid schema, regex or grammar)."""


class Matcher(Protocol):
    def accept(self, token: int) -> bool: ...          # False: the token breaks the grammar
    def is_terminated(self) -> bool: ...


class GrammarBackend(Protocol):
    def compile(self, params: StructuredOutputsParams) -> Any: ...
    def matcher(self, compiled: Any) -> Matcher: ...
    def fill(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None: ...   # row i <- matchers[i]


class Grammars:
    """The engine's entry point: matchers for constraints, compiled once each, and batch masks."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], max_rows: int):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self.max_rows = max_rows
        self._backend: GrammarBackend | None = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._bitmask: torch.Tensor | None = None

    def matcher(self, params: StructuredOutputsParams) -> Matcher:
        """A fresh matcher for `params`; GrammarError if the backend refuses the constraint."""
        key = params.key()
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self.backend.compile(params)
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return self.backend.matcher(compiled)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def masks(self, matchers: list[Matcher]) -> torch.Tensor:
        """The bitmask rows [len(matchers), ceil(vocab / 32)] int32 for these matchers' next tokens."""
        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(matchers):
            self._bitmask = torch.empty(max(self.max_rows, len(matchers)), words, dtype=torch.int32)
        bitmask = self._bitmask[: len(matchers)]
        self.backend.fill(matchers, bitmask)
        return bitmask

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            from .grammar_guidance import GuidanceBackend

            self._backend = GuidanceBackend(self.tokenizer, self.vocab_size, self.stop_ids)
        return self._backend


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """-inf at the tokens row rows[k] may not take (bitmask row k); other rows unchanged.

    Bit j of 32-bit word w allows token 32 w + j; read as little-endian bytes, bit b of byte i is
    token 8 i + b, so one table lookup per byte unpacks the mask."""
    native = cpu_kernels.load() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if native is not None and logits.is_contiguous():
        native.apply_token_bitmask(logits, torch.tensor(rows, dtype=torch.long), bitmask.contiguous())
        return logits
    vocab = logits.shape[1]
    table = _byte_bits(logits.device)
    allowed = table[bitmask.to(logits.device).view(torch.uint8).long()].flatten(1)[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill_(~allowed, float("-inf"))
    return logits


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit b of byte value v."""
    if device not in _BYTE_BITS:
        values = torch.arange(256, dtype=torch.int32)[:, None]
        _BYTE_BITS[device] = ((values >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(device)
    return _BYTE_BITS[device]
