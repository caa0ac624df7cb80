"""How many one-way latencies a small gloo operation waits, on emulated links with latency.

Builds a 2-rank emulated cluster with LATENCY each way (netem, or the cluster's delay switch
where the kernel has no netem) and times tiny (4-float) operations, median of REPS (25), each after
a barrier and a 20 ms pause:

* ``all_gather`` and ``all_reduce`` (the library's calls);
* ``isend+irecv at once``: both ranks post a receive from and a send to the other at the same
  moment, as the sparse collectives' batches of direct sends do;
* ``isend to a posted irecv``: the peer posted its receive 10 ms before the send, timed from
  the send.

The same operations on links with no added latency (the plain bridge) give each one's fixed
cost; the difference divided by the latency is the number of one-way trips it waits. On gloo's
TCP transport a send waits for the receiver's notice that its receive is posted, so a send and
a receive posted at the same moment take two trips, and one to a receive posted earlier one.
The cost model in :mod:`sparsetrain.perfmodel` counts messages, not these trips
(docs/collectives.md). Needs root. Writes JSON.

Usage::

    sudo .venv/bin/python benchmarks/bench_latency_steps.py --latency 2ms \
        --out benchmarks/results/latency_steps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

OPS = ("all_gather", "all_reduce", "isend+irecv at once", "isend to a posted irecv")


def worker(out_path: str, reps: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    peer = 1 - rank
    x = torch.zeros(4)
    bufs = [torch.zeros(4) for _ in range(world)]

    def at_once() -> None:
        recv = dist.irecv(bufs[peer], src=peer)
        send = dist.isend(x, dst=peer)
        recv.wait()
        send.wait()

    def to_posted() -> float:
        recv = dist.irecv(bufs[peer], src=peer)
        time.sleep(0.01)  # the peer's receive is posted by now
        t = time.perf_counter()
        send = dist.isend(x, dst=peer)
        recv.wait()
        send.wait()
        return time.perf_counter() - t

    ops = {
        "all_gather": lambda: dist.all_gather(bufs, x),
        "all_reduce": lambda: dist.all_reduce(x),
        "isend+irecv at once": at_once,
    }
    result = {}
    for name, fn in ops.items():
        times = []
        for _ in range(reps):
            dist.barrier()
            time.sleep(0.02)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        result[name] = statistics.median(times)
    times = []
    for _ in range(reps):
        dist.barrier()
        time.sleep(0.02)
        times.append(to_posted())
    result["isend to a posted irecv"] = statistics.median(times)
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(latency: str, reps: int, timeout: float) -> dict:
    from sparsetrain.cluster import EmulatedCluster

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        Path(tmp).chmod(0o777)
        with EmulatedCluster(2, "1gbit", latency) as cluster:
            rtt = cluster.measure_rtt(0, 1, timeout=timeout)
            cluster.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), str(reps)],
                timeout=timeout,
            )
            method = cluster.latency_method
            latency_s = cluster.latency_s
        times = json.loads(out.read_text())
    return {"latency_s": latency_s, "latency_method": method, "rtt_s": rtt, "seconds": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", default="2ms", help="one-way latency of the links (2ms)")
    p.add_argument("--reps", type=int, default=25, help="timed repetitions an operation")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a cluster may run")
    p.add_argument("--out", default="benchmarks/results/latency_steps.json")
    args = p.parse_args(argv)
    from sparsetrain._provenance import environment

    env = environment(sys.argv if argv is None else [p.prog, *argv])
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    from sparsetrain.cluster import ClusterPermissionError

    try:
        base = measure("0", args.reps, args.timeout)
        slow = measure(args.latency, args.reps, args.timeout)
    except ClusterPermissionError as e:
        print(f"bench_latency_steps: {e}", file=sys.stderr)
        return 2
    if slow["latency_method"] is None:
        print("bench_latency_steps: the links could not be given latency here", file=sys.stderr)
        return 1
    trips = {op: (slow["seconds"][op] - base["seconds"][op]) / slow["latency_s"] for op in OPS}
    print(f"latency {slow['latency_s'] * 1e3:g} ms each way ({slow['latency_method']}); "
          f"RTT {slow['rtt_s'] * 1e3:.2f} ms, {base['rtt_s'] * 1e3:.2f} ms without")  # fmt: skip
    print(f"{'operation':<26}{'no latency ms':>14}{'latency ms':>12}{'one-way trips':>15}")
    for op in OPS:
        print(f"{op:<26}{base['seconds'][op] * 1e3:>14.2f}{slow['seconds'][op] * 1e3:>12.2f}"
              f"{trips[op]:>15.2f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "environment": env,
                               "without_latency": base, "with_latency": slow,
                               "one_way_trips": trips}, indent=1))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
