"""End to end on an emulated 1 Gbit/s cluster: time to a target test accuracy.

Trains a communication-bound task (digits-wide-mlp, a wide MLP whose gradient exchange costs
more than its compute) on RANKS network namespaces with tc-shaped links, once per method:

* plain DDP (``ddp``: no hook, PyTorch's own allreduce), the baseline of the ratios,
* ``dense`` (the hook with ``none``: the same allreduce through sparsetrain),
* ``fp16`` (half-precision allreduce),
* ``topk`` at DENSITY with the ``allgather`` baseline,
* ``threshold`` at DENSITY with the ``oktopk`` sparse allreduce,
* the same with momentum correction (``threshold+oktopk+mc``: each rank applies the momentum
  before compression, Deep Gradient Compression's way, and the optimizer has none),
* the same without DDP (``threshold+oktopk+sync``: ``GradientSync`` after backward, the same
  values, without DDP's copy of each gradient into its bucket),
* the same with the region owners keeping what the selection drops (``threshold+oktopk+owner``:
  Ok-Topk's ``residuals="owner"`` instead of the paper's per-rank residuals),
* ``threshold`` with ``collective="auto"`` (``threshold+auto``: the cost model picks for each
  bucket among dense, allgather, the split-allgather, DSAR, Ok-Topk and gTop-k, told the
  links' configured rate and latency; the JSON says what it picked),

all with error feedback where the compressor is biased, the same seed, data and schedule. Each
method runs in fresh worker processes (one launch a method, in the order given), so no run
starts on memory that an earlier run left behind. Each rank joins the job as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR on rank 0's 198.18.x
address, GLOO_SOCKET_IFNAME), through :func:`sparsetrain.train.launch`. Wall-clock time includes
the evaluations (every run's ``eval_seconds`` in the JSON says how much). Rank 0 shows a
progress bar a method (``--no-progress`` to turn it off). Prints time to TARGET and final
accuracy side by side with the ratio to dense, and writes JSON and a plot of accuracy against
wall-clock time. Needs root.

Usage::

    sudo .venv/bin/python benchmarks/bench_end_to_end.py --ranks 4 --bandwidth 1gbit \
        --hidden 3072 --batch-size 16 --lr 0.05 --epochs 10 --eval-every 11 --target 0.95 \
        --bucket-mb 100 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

METHODS = {  # label: (compressor, collective, uses density)
    "ddp": ("none", "allgather", False),  # plain DDP, no hook: the baseline
    "dense": ("none", "allgather", False),
    "fp16": ("fp16", "allgather", False),
    "topk+allgather": ("topk", "allgather", True),
    "threshold+oktopk": ("threshold", "oktopk", True),
    "threshold+oktopk+mc": ("threshold", "oktopk", True),  # with momentum correction
    "threshold+oktopk+sync": ("threshold", "oktopk", True),  # GradientSync, no DDP
    "threshold+oktopk+owner": ("threshold", "oktopk", True),  # residuals="owner"
    "threshold+auto": ("threshold", "auto", True),  # the cost model picks, told the links
}
AUTO_CANDIDATES = ["dense", "allgather", "ssar_split", "dsar", "oktopk", "gtopk"]


def compute_floor(hidden: int, batch_size: int, lr: float, steps: int = 30) -> float:
    """Seconds per step of forward, backward and the optimizer with no communication at all.

    Every rank runs it at the same moment, so the ranks share the cores as they do in training:
    this is the step time that no compression or collective can go below, and dense step time
    over it bounds the speedup any method can reach on this machine.
    """
    import time

    import torch

    from sparsetrain.tasks import get_task
    from sparsetrain.train import sgd

    task = get_task("digits-wide-mlp", hidden=hidden)
    torch.manual_seed(0)
    model = task.build_model()
    opt = sgd(model.parameters(), lr=lr, momentum=0.9)  # the trainer's optimizer
    x, y = task.train.tensors[0][:batch_size], task.train.tensors[1][:batch_size]
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        opt.zero_grad()
        task.loss_fn(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def auto_options(link: dict) -> dict:
    """What ``collective="auto"`` is told: the candidates and the links' configured rate and
    latency (the local costs keep the model's defaults)."""
    from sparsetrain.perfmodel import NetworkParams

    net = NetworkParams.from_link(bandwidth_bps=link["bandwidth_bps"], latency_s=link["latency_s"])
    return {"auto_candidates": AUTO_CANDIDATES, "auto_network": net.as_dict()}


def worker(cfg_path: str) -> int:
    """Run every configured method on this rank (joined by the torchrun variables)."""
    import torch

    from sparsetrain.hostmem import reuse_freed_memory
    from sparsetrain.train import TrainConfig, launch

    torch.set_num_threads(1)
    cfg = json.loads(Path(cfg_path).read_text())
    if cfg["reuse_host_memory"]:  # as the trainer will: the floor is measured the same way
        reuse_freed_memory()
    floor = compute_floor(cfg["hidden"], cfg["batch_size"], cfg["lr"]) if cfg["floor"] else None
    configs = []
    for label in cfg["methods"]:
        compressor, collective, sparse = METHODS[label]
        configs.append(
            TrainConfig(
                task="digits-wide-mlp",
                task_options={"hidden": cfg["hidden"]},
                compressor=compressor,
                density=cfg["density"] if sparse else None,
                collective=collective,
                epochs=cfg["epochs"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                seed=cfg["seed"],
                eval_every=cfg["eval_every"],
                label=label,
                native_ddp=label == "ddp",
                momentum_correction=label.endswith("+mc"),
                ddp=not label.endswith("+sync"),
                progress=cfg["progress"],
                timeout_s=600.0,
                bucket_cap_mb=cfg["bucket_mb"],
                reuse_host_memory=cfg["reuse_host_memory"],
                **(auto_options(cfg["link"]) if collective == "auto" else {}),
                **(
                    {"collective_options": {"residuals": "owner"}}
                    if label.endswith("+owner")
                    else {}
                ),
            )
        )
    report = launch(configs)
    if floor is not None:
        report["compute_floor_s_per_step"] = floor
    if os.environ.get("RANK") == "0":
        Path(cfg["report_path"]).write_text(json.dumps(report))
    return 0


def time_to_target(curves: dict, target: float) -> float | None:
    """Return the first wall-clock second at which test accuracy reached ``target``."""
    for t, acc in zip(curves["wall_seconds"], curves["test_accuracy"]):
        if acc is not None and acc >= target:
            return t
    return None


def plot(report: dict, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run in report["runs"]:
        c = run["curves"]
        pts = [(t, a) for t, a in zip(c["wall_seconds"], c["test_accuracy"]) if a is not None]
        ax.plot(*zip(*pts), marker=".", label=run["label"])
    ax.axhline(target, color="gray", linestyle=":", label=f"target {target:g}")
    ax.set(xlabel="wall-clock seconds (evaluations included)", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from sparsetrain.cluster import LATENCY_VIA

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--bandwidth", default="1gbit")
    p.add_argument("--latency", default="100us", help="one-way latency (default 100us)")
    p.add_argument(
        "--latency-via",
        choices=LATENCY_VIA,
        default="auto",
        help="netem where the kernel has it, else the cluster's delay switch (auto)",
    )
    p.add_argument("--hidden", type=int, default=3072, help="MLP width (3072: 9.7M parameters)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--eval-every", type=int, default=11, help="steps between evaluations (0: once an epoch)"
    )
    p.add_argument(
        "--bucket-mb",
        type=float,
        default=100.0,
        help="DDP bucket size in MB, for every method (100: the whole 39 MB gradient in one "
        "bucket, one exchange a step; 25: DDP's default, two buckets here)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (rank 0 shows one a method)"
    )
    p.add_argument(
        "--no-reuse-host-memory",
        action="store_true",
        help="leave glibc's malloc as it is, in training and the floor (the runs before "
        "2026-12-03's allocator change)",
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    p.add_argument("--name", help="stem of the JSON and PNG (default e2e_<ranks>r_<bandwidth>)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    from sparsetrain.cluster import ClusterPermissionError, check_privileges

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        p.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
    if not 0 < args.bucket_mb < float("inf"):
        p.error(f"--bucket-mb must be a finite number of MB > 0, got {args.bucket_mb}")
    if args.name is not None and (not args.name.strip() or "/" in args.name):
        p.error(f"--name must be a non-empty file stem without '/', got {args.name!r}")
    try:  # before anything is created
        check_privileges()
    except ClusterPermissionError as e:
        print(f"bench_end_to_end: {e}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sparsetrain-e2e-"))
    try:
        return _run(args, methods, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, methods: list[str], tmp: Path) -> int:
    """Build the cluster, train every method in it, print and write the comparison."""
    from sparsetrain._provenance import environment
    from sparsetrain.cluster import (
        ClusterError,
        ClusterPermissionError,
        EmulatedCluster,
        parse_duration,
        parse_rate,
    )

    env = environment()  # when the run started, and on what

    cfg = {**{k: getattr(args, k) for k in ("hidden", "density", "epochs", "batch_size", "lr",
                                              "seed", "eval_every", "bucket_mb")},
           "methods": methods, "progress": not args.no_progress,
           "reuse_host_memory": not args.no_reuse_host_memory,
           "link": {"bandwidth_bps": parse_rate(args.bandwidth),
                    "latency_s": parse_duration(args.latency)}}  # fmt: skip
    report: dict = {}
    try:
        with EmulatedCluster(
            args.ranks, args.bandwidth, args.latency, latency_via=args.latency_via
        ) as cluster:
            bw = cluster.measure_bandwidth(timeout=args.timeout)
            rtt = cluster.measure_rtt(timeout=args.timeout)
            latency_method = cluster.latency_method
            print(f"{args.ranks} ranks, {args.bandwidth} links (measured {bw / 1e9:.3f} Gbit/s, "
                  f"RTT {rtt * 1e6:.0f} us; latency emulated: {latency_method or 'no'})")  # fmt: skip
            # One launch a method, each in fresh worker processes: a run in processes that
            # trained before starts on a heap the earlier runs left fragmented, and the memory
            # it must add (first touched in its first steps, which a VM can make slow) would
            # count against it. The first launch also times the compute floor.
            for i, label in enumerate(methods):
                path = tmp / f"report-{i}.json"
                (tmp / f"config-{i}.json").write_text(
                    json.dumps({**cfg, "methods": [label], "floor": i == 0,
                                "report_path": str(path)})
                )  # fmt: skip
                cluster.run(
                    [sys.executable, str(Path(__file__).resolve()), "--worker",
                     str(tmp / f"config-{i}.json")],
                    timeout=args.timeout,
                )  # fmt: skip
                part = json.loads(path.read_text())
                if not report:
                    report = part
                else:
                    report["runs"].extend(part["runs"])
    except ClusterPermissionError as e:
        print(f"bench_end_to_end: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:  # a rank failed or timed out; the cluster is torn down
        print(f"bench_end_to_end: {e}", file=sys.stderr)
        return 1
    runs = {r["label"]: r for r in report["runs"]}
    base = "ddp" if "ddp" in runs else "dense"
    dense_t = time_to_target(runs[base]["curves"], args.target) if base in runs else None
    dense_acc = runs[base]["final_test_accuracy"] if base in runs else None
    floor = report["compute_floor_s_per_step"]
    print(f"compute floor (forward, backward, optimizer; no communication): {floor:.3f} s/step")
    print(f"\ntime to test accuracy {args.target:g} on {args.ranks} ranks at {args.bandwidth} "
          f"(ratios against {base}):")  # fmt: skip
    print(f"{'method':<22}{'to target s':>12}{'vs dense':>10}{'final acc':>11}{'Δ acc pts':>11}"
          f"{'total s':>9}{'s/step':>8}{'MB/rank':>9}")  # fmt: skip
    summary = []
    for label, run in runs.items():
        t = time_to_target(run["curves"], args.target)
        speed = dense_t / t if (t and dense_t) else None
        acc = run["final_test_accuracy"]
        delta = 100 * (acc - dense_acc) if dense_acc is not None else None
        summary.append({"method": label, "time_to_target_s": t, "speedup_vs_dense": speed,
                        "final_test_accuracy": acc, "delta_accuracy_points": delta,
                        "wall_seconds": run["wall_seconds"],
                        "seconds_per_step": run["wall_seconds"] / run["steps"],
                        "bytes_sent_per_rank": run["bytes_sent_per_rank"],
                        **({"auto_choices": run["auto_choices"]} if "auto_choices" in run
                           else {})})  # fmt: skip
        print(
            f"{label:<22}{t if t is not None else float('nan'):>12.1f}"
            f"{speed if speed else float('nan'):>9.2f}x{acc:>11.4f}"
            f"{delta if delta is not None else float('nan'):>+11.2f}"
            f"{run['wall_seconds']:>9.1f}{run['wall_seconds'] / run['steps']:>8.3f}"
            f"{run['bytes_sent_per_rank'] / 1e6:>9.1f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"e2e_{args.ranks}r_{args.bandwidth}"
    from sparsetrain import _native  # which version of the native kernel the ranks ran

    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "environment": env,
                                                  "link_measured_bps": bw,
                                                  "rtt_measured_s": rtt,
                                                  "latency_method": latency_method,
                                                  "native_kernel": _native.vector_level(),
                                                  "summary": summary, "report": report}, indent=1))  # fmt: skip
    plot(report, args.target, out / f"{stem}.png",
         f"digits-wide-mlp (hidden {args.hidden}), {args.ranks} ranks, {args.bandwidth}")  # fmt: skip
    if base in runs:
        dense_step = runs[base]["wall_seconds"] / runs[base]["steps"]
        print(f"dense step / compute floor = {dense_step / floor:.2f}: the largest speedup per "
              "step that removing all communication could give on this machine")  # fmt: skip
    for label, run in runs.items():
        if "auto_choices" in run:  # rank 0's: every rank makes the same choice
            picked = ", ".join(f"{int(n):,} elements: {c}" for n, c in run["auto_choices"].items())
            print(f"{label} picked (bucket size: collective): {picked}")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
