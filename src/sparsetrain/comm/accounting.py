"""Byte accounting: what this rank puts on the wire under the algorithm actually used.

Formulas (p ranks, n elements, b bytes an element):

* ring allreduce: reduce-scatter then allgather, each moves (p-1)/p of the vector:
  ``2 (p-1)/p * n * b`` sent by every rank (and as much received).
* ring allgather of blocks totalling ``B`` bytes: every rank forwards p-1 of the p blocks,
  ``(p-1)/p * B`` on average.

These are the numbers a ratio against dense allreduce must use to be honest; a compressor's
payload size alone overstates the saving of gathered payloads, whose cost grows with p.
"""

from __future__ import annotations

from typing import Any

from .._options import is_integer


def _check_counts(**counts: Any) -> None:
    """Refuse a count that is not an integer >= 0 (``world`` >= 1), naming it."""
    for name, value in counts.items():
        low = 1 if name == "world" else 0
        if not is_integer(value, low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def ring_allreduce_bytes(numel: int, elem_bytes: int, world: int) -> int:
    """Return the bytes one rank sends in a ring allreduce of ``numel`` elements."""
    _check_counts(numel=numel, elem_bytes=elem_bytes, world=world)
    if world <= 1:
        return 0
    return int(round(2 * (world - 1) / world * numel * elem_bytes))


def ring_allgather_bytes(total_bytes: int, world: int) -> int:
    """Return the bytes one rank sends in a ring allgather whose gathered total is ``total_bytes``."""
    _check_counts(total_bytes=total_bytes, world=world)
    if world <= 1:
        return 0
    return int(round((world - 1) / world * total_bytes))
