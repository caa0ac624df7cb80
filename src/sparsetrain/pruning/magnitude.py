"""Magnitude pruners: unstructured (global or per layer), structured by channel, and N:M.

All three rank weights by size alone (Han et al., 2015; Zhu & Gupta, 2017; Li et al., 2017;
Mishra et al., 2021), so they need no data and give the same masks on every rank by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Closure, ScheduledPruner, register_pruner
from .masks import Masks, check_nm, check_sparsity, masks, nm_shape_problem


@register_pruner("magnitude")
@dataclass
class MagnitudePruner(ScheduledPruner):
    """Prune the smallest ``|w|``, over all selected weights (global) or in each layer.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> pruner = MagnitudePruner(sparsity=0.5, scope="layer").prepare(model)
        >>> pruner.prune()["0.weight"].sum().item()  # 32 of 64 kept
        32
    """

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        return masks(self._weights, sparsity, "magnitude", self.scope, previous=self._masks)


@register_pruner("structured")
@dataclass
class StructuredPruner(ScheduledPruner):
    """Prune whole output channels (rows of linear weights, convolution filters) by L2 norm."""

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        return masks(self._weights, sparsity, "structured", self.scope, previous=self._masks)


@register_pruner("nm")
@dataclass
class NMPruner(ScheduledPruner):
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension (2:4 by
    default): a linear weight's rows, a convolution's input channels at each kernel position.

    ``sparsity`` is ``1 - n/m`` and is set from ``n`` and ``m``. Along a gradual schedule the
    pattern tightens in steps (4:4, 3:4, 2:4), each the N:M nearest the scheduled sparsity
    (so a step may prune a little less or more than the schedule's level), ending at ``n:m``.

    Args:
        n, m: keep ``n`` in every group of ``m``; the input dimension (dimension 1) of every
            pruned weight must be divisible by ``m``.
    """

    n: int = 2
    m: int = 4
    sparsity: float | None = None  # type: ignore[assignment]  (derived from n and m)

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        if self.n == self.m:
            raise ValueError(f"n={self.n} of m={self.m} keeps every weight; use n < m")
        implied = 1.0 - self.n / self.m
        if self.sparsity is not None and abs(check_sparsity(self.sparsity) - implied) > 1e-9:
            raise ValueError(
                f"N:M {self.n}:{self.m} means sparsity {implied:g}, but sparsity={self.sparsity} "
                "was given; leave sparsity out or make it 1 - n/m"
            )
        self.sparsity = implied
        super().__post_init__()

    def on_prepare(self) -> None:
        for name, w in self._weights.items():
            problem = nm_shape_problem(name, w.shape, self.m)
            if problem:
                raise ValueError(f"{problem}; leave it out with params=[...]")

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        # Along the schedule, the N nearest its level (the final one exact): rounded down, as
        # for a sparsity asked once, a cubic schedule's first level, 0.29, went 4:4 -> 2:4 at once.
        n = max(self.n, min(self.m, math.floor((1.0 - sparsity) * self.m + 0.5)))
        return masks(
            self._weights, 1.0 - n / self.m, "nm", self.scope, previous=self._masks, n=n, m=self.m
        )
