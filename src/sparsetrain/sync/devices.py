"""CUDA placement of the sync layer's work: which device is current, and Futures that carry
stream order to DDP. On any other device every helper here does nothing beyond what it did
without CUDA: a plain Future, no device switch."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..comm.p2p import backend_for, moved_device


def cuda_device_of(tensors: Iterable[torch.Tensor]) -> torch.device | None:
    """Return the device of the first CUDA tensor in ``tensors`` (a model's parameters), or None."""
    return next((t.device for t in tensors if t.device.type == "cuda"), None)


def on_device(device: torch.device | None) -> AbstractContextManager:
    """Make ``device`` the current CUDA device inside the block; do nothing for None or another
    device type.

    Under NCCL, object collectives (``all_gather_object``) and point-to-point batches run on the
    *current* device, not the tensors' one; a caller who moved the model to ``cuda:<local_rank>``
    without ``torch.cuda.set_device`` would otherwise have every rank use ``cuda:0``.
    """
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def without_autocast(device: torch.device) -> AbstractContextManager:
    """Turn autocast off for ``device``'s type inside the block.

    An exchange can run on the thread that called ``backward()`` (``GradientSync``, the hook's
    inline path), whose autocast region, if any, is still in force there: PowerSGD's products
    would then be computed in float16 or bfloat16 (a loss-scaled gradient overflows float16),
    and results would depend on which thread ran the exchange.
    """
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    if available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def new_future(device: torch.device | None) -> torch.futures.Future:
    """Return a Future for a result on ``device``: CUDA-aware for a CUDA device.

    A CUDA-aware Future records events on the current streams when ``set_result`` is called (so
    it must be called with the producing stream current), and makes whoever waits on it wait
    for them; a plain Future does no stream synchronisation. Any other device gets a plain one.
    """
    if device is not None and device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def device_code(device: torch.device) -> int:
    """A positive int naming ``device``'s type (not its index), the same in every process: for
    ranks to compare where their tensors are in an integer collective."""
    return zlib.crc32(device.type.encode()) % (2**31 - 1) + 1


def agreement_device(group: Any, device: torch.device) -> torch.device:
    """Where ranks that may hold their tensors on different device types can meet for a small
    collective: the CPU if ``group`` (None: the default group) moves CPU tensors, else
    ``device``'s type as the group moves it (the current CUDA device under NCCL)."""
    if backend_for(group, "cpu") is not None:
        return torch.device("cpu")
    return moved_device(device, group)
