"""Ok-Topk: sparse allreduce of O(k) volume with a global top-k chosen by a reused threshold."""

from __future__ import annotations

import copy
import math
import operator
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .._options import is_integer, plain
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
    unpack,
)
from .registry import CollectiveResult, SparseCollective, register_collective

_NONFINITE = (
    "oktopk: the summed values hold Inf or NaN, so no global threshold can select k of them; "
    "check gradients before the exchange (the sync layer's on_nonfinite does)"
)


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int (a Python or NumPy integer), or a ValueError naming ``name``. Below
    2**63: the ranks compare their options as int64 (an option past it had failed there)."""
    if not is_integer(value, 1) or operator.index(value) >= 2**63:
        raise ValueError(f"{name} must be a positive int below 2**63, got {value!r}")
    return operator.index(value)


def repartition(wire: Wire, idx: Tensor, numel: int) -> list[int]:
    """Return p+1 region edges that give each rank's region about the same number of entries.

    Each rank with entries takes the positions of its sorted indices at fractions 1/p, ..., (p-1)/p
    (its local quantiles); the edges are the integer mean of these over the ranks, weighted by
    how many entries each holds (one allreduce of p int64), so every rank computes the same
    edges, and a rank of few entries moves them little (with equal weights, one rank's 1000
    entries had all fallen in one region while two ranks of 10 placed the other edges). The
    weights are the counts up to ``2**62 // (numel * p)``, which keeps the sums in int64 (at
    least 1: an unweighted mean). Without any entries anywhere the regions are equal ranges.
    """
    p = wire.world
    n = idx.numel()
    votes = torch.zeros(p, dtype=torch.int64, device=idx.device)
    if n:
        weight = min(n, max(1, 2**62 // (numel * p)))
        pos = torch.arange(1, p, device=idx.device) * n // p
        votes[1:] = idx[pos].to(torch.int64) * weight
        votes[0] = weight
    wire.allreduce(votes)
    weights, *sums = votes.tolist()
    if weights == 0:
        return even_bounds(numel, p)
    return [0] + [s // weights for s in sums] + [numel]


# Rounds of estimate_threshold that only narrow [0, x] to its first bin (finding the scale of
# the k-th magnitude under a few far larger ones): 64**-32 is 1e-58 of the largest.
ZOOM_ROUNDS = 32

# Rounds past max_rounds that estimate_threshold takes while its count still exceeds 2k (the
# most a reused threshold may keep): a k-th magnitude inside a cluster of near-equal ones far
# from 0. 64**-10 = 2**-60 of the interval, below float64's resolution of 2**-52.
EXTRA_ROUNDS = 10


def estimate_threshold(
    wire: Wire, magnitudes: Tensor, k: int, bins: int = 64, max_rounds: int = 6
) -> float:
    """Return a threshold t such that about k of all ranks' magnitudes are >= t.

    Histogram refinement: start from ``[0, global max]``; each round allreduces a histogram of
    ``bins`` equal bins of the current interval, finds the bin in which the count of
    magnitudes >= its lower edge first reaches k, and zooms into it. Stops when that count
    exceeds k by at most ``max(1, k // 100)``, after ``max_rounds`` rounds, or when the bin
    cannot shrink any further (ties). A round that zooms into the first bin of an interval
    starting at 0 (the k-th magnitude lies below max / bins, max / bins**2, ...: a few
    entries far larger than the rest) only finds the scale and is not counted, up to
    ``ZOOM_ROUNDS`` of them; before, six such rounds ended at t = 0, which kept every entry.
    Where ``max_rounds`` rounds still leave more than 2k magnitudes >= t (the k-th inside a
    narrow cluster far from 0, say 1000 + 1e-12 x), up to ``EXTRA_ROUNDS`` more are taken
    until at most 2k are, each on the span of the magnitudes left in the bin (one allreduce of
    their minimum and maximum more), and none once that span is a single value (ties at the
    k-th magnitude, as clipped gradients have). Where they leave between k (plus the
    tolerance) and 2k, that span is taken once, and a single value is returned itself, so
    that a threshold at ties is known as such. The returned t always has at least k
    magnitudes >= t (when there are k at all; else t = 0, selecting everything). Costs a few
    allreduces of ``bins`` integers, independent of the vector's length.
    """
    m = magnitudes.to(torch.float64)
    top = torch.zeros(2, dtype=torch.float64, device=m.device)  # (max, any non-finite)
    if m.numel():  # (on the device: no wait for it before the allreduce)
        top[0] = m.max()
        top[1] = torch.isfinite(m).all().logical_not()
    wire.allreduce(top, dist.ReduceOp.MAX)
    if top[1] > 0:
        raise FloatingPointError(_NONFINITE)
    peak, scale = float(top[0]), 1.0
    if peak >= 2.0**1023:  # the interval's upper end would overflow: halve, exactly
        m, peak, scale = m * 0.5, peak * 0.5, 2.0
    lo, hi = 0.0, math.nextafter(peak, math.inf)
    above = 0  # count of magnitudes >= hi (all ranks)
    tolerance = max(1, k // 100)
    threshold = 0.0
    rounds = zooms = 0
    while rounds < max_rounds + EXTRA_ROUNDS:
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=m.device)
        inside = m[(m >= lo) & (m < hi)]
        hist = torch.bincount(torch.bucketize(inside, edges[1:-1], right=True), minlength=bins).to(
            torch.int64
        )
        wire.allreduce(hist)
        at_least = (above + torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])).tolist()
        reached = [j for j in range(bins) if at_least[j] >= k]
        if not reached:  # fewer than k non-zero candidates in total: keep all
            return 0.0
        j = reached[-1]
        new_lo, new_hi = edges[j : j + 2].tolist()
        threshold = new_lo
        if at_least[j] - k <= tolerance or not new_lo < new_hi or (new_lo, new_hi) == (lo, hi):
            break  # close enough, or the bin cannot shrink (ties, or an interval of a few ulps)
        if j == 0 and lo == 0.0 and zooms < ZOOM_ROUNDS:
            zooms += 1  # only the scale: not a refinement
        else:
            rounds += 1
            if rounds >= max_rounds and at_least[j] <= 2 * k:
                # Within what a reused threshold may keep: no extra rounds. Where the bin holds
                # one value (ties at the k-th), that value, as below.
                least, most = _span(wire, m, new_lo, new_hi)
                threshold = least if least == most else threshold
                break
        above = at_least[j + 1] if j + 1 < bins else above
        lo, hi = new_lo, new_hi
        if rounds >= max_rounds:
            # An extra round: narrow the bin to the span of the magnitudes in it (all ranks'),
            # so the next histogram spreads them over its bins; one value (ties) cannot be
            # split by any threshold: stop (the bin holds at least one, the k-th).
            least, most = _span(wire, m, lo, hi)
            if most == least:
                # The tied value itself, which keeps the same entries as the bin's lower edge:
                # a reused threshold at a tie is then told apart from one below it (__call__).
                threshold = least
                break
            lo, hi = least, math.nextafter(most, math.inf)
    return threshold * scale


def _span(wire: Wire, m: Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The least and the largest of all ranks' magnitudes ``m`` in ``[lo, hi)`` (one allreduce
    of two floats)."""
    inside = m[(m >= lo) & (m < hi)]
    span = torch.full((2,), -math.inf, dtype=torch.float64, device=m.device)
    if inside.numel():
        span[0], span[1] = inside.max(), -inside.min()
    wire.allreduce(span, dist.ReduceOp.MAX)
    return -float(span[1]), float(span[0])


# The kept entries are re-dealt in equal shares before the allgather only when some rank holds
# more than this many times an equal share.
BALANCE_SLACK = 1.1

# The kept counts are also taken at the threshold times and over this factor, so that every
# call measures the local slope of count against threshold at no extra message (see
# next_threshold).
BRACKET = 2.0**0.25


def next_threshold(
    threshold: float, at: int, above: int, below: int, k: int, tied: bool = False
) -> float:
    """Return the threshold for the next call, corrected toward k kept entries.

    ``at``, ``above`` and ``below`` are the kept counts (over all ranks) at ``threshold``,
    ``threshold * BRACKET`` and ``threshold / BRACKET``. ``tied`` says that magnitudes equal
    to the threshold straddle the k-th (:func:`_tied`): no threshold keeps at least k and
    fewer than ``at``, so it stays. Otherwise the count is taken to follow a power
    of the threshold between ``threshold`` and the bracket's end on k's side, whose exponent
    (the log-log slope, clamped to [0.5, 50]) gives a secant step
    ``threshold * (at / k) ** (1 / slope)``, clamped to a factor in [1/2, 2]. An empty count
    counts as half an entry. Every rank sees the same counts, so every rank gets the same
    threshold. A threshold of 0 (keep everything) stays 0.
    """
    if threshold <= 0 or at == k or tied:
        return threshold
    other = above if at > k else below
    here, there = max(at, 0.5), max(other, 0.5)
    if here == there:  # flat over the bracket: move by the bracket
        factor = BRACKET if at > k else 1.0 / BRACKET
    else:
        slope = min(max(abs(math.log(there / here)) / math.log(BRACKET), 0.5), 50.0)
        factor = (here / k) ** (1.0 / slope)
    return threshold * min(2.0, max(0.5, factor))


def _kept(mags: Tensor, threshold: float) -> tuple[Tensor, Tensor, list[int]]:
    """This rank's mask ``mags >= threshold``, the positions it keeps (ascending), and its
    counts of ``mags`` at or above ``threshold`` (-1 where any of ``mags`` is NaN or Inf),
    strictly above it, and at or above ``threshold * BRACKET`` and ``threshold / BRACKET``
    (read from the device together, in one wait). The positions serve the selection and the
    count strictly above, which tells magnitudes tied at the threshold (:func:`_tied`): one
    pass over the mask for all three, where boolean indexing took one each."""
    keep = mags >= threshold
    pos = keep.nonzero().squeeze(1)
    flags = [torch.isfinite(mags).all().logical_not(), (mags[pos] > threshold).sum()]
    flags += [(mags >= t).sum() for t in (threshold * BRACKET, threshold / BRACKET)]
    nonfinite, *counts = (int(v) for v in torch.stack(flags).tolist())
    return keep, pos, [-1 if nonfinite else pos.numel(), *counts]


def _tied(rows: list[list[int]], k: int) -> bool:
    """Whether magnitudes equal to the threshold straddle the k-th of all ranks' (clipped
    gradients), from every rank's :func:`_kept` counts: more than k are kept and fewer than k
    lie strictly above it, so no threshold keeps fewer while keeping k."""
    return sum(row[1] for row in rows) < k < sum(row[0] for row in rows)


RESIDUALS = ("local", "owner")  # who keeps what the selection drops (OkTopk's docstring)


@dataclass
class _KeyState:
    step: int = 0
    numel: int = 0
    world: int = 0
    bounds: list[int] | None = None
    threshold: float | None = None


def _fingerprint(bounds: list[int] | None) -> int:
    """A 32-bit checksum of region edges (0 for none), compared across ranks."""
    if bounds is None:
        return 0
    return zlib.crc32(b",".join(str(b).encode() for b in bounds)) + 1


def _float_bits(x: float | None) -> int:
    """The bits of a float as an int64 (0 for None), compared across ranks."""
    return 0 if x is None else struct.unpack("<q", struct.pack("<d", x))[0]


@register_collective("oktopk")
@dataclass
class OkTopk(SparseCollective):
    """Reduce sparse vectors and select a global top-k with O(k) volume (Ok-Topk).

    Li and Hoefler, "Near-Optimal Sparse Allreduce for Distributed Deep Learning", PPoPP'22.

    Steps, for p ranks each bringing about k entries (k = the largest per-rank count, or the
    ``k`` option). Each rank's entries are its local selection (the threshold or top-k
    compressor's, in the sync layer) and are all sent: the ``k`` option sets the size of the
    global selection only, so a rank that passes more than k entries sends them all in step 2
    (gTop-k cuts each rank's input to its top k first).

    1. Every ``repartition_every`` calls, split the index space into p regions whose edges put
       about the same number of the ranks' entries in each (:func:`repartition`); reuse them in
       between, since the positions of large gradient entries drift slowly.
    2. Split and reduce: each rank sends the entries of region q to rank q, all in one batch of
       point-to-point messages in rotating order (at step s rank r sends to r + s), so no rank
       receives from everybody at once; each region owner sums what it received.
    3. Every ``threshold_every`` calls, estimate the global threshold: the magnitude above which
       about k entries of the reduced vector lie (:func:`estimate_threshold`); reuse it in
       between, unless the reused one would keep more than 2k or fewer than k/2 entries (all
       ranks see the same count), which triggers an estimation at once. The counts kept at
       the threshold, strictly above it and at the two ends of a small bracket around it (one
       allgather of a few ints, which also says whether any sum is not finite) correct the
       threshold for the next call (:func:`next_threshold`), so that a reused threshold
       follows gradients whose scale drifts between estimates; except where magnitudes tied
       at the threshold straddle the k-th (clipped gradients: more than k kept, fewer than k
       above it), which no threshold can split: such a threshold is kept as it is, and reused
       however many of them it keeps. Where k is at least the vector's length (density 1),
       the threshold is 0 and every entry is kept.
    4. Each owner keeps the entries of its region whose magnitude reaches the threshold.
    5. Balance: the kept entries, in index order, are moved so every rank holds an equal share
       (only what exceeds a rank's share moves). Skipped when no rank holds more than
       ``BALANCE_SLACK`` (1.1) times an equal share, as with regions re-balanced by step 1:
       the moves would cost a round of messages to shorten step 6 by at most a tenth.
    6. Allgather of the shares; every rank returns the same selection, sorted by index.

    Per rank, step 2 sends at most its own entries (at most k with the default k), step 5 at
    most the kept count and step 6
    (p-1)/p of it (at most 1.1 times that when step 5 is skipped), so about 6k elements
    (indices and values) in steady state, against 2k(p-1) for an allgather of the inputs.
    ``stats()`` reports what the last call sent and whether it balanced.

    What the selection leaves out is for error feedback to keep (the sync layer does this), in
    one of two ways (``residuals``):

    * ``"local"`` (default, the paper's): each rank keeps its own values outside the selection.
      Where the ranks' gradients keep opposite signs (data that differs between ranks), their
      sum stays below the threshold while each rank's share of it grows in its residual
      without bound, and the ranks send those entries every step to cancel again.
    * ``"owner"``: each region owner keeps the reduced sums of its region that fell below the
      threshold (returned as ``dropped``), as gTop-k's merging ranks do; every rank's sent
      values leave its residual. Over all ranks the same total is kept, and a sum that cancels
      is kept once, as the small number it is.

    Args:
        repartition_every: calls between re-balancing of the region edges (>= 1).
        threshold_every: calls between estimations of the global threshold (>= 1).
        k: entries to select; None (default) uses the largest per-rank input count.
        residuals: ``"local"`` or ``"owner"``: who keeps what the selection drops (above).

    Example:
        >>> coll = get_collective("oktopk", repartition_every=64, threshold_every=32)  # doctest: +SKIP
        >>> res = coll(idx, val, numel=1_000_000, key="layer1")  # doctest: +SKIP
        >>> res.indices, res.values  # the same on every rank  # doctest: +SKIP
    """

    repartition_every: int = 64
    threshold_every: int = 32
    k: int | None = None
    residuals: str = "local"
    exact: ClassVar[bool] = False
    _keys: dict[str, _KeyState] = field(default_factory=dict, init=False, repr=False)
    _stats: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_keys", "_stats")  # state by bucket key

    def __post_init__(self) -> None:
        self.repartition_every = _positive_int("repartition_every", self.repartition_every)
        self.threshold_every = _positive_int("threshold_every", self.threshold_every)
        if self.k is not None:
            self.k = _positive_int("k", self.k)
        if not isinstance(self.residuals, str) or self.residuals not in RESIDUALS:
            raise ValueError(
                f"residuals must be one of {', '.join(map(repr, RESIDUALS))}, "
                f"got {self.residuals!r}"
            )

    def __call__(
        self,
        indices: Tensor,
        values: Tensor,
        numel: int,
        *,
        group: dist.ProcessGroup | None = None,
        key: str = "",
    ) -> CollectiveResult:
        """Return the global selection of the summed vector, the same on every rank.

        Args:
            indices: 1-D int32/int64 positions in ``[0, numel)``, unique on this rank.
            values: 1-D floating-point values, as many as ``indices``.
            numel: length of the vector, the same on every rank.
            group: process group (default: the default group).
            key: names the vector (for example the parameters of a DDP bucket); region edges
                and the threshold are kept per key.

        Returns:
            ``CollectiveResult`` with ``indices`` (sorted) and ``values``, the exact sums over
            ranks at those indices, and the bytes counted; with ``residuals="owner"`` also
            ``dropped``, the sums of this rank's region that the threshold left out.
        """
        numel, values = plain(numel), detached(values)
        wire = Wire(group, device_of(values, group), self.name, key)
        st = self._keys.get(key) or _KeyState()
        same = {
            "k": self.k or 0,
            "repartition_every": self.repartition_every,
            "threshold_every": self.threshold_every,
            "residuals": RESIDUALS.index(self.residuals),
            "the per-key step": st.step,
            "whether region edges are saved": int(st.bounds is not None),
            "whether a threshold is saved": int(st.threshold is not None),
            "the length of the vector the saved state is for": st.numel,
            # The saved values, not only whether there are any: ranks that reuse different
            # edges (a key used by several groups, or different states loaded) would send to
            # owners that do not own those entries, and a different group size makes some
            # ranks start afresh (with an allreduce) while the others exchange.
            "the number of ranks the saved state is for": st.world,
            "the saved region edges": _fingerprint(st.bounds),
            "the saved threshold": _float_bits(st.threshold),
        }
        p, rank = wire.world, wire.rank
        fresh = st.numel != numel or st.world != p  # a new vector or group: start afresh
        reuse = not fresh and st.bounds is not None and st.step % self.repartition_every != 0

        def split(idx: Tensor, val: Tensor) -> tuple[list, dict[int, Tensor]]:
            """The entries by region, and this rank's messages to the region owners."""
            parts = split_by_bounds(idx, val, st.bounds)
            return parts, {q: pack(*parts[q]) for q in range(p) if q != rank}

        parts = sends = None
        if reuse and input_error(indices, values, numel, wire.device) is None:
            # Region edges are reused, so what goes to each peer is known before the
            # agreement, whose messages then carry the sizes too: one round fewer. (Ranks that
            # disagree about reusing them fail the agreement on the step or edge options.)
            idx, val = coalesce(indices, values)
            parts, sends = split(idx, val)
        k, heard = wire.agree(
            indices,
            values,
            numel,
            self.k,
            options=same,
            # (empty where the split is not known yet)
            tell={q: buf.numel() for q, buf in sends.items()} if sends is not None else {},
        )
        if numel > (2**63 - 1) // p:  # (numel is the same on every rank, after the agreement)
            raise ValueError(
                f"oktopk: numel={numel} on {p} ranks; the region edges are the mean of the "
                f"ranks' index quantiles, summed in int64, so numel must be at most "
                f"(2**63 - 1) // p = {(2**63 - 1) // p}"
            )
        self._keys[key] = st
        if fresh:
            st.numel, st.world, st.bounds, st.threshold = numel, p, None, None
        if parts is None:
            idx, val = coalesce(indices, values)
            if st.bounds is None or st.step % self.repartition_every == 0:
                st.bounds = repartition(wire, idx, numel)
            parts, sends = split(idx, val)
            heard = wire.exchange_sizes({q: buf.numel() for q, buf in sends.items()}, list(sends))
        ib, vb = idx.element_size(), val.element_size()
        got = wire.exchange(sends, heard, {q: 2 * parts[q][0].numel() for q in sends})
        red_i, red_v = merge(
            [parts[rank]] + [unpack(got[q], idx.dtype, val.dtype) for q in sorted(got)]
        )

        mags = red_v.abs().to(torch.float64)
        estimated = st.threshold is None or st.step % self.threshold_every == 0
        if k >= numel:
            # Room for every index (density 1): keep all. An estimate would return the lower
            # edge of the smallest magnitude's bin, and reused it would drop any smaller entry
            # of a later call.
            st.threshold, estimated = 0.0, False
        elif estimated:
            st.threshold = estimate_threshold(wire, mags, k)
        # The count allgather also says whether any rank's sums hold Inf or NaN, so a reused
        # threshold cannot pass them on (or drop them) where an estimate would have refused.
        keep, pos, mine = _kept(mags, st.threshold)
        rows = wire.allgather_ints(mine)
        if any(row[0] < 0 for row in rows):
            raise FloatingPointError(_NONFINITE)
        counts = [row[0] for row in rows]
        total = sum(counts)
        tied = _tied(rows, k)  # (k >= numel keeps at most k)
        if not estimated and k < numel and not k <= 2 * total <= 4 * k and not tied:
            # The reused threshold has drifted too far (every rank sees the same total):
            # re-estimate now rather than send far more, or keep far fewer, than k. Not where
            # ties at it keep more than 2k: an estimate would keep them all again.
            st.threshold = estimate_threshold(wire, mags, k)
            keep, pos, mine = _kept(mags, st.threshold)
            rows = wire.allgather_ints(mine)
            counts = [row[0] for row in rows]
            total = sum(counts)
            tied = _tied(rows, k)
            estimated = True
        used = st.threshold
        sel_i, sel_v = red_i[pos], red_v[pos]
        # The next call starts from a threshold corrected toward k by this call's counts, so
        # a reused threshold follows gradients whose scale drifts instead of leaving the band;
        # a tied one stays (above it, fewer than k are left: the next call would re-estimate).
        st.threshold = next_threshold(
            used, total, sum(row[2] for row in rows), sum(row[3] for row in rows), k, tied
        )

        # Balance: the kept entries, in global index order (region order = rank order), are
        # re-dealt so rank q holds positions [share[q], share[q+1]) of their concatenation;
        # unless no rank holds more than BALANCE_SLACK times an equal share (every rank sees
        # the same counts): then each keeps its own, and no message is sent.
        offsets = [sum(counts[:q]) for q in range(p + 1)]
        share = [q * total // p for q in range(p + 1)]
        rebalanced = max(counts) * p > BALANCE_SLACK * total
        if not rebalanced:
            share = offsets

        def overlap(src: int, dst: int) -> tuple[int, int]:
            a, b = max(offsets[src], share[dst]), min(offsets[src + 1], share[dst + 1])
            return (a - offsets[src], b - offsets[src]) if a < b else (0, 0)

        moves, recv_sizes, elems = {}, {}, {}
        for q in range(p):
            if q == rank:
                continue
            a, b = overlap(rank, q)
            if b > a:
                moves[q] = pack(sel_i[a:b], sel_v[a:b])
                elems[q] = 2 * (b - a)
            a, b = overlap(q, rank)
            recv_sizes[q] = (b - a) * (ib + vb)
        got = wire.exchange(moves, recv_sizes, elems)
        a, b = overlap(rank, rank)
        pieces = {rank: (sel_i[a:b], sel_v[a:b])}
        pieces.update({q: unpack(buf, idx.dtype, val.dtype) for q, buf in got.items()})
        share_i = torch.cat([pieces[q][0] for q in range(p)])
        share_v = torch.cat([pieces[q][1] for q in range(p)])

        sizes = [(share[q + 1] - share[q]) * (ib + vb) for q in range(p)]
        blocks = wire.allgatherv(pack(share_i, share_v), sizes, 2 * share_i.numel())
        out = [unpack(buf, idx.dtype, val.dtype) for buf in blocks]
        res_i = torch.cat([o[0] for o in out])
        res_v = torch.cat([o[1] for o in out])

        t = wire.traffic
        self._stats[key] = {
            "step": st.step,
            "k": k,
            "selected": total,
            "threshold": used,
            "next_threshold": st.threshold,
            "estimated": estimated,
            "tied": tied,
            "rebalanced": rebalanced,
            "elems_sent": t.elems_sent,
            "bytes_sent": t.bytes_sent,
            "bytes_recv": t.bytes_recv,
            "region_sizes": [b - a for a, b in zip(st.bounds, st.bounds[1:])],
        }
        st.step += 1
        drop = ~keep if self.residuals == "owner" else None  # this region's sums below it
        return CollectiveResult(
            indices=res_i,
            values=res_v,
            bytes_sent=t.bytes_sent,
            bytes_recv=t.bytes_recv,
            dropped=None if drop is None else (red_i[drop], red_v[drop]),
        )

    # ---- state ----------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Return, per key, what the last call did: step, k, selected count, threshold used and
        whether it was estimated in this call, whether magnitudes tied at it straddle the
        k-th (``tied``: more than k kept, fewer than k above it), the threshold the next call
        starts from, whether the kept entries were re-dealt in equal shares, elements and bytes
        this rank sent and received, region lengths."""
        return copy.deepcopy(self._stats)

    def state_dict(self) -> dict[str, Any]:
        """Return the per-key state (step counter, region edges, global threshold)."""
        return {
            "keys": {
                key: {
                    "step": st.step,
                    "numel": st.numel,
                    "world": st.world,
                    "bounds": None if st.bounds is None else list(st.bounds),
                    "threshold": st.threshold,
                }
                for key, st in self._keys.items()
            }
        }

    def rescale(self, factor: float) -> None:
        """Multiply the kept global thresholds by ``factor`` (the values' scale changed)."""
        for st in self._keys.values():
            if st.threshold is not None:
                st.threshold *= factor

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a malformed state is refused, naming what
        is wrong, and nothing is loaded."""
        if not isinstance(state, Mapping):
            raise TypeError(
                "OkTopk: load_state_dict takes the dict {'keys': {...}} that state_dict() "
                f"returned, got {type(state).__name__}"
            )
        if set(state) != {"keys"} or not isinstance(state["keys"], Mapping):
            raise ValueError(
                "OkTopk state must be a dict with the single entry 'keys' (a dict of per-key "
                f"states), got entries {sorted(map(repr, state))}"
            )
        keys = {}
        fields = {"step", "numel", "world", "bounds", "threshold"}
        for key, s in state["keys"].items():
            if not isinstance(s, Mapping) or set(s) != fields:
                raise ValueError(
                    f"OkTopk state for key {key!r} must have the entries {sorted(fields)}"
                )
            bounds, threshold = s["bounds"], s["threshold"]
            if bounds is not None and not (
                isinstance(bounds, (list, tuple)) and all(is_integer(b) for b in bounds)
            ):
                raise ValueError(
                    f"OkTopk state for key {key!r}: bounds must be None or a list of ints, got "
                    f"{bounds!r:.200}"
                )
            if threshold is not None and (
                isinstance(threshold, bool)
                or not isinstance(threshold, (int, float))
                or not math.isfinite(threshold)
                or threshold < 0
            ):
                raise ValueError(
                    f"OkTopk state for key {key!r}: threshold must be None or a finite number "
                    f">= 0 (a magnitude), got {threshold!r}"
                )
            for name in ("step", "numel", "world"):
                if not is_integer(s[name], 0):
                    raise ValueError(
                        f"OkTopk state for key {key!r}: {name} must be an integer >= 0, got "
                        f"{s[name]!r}"
                    )
            keys[key] = _KeyState(
                step=int(s["step"]),
                numel=int(s["numel"]),
                world=int(s["world"]),
                bounds=None if bounds is None else [int(b) for b in bounds],
                threshold=None if threshold is None else float(threshold),
            )
            b = keys[key].bounds
            if b is not None and (
                len(b) != keys[key].world + 1
                or b[0] != 0
                or b[-1] != keys[key].numel
                or any(x > y for x, y in zip(b, b[1:]))
            ):
                raise ValueError(
                    f"OkTopk state for key {key!r}: bounds must be world + 1 = "
                    f"{keys[key].world + 1} non-decreasing edges from 0 to numel = "
                    f"{keys[key].numel}, got {b}"
                )
        self._keys = keys
