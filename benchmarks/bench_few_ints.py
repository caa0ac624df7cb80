"""The two forms of the collectives' few-int exchanges, side by side on an emulated cluster.

Every sparse collective starts with an input agreement (each rank's numel, count, dtypes, key,
a code of its options, and an int for every peer), and Ok-Topk and split-allgather
also gather a few counts from every rank. Below ``sparsetrain.comm.p2p.TREE_FROM`` ranks these
go straight to every peer (one round of p - 1 messages); from there on in ceil(log2 p) rounds of
one message each (dissemination and Bruck's algorithms). This benchmark times both forms on
the same ranks, alternating them repetition by repetition, so that the break-even world size
rests on a measurement:

* ``agree``: the agreement with a size for every peer, as every collective sends it since
  2026-12-07: 6 ints and one for every peer (the stored runs timed it as it was then, 12 ints,
  7 of them options, and one for every peer);
* ``gather``: a gather of 4 ints from every rank (Ok-Topk's kept counts).

Each repetition starts after a barrier and a 5 ms pause; the median over REPS is kept. Needs
root (the cluster's network namespaces). Writes JSON.

Usage::

    sudo .venv/bin/python benchmarks/bench_few_ints.py --ranks 4,8,16 --latency 100us \\
        --out benchmarks/results/few_ints.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

FORMS = ("direct", "tree")
OPS = ("agree", "gather")


def worker(out_path: str, reps: int) -> None:
    import torch
    import torch.distributed as dist

    from sparsetrain.comm import p2p

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    idx, val = torch.arange(rank, 1000, world), torch.ones(len(range(rank, 1000, world)))
    options = {f"option {j}": j for j in range(7)}
    tell = {q: 10 * q for q in range(world) if q != rank}

    def agree() -> None:
        p2p.Wire(None, torch.device("cpu")).agree(idx, val, 1000, options=options, tell=tell)

    def gather() -> None:
        p2p.Wire(None, torch.device("cpu")).allgather_ints([rank, 1, 2, 3])

    ops = {"agree": agree, "gather": gather}
    times: dict[str, dict[str, list[float]]] = {f: {op: [] for op in OPS} for f in FORMS}
    for form in FORMS:  # one untimed call of each, to connect the pairs
        p2p.TREE_FROM = p2p.tree_from(form)
        for fn in ops.values():
            fn()
    for _ in range(reps):
        for form in FORMS:
            p2p.TREE_FROM = p2p.tree_from(form)
            for op, fn in ops.items():
                dist.barrier()
                time.sleep(0.005)
                t = time.perf_counter()
                fn()
                times[form][op].append(time.perf_counter() - t)
    # A rank's time is how long it waited; the call's time is the slowest rank's.
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, times)
    if rank == 0:
        result = {
            form: {
                op: statistics.median(max(r[form][op][i] for r in gathered) for i in range(reps))
                for op in OPS
            }
            for form in FORMS
        }
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(ranks: int, bandwidth: str, latency: str, reps: int, timeout: float) -> dict:
    from sparsetrain.cluster import EmulatedCluster

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        Path(tmp).chmod(0o777)
        with EmulatedCluster(ranks, bandwidth, latency) as cluster:
            cluster.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), str(reps)],
                timeout=timeout,
            )
            method, latency_s = cluster.latency_method, cluster.latency_s
        seconds = json.loads(out.read_text())
    return {"latency_s": latency_s, "latency_method": method, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="4,8,16", help="comma-separated world sizes (4,8,16)")
    p.add_argument("--bandwidth", default="1gbit", help="link rate each way (1gbit)")
    p.add_argument("--latency", default="100us", help="one-way latency of the links (100us)")
    p.add_argument("--reps", type=int, default=25, help="timed repetitions a form and operation")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a cluster may run")
    p.add_argument("--out", default="benchmarks/results/few_ints.json")
    args = p.parse_args(argv)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks must be comma-separated ints, got {args.ranks!r}")
    if any(r < 2 for r in ranks):
        p.error(f"--ranks: every world needs at least 2 ranks, got {args.ranks}")
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    from sparsetrain._provenance import environment
    from sparsetrain.cluster import ClusterPermissionError

    env = environment(sys.argv if argv is None else [p.prog, *argv])
    runs = {}
    try:
        for world in ranks:
            runs[world] = measure(world, args.bandwidth, args.latency, args.reps, args.timeout)
    except ClusterPermissionError as e:
        print(f"bench_few_ints: {e}", file=sys.stderr)
        return 2
    print(f"{args.bandwidth} links, {args.latency} each way; median of {args.reps}, slowest rank")
    print(f"{'ranks':>5}  {'operation':<8}{'direct ms':>11}{'tree ms':>9}{'tree/direct':>13}")
    for world, run in runs.items():
        s = run["seconds"]
        for op in OPS:
            d, t = s["direct"][op], s["tree"][op]
            print(f"{world:>5}  {op:<8}{d * 1e3:>11.2f}{t * 1e3:>9.2f}{t / d:>13.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "environment": env, "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
