"""Where gradients meet the training loop: the DDP hook and GradientSync."""

from .config import SyncConfig
from .ddp_hook import SyncState, register_ddp_hook
from .engine import SyncEngine
from .gradient_sync import GradientSync
from .reshard import reshard_sources, reshard_state

__all__ = [
    "GradientSync",
    "SyncConfig",
    "SyncEngine",
    "SyncState",
    "register_ddp_hook",
    "reshard_sources",
    "reshard_state",
]
