"""Does top-k with error feedback keep dense accuracy with Adam and AdamW as it does with SGD?

Error feedback's convergence results assume an update linear in the gradient: a residual sent
late still adds up to what would have been applied. SGD is such an update; Adam and AdamW
normalise each coordinate's step, so a residual released in one burst moves a weight by a
bounded step instead of its sum (README, Known limitations). This benchmark measures what that
costs. It trains a digits task on RANKS gloo processes of this machine (FileStore rendezvous, one
thread each), every rank on its own shard of the training set (``sparsetrain.train``'s shards:
reshuffled each epoch, disjoint, equal length), once per optimizer, method and seed:

* optimizers: ``sgd`` (momentum ``--momentum``), ``adam``, ``adamw`` (torch's defaults:
  betas (0.9, 0.999), eps 1e-8; AdamW's weight decay 0.01), the learning rate decayed to 0 on a
  cosine over the run, as the reference trainer does;
* methods: ``dense`` (compressor ``"none"``: the uncompressed allreduce, the reference), and at
  each density of ``--densities``: ``topkD+ef`` (``"topk"`` with error feedback),
  ``topkD-noef`` (the same without: what is not sent is dropped), and for SGD only
  ``topkD+mc`` (error feedback with momentum correction, the momentum applied on each rank
  before compression and none in the optimizer; Adam's moments do not move into the hook);

all through ``sparsetrain.GradientSync`` (after ``backward()``, before ``optimizer.step()``),
with the same initial model on every rank and for every method of a seed, the same shards and
batches. The seed also fixes the task's train/test split. Rank 0 measures test accuracy on the
whole test split before training and after every epoch. Recorded per run: final and best test
accuracy, the accuracy and mean training loss (over the ranks) per epoch, the bytes sent over
what a dense ring allreduce sends (``sync.stats()``), and whether the ranks' models stayed
identical. A run whose gradients turn non-finite stops there and is marked ``diverged``.

Prints the final accuracy of each optimizer and method (mean over seeds, and each seed) and its
gap to dense of the same optimizer and seed, and writes OUT/NAME.json (with the command, the
machine and the commit) and OUT/NAME.png (test accuracy against epoch, a panel per optimizer,
a line per method: the mean over seeds, shaded between the lowest and highest seed).

Usage::

    .venv/bin/python benchmarks/bench_optimizers.py --task digits-mlp --epochs 30 \
        --seeds 0,1,2 --out benchmarks/results --name optimizers_digits
    .venv/bin/python benchmarks/bench_optimizers.py --quick   # smoke run: 2 epochs, seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from _ranks import (  # benchmarks/_ranks.py (run as a script: this folder is on the path)
    rank_in_group,
    run_ranks_in_temp,
)

OPTIMIZERS = {  # name: (torch.optim class, fixed options)
    "sgd": ("SGD", {}),
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {"weight_decay": 0.01}),
}
METHOD_KINDS = ("dense", "ef", "noef", "mc")  # mc: SGD only


def methods_for(optimizer: str, densities: list[float], kinds: list[str]) -> list[dict]:
    """The methods one optimizer runs: dense, then each kind at each density."""
    out = [{"label": "dense", "kind": "dense", "density": None}] if "dense" in kinds else []
    suffix = {"ef": "+ef", "noef": "-noef", "mc": "+mc"}
    for d in densities:
        for kind in ("ef", "noef", "mc"):
            if kind in kinds and (kind != "mc" or optimizer == "sgd"):
                out.append({"label": f"topk{d:g}{suffix[kind]}", "kind": kind, "density": d})
    return out


# ---- one rank ---------------------------------------------------------------------------------
def make_optimizer(name: str, params, lr: float, momentum: float):
    import torch

    cls, options = OPTIMIZERS[name]
    if name == "sgd":
        options = {"momentum": momentum}
    return getattr(torch.optim, cls)(params, lr=lr, **options)


def run_one(cfg: dict, task, seed: int, optimizer: str, method: dict, rank: int, world: int):
    """Train one optimizer and method on this rank; return its record (rank 0's evaluations)."""
    import torch
    import torch.distributed as dist

    import sparsetrain
    from sparsetrain.train import evaluate, shard_indices

    kind, density = method["kind"], method["density"]
    lr = cfg["lr"][optimizer]
    torch.manual_seed(seed)  # the same initial model on every rank and for every method
    model = task.build_model()
    params = list(model.parameters())
    if kind == "dense":
        sync = sparsetrain.GradientSync(model, "none")
    else:
        mc = {"momentum_correction": cfg["momentum"]} if kind == "mc" else {}
        sync = sparsetrain.GradientSync(
            model, "topk", density=density, error_feedback=kind != "noef", **mc
        )
    # With momentum correction the momentum lives in the hook and the optimizer has none.
    opt = make_optimizer(optimizer, params, lr, 0.0 if kind == "mc" else cfg["momentum"])
    x_all, y_all = task.train.tensors
    n_train, batch = len(y_all), cfg["batch_size"]
    steps_per_epoch = math.ceil(math.ceil(n_train / world) / batch)
    total = cfg["epochs"] * steps_per_epoch

    def test_accuracy() -> float | None:
        if rank != 0:
            return None
        return evaluate(model, task.test, task.loss_fn, torch.device("cpu"))[1]

    curves = {"epoch": [0], "test_accuracy": [test_accuracy()], "train_loss": [None]}
    step, diverged_at = 0, None
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        order = shard_indices(n_train, rank, world, seed, epoch)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # sum of losses, steps
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            try:
                applied = sync.synchronize()
            except FloatingPointError:  # raised on every rank at the same step
                diverged_at = step
                break
            if applied:
                opt.step()
            loss_sum += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
            step += 1
        dist.all_reduce(loss_sum)
        curves["epoch"].append(epoch + 1)
        curves["test_accuracy"].append(test_accuracy())
        curves["train_loss"].append(float(loss_sum[0] / loss_sum[1]) if loss_sum[1] else None)
        if diverged_at is not None:
            break
    wall = time.perf_counter() - t0
    stats = sync.stats()
    mine = torch.tensor([stats["bytes_sent"], stats["dense_bytes"]], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    sent = sum(float(t[0]) for t in everyone) / world
    dense_bytes = sum(float(t[1]) for t in everyone) / world
    # Every rank applies the same update, so the models must stay bit for bit the same.
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    accs = [a for a in curves["test_accuracy"] if a is not None]
    return {
        "seed": seed,
        "optimizer": optimizer,
        "lr": lr,
        "method": method["label"],
        "kind": kind,
        "density": density,
        "steps": step,
        "steps_planned": total,
        "diverged_at_step": diverged_at,
        "final_test_accuracy": accs[-1] if accs else None,
        "best_test_accuracy": max(accs) if accs else None,
        "bytes_sent_mean": sent,
        "bytes_ratio": sent / dense_bytes if dense_bytes else None,
        "skipped_steps": int(stats["skipped_steps"]),
        "max_param_difference_across_ranks": max(float((c - flat).abs().max()) for c in copies),
        "wall_seconds": wall,
        "curves": curves,
    }


def worker(rank: int, world: int, root: str, cfg: dict) -> None:
    """One rank: join the FileStore group and train every seed, optimizer and method in turn;
    rank 0 appends each run's record to ROOT/runs.jsonl as it ends."""
    from sparsetrain._procs import exit_finished_worker
    from sparsetrain.tasks import get_task

    with rank_in_group(rank, world, root, cfg["timeout"]):
        for seed in cfg["seeds"]:
            task = get_task(cfg["task"], seed=seed, **cfg["task_options"])
            for optimizer in cfg["optimizers"]:
                for method in methods_for(optimizer, cfg["densities"], cfg["methods"]):
                    run = run_one(cfg, task, seed, optimizer, method, rank, world)
                    if rank == 0:
                        with open(os.path.join(root, "runs.jsonl"), "a") as f:
                            f.write(json.dumps(run) + "\n")
                        why = f" DIVERGED at step {run['diverged_at_step']}" * (
                            run["diverged_at_step"] is not None
                        )
                        print(f"seed {seed} {optimizer:<6} {method['label']:<16} final "
                              f"{run['final_test_accuracy']:.4f} best "
                              f"{run['best_test_accuracy']:.4f} bytes {run['bytes_ratio']:.4f} "
                              f"{run['wall_seconds']:.1f} s{why}", flush=True)  # fmt: skip
    # Results are on disk: skip interpreter teardown, where gloo's threads can abort the process.
    exit_finished_worker(0)


# ---- the parent -------------------------------------------------------------------------------
def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(runs: list[dict]) -> list[dict]:
    """A row per optimizer and method: accuracies per seed and their mean, and the gap to the
    dense run of the same optimizer and seed (percentage points)."""
    dense = {(r["optimizer"], r["seed"]): r for r in runs if r["kind"] == "dense"}
    rows: dict[tuple, dict] = {}
    for r in runs:
        row = rows.setdefault((r["optimizer"], r["method"]), {
            "optimizer": r["optimizer"], "method": r["method"], "lr": r["lr"], "seeds": [],
            "final": [], "best": [], "gap_points": [], "bytes_ratio": [], "diverged": [],
        })  # fmt: skip
        base = dense.get((r["optimizer"], r["seed"]))
        row["seeds"].append(r["seed"])
        row["final"].append(r["final_test_accuracy"])
        row["best"].append(r["best_test_accuracy"])
        row["gap_points"].append(
            100 * (r["final_test_accuracy"] - base["final_test_accuracy"]) if base else None
        )
        row["bytes_ratio"].append(r["bytes_ratio"])
        row["diverged"].append(r["diverged_at_step"] is not None)
    for row in rows.values():
        for key in ("final", "best", "gap_points", "bytes_ratio"):
            row[f"{key}_mean"] = _mean(row[key])
        gaps = [g for g in row["gap_points"] if g is not None]
        row["gap_points_min"] = min(gaps) if gaps else None
        row["gap_points_max"] = max(gaps) if gaps else None
    return list(rows.values())


def print_table(rows: list[dict]) -> None:
    seeds = rows[0]["seeds"]
    each = "".join(f"{'s' + str(s):>8}" for s in seeds)
    gaps = "".join(f"{'Δs' + str(s):>8}" for s in seeds)
    print(f"{'optimizer':<10}{'method':<16}{'final':>8}{each}{'best':>8}{'Δ pts':>8}{gaps}"
          f"{'bytes':>8}")  # fmt: skip

    def cell(v, fmt):
        return format(v, fmt) if v is not None else format("-", ">" + fmt.split(".")[0])

    for r in rows:
        print(
            f"{r['optimizer']:<10}{r['method']:<16}{cell(r['final_mean'], '8.4f')}"
            + "".join(cell(a, "8.4f") for a in r["final"])
            + f"{cell(r['best_mean'], '8.4f')}{cell(r['gap_points_mean'], '+8.2f')}"
            + "".join(cell(g, "+8.2f") for g in r["gap_points"])
            + f"{cell(r['bytes_ratio_mean'], '8.4f')}"
            + ("  DIVERGED" if any(r["diverged"]) else "")
        )
    print(
        "final: test accuracy after the last epoch, mean over seeds, then each seed; best: the "
        "highest over epochs (mean); Δ pts: final minus dense's of the same optimizer and seed, "
        "percentage points; bytes: sent over a dense ring allreduce's (sync.stats())"
    )


def plot(runs: list[dict], rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = plt.subplots(
        1, len(optimizers), figsize=(4.6 * len(optimizers), 4.2), sharey=True, squeeze=False
    )
    for ax, optimizer in zip(axes[0], optimizers):
        mine = [r for r in rows if r["optimizer"] == optimizer]
        for i, row in enumerate(mine):
            curves = [r["curves"] for r in runs
                      if r["optimizer"] == optimizer and r["method"] == row["method"]]  # fmt: skip
            length = min(len(c["epoch"]) for c in curves)
            epochs = curves[0]["epoch"][:length]
            acc = [[c["test_accuracy"][j] for c in curves] for j in range(length)]
            ax.plot(epochs, [statistics.fmean(a) for a in acc], color=f"C{i}",
                    label=row["method"])  # fmt: skip
            if len(curves) > 1:
                ax.fill_between(epochs, [min(a) for a in acc], [max(a) for a in acc],
                                color=f"C{i}", alpha=0.15, linewidth=0)  # fmt: skip
        ax.set(xlabel="epoch", title=f"{optimizer} (lr {mine[0]['lr']:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("test accuracy (mean over seeds; band: min to max)")
    axes[0][0].set_ylim(bottom=max(0.0, axes[0][0].get_ylim()[0]))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{what}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", default="digits-mlp", choices=("digits-mlp", "digits-wide-mlp", "digits-cnn")
    )
    p.add_argument("--hidden", type=int, help="MLP width (default: the task's, 128 or 2048)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="subset of sgd,adam,adamw")
    p.add_argument("--methods", default=",".join(METHOD_KINDS),
                   help="subset of dense,ef,noef,mc (mc: SGD only)")  # fmt: skip
    p.add_argument("--densities", default="0.01", help="comma-separated top-k densities")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--sgd-lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD's (or the hook's, with mc)")
    p.add_argument(
        "--adam-lr",
        type=float,
        default=3e-3,
        help="Adam's and AdamW's (3e-3: dense Adam's best of 1e-3 and 3e-3, seed 0, 30 epochs)",
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, seed 0")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    p.add_argument("--name", help="stem of the JSON and PNG (default optimizers_<task>)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, "0"

    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    kinds = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        densities = _floats(args.densities, "--densities")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if not optimizers or set(optimizers) - set(OPTIMIZERS):
        p.error(f"--optimizers: give some of {', '.join(OPTIMIZERS)}, got {args.optimizers!r}")
    if not kinds or set(kinds) - set(METHOD_KINDS):
        p.error(f"--methods: give some of {', '.join(METHOD_KINDS)}, got {args.methods!r}")
    if not seeds or not all(0 < d <= 1 for d in densities):
        p.error("--seeds must name a seed and every density be in (0, 1]")
    if set(kinds) - {"dense"} and not densities:
        p.error("--densities: give a density for the top-k methods")
    if args.hidden is not None and args.task == "digits-cnn":
        p.error("--hidden is an MLP's width; digits-cnn has none")
    for key in ("epochs", "batch_size", "hidden"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.ranks < 2:
        p.error(f"--ranks must be at least 2, got {args.ranks}")
    if args.name is not None and (not args.name.strip() or "/" in args.name):
        p.error(f"--name must be a non-empty file stem without '/', got {args.name!r}")

    from sparsetrain._provenance import environment

    env = environment()  # when the run started, the command, the machine and the commit
    cfg = {"task": args.task, "task_options": {} if args.hidden is None else {"hidden": args.hidden},
           "optimizers": optimizers, "methods": kinds, "densities": densities, "seeds": seeds,
           "epochs": args.epochs, "batch_size": args.batch_size, "momentum": args.momentum,
           "lr": {"sgd": args.sgd_lr, "adam": args.adam_lr, "adamw": args.adam_lr},
           "optimizer_options": {k: v[1] for k, v in OPTIMIZERS.items()},
           "schedule": "cosine", "timeout": args.timeout}  # fmt: skip
    print(f"{args.task}, {args.ranks} ranks, {args.epochs} epochs, batch {args.batch_size} a rank, "
          f"seeds {seeds}, densities {densities}, lr {cfg['lr']}")  # fmt: skip
    t0 = time.monotonic()
    runs = run_ranks_in_temp(worker, args.ranks, cfg, args.timeout, "bench_optimizers",
                             lambda tmp: [json.loads(line) for line in
                                          (tmp / "runs.jsonl").read_text().splitlines()])  # fmt: skip
    if runs is None:
        return 1
    wall = time.monotonic() - t0

    rows = summarize(runs)
    print_table(rows)
    for r in runs:
        if r["max_param_difference_across_ranks"] != 0:
            print(f"WARNING seed {r['seed']} {r['optimizer']} {r['method']}: the ranks' models "
                  f"differ by up to {r['max_param_difference_across_ranks']:.3g}")  # fmt: skip
    print(f"wall time {wall:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"optimizers_{args.task}"
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    (out / f"{stem}.json").write_text(json.dumps(
        {"benchmark": "optimizers", "command_line": command, "environment": env,
         "args": vars(args), "config": cfg, "wall_seconds": wall, "summary": rows,
         "runs": runs}, indent=1))  # fmt: skip
    width = f" (hidden {args.hidden})" if args.hidden else ""
    plot(runs, rows, out / f"{stem}.png", f"{args.task}{width}, {args.ranks} ranks, "
         f"{args.epochs} epochs, seeds {','.join(map(str, seeds))}: dense against top-k")  # fmt: skip
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
