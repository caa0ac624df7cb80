"""Exact top-k sparsification by magnitude (torch.topk)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import register_compressor
from .base import (
    Payload,
    SparseCompressor,
    TensorMeta,
    check_density,
    check_floating,
    index_dtype,
    k_for,
)


@register_compressor("topk")
@dataclass
class TopK(SparseCompressor):
    """Keep the k = round(density * numel) entries of largest magnitude.

    Steps: flatten; ``torch.topk`` of ``|t|``; send (indices, values). Biased, so error feedback
    is on by default (Stich et al., "Sparsified SGD with Memory", 2018; Alistarh et al., "The
    Convergence of Sparsified Gradient Methods", 2018).

    Args:
        density: fraction of entries kept, in (0, 1].

    Example:
        >>> (idx, val), ctx = TopK(density=0.5).compress(torch.tensor([1.0, -3.0, 0.5, 2.0]))
        >>> sorted(idx.tolist())
        [1, 3]
    """

    density: float = 0.01

    def __post_init__(self) -> None:
        check_density(self.density)

    def compress(self, t: Tensor, *, key: str = "", layout=None) -> tuple[Payload, TensorMeta]:
        check_floating(t)
        flat = t.reshape(-1)
        k = k_for(flat.numel(), self.density)
        _, idx = torch.topk(flat.abs(), k, sorted=False)
        return (idx.to(index_dtype(flat.numel())), flat[idx]), TensorMeta.of(t)
