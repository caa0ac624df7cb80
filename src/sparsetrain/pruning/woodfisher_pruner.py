"""The WoodFisher pruner: Fisher samples from a closure, saliency, OBS update, on a schedule."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from .._options import caller_stacklevel
from .base import (
    Closure,
    ScheduledPruner,
    _distributed,
    broadcast_tensors,
    check_finite,
    check_flag,
    closure_loss,
    dense,
    register_pruner,
)
from .masks import Masks, _warn_collapsed
from .woodfisher import (
    DEFAULT_MAX_MEMORY,
    BlockLayout,
    check_block_memory,
    init_inverse,
    woodbury_update_,
    woodfisher_prune,
)


def _running_stats(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, dict]]:
    """The running statistics of ``model``'s normalisation layers (BatchNorm's), copied."""
    return {
        name: (m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for name, m in model.named_modules()
        if isinstance(m, _NormBase) and m.track_running_stats
    }


def _restore_running_stats(saved: dict[str, tuple[torch.nn.Module, dict]]) -> None:
    """Put back the statistics that the closure's forward passes moved (a model in training
    mode), and warn, naming the layers: one-example forwards had overwritten what training
    gathered, and normalised by each sample's own statistics."""
    moved = []
    with torch.no_grad():
        for name, (m, buffers) in saved.items():
            now = dict(m.named_buffers(recurse=False))
            if any(not torch.equal(now[k], b) for k, b in buffers.items() if k in now):
                moved.append(name)
                for k, b in buffers.items():
                    now[k].copy_(b)
    if moved:
        warnings.warn(
            "woodfisher: the closure's forward passes ran in training mode and moved the running "
            f"statistics of {', '.join(map(repr, moved[:5]))}{' ...' if len(moved) > 5 else ''}"
            " (restored now), and its samples were normalised by their own statistics; call "
            "model.eval() before the pruning step (or inside the closure) and model.train() after",
            stacklevel=caller_stacklevel(os.path.dirname(__file__)),
        )


@register_pruner("woodfisher")
@dataclass
class WoodFisherPruner(ScheduledPruner):
    """Prune by the WoodFisher saliency and update the kept weights (Singh & Alistarh, 2020).

    At every pruning step of the schedule: call ``closure`` ``fisher_samples`` times, each on a
    fresh sample or micro-batch, and back-propagate its loss; gather these gradients from every
    rank (when torch.distributed is initialised), fold them into block-diagonal inverse Fisher
    matrices by rank-1 Woodbury updates, prune the weights with the lowest
    ``w^2 / (2 [F^-1]_qq)`` and apply the joint OBS update within each block (see
    :mod:`sparsetrain.pruning.woodfisher`). Rank 0's weights and masks are then broadcast.

    For per-rank samples under DDP, make the closure run the unwrapped module
    (``ddp.module``): running the DDP wrapper averages every sample over the ranks first.

    Args:
        fisher_samples: gradient samples per rank and pruning step (the Fisher averages over
            ``fisher_samples * world_size``). A closure on one example gives the per-sample
            empirical Fisher; on a micro-batch, the micro-batch Fisher.
        block_size: weights per Fisher block; the inverses take ``num_blocks * block_size^2 *
            4`` bytes, and a step works through them in slices of ``woodfisher.CHUNK_BYTES``.
        damping: ``lambda`` added to the Fisher's diagonal.
        obs_update: apply the OBS update of the kept weights; False gives the diagonal, OBD-like
            variant (same statistic, weights only masked).
        max_memory_bytes: refuse a block size whose inverses need more.
        chunk: samples gathered across ranks per collective.

    Example:
        >>> pruner = WoodFisherPruner(sparsity=0.9, fisher_samples=256, block_size=64)
        >>> pruner.prepare(model)  # doctest: +SKIP
        >>> batches = iter(one_example_loader)  # doctest: +SKIP
        >>> pruner.prune(closure=lambda: loss_fn(model(*next(batches)[:1]), ...))  # doctest: +SKIP
    """

    needs_gradients: ClassVar[bool] = True
    may_differ_on_load: ClassVar[tuple[str, ...]] = (
        *ScheduledPruner.may_differ_on_load,
        "max_memory_bytes",
        "chunk",
    )

    fisher_samples: int = 256
    block_size: int = 128
    damping: float = 1e-4
    obs_update: bool = True
    max_memory_bytes: int = DEFAULT_MAX_MEMORY
    chunk: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("fisher_samples", "block_size", "chunk", "max_memory_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not (math.isfinite(self.damping) and self.damping > 0)
        ):
            raise ValueError(
                f"damping must be a positive number (and finite), got {self.damping!r}"
            )
        check_flag("obs_update", self.obs_update)

    def on_prepare(self) -> None:
        self._layout = BlockLayout.of(self._weights, self.block_size)
        check_block_memory(self._layout, self.max_memory_bytes)

    def inverse_fisher(self, closure: Closure) -> Tensor:
        """Return the ``(num_blocks, B, B)`` inverse Fisher from ``fisher_samples`` closure calls."""
        self._refuse_frozen(
            self._weights, "unfreeze them before the pruning steps", everywhere=True
        )
        world = dist.get_world_size(self._group) if _distributed() else 1
        total = self.fisher_samples * world
        params = list(self._weights.values())
        every = list(self._model.parameters())  # the closure's backward touches them all
        saved = [p.grad for p in every]
        stats = _running_stats(self._model)
        finv = init_inverse(self._layout.num_blocks, self.block_size, self.damping, params[0])
        pending: list[Tensor] = []
        try:
            for i in range(self.fisher_samples):
                for p in every:  # None, not zero: backward would accumulate into the saved ones
                    p.grad = None
                with torch.enable_grad():
                    closure_loss(closure, "woodfisher").backward()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                pending.append(self._layout.to_blocks([dense(g).detach().float() for g in grads]))
                if len(pending) == self.chunk or i == self.fisher_samples - 1:
                    samples = self._gather(torch.stack(pending))
                    check_finite([samples], "woodfisher", "the Fisher's gradient samples")
                    woodbury_update_(finv, samples, total)
                    pending = []
        finally:
            for p, g in zip(every, saved):
                p.grad = g
            _restore_running_stats(stats)
        return finv

    def _gather(self, samples: Tensor) -> Tensor:
        if not _distributed():
            return samples
        out = [torch.empty_like(samples) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(out, samples.contiguous(), group=self._group)
        return torch.cat(out)

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        if closure is None:
            raise ValueError(
                "the woodfisher pruner needs closure=: a function that runs the model on a fresh "
                "sample (or micro-batch) and returns its loss, for the Fisher's gradient samples"
            )
        finv = self.inverse_fisher(closure)
        keep, new = woodfisher_prune(
            self._weights,
            None,  # type: ignore[arg-type]  (finv is given)
            sparsity,
            self.scope,
            block_size=self.block_size,
            damping=self.damping,
            obs=self.obs_update,
            previous=self._masks,
            max_memory_bytes=self.max_memory_bytes,
            finv=finv,
        )
        if self.scope == "global":  # as masks() warns for the other methods
            _warn_collapsed(keep, self._masks, sparsity, "woodfisher")
        with torch.no_grad():
            for n, p in self._weights.items():
                p.copy_(new[n])
            broadcast_tensors(list(self._weights.values()), self._group)
        return keep

    def stats(self) -> dict[str, Any]:
        return super().stats() | {
            "num_blocks": self._layout.num_blocks if self._model is not None else None,
            "block_size": self.block_size,
        }
