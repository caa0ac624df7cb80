"""sparsetrain: cheaper, safer data-parallel PyTorch training by sparsity.

Example:
    >>> import sparsetrain  # doctest: +SKIP
    >>> state = sparsetrain.register_ddp_hook(ddp_model, "threshold", density=0.01)  # doctest: +SKIP
"""

from . import hostmem  # sparsetrain.hostmem.reuse_freed_memory() after a plain import
from .compressors import available_compressors, get_compressor, register_compressor
from .feedback import ErrorFeedback
from .sync import (
    GradientSync,
    SyncConfig,
    SyncState,
    register_ddp_hook,
    reshard_sources,
    reshard_state,
)

__version__ = "0.1.0"

__all__ = [
    "ErrorFeedback",
    "GradientSync",
    "SyncConfig",
    "SyncState",
    "available_compressors",
    "get_compressor",
    "hostmem",
    "register_compressor",
    "register_ddp_hook",
    "reshard_sources",
    "reshard_state",
]
