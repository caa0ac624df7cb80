"""Scaled sign compression (EF-SignSGD): one bit an entry plus a scale per bucket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    pack_bits,
    unpack_rows,
    work_dtype,
)


@register_compressor("signsgd")
@dataclass
class SignSGD(Compressor):
    """Send ``sign(v)`` scaled by the mean magnitude ``||v||_1 / len(v)`` of each bucket.

    Steps (Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression
    Schemes", ICML 2019), per bucket ``v``:

    1. ``scale = ||v||_1 / len(v)`` (the real length; the padded tail of the last bucket does
       not count).
    2. Send ``scale`` and one bit per entry, the sign bit of ``v_i``; packed eight to a byte.
    3. Decode ``scale * (+1 or -1)``; a zero decodes as ``+scale`` (``-0.0`` as ``-scale``),
       which error feedback corrects (under ``majority_vote``, below, a zero decodes as 0).

    The scale is summed in the work dtype (float32 for half types), so a bucket whose
    magnitudes sum past its range (float32 entries of about 3e35 in a bucket of 1024) gets an
    infinite scale although its mean fits; the sync then reports the exchange as overflowed
    (dropping the step under a ``GradScaler``). Scaling each bucket by a power of two first, as
    :class:`~sparsetrain.compressors.qsgd.QSGD` does, would avoid that but nearly double
    this compressor's time (two more passes over the gradient), so it is not done.

    The scaled sign is biased, and plain signSGD can fail to converge; with error feedback (on
    by default here) it matches SGD's rate, which is the point of the paper. Deterministic.

    With ``majority_vote=True`` the ranks' signs are combined by vote, as in signSGD with
    majority vote (Bernstein et al., "signSGD with Majority Vote is Communication Efficient and
    Fault Tolerant", ICLR 2019): entry ``i`` of the average is ``sign(sum_r sign_r(v_i))``
    times the mean over ranks of their bucket's scale, zero where the vote is tied (an even
    number of ranks). The direction is then the one most ranks agree on, so each rank moves it
    by one vote at most, however large its gradient; the scale, a mean, is not so bounded (a
    robust rule of :mod:`sparsetrain.robust` bounds everything). Each entry then takes two bits,
    its sign of +1, -1 or 0 (``torch.sign``): an exact zero abstains, so an entry no rank has a
    gradient for (an always-zero input's weights, an embedding row not in the batch) does not
    move. With one bit a zero voted plus, and such weights drifted by the mean scale every
    step. Error feedback is off by default with the vote, as in the paper: a rank's residual
    holds what its own scaled sign left out, but the step applies the vote, which the residual
    cannot follow, and the residuals then grow into large corrections. On digits-mlp with 3
    workers at the trainer's defaults, seeds 0, 1, 2 reached 96.2%, 93.5% and 97.6% without it
    and 59.0%, 74.6% and 93.8% with it (``sparsetrain train --workers 3 --compressor signsgd
    --option majority_vote=True --seed S``, adding ``--error-feedback on``).

    Args:
        bucket_size: entries sharing one scale, or None for one scale per tensor (the paper's
            per-layer choice; buckets help when a DDP bucket mixes layers).
        majority_vote: combine the ranks' signs by majority vote instead of averaging the
            scaled signs.

    Example:
        >>> (scales, bits), ctx = SignSGD(bucket_size=None).compress(torch.tensor([1.0, -3.0]))
        >>> SignSGD(bucket_size=None).decompress((scales, bits), ctx)
        tensor([ 2., -2.])
    """

    wire: ClassVar[Wire] = "packed"
    summable: ClassVar[bool] = False
    biased: ClassVar[bool] = True

    bucket_size: int | None = 1024
    majority_vote: bool = False
    robust_refused: ClassVar[dict[str, str]] = {
        "majority_vote": "signsgd's majority_vote does not combine with an aggregator or an "
        "attack: the robust path averages the ranks' decoded gradients and would skip the vote "
        "(which already gives each rank one vote on the direction); drop one of them"
    }

    def __post_init__(self) -> None:
        check_bucket_size(self.bucket_size)
        if not isinstance(self.majority_vote, bool):
            raise TypeError(f"majority_vote must be True or False, got {self.majority_vote!r}")

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        rows, counts = bucketed(t.reshape(-1).to(work_dtype(t.dtype)), self.bucket_size)
        scales = torch.linalg.vector_norm(rows, ord=1, dim=1).div_(counts)
        flat = rows.view(-1)[: t.numel()]  # the real entries: the last bucket's padding is not sent
        if self.majority_vote:  # 1: plus, 2: minus, 0: a zero, which abstains from the vote
            codes = (flat > 0).to(torch.uint8) + 2 * (flat < 0).to(torch.uint8)
            return (scales, pack_bits(codes, 2)), TensorMeta.of(t)
        negative = torch.signbit(flat)
        return (scales, pack_bits(negative, 1)), TensorMeta.of(t)

    def _signs(self, packed: Tensor, ctx: TensorMeta, dtype: torch.dtype) -> Tensor:
        """Each entry's sign (+1, -1; 0 for a zero under the vote) from its packed bits, as
        :func:`bucketed`'s rows (0 in the last row's padding)."""
        if self.majority_vote:
            codes = unpack_rows(packed, 2, ctx.numel, self.bucket_size, 0).to(dtype)
            return (codes == 1).to(dtype) - (codes == 2).to(dtype)
        codes = unpack_rows(packed, 1, ctx.numel, self.bucket_size, 0).to(dtype)
        return codes.mul_(-2.0).add_(1.0)

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        scales, packed = payload
        out = self._signs(packed, ctx, scales.dtype).mul_(scales[:, None])
        return out.view(-1)[: ctx.numel].to(ctx.dtype).view(ctx.shape)

    @classmethod
    def feedback_by_default(cls, options: Mapping[str, Any]) -> bool:
        """Off with ``majority_vote`` (see the class docstring), else on (a biased compressor)."""
        return not options.get("majority_vote", False)

    def aggregate(self, payloads: Sequence[Payload], ctx: TensorMeta) -> Tensor:
        """The sum over ranks of the decoded payloads; with ``majority_vote``, the number of
        ranks times the vote's result (the sync layer divides the sum by that number)."""
        if not self.majority_vote:
            return super().aggregate(payloads, ctx)
        buckets, size = bucket_shape(ctx.numel, self.bucket_size)
        votes = torch.zeros(buckets, size, dtype=torch.int32, device=payloads[0][0].device)
        scales = torch.zeros_like(payloads[0][0])
        for bucket_scales, packed in payloads:
            votes += self._signs(packed, ctx, torch.int32)
            scales += bucket_scales
        direction = votes.sign().to(scales.dtype)
        out = direction.mul_(scales[:, None])  # the mean scale, times the number of ranks
        # In the work dtype, as the base class sums: the sync layer divides by the ranks next.
        return out.view(-1)[: ctx.numel].view(ctx.shape)
