"""Half-precision casts: ``fp16`` and ``bf16`` halve the bytes of a float32 allreduce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import register_compressor
from .base import Compressor, Payload, TensorMeta, check_floating


@dataclass
class _Cast(Compressor):
    """Shared body of the cast compressors; ``wire_dtype`` is set by each subclass."""

    elementwise: ClassVar[bool] = True

    wire_dtype: ClassVar[torch.dtype]

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        return (t.reshape(-1).to(self.wire_dtype),), TensorMeta.of(t)

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        return payload[0].to(ctx.dtype).view(ctx.shape)


@register_compressor("fp16")
@dataclass
class FP16(_Cast):
    """Send the gradient as IEEE float16; the sum over ranks is taken in float16.

    Steps: cast to float16 (round to nearest), allreduce, cast back to the gradient's dtype.
    Rounding to nearest is nearly unbiased, so error feedback is off by default. float16 keeps
    about 3 significant digits and overflows above 65504, which the gradients of a loss-scaled
    model (``torch.amp.GradScaler``) can pass: with the scaler given to the hook as
    ``grad_scaler``, a step whose sum overflows is dropped on every rank and the scaler lowers
    its scale, as for an overflow in backward. ``bf16`` keeps float32's range. As in PyTorch's
    ``fp16_compress_hook``.

    Example:
        >>> (half,), ctx = FP16().compress(torch.randn(4, 3))
        >>> half.dtype, FP16().decompress((half,), ctx).shape
        (torch.float16, torch.Size([4, 3]))
    """

    wire_dtype: ClassVar[torch.dtype] = torch.float16


@register_compressor("bf16")
@dataclass
class BF16(_Cast):
    """Send the gradient as bfloat16: float32's range with 8 bits of mantissa.

    Steps: cast to bfloat16 (round to nearest even), allreduce, cast back. float32's exponent
    range: only values within half a bfloat16 step of float32's largest (above about 3.396e38)
    round to inf; about 2-3 significant digits. As in PyTorch's ``bf16_compress_hook``.

    Example:
        >>> (b,), ctx = BF16().compress(torch.randn(8))
        >>> b.dtype
        torch.bfloat16
    """

    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
