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

from .accounting import ring_allgather_bytes, ring_allreduce_bytes
from .p2p import (
    as_bytes,
    as_dtype,
    check_group,
    device_of,
    dtype_codes,
    input_error,
    raise_disagreement,
)
from .registry import CollectiveResult, SparseCollective, register_collective


def world_of(group: dist.ProcessGroup | None) -> int:
    """The number of ranks in ``group`` (None: the default group); 1 without a process group."""
    check_group(group)
    return dist.get_world_size(group) if dist.is_initialized() else 1


def allreduce_sum(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> tuple[list[Tensor], int]:
    """Sum ``tensors`` over ranks with one allreduce of their concatenation.

    Returns:
        the summed tensors (new tensors, same shapes) and the bytes this rank sent (ring formula).
    """
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or not tensors:
        raise ValueError(
            "allreduce_sum takes a non-empty sequence (list or tuple) of tensors, got "
            f"{tensors!r:.100}"
        )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(
            f"summable payload tensors must share one dtype, got {sorted(map(str, dtypes))}"
        )
    flat = torch.cat([t.reshape(-1) for t in tensors])
    world = world_of(group)
    if world > 1:
        dist.all_reduce(flat, group=group)
    out = [
        part.view(t.shape)
        for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)
    ]
    return out, ring_allreduce_bytes(flat.numel(), flat.element_size(), world)


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
        TypeError: ``tensors`` is not a sequence of tensors, ``group`` is neither a
            ProcessGroup nor None, or the ranks' dtypes differ (on every rank).
        ValueError: ``tensors`` is empty, or one is not 1-D.
    """
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(
            "all_gather_variable takes a sequence (list or tuple) of 1-D tensors, got "
            f"{type(tensors).__name__}"
        )
    bad = [type(t).__name__ for t in tensors if not isinstance(t, Tensor)]
    if bad:
        raise TypeError(
            f"all_gather_variable takes a sequence of 1-D tensors; got elements of type {bad}"
        )
    if not tensors:
        raise ValueError(
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
    return _all_gather_with_header(tensors, codes, group, same_dtypes)


def _all_gather_with_header(
    tensors: Sequence[Tensor],
    extra: Sequence[int],
    group: dist.ProcessGroup | None,
    check: Callable[[list[list[int]]], None] | None = None,
) -> tuple[list[list[Tensor]], int, int]:
    """:func:`all_gather_variable`, with ``extra`` ints carried in the size header (the same
    count on every rank), which ``check`` sees, per rank, before any buffer is cut into
    tensors: input checks that cost no extra message and raise on every rank alike."""
    for t in tensors:
        if t.dim() != 1:
            raise ValueError(f"gathered payload tensors must be 1-D, got shape {tuple(t.shape)}")
    device = tensors[0].device
    raw = [as_bytes(t) for t in tensors]
    head = [r.numel() for r in raw] + [int(x) for x in extra]
    lengths = torch.tensor(head, dtype=torch.int64, device=device)
    world = world_of(group)
    if world == 1:
        if check is not None:
            check([list(extra)])
        return [list(tensors)], 0, 0
    headers = [torch.empty_like(lengths) for _ in range(world)]
    dist.all_gather(headers, lengths, group=group)
    table = torch.stack(headers).tolist()  # one host sync: the sizes decide the buffers
    sizes = [row[: len(raw)] for row in table]
    if check is not None:
        check([row[len(raw) :] for row in table])
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
    header_total = world * lengths.numel() * 8
    sent = ring_allgather_bytes(header_total + world * width, world)
    return out, sent, sent


@register_collective("allgather")
class AllgatherSparse(SparseCollective):
    """Gather every rank's (indices, values) and sum them locally: the baseline.

    Its volume grows with the number of ranks: each rank receives every other rank's k entries.
    Every rank adds the ranks' entries in rank order, so all ranks compute the same sum, bit for
    bit, when each rank's indices are unique (as the compressors give them).
    """

    exact = True

    def __call__(self, indices, values, numel, *, group=None, key=""):
        # The input checks ride in the size header (no extra message): a bad input on one rank
        # raises on every rank, as in the other collectives.
        device = device_of(values, group)
        error = input_error(indices, values, numel, device)
        if error is None:
            payload, codes = (indices, values), dtype_codes(indices, values)
        else:
            payload = (torch.empty(0, dtype=torch.int64, device=device),
                       torch.empty(0, dtype=torch.float32, device=device))  # fmt: skip
            numel, codes = 0, (0, 0)
        mine = [int(error is not None), numel, *codes]

        def check(heads: list[list[int]]) -> None:
            rank = dist.get_rank(group) if dist.is_initialized() else 0
            sizes = [h[1] for h in heads]
            raise_disagreement(error, rank, any(h[0] for h in heads), (min(sizes), max(sizes)),
                               len({tuple(h[2:]) for h in heads}) == 1, indices, values)  # fmt: skip

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
