"""How often Ok-Topk's balance step runs, and what Ok-Topk sends, by k and by kind of input.

Ok-Topk re-deals the entries its global threshold keeps in equal shares before the allgather
only when some rank kept more than 1.1 times an equal share (``BALANCE_SLACK``). The cost model
(``sparsetrain.perfmodel.oktopk``) prices the steady state without that step. This benchmark
counts, on RANKS gloo ranks of this machine (no network shaping: only what the calls do is
recorded, not their time), over STEPS calls of one ``oktopk`` collective (its defaults:
regions re-balanced every 64 calls, the threshold estimated every 32), for each k:

* ``independent``: each rank's k indices uniform at random and independent of the other ranks'
  (the cost model's assumption), drawn afresh each call;
* ``repeated``: one such draw repeated on every call, as ``sparsetrain bench cluster`` times a
  point (with the same counts on every call, a point balances on all of them or on none);
* ``overlapping``: each rank's top k of a heavy-tailed signal shared by the ranks plus noise of
  its own (0.3 of the signal's scale), as the ranks' gradients of one model overlap.

Recorded per point: the fraction of calls that balanced, the kept count against k, and the
elements the busiest rank sent against k (mean over the calls). Writes OUT/NAME.json and
prints a table.

Usage::

    .venv/bin/python benchmarks/bench_oktopk_balance.py --ranks 8 --numel 1000000 \
        --ks 200,1000,5000,10000 --steps 40 --out benchmarks/results --name oktopk_balance
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _ranks import (  # benchmarks/_ranks.py (run as a script: this folder is on the path)
    rank_in_group,
    run_ranks_in_temp,
)

KINDS = ("independent", "repeated", "overlapping")


def _overlapping(numel: int, k: int, rank: int, step: int):
    """Top k of a shared heavy-tailed signal plus this rank's noise: sorted int32 indices and
    float32 values."""
    import torch

    signal = torch.randn(numel, generator=torch.Generator().manual_seed(7)) ** 3
    noise = torch.randn(numel, generator=torch.Generator().manual_seed(1_000 * step + rank))
    grad = signal + 0.3 * noise
    idx = torch.topk(grad.abs(), k).indices.sort().values
    return idx.to(torch.int32), grad[idx]


def worker(rank: int, world: int, root: str, cfg: dict) -> None:
    """One rank: every (kind, k) point in turn; rank 0 writes the counts."""
    import torch
    import torch.distributed as dist

    from sparsetrain.comm import get_collective
    from sparsetrain.commands.bench import _sparse_input

    with rank_in_group(rank, world, root, cfg["timeout"]):
        points = []
        for kind in cfg["kinds"]:
            for k in cfg["ks"]:
                coll = get_collective("oktopk")
                balanced = kept = sent = 0.0
                for step in range(cfg["steps"]):
                    if kind in ("independent", "repeated"):
                        draw = cfg["seed"] + (step if kind == "independent" else 0)
                        idx, val = _sparse_input(cfg["numel"], k, rank, draw)
                    else:
                        idx, val = _overlapping(cfg["numel"], k, rank, cfg["seed"] + step)
                    coll(idx, val, cfg["numel"], key="w")
                    st = coll.stats()["w"]
                    most = torch.tensor([float(st["elems_sent"])])
                    dist.all_reduce(most, op=dist.ReduceOp.MAX)
                    balanced += st["rebalanced"]
                    kept += st["selected"] / k
                    sent += float(most) / k
                n = cfg["steps"]
                points.append({"kind": kind, "k": k, "balanced_fraction": balanced / n,
                               "kept_over_k": kept / n, "max_elems_sent_over_k": sent / n})  # fmt: skip
        if rank == 0:
            Path(root, "result.json").write_text(json.dumps(points))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--numel", type=int, default=1_000_000)
    p.add_argument("--ks", default="200,1000,5000,10000", help="comma-separated entries a rank")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {', '.join(KINDS)}")
    p.add_argument("--steps", type=int, default=40, help="calls a point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("--name", default="oktopk_balance", help="stem of the JSON")
    args = p.parse_args(argv)

    kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    if not kinds or set(kinds) - set(KINDS):
        what = f"unknown {sorted(set(kinds) - set(KINDS))}" if kinds else "empty"
        p.error(f"--kinds: {what}; valid: {', '.join(KINDS)}")
    try:
        ks = [int(s) for s in args.ks.split(",") if s.strip()]
    except ValueError:
        p.error(f"--ks must be comma-separated ints, got {args.ks!r}")
    if not ks or min(ks) < 1 or max(ks) > args.numel:
        p.error(f"--ks must be ints in [1, --numel={args.numel}], got {args.ks!r}")
    if args.ranks < 2 or args.steps < 1:
        p.error(
            f"--ranks must be at least 2 and --steps at least 1, got {args.ranks}, {args.steps}"
        )
    if not args.timeout > 0:
        p.error(f"--timeout must be above 0 seconds, got {args.timeout}")
    if not args.name.strip() or "/" in args.name:
        p.error(f"--name must be a non-empty file stem without '/', got {args.name!r}")

    from sparsetrain._provenance import environment

    cfg = {"numel": args.numel, "ks": ks, "kinds": kinds, "steps": args.steps,
           "seed": args.seed, "timeout": args.timeout}  # fmt: skip
    points = run_ranks_in_temp(worker, args.ranks, cfg, args.timeout, "bench_oktopk_balance",
                               lambda tmp: json.loads((tmp / "result.json").read_text()))  # fmt: skip
    if points is None:
        return 1

    print(f"oktopk on {args.ranks} ranks, numel {args.numel}, {args.steps} calls a point")
    print(f"{'input':<12} {'k':>7} {'k/p':>7} {'balanced':>9} {'kept/k':>7} {'sent/k':>7}")
    for pt in points:
        print(f"{pt['kind']:<12} {pt['k']:>7} {pt['k'] / args.ranks:>7.0f} "
              f"{pt['balanced_fraction']:>9.0%} {pt['kept_over_k']:>7.2f} "
              f"{pt['max_elems_sent_over_k']:>7.2f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"args": vars(args), "environment": environment(), "points": points}, indent=1))  # fmt: skip
    print(f"wrote {out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
