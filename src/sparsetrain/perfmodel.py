"""Alpha-beta-gamma cost model of dense allreduce and every sparse collective.

The time of a collective on p ranks is modelled as ::

    T = alpha * messages + latency * rounds + beta * bytes + overhead * operations
        + gamma * sparse_elements + gamma_dense * dense_elements + gamma_sort * sort_work

(``messages`` and the local terms already multiplied by the ranks a core where the ranks share
a host's cores; see below)

counted along the critical path of one rank:

* ``messages``: message steps, each with its start-up cost. Each point-to-point message counts
  once, also when a batch of them to p - 1 peers is posted at once (as the Ok-Topk paper
  counts its split, (p - 1) alpha); a ring collective counts its steps. On the emulated
  cluster, where the ranks share the host's cores, alpha is mostly a message's CPU cost, and
  the messages are multiplied by the ranks a core (below).
* ``rounds``: one-way trips over the wire that the rank waits for, each costing the link's
  ``latency`` (known from the link, not fitted; 0 by default, where alpha carries it as in
  the paper's counting). On gloo's TCP transport a send waits for the receiver's notice that
  its receive is posted, so a batch of sends posted together with its receives takes two
  trips (not p - 1), a send to a receive posted a round earlier one, and each step of a
  library ring two, but one in a pipelined dense ring, whose receives are posted ahead
  (``benchmarks/bench_latency_steps.py``).
* ``bytes``: the bytes that cross this rank's link in its busier direction (every rank has its
  own full-duplex link to a non-blocking switch, as in the emulated cluster), summed over the
  phases the rank waits for one after another: gTop-k's root receives k entries a hop up the
  tree and then sends k a hop down, so both count (2 log2 p k entries, as in Shi et al.).
* ``operations``: what the rank issues: one per library collective call (gloo or NCCL
  allreduce, allgather) and one per point-to-point message posted. ``overhead`` is the
  software cost of each (LogP's o): Python, the backend's bookkeeping, a system call.
* ``sparse_elements``: (index, value) entries touched once locally (scatter, compare, copy),
  counted pass by pass as the code makes them: input checks, order checks, packing into
  messages, concatenations, widening indices to int64, scatter-adds, magnitudes and masks.
* ``dense_elements``: elements of dense vectors streamed through memory (zero-fill, sums), and
  the kernel's zeroing of freshly mapped pages: where ``Problem.fresh_pages`` holds (host
  memory from glibc, as in the emulated cluster), every buffer a call allocates above
  ``FRESH_MAPPING_BYTES`` (32 MiB) is a new mapping whose pages are faulted in and zeroed on
  first touch, counted as its size in elements.
* ``sort_work``: sum of m log2 m over the sorts and sort-based merges of m entries.
* ``hidden_dense``: dense elements summed while the cost's bytes are on the wire (a pipelined
  ring sums one chunk while the next travels), so only the slower of the two counts:
  ``max(beta * bytes, gamma_dense * hidden_dense)``, which is ``beta * bytes`` on every
  measured point and in every projection README quotes.

The three local terms are multiplied by ``Problem.share(active)``: when the ranks share
``cores`` processors (the emulated cluster runs every rank on this machine's cores), local
work that ``active`` ranks do at once takes ``max(1, active / cores)`` times as long. So are
the messages, by ``Problem.share(world)``: a message's start-up is CPU work (the emulated
cluster's ranks keep its cores 38-86% busy at 8, 16 and 32 ranks alike, and spend about the
same CPU time a message), so ``alpha`` is a message's cost on a core of its own, and a
message costs ``alpha * world / cores`` where the ranks share the cores. With ``cores=None``
(a real cluster: a processor a rank) both factors are 1.

Sparse inputs are modelled as k = density * n distinct indices a rank (at least one), uniform
and independent across ranks (near the worst case for fill-in while the ranks' k's together are
far below n; disjoint supports are the worst), so the expected support of the sum
of m ranks is ``U(m) = n * (1 - (1 - k / n) ** m)``. Entries cost ``index_bytes +
value_bytes`` on the wire.

Every formula follows the algorithm as implemented in :mod:`sparsetrain.comm`, phase by phase
(see each function). The exchanges of a few ints (the input agreement, gathers of counts) are
counted as the collectives send them: p - 1 direct messages at once below
``sparsetrain.comm.p2p.TREE_FROM`` ranks (their few hundred bytes left out), ceil(log2 p)
rounds of one message from there on (with their bytes, which grow with p); library calls (the
allgather baseline's, dense allreduce) as rings. ``fit`` finds
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
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace

from .comm import p2p

# ---- parameters and costs ---------------------------------------------------------------------

COEFFICIENTS = ("alpha", "beta", "gamma", "gamma_dense", "gamma_sort", "overhead")
# Every parameter: the fitted coefficients and the link's latency, which is given.
PARAMETERS = (*COEFFICIENTS, "latency")


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
        latency: per one-way trip over the wire that a call waits for (a round). Known from
            the link rather than fitted (:func:`fit` takes it as given); 0 by default.
    """

    alpha: float
    beta: float
    gamma: float = 0.0
    gamma_dense: float = 0.0
    gamma_sort: float = 0.0
    overhead: float = 0.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in PARAMETERS:
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v < math.inf:
                raise ValueError(f"NetworkParams.{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))  # (a NumPy scalar is kept as a float)

    @classmethod
    def from_link(
        cls,
        bandwidth_bps: float | str,
        latency_s: float | str,
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

        ``bandwidth_bps`` and ``latency_s`` may also be given in tc's notation, as strings
        with their unit: ``from_link("10gbit", "5us")``. tc's *bytes*-per-second units
        (``"10gbps"``, 80 Gbit/s to tc) are refused as ambiguous, naming both readings.
        """
        from .cluster.units import parse_duration, parse_rate

        bandwidth_bps = parse_rate(bandwidth_bps)  # numbers as they are; refuses <= 0
        latency_s = parse_duration(latency_s)
        return cls(alpha=latency_s, beta=8.0 / bandwidth_bps, gamma=gamma,
                   gamma_dense=gamma_dense, gamma_sort=gamma_sort, overhead=overhead)  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAMETERS}


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
    rounds: float = 0.0

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
        if not isinstance(params, NetworkParams):
            raise TypeError(
                "params must be a NetworkParams (for example NetworkParams.from_link("
                f"bandwidth_bps=1e10, latency_s=5e-6), or NetworkParams(**fields)), got "
                f"{type(params).__name__}"
            )
        terms = self.bound_terms(params)
        fitted = sum(c * getattr(params, name) for c, name in zip(terms, COEFFICIENTS))
        return fitted + params.latency * self.rounds

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

    ``fresh_pages``: whether every buffer larger than :data:`FRESH_MAPPING_BYTES` that a call
    allocates is a fresh memory mapping, whose pages the kernel faults in and zeroes when they
    are first touched: host memory from glibc's ``malloc``, which maps every request above
    32 MiB afresh and unmaps it when it is freed (see :mod:`sparsetrain.hostmem`). The zeroing
    is counted as dense elements streamed. None (default): as ``cores`` says, since ranks that
    share a host's cores (the emulated cluster) allocate host memory so, and ranks of their
    own are taken to be GPU-class devices, whose caching allocator reuses its memory.
    """

    world: int
    numel: int
    density: float
    value_bytes: int = 4
    index_bytes: int = 4
    cores: int | None = None
    sorted_input: bool = True
    fresh_pages: bool | None = None

    def __post_init__(self) -> None:
        _check_int("world", self.world, 1)
        _check_int("numel", self.numel, 1)
        _check_int("value_bytes", self.value_bytes, 1)
        _check_int("index_bytes", self.index_bytes, 1)
        if self.cores is not None:
            _check_int("cores", self.cores, 1)
        if not _is_real(self.density):
            raise TypeError(f"density must be a number in (0, 1], got {self.density!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if (
            type(self.sorted_input).__module__ == "numpy"
            and getattr(self.sorted_input, "shape", None) == ()
            and isinstance(self.sorted_input.item(), bool)
        ):  # NumPy's bool scalar, as NumPy's numbers are taken (not an array)
            object.__setattr__(self, "sorted_input", bool(self.sorted_input))
        if not isinstance(self.sorted_input, bool):
            raise TypeError(f"sorted_input must be True or False, got {self.sorted_input!r}")
        if self.fresh_pages is not None and not isinstance(self.fresh_pages, bool):
            raise TypeError(f"fresh_pages must be a bool or None, got {self.fresh_pages!r}")
        for name in ("world", "numel", "value_bytes", "index_bytes", "cores"):
            value = getattr(self, name)  # NumPy's integers as Python's (int.bit_length is used)
            if value is not None:
                object.__setattr__(self, name, int(value))

    @property
    def k(self) -> float:
        """Entries a rank brings: density x numel, at least one (as a compressor keeps at
        least one; a fraction of an entry would price a fraction of a message's bytes)."""
        return max(1.0, self.density * self.numel)

    @property
    def entry_bytes(self) -> int:
        return self.index_bytes + self.value_bytes

    def union(self, m: float) -> float:
        """Expected support of the sum of ``m`` ranks' sparse vectors."""
        return self.numel * (1.0 - (1.0 - self.k / self.numel) ** m)

    def share(self, active: float) -> float:
        """Slow-down of local work done by ``active`` ranks at once on the shared cores."""
        return shared_slowdown(active, self.cores)

    @property
    def maps_fresh(self) -> bool:
        """Whether large buffers are fresh mappings (``fresh_pages``, or its default)."""
        return self.cores is not None if self.fresh_pages is None else self.fresh_pages


def shared_slowdown(active: float, cores: int | None) -> float:
    """How much longer work takes when ``active`` ranks do it at once on ``cores`` shared
    processors: max(1, active / cores); 1 with ``cores=None`` (a processor a rank)."""
    return 1.0 if cores is None else max(1.0, active / cores)


# glibc's malloc serves a request above its mmap threshold with a fresh mapping; the threshold
# adapts to the sizes freed, up to this ceiling (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems).
FRESH_MAPPING_BYTES = 32 * 2**20


def _check_int(name: str, v: object, lo: int) -> None:
    # (NumPy's integers too: counts read from arrays are theirs)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def _is_real(v: object) -> bool:
    """Whether ``v`` is a real number (NumPy's included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


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
    ``passes`` linear checks of the k indices (``is_sorted``), which is all that sorted input
    takes. Unsorted input fails the first check and is put in order there: a sort of k and a
    move of the k entries into that order (a coalesce's zeroed sums and scatter-add, or a
    split's gathers of indices and values), with the buffers of the coalesce's
    ``torch.unique`` (as in :func:`_merge`); what it returns is sorted, so later passes are
    checks."""
    k = q.k
    if q.sorted_input:
        return _local(q, q.world, sparse=passes * k)
    ib, vb = q.index_bytes, q.value_bytes
    return _local(q, q.world, sorts=[k], sparse=(passes + 2) * k) + _fresh(
        q, q.world, k * ib, 8 * k, 8 * k, k * ib, 8 * k, k * vb
    )


def _check(q: Problem, times: int = 1) -> Cost:
    """The input check (``torch.aminmax`` over the k indices), run ``times`` times a call: in
    the agreement, and once more where a collective splits its input before it."""
    return _local(q, q.world, sparse=times * q.k)


def _fresh(q: Problem, active: float, *buffers: float | tuple[float, float]) -> Cost:
    """The kernel's zeroing of the freshly mapped pages of buffers (sizes in bytes, or
    ``(size, count)`` for ``count`` alike, so a buffer a peer costs no list as long as the
    ranks) that ``active`` ranks allocate at once: where large buffers are fresh mappings
    (:attr:`Problem.fresh_pages`), each buffer above :data:`FRESH_MAPPING_BYTES`, counted as
    dense float32 elements (the fits' unit: a page costs the same whatever the gradient's
    dtype); nothing otherwise."""
    if not q.maps_fresh:
        return Cost(0, 0)
    sized = (b if isinstance(b, tuple) else (b, 1) for b in buffers)
    nbytes = sum(size * count for size, count in sized if size > FRESH_MAPPING_BYTES)
    return _local(q, active, dense=nbytes / 4)


def _merge(q: Problem, active: float, m: float, out: float) -> Cost:
    """``merge`` of m entries (concatenated sorted runs) into ``out`` distinct ones, done by
    ``active`` ranks at once: the concatenation, the order check that finds them unsorted, the
    sort of ``torch.unique``, the zeroed sums and the scatter-add into them; 3m + out entries
    touched and a sort of m. Its buffers: the concatenated indices and values, the sorted
    copy, the sort's int64 permutation and the int64 inverse of ``torch.unique``, the distinct
    indices, their int64 first positions and the sums."""
    ib, vb = q.index_bytes, q.value_bytes
    return _local(q, active, sparse=3 * m + out, sorts=[m]) + _fresh(
        q, active, m * ib, m * vb, m * ib, 8 * m, 8 * m, out * ib, 8 * out, out * vb
    )


def _call(messages: float, nbytes: float = 0.0, trips: float = 2) -> Cost:
    """One call of a library collective that takes ``messages`` steps, each waiting ``trips``
    one-way trips (two: the receiver's notice, then the data); nothing for no steps (p = 1)."""
    if not messages:
        return Cost(0, 0)
    return Cost(messages, nbytes, operations=1, rounds=trips * messages)


def _p2p(messages: float, nbytes: float = 0.0, rounds: float = 2) -> Cost:
    """``messages`` point-to-point messages, each posted by the rank (one operation each),
    posted together with their receives: ``rounds`` one-way trips (the notices, then the
    data); nothing for no messages (p = 1)."""
    if not messages:
        return Cost(0, 0)
    return Cost(messages, nbytes, operations=messages, rounds=rounds)


def _with_bit(p: int, d: int) -> int:
    """How many of 0, ..., p - 1 have the bit d (a power of two) set."""
    return p // (2 * d) * d + max(0, p % (2 * d) - d)


def _few_ints(p: int, round_bytes: Callable[[int], float]) -> Cost:
    """An exchange of a few ints: below ``TREE_FROM`` ranks p - 1 direct messages at once (their
    few hundred bytes left out); from there on ceil(log2 p) rounds of one message, the round of
    distance d (1, 2, 4, ...) sending ``round_bytes(d)`` bytes."""
    if p == 1:
        return Cost(0, 0)
    if not p2p.uses_tree(p):
        return _p2p(p - 1)
    cost, d = Cost(0, 0), 1
    while d < p:
        cost += _p2p(1, round_bytes(d))
        d *= 2
    return cost


def _agreement(p: int) -> Cost:
    """The input agreement every sparse collective except the allgather baseline starts with
    (:func:`_few_ints`); in the log2 p form each round carries the running minima and maxima of
    the ``p2p.AGREE_HEAD`` checked ints (a collective's options as one code) and the ints for
    every peer (such as the split's sizes; zeros where a collective tells none) that Bruck's
    index algorithm moves that round (about p / 2): the same messages for every collective."""
    return _few_ints(p, lambda d: 8 * (2 * p2p.AGREE_HEAD + _with_bit(p, d)))


def _gather_ints(p: int, width: int) -> Cost:
    """A gather of ``width`` ints from every rank (counts, sizes; :func:`_few_ints`); in the
    log2 p form, Bruck's round of distance d sends min(d, p - d) ranks' ints."""
    return _few_ints(p, lambda d: 8 * width * min(d, p - d))


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
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"a cost model for {name!r} is already registered: {_MODELS[name]}")
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
    # its chunks' receives are posted ahead: one trip a step
    ring = _call(2 * (p - 1), 2 * (p - 1) / p * n * q.value_bytes, trips=1)
    return ring + Cost(0, 0, hidden_dense=q.share(p) * (p - 1) / p * n)


@register_model("allgather")
def sparse_allgather(q: Problem) -> Cost:
    """Allgather of every rank's k entries (sizes first, then payloads padded to the largest),
    then a local scatter-add of all p k entries into a zeroed dense vector.

    T = 2(p-1) alpha + (p-1) k (b_i + b_v) beta + 2 o + (4k + 3pk) gamma + n gamma_dense.

    Entries touched: the input check, the zeroed send buffer and the copy into it, gloo's copy
    of it into its flat output (4k); gloo's copy of the flat output into the p output buffers,
    and for each rank's k entries the indices widened to int64 and the scatter-add (3pk).
    """
    p, k = q.world, q.k
    block = k * q.entry_bytes
    return (
        _small_allgather(p)
        + _call(p - 1, (p - 1) * block)
        + _local(q, p, sparse=4 * k + 3 * p * k, dense=q.numel)
        # the send buffer, gloo's flat output, the p output buffers and widened indices, the sum
        + _fresh(q, p, block, p * block, (block, p), (8 * k, p), q.numel * q.value_bytes)
    )


@register_model("ssar_rd")
def ssar_recursive_doubling(q: Problem) -> Cost:
    """SparCML recursive doubling with fold/unfold for non-powers of two.

    Agreement (with the input check) and a local coalesce (a linear check of k sorted entries,
    or a sort of k); a fold (k entries) when p is not a power of two; log2 p' exchanges, each a
    size message and a payload message, where the sender's support after merging m ranks is
    U(m): the sender packs its U(m) entries and the merge of both operands (2 U(m) entries into
    U(2m)) concatenates, checks, sorts and scatter-adds them; an unfold of the result U(p);
    then the result's indices widened to int64 and scattered into a zeroed dense vector.

    Along the critical path: ranks core .. p - 1 fold into ranks 0 .. extra - 1, so before the
    exchange of distance g (1, 2, 4, ...) the block of g core ranks holding rank 0 has summed
    g + min(g, extra) ranks, the most of any block (the average, p / core a rank, undercounted
    p = 3, 5 and 6 by 8-11% of the bytes).
    """
    p = q.world
    core = 1 << (p.bit_length() - 1)
    extra = p - core
    cost = _agreement(p) + _check(q) + _order(q)
    eb = q.entry_bytes
    if extra:
        cost += (
            _p2p(2, q.k * eb, rounds=4)
            + _local(q, extra, sparse=q.k)
            + _fresh(q, extra, q.k * eb, q.k * eb)  # packed message, receive buffer
            + _merge(q, extra, 2 * q.k, q.union(2))
        )
    g = 1
    while g < core:
        m = g + min(g, extra)  # the ranks summed by a sender of the heaviest pair
        u = q.union(m)
        cost += (
            # the size, then the payload, whose receive is posted once the size is in: the
            # payload waits for its notice too, four trips
            _p2p(2, u * eb, rounds=4)
            + _local(q, core, sparse=u)
            + _fresh(q, core, u * eb, u * eb)
            + _merge(q, core, 2 * u, q.union(2 * g + min(2 * g, extra)))
        )
        g *= 2
    total = q.union(p)
    if extra:
        cost += _p2p(2, total * eb, rounds=4) + _local(q, extra, sparse=total)
        cost += _fresh(q, extra, total * eb, total * eb)
    return (
        cost
        + _local(q, p, sparse=2 * total, dense=q.numel)
        + _fresh(q, p, 8 * total, q.numel * q.value_bytes)  # widened indices, the sum
    )


def _split_phase(q: Problem, adaptive: bool) -> tuple[Cost, float, bool]:
    """Split (sparse or dense reduce-scatter) to range owners; returns the cost, the expected
    reduced entries of a range, and whether the reduced range is dense."""
    p, k = q.world, q.k
    delta = q.value_bytes / q.entry_bytes  # break-even density
    dense_in = adaptive and q.k / q.numel >= delta  # (k: at least one entry)
    per_peer = (q.numel / p * q.value_bytes) if dense_in else (k / p * q.entry_bytes)
    cost = (
        _agreement(p)  # which carries the sizes of the split
        + _check(q, 2)  # before the split, and in the agreement
        + _order(q)  # into ranges
        + _p2p(p - 1, (p - 1) * per_peer)  # payloads in rotating order
    )
    # each message a zeroed range and a scatter-add of its entries, or a packed copy of them;
    # and a receive buffer of each peer's
    if dense_in:
        cost += _local(q, p, sparse=3 * (p - 1) / p * k, dense=(p - 1) / p * q.numel)
    else:
        cost += _local(q, p, sparse=(p - 1) / p * k)
    cost += _fresh(q, p, (per_peer, 2 * (p - 1)))
    reduced = q.union(p) / p
    dense_out = adaptive and (dense_in or q.union(p) / q.numel >= delta)
    # A range receives k entries in all (k/p from each rank); a dense accumulator takes over
    # from the merge once they could fill it past break-even (density >= delta / p).
    ib, vb, eb = q.index_bytes, q.value_bytes, q.entry_bytes
    if dense_in:  # the own entries scatter-added into a zeroed range, the p - 1 blocks summed
        own = k / p
        cost += _local(q, p, sparse=4 * own, dense=q.numel)
        cost += _fresh(q, p, q.numel / p * vb, own * ib, 8 * own, 8 * own, own * vb)
    elif adaptive and k * eb >= q.numel / p * vb:
        # concatenation, indices widened and offset, scatter-add (4k) into a zeroed range and
        # a scan for its non-zeros (2n/p); below delta the non-zeros' indices, values and
        # packed copy (4 reduced)
        sparse = 4 * k + (0.0 if dense_out else 4 * reduced)
        cost += _local(q, p, sparse=sparse, dense=2 * q.numel / p)
        cost += _fresh(q, p, q.numel / p * vb, k * ib, 8 * k, 8 * k, k * vb, 8 * reduced)
        if not dense_out:
            cost += _fresh(q, p, 8 * reduced, reduced * ib, reduced * vb, reduced * eb)
    else:  # sort-based merge of the k entries that fall in the range, and its packed copy
        cost += _merge(q, p, k, reduced) + _local(q, p, sparse=reduced)
        cost += _fresh(q, p, reduced * eb)
    return cost, reduced, dense_out


def _allgather_ranges(q: Problem, reduced: float, dense_out: bool) -> Cost:
    """Allgather of the p reduced ranges (sizes, then the ranges, each by direct sends) and
    their scatter into a zeroed dense vector: dense ranges are copied into it (n elements),
    sparse ones concatenated, their indices widened and scattered (3 p reduced entries)."""
    p = q.world
    block = q.numel / p * q.value_bytes if dense_out else reduced * q.entry_bytes
    ib, vb = q.index_bytes, q.value_bytes
    cost = (
        _gather_ints(p, 1)  # the ranges' sizes
        + _p2p(p - 1, (p - 1) * block)
        + _fresh(q, p, (block, p - 1), q.numel * vb)  # receive buffers, the sum
    )
    if dense_out:
        return cost + _local(q, p, dense=2 * q.numel)
    total = p * reduced
    return (
        cost
        + _local(q, p, sparse=3 * total, dense=q.numel)
        + _fresh(q, p, total * ib, 8 * total, total * vb)
    )


@register_model("ssar_split")
def ssar_split_allgather(q: Problem) -> Cost:
    """SparCML split-allgather: sparse split to p range owners, merge, allgather of ranges.

    T = 4(p-1) alpha + (p-1)/p [k + U(p)] (b_i + b_v) beta + 4(p-1) o
        + k log2 k gamma_sort (the merge) + (7k - k/p + 2 U(p)/p + 3 U(p)) gamma
        + n gamma_dense, for sorted input (unsorted adds a sort of k): the agreement (carrying
        the split's sizes), the split's payloads, the reduced ranges' sizes and the ranges,
        each p - 1 direct messages (from ``TREE_FROM`` ranks on the agreement and the sizes
        take ceil(log2 p) messages each: 2(p-1) + 2 ceil(log2 p) alpha). Entries touched: two input checks and the split's check
        (3k), the messages' packed copies ((p-1)/p k), the merge (3k + U(p)/p) and the packed
        range (U(p)/p), and the scatter of the p ranges (3 U(p)).
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

    Steady state (region edges and threshold reused): the input checked (before the split and
    in the agreement), coalesced and split into regions (two linear passes over k sorted
    entries; unsorted ones are sorted once first) and packed ((p-1)/p k); the agreement, whose
    messages carry the sizes of the split; the payloads, (p-1)/p k entries, to the region
    owners in rotating order; a sort-based merge of the region's k entries into its U(p)/p
    reduced ones; their magnitudes (abs, widened to float64), the finiteness check, the three
    kept counts and the selection (7 passes over U(p)/p); the kept counts sent to every peer;
    the k/p entries a rank holds concatenated and packed, then sent directly to every peer
    (the balance step is left out: regions balanced by the repartition keep within a tenth of
    equal shares where the ranks' inputs overlap; with independent inputs drawn afresh it ran
    on 82% of calls at 125 kept entries a region and 5% at 625, and on every call at 125 and
    625 with one draw repeated, as the cluster benchmark times a point; docs/collectives.md);
    the result concatenated (k). Volume about 2 (p-1)/p k entries, the paper's < 6k bound.
    Latency 4(p-1) alpha below ``TREE_FROM`` ranks, where the agreement and the count gather
    are direct sends to every peer; from there on 2(p-1) + 2 ceil(log2 p) alpha, the paper's
    (2p + 2 log p) alpha.
    """
    p, k = q.world, q.k
    ib, vb, eb = q.index_bytes, q.value_bytes, q.entry_bytes
    selected = k / p
    reduced = q.union(p) / p
    return (
        _agreement(p)  # which carries the split's sizes
        + _check(q, 2)
        + _order(q, passes=2)  # coalesce, split
        + _local(q, p, sparse=(p - 1) / p * k)  # the messages' packed copies
        + _p2p(p - 1, (p - 1) / p * k * eb)
        + _fresh(q, p, (k / p * eb, 2 * (p - 1)))  # messages, receive buffers
        + _merge(q, p, k, reduced)
        + _local(q, p, sparse=7 * reduced)
        + _fresh(q, p, reduced * vb, 8 * reduced)  # magnitudes, widened
        + _gather_ints(p, 4)  # the kept counts, whether any sum is not finite
        + _local(q, p, sparse=2 * selected)
        + _p2p(p - 1, (p - 1) * selected * eb)
        + _local(q, p, sparse=k)
        + _fresh(q, p, (selected * eb, p), k * ib, k * vb)  # blocks, the result
    )


@register_model("gtopk")
def gtopk(q: Problem) -> Cost:
    """gTop-k: tree reduction keeping the top k of each merged pair, then a broadcast.

    Agreement (with the input check); each rank coalesces its k entries (a linear check if
    sorted, else a sort) and copies them; log2 p rounds up, in which rank 0 receives k entries a
    round and merges 2k, then keeps k of them: magnitudes and ``torch.topk`` (linear passes
    over 2k), a sort of the k kept positions and the gathers (half as many ranks merge each
    round); each message is k fixed slots the sender zeroes and fills (3k); log2 p messages
    down from rank 0, each parent filling one message: T = (p-1) alpha + 2 log p alpha
    + 2 log p k (b_i + b_v) beta + (p - 1 + 2 log p) o
    + log p [sort(2k) + sort(k)] gamma_sort + (3k + 19 k log p) gamma (sorted input); from
    ``TREE_FROM`` ranks on the agreement takes ceil(log2 p) messages, not p - 1 (3 log p in all).
    """
    p, k = q.world, q.k
    ib, vb, eb = q.index_bytes, q.value_bytes, q.entry_bytes
    L = _log2ceil(p)
    cost = _agreement(p) + _check(q) + _order(q) + _local(q, p, sparse=k)
    cost += _fresh(q, p, k * ib, k * vb)  # the copies
    # a message: zeroed index and value slots, their concatenation; its receive buffer
    message = (k * ib, k * vb, k * eb, k * eb)
    active = p / 2
    for _ in range(L):
        cost += (
            _p2p(1, k * eb)
            + _local(q, active, sparse=3 * k)  # the sender's message
            + _merge(q, active, 2 * k, 2 * k)
            + _local(q, active, sparse=5 * k, sorts=[k])  # keep the top k
            # magnitudes, topk's values and positions, the sorted positions, the gathers
            + _fresh(q, active, 2 * k * vb, k * vb, 8 * k, 8 * k, 8 * k, k * ib, k * vb)
            + _fresh(q, active, *message)
        )
        active /= 2
    for _ in range(L):  # down: one more parent fills its message each hop
        active *= 2
        # the receivers wait with their receives posted: one trip a hop
        cost += _p2p(1, k * eb, rounds=1) + _local(q, active, sparse=3 * k)
        cost += _fresh(q, active, *message)
    return cost


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
    fresh_pages: bool | None = None,
) -> Cost:
    """Return the cost decomposition of one call of ``algorithm``.

    ``cores``: processors the ranks share (see :class:`Problem`); None: one a rank.
    ``sorted_input``: whether the ranks' indices arrive sorted (see :class:`Problem`).
    ``fresh_pages``: whether large buffers are fresh mappings (see :class:`Problem`); None:
    when ``cores`` is given.

    Raises:
        ValueError: unknown algorithm (the message lists the modelled ones) or bad sizes.
    """
    if algorithm not in _MODELS:
        raise ValueError(
            f"no cost model for collective {algorithm!r}; modelled: {', '.join(available_models())}"
        )
    q = Problem(world, numel, density, value_bytes, index_bytes, cores, sorted_input, fresh_pages)
    c = _MODELS[algorithm](q)
    # A message's start-up is CPU work: on cores that all the ranks share, each rank's messages
    # wait their turn like its local work (see the module docstring).
    return replace(c, messages=c.messages * q.share(q.world))


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
    fresh_pages: bool | None = None,
) -> float:
    """Return the modelled seconds of one call of ``algorithm`` (arguments as for :func:`cost`).

    Example:
        >>> p = NetworkParams(alpha=1e-5, beta=8e-9)
        >>> round(predict("dense", world=2, numel=1000, density=1.0, params=p), 6)
        5.2e-05
    """
    c = cost(algorithm, world=world, numel=numel, density=density, value_bytes=value_bytes,
             index_bytes=index_bytes, cores=cores, sorted_input=sorted_input,
             fresh_pages=fresh_pages)  # fmt: skip
    return c.seconds(params)


@dataclass(frozen=True)
class Measurement:
    """One measured time: ``algorithm`` on ``world`` ranks, ``numel`` elements, ``density``
    (``cores``: processors the ranks shared, ``sorted_input``: whether the inputs were sorted,
    ``fresh_pages``: whether large buffers were fresh mappings, as in :class:`Problem`)."""

    algorithm: str
    world: int
    numel: int
    density: float
    seconds: float
    value_bytes: int = 4
    index_bytes: int = 4
    cores: int | None = None
    sorted_input: bool = True
    fresh_pages: bool | None = None


def fit(
    measurements: Iterable[Measurement],
    *,
    fixed: dict[str, float] | None = None,
    latency: float = 0.0,
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
        latency: the links' one-way latency a round, known (an emulated link's), which the
            returned parameters carry; the fit explains only what is left after it. With the
            default 0, alpha takes whatever latency the links have.

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
    if not _is_real(latency) or not (0 <= latency < math.inf):
        raise ValueError(f"fit: latency must be a finite number >= 0, got {latency!r}")
    latency = float(latency)  # (a NumPy float32 would round the products below to its width)
    bad = sorted(set(fixed) - set(COEFFICIENTS))
    if bad:
        raise ValueError(f"fit: cannot fix {bad}; coefficients are {', '.join(COEFFICIENTS)}")
    for name, value in fixed.items():
        if not _is_real(value) or not 0 <= value < math.inf:
            raise ValueError(f"fit: fixed[{name!r}] must be a finite number >= 0, got {value!r}")
    ms = list(measurements)
    if len(ms) < 3:
        raise ValueError(f"fit needs at least 3 measurements, got {len(ms)}")
    costs, ts = [], []
    for m in ms:
        if not isinstance(m, Measurement):
            raise TypeError(f"fit takes Measurement objects, got {type(m).__name__}")
        if not _is_real(m.seconds) or not 0 < m.seconds < math.inf:
            raise ValueError(
                f"measured seconds must be a finite number > 0, got {m.seconds!r} for {m}"
            )
        costs.append(cost(m.algorithm, world=m.world, numel=m.numel, density=m.density,
                          value_bytes=m.value_bytes, index_bytes=m.index_bytes, cores=m.cores,
                          sorted_input=m.sorted_input, fresh_pages=m.fresh_pages))  # fmt: skip
        ts.append(m.seconds)
    rows = [c.terms() for c in costs]
    if not any(any(row) for row in rows):
        raise ValueError(
            "fit: the model prices every measurement at zero (a world of 1 sends and sums "
            "nothing), so no coefficient can be fitted; measure on 2 or more ranks"
        )
    # A pipelined reduction counts only where it is slower than its transfer, which depends on
    # the coefficients: fit with the transfer everywhere, then refit with the slower of the two
    # under the fitted coefficients until no point changes side. The sides can cycle (points
    # that share one ratio switch together), so the round that fits best by the model's own
    # max() is kept.
    known = [latency * c.rounds for c in costs]  # the part of each time the latency explains
    seen, best, best_err = [], None, math.inf
    while rows not in seen and len(seen) < 8:
        seen.append(rows)
        params = _nnls_fit(rows, ts, fixed, known, latency)
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
    rows: Sequence[Sequence[float]],
    ts: Sequence[float],
    fixed: dict[str, float],
    known: Sequence[float],
    latency: float,
) -> NetworkParams:
    """Non-negative least squares on relative errors over every subset of the free
    coefficients, the ``known`` seconds of each row taken off first (see :func:`fit`)."""
    held = {COEFFICIENTS.index(name): float(v) for name, v in fixed.items()}
    coef = nnls_relative(rows, ts, known, held)
    return NetworkParams(*(float(v) for v in coef), latency=latency)


def nnls_relative(
    rows: Sequence[Sequence[float]],
    ts: Sequence[float],
    known: Sequence[float],
    fixed: dict[int, float],
):
    """The non-negative coefficients (one a column of ``rows``, as a numpy array) whose dot
    product with each row, plus its ``known`` seconds, best matches its time in ``ts`` in
    relative terms: least squares over every subset of the columns not held at ``fixed``
    values (by column index), the best feasible subset kept. :func:`fit`'s solver, also for
    variants of the model with other columns (``benchmarks/model_variants.py``)."""
    import numpy as np

    a = np.asarray(rows, dtype=float) / np.asarray(ts)[:, None]
    b = 1.0 - np.asarray(known, dtype=float) / np.asarray(ts)
    free = [j for j in range(a.shape[1]) if j not in fixed]
    for j, v in fixed.items():
        b = b - a[:, j] * v
    # Column scaling: the coefficients span 1e-11 (gamma_dense) to 1e-4 (alpha).
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)
    a = a / scale
    best, best_err = np.zeros(a.shape[1]), float(np.sum(b**2))
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
                best_err, best = err, np.zeros(a.shape[1])
                best[list(cols)] = x
    coef = best / scale
    for j, v in fixed.items():
        coef[j] = v
    return coef


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
    if isinstance(candidates, str):
        raise TypeError(f"candidates must be a non-empty sequence of names, got {candidates!r}")
    candidates = list(candidates)  # (an iterator would be spent by the check below)
    if not candidates:
        raise TypeError("candidates must be a non-empty sequence of names, got none")
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
    if not isinstance(name, str) or name not in MODEL_PARAMETERS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(sorted(MODEL_PARAMETERS))}")
    return MODEL_PARAMETERS[name][0]


__all__ = [
    "COEFFICIENTS",
    "Cost",
    "DEFAULT_PARAMS",
    "EXACT",
    "FRESH_MAPPING_BYTES",
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
