"""Random-k sparsification with indices shared by all ranks, so payloads can be summed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import register_compressor
from .base import (
    Compressor,
    Payload,
    TensorMeta,
    check_density,
    check_floating,
    check_int,
    k_for,
    load_step_counters,
    seeded_generator,
    step_counter_state,
)


def sample_without_replacement(n: int, k: int, gen: torch.Generator, device) -> Tensor:
    """Return ``k`` distinct indices in ``[0, n)``, uniformly over k-subsets, sorted (int64).

    For ``k <= n / 4``: draw somewhat more than k indices with replacement, deduplicate
    (``torch.unique``, O(k log k)), and keep a uniformly random k of the distinct ones (a random
    permutation of about k); redraw in the rare case of too few. Every step is symmetric in the
    n indices, so the k-subset is uniform. For denser draws a ``randperm(n)`` prefix (O(n)) is
    cheaper than rejection. Never O(n log n).
    """
    if k >= n:
        return torch.arange(n, device=device)
    if 4 * k > n:
        return torch.randperm(n, generator=gen, device=device)[:k].sort().values
    # Expected duplicates among m draws are about m^2 / (2n); add a margin of a few std devs.
    m = k + math.ceil(k * k / n * 1.5) + 4 * math.isqrt(k) + 16
    while True:
        distinct = torch.unique(torch.randint(n, (m,), generator=gen, device=device))
        if distinct.numel() >= k:
            keep = torch.randperm(distinct.numel(), generator=gen, device=device)[:k]
            return distinct[keep].sort().values
        m = 2 * m


@register_compressor("randomk")
@dataclass
class RandomK(Compressor):
    """Send k = density * numel entries chosen at random, the same ones on every rank.

    Steps, per ``key``:

    1. Draw k distinct indices from a CPU generator seeded by ``(seed, key, step)`` and copy
       them to the tensor's device; every rank draws the same ones (ranks must use the same
       ``seed``), so the payloads line up.
    2. Send the values there as they are.
    3. Decompress scatters the (summed) values back to the indices held in ``ctx``, scaled by
       ``numel / k`` when ``scale`` is on: each entry is kept with probability k / numel, so the
       scaled sparse vector is an unbiased estimate of the gradient (Wangni et al.). The scaling
       is done in (at least) float32 after the sum, so half-precision payloads do not overflow
       on the wire.

    Because the indices agree, the payload is a dense vector of k values that goes through a
    plain allreduce (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018; Wangni et al.,
    "Gradient Sparsification for Communication-Efficient Distributed Optimization", 2018). At
    density 1.0 it sends everything, unscaled: lossless.

    Args:
        density: fraction of entries sent, in (0, 1].
        seed: seeds the index draws; the same on every rank.
        scale: scale by ``numel / k`` (unbiased, the default). False keeps the values as they
            are: random-k with memory (Stich et al.), which error feedback needs; with the
            scaling, error feedback would keep (1 - numel / k) times every sent value and
            diverge, so the sync layer refuses that pairing.

    Example:
        >>> c = RandomK(density=0.25)
        >>> (vals,), ctx = c.compress(torch.arange(8.0), key="w")
        >>> vals.numel()
        2
    """

    linear: ClassVar[bool] = True  # the values as they are, at indices that agree

    density: float = 0.01
    seed: int = 0
    scale: bool = True
    _steps: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_steps",)  # state by bucket key
    counts_steps: ClassVar[bool] = True

    @classmethod
    def biased_with(cls, options: Mapping[str, Any]) -> bool:
        """Unscaled (``scale=False``) random-k sends k / numel of the gradient on average."""
        return options.get("scale", True) is False

    def __post_init__(self) -> None:
        check_density(self.density)
        check_int(self.seed, "seed", 0)
        if not isinstance(self.scale, bool):
            raise TypeError(f"scale must be True or False, got {self.scale!r}")

    def compress(
        self, t: Tensor, *, key: str = "", layout=None
    ) -> tuple[Payload, tuple[TensorMeta, Tensor]]:
        check_floating(t)
        flat = t.reshape(-1)
        n = flat.numel()
        k = k_for(n, self.density)
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        # Drawn on the CPU: which number a CUDA generator gives to which element depends on the
        # GPU's number of SMs for large draws, so ranks on different GPU models (or MIG slices)
        # would pick different indices and sum values from different positions.
        cpu = torch.device("cpu")
        idx = sample_without_replacement(n, k, seeded_generator(self.seed, key, step, cpu), cpu)
        idx = idx.to(flat.device)
        values = torch.index_select(flat, 0, idx)
        return (values,), (TensorMeta.of(t), idx)

    def decompress(self, payload: Payload, ctx: tuple[TensorMeta, Tensor]) -> Tensor:
        return self._decode(payload, ctx, ctx[0].dtype)

    def decompress_sum(self, payload: Payload, ctx: tuple[TensorMeta, Tensor]) -> Tensor:
        """As :meth:`decompress`, in float32 for half gradients: the ranks' scaled sum can pass
        float16's range where their average does not."""
        return self._decode(payload, ctx, torch.promote_types(ctx[0].dtype, torch.float32))

    def _decode(
        self, payload: Payload, ctx: tuple[TensorMeta, Tensor], dtype: torch.dtype
    ) -> Tensor:
        meta, idx = ctx
        values = payload[0]
        if self.scale and idx.numel() < meta.numel:
            wide = torch.promote_types(values.dtype, torch.float32)
            values = values.to(wide) * (meta.numel / idx.numel())
        out = torch.zeros(meta.numel, dtype=dtype, device=meta.device)
        out.index_copy_(0, idx, values.to(dtype))
        return out.view(meta.shape)

    def state_dict(self) -> dict[str, Any]:
        """Return the per-key step counters (they select the next draws)."""
        return step_counter_state(self.name, self._steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counters; the next draws are those of the saved run."""
        self._steps = load_step_counters(state, self.name)
