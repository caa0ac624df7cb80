"""QSGD: unbiased stochastic quantization to a few levels per bucket norm."""

from __future__ import annotations

import math
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

# The bit layout of the work dtypes: (same-sized int, mantissa bits, exponent bias).
_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _pow2(exp: Tensor, dtype: torch.dtype) -> Tensor:
    """Return ``2 ** exp`` in ``dtype`` (float32 or float64), exactly, with ``exp`` clamped to
    the normal range (+-126 in float32). Written as the bit pattern, so no pow or exp2 rounds."""
    int_dtype, mantissa, bias = _LAYOUT[dtype]
    exp = exp.to(int_dtype).clamp(1 - bias, bias - 1)
    return ((exp + bias) << mantissa).view(dtype)


@register_compressor("qsgd")
@dataclass
class QSGD(Compressor):
    """Quantize each entry to one of ``2s + 1`` signed levels of its bucket's L2 norm.

    Steps (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017), per bucket ``v`` of ``bucket_size`` entries:

    1. ``norm = ||v||_2``; ``x_i = s |v_i| / norm`` lies in [0, s]. Both are computed on ``v``
       scaled exactly by a power of two, so no square overflows or vanishes (float32 inputs
       near 1e19 or 1e-20 keep their norm).
    2. Stochastic rounding: ``l_i = floor(x_i + u_i)`` with ``u_i`` uniform in [0, 1), i.e. up
       with probability ``x_i - floor(x_i)``, so ``E[l_i] = x_i``.
    3. Send ``norm`` and the code ``sign(v_i) l_i + s`` in ``ceil(log2(2s + 1))`` bits, packed.
    4. Decode ``norm * sign * l / s``: an unbiased estimate of ``v`` (error feedback off).

    The uniforms come from a generator seeded by ``(seed, key, step)``, so runs are reproducible.

    Args:
        levels: s, the number of positive levels, in [1, 127] (a signed code fits in 8 bits).
        bucket_size: entries sharing one norm (smaller: lower variance, more norms sent), or
            None for one norm per tensor.
        seed: seeds the rounding; any value keeps it unbiased. The same on every rank:
            the hook and GradientSync add the rank, so each rank's rounding noise is its own
            and averages out over the ranks (a compressor used alone takes it as given).

    Example:
        >>> c = QSGD(levels=4, bucket_size=128)
        >>> (norms, packed), ctx = c.compress(torch.randn(1024))
        >>> packed.dtype, packed.numel()  # 9 codes need 4 bits an entry
        (torch.uint8, 512)
    """

    wire: ClassVar[Wire] = "packed"
    summable: ClassVar[bool] = False
    biased: ClassVar[bool] = False
    # Independent rounding noise on each rank, so averaging over ranks shrinks it.
    rank_seeded: ClassVar[bool] = True

    levels: int = 7
    bucket_size: int | None = 512
    seed: int = 0
    _steps: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_steps",)  # state by bucket key
    counts_steps: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int(self.levels, "levels", 1, 127)
        check_bucket_size(self.bucket_size)
        check_int(self.seed, "seed", 0)

    @property
    def bits(self) -> int:
        """Bits per entry: enough for the 2s + 1 signed levels."""
        return math.ceil(math.log2(2 * self.levels + 1))

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        rows, _ = bucketed(t.reshape(-1).to(work_dtype(t.dtype)), self.bucket_size)
        # Squares of magnitudes above the square root of the dtype's range (1.8e19 in float32)
        # overflow and those below the square root of its smallest normal vanish, so each bucket
        # is scaled by a power of two that brings its largest magnitude into [0.5, 1) first.
        # That scaling is exact: ordinary buckets get the same norms and codes, bit for bit.
        x = rows.abs()
        exp = torch.frexp(x.amax(1)).exponent
        x.mul_(_pow2(-exp, x.dtype)[:, None])
        unit_norms = torch.linalg.vector_norm(x, dim=1)
        x.mul_((self.levels / unit_norms.clamp_min(torch.finfo(x.dtype).tiny))[:, None])
        # inf only where the norm itself exceeds the dtype's range (entries within a factor
        # sqrt(bucket_size) of its largest value).
        norms = unit_norms.mul_(_pow2(exp, x.dtype))
        gen = seeded_generator(self.seed, key, step, rows.device)
        x.add_(torch.rand(x.shape, generator=gen, dtype=x.dtype, device=x.device)).floor_()
        # In floating point x + u can round up to s + 1 when x is s; the clamp keeps the code in
        # range (x <= s holds exactly, so the expectation is unchanged).
        x.clamp_(max=self.levels)
        codes = x.mul_(torch.sign(rows)).add_(self.levels).to(torch.uint8)
        # The real entries' codes: the last bucket's padding is not sent.
        return (norms, pack_bits(codes.view(-1)[: t.numel()], self.bits)), TensorMeta.of(t)

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        return self.decompress_wide(payload, ctx).to(ctx.dtype)

    def decompress_wide(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        """The decoded entries in the norms' dtype (float32 for half gradients): norm * l / s
        reaches sqrt(bucket_size) / s times the bucket's largest magnitude, past float16's
        range where the gradient and the ranks' average are within it."""
        norms, packed = payload
        codes = unpack_rows(packed, self.bits, ctx.numel, self.bucket_size, self.levels)
        out = codes.to(norms.dtype).sub_(self.levels).mul_((norms / self.levels)[:, None])
        return out.view(-1)[: ctx.numel].view(ctx.shape)

    def state_dict(self) -> dict[str, Any]:
        """Return the per-key step counters (they seed the rounding)."""
        return step_counter_state(self.name, self._steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counters; the next rounding draws are those of the saved run."""
        self._steps = load_step_counters(state, self.name)
