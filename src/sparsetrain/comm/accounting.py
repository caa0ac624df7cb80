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


def ring_allreduce_bytes(numel: int, elem_bytes: int, world: int) -> int:
    """Return the bytes one rank sends in a ring allreduce of ``numel`` elements."""
    if world <= 1:
        return 0
    return int(round(2 * (world - 1) / world * numel * elem_bytes))


def ring_allgather_bytes(total_bytes: int, world: int) -> int:
    """Return the bytes one rank sends in a ring allgather whose gathered total is ``total_bytes``."""
    if world <= 1:
        return 0
    return int(round((world - 1) / world * total_bytes))
