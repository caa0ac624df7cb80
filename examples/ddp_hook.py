"""Train with DDP and sparsetrain's hook, checkpoint, and resume: a script to copy.

A small MLP learns scikit-learn's bundled digits (8x8 images, 10 classes), data parallel over
the processes torchrun starts (NCCL where the machine has a GPU for each of its processes, gloo
on the CPU otherwise). The DDP hook sends 1% of each gradient bucket (threshold selection,
error feedback on) through Ok-Topk's sparse allreduce::

    torchrun --standalone --nproc-per-node 2 examples/ddp_hook.py --checkpoint ckpt

It reaches about 95% test accuracy in its 10 epochs, as plain DDP does (``--compressor none
--collective allgather``), while sending under 3% of dense allreduce's bytes. Every rank
writes its own checkpoint, ``ckpt/rank<r>.pt``, at the end of every epoch: the error-feedback
residuals differ between ranks, so one shared file would lose all but one rank's. ``--resume``
continues from those files and ends where the uninterrupted run ends (without it, a folder
that holds an earlier run's files is refused rather than overwritten)::

    torchrun --standalone --nproc-per-node 2 examples/ddp_hook.py --epochs 5 \\
        --checkpoint ckpt5
    torchrun --standalone --nproc-per-node 2 examples/ddp_hook.py --checkpoint ckpt5 --resume

A resume on another number of processes carries the hook's state over with
``sparsetrain.reshard_state`` (each rank reading only the files ``reshard_sources`` names)::

    torchrun --standalone --nproc-per-node 3 examples/ddp_hook.py --checkpoint ckpt5 --resume \\
        --epochs 12

It needs every file it reads from the same epoch; otherwise every rank stops (exit status 1)
and rank 0 says why.

``--amp`` trains in float16 mixed precision: forward and loss under ``torch.autocast``, the
loss scaled by a ``torch.amp.GradScaler`` that the hook gets as ``grad_scaler``, so a step
whose gradient overflows on any rank is skipped on every rank and the scale lowered. (CPUs
gain no speed from float16; there it shows the flow.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _launch import init_distributed  # examples/_launch.py, next to this script
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import sparsetrain


def digits(device: torch.device) -> tuple[TensorDataset, TensorDataset]:
    """The digits, scaled to [0, 1], in an order fixed by a seed (the same on every rank): 1,437
    images to train on, the other 360 to test."""
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order].to(device) / 16.0
    y = torch.tensor(y, dtype=torch.long)[order].to(device)
    return TensorDataset(x[:1437], y[:1437]), TensorDataset(x[1437:], y[1437:])


def load_checkpoint(folder: Path, device: torch.device, amp: bool) -> dict | str:
    """This rank's checkpoint, or why the ranks cannot resume (the same answer on every rank:
    a missing file on one rank must not leave the others waiting in a collective).

    Written by another number of processes, the model and optimizer (the same on every rank)
    come from any of the files and the hook's state is carried over by
    ``sparsetrain.reshard_state`` from the files ``sparsetrain.reshard_sources`` names, so that
    nothing error feedback held back is lost or counted twice."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def read(r: int) -> dict | None:
        path = folder / f"rank{r}.pt"
        return torch.load(path, map_location=device) if path.is_file() else None

    # How many processes wrote the checkpoint: where every rank's own file says this run's
    # number, each reads only its own (files on node-local disks work); otherwise rank 0's
    # file says, and each rank reads the files reshard_sources names.
    own = read(rank)
    mine = float(own.get("world_size", -1)) if own else -1.0
    said = torch.tensor([mine, -mine], dtype=torch.float64, device=device)
    dist.all_reduce(said, op=dist.ReduceOp.MIN)
    if said[0].item() == -said[1].item() == world:
        old, files = world, {rank: own}
    else:  # another number of processes, files missing, or stale ones of an earlier run
        first = own if rank == 0 else read(0)
        old = first.get("world_size") if first else None
        files = {r: first if r == 0 else read(r) for r in
                 (sparsetrain.reshard_sources(old, rank, world) if old else [])}  # fmt: skip
    epochs = {f["epoch"] if f and f.get("world_size") == old else -1 for f in files.values()}
    saved, problem = None, None
    if len(epochs) == 1 and -1 not in epochs:
        saved = dict(next(iter(files.values())))
        if old != world:
            try:
                saved["hook"] = sparsetrain.reshard_state(
                    {r: f["hook"] for r, f in files.items()}, rank, world
                )
            except (TypeError, ValueError) as e:  # said here; the other ranks stop too
                problem = str(e)
                print(f"rank {rank}: cannot resume from {folder}: {problem}", file=sys.stderr)
    elif not files:  # (every rank alike: rank 0's file says how many processes wrote them)
        if rank == 0:
            print(f"rank 0: cannot resume from {folder}: rank0.pt is missing or says no number "
                  "of processes", file=sys.stderr)  # fmt: skip
    else:  # what this rank reads is missing, of another run, or from several epochs
        found = ", ".join(
            f"rank{r}.pt: " + (f"epoch {f['epoch']}" if f and f.get("world_size") == old
                               else "missing or of another run")
            for r, f in sorted(files.items())
        )  # fmt: skip
        print(f"rank {rank}: cannot resume from {folder}: the files it reads are not one "
              f"epoch's ({found})", file=sys.stderr)  # fmt: skip
    epoch = float(saved["epoch"]) if saved is not None and problem is None else -1.0
    other_amp = float(saved is not None and ("scaler" in saved) != amp)  # --amp one way only
    seen = torch.tensor([epoch, -epoch, -other_amp], dtype=torch.float64, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # the lowest and the highest epoch
    low, high = int(seen[0].item()), int(-seen[1].item())
    if low < 0:
        return (f"cannot resume from {folder}: a rank's checkpoint is missing, from another "
                "epoch than the others', or cannot be carried over (see that rank's error)")  # fmt: skip
    if seen[2] < 0:
        return (f"cannot resume from {folder}: it was written {'without' if amp else 'with'} "
                f"--amp; resume {'without' if amp else 'with'} it too")  # fmt: skip
    if low != high:
        return (f"cannot resume from {folder}: the ranks' checkpoints are from different "
                f"epochs ({low} to {high})")  # fmt: skip
    if old != world and rank == 0:
        print(f"resuming on {world} processes from a checkpoint of {old}; the hook's state "
              "carried over by sparsetrain.reshard_state")  # fmt: skip
    return saved


def checkpoint_conflict(folder: Path, resume: bool, device: torch.device) -> str | None:
    """Why this run cannot go on with ``folder``, or None: the same answer on every rank, as
    each counts the checkpoint files it sees (a folder on node-local disks may hold them on
    some nodes only). Without ``--resume``, an earlier run's files would be overwritten; with
    it, there must be some to resume from."""
    seen = torch.tensor([len(list(folder.glob("rank*.pt")))], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if resume and not seen.item():
        return f"no checkpoint in {folder} to resume from (rank<r>.pt): run without --resume"
    if not resume and seen.item():
        return (f"{folder} holds an earlier run's checkpoints, which this run would overwrite: "
                "pass --resume to continue it, or give another --checkpoint folder")  # fmt: skip
    return None


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write through a temporary file, so a run killed while saving keeps its last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs in all (default 10)")
    p.add_argument("--compressor", default="threshold", help="default threshold")
    p.add_argument(
        "--density", type=float, help="fraction kept by topk, threshold, randomk (default 0.01)"
    )
    p.add_argument(
        "--collective",
        default="oktopk",
        help="default oktopk; dense compressors (none, fp16, ...) take allgather",
    )
    p.add_argument("--checkpoint", help="folder for the ranks' checkpoints, written every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--amp", action="store_true", help="float16 mixed precision, loss scaling")
    args = p.parse_args()
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint")

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    train, test = digits(device)
    sampler = DistributedSampler(train, shuffle=True, seed=0)  # disjoint shards, seeded order
    loader = DataLoader(train, batch_size=32, sampler=sampler)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    # With --amp: the scaler multiplies the loss so that float16 gradients do not flush to zero,
    # and skips the steps that overflow; the hook passes those on to it from every rank.
    scaler = torch.amp.GradScaler(device.type) if args.amp else None
    state = sparsetrain.register_ddp_hook(
        model, args.compressor, density=args.density, collective=args.collective,
        grad_scaler=scaler,
    )  # fmt: skip
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)  # not fused=True with a scaler
    loss_fn = nn.CrossEntropyLoss()

    first_epoch = 0
    ckpt = Path(args.checkpoint) / f"rank{rank}.pt" if args.checkpoint else None
    if args.checkpoint:
        problem = checkpoint_conflict(Path(args.checkpoint), args.resume, device)
        if problem:
            if rank == 0:
                print(problem, file=sys.stderr)
            dist.destroy_process_group()
            return 2
    if args.resume:
        saved = load_checkpoint(Path(args.checkpoint), device, args.amp)
        if isinstance(saved, str):
            if rank == 0:
                print(saved, file=sys.stderr)
            dist.destroy_process_group()
            return 1
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.load_state_dict(saved["hook"])  # this rank's residuals and the collective's state
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        first_epoch = saved["epoch"] + 1
        if first_epoch >= args.epochs and rank == 0:
            print(f"the checkpoint is at the end of epoch {saved['epoch']}; nothing left to train "
                  f"for --epochs {args.epochs}")  # fmt: skip

    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)  # a new order every epoch, the same on a resumed run
        for x, y in loader:
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
                loss = loss_fn(model(x), y)
            if scaler is None:
                loss.backward()  # buckets are compressed and exchanged while backward runs
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped if the gradient overflowed on any rank
                scaler.update()
        with torch.no_grad():
            accuracy = (net(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
        stats = state.stats()
        if rank == 0:
            sent = stats["bytes_sent"] / stats["dense_bytes"]
            print(f"epoch {epoch}: loss {loss.item():.4f}, test accuracy {accuracy:.1%}, "
                  f"{sent:.2%} of dense allreduce's bytes sent")  # fmt: skip
        if ckpt:
            save_checkpoint(ckpt, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                   "hook": state.state_dict(), "epoch": epoch,
                                   "world_size": world,
                                   **({"scaler": scaler.state_dict()} if scaler else {})})  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Exit at once, without the interpreter's teardown: there gloo's threads can still be
    # releasing finished work, which aborts the process (SIGABRT, "terminate called without an
    # active exception") and makes torchrun fail a job that finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
