"""What every example does first: join the process group torchrun describes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import sparsetrain.hostmem


def init_distributed() -> torch.device:
    """Join torchrun's process group: NCCL on this process's own GPU when the machine has one
    for each of its processes, else gloo on the CPU."""
    if "RANK" not in os.environ:  # started as a plain script: torch's error names a variable
        raise SystemExit(
            "run this example with torchrun, which starts its processes, for example: "
            "torchrun --standalone --nproc-per-node 2 examples/<script>.py [options]"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before NCCL starts, so each rank uses its own GPU
        dist.init_process_group("nccl")
        return device
    # On the CPU: keep freed memory for reuse, so gradients above 32 MiB are not mapped afresh
    # (and their pages faulted in again) every step; see sparsetrain.hostmem.
    sparsetrain.hostmem.reuse_freed_memory()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # the ranks of one machine share its cores
    return torch.device("cpu")
