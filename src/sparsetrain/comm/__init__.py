"""Collectives on torch.distributed: dense, gathered and sparse exchanges, with byte accounting."""

# Importing a module registers its collectives by name.
from . import dsar, gather, gtopk, oktopk, ssar  # noqa: F401
from .accounting import ring_allgather_bytes, ring_allreduce_bytes
from .gather import all_gather_variable, allreduce_max, allreduce_sum
from .registry import (
    CollectiveResult,
    SparseCollective,
    available_collectives,
    get_collective,
    register_collective,
)

__all__ = [
    "all_gather_variable",
    "allreduce_max",
    "allreduce_sum",
    "CollectiveResult",
    "SparseCollective",
    "available_collectives",
    "get_collective",
    "register_collective",
    "ring_allgather_bytes",
    "ring_allreduce_bytes",
]
