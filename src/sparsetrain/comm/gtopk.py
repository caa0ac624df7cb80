"""gTop-k: the global top-k of a sum of top-k sparse vectors, by a tree of pairwise merges."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .._options import is_integer, plain
from .p2p import Wire, as_dtype, coalesce, detached, device_of, merge
from .registry import CollectiveResult, SparseCollective, register_collective


def keep_topk(idx: Tensor, val: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k entries of largest magnitude, sorted by index."""
    return _split_topk(idx, val, k)[0]


def _split_topk(
    idx: Tensor, val: Tensor, k: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """The k entries of largest magnitude, sorted by index, and the others (None if none)."""
    if idx.numel() <= k:
        return (idx, val), None
    _, pos = torch.topk(val.abs(), k, sorted=False)
    keep = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
    keep[pos] = True  # idx is sorted, so a mask keeps both parts sorted
    return (idx[keep], val[keep]), (idx[~keep], val[~keep])


def _encode(idx: Tensor, val: Tensor, k: int) -> Tensor:
    """One fixed-size message: an int64 count, then k index slots, then k value slots."""
    n = idx.numel()
    head = torch.tensor([n], dtype=torch.int64, device=val.device).view(torch.uint8)
    i = torch.zeros(k, dtype=idx.dtype, device=idx.device)
    v = torch.zeros(k, dtype=val.dtype, device=val.device)
    i[:n] = idx
    v[:n] = val
    return torch.cat([head, i.view(torch.uint8), v.view(torch.uint8)])


def _decode(buf: Tensor, k: int, idx_dtype: torch.dtype, val_dtype: torch.dtype):
    n = int(as_dtype(buf[:8], torch.int64)[0])
    ib = torch.empty((), dtype=idx_dtype).element_size()
    i = as_dtype(buf[8 : 8 + k * ib], idx_dtype)
    v = as_dtype(buf[8 + k * ib :], val_dtype)
    return i[:n], v[:n]


@register_collective("gtopk")
@dataclass
class GTopK(SparseCollective):
    """Select a global top-k of the sum of the ranks' sparse vectors (Shi et al., ICDCS'19).

    Shi, Wang, Chu, Li: "A Distributed Synchronous SGD Algorithm with Global Top-k
    Sparsification for Low Bandwidth Networks", ICDCS 2019.

    Steps, for p ranks (any p) and k the largest per-rank count (or the ``k`` option):

    1. Each rank keeps the k entries of largest magnitude of its own vector.
    2. Binomial-tree reduction in ceil(log2 p) rounds: in the round of distance d, a rank whose
       number is an odd multiple of d sends its current k-sparse vector to rank - d and drops
       out; the receiver sums the two (duplicate indices add) and keeps the k entries of
       largest magnitude again. Ranks without a partner (p not a power of two) wait a round.
    3. Rank 0 holds the result and broadcasts it down the same tree, so every rank returns the
       same k (indices, values).

    The result is gTop-k's selection, not the exact top-k of the sum: a contribution dropped at
    one merge cannot come back. Its position can still be selected through another branch of
    the tree, and then the result holds the other branch's sum there. So what each merge drops
    is returned as ``dropped`` by the rank that merged, for its error feedback to keep: over
    all ranks the dropped partial sums and the result add up to the inputs' sum, and nothing
    is lost. (The paper instead masks each rank's residual by the global selection's indices,
    which neither applies nor keeps a contribution dropped at a position that is selected
    after all.) Every message has the fixed size of k entries plus a count, so one message
    per round suffices.

    Args:
        k: entries to keep; None (default) uses the largest per-rank input count.

    Example:
        >>> coll = get_collective("gtopk")  # doctest: +SKIP
        >>> res = coll(idx, val, numel=10_000)  # doctest: +SKIP
        >>> res.indices, res.values  # the same on every rank  # doctest: +SKIP
    """

    k: int | None = None
    exact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.k is not None:
            # (below 2**63: the ranks compare it as an int64, where a larger one had failed)
            if not is_integer(self.k, 1) or operator.index(self.k) >= 2**63:
                raise ValueError(f"k must be a positive int below 2**63 or None, got {self.k!r}")
            self.k = operator.index(self.k)  # (a NumPy integer as an int)

    def __call__(
        self,
        indices: Tensor,
        values: Tensor,
        numel: int,
        *,
        group: dist.ProcessGroup | None = None,
        key: str = "",
    ) -> CollectiveResult:
        """Return the global selection (sorted by index), the same on every rank.

        Args:
            indices: 1-D int32/int64 positions in ``[0, numel)``, unique on this rank.
            values: 1-D floating-point values, as many as ``indices``.
            numel: length of the vector, the same on every rank.
            group: process group (default: the default group).
            key: names the vector; the same on every rank (checked: ranks that reduce
                different vectors at once get an error). The algorithm keeps no state.

        Returns:
            ``CollectiveResult`` with ``indices`` and ``values``, ``dropped`` (what this rank
            dropped: of its own input beyond k, and of the sums it merged) and the bytes
            counted.
        """
        numel, values = plain(numel), detached(values)
        wire = Wire(group, device_of(values, group), self.name, key)
        k, _ = wire.agree(indices, values, numel, self.k, options={"k": self.k or 0})
        # Never more than the vector holds: every message has room for k entries.
        k = min(k, numel)
        p, rank = wire.world, wire.rank
        (idx, val), gone = _split_topk(*coalesce(indices, values), max(k, 1))
        dropped = [gone] if gone is not None else []
        if idx is indices:  # sorted input kept whole: never hand the caller's tensors back
            idx, val = idx.clone(), val.clone()
        if k == 0:  # every rank sent nothing
            return CollectiveResult(
                indices=idx, values=val, dropped=_joined(dropped, idx, val), **_bytes(wire)
            )
        ib, vb = idx.element_size(), val.element_size()
        size = 8 + k * (ib + vb)

        d = 1
        while d < p:
            if rank % (2 * d) == d:
                wire.exchange({rank - d: _encode(idx, val, k)}, {}, {rank - d: 2 * k + 1})
                break
            if rank + d < p:
                got = wire.exchange({}, {rank + d: size}, {})[rank + d]
                merged = merge([(idx, val), _decode(got, k, idx.dtype, val.dtype)])
                (idx, val), gone = _split_topk(*merged, k)
                if gone is not None:
                    dropped.append(gone)
            d *= 2

        # Broadcast down the tree: receive from the parent, then send to children, farthest first.
        low = (rank & -rank) if rank else 1 << max(p - 1, 1).bit_length()
        if rank:
            got = wire.exchange({}, {rank - low: size}, {})[rank - low]
            idx, val = _decode(got, k, idx.dtype, val.dtype)
        d = low // 2
        msg = None
        while d >= 1:
            if rank + d < p:
                msg = _encode(idx, val, k) if msg is None else msg
                wire.exchange({rank + d: msg}, {}, {rank + d: 2 * k + 1})
            d //= 2
        # The same selection on every rank, so every rank raises together. A NaN or Inf ranks
        # above every finite magnitude and takes a slot, as Ok-Topk refuses to select from it.
        if not bool(torch.isfinite(val).all()):
            raise FloatingPointError(_NONFINITE)
        return CollectiveResult(
            indices=idx, values=val, dropped=_joined(dropped, idx, val), **_bytes(wire)
        )


_NONFINITE = (
    "gtopk: the selected sums hold Inf or NaN (a rank's values, or a merge that overflowed), "
    "which rank above every finite one; check gradients before the exchange (the sync layer's "
    "on_nonfinite does)"
)


def _joined(parts: list[tuple[Tensor, Tensor]], idx: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """The dropped parts as one sparse vector, sorted by index, an index dropped twice (by two
    merges) summed once (empty tensors of the result's dtypes if nothing was dropped)."""
    if not parts:
        return idx[:0].clone(), val[:0].clone()
    return merge(parts)


def _bytes(wire: Wire) -> dict[str, int]:
    return {"bytes_sent": wire.traffic.bytes_sent, "bytes_recv": wire.traffic.bytes_recv}
