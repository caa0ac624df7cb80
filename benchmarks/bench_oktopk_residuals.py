"""Ok-Topk's two error-feedback schemes on i.i.d. and on label-skewed (non-i.i.d.) ranks.

Ok-Topk (``collective="oktopk"``) keeps what its global selection drops in one of two ways:
``residuals="local"`` (the paper's: each rank puts back its own values that the selection
dropped) or ``"owner"`` (each region owner keeps the reduced sums of its region below the
threshold). Where the ranks' gradients keep opposite signs their sum is never selected and
the local residuals can grow without bound. This benchmark asks whether that happens on real
non-i.i.d. data and costs accuracy: it trains digits-mlp on RANKS gloo processes of this
machine, each drawing its batches from its own shard of the training set, once per method:

* ``dense`` (``"none"``: the uncompressed allreduce, the reference),
* ``topk+allgather`` (exact top-k at DENSITY, every rank's entries applied; per-rank residuals),
* ``oktopk+local`` (``threshold`` at DENSITY, Ok-Topk, ``residuals="local"``),
* ``oktopk+owner`` (the same with ``residuals="owner"``),

all through ``sparsetrain.GradientSync`` with the same seed, initial model, shards and batches.
``--split iid`` deals the training set out at random; ``--split label`` gives rank r the
classes r*C, ..., r*C+C-1 (mod 10, C = ``--classes-per-rank``), each class shared evenly by the
ranks that have it, or with ``--alpha`` the shares of each class drawn from a Dirichlet(alpha).
An epoch is one pass over the whole training set by all ranks together (each rank cycles
through its own shard, reshuffled at its end). Recorded per method: test accuracy on the full
test split (rank 0, every ``--eval-every`` steps), the residual norms of every rank (their
largest and mean, and the norm of the ranks' mean residual, every ``--record-every`` steps),
bytes sent (``sync.stats()``), and whether the ranks' models stayed identical. Writes
OUT/NAME.json and OUT/NAME.png (accuracy vs step; residual norm vs step, log scale) and prints
a summary table.

Usage::

    .venv/bin/python benchmarks/bench_oktopk_residuals.py --split label --classes-per-rank 3 \
        --ranks 4 --epochs 60 --density 0.01 --seed 0 --out benchmarks/results \
        --name oktopk_residuals_label
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from _ranks import (  # benchmarks/_ranks.py (run as a script: this folder is on the path)
    rank_in_group,
    run_ranks_in_temp,
)

METHODS = {  # label: (compressor, collective, collective options, uses density)
    "dense": ("none", "allgather", None, False),
    "topk+allgather": ("topk", "allgather", None, True),
    "oktopk+local": ("threshold", "oktopk", {"residuals": "local"}, True),
    "oktopk+owner": ("threshold", "oktopk", {"residuals": "owner"}, True),
}
TASK = "digits-mlp"


# ---- data -------------------------------------------------------------------------------------
def partition(
    labels, world: int, split: str, classes_per_rank: int, alpha: float | None, seed: int
) -> list:
    """Return each rank's training indices (disjoint, covering the training set).

    ``iid``: a random deal. ``label`` with ``alpha`` None: rank r has the classes
    ``(r*C + j) mod K``, j < C; each class is split evenly among the ranks that have it, and a
    class no rank has (RANKS*C < K) goes to rank ``class mod RANKS``. With ``alpha``: each
    class is split among all ranks in Dirichlet(alpha) proportions (small alpha: more skew).
    """
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    if split == "iid":
        perm = torch.randperm(n, generator=gen)
        return [perm[r::world].sort().values for r in range(world)]
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    parts: list[list] = [[] for _ in range(world)]
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if alpha is not None:
            share = rng.dirichlet([alpha] * world)
            cuts = np.round(np.cumsum(share) * len(idx)).astype(int)
            bounds = [0, *cuts[:-1].tolist(), len(idx)]
            owners = list(range(world))
        else:
            owners = [
                r for r in range(world) if c in {(r * classes_per_rank + j) % num_classes
                                                 for j in range(classes_per_rank)}
            ] or [c % world]  # fmt: skip
            bounds = [round(i * len(idx) / len(owners)) for i in range(len(owners) + 1)]
        for i, r in enumerate(owners):
            parts[r].append(idx[bounds[i] : bounds[i + 1]])
    shards = [torch.cat(p).sort().values for p in parts]
    empty = [r for r, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise ValueError(f"ranks {empty} got no training examples; raise --alpha or change --seed")
    return shards


class ShardBatches:
    """Batches drawn from one rank's shard: a fresh permutation each pass, seeded per rank."""

    def __init__(self, shard, batch_size: int, seed: int):
        import torch

        self.shard, self.batch_size = shard, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order = shard[:0]

    def next(self):
        import torch

        while len(self.order) < self.batch_size:
            perm = self.shard[torch.randperm(len(self.shard), generator=self.gen)]
            self.order = torch.cat([self.order, perm])
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return idx


# ---- one rank ---------------------------------------------------------------------------------
def _residual_vector(sync, params) -> object:
    """This rank's residuals of every parameter, in the model's order (zeros where none)."""
    import torch

    res = sync.engine.feedback.residuals
    return torch.cat(
        [res[n].reshape(-1).float() if n in res else torch.zeros(p.numel()) for n, p in params]
    )


def run_method(label: str, cfg: dict, task, shard, rank: int, world: int) -> dict:
    """Train one method on this rank; return its curves and counters (rank 0's evaluations)."""
    import torch
    import torch.distributed as dist

    import sparsetrain
    from sparsetrain.train import evaluate, sgd

    compressor, collective, copts, sparse = METHODS[label]
    torch.manual_seed(cfg["seed"])  # the same initial model on every rank and for every method
    model = task.build_model()
    params = list(model.named_parameters())
    opt = sgd(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    sync = sparsetrain.GradientSync(
        model,
        compressor,
        density=cfg["density"] if sparse else None,
        collective=collective,
        **({"collective_options": dict(copts)} if copts else {}),
    )
    batches = ShardBatches(shard, cfg["batch_size"], cfg["seed"] * 1_000_003 + rank)
    x_all, y_all = task.train.tensors
    steps = cfg["steps"]
    curves: dict[str, list] = {"eval_step": [], "test_accuracy": [], "test_loss": [],
                               "record_step": [], "train_loss": [], "residual_norm_max": [],
                               "residual_norm_mean": [], "residual_norm_of_mean": [],
                               "residual_absmax": []}  # fmt: skip
    bar = None
    if rank == 0 and cfg["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=label, unit="step", leave=True)
    losses = []
    t0 = time.perf_counter()
    eval_seconds = 0.0
    for step in range(1, steps + 1):
        idx = batches.next()
        opt.zero_grad()
        loss = task.loss_fn(model(x_all[idx]), y_all[idx])
        loss.backward()
        if sync.synchronize():
            opt.step()
        losses.append(float(loss.detach()))
        if step % cfg["record_every"] == 0 or step == steps:
            vec = _residual_vector(sync, params)
            mine = torch.tensor(
                [float(vec.norm()), float(vec.abs().max()) if vec.numel() else 0.0,
                 sum(losses) / len(losses)], dtype=torch.float64,
            )  # fmt: skip
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            dist.all_reduce(vec)  # the ranks' residuals summed: what they would apply together
            table = torch.stack(everyone)
            curves["record_step"].append(step)
            curves["residual_norm_max"].append(float(table[:, 0].max()))
            curves["residual_norm_mean"].append(float(table[:, 0].mean()))
            curves["residual_norm_of_mean"].append(float(vec.norm()) / world)
            curves["residual_absmax"].append(float(table[:, 1].max()))
            curves["train_loss"].append(float(table[:, 2].mean()))
            losses = []
        if step % cfg["eval_every"] == 0 or step == steps:
            if rank == 0:
                te = time.perf_counter()
                test_loss, acc = evaluate(model, task.test, task.loss_fn, torch.device("cpu"))
                eval_seconds += time.perf_counter() - te
                curves["eval_step"].append(step)
                curves["test_accuracy"].append(acc)
                curves["test_loss"].append(test_loss)
                if bar is not None:
                    bar.set_postfix(acc=f"{acc:.3f}", res=f"{curves['residual_norm_max'][-1]:.3g}")
        if bar is not None:
            bar.update(1)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    stats = sync.stats()
    mine = torch.tensor([stats["bytes_sent"], stats["dense_bytes"]], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    sent = [float(t[0]) for t in everyone]
    # Every rank applies the same update, so the models must stay bit for bit the same.
    flat = torch.cat([p.detach().reshape(-1) for _, p in params])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    divergence = max(float((c - flat).abs().max()) for c in copies)
    return {
        "label": label,
        "compressor": compressor,
        "collective": collective,
        "collective_options": copts or {},
        "density": cfg["density"] if sparse else None,
        "steps": steps,
        "wall_seconds": wall,
        "eval_seconds": eval_seconds,
        "final_test_accuracy": curves["test_accuracy"][-1] if rank == 0 else None,
        "best_test_accuracy": max(curves["test_accuracy"]) if rank == 0 else None,
        "bytes_sent_per_rank": sent,
        "bytes_sent_mean": sum(sent) / world,
        "dense_bytes_per_rank": float(stats["dense_bytes"]),
        "bytes_ratio_mean": sum(sent) / world / stats["dense_bytes"]
        if stats["dense_bytes"]
        else None,
        "skipped_steps": int(stats["skipped_steps"]),
        "max_param_difference_across_ranks": divergence,
        "curves": curves,
    }


def worker(rank: int, world: int, root: str, cfg: dict) -> None:
    """One rank: join the FileStore group, train every method in turn, rank 0 writes results."""
    import torch

    from sparsetrain.tasks import get_task

    with rank_in_group(rank, world, root, cfg["timeout"]):
        task = get_task(TASK, seed=cfg["seed"], hidden=cfg["hidden"])
        labels = task.train.tensors[1]
        shards = partition(labels, world, cfg["split"], cfg["classes_per_rank"], cfg["alpha"],
                           cfg["seed"])  # fmt: skip
        runs = [run_method(m, cfg, task, shards[rank], rank, world) for m in cfg["methods"]]
        if rank == 0:
            classes = [torch.bincount(labels[s], minlength=task.num_classes).tolist()
                       for s in shards]  # fmt: skip
            out = {"runs": runs, "shard_class_counts": classes,
                   "train_examples": len(labels), "test_examples": len(task.test)}  # fmt: skip
            Path(root, "result.json").write_text(json.dumps(out))


# ---- the parent -------------------------------------------------------------------------------
def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_res) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, run in enumerate(result["runs"]):
        c, color = run["curves"], f"C{i}"
        ax_acc.plot(c["eval_step"], c["test_accuracy"], marker=".", color=color,
                    label=run["label"])  # fmt: skip
        for key, style, what in (("residual_norm_max", "-", "largest"),
                                 ("residual_norm_mean", "--", "mean")):  # fmt: skip
            pts = [(s, v) for s, v in zip(c["record_step"], c[key]) if v > 0]
            if pts:
                ax_res.plot(*zip(*pts), style, color=color, label=f"{run['label']} ({what})")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy (full test split)")
    ax_res.set(xlabel="step", ylabel="L2 norm of a rank's residuals",
               title="residual norm over ranks (solid: largest, dashed: mean)")  # fmt: skip
    ax_res.set_yscale("log")
    for ax in (ax_acc, ax_res):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(result: dict) -> list[dict]:
    runs = {r["label"]: r for r in result["runs"]}
    dense = runs.get("dense")
    rows = []
    for label, run in runs.items():
        c = run["curves"]
        acc = run["final_test_accuracy"]
        rows.append({
            "method": label,
            "final_test_accuracy": acc,
            "best_test_accuracy": run["best_test_accuracy"],
            "delta_vs_dense_points": 100 * (acc - dense["final_test_accuracy"]) if dense else None,
            "residual_norm_max_end": c["residual_norm_max"][-1],
            "residual_norm_mean_end": c["residual_norm_mean"][-1],
            "residual_norm_of_mean_end": c["residual_norm_of_mean"][-1],
            "residual_norm_max_peak": max(c["residual_norm_max"]),
            "residual_absmax_end": c["residual_absmax"][-1],
            "bytes_sent_mean": run["bytes_sent_mean"],
            "bytes_ratio_vs_dense_allreduce": run["bytes_ratio_mean"],
            "wall_seconds": run["wall_seconds"],
            "max_param_difference_across_ranks": run["max_param_difference_across_ranks"],
        })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'method':<16}{'final acc':>10}{'best':>8}{'Δ pts':>8}{'res max':>10}{'res mean':>10}"
          f"{'‖mean res‖':>11}{'res peak':>10}{'MB/rank':>9}{'vs dense':>9}{'s':>7}")  # fmt: skip
    for r in rows:
        delta = r["delta_vs_dense_points"]
        ratio = r["bytes_ratio_vs_dense_allreduce"]
        print(
            f"{r['method']:<16}{r['final_test_accuracy']:>10.4f}{r['best_test_accuracy']:>8.4f}"
            f"{delta if delta is not None else math.nan:>+8.2f}"
            f"{r['residual_norm_max_end']:>10.3g}{r['residual_norm_mean_end']:>10.3g}"
            f"{r['residual_norm_of_mean_end']:>11.3g}{r['residual_norm_max_peak']:>10.3g}"
            f"{r['bytes_sent_mean'] / 1e6:>9.2f}{ratio if ratio else math.nan:>9.3f}"
            f"{r['wall_seconds']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--epochs", type=int, default=60, help="passes over the training set")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--split", choices=("iid", "label"), default="label")
    p.add_argument(
        "--classes-per-rank", type=int, default=3, help="--split label: classes a rank has"
    )
    p.add_argument("--alpha", type=float, help="--split label: Dirichlet(alpha) shares instead")
    p.add_argument("--hidden", type=int, default=128, help="digits-mlp width")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument(
        "--eval-every", type=int, default=0, help="steps between evaluations (0: an epoch)"
    )
    p.add_argument("--record-every", type=int, default=5, help="steps between residual records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    p.add_argument("--name", help="stem of the JSON and PNG (default oktopk_residuals_<split>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        p.error(f"--methods: unknown {bad or 'empty'}; valid: {', '.join(METHODS)}")
    if args.ranks < 2:
        p.error(f"--ranks must be at least 2, got {args.ranks}")
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    if args.classes_per_rank < 1 or (args.alpha is not None and not args.alpha > 0):
        p.error("--classes-per-rank must be at least 1 and --alpha above 0")
    for key in ("epochs", "batch_size", "record_every"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.name is not None and (not args.name.strip() or "/" in args.name):
        p.error(f"--name must be a non-empty file stem without '/', got {args.name!r}")

    from sparsetrain._provenance import environment
    from sparsetrain.tasks import get_task

    env = environment()
    n_train = len(get_task(TASK, seed=args.seed, hidden=args.hidden).train)
    steps_per_epoch = math.ceil(n_train / (args.ranks * args.batch_size))
    cfg = {**{k: getattr(args, k) for k in ("density", "split", "classes_per_rank", "alpha",
                                              "hidden", "batch_size", "lr", "momentum", "seed",
                                              "record_every", "timeout")},
           "methods": methods, "progress": not args.no_progress,
           "steps": args.epochs * steps_per_epoch,
           "eval_every": args.eval_every or steps_per_epoch}  # fmt: skip
    result = run_ranks_in_temp(worker, args.ranks, cfg, args.timeout, "bench_oktopk_residuals",
                               lambda tmp: json.loads((tmp / "result.json").read_text()))  # fmt: skip
    if result is None:
        return 1

    rows = summarize(result)
    skew = ("iid" if args.split == "iid" else f"Dirichlet alpha {args.alpha:g}"
            if args.alpha is not None else f"{args.classes_per_rank} classes a rank")  # fmt: skip
    print(
        f"{TASK} (hidden {args.hidden}), {args.ranks} ranks, {skew}, density {args.density:g}, "
        f"{cfg['steps']} steps ({args.epochs} epochs of {steps_per_epoch}), seed {args.seed}"
    )
    print("training examples of each class on each rank:")
    for r, counts in enumerate(result["shard_class_counts"]):
        print(f"  rank {r}: {counts}")
    print_table(rows)
    print(
        "res max / res mean: the largest and mean L2 norm of a rank's residuals at the end; "
        "‖mean res‖: norm of the ranks' mean residual; res peak: the largest over the run"
    )
    for r in rows:
        if r["max_param_difference_across_ranks"] != 0:
            print(f"WARNING {r['method']}: the ranks' models differ by up to "
                  f"{r['max_param_difference_across_ranks']:.3g}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"oktopk_residuals_{args.split}"
    (out / f"{stem}.json").write_text(json.dumps(
        {"args": vars(args), "environment": env, "task": TASK, "steps_per_epoch": steps_per_epoch,
         "config": cfg, "summary": rows, **result}, indent=1))  # fmt: skip
    plot(result, out / f"{stem}.png", f"{TASK}, {args.ranks} ranks, {skew}, density "
         f"{args.density:g}, seed {args.seed}")  # fmt: skip
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
