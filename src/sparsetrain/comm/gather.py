"""Dense allreduce and gathers of variable-size payloads, with honest byte counts.

torch.distributed's ``all_gather`` needs equal sizes on every rank (gloo and NCCL alike), so a
variable-size gather is two collectives: an allgather of the sizes, then an allgather of the
payloads padded to the largest. The padding crosses the wire, so it is counted.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._options import plain
from .accounting import ring_allgather_bytes, ring_allreduce_bytes
from .p2p import (
    alone,
    as_bytes,
    as_dtype,
    call_codes,
    check_group,
    detached,
    device_of,
    input_error,
    raise_disagreement,
)
from .registry import CollectiveResult, SparseCollective, register_collective


def world_of(group: dist.ProcessGroup | None) -> int:
    """The number of ranks in ``group`` (None: the default group); 1 without a process group."""
    check_group(group)
    return 1 if alone() else dist.get_world_size(group)


def allreduce_sum(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None, *, check: bool = True
) -> tuple[list[Tensor], int]:
    """Sum ``tensors`` over ranks with one allreduce of their concatenation.

    Every rank passes as many tensors, of the same sizes and one dtype. With ``check`` (the
    default) that is checked first, in one more allreduce of 10 ints: ranks that differ, or a
    rank whose input is refused, get an error on every rank (without it gloo aborts a process
    or returns a sum of mismatched tensors, as ``torch.distributed.all_reduce`` itself does).
    ``check=False`` skips it where the sizes agree by construction.

    Returns:
        the summed tensors (new tensors, same shapes) and the bytes this rank sent (ring formula,
        the check's included).
    """
    return _allreduce(tensors, group, "sum", check)


def allreduce_max(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None, *, check: bool = True
) -> tuple[list[Tensor], int]:
    """The elementwise maximum over ranks, as :func:`allreduce_sum` computes the sum."""
    return _allreduce(tensors, group, "max", check)


def _allreduce(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None, op: str, check: bool = False
) -> tuple[list[Tensor], int]:
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r}")
    error: Exception | None = None
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or not tensors:
        error = ValueError(
            f"allreduce_{op} takes a non-empty sequence (list or tuple) of tensors, got "
            f"{tensors!r:.100}"
        )
    elif not all(isinstance(t, Tensor) for t in tensors):
        error = TypeError(
            f"allreduce_{op} takes tensors, got {[type(t).__name__ for t in tensors]}"
        )
    elif len({t.dtype for t in tensors}) != 1:
        error = TypeError(
            "summable payload tensors must share one dtype, got "
            f"{sorted(map(str, {t.dtype for t in tensors}))}"
        )
    elif tensors[0].dtype == torch.bool:  # (summed, bools are a logical or)
        error = TypeError(f"allreduce_{op} takes numbers, got bool tensors; convert them first")
    elif any(t.layout != torch.strided for t in tensors):
        error = TypeError(
            f"allreduce_{op} takes dense (torch.strided) tensors, got layouts "
            f"{sorted({str(t.layout) for t in tensors})}; pass t.to_dense()"
        )
    elif len({t.device for t in tensors}) != 1 or tensors[0].device.type == "meta":
        error = ValueError(
            f"allreduce_{op} takes tensors on one device that hold data, got devices "
            f"{sorted({str(t.device) for t in tensors})}"
        )
    world = world_of(group)
    checked = 0
    if check and world > 1:
        checked = _agree(tensors if error is None else (), error, group, op)
    elif error is not None:
        raise error
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])  # values, not a graph
    if world > 1:
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(flat, op=reduce_op, group=group)
    out = [
        part.view(t.shape)
        for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)
    ]
    return out, checked + ring_allreduce_bytes(flat.numel(), flat.element_size(), world)


def _agree(
    tensors: Sequence[Tensor], error: Exception | None, group: dist.ProcessGroup | None, op: str
) -> int:
    """Raise on every rank unless every rank passes tensors of the same count, sizes and dtype
    (``error``: this rank's own refusal, told to the others); return the bytes sent. One
    allreduce of their maximum and minus their minimum: equal where they agree."""
    sizes = [t.numel() for t in tensors]
    mine = [
        len(sizes), sum(sizes), zlib.crc32(repr(sizes).encode()),
        zlib.crc32(str(tensors[0].dtype).encode()) if tensors else 0,
    ]  # fmt: skip
    bad = int(error is not None)
    both = torch.tensor(
        [*mine, bad, *(-v for v in mine), 0], dtype=torch.int64,
        device=device_of(tensors[0] if tensors else None, group),
    )  # fmt: skip
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    got = both.tolist()  # one read of the device
    hi, refused, lo = got[:4], got[4], [-v for v in got[5:9]]
    if error is not None:
        raise error
    if refused:
        raise ValueError(f"allreduce_{op}: another rank's tensors are refused (see its error)")
    if hi != lo:
        raise ValueError(
            f"allreduce_{op}: the ranks pass different tensors (this rank: {len(sizes)} of "
            f"sizes {sizes[:8]}{'...' if len(sizes) > 8 else ''}, {tensors[0].dtype}; over the "
            f"ranks {lo[1]} to {hi[1]} elements in all): every rank passes as many tensors, of "
            "the same sizes and dtype"
        )
    return ring_allreduce_bytes(both.numel(), both.element_size(), dist.get_world_size(group))


def all_gather_variable(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> tuple[list[list[Tensor]], int, int]:
    """Gather a tuple of 1-D tensors of any lengths from every rank.

    Every rank passes the same number of tensors with the same dtypes (lengths may differ).
    Steps: allgather the byte lengths (int64 header), then allgather the byte buffers padded to
    the largest, then cut each rank's buffer back into its tensors.

    Returns:
        per rank, the list of its tensors; bytes sent and received by this rank.

    Raises:
        TypeError: ``group`` is neither a ProcessGroup nor None (on this rank, before any
            message), ``tensors`` is not a sequence of tensors, or the ranks' dtypes differ.
        ValueError: ``tensors`` is empty, one is not 1-D, they are on a device the group does
            not move, or the ranks pass different numbers of tensors.
        Every error but ``group``'s is raised on every rank alike: a rank's bad input travels
        in the size header, whose size is the same on every rank, so no rank is left waiting.
    """
    error: Exception | None = None
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        error = TypeError(
            "all_gather_variable takes a sequence (list or tuple) of 1-D tensors, got "
            f"{type(tensors).__name__}"
        )
        tensors = ()
    elif any(not isinstance(t, Tensor) for t in tensors):
        error = TypeError(
            "all_gather_variable takes a sequence of 1-D tensors; got elements of type "
            f"{[type(t).__name__ for t in tensors if not isinstance(t, Tensor)]}"
        )
        tensors = ()
    elif not tensors:
        error = ValueError(
            "all_gather_variable needs at least one tensor to gather (every rank passes the "
            "same number, with the same dtypes); got an empty sequence"
        )
    codes = [zlib.crc32(str(t.dtype).encode()) for t in tensors]  # the same in every process

    def same_dtypes(rows: list[list[int]]) -> None:
        differ = [r for r, row in enumerate(rows) if row != codes]
        if differ:
            raise TypeError(
                f"all_gather_variable: rank(s) {differ} gather tensors of other dtypes than "
                f"this rank's {[str(t.dtype) for t in tensors]}; every rank passes the same "
                "dtypes in the same order"
            )

    # The dtypes travel in the size header (no extra message), so every rank sees every rank's
    # and raises alike, rather than reading another rank's bytes as its own dtype.
    return _all_gather_with_header(tensors, codes, group, same_dtypes, error)


def _all_gather_with_header(
    tensors: Sequence[Tensor],
    extra: Sequence[int],
    group: dist.ProcessGroup | None,
    check: Callable[[list[list[int]]], None] | None = None,
    error: Exception | None = None,
) -> tuple[list[list[Tensor]], int, int]:
    """:func:`all_gather_variable`, with ``extra`` ints carried in the size header (the same
    count on every rank), which ``check`` sees, per rank, before any buffer is cut into
    tensors: input checks that cost no extra message and raise on every rank alike.

    ``error``: what the caller found wrong with this rank's input; it is raised here, and
    every other rank raises too, after the header has told them."""
    device = device_of(tensors[0] if tensors else None, group)
    if error is None:
        shapes = [tuple(t.shape) for t in tensors if t.dim() != 1]
        elsewhere = sorted({str(t.device) for t in tensors if t.device != device})
        if shapes:
            error = ValueError(f"gathered payload tensors must be 1-D, got shapes {shapes}")
        elif elsewhere:
            error = ValueError(
                f"gathered payload tensors are on {elsewhere}, but the gather runs on {device}: "
                "all must be on one device that a backend of the process group moves (NCCL "
                "moves CUDA memory only, gloo CPU and CUDA memory)"
            )
    raw: list[Tensor] = []
    if error is None:
        try:  # a sparse layout, a conjugate view: a local refusal, told to the others too
            raw = [as_bytes(t) for t in tensors]
        except RuntimeError as e:
            error = ValueError(
                f"gathered payload tensors must be dense (strided) tensors whose bytes can be "
                f"sent; got layouts {[str(t.layout) for t in tensors]}: {e}"
            )
    lengths = [r.numel() for r in raw] if error is None else [0] * len(tensors)
    extra = [int(x) for x in extra] if error is None else [0] * len(extra)
    head = [len(tensors), int(error is not None), *lengths, *extra]
    world = world_of(group)
    if world > 1:
        table, header_bytes = _gather_header(head, device, group, world)
    else:
        table, header_bytes = [head], 0
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[1]]
    if failed:
        raise ValueError(
            f"the tensors rank(s) {failed} passed to the gather are invalid (see the error "
            "there); this rank's are fine"
        )
    counts = [row[0] for row in table]
    if len(set(counts)) > 1:
        raise ValueError(
            f"the ranks pass different numbers of tensors to the gather ({counts}, by rank); "
            "every rank passes the same number, with the same dtypes"
        )
    n = len(tensors)
    if check is not None:
        check([row[2 + n :] for row in table])
    if world == 1:
        return [list(tensors)], 0, 0
    sizes = [row[2 : 2 + n] for row in table]
    totals = [sum(s) for s in sizes]
    width = max(totals)
    buf = torch.zeros(width, dtype=torch.uint8, device=device)
    if raw:
        torch.cat(raw, out=buf[: totals[dist.get_rank(group)]])
    bufs = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    out = []
    for r in range(world):
        parts = torch.split(bufs[r][: totals[r]], sizes[r])
        out.append([as_dtype(p, t.dtype) for p, t in zip(parts, tensors)])
    sent = header_bytes + ring_allgather_bytes(world * width, world)
    return out, sent, sent


# The first size header has this many int64 slots on every rank, whatever each rank passes, so
# the ranks always agree on its size and see one another's tensor counts (gloo aborts the
# process on an allgather whose sizes differ between ranks, NCCL hangs). A header that needs
# more slots on some rank is sent whole in a second allgather, sized from the first. Nine
# hold the library's own gathers (the allgather baseline's: its width, the tensor count, the
# error flag, two byte lengths and four ints of its input check) in one round.
HEADER_SLOTS = 9


def _gather_header(
    head: list[int], device: torch.device, group: dist.ProcessGroup | None, world: int
) -> tuple[list[list[int]], int]:
    """Allgather ``head`` (ints; the length may differ between ranks) and return every rank's,
    in rank order, with the bytes this rank sent for it (ring formula)."""
    first = [len(head)] + head[: HEADER_SLOTS - 1]
    first += [0] * (HEADER_SLOTS - len(first))
    mine = torch.tensor(first, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).tolist()  # one host sync: the sizes decide the buffers
    sent = ring_allgather_bytes(world * HEADER_SLOTS * 8, world)
    widest = max(row[0] for row in table)
    if widest <= HEADER_SLOTS - 1:
        return [row[1 : 1 + row[0]] for row in table], sent
    mine = torch.tensor(head + [0] * (widest - len(head)), dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table2 = torch.stack(rows).tolist()
    sent += ring_allgather_bytes(world * widest * 8, world)
    return [row[: lead[0]] for row, lead in zip(table2, table)], sent


@register_collective("allgather")
class AllgatherSparse(SparseCollective):
    """Gather every rank's (indices, values) and sum them locally: the baseline.

    Its volume grows with the number of ranks: each rank receives every other rank's k entries.
    Every rank adds the ranks' entries in rank order, so all ranks compute the same sum, bit for
    bit, when each rank's indices are unique (as the compressors give them).
    """

    exact = True

    def __repr__(self) -> str:
        return "AllgatherSparse()"

    def __call__(self, indices, values, numel, *, group=None, key=""):
        # The input checks ride in the size header (no extra message): a bad input on one rank
        # raises on every rank, as in the other collectives.
        numel, values = plain(numel), detached(values)
        device = device_of(values, group)
        error = input_error(indices, values, numel, device)
        if error is None:
            payload, codes = (indices, values), call_codes(indices, values, self.name, key)
        else:
            payload = (torch.empty(0, dtype=torch.int64, device=device),
                       torch.empty(0, dtype=torch.float32, device=device))  # fmt: skip
            numel, codes = 0, (0, 0)
        mine = [int(error is not None), numel, *codes]

        def check(heads: list[list[int]]) -> None:
            rank = dist.get_rank(group) if dist.is_initialized() else 0
            sizes, codes = [h[1] for h in heads], [h[2:] for h in heads]
            raise_disagreement(error, rank, any(h[0] for h in heads), (min(sizes), max(sizes)),
                               ([min(c) for c in zip(*codes)], [max(c) for c in zip(*codes)]),
                               indices, values, self.name, key)  # fmt: skip

        gathered, sent, recv = _all_gather_with_header(payload, mine, group, check)
        # One index_add_ per rank, in rank order: within a rank's (unique) indices no entry is
        # added to twice, so even CUDA's atomic adds give one order, the same on every rank. A
        # single index_add_ of all ranks' entries would add an entry's 3+ terms in a different
        # order on each rank, and the replicas would drift apart. (On CPU, where index_add_ adds
        # in index order, both give the same bits.)
        out = torch.zeros(numel, dtype=values.dtype, device=values.device)
        for g_idx, g_val in gathered:
            out.index_add_(0, g_idx.long(), g_val)
        return CollectiveResult(dense=out, bytes_sent=sent, bytes_recv=recv)
