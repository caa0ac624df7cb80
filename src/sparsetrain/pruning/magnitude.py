"""Magnitude pruners: unstructured (global or per layer), structured by channel, and N:M.

All three rank weights by size alone (Han et al., 2015; Zhu & Gupta, 2017; Li et al., 2017;
Mishra et al., 2021), so they need no data and give the same masks on every rank by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from .base import Closure, Pruner, ScheduledPruner, register_pruner
from .masks import Masks, check_nm, check_sparsity, masks, nm_shape_problem


def transposed_groups(pruner: Pruner) -> dict[str, int]:
    """The pruned weights of transposed convolutions, by name, with their ``groups``: such a
    weight is stored ``(in, out / groups, *kernel)``, its output channels along dimension 1."""
    found = {}
    modules = [
        m for m in pruner._model.modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)
    ]
    for name, w in pruner._weights.items():
        for m in modules:
            if m.weight is w:
                found[name] = m.groups
    return found


def as_conv(w: Tensor, groups: int) -> Tensor:
    """A transposed convolution's weight (or mask) ``(in, out / groups, *kernel)`` laid out as a
    convolution's, ``(out, in / groups, *kernel)``: output channels along dimension 0, each
    with the input channels of its group along dimension 1."""
    c_in, per_group, kernel = w.shape[0], w.shape[1], w.shape[2:]
    grouped = w.reshape(groups, c_in // groups, per_group, *kernel).transpose(1, 2)
    return grouped.reshape(groups * per_group, c_in // groups, *kernel)


def from_conv(m: Tensor, groups: int, shape) -> Tensor:
    """The inverse of :func:`as_conv` for a tensor of the original ``shape``."""
    c_in, per_group, kernel = shape[0], shape[1], shape[2:]
    grouped = m.reshape(groups, per_group, c_in // groups, *kernel).transpose(1, 2)
    return grouped.reshape(shape)


def by_channels(pruner: Pruner, weights: Mapping[str, Tensor], compute) -> Masks:
    """``compute(weights, previous)``, with transposed convolutions' weights and previous masks
    laid out as convolutions' (:func:`as_conv`), and its masks back in the weights' layout."""
    groups = transposed_groups(pruner)
    if not groups:
        return compute(weights, pruner._masks)

    def conv(ts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: as_conv(t, groups[n]) if n in groups else t for n, t in ts.items()}

    out = compute(conv(weights), conv(pruner._masks) if pruner._masks else pruner._masks)
    return {
        n: from_conv(m, groups[n], weights[n].shape).contiguous() if n in groups else m
        for n, m in out.items()
    }


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
    """Prune whole output channels (rows of linear weights, convolution filters; a transposed
    convolution's along its weight's dimension 1) by L2 norm."""

    def on_prepare(self) -> None:
        # At prepare(), not at the first scheduled prune, which may be many steps later.
        flat = {n: tuple(w.shape) for n, w in self._weights.items() if w.dim() < 2}
        if flat:
            raise ValueError(
                "structured pruning needs weights with an output dimension (2-D or more); "
                + ", ".join(f"{n!r} has shape {s}" for n, s in flat.items())
                + ": leave them out of params"
            )

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        return by_channels(
            self,
            self._weights,
            lambda ws, prev: masks(ws, sparsity, "structured", self.scope, previous=prev),
        )


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
        self.n, self.m = check_nm(self.n, self.m)
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
        groups = transposed_groups(self)
        for name, w in self._weights.items():
            if name in groups:  # its input channels, of a group, along dimension 0
                per_group = w.shape[0] // groups[name]
                problem = per_group % self.m and (
                    f"N:M pruning groups the input channels of {name!r} (a transposed "
                    f"convolution's weight, shape {tuple(w.shape)}: {per_group} input channels "
                    f"a group along dimension 0) by m={self.m}, but {per_group} is not "
                    f"divisible by {self.m}"
                )
            else:
                problem = nm_shape_problem(name, w.shape, self.m)
            if problem:
                raise ValueError(f"{problem}; leave it out with params=[...]")

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        # Along the schedule, the N nearest its level (the final one exact): rounded down, as
        # for a sparsity asked once, a cubic schedule's first level, 0.29, went 4:4 -> 2:4 at once.
        n = max(self.n, min(self.m, math.floor((1.0 - sparsity) * self.m + 0.5)))
        return by_channels(
            self,
            self._weights,
            lambda ws, prev: masks(
                ws, 1.0 - n / self.m, "nm", self.scope, previous=prev, n=n, m=self.m
            ),
        )
