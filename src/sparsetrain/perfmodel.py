"""Alpha-beta-gamma cost model of dense allreduce and every sparse collective.

The time of a collective on p ranks is modelled as ::

    T = alpha * messages + beta * bytes + overhead * operations
        + gamma * sparse_elements + gamma_dense * dense_elements + gamma_sort * sort_work

counted along the critical path of one rank:

* ``messages``: sequential message steps (latency terms). Each point-to-point message counts
  once, also when a batch of them to p - 1 peers is posted at once (as the Ok-Topk paper
  counts its split, (p - 1) alpha); a ring collective counts its steps.
* ``bytes``: the bytes that cross this rank's link in its busier direction (every rank has its
  own full-duplex link to a non-blocking switch, as in the emulated cluster).
* ``operations``: what the rank issues: one per library collective call (gloo or NCCL
  allreduce, allgather) and one per point-to-point message posted. ``overhead`` is the
  software cost of each (LogP's o): Python, the backend's bookkeeping, a system call.
* ``sparse_elements``: (index, value) entries touched once locally (scatter, compare, copy).
* ``dense_elements``: elements of dense vectors streamed through memory (zero-fill, sums).
* ``sort_work``: sum of m log2 m over the sorts and sort-based merges of m entries.
* ``hidden_dense``: dense elements summed while the cost's bytes are on the wire (a pipelined
  ring sums one chunk while the next travels), so only the slower of the two counts:
  ``max(beta * bytes, gamma_dense * hidden_dense)``, which is ``beta * bytes`` on every
  measured point and in every projection README quotes.

The three local terms are multiplied by ``Problem.share(active)``: when the ranks share
``cores`` processors (the emulated cluster runs every rank on this machine's cores), local
work that ``active`` ranks do at once takes ``max(1, active / cores)`` times as long. With
``cores=None`` (a real cluster: a processor a rank) the factor is 1.

Sparse inputs are modelled as k = density * n distinct indices a rank, uniform and independent
across ranks (the worst case for fill-in), so the expected support of the sum of m ranks is
``U(m) = n * (1 - (1 - density) ** m)``. Entries cost ``index_bytes + value_bytes`` on the wire.

Every formula follows the algorithm as implemented in :mod:`sparsetrain.comm`, phase by phase
(see each function). Small collectives (the input agreement, allgathers of counts) are counted
as rings, as gloo runs them: 2(p-1) steps for an allreduce, p-1 for an allgather. ``fit`` finds
the coefficients from measured times by non-negative least squares on relative errors;
``best_collective`` picks the fastest algorithm for the sync layer's ``collective="auto"``.

Papers: Hockney's alpha-beta model; Culler et al., "LogP" (PPoPP'93) for the per-message
overhead; Thakur, Rabenseifner and Gropp, "Optimization of collective communication operations
in MPICH" (IJHPCA 2005) for ring allreduce; SparCML (Renggli et al., SC'19); Ok-Topk (Li and
Hoefler, PPoPP'22); gTop-k (Shi et al., ICDCS'19).

Example:
    >>> params = NetworkParams.from_link(bandwidth_bps=10e9, latency_s=5e-6)
    >>> best_collective(numel=110_000_000, nnz=1_100_000, world=256, params=params,
    ...                 candidates=("dense", "allgather", "dsar", "oktopk", "gtopk"))
    'oktopk'
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

# ---- parameters and costs ---------------------------------------------------------------------

COEFFICIENTS = ("alpha", "beta", "gamma", "gamma_dense", "gamma_sort", "overhead")


@dataclass(frozen=True)
class NetworkParams:
    """Coefficients of the cost model, all in seconds.

    Attributes:
        alpha: per message step (start-up latency).
        beta: per byte on a link (1 / bandwidth in bytes per second).
        gamma: per sparse entry touched once locally (scatter, compare, copy).
        gamma_dense: per dense element streamed through memory (zero-fill, elementwise sum).
        gamma_sort: per entry and per halving in a sort of m entries (m log2 m work).
        overhead: per operation issued (a collective call or a point-to-point message posted).
    """

    alpha: float
    beta: float
    gamma: float = 0.0
    gamma_dense: float = 0.0
    gamma_sort: float = 0.0
    overhead: float = 0.0

    def __post_init__(self) -> None:
        for name in COEFFICIENTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"NetworkParams.{name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def from_link(
        cls,
        bandwidth_bps: float,
        latency_s: float,
        gamma: float = 2e-9,
        gamma_dense: float = 5e-11,
        gamma_sort: float = 1e-10,
        overhead: float = 0.0,
    ) -> NetworkParams:
        """Build parameters from a link's rate in bits per second and its one-way latency.

        The default local costs are those of a GPU-class device (about 2 ns an entry touched,
        0.05 ns an element streamed, and 0.1 ns an entry per halving in a sort, so about 2 ns
        an entry for a sort of a million), not of the 2-core CPU the emulated cluster runs on;
        pass fitted values to model that. The software overhead of an operation is taken to
        be part of the latency (0).
        """
        if not bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be positive, got {bandwidth_bps!r}")
        return cls(alpha=latency_s, beta=8.0 / bandwidth_bps, gamma=gamma,
                   gamma_dense=gamma_dense, gamma_sort=gamma_sort, overhead=overhead)  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COEFFICIENTS}


@dataclass(frozen=True)
class Cost:
    """The model's decomposition of a collective's time (see the module docstring)."""

    messages: float
    bytes: float
    sparse_elements: float = 0.0
    dense_elements: float = 0.0
    sort_work: float = 0.0
    operations: float = 0.0
    hidden_dense: float = 0.0

    def terms(self) -> tuple[float, ...]:
        """Return the counts in the order of :data:`COEFFICIENTS`, with the transfer as bytes
        (the overlapped reduction hidden behind it)."""
        return (self.messages, self.bytes, self.sparse_elements, self.dense_elements,
                self.sort_work, self.operations)  # fmt: skip

    def bound_terms(self, params: NetworkParams) -> tuple[float, ...]:
        """Return the counts whose dot product with ``params`` is :meth:`seconds`: as
        :meth:`terms`, but where the overlapped reduction is slower than the transfer it hides
        behind, it replaces the bytes."""
        if params.gamma_dense * self.hidden_dense <= params.beta * self.bytes:
            return self.terms()
        return (self.messages, 0.0, self.sparse_elements,
                self.dense_elements + self.hidden_dense, self.sort_work, self.operations)  # fmt: skip

    def seconds(self, params: NetworkParams) -> float:
        """Return the modelled time in seconds."""
        terms = self.bound_terms(params)
        return sum(c * getattr(params, name) for c, name in zip(terms, COEFFICIENTS))

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Problem:
    """One collective call: p ranks, a vector of n elements, k entries a rank.

    ``cores``: processors the ranks share (the emulated cluster: this machine's cores); None
    when every rank has its own, as on a real cluster.

    ``sorted_input``: each rank's indices arrive sorted by index, as the threshold compressor
    and the cluster benchmark produce them; the collectives then take them as they are after a
    linear check. False for unsorted input (``torch.topk``'s order), which costs a sort.
    """

    world: int
    numel: int
    density: float
    value_bytes: int = 4
    index_bytes: int = 4
    cores: int | None = None
    sorted_input: bool = True

    def __post_init__(self) -> None:
        _check_int("world", self.world, 1)
        _check_int("numel", self.numel, 1)
        _check_int("value_bytes", self.value_bytes, 1)
        _check_int("index_bytes", self.index_bytes, 1)
        if self.cores is not None:
            _check_int("cores", self.cores, 1)
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"density must be a number in (0, 1], got {self.density!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    @property
    def k(self) -> float:
        return self.density * self.numel

    @property
    def entry_bytes(self) -> int:
        return self.index_bytes + self.value_bytes

    def union(self, m: float) -> float:
        """Expected support of the sum of ``m`` ranks' sparse vectors."""
        return self.numel * (1.0 - (1.0 - self.density) ** m)

    def share(self, active: float) -> float:
        """Slow-down of local work done by ``active`` ranks at once on the shared cores."""
        return 1.0 if self.cores is None else max(1.0, active / self.cores)


def _check_int(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def _log2ceil(p: int) -> int:
    return max(0, math.ceil(math.log2(p))) if p > 1 else 0


def _sort(m: float) -> float:
    """Work of sorting m entries: m log2 m (at least m)."""
    return m * math.log2(m) if m > 2 else m


def _local(
    q: Problem, active: float, *, sparse: float = 0.0, dense: float = 0.0, sorts: Iterable = ()
) -> Cost:
    """Local work done by ``active`` ranks at once: entries touched, elements streamed, sorts."""
    f = q.share(active)
    return Cost(0, 0, f * sparse, f * dense, f * sum(_sort(m) for m in sorts))


def _order(q: Problem, passes: int = 1) -> Cost:
    """Bring each rank's k input entries into index order (coalescing, splitting into ranges):
    a linear check for sorted input, a sort otherwise; ``passes`` passes, of which only the
    first sorts."""
    if q.sorted_input:
        return _local(q, q.world, sparse=passes * q.k)
    # Only the first pass sorts: what it returns is sorted, so the others check it linearly.
    return _local(q, q.world, sorts=[q.k], sparse=(passes - 1) * q.k)


def _call(messages: float, nbytes: float = 0.0) -> Cost:
    """One call of a library collective that takes ``messages`` steps."""
    return Cost(messages, nbytes, operations=1)


def _p2p(messages: float, nbytes: float = 0.0) -> Cost:
    """``messages`` point-to-point messages, each posted by the rank (one operation each)."""
    return Cost(messages, nbytes, operations=messages)


def _agreement(p: int) -> Cost:
    """The input agreement every sparse collective except the allgather baseline starts with,
    and any other exchange of a few ints (counts, sizes): each rank sends its ints straight to
    every peer, p - 1 messages at once."""
    return _p2p(p - 1) if p > 1 else Cost(0, 0)


def _small_allgather(p: int) -> Cost:
    """A library allgather of a few ints (the allgather baseline's size header): a ring of
    p - 1 steps."""
    return _call(p - 1) if p > 1 else Cost(0, 0)


# ---- formulas, registered by collective name --------------------------------------------------

_MODELS: dict[str, Callable[[Problem], Cost]] = {}
EXACT = ("dense", "allgather", "ssar_rd", "ssar_split", "dsar")
SELECTING = ("oktopk", "gtopk")


def register_model(name: str):
    """Decorator: register the cost formula ``f(problem) -> Cost`` of collective ``name``."""

    def wrap(fn: Callable[[Problem], Cost]) -> Callable[[Problem], Cost]:
        _MODELS[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    """Return the names of the modelled collectives, sorted."""
    return sorted(_MODELS)


@register_model("dense")
def dense_ring_allreduce(q: Problem) -> Cost:
    """Ring allreduce: reduce-scatter then allgather, 2(p-1) steps of n/p elements each.

    T = 2(p-1) alpha + o + max(2(p-1)/p n b_v beta, (p-1)/p n gamma_dense).

    The ring is pipelined (gloo and NCCL alike): each step's chunk is summed while the next one
    is on the wire, so the (p-1)/p n element sums overlap the transfer and only the slower of
    the two counts (:attr:`Cost.hidden_dense`). Added instead, they made the model overshoot
    every measured dense allreduce, by up to 30% at 1M elements.
    """
    p, n = q.world, q.numel
    if p == 1:
        return Cost(0, 0)
    ring = _call(2 * (p - 1), 2 * (p - 1) / p * n * q.value_bytes)
    return ring + Cost(0, 0, hidden_dense=q.share(p) * (p - 1) / p * n)


@register_model("allgather")
def sparse_allgather(q: Problem) -> Cost:
    """Allgather of every rank's k entries (sizes first, then payloads padded to the largest),
    then a local scatter-add of all p k entries into a zeroed dense vector.

    T = 2(p-1) alpha + (p-1) k (b_i + b_v) beta + 2 o + p k gamma + n gamma_dense.
    """
    p = q.world
    return (
        _small_allgather(p)
        + _call(p - 1, (p - 1) * q.k * q.entry_bytes)
        + _local(q, p, sparse=p * q.k, dense=q.numel)
    )


@register_model("ssar_rd")
def ssar_recursive_doubling(q: Problem) -> Cost:
    """SparCML recursive doubling with fold/unfold for non-powers of two.

    Agreement and a local coalesce (a linear check of k sorted entries, or a sort of k); a
    fold (k entries) when p is not a power of two; log2 p' exchanges, each a size message and
    a payload message, where the sender's support after merging m ranks is U(m) and the merge
    sorts both operands (2 U(m)); an unfold of the result U(p); then a scatter of U(p) entries
    into a zeroed dense vector.
    """
    p = q.world
    core = 1 << (p.bit_length() - 1)
    extra = p - core
    cost = _agreement(p) + _order(q)
    m = 1.0
    if extra:
        cost += _p2p(2, q.k * q.entry_bytes) + _local(q, extra, sorts=[2 * q.k])
        m = p / core  # average ranks folded into a core rank
    rounds = core.bit_length() - 1
    for _ in range(rounds):
        u = q.union(m)
        cost += _p2p(2, u * q.entry_bytes) + _local(q, core, sorts=[2 * u])
        m *= 2
    if extra:
        cost += _p2p(2, q.union(p) * q.entry_bytes)
    return cost + _local(q, p, sparse=q.union(p), dense=q.numel)


def _split_phase(q: Problem, adaptive: bool) -> tuple[Cost, float, bool]:
    """Split (sparse or dense reduce-scatter) to range owners; returns the cost, the expected
    reduced entries of a range, and whether the reduced range is dense."""
    p = q.world
    delta = q.value_bytes / q.entry_bytes  # break-even density
    dense_in = adaptive and q.density >= delta
    per_peer = (q.numel / p * q.value_bytes) if dense_in else (q.k / p * q.entry_bytes)
    cost = (
        _agreement(p)  # which carries the sizes of the split
        + _order(q)  # into ranges
        + _local(q, p, dense=q.numel if dense_in else 0.0)
        + _p2p(p - 1, (p - 1) * per_peer)  # payloads in rotating order
    )
    reduced = q.union(p) / p
    dense_out = adaptive and (dense_in or q.union(p) / q.numel >= delta)
    # A range receives k entries in all (k/p from each rank); a dense accumulator takes over
    # from the merge once they could fill it past break-even (density >= delta / p).
    if dense_in:  # scatter-add into a zeroed range, then sum the p - 1 dense blocks
        cost += _local(q, p, sparse=q.k, dense=q.numel)  # n/p zeroed, (p - 1) n/p summed
    elif adaptive and q.k * q.entry_bytes >= q.numel / p * q.value_bytes:
        # scatter-add, a scan for the non-zeros, and the sparse form's copy if below delta
        cost += _local(q, p, sparse=q.k + (0.0 if dense_out else reduced), dense=2 * q.numel / p)
    else:  # sort-based merge of the k entries that fall in the range
        cost += _local(q, p, sorts=[q.k])
    return cost, reduced, dense_out


def _allgather_ranges(q: Problem, reduced: float, dense_out: bool) -> Cost:
    """Allgather of the p reduced ranges (sizes, then the ranges, each by direct sends) and
    their scatter into a zeroed dense vector."""
    p = q.world
    block = q.numel / p * q.value_bytes if dense_out else reduced * q.entry_bytes
    return (
        _agreement(p)
        + _p2p(p - 1, (p - 1) * block)
        + _local(q, p, sparse=0.0 if dense_out else p * reduced, dense=q.numel)
    )


@register_model("ssar_split")
def ssar_split_allgather(q: Problem) -> Cost:
    """SparCML split-allgather: sparse split to p range owners, merge, allgather of ranges.

    T = 4(p-1) alpha + (p-1)/p [k + U(p)] (b_i + b_v) beta + 4(p-1) o
        + k log2 k gamma_sort (the merge) + (k + U(p)) gamma + n gamma_dense, for sorted input
        (unsorted adds a sort of k): the agreement (carrying the split's sizes), the split's
        payloads, the reduced ranges' sizes and the ranges, each p - 1 direct messages.
    """
    cost, reduced, _ = _split_phase(q, adaptive=False)
    return cost + _allgather_ranges(q, reduced, dense_out=False)


@register_model("dsar")
def dsar(q: Problem) -> Cost:
    """SparCML DSAR: as split-allgather, but each message and reduced range goes dense once
    its density reaches b_v / (b_i + b_v)."""
    cost, reduced, dense_out = _split_phase(q, adaptive=True)
    return cost + _allgather_ranges(q, reduced, dense_out)


@register_model("oktopk")
def oktopk(q: Problem) -> Cost:
    """Ok-Topk: balanced split-reduce, global top-k by estimated threshold, allgatherv.

    Steady state (region edges and threshold reused): a coalesce and a split into regions (two
    linear passes over k sorted entries; unsorted ones are sorted once first); the agreement,
    whose messages carry the sizes of the split; the payloads, (p-1)/p k entries, to the
    region owners in rotating order; a sort-based merge of the region's k entries; the
    threshold compared with its U(p)/p reduced entries; the kept counts sent to every peer;
    then direct sends of the k/p entries a rank holds (regions balanced by the repartition
    keep within a tenth of equal shares, so the balance step sends nothing). Volume about
    2 (p-1)/p k entries, the paper's < 6k bound; latency 4(p-1) alpha against the paper's
    (2p + 2 log p) alpha, because the few-int exchanges are direct sends to every peer.
    """
    p = q.world
    selected = q.k / p
    return (
        _agreement(p)  # which carries the sizes of the split
        + _order(q, passes=2)  # coalesce, split
        + _p2p(p - 1, (p - 1) / p * q.k * q.entry_bytes)
        + _local(q, p, sorts=[q.k], sparse=q.union(p) / p)
        + _agreement(p)  # the kept counts
        + _p2p(p - 1, (p - 1) * selected * q.entry_bytes)
        + _local(q, p, sparse=q.k)
    )


@register_model("gtopk")
def gtopk(q: Problem) -> Cost:
    """gTop-k: tree reduction keeping the top k of each merged pair, then a broadcast.

    Agreement; each rank coalesces its k entries (a linear check if sorted, else a sort); log2 p
    rounds up, in which rank 0 receives k entries a round and merges and reselects 2k (half as
    many ranks merge each round); log2 p messages down from rank 0: T = (p-1) alpha
    + 2 log p alpha + 2 log p k (b_i + b_v) beta + (p - 1 + 2 log p) o
    + 2 log p sort(2k) gamma_sort + k gamma (sorted input).
    """
    p = q.world
    L = _log2ceil(p)
    cost = _agreement(p) + _order(q)
    active = p / 2
    for _ in range(L):
        cost += _p2p(1, q.k * q.entry_bytes) + _local(q, active, sorts=[2 * q.k, 2 * q.k])
        active /= 2
    return cost + _p2p(L, L * q.k * q.entry_bytes)


# ---- public helpers ----------------------------------------------------------------------------


def cost(
    algorithm: str,
    *,
    world: int,
    numel: int,
    density: float,
    value_bytes: int = 4,
    index_bytes: int = 4,
    cores: int | None = None,
    sorted_input: bool = True,
) -> Cost:
    """Return the cost decomposition of one call of ``algorithm``.

    ``cores``: processors the ranks share (see :class:`Problem`); None: one a rank.
    ``sorted_input``: whether the ranks' indices arrive sorted (see :class:`Problem`).

    Raises:
        ValueError: unknown algorithm (the message lists the modelled ones) or bad sizes.
    """
    if algorithm not in _MODELS:
        raise ValueError(
            f"no cost model for collective {algorithm!r}; modelled: {', '.join(available_models())}"
        )
    return _MODELS[algorithm](
        Problem(world, numel, density, value_bytes, index_bytes, cores, sorted_input)
    )


def predict(
    algorithm: str,
    *,
    world: int,
    numel: int,
    density: float,
    params: NetworkParams,
    value_bytes: int = 4,
    index_bytes: int = 4,
    cores: int | None = None,
    sorted_input: bool = True,
) -> float:
    """Return the modelled seconds of one call of ``algorithm``.

    Example:
        >>> p = NetworkParams(alpha=1e-5, beta=8e-9)
        >>> round(predict("dense", world=2, numel=1000, density=1.0, params=p), 6)
        5.2e-05
    """
    c = cost(algorithm, world=world, numel=numel, density=density, value_bytes=value_bytes,
             index_bytes=index_bytes, cores=cores, sorted_input=sorted_input)  # fmt: skip
    return c.seconds(params)


@dataclass(frozen=True)
class Measurement:
    """One measured time: ``algorithm`` on ``world`` ranks, ``numel`` elements, ``density``
    (``cores``: processors the ranks shared, ``sorted_input``: whether the inputs were sorted,
    as in :class:`Problem`)."""

    algorithm: str
    world: int
    numel: int
    density: float
    seconds: float
    value_bytes: int = 4
    index_bytes: int = 4
    cores: int | None = None
    sorted_input: bool = True


def fit(
    measurements: Iterable[Measurement], *, fixed: dict[str, float] | None = None
) -> NetworkParams:
    """Fit the coefficients of :class:`NetworkParams` to measured times.

    Steps: compute each measurement's cost decomposition; divide every row by its measured time
    so the fit minimises relative (not absolute) error, which keeps small calls from being
    ignored next to large ones; solve the non-negative least-squares problem exactly by trying
    every subset of the free coefficients (at most 63 small solves) and keeping the best
    feasible one. A pipelined reduction (:attr:`Cost.hidden_dense`) enters as its transfer;
    where the fitted coefficients make it the slower of the two, the fit is repeated with the
    reduction in its place, until no point changes side (or the sides cycle); the round that
    fits best under the model's max() is returned.

    Args:
        measurements: at least three, of modelled algorithms, with positive times.
        fixed: coefficients to hold at given values instead of fitting, for example
            ``{"beta": 8 / measured_bits_per_second}`` when the link rate is known: bytes and
            elements both grow with the vector, so a free fit can trade one for the other.

    Returns:
        The fitted :class:`NetworkParams`.

    Example:
        >>> true = NetworkParams(alpha=1e-4, beta=8e-9, gamma=1e-8)
        >>> ms = [Measurement(a, 8, n, d, predict(a, world=8, numel=n, density=d, params=true))
        ...       for a in ("dense", "allgather", "oktopk") for n in (10**6, 10**7)
        ...       for d in (0.001, 0.01)]
        >>> round(fit(ms).beta * 1e9, 3)
        8.0
    """
    fixed = dict(fixed or {})
    bad = sorted(set(fixed) - set(COEFFICIENTS))
    if bad:
        raise ValueError(f"fit: cannot fix {bad}; coefficients are {', '.join(COEFFICIENTS)}")
    ms = list(measurements)
    if len(ms) < 3:
        raise ValueError(f"fit needs at least 3 measurements, got {len(ms)}")
    costs, ts = [], []
    for m in ms:
        if not isinstance(m, Measurement):
            raise TypeError(f"fit takes Measurement objects, got {type(m).__name__}")
        if not m.seconds > 0:
            raise ValueError(f"measured seconds must be positive, got {m.seconds} for {m}")
        costs.append(cost(m.algorithm, world=m.world, numel=m.numel, density=m.density,
                          value_bytes=m.value_bytes, index_bytes=m.index_bytes, cores=m.cores,
                          sorted_input=m.sorted_input))  # fmt: skip
        ts.append(m.seconds)
    # A pipelined reduction counts only where it is slower than its transfer, which depends on
    # the coefficients: fit with the transfer everywhere, then refit with the slower of the two
    # under the fitted coefficients until no point changes side. The sides can cycle (points
    # that share one ratio switch together), so the round that fits best by the model's own
    # max() is kept.
    rows, seen, best, best_err = [c.terms() for c in costs], [], None, math.inf
    while rows not in seen and len(seen) < 8:
        seen.append(rows)
        params = _nnls_fit(rows, ts, fixed)
        err = _squared_relative_error(costs, ts, params)
        if best is None or err < best_err:
            best, best_err = params, err
        rows = [c.bound_terms(params) for c in costs]
    return best


def _squared_relative_error(
    costs: Sequence[Cost], ts: Sequence[float], params: NetworkParams
) -> float:
    """Sum of squared relative errors of the predictions; inf (not an OverflowError, which
    ``x ** 2`` raises) where degenerate data drives a coefficient, and so a prediction, huge."""
    total = 0.0
    for c, t in zip(costs, ts):
        r = (c.seconds(params) - t) / t
        total += r * r
    return total


def _nnls_fit(
    rows: Sequence[Sequence[float]], ts: Sequence[float], fixed: dict[str, float]
) -> NetworkParams:
    """Non-negative least squares on relative errors over every subset of the free
    coefficients (see :func:`fit`)."""
    import numpy as np

    names = COEFFICIENTS
    a = np.asarray(rows, dtype=float) / np.asarray(ts)[:, None]
    b = np.ones(len(ts))
    free = [j for j, name in enumerate(names) if name not in fixed]
    for j, name in enumerate(names):
        if name in fixed:
            b = b - a[:, j] * float(fixed[name])
    # Column scaling: the coefficients span 1e-11 (gamma_dense) to 1e-4 (alpha).
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)
    a = a / scale
    best, best_err = np.zeros(len(names)), float(np.sum(b**2))
    for r in range(1, len(free) + 1):
        for cols in itertools.combinations(free, r):
            sub = a[:, cols]
            if not np.any(sub):
                continue
            x, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if np.any(x < 0):
                continue
            err = float(np.sum((sub @ x - b) ** 2))
            if err < best_err:
                best_err, best = err, np.zeros(len(names))
                best[list(cols)] = x
    coef = best / scale
    for j, name in enumerate(names):
        if name in fixed:
            coef[j] = float(fixed[name])
    return NetworkParams(*(float(v) for v in coef))


def best_collective(
    *,
    numel: int,
    nnz: int,
    world: int,
    params: NetworkParams | None = None,
    value_bytes: int = 4,
    index_bytes: int = 4,
    candidates: Sequence[str] = EXACT,
    sorted_input: bool = True,
) -> str:
    """Return the fastest of ``candidates`` under the cost model (``collective="auto"``).

    Args:
        numel: length of the vector (a bucket's or the model's parameter count).
        nnz: entries each rank contributes (its k).
        world: number of ranks.
        params: network coefficients; default :data:`DEFAULT_PARAMS` (10 Gbit/s, 5 us).
        value_bytes, index_bytes: sizes of a value and of an index on the wire.
        candidates: names to choose from; by default the exact ones, including ``"dense"``
            (plain dense allreduce). Add ``"oktopk"``/``"gtopk"`` to allow selecting ones.
        sorted_input: whether each rank's indices arrive sorted (see :class:`Problem`).

    Returns:
        The name of the fastest candidate ("dense" means: allreduce the dense tensor).

    Example:
        >>> best_collective(numel=10**7, nnz=10**7 // 2, world=8)
        'dense'
        >>> best_collective(numel=10**7, nnz=10**4, world=8)
        'allgather'
    """
    _check_int("nnz", nnz, 1)
    _check_int("numel", numel, 1)
    if nnz > numel:
        raise ValueError(f"nnz ({nnz}) cannot exceed numel ({numel})")
    if isinstance(candidates, str) or not candidates:
        raise TypeError(f"candidates must be a non-empty sequence of names, got {candidates!r}")
    unknown = [c for c in candidates if c not in _MODELS]
    if unknown:
        raise ValueError(f"no cost model for {unknown}; modelled: {', '.join(available_models())}")
    params = DEFAULT_PARAMS if params is None else params
    times = {
        c: predict(
            c,
            world=world,
            numel=numel,
            density=nnz / numel,
            params=params,
            value_bytes=value_bytes,
            index_bytes=index_bytes,
            sorted_input=sorted_input,
        )  # fmt: skip
        for c in candidates
    }
    return min(times, key=times.__getitem__)


DEFAULT_PARAMS = NetworkParams.from_link(bandwidth_bps=10e9, latency_s=5e-6)

# ---- model presets for `sparsetrain simulate` -------------------------------------------------

# Parameter counts with their sources.
MODEL_PARAMETERS: dict[str, tuple[int, str]] = {
    "bert-base": (110_000_000, "Devlin et al. 2019, BERT, section 3: BERT-BASE 110M parameters"),
    "bert-large": (340_000_000, "Devlin et al. 2019, BERT, section 3: BERT-LARGE 340M parameters"),
    "resnet50": (25_557_032, "torchvision resnet50 (He et al. 2016), counted parameters"),
    "vgg16": (138_357_544, "torchvision vgg16 (Simonyan and Zisserman 2015), counted parameters"),
    "gpt2": (124_439_808, "GPT-2 small (Radford et al. 2019), Hugging Face gpt2 parameter count"),
}


def model_numel(name: str) -> int:
    """Return the parameter count of a preset model (see :data:`MODEL_PARAMETERS`)."""
    if name not in MODEL_PARAMETERS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(sorted(MODEL_PARAMETERS))}")
    return MODEL_PARAMETERS[name][0]


__all__ = [
    "COEFFICIENTS",
    "Cost",
    "DEFAULT_PARAMS",
    "EXACT",
    "MODEL_PARAMETERS",
    "Measurement",
    "NetworkParams",
    "Problem",
    "SELECTING",
    "available_models",
    "best_collective",
    "cost",
    "fit",
    "model_numel",
    "predict",
    "register_model",
]
