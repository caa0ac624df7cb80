"""The history-less robust aggregation rules: mean, median, trimmed mean, Krum, Multi-Krum and the
geometric median."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    Aggregator,
    check_int,
    check_positive,
    mean_rows,
    pairwise_sq_dists,
    register_aggregator,
    sorted_rows,
)


@register_aggregator("mean")
@dataclass
class Mean(Aggregator):
    """Average the workers' gradients: plain data-parallel SGD, no defence (any ``f``).

    Example:
        >>> Mean(n=2)(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([2., 3.])
    """

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        return mean_rows(grads)


def _norm(v: Tensor) -> Tensor:
    """The Euclidean norm along the last dimension, of each row of a matrix, computed over the
    entries divided by their largest magnitude, so that no square overflows or underflows."""
    top = v.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return torch.linalg.vector_norm(v / top, dim=-1) * top.squeeze(-1)


def coordinate_median(grads: Tensor) -> Tensor:
    """Return the coordinate-wise median (mean of the two middle values when n is even)."""
    n = grads.shape[0]
    s = sorted_rows(grads)
    mid = s[n // 2] if n % 2 else s[n // 2 - 1] / 2 + s[n // 2] / 2  # halved first: no overflow
    return mid.to(grads.dtype)


@register_aggregator("median")
@dataclass
class CoordinateMedian(Aggregator):
    """Take the median of every coordinate over the workers.

    Steps: sort each coordinate over the n workers; take the middle value (the mean of the two
    middle values when n is even). Tolerates f < n/2 (Yin, Chen, Ramchandran, Bartlett,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

    Example:
        >>> CoordinateMedian(n=3, f=1)(torch.tensor([[1.0, 9.0], [2.0, 0.0], [100.0, 1.0]]))
        tensor([2., 1.])
    """

    requirement = "n > 2f"

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 1

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        return coordinate_median(grads)


@register_aggregator("trimmed_mean")
@dataclass
class TrimmedMean(Aggregator):
    """Drop the ``trim`` largest and ``trim`` smallest values of every coordinate; average the rest.

    Steps: sort each coordinate over the workers; average positions ``trim .. n - trim - 1``
    (Yin et al., ICML 2018, coordinate-wise trimmed mean).

    Args:
        trim: values dropped at each end, at least f; None means f. Needs n > 2 * trim.

    Example:
        >>> TrimmedMean(n=4, f=1)(torch.tensor([[0.0], [1.0], [3.0], [50.0]]))
        tensor([2.])
    """

    trim: int | None = None
    requirement = "n > 2f"

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 1

    def validate(self) -> None:
        if self.trim is not None:
            check_int(self.trim, "trim", 0)
            if self.trim < self.f:
                raise ValueError(
                    f"trim={self.trim} is below f={self.f}: f Byzantine values could survive the "
                    f"trim on one side; pass trim >= f, or leave it None (= f)"
                )
            if self.n <= 2 * self.trim:
                raise ValueError(
                    f"trim={self.trim} drops every value of n={self.n} workers; need n > 2*trim"
                )

    def tolerates_none(self) -> bool:
        return not (self.f if self.trim is None else self.trim)

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        b = self.f if self.trim is None else self.trim
        s = sorted_rows(grads)
        return mean_rows(s[b : self.n - b]).to(grads.dtype)


def krum_scores(grads: Tensor, f: int) -> Tensor:
    """Return each worker's Krum score: the sum of squared distances to its n - f - 2 nearest peers.

    A distance to or from a row holding NaN or Inf counts as infinite (NaN would otherwise rank
    first in ``argmin``), so such a row scores infinite and is never chosen.
    """
    n = grads.shape[0]
    d2 = pairwise_sq_dists(grads).nan_to_num(nan=math.inf)
    nearest = torch.sort(d2, dim=1).values[:, 1 : n - f - 1]  # column 0 is the distance to itself
    return nearest.sum(dim=1)


@register_aggregator("krum")
@dataclass
class Krum(Aggregator):
    """Return the gradient of the worker whose n - f - 2 nearest peers are closest.

    Steps: pairwise squared distances; for each worker, the sum over its n - f - 2 nearest
    other workers (its score); output the gradient with the lowest score (the lowest index on a
    tie). Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017. Needs n > 2f + 2.

    Example:
        >>> g = torch.tensor([[0.0], [0.1], [0.2], [0.3], [9.0]])
        >>> Krum(n=5, f=1)(g)
        tensor([0.1000])
    """

    requirement = "n > 2f + 2"

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 3

    def tolerates_none(self) -> bool:
        return self.f == 0

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        return grads[torch.argmin(krum_scores(grads, self.f))].clone()


@register_aggregator("multi_krum")
@dataclass
class MultiKrum(Aggregator):
    """Average the ``m`` gradients with the lowest Krum scores.

    Steps: Krum scores as in :class:`Krum`; keep the ``m`` workers with the lowest scores;
    average them (Blanchard et al., NeurIPS 2017). ``m = 1`` is Krum, ``m = n`` the mean.

    Args:
        m: workers averaged; None means n - f.

    Example:
        >>> g = torch.tensor([[0.0], [0.2], [0.4], [0.6], [9.0]])
        >>> MultiKrum(n=5, f=1, m=3)(g)
        tensor([0.2000])
    """

    m: int | None = None
    requirement = "n > 2f + 2"

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 3

    def validate(self) -> None:
        if self.m is not None:
            check_int(self.m, "m", 1)
            if self.m > self.n:
                raise ValueError(f"m={self.m} exceeds the number of workers n={self.n}")

    def tolerates_none(self) -> bool:
        return self.f == 0

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        m = self.n - self.f if self.m is None else self.m
        scores = krum_scores(grads, self.f)
        chosen = torch.argsort(scores, stable=True)[:m]
        return mean_rows(grads[chosen])


@register_aggregator("geometric_median")
@dataclass
class GeometricMedian(Aggregator):
    """Return the geometric median of the gradients, by Weiszfeld's iterations.

    Steps: start from the coordinate-wise median z; repeat Weiszfeld's step
    T = sum_i w_i x_i / sum_i w_i with w_i = 1 / ||x_i - z|| over the rows z is not on, taken
    whole where z is on no row, and where it is on eta of them (within ``eps``) Vardi and
    Zhang's: z <- (1 - g) T + g z with g = min(1, eta / ||sum_i w_i (x_i - z)||), which leaves
    z on a row only where that row is the geometric median; until z moves less than
    ``tol * ||z||`` or ``max_iter`` iterations (Weiszfeld 1937; Vardi, Zhang, "The multivariate
    L1-median and associated data depth", PNAS 2000; as a Byzantine aggregator: Chen, Su, Xu,
    "Distributed Statistical Machine Learning in Adversarial Settings", 2017; Pillutla,
    Kakade, Harchaoui, "Robust Aggregation for Federated Learning", 2022). A plain Weiszfeld
    step, its weight at a row bounded by 1/eps, stayed on a row it started on or met (one
    the Byzantine rows could place the mean on). Tolerates f < n/2. Rows holding NaN or Inf
    are left out (unless every row does).

    Args:
        max_iter: at most this many Weiszfeld iterations.
        tol: relative change of z that stops the iterations.
        eps: the distance within which z counts as on a row, relative to the rows' spread
            (the median distance of a row from the coordinate-wise median, where z starts).

    Example:
        >>> GeometricMedian(n=3, f=1)(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        tensor([0.2113, 0.2113])
    """

    max_iter: int = 200
    tol: float = 1e-7
    eps: float = 1e-8
    requirement = "n > 2f"

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 1

    def validate(self) -> None:
        check_int(self.max_iter, "max_iter", 1)
        check_positive(self.tol, "tol", allow_zero=True)
        check_positive(self.eps, "eps")

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        x = grads.double() if grads.dtype != torch.float64 else grads
        finite = torch.isfinite(x).all(dim=1)
        if bool(finite.any()) and not bool(finite.all()):
            x = x[finite]  # a row with NaN or Inf has no usable position: it is left out
        z = coordinate_median(x)  # (the mean overflows on two rows of 1e308, and moves with f)
        tiny = torch.finfo(x.dtype).tiny
        # eps is relative to the rows' spread, a typical row's distance from the start: of rows
        # 1e-8 apart, every row was "on" the start with an absolute eps, and z stayed the
        # coordinate-wise median. Every norm is taken without squares that overflow or
        # underflow (_norm): rows 1e160 apart squared to Inf, every weight was zero, and z came
        # back 0; a far Byzantine row's weight went to 0 with it, and its pull was lost.
        spread = _norm(x - z).median() if len(x) else x.new_zeros(())
        eps = (self.eps * spread).clamp_min(tiny)
        for _ in range(self.max_iter):
            dist = _norm(x - z)
            on = dist <= eps
            w = torch.where(on, torch.zeros_like(dist), 1.0 / dist.clamp_min(eps))
            # (every row where z is: no weight, g = 1 below, and z stays, without a sync here)
            step = (w[:, None] * x).sum(dim=0) / w.sum().clamp_min(tiny)
            eta = on.sum().to(x.dtype)
            pull = _norm((w[:, None] * (x - z)).sum(dim=0))
            g = torch.where(eta > 0, torch.clamp(eta / pull.clamp_min(tiny), max=1.0), 0.0)
            z_new = (1 - g) * step + g * z
            moved = _norm(z_new - z)
            z = z_new
            # One host sync an iteration (not an element) to stop early.
            if moved <= self.tol * max(float(_norm(z)), float(eps)):
                break
        return z.to(grads.dtype)
