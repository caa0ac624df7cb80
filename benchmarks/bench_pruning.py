"""Pruning goals of issue 4 on digits-mlp, measured side by side in one run.

1. One-shot to 90% sparsity, no fine-tuning: test accuracy of WoodFisher (with the OBS update),
   its diagonal OBD-like variant, and global / layer-wise magnitude pruning, from the same dense
   model, averaged over seeds.
2. Gradual (cubic) pruning to 90% with fine-tuning, magnitude and WoodFisher, against dense.

Usage::

    .venv/bin/python benchmarks/bench_pruning.py --seeds 0 1 2 --out benchmarks/results/pruning.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparsetrain._provenance import environment
from sparsetrain.commands.prune import PruneConfig, oneshot_accuracy, run_method, train_dense

ONESHOT = {
    "magnitude (global)": ("magnitude", {"scope": "global"}),
    "magnitude (layer)": ("magnitude", {"scope": "layer"}),
    "woodfisher-obd (no update)": ("woodfisher", {"obs_update": False}),
    "woodfisher (OBS)": ("woodfisher", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--fisher-samples", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--damping", type=float, default=1e-5)
    ap.add_argument("--out", default="benchmarks/results/pruning.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    wf = {
        "fisher_samples": args.fisher_samples,
        "block_size": args.block_size,
        "damping": args.damping,
    }
    rows: dict[str, list[float]] = {"dense": []}
    gradual: dict[str, list[float]] = {"dense": []}
    start = time.perf_counter()
    for seed in args.seeds:
        cfg = PruneConfig(seed=seed, sparsity=args.sparsity, progress=False, **wf)
        task, dense, dense_acc = train_dense(cfg)
        rows["dense"].append(dense_acc)
        gradual["dense"].append(dense_acc)
        for label, (method, opts) in ONESHOT.items():
            c = PruneConfig(seed=seed, sparsity=args.sparsity, progress=False, **wf, **opts)
            acc = oneshot_accuracy(dense, task, method, args.sparsity, c, seed=seed)[2]
            rows.setdefault(label, []).append(acc)
        for method in ("magnitude", "woodfisher"):
            c = PruneConfig(
                seed=seed, sparsity=args.sparsity, schedule="gradual", progress=False, **wf
            )
            res = run_method(method, c, task, dense, dense_acc)
            gradual.setdefault(method, []).append(res["final"]["test_accuracy"])
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)

    def mean(v: list[float]) -> float:
        return statistics.fmean(v)

    print(
        f"\nOne-shot to {args.sparsity:.0%} on digits-mlp, no fine-tuning ({len(args.seeds)} seeds):"
    )
    print(f"{'method':<28}{'test acc':>10}{'vs global magnitude':>22}")
    base = mean(rows["magnitude (global)"])
    for label, v in rows.items():
        print(f"{label:<28}{mean(v):>10.4f}{mean(v) - base:>+22.4f}")
    print(f"\nGradual (cubic) to {args.sparsity:.0%} with fine-tuning:")
    print(f"{'method':<28}{'test acc':>10}{'vs dense (points)':>22}")
    for label, v in gradual.items():
        print(f"{label:<28}{mean(v):>10.4f}{100 * (mean(v) - mean(gradual['dense'])):>+22.2f}")
    out = {
        "task": "digits-mlp",
        "sparsity": args.sparsity,
        "seeds": args.seeds,
        "woodfisher": wf,
        "oneshot_no_finetune": {k: {"per_seed": v, "mean": mean(v)} for k, v in rows.items()},
        "gradual_finetuned": {k: {"per_seed": v, "mean": mean(v)} for k, v in gradual.items()},
        "seconds": time.perf_counter() - start,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
