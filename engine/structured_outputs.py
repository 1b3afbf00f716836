"""StructuredOutputsParams: the constraint a request's output must satisfy (vLLM's names).

Exactly one of `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (the output
is one of these strings), `grammar` (EBNF, as xgrammar and vLLM take it) or `json_object` (any
JSON object). The engine enforces it token by token (engine/grammar.py); `key()` names the
constraint for the compile cache, so requests with the same schema share one compiled grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .settings import check_settings, setting

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = setting(None, affects_outputs=True)
    regex: str | None = setting(None, affects_outputs=True)
    choice: list[str] | None = setting(None, affects_outputs=True)
    grammar: str | None = setting(None, affects_outputs=True)
    json_object: bool = setting(False, affects_outputs=True)

    def __post_init__(self) -> None:
        check_settings(self, [self._one_kind_problem(), self._json_problem(), self._choice_problem()])
        if isinstance(self.json, str):
            self.json = json.loads(self.json)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """Canonical text of the constraint: equal constraints, equal keys."""
        return json.dumps({self.kind: getattr(self, self.kind)}, sort_keys=True, separators=(",", ":"))

    def _one_kind_problem(self) -> str | None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            return f"set exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
        return None

    def _json_problem(self) -> str | None:
        if isinstance(self.json, str):
            try:
                value = json.loads(self.json)
            except ValueError as e:
                return f"json is not valid JSON: {e}"
            return None if isinstance(value, dict | bool) else "json must be a JSON schema (an object)"
        return None

    def _choice_problem(self) -> str | None:
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            return "choice must be a non-empty list of non-empty strings"
        return None

