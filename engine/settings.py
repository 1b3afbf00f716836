"""How the engine's settings are declared: a default, a range check and a job-key decision each.

EngineConfig and SamplingParams declare every field with `setting(...)`. The dataclasses check
themselves with it, and the job config (flows/sections.py) derives its `engine:` and `sampling:`
sections from the same declarations: one default, one range and one message per setting.

`affects_outputs` is the decision a new setting must make: does changing it change the
completions? Those that do are part of a job's key (a change starts a new job); those that do not
(batch sizes, pool sizes) can be tuned between runs and the job resumes. It is keyword-only and
has no default, so a setting cannot be added without deciding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Check:
    """A rule on one value; `text` completes "<name> ..." in an error message."""

    test: Callable[[Any], bool]
    text: str

    def problem(self, name: str, value: Any) -> str | None:
        if value is None or self.test(value):
            return None
        return f"{name} {self.text}"


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f"must be >= {lo}")


def greater_than(lo: float) -> Check:
    return Check(lambda v: v > lo, f"must be > {lo}")


def between(lo: float, hi: float, *, open_lo: bool = False) -> Check:
    low = (lambda v: v > lo) if open_lo else (lambda v: v >= lo)
    return Check(lambda v: low(v) and v <= hi, f"must be in {'(' if open_lo else '['}{lo}, {hi}]")


def one_of(*choices: Any) -> Check:
    return Check(lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")


def power_of_two() -> Check:
    return Check(lambda v: v > 0 and v & (v - 1) == 0, "must be a positive power of two")


def setting(default: Any = MISSING, check: Check | None = None, *, affects_outputs: bool,
            default_factory: Any = MISSING):
    """A dataclass field with its range check and its job-key decision (see the module doc)."""
    metadata = {"check": check, "affects_outputs": affects_outputs}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def check_settings(obj: Any, cross_field: list[str | None] = ()) -> None:
    """Raise ValueError("<Class>: <first problem>, got <value>") if any setting is out of range."""
    for f in fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        problem = check.problem(f.name, value) if check else None
        if problem:
            raise ValueError(f"{type(obj).__name__}: {problem}, got {value!r}")
    for problem in cross_field:
        if problem:
            raise ValueError(f"{type(obj).__name__}: {problem}")


def output_affecting(cls) -> tuple[str, ...]:
    """The settings of `cls` whose change changes the outputs."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("affects_outputs"))
