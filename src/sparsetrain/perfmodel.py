"""Alpha-beta-gamma cost model of dense allreduce and every sparse collective.

The time of a collective on p ranks is modelled as ::

    T = alpha * messages + beta * bytes + gamma * sparse_elements + gamma_dense * dense_elements

counted along the critical path of one rank:

* ``messages``: sequential message start-ups (latency terms; a batch of point-to-point sends
  posted at once counts once, a ring step counts once);
* ``bytes``: the bytes that cross this rank's link in its busier direction (every rank has its
  own full-duplex link to a non-blocking switch, as in the emulated cluster);
* ``sparse_elements``: (index, value) entries sorted, merged, selected or scattered locally;
* ``dense_elements``: elements of dense vectors streamed through memory (zero-fill, sums).

Sparse inputs are modelled as k = density * n distinct indices a rank, uniform and independent
across ranks (the worst case for fill-in), so the expected support of the sum of m ranks is
``U(m) = n * (1 - (1 - density) ** m)``. Entries cost ``index_bytes + value_bytes`` on the wire.

Every formula follows the algorithm as implemented in :mod:`sparsetrain.comm`, phase by phase
(see each function). ``fit`` finds alpha, beta and both gammas from measured times by
non-negative least squares on relative errors; ``best_collective`` picks the fastest algorithm
for the sync layer's ``collective="auto"``.

Papers: Hockney's alpha-beta model; Thakur, Rabenseifner and Gropp, "Optimization of collective
communication operations in MPICH" (IJHPCA 2005) for ring allreduce; SparCML (Renggli et al.,
SC'19); Ok-Topk (Li and Hoefler, PPoPP'22); gTop-k (Shi et al., ICDCS'19).

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
from dataclasses import dataclass

# ---- parameters and costs ---------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkParams:
    """Coefficients of the cost model, all in seconds.

    Attributes:
        alpha: per message (start-up latency).
        beta: per byte on a link (1 / bandwidth in bytes per second).
        gamma: per sparse entry processed locally (sort, merge, select, scatter).
        gamma_dense: per dense element streamed through memory (zero-fill, elementwise sum).
    """

    alpha: float
    beta: float
    gamma: float = 0.0
    gamma_dense: float = 0.0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "gamma_dense"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"NetworkParams.{name} must be a number >= 0, got {v!r}")

    @classmethod
    def from_link(
        cls,
        bandwidth_bps: float,
        latency_s: float,
        gamma: float = 2e-9,
        gamma_dense: float = 5e-11,
    ) -> NetworkParams:
        """Build parameters from a link's rate in bits per second and its one-way latency.

        The default gammas are those of a GPU-class device (about 2 ns an entry for
        sort-based merges, 0.05 ns an element for streaming), not of the 2-core CPU the
        emulated cluster runs on; pass fitted values to model that.
        """
        if not bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be positive, got {bandwidth_bps!r}")
        return cls(alpha=latency_s, beta=8.0 / bandwidth_bps, gamma=gamma, gamma_dense=gamma_dense)

    def as_dict(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "gamma_dense": self.gamma_dense}  # fmt: skip


@dataclass(frozen=True)
class Cost:
    """The model's decomposition of a collective's time (see the module docstring)."""

    messages: float
    bytes: float
    sparse_elements: float = 0.0
    dense_elements: float = 0.0

    def seconds(self, params: NetworkParams) -> float:
        """Return the modelled time in seconds."""
        return (
            params.alpha * self.messages
            + params.beta * self.bytes
            + params.gamma * self.sparse_elements
            + params.gamma_dense * self.dense_elements
        )

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.messages + other.messages,
            self.bytes + other.bytes,
            self.sparse_elements + other.sparse_elements,
            self.dense_elements + other.dense_elements,
        )


@dataclass(frozen=True)
class Problem:
    """One collective call: p ranks, a vector of n elements, k entries a rank."""

    world: int
    numel: int
    density: float
    value_bytes: int = 4
    index_bytes: int = 4

    def __post_init__(self) -> None:
        _check_int("world", self.world, 1)
        _check_int("numel", self.numel, 1)
        _check_int("value_bytes", self.value_bytes, 1)
        _check_int("index_bytes", self.index_bytes, 1)
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


def _check_int(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def _log2ceil(p: int) -> int:
    return max(0, math.ceil(math.log2(p))) if p > 1 else 0


def _small_allreduce(p: int) -> Cost:
    """A few-int allreduce (the input agreement every sparse collective starts with)."""
    return Cost(messages=2 * _log2ceil(p), bytes=0.0)


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

    T = 2(p-1) alpha + 2(p-1)/p n b_v beta + (p-1)/p n gamma_dense.
    """
    p, n = q.world, q.numel
    if p == 1:
        return Cost(0, 0)
    return Cost(
        messages=2 * (p - 1),
        bytes=2 * (p - 1) / p * n * q.value_bytes,
        dense_elements=(p - 1) / p * n,
    )


@register_model("allgather")
def sparse_allgather(q: Problem) -> Cost:
    """Allgather of every rank's k entries (sizes first, then payloads padded to the largest),
    then a local scatter-add of all p k entries into a zeroed dense vector.

    T = 2(p-1) alpha + (p-1) k (b_i + b_v) beta + p k gamma + n gamma_dense.
    """
    p = q.world
    return Cost(
        messages=2 * (p - 1),
        bytes=(p - 1) * q.k * q.entry_bytes,
        sparse_elements=p * q.k,
        dense_elements=q.numel,
    )


@register_model("ssar_rd")
def ssar_recursive_doubling(q: Problem) -> Cost:
    """SparCML recursive doubling with fold/unfold for non-powers of two.

    Rounds: a fold (k entries) when p is not a power of two, log2 p' exchanges where the
    sender's support after merging m ranks is U(m), then an unfold of the result U(p). Each
    exchange is a size message and a payload message; each merge sorts both operands.
    """
    p = q.world
    core = 1 << (p.bit_length() - 1)
    extra = p - core
    cost = _small_allreduce(p) + Cost(0, 0, sparse_elements=q.k, dense_elements=q.numel)
    m = 1.0
    if extra:
        cost += Cost(2, q.k * q.entry_bytes, 2 * q.k)
        m = p / core  # average ranks folded into a core rank
    rounds = core.bit_length() - 1
    for _ in range(rounds):
        u = q.union(m)
        cost += Cost(2, u * q.entry_bytes, 2 * u)
        m *= 2
    if extra:
        cost += Cost(2, q.union(p) * q.entry_bytes, 0)
    return cost + Cost(0, 0, sparse_elements=q.union(p))


def _split_phase(q: Problem, adaptive: bool) -> tuple[Cost, float, bool]:
    """Split (sparse or dense reduce-scatter) to range owners; returns the cost, the expected
    reduced entries of a range, and whether the reduced range is dense."""
    p = q.world
    delta = q.value_bytes / q.entry_bytes  # break-even density
    dense_in = adaptive and q.density >= delta
    per_peer = (q.numel / p * q.value_bytes) if dense_in else (q.k / p * q.entry_bytes)
    cost = _small_allreduce(p) + Cost(
        messages=2,  # sizes, then one batch of payloads in rotating order
        bytes=(p - 1) * per_peer,
        sparse_elements=q.k if not dense_in else 0.0,  # sort into ranges
        dense_elements=(q.numel if dense_in else 0.0),
    )
    reduced = q.union(p) / p
    dense_out = adaptive and (dense_in or q.union(p) / q.numel >= delta)
    cost += Cost(
        0,
        0,
        sparse_elements=0 if dense_out else q.k,
        dense_elements=q.numel / p if dense_out else 0,
    )
    return cost, reduced, dense_out


def _allgather_ranges(q: Problem, reduced: float, dense_out: bool) -> Cost:
    """Allgather of the p reduced ranges (sizes by ring allgather, then direct sends)."""
    p = q.world
    block = q.numel / p * q.value_bytes if dense_out else reduced * q.entry_bytes
    return Cost(
        messages=(p - 1) + 1,
        bytes=(p - 1) * block,
        sparse_elements=0 if dense_out else p * reduced,
        dense_elements=q.numel,
    )


@register_model("ssar_split")
def ssar_split_allgather(q: Problem) -> Cost:
    """SparCML split-allgather: sparse split to p range owners, merge, allgather of ranges.

    T = (2 log p + p + 2) alpha + (p-1)/p [k + U(p)] (b_i + b_v) beta + (2k + U(p)) gamma
        + n gamma_dense.
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

    Steady state (boundaries and threshold reused): agreement, a split of (p-1)/p k entries to
    region owners (sizes + one rotating batch), merge, threshold selection on the region
    (about U(p)/p entries), a ring allgather of the selected counts, then direct sends of the
    selected k/p entries a rank. Volume about 2 (p-1)/p k entries, the paper's < 6k bound.
    """
    p = q.world
    selected = q.k / p
    return _small_allreduce(p) + Cost(
        messages=2 + (p - 1) + 1,
        bytes=(p - 1) / p * q.k * q.entry_bytes + (p - 1) * selected * q.entry_bytes,
        sparse_elements=2 * q.k + q.union(p) / p + q.k,
        dense_elements=0.0,
    )


@register_model("gtopk")
def gtopk(q: Problem) -> Cost:
    """gTop-k: tree reduction keeping the top k of each merged pair, then a broadcast.

    log2 p rounds up (k entries a message, a merge and a top-k selection of 2k entries) and
    log2 p rounds down (k entries): T = 4 log p alpha + 2 log p k (b_i + b_v) beta
    + 4 k log p gamma.
    """
    L = _log2ceil(q.world)
    return _small_allreduce(q.world) + Cost(
        messages=4 * L,
        bytes=2 * L * q.k * q.entry_bytes,
        sparse_elements=4 * L * q.k,
    )


# ---- public helpers ----------------------------------------------------------------------------


def cost(
    algorithm: str,
    *,
    world: int,
    numel: int,
    density: float,
    value_bytes: int = 4,
    index_bytes: int = 4,
) -> Cost:
    """Return the cost decomposition of one call of ``algorithm``.

    Raises:
        ValueError: unknown algorithm (the message lists the modelled ones) or bad sizes.
    """
    if algorithm not in _MODELS:
        raise ValueError(
            f"no cost model for collective {algorithm!r}; modelled: {', '.join(available_models())}"
        )
    return _MODELS[algorithm](Problem(world, numel, density, value_bytes, index_bytes))


def predict(
    algorithm: str,
    *,
    world: int,
    numel: int,
    density: float,
    params: NetworkParams,
    value_bytes: int = 4,
    index_bytes: int = 4,
) -> float:
    """Return the modelled seconds of one call of ``algorithm``.

    Example:
        >>> p = NetworkParams(alpha=1e-5, beta=8e-9)
        >>> round(predict("dense", world=2, numel=1000, density=1.0, params=p), 6)
        5.2e-05
    """
    c = cost(algorithm, world=world, numel=numel, density=density, value_bytes=value_bytes,
             index_bytes=index_bytes)  # fmt: skip
    return c.seconds(params)


@dataclass(frozen=True)
class Measurement:
    """One measured time: ``algorithm`` on ``world`` ranks, ``numel`` elements, ``density``."""

    algorithm: str
    world: int
    numel: int
    density: float
    seconds: float
    value_bytes: int = 4
    index_bytes: int = 4


def fit(
    measurements: Iterable[Measurement], *, fixed: dict[str, float] | None = None
) -> NetworkParams:
    """Fit alpha, beta, gamma and gamma_dense to measured times.

    Steps: compute each measurement's cost decomposition; divide every row by its measured time
    so the fit minimises relative (not absolute) error, which keeps small calls from being
    ignored next to large ones; solve the non-negative least-squares problem exactly by trying
    every subset of the four coefficients (16 small solves) and keeping the best feasible one.

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
    import numpy as np

    names = ("alpha", "beta", "gamma", "gamma_dense")
    fixed = dict(fixed or {})
    bad = sorted(set(fixed) - set(names))
    if bad:
        raise ValueError(f"fit: cannot fix {bad}; coefficients are {', '.join(names)}")
    ms = list(measurements)
    if len(ms) < 3:
        raise ValueError(f"fit needs at least 3 measurements, got {len(ms)}")
    rows, ts = [], []
    for m in ms:
        if not isinstance(m, Measurement):
            raise TypeError(f"fit takes Measurement objects, got {type(m).__name__}")
        if not m.seconds > 0:
            raise ValueError(f"measured seconds must be positive, got {m.seconds} for {m}")
        c = cost(m.algorithm, world=m.world, numel=m.numel, density=m.density,
                 value_bytes=m.value_bytes, index_bytes=m.index_bytes)  # fmt: skip
        rows.append([c.messages, c.bytes, c.sparse_elements, c.dense_elements])
        ts.append(m.seconds)
    a = np.asarray(rows, dtype=float) / np.asarray(ts)[:, None]
    b = np.ones(len(ts))
    free = [j for j, name in enumerate(names) if name not in fixed]
    for j, name in enumerate(names):
        if name in fixed:
            b = b - a[:, j] * float(fixed[name])
    # Column scaling: the coefficients span 1e-11 (gamma_dense) to 1e-4 (alpha).
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)
    a = a / scale
    best, best_err = np.zeros(4), float(np.sum(b**2))
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
                best_err, best = err, np.zeros(4)
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
