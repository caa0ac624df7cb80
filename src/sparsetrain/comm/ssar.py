"""SparCML's static sparse allreduce (SSAR): recursive doubling and split-allgather.

Renggli, Ashkboos, Aghagolzadeh, Alistarh and Hoefler, "SparCML: High-Performance Sparse
Communication for Machine Learning", SC'19. Both variants keep the data sparse the whole way and
return the exact sum, dense, on every rank. :mod:`.dsar` adds the switch to a dense representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._options import plain
from .p2p import (
    Wire,
    coalesce,
    detached,
    device_of,
    even_bounds,
    input_error,
    merge,
    pack,
    split_by_bounds,
    to_dense,
    unpack,
)
from .registry import CollectiveResult, SparseCollective, register_collective


def _sendrecv_sparse(
    wire: Wire, send_to: int | None, recv_from: int | None, idx: Tensor, val: Tensor
) -> tuple[Tensor, Tensor] | None:
    """Send (idx, val) to one peer and/or receive a sparse vector from one peer."""
    sends = {send_to: pack(idx, val)} if send_to is not None else {}
    sizes = wire.exchange_sizes(
        {p: b.numel() for p, b in sends.items()}, [recv_from] if recv_from is not None else []
    )
    got = wire.exchange(sends, sizes, dict.fromkeys(sends, 2 * idx.numel()))
    if recv_from is None:
        return None
    return unpack(got[recv_from], idx.dtype, val.dtype)


@register_collective("ssar_rd")
@dataclass
class SSARRecursiveDoubling(SparseCollective):
    """Sum sparse vectors over ranks by recursive doubling (SparCML SSAR_Recursive_double).

    Steps, for p ranks with p' the largest power of two not above p and r = p - p':

    1. Fold: of the first 2r ranks, each even rank sends its sparse vector to the odd rank above
       it, which merges it; the p' remaining ranks form the power-of-two core.
    2. log2 p' rounds: in round i each core rank exchanges its current sparse sum with the core
       rank whose number differs in bit i, and merges (duplicate indices summed, vectorised with
       ``torch.unique`` and ``index_add_``). The support grows as the rounds go ("fill-in").
    3. Unfold: each odd rank of the first 2r sends the final sum back to its even partner.
    4. Every rank scatters the sparse sum into a dense vector.

    Each exchange sends its size first, then one buffer holding indices and values. Both sides
    of a pair add the same two sums, so all ranks end with bit-identical results.

    Example:
        >>> coll = get_collective("ssar_rd")  # doctest: +SKIP
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
        """Return the dense sum over ranks of the sparse vectors ``(indices, values)``.

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
        wire.agree(indices, values, numel)
        idx, val = coalesce(indices, values)
        p, rank = wire.world, wire.rank
        core = 1 << (p.bit_length() - 1)
        extra = p - core
        if rank < 2 * extra and rank % 2 == 0:
            _sendrecv_sparse(wire, rank + 1, None, idx, val)
            new_rank = -1
        elif rank < 2 * extra:
            got = _sendrecv_sparse(wire, None, rank - 1, idx, val)
            idx, val = merge([(idx, val), got])
            new_rank = rank // 2
        else:
            new_rank = rank - extra
        if new_rank >= 0:
            mask = 1
            while mask < core:
                partner_new = new_rank ^ mask
                partner = 2 * partner_new + 1 if partner_new < extra else partner_new + extra
                got = _sendrecv_sparse(wire, partner, partner, idx, val)
                idx, val = merge([(idx, val), got])
                mask <<= 1
        if rank < 2 * extra and rank % 2 == 1:
            _sendrecv_sparse(wire, rank - 1, None, idx, val)
        elif rank < 2 * extra:
            idx, val = _sendrecv_sparse(wire, None, rank + 1, idx, val)
        t = wire.traffic
        return CollectiveResult(
            dense=to_dense(idx, val, numel), bytes_sent=t.bytes_sent, bytes_recv=t.bytes_recv
        )


def split_allgather(
    wire: Wire, indices: Tensor, values: Tensor, numel: int, adaptive: bool
) -> Tensor:
    """Check the input on every rank, then sum sparse vectors by split (reduce to range owners)
    then allgather; return the sum dense.

    With ``adaptive`` (DSAR), every message and every reduced range is sent dense when its sparse
    form would take at least as many bytes, i.e. when its density reaches
    ``value_bytes / (index_bytes + value_bytes)``. Sender and receiver apply the same rule to the
    size header, so the representation of each message is agreed without extra traffic: a sparse
    message is always strictly smaller than the dense form of its range.
    """
    p, rank = wire.world, wire.rank
    if input_error(indices, values, numel, wire.device) is not None:
        # Bad input (not even tensors, or a numel that is no int): nothing to split. The
        # agreement raises on every rank; this rank must not fail before it, alone.
        wire.agree(indices, values, numel, tell={})
        raise RuntimeError("split_allgather: invalid input passed the agreement")  # unreachable
    ib, vb = indices.element_size(), values.element_size()
    edges = even_bounds(numel, p)
    lengths = [edges[q + 1] - edges[q] for q in range(p)]

    def is_dense(nbytes_sparse: int, q: int) -> bool:
        return adaptive and lengths[q] > 0 and nbytes_sparse >= lengths[q] * vb

    def encode(i: Tensor, v: Tensor, q: int) -> tuple[Tensor, int]:
        if is_dense(i.numel() * (ib + vb), q):
            block = torch.zeros(lengths[q], dtype=v.dtype, device=v.device)
            block.index_add_(0, i.long() - edges[q], v)
            return block.view(torch.uint8), lengths[q]
        return pack(i, v), 2 * i.numel()

    # The split is computed before the input agreement (the input checked above), so that
    # the agreement's messages carry the sizes of the split too: one round fewer.
    sends, elems = {}, {}
    parts = split_by_bounds(indices, values, edges)
    for q in range(p):
        if q != rank:
            sends[q], elems[q] = encode(*parts[q], q)
    _, heard = wire.agree(indices, values, numel, tell={q: buf.numel() for q, buf in sends.items()})
    got = wire.exchange(sends, heard, elems)

    # Reduce this rank's range. A dense accumulator (a linear scatter-add) replaces the
    # sort-based merge as soon as any input is dense, or as soon as the entries that arrived
    # could fill the range past break-even; the sum then goes out sparse only if its non-zeros
    # stayed below break-even (found by a linear scan, already in index order).
    own_i, own_v = parts[rank]
    sparse_in = [(own_i, own_v)]
    dense_in = []
    for buf in got.values():
        if is_dense(buf.numel(), rank):
            dense_in.append(buf.view(values.dtype))
        else:
            sparse_in.append(unpack(buf, indices.dtype, values.dtype))
    entries = sum(s[0].numel() for s in sparse_in)
    if dense_in or is_dense(entries * (ib + vb), rank):
        acc = torch.zeros(lengths[rank], dtype=values.dtype, device=values.device)
        i_all = torch.cat([s[0] for s in sparse_in])
        acc.index_add_(0, i_all.long() - edges[rank], torch.cat([s[1] for s in sparse_in]))
        for d in dense_in:
            acc += d
        nz = None if dense_in else torch.nonzero(acc).squeeze(1)
        if nz is None or is_dense(nz.numel() * (ib + vb), rank):
            mine, my_elems = acc.view(torch.uint8), lengths[rank]
        else:
            ri = (nz + edges[rank]).to(indices.dtype)
            mine, my_elems = pack(ri, acc[nz]), 2 * nz.numel()
    else:
        ri, rv = merge(sparse_in)
        mine, my_elems = encode(ri, rv, rank)

    sizes = [row[0] for row in wire.allgather_ints([mine.numel()])]
    blocks = wire.allgatherv(mine, sizes, my_elems)
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    sp_i, sp_v = [], []
    for q, buf in enumerate(blocks):
        if is_dense(buf.numel(), q):
            out[edges[q] : edges[q + 1]] = buf.view(values.dtype)
        elif buf.numel():
            i, v = unpack(buf, indices.dtype, values.dtype)
            sp_i.append(i)
            sp_v.append(v)
    if sp_i:
        out[torch.cat(sp_i).long()] = torch.cat(sp_v)
    return out


@register_collective("ssar_split")
@dataclass
class SSARSplitAllgather(SparseCollective):
    """Sum sparse vectors by split-allgather (SparCML SSAR_Split_allgather).

    Steps, for p ranks:

    1. The index space ``[0, numel)`` is cut into p contiguous ranges of equal length; rank q
       owns range q.
    2. Split: each rank sends the entries of each range to its owner, all peers in one batch of
       point-to-point messages in rotating order (sizes first, then one buffer of indices and
       values per peer).
    3. Reduce: each owner merges what it received with its own entries (duplicate indices
       summed).
    4. Allgather: the reduced sparse ranges, whose sizes differ, are exchanged after an
       allgather of their sizes; every rank scatters them into the dense result.

    Each rank sends at most its own entries in step 2 and (p-1) times its reduced range in step
    4, so the volume stays close to that of the reduced result, unlike recursive doubling whose
    messages grow with fill-in.

    Example:
        >>> coll = get_collective("ssar_split")  # doctest: +SKIP
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
        """Return the dense sum over ranks; arguments as for :class:`SSARRecursiveDoubling`."""
        numel, values = plain(numel), detached(values)
        wire = Wire(group, device_of(values, group), self.name, key)
        dense = split_allgather(wire, indices, values, numel, adaptive=False)
        t = wire.traffic
        return CollectiveResult(dense=dense, bytes_sent=t.bytes_sent, bytes_recv=t.bytes_recv)
