"""RigL: dynamic sparse training that drops by magnitude and regrows by gradient.

Evci et al. (2020), "Rigging the Lottery: Making All Tickets Winners". Steps:

1. ``prepare``: every layer starts sparse with a random mask; the per-layer densities are uniform
   (``1 - sparsity`` each) or Erdos-Renyi-Kernel (ERK), where a layer's density is proportional
   to ``sum(shape) / prod(shape)``, scaled so the total matches ``sparsity``; layers that would
   exceed density 1 are made dense and the others rescaled. These masks zero the weights (and
   their optimizer state) at the first forward pass of the model, or at ``step``, ``apply`` or
   ``finalize`` if one comes first, not in ``prepare`` itself: a state loaded right after
   ``prepare`` (a resumed run) replaces them before any weight it keeps is lost.
2. Every ``delta_t`` steps before ``end``: the update fraction is
   ``f(t) = alpha / 2 * (1 + cos(pi * t / end))``; in each layer with ``a`` active weights, drop
   the ``k = floor(f(t) * a)`` active weights of smallest ``|w|`` and grow the ``k`` inactive ones
   (after the drop) of largest dense gradient ``|g|``. Newly grown weights start at zero, with
   zero optimizer state (a zero state is a fresh one for SGD's momentum and Adam's moments, not
   for Rprop's step sizes). A weight dropped and grown again in the same update is not new: it
   keeps its value and state, as in the authors' implementation. The number of active weights
   per layer never changes. The optimizer step of an update step is taken as at any other (the
   paper's Algorithm 1 skips it); the update follows it.

The dense gradient is that of the step's own backward pass, captured by the gradient hook
before masking (averaged over the process group when torch.distributed is initialised); or,
when a ``closure`` is passed to :meth:`step`, that of one extra backward pass on its loss.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .._options import caller_stacklevel, is_integer
from .base import (
    Closure,
    Pruner,
    _distributed,
    check_finite,
    closure_loss,
    dense,
    optimizer_state,
    register_pruner,
)
from .masks import Masks, check_sparsity

DISTRIBUTIONS = ("erk", "uniform")


def erk_densities(shapes: dict[str, torch.Size], sparsity: float) -> dict[str, float]:
    """Return Erdos-Renyi-Kernel densities that keep ``1 - sparsity`` of all weights overall.

    Example:
        >>> d = erk_densities({"a": torch.Size([100, 10]), "b": torch.Size([10, 10])}, 0.5)
        >>> d["b"] > d["a"]
        True
    """
    sparsity = check_sparsity(sparsity)  # (1 gave every layer density 0)
    shapes = {n: torch.Size(s) for n, s in shapes.items()}  # (a tuple or list too)
    empty = [n for n, s in shapes.items() if s.numel() == 0]  # (nothing to keep: dense)
    shapes = {n: s for n, s in shapes.items() if s.numel()}
    numel = {n: s.numel() for n, s in shapes.items()}
    raw = {n: sum(s) / s.numel() for n, s in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):  # (all dense: at sparsity 0, by a rounding of eps)
        # Weights the sparse layers must hold once the dense layers hold all of theirs.
        budget = (1.0 - sparsity) * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / divisor
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense or n in empty else eps * raw[n] for n in [*shapes, *empty]}


@register_pruner("rigl")
@dataclass
class RigLPruner(Pruner):
    """Train sparse from the start, moving connections every ``delta_t`` steps (RigL).

    Args:
        distribution: per-layer densities, ``"erk"`` or ``"uniform"``.
        delta_t: steps between connectivity updates.
        alpha: the initial update fraction (decays to 0 by ``end`` along a cosine).
        end: the step after which the masks stay fixed.
        seed: seed of the random initial masks (the same on every rank), an integer >= 0.

    The initial masks take effect at the first forward pass (see the module docstring), so
    ``prepare`` then ``load_state_dict`` resumes as exactly as the other order.

    Example:
        >>> pruner = RigLPruner(sparsity=0.9, delta_t=100, end=3000)
        >>> pruner.prepare(model, optimizer)  # doctest: +SKIP
    """

    # The seed and distribution only draw the initial masks, which a loaded state replaces.
    may_differ_on_load: ClassVar[tuple[str, ...]] = (
        *Pruner.may_differ_on_load,
        "seed",
        "distribution",
    )
    defers_initial_masks: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True

    distribution: str = "erk"
    delta_t: int = 100
    alpha: float = 0.3
    end: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )
        for name in ("delta_t", "end"):
            v = getattr(self, name)
            if not is_integer(v, 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            setattr(self, name, operator.index(v))  # (a NumPy integer as an int)
        if self.delta_t >= self.end:
            raise ValueError(
                f"delta_t ({self.delta_t}) must be smaller than end ({self.end}): RigL moves "
                "connections every delta_t steps before end, so it would never move one"
            )
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, numbers.Real)
            or not 0 < self.alpha <= 1
        ):
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        self.alpha = float(self.alpha)  # (a NumPy float as a float, as the state saves it)
        if not is_integer(self.seed, 0) or not operator.index(self.seed) < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        self.seed = operator.index(self.seed)

    def densities(self) -> dict[str, float]:
        """Return the density of every pruned layer."""
        shapes = {n: w.shape for n, w in self._weights.items()}
        if self.distribution == "uniform":
            return {n: 1.0 - self.sparsity for n in shapes}
        return erk_densities(shapes, self.sparsity)

    def on_prepare(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        for n, d in self.densities().items():
            w = self._weights[n]
            keep = max(1, min(w.numel(), int(round(d * w.numel()))))
            flat = torch.zeros(w.numel(), dtype=torch.bool)
            flat[torch.randperm(w.numel(), generator=gen)[:keep]] = True
            self._masks[n] = flat.view(w.shape).to(w.device)
        self.sync_masks()

    def update_fraction(self, step: int) -> float:
        """Return ``alpha / 2 * (1 + cos(pi * step / end))``."""
        return self.alpha / 2 * (1 + math.cos(math.pi * min(step, self.end) / self.end))

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end and step % self.delta_t == 0

    def step(self, step: int, closure: Closure | None = None) -> bool:
        if is_integer(step) and 0 <= operator.index(step) < self._step:
            # (alike on every rank: each passes its loop's index)
            raise ValueError(
                f"step {operator.index(step)} comes before step {self._step}, which this pruner "
                "has taken: RigL's updates follow the optimizer step's index, which only grows "
                "(a resumed run goes on from the loaded state's step + 1); a repeated index "
                "changes nothing"
            )
        changed = super().step(step, closure)
        self._arm_capture()
        return changed

    def prepare(self, model, optimizer=None, group=None, sync=None) -> RigLPruner:
        super().prepare(model, optimizer, group, sync)
        self._arm_capture()  # attached, or resumed, right before an update step
        return self

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        super().load_state_dict(state, strict)
        self._arm_capture()  # a checkpoint taken right before an update step

    def _arm_capture(self) -> None:
        """Capture the dense gradient of the next backward pass only when the step after the
        last one seen (``self._step``) will use it."""
        self._stash = self.is_update_step(self._step + 1)
        if not self._stash:
            self._dense_grads = {}

    def update(self, step: int, closure: Closure | None) -> bool:
        if not self.is_update_step(step):
            return False
        grads = self._dense_gradients(step, closure)
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            # The backward before this step overflowed (under AMP, GradScaler skips its
            # optimizer step): its scores would grow connections at random. The same on every
            # rank, after the average.
            self._dense_grads = {}
            warnings.warn(
                f"rigl: the dense gradients of step {step} hold NaN or Inf (an overflowed "
                "backward, as torch.amp.GradScaler skips); the masks are not updated at this step",
                stacklevel=caller_stacklevel(),  # the user's pruner.step(...)
            )
            return False
        new = self.compute_masks(grads, self.update_fraction(step))
        grown = {n: new[n] & ~self._masks[n] for n in new}
        with torch.no_grad():
            for n, w in self._weights.items():
                w.masked_fill_(grown[n], 0.0)
                # ... with zero optimizer state too: a gradient that reached them while they
                # were pruned (mask_gradients=False, or a hook that makes the average dense)
                # left momentum there, which _apply clears only where weights are pruned.
                for v in optimizer_state(self._optimizer, w):
                    v.masked_fill_(grown[n], 0)
        self._num_updates += 1
        self._dense_grads = {}
        before = dict(self._masks)  # (the tensors: _assign_masks replaces, never writes them)
        # Rank 0's masks on every rank first, then whether they changed (alike everywhere).
        self._assign_masks(new, clear=False)
        changed = any(not torch.equal(before[n], m) for n, m in self._masks.items())
        if changed:
            self._clear_sync()
        return changed

    def compute_masks(self, grads: dict[str, Tensor], fraction: float) -> Masks:
        """Drop the smallest active ``|w|`` and grow the largest inactive ``|g|`` in every layer."""
        out = {}
        for n, w in self._weights.items():
            mask = self._masks[n].reshape(-1)
            active = int(mask.sum())
            k = int(math.floor(fraction * active))
            if k == 0 or active == mask.numel():
                out[n] = self._masks[n].clone()
                continue
            # Drop: the k active weights of smallest magnitude.
            mag = w.detach().reshape(-1).abs().masked_fill(~mask, float("inf"))
            drop = torch.topk(mag, k, largest=False).indices
            after = mask.clone()
            after[drop] = False
            # Grow: the k inactive weights (after the drop) of largest gradient magnitude.
            score = grads[n].reshape(-1).abs().float().masked_fill(after, float("-inf"))
            grow = torch.topk(score, k).indices
            after[grow] = True
            out[n] = after.view_as(w)
        return out

    def _dense_gradients(self, step: int, closure: Closure | None) -> dict[str, Tensor]:
        # Armed: the hook was capturing during this step's backward (pruner.step of the step
        # before, prepare or a load armed it), or a closure gives a backward of its own.
        armed = closure is not None or self._stash
        self._refuse_frozen(self._weights, "unfreeze them before the update steps", everywhere=True)
        if closure is not None:
            params = list(self._model.parameters())  # the closure's backward touches them all
            saved = [p.grad for p in params]
            for p in params:  # None, not zero: backward would accumulate into the saved ones
                p.grad = None
            self._stash, self._dense_grads = True, {}
            try:
                with torch.enable_grad():
                    closure_loss(closure, "rigl").backward()
            finally:
                self._stash = False
                for p, g in zip(params, saved):
                    p.grad = g
        names = list(self._weights)
        # A weight the step's backward did not reach (a layer unused on this rank, under
        # DDP's find_unused_parameters) has a zero gradient, as DDP averages it. Each rank
        # says in the allreduce whether it captured none at all and whether it was capturing,
        # so that every rank raises alike where a rank was not (its pruner.step of the step
        # before was skipped: its zeros would be averaged in) or none captured any.
        none = not any(n in self._dense_grads for n in names)
        grads = [
            dense(self._dense_grads[n]).detach().float()
            if n in self._dense_grads
            else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for n, w in self._weights.items()
        ]
        unarmed: list[int] = []
        if _distributed():
            world = dist.get_world_size(self._group)
            flags = torch.zeros(world + 1, device=grads[0].device)
            flags[0] = float(none)
            flags[1 + dist.get_rank(self._group)] = float(not armed)
            flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
            dist.all_reduce(flat, group=self._group)
            flags = flat[-(world + 1) :].tolist()
            none = int(flags[0]) == world
            unarmed = [r for r, f in enumerate(flags[1:]) if f]
            flat = flat[: -(world + 1)] / world
            grads = list(flat.split([g.numel() for g in grads]))
        if unarmed and not none:
            raise ValueError(
                f"RigL update at step {step}: rank(s) {unarmed} of the group captured no "
                "dense gradient (their pruner.step was not called after the optimizer step "
                "before this one), and the other ranks did; call pruner.step(i) after every "
                "optimizer step on every rank, or pass closure= returning a loss"
            )
        if none:
            raise ValueError(
                f"RigL update at step {step} has no dense gradient for any weight: call "
                "pruner.step(i) after every optimizer step (the hook captures the gradient of the "
                "backward before an update step), or pass closure= returning a loss"
            )
        if closure is not None:  # (a training step's are as training made them)
            check_finite(grads, "rigl", "the closure's dense gradients that choose regrowth")
        return {n: g.view(self._weights[n].shape) for n, g in zip(names, grads)}

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"next_fraction": self.update_fraction(max(self._step, 0) + 1)}
