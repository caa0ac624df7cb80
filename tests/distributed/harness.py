"""Spawn small gloo (or NCCL) worlds for tests: FileStore rendezvous (no ports), results per
rank, timeouts."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsetrain._procs import exit_finished_worker

# Workers start from a fork server that has imported torch and sparsetrain once for the whole
# session, rather than each importing them anew (a spawn took about 1.5 s of CPU a rank, most
# of a small world's time on two cores). The server imports and runs nothing else, so each
# worker still starts from fresh modules; it is given the test's environment (the server's is
# the one it started with) and, as under spawn, the test's folder and sys.path. What those
# modules read when imported (TORCH_DISTRIBUTED_DEBUG, OpenMP's variables) is the server's: a
# test that needs another value there must spawn its own processes.
_PRELOAD = ["torch", "torch.distributed", "sparsetrain", "sparsetrain.sync", "sparsetrain.comm"]
multiprocessing.set_forkserver_preload(_PRELOAD)


def _entry(
    rank: int, world: int, root: str, backend: str, fn, args, env: dict[str, str] | None = None
) -> None:
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU a rank
        torch.cuda.set_device(rank)
    store = dist.FileStore(os.path.join(root, "store"), world)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90)
    )
    # Every rank past gloo's connection set-up before any runs the test: a rank whose test
    # fails before its first collective exited while a peer was still connecting, which failed
    # that peer's init ("connectFullMesh failed ... Connection closed by peer"; 3 of 11 runs of
    # tests/unit on a loaded machine).
    dist.barrier()
    try:
        result = {"ok": fn(rank, world, *args)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    with open(os.path.join(root, f"result{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()
    exit_finished_worker(0)  # skip interpreter teardown, where gloo can abort a finished rank


def run_world(
    fn, world: int, tmp_path: Path, *args, timeout: float = 180.0, backend: str = "gloo"
) -> list[dict]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks of ``backend`` (gloo; "nccl": rank r on
    GPU r); return each rank's ``{"ok": value}`` or ``{"error": message}``. Fails the test if a
    rank hangs or dies."""
    root = Path(tmp_path) / f"world{time.monotonic_ns()}"
    root.mkdir(parents=True)
    ctx = mp.start_processes(
        _entry,
        args=(world, str(root), backend, fn, args, dict(os.environ)),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"world of {world} ranks did not finish in {timeout} s (hang?)")
    out = []
    for r in range(world):
        with open(root / f"result{r}.pkl", "rb") as f:
            out.append(pickle.load(f))
    return out


def oks(results: list[dict]) -> list:
    """Return every rank's value, failing with the first rank's error and traceback."""
    for r, res in enumerate(results):
        if "error" in res:
            raise AssertionError(f"rank {r} failed: {res['error']}\n{res['traceback']}")
    return [res["ok"] for res in results]
