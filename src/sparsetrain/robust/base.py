"""The aggregator contract, its registry and the tensor helpers the rules share.

An aggregator is a small dataclass whose fields are ``n`` (workers), ``f`` (Byzantine workers it
must tolerate) and its options, validated at construction. Calling it on the ``[n, d]`` matrix of
the workers' gradients returns the ``[d]`` update. Stateful rules (centered clipping, SafeguardSGD)
keep their state keyed by ``key`` (a DDP bucket, a parameter group) and update it once an
optimizer step in :meth:`Aggregator.end_step`.

Every rule is a pure function of its inputs and state, computed with the same torch ops on every
rank, so all ranks that feed it the same matrix get the same result bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._options import check_options, check_state, plain

_REGISTRY: dict[str, type[Aggregator]] = {}


def register_aggregator(name: str):
    """Class decorator: register an aggregation rule under ``name``."""

    def wrap(cls: type[Aggregator]) -> type[Aggregator]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"aggregator name {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_aggregators() -> list[str]:
    """Return the registered aggregator names, sorted."""
    return sorted(_REGISTRY)


def aggregator_class(name: str) -> type[Aggregator]:
    """Return the aggregator class registered as ``name``; an unknown name raises a
    ``ValueError`` that lists the valid ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown aggregator {name!r}; valid names are: {', '.join(available_aggregators())}"
        )
    return _REGISTRY[name]


def check_int(value: Any, what: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


def state_tensors(value: Any, what: str) -> dict[str, Tensor]:
    """Return ``value`` (a dict of tensors by key, in a loaded state) as a dict of clones, or
    raise a ValueError naming ``what``."""
    if not isinstance(value, Mapping) or not all(isinstance(t, Tensor) for t in value.values()):
        raise ValueError(f"{what} must be a dict of tensors by key, got {value!r:.200}")
    return {str(k): t.clone() for k, t in value.items()}


def check_key(key: Any) -> None:
    """Refuse a ``key`` that is not a string: state is kept by key, and a saved state's keys
    are loaded as strings, so a key 0 would have started afresh after a reload (its state
    under '0')."""
    if not isinstance(key, str):
        raise TypeError(
            f"key must be a str (state is kept and saved by key), got {key!r} of type "
            f"{type(key).__name__}"
        )


def check_positive(value: Any, what: str, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not 0 <= value < math.inf or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value}")


@dataclass
class Aggregator(ABC):
    """Base class of the aggregation rules.

    Args:
        n: number of workers (rows of the gradient matrix).
        f: number of Byzantine workers the rule must tolerate; each rule states the ``n`` it
            needs for a given ``f`` (``requirement``) and refuses less at construction.
    """

    n: int
    f: int = 0

    name: ClassVar[str] = ""
    stateless: ClassVar[bool] = True
    requirement: ClassVar[str] = "n >= 1"

    def __post_init__(self) -> None:
        check_int(self.n, "n (number of workers)", 1)
        check_int(self.f, "f (number of Byzantine workers)", 0)
        if self.f >= self.n:
            raise ValueError(f"f must be smaller than n; got n={self.n}, f={self.f}")
        if self.n < self.min_workers(self.f):
            raise ValueError(
                f"aggregator {self.name!r} needs {self.requirement}, so at least "
                f"{self.min_workers(self.f)} workers for f={self.f}; got n={self.n}. "
                "Lower f or use more workers."
            )
        self.validate()

    # ---- what a rule defines -----------------------------------------------------------
    @classmethod
    def min_workers(cls, f: int) -> int:
        """Return the smallest ``n`` the rule accepts for ``f`` Byzantine workers."""
        return 1

    def validate(self) -> None:
        """Check the options (raise ValueError/TypeError naming the option)."""
        return None

    @abstractmethod
    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        """Return the [d] aggregate of the checked [n, d] matrix for ``key``."""

    # ---- the common interface ----------------------------------------------------------
    def __call__(self, grads: Tensor, *, key: str = "") -> Tensor:
        """Aggregate ``grads`` ([n, d], one row a worker) into a [d] tensor.

        A rule that keeps state (SafeguardSGD's sums, centered clipping's anchor) keeps it by
        ``key``: tensors of different widths need keys of their own (a layer's name, say), and
        one of another width under a key is refused, naming both widths."""
        check_key(key)
        check_grads(grads, self.n)
        width = self._state_width(key)
        if width is not None and width != grads.shape[1]:
            raise ValueError(
                f"aggregator {self.name!r} holds state of width {width} for key {key!r} (from "
                f"an earlier call or a loaded state) and got gradients of width "
                f"{grads.shape[1]}: it keeps its state by key, so give each tensor its own key, "
                "for example its layer's name"
            )
        return self.aggregate(grads, key)

    def _state_width(self, key: str) -> int | None:
        """The width d of the state this rule keeps for ``key``, or None if it keeps none."""
        for attr in getattr(self, "_per_key", ()):
            held = getattr(self, attr, {}).get(key)
            if isinstance(held, Mapping):
                held = next((t for t in held.values() if isinstance(t, Tensor)), None)
            if isinstance(held, Tensor) and held.dim() >= 1:
                return int(held.shape[-1])
        return None

    def end_step(self) -> None:
        """Close an optimizer step (after the last key of the step)."""
        return None

    def tolerates_none(self) -> bool:
        """True where this rule, as built, takes its protection from ``f`` and ``f`` is 0, so
        that it tolerates no Byzantine worker (a trimmed mean that trims nothing is the mean).
        Rules that protect without ``f`` (the median, centered clipping) return False."""
        return False

    def stats(self) -> dict[str, Any]:
        return {}

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned (a stateless rule keeps nothing); rules
        with state refuse one saved with other settings unless ``strict=False``."""
        check_state(state, f"aggregator {self.name!r}", ())


def check_grads(grads: Tensor, n: int) -> None:
    if not isinstance(grads, Tensor):
        raise TypeError(
            f"gradients must be a torch.Tensor of shape [n, d], got {type(grads).__name__}"
        )
    if grads.dim() != 2:
        raise ValueError(
            f"gradients must have shape [n, d] (one row a worker), got {tuple(grads.shape)}"
        )
    if grads.shape[0] != n:
        raise ValueError(
            f"this aggregator was built for n={n} workers but got {grads.shape[0]} rows"
        )
    if not grads.is_floating_point():
        raise TypeError(f"gradients must be floating point, got {grads.dtype}")


def option_names(cls: type[Aggregator]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("n", "f")]


def build(name: str, n: int, f: int, options: dict[str, Any]) -> Aggregator:
    cls = aggregator_class(name)
    check_options("aggregator", name, options, option_names(cls))
    # NumPy numbers (n=np.int64(7), a count from an array) as Python's, as options are kept
    return cls(n=plain(n), f=plain(f), **plain(dict(options)))


# ---- shared tensor helpers ---------------------------------------------------------------
def work_dtype(t: Tensor) -> Tensor:
    """Return ``t`` in a dtype precise enough for distances and sorting (float32 or wider)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """Return the [n, n] matrix of squared Euclidean distances between the rows of ``x``, in
    float64.

    Computed from the differences, not from the Gram matrix, so near-identical rows do not
    suffer cancellation and the matrix is exactly symmetric with a zero diagonal; and in
    float64, so that one huge row neither overflows the others' distances (rows 1e19 apart are
    1e38 apart squared) nor, scaled down to fit, flushes them to zero (a row of 1e30 beside
    honest rows of order 1 made every honest distance 0 and Krum's choice a tie). The columns
    are taken a block at a time, so the float64 copy is a block, not the matrix. A distance to
    or from a row holding NaN or Inf is Inf or NaN, as is one past float64's range.
    """
    n, d = x.shape
    out = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    block = max(1, (1 << 22) // max(n, 1))  # 32 MiB of float64 a block
    for start in range(0, d, block):
        part = x[:, start : start + block].double()[None]
        dist = torch.cdist(part, part, compute_mode="donot_use_mm_for_euclid_dist")[0]
        out += dist.square()
    return out


def mean_rows(rows: Tensor) -> Tensor:
    """Return the mean of the rows of ``rows`` (dim 0), in their dtype.

    Where their sum overflows while their mean fits (float32 rows near 3.4e38), those
    coordinates are the sum of the rows each divided by their count; elsewhere the plain mean,
    so the bits match ``rows.mean(dim=0)`` wherever that is finite. A coordinate holding NaN or
    Inf stays NaN or Inf.
    """
    mean = rows.mean(dim=0)
    if not bool(torch.isfinite(mean).all()):  # one host sync, a flag, not the rows
        divided = (rows / rows.shape[0]).sum(dim=0)
        mean = torch.where(torch.isfinite(mean), mean, divided)
    return mean


def sorted_rows(x: Tensor) -> Tensor:
    """Sort each coordinate over the workers (dim 0)."""
    return torch.sort(work_dtype(x), dim=0).values


def key_seed(seed: int, step: int, key: str) -> int:
    """Return a 63-bit seed from (seed, step, key), the same in every process."""
    mix = zlib.crc32(f"{seed}:{step}:{key}".encode())
    return (int(seed) * 1_000_003 + int(step) * 7_919 + mix) % (2**63 - 1)


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
