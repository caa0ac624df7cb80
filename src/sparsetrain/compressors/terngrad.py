"""TernGrad: unbiased stochastic ternarization, {-1, 0, +1} times the bucket's max magnitude."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import register_compressor
from .base import (
    Compressor,
    Payload,
    TensorMeta,
    Wire,
    bucket_shape,
    bucketed,
    check_bucket_size,
    check_floating,
    check_int,
    load_step_counters,
    pack_bits,
    seeded_generator,
    step_counter_state,
    unpack_rows,
    work_dtype,
)


@dataclass
class _Pending:
    """With scaler sharing, what this rank keeps between the rounds: the bucketed gradient and
    the seed of its rounding."""

    meta: TensorMeta
    rows: Tensor
    key: str
    step: int


@dataclass
class _Shared:
    """With scaler sharing, what decodes round 2's codes: the shared scales."""

    meta: TensorMeta
    scales: Tensor


@register_compressor("terngrad")
@dataclass
class TernGrad(Compressor):
    """Send each entry as ``s * t`` with ``t`` in {-1, 0, 1}, 2 bits an entry.

    Steps (Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
    Learning", NeurIPS 2017), per bucket ``v``:

    1. ``s = max |v_i|``.
    2. ``b_i`` is 1 with probability ``|v_i| / s`` (drawn as ``floor(|v_i| / s + u_i)``, ``u_i``
       uniform in [0, 1)), else 0; ``t_i = sign(v_i) b_i``.
    3. Send ``s`` and the codes ``t_i + 1`` packed four to a byte.
    4. Decode ``s * t_i``, whose expectation is ``v_i``: unbiased, error feedback off.

    The paper scales per layer; buckets of ``bucket_size`` entries bound the variance when a
    DDP bucket mixes layers of different magnitude (``None``: one scale per tensor). The
    paper's optional gradient clipping is left to the training loop.

    With ``scaler_sharing=True`` (the paper's scaler sharing), every rank ternarizes with the
    same scale, the largest over the ranks of its bucket's ``s``: one allreduce (max) of the
    scales, then the codes ``t_i`` are summed over the ranks by a second allreduce, as integers
    (int8 up to 127 ranks, else int32), and decoded as ``s * sum t_i``.
    Still unbiased (``|v_i| <= s``), with more variance on ranks whose own maximum is below
    the shared one. Each rank then sends ``2 (p-1)/p`` bytes an entry in the ring allreduce
    up to 127 ranks (``p``) and ``8 (p-1)/p`` beyond, bounded whatever the number of ranks,
    where the gathered 2-bit codes cost ``(p-1)/4`` bytes an entry: the sum is cheaper from 9
    ranks on.

    Args:
        bucket_size: entries sharing one scale, or None for one per tensor.
        seed: seeds the rounding (with key and step). The same on every rank: the hook and
            GradientSync add the rank, so each rank's rounding noise is its own and averages
            out over the ranks (a compressor used alone takes it as given).
        scaler_sharing: ternarize with the ranks' largest scale and sum the codes (above).

    Example:
        >>> (scales, packed), ctx = TernGrad(bucket_size=256).compress(torch.randn(1024))
        >>> scales.numel(), packed.numel()
        (4, 256)
    """

    wire: ClassVar[Wire] = "packed"
    summable: ClassVar[bool] = False
    biased: ClassVar[bool] = False
    # Independent rounding noise on each rank, so averaging over ranks shrinks it.
    rank_seeded: ClassVar[bool] = True

    bucket_size: int | None = 512
    seed: int = 0
    scaler_sharing: bool = False
    _steps: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_steps",)  # state by bucket key
    counts_steps: ClassVar[bool] = True
    _world: int | None = field(default=None, init=False, repr=False, compare=False)
    robust_refused: ClassVar[dict[str, str]] = {
        "scaler_sharing": "terngrad's scaler_sharing does not combine with an aggregator or an "
        "attack: its first round takes the largest of the ranks' scales by a plain allreduce, "
        "which the rule never sees (one Byzantine rank's huge scale leaves every honest rank's "
        "codes nearly all zero); drop scaler_sharing"
    }

    def __post_init__(self) -> None:
        check_bucket_size(self.bucket_size)
        check_int(self.seed, "seed", 0)
        if not isinstance(self.scaler_sharing, bool):
            raise TypeError(f"scaler_sharing must be True or False, got {self.scaler_sharing!r}")
        if self.scaler_sharing:  # two allreduces (max, then sum) instead of a gather
            self.wire, self.summable, self.rounds, self.round_ops = "dense", True, 2, ("max",)

    def bind(self, world: int) -> None:
        self._world = world

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, Any]:
        check_floating(t)
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        rows, _ = bucketed(t.reshape(-1).to(work_dtype(t.dtype)), self.bucket_size)
        scales = rows.abs().amax(dim=1)
        if self.scaler_sharing:  # round 1: the scales, whose maximum over the ranks comes back
            return (scales,), _Pending(TensorMeta.of(t), rows, key, step)
        codes = self._ternarize(rows, scales, key, step)
        codes = codes.view(-1)[: t.numel()].add_(1).to(torch.uint8)  # the padding is not sent
        return (scales, pack_bits(codes, 2)), TensorMeta.of(t)

    def next_round(self, reduced: Payload, ctx: Any) -> tuple[Payload, Any]:
        """With scaler sharing: ternarize with the ranks' largest scales, ``reduced``."""
        if not isinstance(ctx, _Pending):
            raise RuntimeError("terngrad has a second round only with scaler_sharing=True")
        (shared,) = reduced
        codes = self._ternarize(ctx.rows, shared, ctx.key, ctx.step)
        # int8 holds the sum of up to 127 ranks' codes; gloo and NCCL sum no int16.
        dtype = torch.int8 if self._world is not None and self._world <= 127 else torch.int32
        return (codes.view(-1)[: ctx.meta.numel].to(dtype),), _Shared(ctx.meta, shared)

    def _ternarize(self, rows: Tensor, scales: Tensor, key: str, step: int) -> Tensor:
        """``t = sign(v) * b`` per bucket row, ``b`` 1 with probability ``|v| / s`` (float)."""
        gen = seeded_generator(self.seed, key, step, rows.device)
        # |v| / s for every bucket, subnormal s too (IEEE division is exact to rounding there;
        # clamping s up to the smallest normal biased those buckets towards zero); 0 / 1 for an
        # all-zero bucket.
        mag = rows.abs().div_(torch.where(scales > 0, scales, torch.ones_like(scales))[:, None])
        mag.add_(torch.rand(mag.shape, generator=gen, dtype=mag.dtype, device=mag.device))
        # |v| / s <= 1 and u < 1, but x + u can round up to 2 in floating point: clamp to 1.
        mag.floor_().clamp_(max=1.0)
        return mag.mul_(torch.sign(rows))

    def decompress(self, payload: Payload, ctx: Any) -> Tensor:
        out, meta = self._decode(payload, ctx)
        return out.to(meta.dtype).view(meta.shape)

    def decompress_sum(self, payload: Payload, ctx: Any) -> Tensor:
        """The summed codes times the shared scales, in float32 for half gradients."""
        out, meta = self._decode(payload, ctx)
        return out.view(meta.shape)

    def _decode(self, payload: Payload, ctx: Any) -> tuple[Tensor, TensorMeta]:
        """The decoded entries (flat, in the scales' dtype) and the gradient's meta."""
        if isinstance(ctx, _Pending):
            raise RuntimeError(
                "terngrad with scaler_sharing decompresses round-2 payloads: call next_round "
                "with the scales' maximum over the ranks first"
            )
        meta = ctx.meta if isinstance(ctx, _Shared) else ctx
        buckets, size = bucket_shape(meta.numel, self.bucket_size)
        if isinstance(ctx, _Shared):  # the codes (summed over ranks, or this rank's own)
            (codes,) = payload  # the real entries: the last bucket's padding is not sent
            scales = ctx.scales
            out = codes.new_zeros(buckets * size, dtype=scales.dtype)
            out[: meta.numel] = codes
            out = out.view(buckets, size).mul_(scales[:, None])
        else:
            scales, packed = payload
            codes = unpack_rows(packed, 2, meta.numel, self.bucket_size, 1)
            out = codes.to(scales.dtype).sub_(1.0).mul_(scales[:, None])
        return out.view(-1)[: meta.numel], meta

    def state_dict(self) -> dict[str, Any]:
        """Return the per-key step counters (they seed the rounding)."""
        return step_counter_state(self.name, self._steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counters; the next rounding draws are those of the saved run."""
        self._steps = load_step_counters(state, self.name)
