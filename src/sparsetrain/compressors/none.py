"""Identity compressor: the uncompressed baseline (plain allreduce)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from . import register_compressor
from .base import Compressor, Payload, TensorMeta, check_floating


@register_compressor("none")
@dataclass
class NoCompression(Compressor):
    """Send the gradient as it is; summable, so it goes through one allreduce.

    Example:
        >>> import torch
        >>> c = NoCompression()
        >>> payload, ctx = c.compress(torch.ones(3))
    """

    elementwise: ClassVar[bool] = True

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        return (t,), TensorMeta.of(t)

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        return payload[0].view(ctx.shape)
