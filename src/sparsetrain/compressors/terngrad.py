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
    unpack_bits,
    work_dtype,
)


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

    Args:
        bucket_size: entries sharing one scale, or None for one per tensor.
        seed: seeds the rounding (with key and step). Give each rank its own (e.g. base seed +
            rank) so rounding noise averages out over ranks.

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
    _steps: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_bucket_size(self.bucket_size)
        check_int(self.seed, "seed", 0)

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        rows, _ = bucketed(t.reshape(-1).to(work_dtype(t.dtype)), self.bucket_size)
        mag = rows.abs()
        scales = mag.amax(dim=1)
        gen = seeded_generator(self.seed, key, step, rows.device)
        # |v| / s for every bucket, subnormal s too (IEEE division is exact to rounding there;
        # clamping s up to the smallest normal biased those buckets towards zero); 0 / 1 for an
        # all-zero bucket.
        mag.div_(torch.where(scales > 0, scales, torch.ones_like(scales))[:, None])
        mag.add_(torch.rand(mag.shape, generator=gen, dtype=mag.dtype, device=mag.device))
        # |v| / s <= 1 and u < 1, but x + u can round up to 2 in floating point: clamp to 1.
        mag.floor_().clamp_(max=1.0)
        codes = mag.mul_(torch.sign(rows)).add_(1.0).to(torch.uint8)
        return (scales, pack_bits(codes, 2)), TensorMeta.of(t)

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        scales, packed = payload
        buckets, size = bucket_shape(ctx.numel, self.bucket_size)
        codes = unpack_bits(packed, 2, buckets * size).view(buckets, size)
        out = codes.to(scales.dtype).sub_(1.0).mul_(scales[:, None])
        return out.view(-1)[: ctx.numel].to(ctx.dtype).view(ctx.shape)

    def state_dict(self) -> dict[str, Any]:
        """Return the per-key step counters (they seed the rounding)."""
        return step_counter_state(self.name, self._steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counters; the next rounding draws are those of the saved run."""
        self._steps = load_step_counters(state, self.name)
