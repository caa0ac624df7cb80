"""How closely the plain-DDP baseline resumes: digits-mlp with ``native_ddp=True`` (torch's own
allreduce, no hook) on N workers, run through once and again stopped at a step and resumed from
its checkpoint; prints how many significant digits of the training losses recorded after the
stop agree (docs/training.md, "Checkpoints and resuming").

On 2 workers the resumed run matches bit for bit (a sum of two does not depend on its order);
on 3, gloo's ring may add a bucket's three parts in another order after the restart.

Usage::

    .venv/bin/python benchmarks/native_ddp_resume.py --workers 3 --stop 13 \\
        --out benchmarks/results/native_ddp_resume.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from sparsetrain._provenance import environment
from sparsetrain.train import TrainConfig, launch


def _digits(a: float, b: float) -> float:
    """Significant digits in which ``a`` and ``b`` agree (inf where they are equal)."""
    if a == b:
        return math.inf
    return -math.log10(abs(a - b) / max(abs(a), abs(b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--stop", type=int, default=13, help="the step the first run stops at")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            task="digits-mlp", compressor="none", native_ddp=True, workers=args.workers,
            epochs=args.epochs, eval_every=args.eval_every, progress=False, timeout_s=300,
        )  # fmt: skip
        whole = launch(TrainConfig(checkpoint_dir=f"{tmp}/a", **common))["runs"][0]
        stopped = dict(checkpoint_dir=f"{tmp}/b", checkpoint_every=args.stop, **common)
        launch(TrainConfig(max_steps=args.stop, **stopped))
        resumed = launch(TrainConfig(resume=True, **stopped))["runs"][0]
    rows = []
    for step, a, b in zip(
        whole["curves"]["step"], whole["curves"]["train_loss"], resumed["curves"]["train_loss"]
    ):
        if step > args.stop:
            rows.append({"step": step, "uninterrupted": a, "resumed": b, "digits": _digits(a, b)})
            print(f"step {step:4d}  {a:.12g}  {b:.12g}  {_digits(a, b):.1f} digits agree")
    least = min(r["digits"] for r in rows)
    print(f"{args.workers} workers, stopped at step {args.stop}: the losses after it agree in "
          f"{least:.1f} significant digits or more")  # fmt: skip
    if args.out:
        result = {
            "benchmark": "native_ddp_resume",
            "environment": environment(),
            "workers": args.workers,
            "stop": args.stop,
            "rows": [
                {**r, "digits": None if math.isinf(r["digits"]) else r["digits"]} for r in rows
            ],  # fmt: skip
            "least_digits": None if math.isinf(least) else least,
        }
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
