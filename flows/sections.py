"""Job-config sections derived from the engine's own dataclasses, so a setting is declared once.

`derive_section(EngineConfig, ...)` builds a strict pydantic model whose fields, types and
defaults are the dataclass's, whose per-field checks are the dataclass's `Check`s (so the error
names the dotted key: `engine.max_num_seqs must be >= 1 (got 0)`), and whose cross-field rules
run by building the dataclass itself. Adding a field to SamplingParams adds it to the
`sampling:` section, to the per-row sampling columns (io/spec.py) and to the job key.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

JOB_KEY = "job_key"   # json_schema_extra marker: does this field count in the job key?


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DerivedSection(Strict):
    """A section built by derive_section; its cross-field rules are the dataclass's own."""

    source: ClassVar[type]
    placeholders: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _cross_check(self):
        # Per-field checks have passed; what the dataclass still refuses is a cross-field rule.
        names = {f.name for f in dataclasses.fields(self.source)}
        values = {k: getattr(self, k) for k in type(self).model_fields if k in names}
        try:
            self.source(**{**self.placeholders, **values})
        except ValueError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None
        return self


def key_field(default: Any = ..., *, job_key: bool, **kwargs) -> Any:
    """A pydantic Field with its job-key decision (what `setting(affects_outputs=)` is for the
    engine's dataclasses): True if changing it changes the outputs."""
    return Field(default, json_schema_extra={JOB_KEY: job_key}, **kwargs)


def derive_section(name: str, dc: type, *, fields: tuple[str, ...] | None = None,
                   exclude: tuple[str, ...] = (), placeholders: dict[str, Any] | None = None,
                   overrides: dict[str, tuple[Any, Any]] | None = None, doc: str = "") -> type[Strict]:
    """A strict pydantic model of `dc`'s fields (all, `fields` only, or all but `exclude`).

    `placeholders` fill the dataclass's required fields that the section leaves out, so the
    section can build the dataclass to run its cross-field rules. `overrides` replace a field's
    (type, default) where the job narrows what the engine allows.
    """
    hints = get_type_hints(dc)
    chosen = [f for f in dataclasses.fields(dc)
              if (fields is None or f.name in fields) and f.name not in exclude]
    spec = {f.name: _field(f, hints[f.name]) for f in chosen}
    spec.update(overrides or {})
    base = type(f"{name}Base", (DerivedSection,), {"__module__": __name__, "source": dc,
                                                   "placeholders": placeholders or {}})
    return create_model(name, __base__=base, __doc__=doc, **spec)


def _field(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    check = f.metadata.get("check")
    if check is not None:
        hint = Annotated[hint, AfterValidator(_validator(f.name, check))]
    extra = {JOB_KEY: f.metadata["affects_outputs"]}
    if f.default_factory is not dataclasses.MISSING:
        return hint, Field(default_factory=f.default_factory, json_schema_extra=extra)
    default = ... if f.default is dataclasses.MISSING else f.default
    return hint, Field(default, json_schema_extra=extra)


def _validator(name: str, check):
    def validate(value):
        problem = check.problem(name, value)
        if problem:
            raise ValueError(problem)
        return value
    return validate


def job_key_decision(field: Any) -> bool | None:
    """A pydantic field's job-key decision; None where none was made (a test refuses that)."""
    extra = field.json_schema_extra
    return extra.get(JOB_KEY) if isinstance(extra, dict) else None
