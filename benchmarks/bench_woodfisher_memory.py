"""Peak memory of one WoodFisher pruning step, the blocks worked through in 64 MiB slices (the
library's way) against all at once (how the update and the OBS solve ran before), side by side:
each in a fresh process, whose peak resident memory (ru_maxrss) is read after the step.

Usage::

    .venv/bin/python benchmarks/bench_woodfisher_memory.py --out benchmarks/results/woodfisher_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys
import torch
from torch import nn
from sparsetrain.pruning import get_pruner, woodfisher

width, block, samples, chunk = (int(a) for a in sys.argv[1:5])
woodfisher.CHUNK_BYTES = chunk
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
x, y = torch.randn(64, width), torch.randint(0, 10, (64,))
calls = iter(range(10**9))

def closure():
    j = next(calls) % 64
    return nn.functional.cross_entropy(model(x[j : j + 1]), y[j : j + 1])

pruner = get_pruner("woodfisher", sparsity=0.5, fisher_samples=samples, block_size=block,
                    max_memory_bytes=2**40).prepare(model)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pruner.prune(closure=closure)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() for p in pruner._weights.values())
inverses = pruner._layout.num_blocks * block**2 * 4
print(json.dumps({"weights": weights, "inverse_bytes": inverses, "before_bytes": before,
                  "peak_bytes": peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--width", type=int, default=1024, help="the MLP's hidden width")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--fisher-samples", type=int, default=16)
    ap.add_argument("--out", type=Path, help="JSON path")
    args = ap.parse_args()
    runs = {}
    for label, chunk in (("slices of 64 MiB", 64 * 2**20), ("all blocks at once", 2**62)):
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.width), str(args.block_size),
             str(args.fisher_samples), str(chunk)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        runs[label] = json.loads(res.stdout.strip().splitlines()[-1])
        r = runs[label]
        print(
            f"{label:>18}: {r['weights']:,} weights, inverses {r['inverse_bytes'] / 2**20:.0f} MiB; "
            f"peak {r['peak_bytes'] / 1e9:.2f} GB (before the step {r['before_bytes'] / 1e9:.2f} GB)"
        )
    if args.out:
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)},
                                        "runs": runs}, indent=1))  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
