"""When to prune and to which sparsity: one-shot, or gradual along a polynomial.

A schedule answers ``target(step, final)``: the sparsity to reach after optimizer step ``step``,
or None when this step does not prune. Pruners only prune when the target exceeds the sparsity
they already have, so calling them again at the same step (or after a resume) changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .._options import is_integer
from .masks import check_sparsity

_SCHEDULES: dict[str, type[Schedule]] = {}


def register_schedule(name: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: register a schedule under ``name``."""

    def wrap(cls: type[Schedule]) -> type[Schedule]:
        if name in _SCHEDULES and _SCHEDULES[name] is not cls:
            raise ValueError(f"schedule name {name!r} is already registered by {_SCHEDULES[name]}")
        cls.name = name
        _SCHEDULES[name] = cls
        return cls

    return wrap


class Schedule:
    """Base class: ``target(step, final)`` returns a sparsity or None."""

    name: ClassVar[str] = ""

    def target(self, step: int, final: float) -> float | None:
        raise RuntimeError(f"{type(self).__name__} must define target()")

    def options(self) -> dict[str, Any]:
        """Return the schedule's settings: its dataclass fields (none for other classes)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _check_int(schedule: Schedule, name: str, low: int) -> None:
    """Refuse ``schedule.<name>`` unless an integer >= ``low``; keep a NumPy one as an int (a
    frozen dataclass: set through object.__setattr__)."""
    v = getattr(schedule, name)
    if not is_integer(v, low):
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    object.__setattr__(schedule, name, operator.index(v))


@register_schedule("oneshot")
@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune to the final sparsity once, at optimizer step ``at`` (or the first step after it).

    Example:
        >>> OneShot(at=10).target(10, 0.9)
        0.9
    """

    at: int = 0

    def __post_init__(self) -> None:
        _check_int(self, "at", 0)

    def target(self, step: int, final: float) -> float | None:
        return final if step >= self.at else None


@register_schedule("gradual")
@dataclass(frozen=True)
class Gradual(Schedule):
    """Raise sparsity from ``initial_sparsity`` to the final one along a polynomial.

    Zhu & Gupta (2017), "To prune, or not to prune": at steps ``start, start + frequency, ...``
    and at ``end``, the sparsity is::

        s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** power

    ``power = 3`` (cubic) prunes fast while many weights are redundant and slowly near the end.

    Example:
        >>> g = Gradual(start=0, end=100, frequency=10)
        >>> round(g.target(50, 0.8), 3), g.target(55, 0.8), g.target(100, 0.8)
        (0.7, None, 0.8)
    """

    start: int = 0
    end: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0
    power: float = 3.0

    def __post_init__(self) -> None:
        _check_int(self, "start", 0)
        _check_int(self, "frequency", 1)
        _check_int(self, "end", 0)
        if self.end <= self.start:
            raise ValueError(f"end must be after start, got start={self.start}, end={self.end}")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        if (
            isinstance(self.power, bool)
            or not isinstance(self.power, numbers.Real)
            or not (math.isfinite(self.power) and self.power > 0)
        ):
            raise ValueError(f"power must be a positive number (and finite), got {self.power!r}")
        object.__setattr__(self, "power", float(self.power))  # (a NumPy float as a float)

    def target(self, step: int, final: float) -> float | None:
        if step < self.start:
            return None
        if step >= self.end:
            return final
        if (step - self.start) % self.frequency:
            return None
        progress = (step - self.start) / (self.end - self.start)
        return final + (self.initial_sparsity - final) * (1.0 - progress) ** self.power


def available_schedules() -> list[str]:
    """Return the registered sparsity schedule names, sorted."""
    return sorted(_SCHEDULES)


def get_schedule(name: str, **options: Any) -> Schedule:
    """Build the schedule registered as ``name`` (``"oneshot"``, ``"gradual"``) with options."""
    if name not in _SCHEDULES:
        raise ValueError(
            f"unknown schedule {name!r}; valid names are: {', '.join(available_schedules())}"
        )
    cls = _SCHEDULES[name]
    allowed = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"schedule {name!r} does not take {unknown}; it takes: {', '.join(allowed)}"
        )
    return cls(**options)
