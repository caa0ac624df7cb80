"""Checks shared by the registries (compressors, collectives, pruners, aggregators, attacks)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


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
