"""What a gradient sync costs the host per parameter tensor, at the same number of elements.

A transformer has hundreds of parameter tensors, many of them small (biases, norms' weights):
work the sync does once a tensor, in Python, then adds up. This times one exchange of the same
number of elements split into few or many tensors, on one process (a one-rank gloo group, so
nothing crosses a wire and only the host's work is timed):

* ``engine``: :meth:`SyncEngine.exchange` of one flat bucket, as the DDP hook calls it;
* ``sync``: :meth:`GradientSync.synchronize` over the model's own ``.grad`` tensors.

The model is a stack of ``Linear(d, d)`` and ``LayerNorm(d)`` blocks (4 tensors a block), ``d``
chosen so that every size has about ``--elements`` elements. The variants are timed in rounds,
one after the other, so that the machine's noise falls on all of them alike; each number is the
median over rounds of a round's median step. The result that matters is the ratio of many
tensors to few in the same run, and the cost of one more tensor (the slope between the two).

Usage::

    python benchmarks/bench_many_tensors.py --out benchmarks/results/many_tensors.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sparsetrain  # noqa: E402
from sparsetrain._provenance import environment  # noqa: E402
from sparsetrain.sync import SyncEngine  # noqa: E402
from sparsetrain.sync.config import make_config  # noqa: E402


def build_model(tensors: int, elements: int) -> nn.Module:
    blocks = max(1, tensors // 4)
    d = int(math.sqrt(elements / blocks))
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, d), nn.LayerNorm(d)]
    return nn.Sequential(*layers)


def timers(tensors: int, elements: int, compressor: str, collective: str) -> dict:
    """The two timed steps of one variant; the gradients are refilled outside the timing."""
    torch.manual_seed(0)
    model = build_model(tensors, elements)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    density = None if compressor == "none" else 0.01
    options = {"collective": collective}
    sync = sparsetrain.GradientSync(model, compressor, density, bucket_cap_mb=1e6, **options)
    engine = SyncEngine(make_config(compressor, density, options, caller="bench"))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    engine.reserve(names, shapes, torch.float32, torch.device("cpu"))
    flat_noise = torch.cat([g.reshape(-1) for g in noise])
    flat = flat_noise.clone()

    def sync_step() -> float:
        for p, g in zip(model.parameters(), noise):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        t0 = time.perf_counter()
        sync.synchronize()
        return time.perf_counter() - t0

    def engine_step() -> float:
        flat.copy_(flat_noise)
        t0 = time.perf_counter()
        engine.exchange(flat, names, shapes)
        engine.end_step()
        return time.perf_counter() - t0

    return {"engine": engine_step, "sync": sync_step, "tensors": len(names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", default="48,600", help="comma-separated numbers of tensors")
    ap.add_argument("--elements", type=int, default=2_000_000)
    ap.add_argument(
        "--variants",
        default="none+allgather,threshold+allgather,threshold+oktopk",
        help="comma-separated compressor+collective",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps a round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = environment()  # when the run started, and on what
    with tempfile.TemporaryDirectory(prefix="bench_many_tensors_") as root:
        store = dist.FileStore(os.path.join(root, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            rows = run(args)
        finally:
            dist.destroy_process_group()
    report = {"benchmark": "many_tensors", **env, "elements": args.elements, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


def run(args: argparse.Namespace) -> list[dict]:
    sizes = [int(t) for t in args.tensors.split(",")]
    variants = [tuple(v.split("+")) for v in args.variants.split(",")]
    cases: dict[tuple, tuple] = {}
    for size in sizes:
        for compressor, collective in variants:
            fns = timers(size, args.elements, compressor, collective)
            for api in ("engine", "sync"):
                for _ in range(args.warmup):
                    fns[api]()
                cases[(size, compressor, collective, api)] = (fns[api], [], fns["tensors"])
    for r in range(args.rounds):
        for fn, medians, _ in cases.values():
            medians.append(statistics.median(fn() for _ in range(args.steps)) * 1e3)
        print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
    rows = []
    print(f"{'variant':22s} {'api':6s} " + " ".join(f"{s:>6d} t" for s in sizes) + "  us/tensor")
    for compressor, collective in variants:
        for api in ("engine", "sync"):
            ms = [statistics.median(cases[(s, compressor, collective, api)][1]) for s in sizes]
            counts = [cases[(s, compressor, collective, api)][2] for s in sizes]
            slope = (ms[-1] - ms[0]) * 1e3 / (counts[-1] - counts[0]) if len(sizes) > 1 else None
            rows.append(
                {
                    "compressor": compressor,
                    "collective": collective,
                    "api": api,
                    "tensors": counts,
                    "ms": ms,
                    "ms_rounds": [cases[(s, compressor, collective, api)][1] for s in sizes],
                    "us_per_tensor": slope,
                }
            )
            cells = " ".join(f"{m:7.2f}ms" for m in ms)
            print(f"{compressor + '+' + collective:22s} {api:6s} {cells}  {slope or 0:7.1f}")
    return rows


if __name__ == "__main__":
    main()
