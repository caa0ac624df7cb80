"""Checks shared by the registries (compressors, collectives, pruners, aggregators, attacks):
of their options, and of the states their ``load_state_dict`` is given."""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with NumPy scalars (``np.float64`` passes a float check, being a subclass)
    turned into Python numbers, through dicts, lists and tuples: a saved state or a report
    then holds only what ``torch.load`` reads by default (``weights_only=True``) and JSON
    writes."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()  # a NumPy scalar (arrays are left alone)
    return value


def check_options(kind: str, name: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the options of ``options`` that ``kind`` ``name`` does not
    take, and the ones it does."""
    allowed = list(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} does not take option(s) {unknown}; "
            f"it takes: {', '.join(allowed) if allowed else 'no options'}"
        )


def is_integer(value: Any, minimum: int | None = None) -> bool:
    """Whether ``value`` is an integer (a Python int, numpy's, a 0-d integer tensor; not a
    bool), and at least ``minimum`` if given."""
    if isinstance(value, bool):
        return False
    try:
        number = operator.index(value)
    except TypeError:
        return False
    return minimum is None or number >= minimum


def state_int(value: Any, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    """Return ``value`` (an integer entry of a loaded state) as an int, or raise a ValueError
    naming ``what`` unless it is an integer in ``[minimum, maximum]``."""
    if not is_integer(value, minimum) or (maximum is not None and operator.index(value) > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{what} must be an integer {allowed}, got {value!r:.200}")
    return operator.index(value)


def state_mapping(value: Any, what: str, shape: str = "") -> Mapping[str, Any]:
    """Return ``value`` (an entry of a loaded state that must be a dict), or raise a ValueError
    naming ``what`` and the ``shape`` expected (say "{key: list of tensors}")."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict{' ' + shape if shape else ''}, got {value!r:.200}")
    return value


def check_state(
    state: Any, owner: str, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    """Refuse a ``state`` for the ``load_state_dict`` of ``owner`` (say "compressor 'qsgd'")
    that is not a dict with exactly the ``required`` entries (and perhaps ``optional`` ones),
    naming what is wrong and what is expected."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{owner}: load_state_dict takes the dict that state_dict() returned, got "
            f"{type(state).__name__}"
        )
    missing = [k for k in required if k not in state]
    unknown = sorted(repr(k) for k in state if k not in required and k not in optional)
    if not required and not optional:
        if unknown:
            raise ValueError(
                f"{owner} keeps no state (its state_dict() is empty), got entries "
                f"{', '.join(unknown)}"
            )
        return
    if missing or unknown:
        expected = ", ".join(repr(k) for k in required)
        if optional:
            expected += f" (and optionally {', '.join(repr(k) for k in optional)})"
        problems = []
        if missing:
            problems.append(f"lacks {', '.join(repr(k) for k in missing)}")
        if unknown:
            problems.append(f"has unknown entries {', '.join(unknown)}")
        raise ValueError(
            f"{owner}: a state must have exactly the key{'s' if len(required) > 1 else ''} "
            f"{expected}, as state_dict() returns; this one {' and '.join(problems)}"
        )


def check_saved_settings(
    state: Mapping[str, Any], owner: str, now: Mapping[str, Any], strict: bool
) -> None:
    """Refuse (``ValueError``) a state whose recorded settings (its ``"options"`` entry, as
    ``plain(now)`` was when saved) differ from ``now``, naming each, unless ``strict`` is False;
    a state from before settings were recorded is not compared. ``n``, the number of workers,
    is not compared: it is the world's, which the sync checks at its first step, and it changes
    where ``reshard_state`` carries a state to another number of ranks (a rule whose state is
    by worker refuses another ``n`` by its shape)."""
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    saved = state.get("options")
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"{owner}: the state's 'options' must be a dict, got {saved!r:.200}")
    now = plain(dict(now))
    diffs = [
        f"{k}: saved {saved[k]!r}, now {v!r}"
        for k, v in now.items()
        if k in saved and k != "n" and saved[k] != v
    ]
    if diffs and strict:
        raise ValueError(
            f"{owner}: this state was saved with other settings ({'; '.join(diffs)}); build it "
            "with the saved settings to load it, or pass strict=False to go on under the new "
            "ones"
        )


def caller_stacklevel(within: str | None = None) -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside sparsetrain
    (the user's ``GradientSync(...)``, say, not the library frame that built what warns), or
    outside the folder ``within``, counted from the function that warns."""
    folder = within if within is not None else os.path.dirname(__file__)
    here = os.path.abspath(folder) + os.sep  # (not sparsetrain_ext/)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level
