"""SparCML's dynamic sparse allreduce (DSAR): sparse while sparse pays, dense once it does not."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from .._options import plain
from .p2p import Wire, detached, device_of
from .registry import CollectiveResult, SparseCollective, register_collective
from .ssar import split_allgather


@register_collective("dsar")
@dataclass
class DSAR(SparseCollective):
    """Sum sparse vectors by split-allgather, switching each part to dense at break-even.

    SparCML (Renggli et al., SC'19) observes that a sparse (index, value) pair costs
    ``index_bytes + value_bytes`` while a dense element costs ``value_bytes``, so a block of
    length L with c non-zeros is cheaper dense once ``c / L`` reaches
    ``delta = value_bytes / (index_bytes + value_bytes)`` (0.5 for int32 indices and float32
    values). Sums of sparse vectors fill in, so the dense form wins as the reduction proceeds.

    Steps, for p ranks owning p equal index ranges:

    1. Split (reduce-scatter): each rank sends the entries of each range to its owner, sparse
       when below delta, else as the dense range. When every part is dense this is a dense
       reduce-scatter moving ``(p-1)/p`` of the vector, as a ring would; it is done with
       point-to-point messages because gloo has no reduce-scatter and because the
       representation is chosen per message.
    2. Each owner sums its range: into a dense accumulator (a linear scatter-add, no sort)
       once any input is dense or the entries it received could fill the range past delta,
       else by a sort-based merge. The result is dense if any input was, or if its number of
       non-zeros reaches delta times the range length.
    3. Allgather of the reduced ranges, each sparse or dense by the same rule.

    The rule is applied to the size each message announces, so sender and receivers agree on
    every representation without extra traffic.

    Example:
        >>> coll = get_collective("dsar")  # doctest: +SKIP
        >>> coll(idx, val, numel=10_000).dense  # doctest: +SKIP
    """

    def __call__(
        self,
        indices: Tensor,
        values: Tensor,
        numel: int,
        *,
        group: dist.ProcessGroup | None = None,
        key: str = "",
    ) -> CollectiveResult:
        """Return the dense sum over ranks.

        Args:
            indices: 1-D int32/int64 positions in ``[0, numel)``, unique on this rank.
            values: 1-D floating-point values, as many as ``indices``.
            numel: length of the vector, the same on every rank.
            group: process group (default: the default group).
            key: names the vector; the same on every rank (checked: ranks that reduce
                different vectors at once get an error). The algorithm keeps no state.

        Returns:
            ``CollectiveResult`` with ``dense`` (values' dtype and device) and the bytes counted.
        """
        numel, values = plain(numel), detached(values)
        wire = Wire(group, device_of(values, group), self.name, key)
        dense = split_allgather(wire, indices, values, numel, adaptive=True)
        t = wire.traffic
        return CollectiveResult(dense=dense, bytes_sent=t.bytes_sent, bytes_recv=t.bytes_recv)
