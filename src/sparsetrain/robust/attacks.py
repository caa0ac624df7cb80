"""Byzantine attacks, registered by name, for experiments with robust aggregation.

A Byzantine worker is an ordinary worker whose gradient is replaced before it is sent. An attack
is called with the gradients the Byzantine workers computed honestly (``own``, one row a worker)
and returns the rows they send. *Omniscient* attacks (``omniscient = True``: ALIE, IPM, the
safeguard attack) also need the honest workers' gradients of the step (``honest``); the
exchange gets them to the attackers first (see ``sparsetrain.sync.robust_exchange``).

``label_flip`` is a data attack: it leaves the gradient alone, and the trainer computes the
Byzantine workers' loss on labels mapped by :meth:`Attack.flip_labels` when ``flips_labels``.

``get_attack("alie", n=10, f=4)`` builds one; ``available_attacks()`` lists the names.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._options import check_options, check_saved_settings, check_state, plain, state_mapping
from .base import (
    check_int,
    check_key,
    check_positive,
    generator_for,
    key_seed,
)

_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str):
    """Class decorator: register an attack under ``name``."""

    def wrap(cls: type[Attack]) -> type[Attack]:
        if name in _ATTACKS and _ATTACKS[name] is not cls:
            raise ValueError(f"attack name {name!r} is already registered by {_ATTACKS[name]}")
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return wrap


def available_attacks() -> list[str]:
    """Return the registered attack names, sorted."""
    return sorted(_ATTACKS)


def check_attack(name: str, options: Mapping[str, Any]) -> type[Attack]:
    """The attack class registered as ``name``, after checking that it takes ``options``.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones).
    """
    if not isinstance(name, str) or name not in _ATTACKS:
        raise ValueError(
            f"unknown attack {name!r}; valid names are: {', '.join(available_attacks())}"
        )
    cls = _ATTACKS[name]
    check_options("attack", name, options, attack_option_names(cls))
    return cls


def attack_option_names(cls: type[Attack]) -> list[str]:
    """The options an attack class takes (its fields but ``n`` and ``f``)."""
    return [x.name for x in dataclasses.fields(cls) if x.init and x.name not in ("n", "f")]


def get_attack(name: str, *, n: int, f: int, **options: Any) -> Attack:
    """Build the attack registered as ``name`` for ``n`` workers of which ``f`` are Byzantine.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones), bad n or f.
    """
    options = plain(options)  # NumPy numbers as Python's (n and f too), as options are kept
    return check_attack(name, options)(n=plain(n), f=plain(f), **options)


@dataclass
class Attack(ABC):
    """Base class of the attacks.

    Args:
        n: number of workers in all.
        f: number of Byzantine workers (they collude).
    """

    n: int
    f: int

    name: ClassVar[str] = ""
    omniscient: ClassVar[bool] = False
    flips_labels: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int(self.n, "n (number of workers)", 1)
        check_int(self.f, "f (number of Byzantine workers)", 0)
        if self.f >= self.n:
            raise ValueError(f"f must be smaller than n; got n={self.n}, f={self.f}")
        self.validate()

    def validate(self) -> None:
        """Check the options (the base class has none)."""
        return None

    @abstractmethod
    def forge(
        self, own: Tensor, honest: Tensor | None, key: str, step: int, workers: Sequence[int]
    ) -> Tensor:
        """Return the rows sent instead of ``own`` ([b, d])."""

    def __call__(
        self,
        own: Tensor,
        *,
        honest: Tensor | None = None,
        key: str = "",
        step: int = 0,
        workers: Sequence[int] | None = None,
    ) -> Tensor:
        """Return what the Byzantine workers send instead of ``own``.

        Args:
            own: the gradients they computed, [b, d] (or [d] for one worker).
            honest: the honest workers' gradients of this step, [h, d]; omniscient attacks need it.
            key: the bucket or tensor name (stateful attacks keep state per key).
            step: the optimizer step (seeds random attacks).
            workers: the Byzantine workers' indices (seeds random attacks per worker); default
                0..b-1.

        Returns:
            A tensor shaped like ``own``.
        """
        check_key(key)
        single = own.dim() == 1
        rows = own[None] if single else own
        if rows.dim() != 2:
            raise ValueError(f"own gradients must be [b, d] or [d], got shape {tuple(own.shape)}")
        if self.omniscient:
            if honest is None or honest.dim() != 2 or honest.shape[0] == 0:
                raise ValueError(
                    f"attack {self.name!r} is omniscient: pass the honest gradients as honest=[h, d]"
                )
            if honest.shape[1] != rows.shape[1]:
                raise ValueError(
                    f"honest rows have {honest.shape[1]} entries, own rows {rows.shape[1]}"
                )
        workers = list(range(rows.shape[0])) if workers is None else list(workers)
        if len(workers) != rows.shape[0]:
            raise ValueError(f"got {len(workers)} worker indices for {rows.shape[0]} rows")
        out = self.forge(rows, honest, key, step, workers)
        return out[0] if single else out

    def refusal(self, own: Tensor, key: str) -> str | None:
        """Why this attack's state refuses to forge ``own`` under ``key`` (None: it does not),
        without changing the state: ``robust_exchange`` asks first, so that the honest ranks
        raise with the attacker instead of waiting for its vector."""
        return None

    def flip_labels(self, y: Tensor, num_classes: int) -> Tensor:
        """Return the labels a Byzantine worker trains on (unchanged unless ``flips_labels``)."""
        return y

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned (a stateless attack keeps nothing); attacks
        with state refuse one saved with other settings unless ``strict=False``."""
        check_state(state, f"attack {self.name!r}", ())


@register_attack("sign_flip")
@dataclass
class SignFlip(Attack):
    """Send the gradient negated and multiplied by ``scale``: -scale * g.

    Args:
        scale: > 0; 1 is the plain sign flip, 10 the -10x flip that breaks the mean.

    Example:
        >>> SignFlip(n=4, f=1, scale=10.0)(torch.tensor([1.0, -2.0]))
        tensor([-10.,  20.])
    """

    scale: float = 1.0

    def validate(self) -> None:
        check_positive(self.scale, "scale")

    def forge(self, own, honest, key, step, workers):
        return own * -self.scale


@register_attack("label_flip")
@dataclass
class LabelFlip(Attack):
    """Train on flipped labels y -> num_classes - 1 - y; send that gradient unchanged.

    A data attack (the SafeguardSGD paper maps CIFAR-10 label l to 9 - l): the trainer checks
    ``flips_labels`` and computes a Byzantine worker's loss on :meth:`flip_labels` of its labels.

    Example:
        >>> LabelFlip(n=4, f=1).flip_labels(torch.tensor([0, 3, 9]), 10)
        tensor([9, 6, 0])
    """

    flips_labels: ClassVar[bool] = True

    def forge(self, own, honest, key, step, workers):
        return own

    def flip_labels(self, y: Tensor, num_classes: int) -> Tensor:
        return num_classes - 1 - y


@register_attack("gaussian")
@dataclass
class Gaussian(Attack):
    """Send random noise N(mean, std^2 I) instead of the gradient.

    Each worker's noise is seeded by (seed, step, key, worker), so a run is reproducible.

    Args:
        std: standard deviation of every entry.
        mean: mean of every entry.
        seed: seed of the noise.
    """

    std: float = 1.0
    mean: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        check_positive(self.std, "std")
        if not isinstance(self.mean, (int, float)) or isinstance(self.mean, bool):
            raise TypeError(f"mean must be a number, got {self.mean!r}")
        if not math.isfinite(self.mean):  # as std: NaN or Inf noise is no Gaussian
            raise ValueError(f"mean must be a finite number, got {self.mean}")
        check_int(self.seed, "seed", 0)

    def forge(self, own, honest, key, step, workers):
        out = torch.empty_like(own)
        for row, worker in enumerate(workers):
            g = generator_for(own.device, key_seed(self.seed * 100_003 + worker, step, key))
            out[row] = torch.randn(own.shape[1], generator=g, device=own.device, dtype=own.dtype)
        return out * self.std + self.mean


@register_attack("zero")
@dataclass
class Zero(Attack):
    """Send a zero gradient (a crashed or lazy worker that still answers)."""

    def forge(self, own, honest, key, step, workers):
        return torch.zeros_like(own)


@register_attack("delayed")
@dataclass
class Delayed(Attack):
    """Send the gradient computed ``delay`` steps ago (the oldest one kept during the first steps).

    The SafeguardSGD paper uses a delay of 1000 iterations on CIFAR-10; history is kept per key,
    so memory is ``delay + 1`` gradients of every Byzantine worker (the newest included).

    Args:
        delay: steps of staleness, >= 1.
    """

    delay: int = 100
    _history: dict[str, deque] = field(default_factory=dict, init=False, repr=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_history",)  # state by bucket key

    def validate(self) -> None:
        check_int(self.delay, "delay", 1)

    def refusal(self, own: Tensor, key: str) -> str | None:
        return self._changed(own[None] if own.dim() == 1 else own, key)  # (as __call__ forges)

    def _changed(self, rows: Tensor, key: str) -> str | None:
        hist = self._history.get(key)
        if hist and hist[-1].shape != rows.shape:
            return (
                f"delayed attack: the gradient of key {key!r} changed shape from "
                f"{tuple(hist[-1].shape)} to {tuple(rows.shape)}"
            )
        return None

    def forge(self, own, honest, key, step, workers):
        refused = self._changed(own, key)
        if refused is not None:  # before it is kept: the history stays whole
            raise ValueError(refused)
        hist = self._history.setdefault(key, deque(maxlen=self.delay + 1))
        hist.append(own.detach().clone())
        return hist[0].to(own.device, copy=True)  # a loaded history (say on CPU) follows own

    def _settings(self) -> dict[str, Any]:
        """What its state records and a load compares."""
        return {"n": self.n, "f": self.f, "delay": self.delay}

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: [t.clone() for t in h] for k, h in self._history.items()},
            "options": plain(self._settings()),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned; a bad state is refused, nothing loaded.

        A history longer than this attack keeps (saved with a longer ``delay``) is refused:
        loading it would drop its oldest gradients. So is one saved with other settings
        (``n``, ``f``, ``delay``: the error names them) unless ``strict=False``.
        """
        owner = "attack 'delayed'"
        check_state(state, owner, ("history",), optional=("options",))
        history = state_mapping(
            state["history"], f"{owner}: the state's 'history'", "{key: list of tensors}"
        )
        loaded = {}
        for key, h in history.items():
            if not isinstance(h, (list, tuple, deque)) or not all(isinstance(t, Tensor) for t in h):
                raise ValueError(
                    f"{owner}: the state's history of key {key!r} must be a list of tensors, "
                    f"got {h!r:.200}"
                )
            if len({tuple(t.shape) for t in h}) > 1:
                raise ValueError(
                    f"{owner}: the state's history of key {key!r} holds tensors of different "
                    f"shapes {sorted({tuple(t.shape) for t in h})}"
                )
            if len(h) > self.delay + 1:
                raise ValueError(
                    f"{owner}: the state's history of key {key!r} holds {len(h)} gradients, "
                    f"more than delay={self.delay} keeps ({self.delay + 1}): it was saved with "
                    f"delay >= {len(h) - 1}; build the attack with the delay it was saved with"
                )
            loaded[str(key)] = deque((t.clone() for t in h), maxlen=self.delay + 1)
        check_saved_settings(state, owner, self._settings(), strict)
        self._history = loaded


def finite_honest(honest: Tensor) -> Tensor:
    """The honest rows without NaN or Inf (all of them where every row has some): an attacker
    who sees the honest gradients would not send a non-finite vector that a rule leaves out,
    and one NaN row had turned every forged row NaN, so that the rule saw f + 1 bad rows."""
    finite = torch.isfinite(honest).all(dim=1)
    return honest[finite] if bool(finite.any()) else honest


def honest_std(honest: Tensor) -> Tensor:
    """The coordinate-wise sample standard deviation (ddof 1) of the honest rows; zeros for
    one row."""
    h = honest.float() if honest.dtype in (torch.float16, torch.bfloat16) else honest
    if h.shape[0] < 2:
        return torch.zeros_like(h[0])
    return h.std(dim=0)


@register_attack("alie")
@dataclass
class ALittleIsEnough(Attack):
    """Send mean - z * std of the honest gradients (coordinate-wise), the same from every attacker.

    Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
    Learning", NeurIPS 2019: with s = floor(n/2 + 1) - f workers needed for a majority,
    z = Phi^{-1}((n - s) / n) is the largest shift that the attackers can make while staying
    closer to the mean than enough honest workers to win a median-based vote. Omniscient.
    The mean and the standard deviation (the sample one, ddof 1) are over the honest rows
    without NaN or Inf; of one honest row, the attackers send it. For small f, z is at most 0
    (n = 10, f = 1: z = 0, the honest mean), as the formula gives.

    Args:
        z: the shift in standard deviations; None computes it from n and f as above.

    Example:
        >>> round(ALittleIsEnough(n=10, f=4).z_value, 4)
        0.8416
    """

    z: float | None = None
    omniscient: ClassVar[bool] = True

    def validate(self) -> None:
        if self.z is not None:
            if (
                not isinstance(self.z, (int, float))
                or isinstance(self.z, bool)
                or not math.isfinite(self.z)
            ):
                raise TypeError(f"z must be a finite number, got {self.z!r}")
            return
        s = math.floor(self.n / 2 + 1) - self.f
        if s < 1:  # (with f = 0 nobody forges: z, -inf for n <= 2, is never used)
            raise ValueError(
                f"ALIE's z = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f, is defined for s >= 1, "
                f"that is f <= floor(n/2); got n={self.n}, f={self.f}: pass z explicitly (the "
                "command line: --option alie.z=Z)"
            )

    @property
    def z_value(self) -> float:
        if self.z is not None:
            return float(self.z)
        s = math.floor(self.n / 2 + 1) - self.f
        return float(torch.special.ndtri(torch.tensor((self.n - s) / self.n, dtype=torch.float64)))

    def forge(self, own, honest, key, step, workers):
        h = finite_honest(honest)
        h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        vec = h.mean(dim=0) - self.z_value * honest_std(h)
        return vec.to(own.dtype).expand_as(own).clone()


@register_attack("ipm")
@dataclass
class InnerProductManipulation(Attack):
    """Send -epsilon times the mean of the honest gradients, the same from every attacker.

    Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation", UAI 2019: a small epsilon (0.1) keeps the vectors close to the honest ones so
    median- and Krum-like rules pick them, while the inner product of the aggregate with the
    true gradient turns negative. Omniscient.

    Args:
        epsilon: > 0.

    Example:
        >>> InnerProductManipulation(n=3, f=1, epsilon=0.5)(
        ...     torch.zeros(1, 2), honest=torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
        tensor([[-0.5000, -0.5000]])
    """

    epsilon: float = 0.1
    omniscient: ClassVar[bool] = True

    def validate(self) -> None:
        check_positive(self.epsilon, "epsilon")

    def forge(self, own, honest, key, step, workers):
        vec = -self.epsilon * finite_honest(honest).mean(dim=0)
        return vec.to(own.dtype).expand_as(own).clone()


@register_attack("safeguard")
@dataclass
class SafeguardAttack(InnerProductManipulation):
    """Send the honest mean negated and rescaled, -scale * mean (the "safeguard attack").

    Allen-Zhu, Ebrahimian, Li, Alistarh (ICLR 2021), Section 5: "Byzantine workers send negative
    but re-scaled gradient", an instance of the inner-product attack tuned against SafeguardSGD:
    a scale of 0.4 (0.5 in their appendix) keeps the attackers' accumulations within the
    safeguard's thresholds, so they are not removed while they slow descent. Omniscient; the
    vector equals ``ipm`` with epsilon = scale, under the paper's name and default.

    Args:
        scale: > 0, the paper's re-scale factor.
    """

    epsilon: float = field(default=0.4, init=False, repr=False)
    scale: float = 0.4

    def validate(self) -> None:
        check_positive(self.scale, "scale")
        self.epsilon = float(self.scale)
