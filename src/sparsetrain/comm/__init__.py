"""Collectives on torch.distributed: dense, gathered and sparse exchanges, with byte accounting."""

from .accounting import ring_allgather_bytes, ring_allreduce_bytes
from .registry import (
    CollectiveResult,
    SparseCollective,
    available_collectives,
    get_collective,
    register_collective,
)

__all__ = [
    "CollectiveResult",
    "SparseCollective",
    "available_collectives",
    "get_collective",
    "register_collective",
    "ring_allgather_bytes",
    "ring_allreduce_bytes",
]
