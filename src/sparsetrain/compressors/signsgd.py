"""Scaled sign compression (EF-SignSGD): one bit an entry plus a scale per bucket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    unpack_bits,
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
    3. Decode ``scale * (+1 or -1)``; a zero decodes as ``+scale`` (``-0.0`` as ``-scale``).

    The scaled sign is biased, and plain signSGD can fail to converge; with error feedback (on
    by default here) it matches SGD's rate, which is the point of the paper. Deterministic.

    Args:
        bucket_size: entries sharing one scale, or None for one scale per tensor (the paper's
            per-layer choice; buckets help when a DDP bucket mixes layers).

    Example:
        >>> (scales, bits), ctx = SignSGD(bucket_size=None).compress(torch.tensor([1.0, -3.0]))
        >>> SignSGD(bucket_size=None).decompress((scales, bits), ctx)
        tensor([ 2., -2.])
    """

    wire: ClassVar[Wire] = "packed"
    summable: ClassVar[bool] = False
    biased: ClassVar[bool] = True

    bucket_size: int | None = 1024

    def __post_init__(self) -> None:
        check_bucket_size(self.bucket_size)

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        rows, counts = bucketed(t.reshape(-1).to(work_dtype(t.dtype)), self.bucket_size)
        scales = torch.linalg.vector_norm(rows, ord=1, dim=1).div_(counts)
        negative = torch.signbit(rows)
        return (scales, pack_bits(negative, 1)), TensorMeta.of(t)

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        scales, packed = payload
        buckets, size = bucket_shape(ctx.numel, self.bucket_size)
        bits = unpack_bits(packed, 1, buckets * size).view(buckets, size)
        out = (1.0 - 2.0 * bits.to(scales.dtype)).mul_(scales[:, None])
        return out.view(-1)[: ctx.numel].to(ctx.dtype).view(ctx.shape)
