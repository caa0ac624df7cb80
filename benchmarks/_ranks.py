"""Spawn a benchmark's ranks on this machine and wait for them, for the benchmarks that train
(FileStore rendezvous in ``root``; each worker writes ``error<rank>.txt`` there if it fails)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def run_ranks(worker, ranks: int, root: Path, cfg: dict, timeout: float, label: str) -> bool:
    """Run ``worker(rank, ranks, str(root), cfg)`` on ``ranks`` spawned processes; True when all
    of them finished. On a failure or after ``timeout`` seconds, end them all, print each
    failed rank's traceback and what happened (prefixed with ``label``), and return False."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        worker, args=(ranks, str(root), cfg), nprocs=ranks, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not finish in {timeout:g} s")
    except Exception as e:  # noqa: BLE001 - a rank failed or hung: name it, end them all
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
        for err in sorted(Path(root).glob("error*.txt")):
            print(f"{err.stem}: {err.read_text()}", file=sys.stderr)
        print(f"{label}: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    return True


def run_ranks_in_temp(
    worker, ranks: int, cfg: dict, timeout: float, label: str, read: Callable[[Path], Any]
) -> Any:
    """:func:`run_ranks` in a temporary folder that is removed afterwards; return what
    ``read(folder)`` makes of the files the ranks left there, or None if they failed."""
    tmp = Path(tempfile.mkdtemp(prefix=f"sparsetrain-{label}-"))
    try:
        return read(tmp) if run_ranks(worker, ranks, tmp, cfg, timeout, label) else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def rank_in_group(rank: int, world: int, root: str, timeout: float) -> Iterator[None]:
    """In a worker: one thread (the ranks share this machine's cores), and the gloo group
    joined through the FileStore in ``root`` for the ``with`` block; an exception leaving it is
    written to ``root/error<rank>.txt`` for the parent (which names the rank) and raised on,
    and the group is destroyed either way."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(root, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )  # fmt: skip
    try:
        yield
    except Exception:
        Path(root, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
