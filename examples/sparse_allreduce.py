"""Call sparsetrain's sparse collectives yourself, outside the DDP hook.

Run it with torchrun, on any number of processes (gloo on CPU; NCCL when every process has a
GPU)::

    torchrun --standalone --nproc-per-node 4 examples/sparse_allreduce.py

Every rank makes a sparse vector: k = density * numel random positions of a numel-element
vector. Then, with each collective sparsetrain registers:

- the exact ones (allgather, SparCML's recursive doubling, split-allgather and DSAR) return the
  dense sum over ranks, checked here against ``dist.all_reduce`` of the dense vectors;
- the selecting ones (Ok-Topk, gTop-k) return a sparse selection of about k entries of the sum,
  the same on every rank; rank 0 prints how many of them are among the k largest of the exact
  sum.

Rank 0 prints what each collective sent, next to a dense ring allreduce's bytes. The exit status
is 1 when an exact collective's sum differs from the dense one, or a selection differs between
ranks.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from _launch import init_distributed  # examples/_launch.py, next to this script

from sparsetrain.comm import available_collectives, get_collective, ring_allreduce_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1_000_000, help="vector length")
    parser.add_argument("--density", type=float, default=0.01, help="k / numel on each rank")
    args = parser.parse_args()
    if args.numel < 1 or not 0 < args.density <= 1:
        parser.error("--numel must be >= 1 and --density in (0, 1]")

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    # This rank's sparse vector: sorted int32 positions and float32 values.
    k = max(1, int(args.density * args.numel))
    g = torch.Generator().manual_seed(rank)
    indices = torch.randperm(args.numel, generator=g)[:k].sort().values.to(torch.int32)
    values = torch.randn(k, generator=g)
    indices, values = indices.to(device), values.to(device)

    # The reference: the dense vectors summed by torch.distributed.
    exact_sum = torch.zeros(args.numel, device=device)
    exact_sum[indices.long()] = values
    dist.all_reduce(exact_sum)
    true_top = set(exact_sum.abs().topk(k).indices.tolist())

    failed = False
    rows = []
    for name in available_collectives():
        collective = get_collective(name)
        result = collective(indices, values, args.numel, key="example")
        if collective.exact:
            error = (result.dense - exact_sum).abs().max().item()
            ok = error <= 1e-4 * max(1.0, exact_sum.abs().max().item())
            failed |= not ok
            what = f"dense sum, max |error| {error:.1e}" + ("" if ok else "  WRONG")
        else:
            chosen = result.indices.tolist()
            hits = len(true_top.intersection(chosen))
            what = f"{len(chosen):,} entries selected, {hits:,} of them in the sum's top {k:,}"
            # The selection must be the same on every rank: compare a fingerprint of it.
            mine = torch.tensor([len(chosen), sum(chosen), result.values.double().sum().item()],
                                dtype=torch.float64, device=device)  # fmt: skip
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            if any(not torch.equal(every[0], other) for other in every):
                failed = True
                what += "  DIFFERS BETWEEN RANKS"
        rows.append((name, result.bytes_sent, what))

    if rank == 0:
        dense_bytes = ring_allreduce_bytes(args.numel, 4, world)
        print(f"{world} ranks, {args.numel:,} elements, {k:,} a rank ({device.type})")
        print(f"{'collective':<11} {'bytes sent':>12} {'vs dense':>9}  result")
        print(f"{'dense ring':<11} {dense_bytes:>12,} {1:>8.2f}x")
        for name, sent, what in rows:
            ratio = f"{sent / dense_bytes:>8.2f}x" if dense_bytes else f"{'-':>9}"  # 1 rank
            print(f"{name:<11} {sent:>12,} {ratio}  {what}")
    # Every rank checked its own sum; the exit status says whether any was wrong.
    flag = torch.tensor([float(failed)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    return 1 if flag.item() else 0


if __name__ == "__main__":
    sys.exit(main())
