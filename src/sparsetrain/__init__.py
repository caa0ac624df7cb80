"""sparsetrain: cheaper, safer data-parallel PyTorch training by sparsity.

Example:
    >>> import sparsetrain  # doctest: +SKIP
    >>> state = sparsetrain.register_ddp_hook(ddp_model, "threshold", density=0.01)  # doctest: +SKIP

The names below load their modules (and torch) on first use, so that the ``sparsetrain``
command starts its work, and a Ctrl-C during torch's import of several seconds is a quiet
exit like one later on, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import hostmem  # sparsetrain.hostmem.reuse_freed_memory() after a plain import

__version__ = "0.1.0"

# name -> the module it comes from
_LAZY = {
    "available_compressors": ".compressors",
    "get_compressor": ".compressors",
    "register_compressor": ".compressors",
    "ErrorFeedback": ".feedback",
    "GradientSync": ".sync",
    "SyncConfig": ".sync",
    "SyncState": ".sync",
    "register_ddp_hook": ".sync",
    "reshard_sources": ".sync",
    "reshard_state": ".sync",
}

if TYPE_CHECKING:
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


if not TYPE_CHECKING:  # (a type checker would take any name through this)

    def __getattr__(name: str) -> Any:
        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
            # A subpackage, as `import sparsetrain` made every one it loaded reachable
            # (sparsetrain.comm.available_collectives()) before its names were lazy.
            value = importlib.import_module(f".{name}", __name__)
        else:
            raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")
        globals()[name] = value  # later lookups find it without this function
        return value


def __dir__() -> list[str]:
    return sorted({"__version__", "hostmem", *_LAZY})


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
