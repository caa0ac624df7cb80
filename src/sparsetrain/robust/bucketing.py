"""Bucketing: average random groups of workers before a robust rule (Karimireddy, He, Jaggi, 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._options import check_options, check_saved_settings, check_state, plain, state_int
from .base import (
    Aggregator,
    aggregator_class,
    build,
    check_int,
    key_seed,
    option_names,
    register_aggregator,
)


@register_aggregator("bucketing")
@dataclass
class Bucketing(Aggregator):
    """Shuffle the workers, average them in buckets of ``bucket_size``, apply ``base`` to the buckets.

    Steps: draw a permutation of the n workers from (seed, step) — the same on every rank and for
    every key of a step; split it into ceil(n / s) buckets of s workers (the last may be smaller);
    average each bucket; aggregate the bucket means with the base rule built for
    n' = ceil(n / s) inputs and the same f (at most f buckets hold a Byzantine worker).
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
    ICLR 2022. Averaging shrinks the honest spread, so distance-based rules separate better.

    Args:
        base: name of the rule applied to the bucket means.
        bucket_size: s, workers a bucket.
        seed: seed of the permutations.
        base_options: options of the base rule.

    Example:
        >>> b = Bucketing(n=6, f=1, base="median", bucket_size=2)
        >>> b(torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [50.0]]))
        tensor([1.])
    """

    base: str = "median"
    bucket_size: int = 2
    seed: int = 0
    base_options: dict[str, Any] | None = None
    _inner: Aggregator | None = field(default=None, init=False, repr=False)
    _step: int = field(default=0, init=False, repr=False)

    requirement = "the base rule's condition on ceil(n / bucket_size) buckets"

    def validate(self) -> None:
        check_int(self.bucket_size, "bucket_size", 1)
        check_int(self.seed, "seed", 0)
        if self.base == "bucketing":
            raise ValueError("bucketing cannot wrap itself; choose another base rule")
        cls = aggregator_class(self.base)
        buckets = -(-self.n // self.bucket_size)
        if self.base_options is not None and not isinstance(self.base_options, Mapping):
            raise TypeError(
                f"base_options must be a dict of the base rule's options, got "
                f"{self.base_options!r:.100}"
            )
        options = dict(self.base_options or {})
        check_options("aggregator", self.base, options, option_names(cls))
        per_input = {"safeguard": "accumulations", "centered_clipping": "momenta"}
        momentum = options.get("momentum")  # (one that is no number: the base rule names it)
        if self.base == "safeguard" or (
            self.base == "centered_clipping"
            and isinstance(momentum, (int, float))
            and not isinstance(momentum, bool)
            and momentum
        ):
            hint = (
                ""
                if self.base == "safeguard"
                else "; use centered_clipping with momentum=0 as the base"
            )
            raise ValueError(
                f"bucketing cannot wrap {self.base!r} with state kept per input (its "
                f"{per_input[self.base]}): the buckets are reshuffled every step, so that state "
                f"would mix workers and follow none{hint}"
            )
        try:
            self._inner = build(self.base, buckets, self.f, options)
        except ValueError as e:
            raise ValueError(
                f"bucketing n={self.n} workers in buckets of {self.bucket_size} leaves {buckets} "
                f"inputs for {self.base!r}, which needs {cls.requirement} with f={self.f}: {e}"
            ) from e

    def tolerates_none(self) -> bool:
        return self._inner is not None and self._inner.tolerates_none()

    # Its step (advanced by end_step) draws each step's permutation: built afresh for every
    # call, as aggregate() would, it shuffled the workers the same way at every step.
    stateless = False

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        g = torch.Generator().manual_seed(key_seed(self.seed, self._step, ""))
        perm = torch.randperm(self.n, generator=g).to(grads.device)
        buckets = -(-self.n // self.bucket_size)
        shuffled = grads[perm]
        # Add the j-th member of every bucket at once, j = 0, 1, ...: each bucket's members are
        # summed in permutation order, the same bits on every device (one scatter-add of all
        # rows would let CUDA's atomics add a bucket's members in any order). Half precision
        # accumulates in float32, as the CPU's scatter-add did.
        wide = torch.promote_types(grads.dtype, torch.float32)
        bucket_of = torch.arange(self.n, device=grads.device) // self.bucket_size
        counts = torch.bincount(bucket_of, minlength=buckets).to(wide)

        def sums(divided: bool) -> Tensor:
            out = torch.zeros(buckets, grads.shape[1], dtype=wide, device=grads.device)
            for j in range(min(self.bucket_size, self.n)):
                members = shuffled[j :: self.bucket_size]  # row b is bucket b's j-th member
                rows = members.shape[0]
                out[:rows] += members / counts[:rows, None] if divided else members
            return out

        # Divided before the cast: four float16 rows of 40000 summed past 65504.
        means = sums(divided=False) / counts[:, None]
        if not bool(torch.isfinite(means).all()):
            # float32 members near 3.4e38 summed past the range while their mean fits: those
            # coordinates add the members each divided by its bucket's count.
            means = torch.where(torch.isfinite(means), means, sums(divided=True))
        return self._inner(means.to(grads.dtype), key=key)

    def end_step(self) -> None:
        self._step += 1
        self._inner.end_step()

    def stats(self) -> dict[str, Any]:
        return {"step": self._step, "base": self._inner.stats()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "base": self._inner.state_dict(),
            "options": plain(self.options()),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned; a bad state is refused, nothing loaded,
        and so is one saved with other settings (``base``, ``bucket_size``, ``seed``, ...: the
        error names them) unless ``strict=False``."""
        owner = "aggregator 'bucketing'"
        check_state(state, owner, ("step", "base"), optional=("options",))
        step = state_int(state["step"], f"{owner}: the state's 'step'")
        saved = state.get("options")
        if isinstance(saved, Mapping) and "base_options" in saved:
            # base_options None and {} mean the same: compared as {} on both sides
            state = {**state, "options": {**saved, "base_options": saved["base_options"] or {}}}
        now = self.options()
        check_saved_settings(
            state, owner, {**now, "base_options": now["base_options"] or {}}, strict
        )
        try:
            self._inner.load_state_dict(state["base"], **({} if strict else {"strict": False}))
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"{owner}: the state's 'base' entry does not fit its base rule {self.base!r}: {e}"
            ) from e
        self._step = step
