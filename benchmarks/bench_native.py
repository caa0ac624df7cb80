"""Benchmark sparsetrain's native CPU kernel, version by version, against the PyTorch ops.

On one large float32 tensor, side by side in one run (the measurements of one repetition are
taken one after the other, and the median over the repetitions is reported), so that the
ratios hold on a shared machine:

* ``read``: one read of the tensor (``sum``), the memory-bound floor of any selection;
* ``select/<version>``: the kernel's selection of ``|x| > threshold`` (positions written in
  ascending order), for each version of its vector pass this CPU can run (AVX2, SSE2,
  portable C);
* ``select/torch``: the threshold compressor's PyTorch path for the same selection
  (``hardshrink`` marks in cache-sized chunks, then ``nonzero`` over the mask's words, two
  levels deep at low density), which runs where the kernel cannot be built;
* ``compensate/<version>``: error feedback's fused pass (``out = grad + residual``, the
  selection with the values, the finiteness check and the clearing of ``grad``; four streams
  through memory) for each version. Its PyTorch counterpart, error feedback's compensation in
  cache-sized pieces with the compressor's marks, is timed in place by
  ``bench_sync_overhead.py`` (its ``general`` variants).

Every version's positions are checked against ``torch.nonzero(torch.hardshrink(x, t))``.

Usage:
    python benchmarks/bench_native.py                      # 25M floats, densities 1%, 0.1%, 0.01%
    python benchmarks/bench_native.py --numel 1000000 --repeat 3 --out /tmp/native.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sparsetrain import _native
from sparsetrain._ccache import compiler
from sparsetrain._provenance import environment
from sparsetrain.compressors.threshold import Threshold

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = {2: "AVX2", 1: "SSE2", 0: "portable C"}


@contextmanager
def kernel_off():
    """The PyTorch path: the kernel turned off as ``SPARSETRAIN_NATIVE=0`` does."""
    old = os.environ.get("SPARSETRAIN_NATIVE")
    os.environ["SPARSETRAIN_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPARSETRAIN_NATIVE"]
        else:
            os.environ["SPARSETRAIN_NATIVE"] = old


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def bench_density(x: torch.Tensor, residual: torch.Tensor, density: float, repeat: int) -> dict:
    n = x.numel()
    k = max(1, int(density * n))
    threshold = float(x.abs().kthvalue(n - k).values) if k < n else 0.0  # density 1: all
    expected = torch.nonzero(torch.hardshrink(x, threshold)).squeeze(1)
    levels = [lv for lv in LEVELS if _native.vector_level(lv) == LEVELS[lv]]
    _native.vector_level(-1)
    comp = Threshold(density=density)
    hits = torch.empty(n // 16 + 2 * k + 1, dtype=torch.int64)
    values = torch.empty(hits.numel(), dtype=x.dtype)
    grad, out = torch.empty_like(x), torch.empty_like(x)

    def select_native() -> torch.Tensor:
        return hits[: _native.select(x, threshold, hits)]

    def select_torch() -> torch.Tensor:
        with kernel_off():
            return comp._select(x, threshold, expected=k)

    def compensate_native() -> int:
        count, _ = _native.compensate_select(
            grad, residual, out, threshold, 0, hits, 0, clear=True, values=values
        )
        return count

    for level in levels:  # every version selects exactly what hardshrink keeps
        _native.vector_level(level)
        if not torch.equal(select_native(), expected):
            raise SystemExit(f"the {LEVELS[level]} version selected other positions")
    _native.vector_level(-1)
    if not torch.equal(select_torch(), expected):
        raise SystemExit("the PyTorch path selected other positions")

    times: dict[str, list[float]] = {}

    def clock(name: str, fn, before=None) -> None:
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)

    def fill() -> None:  # a fresh gradient for each fused pass, which clears it
        grad.copy_(x)

    for _ in range(repeat):
        clock("read", lambda: float(x.sum()))
        for level in levels:
            _native.vector_level(level)
            clock(f"select/{LEVELS[level]}", select_native)
            clock(f"compensate/{LEVELS[level]}", compensate_native, fill)
        _native.vector_level(-1)
        clock("select/torch", select_torch)
    result = {name: median_ms(ts) for name, ts in times.items()}
    return {"density": density, "k": k, "selected": expected.numel(), "median_ms": result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=25_000_000, help="tensor size (float32)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.001, 0.0001])
    p.add_argument("--repeat", type=int, default=9, help="timed calls of each, interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "native.json")
    args = p.parse_args(argv)
    if args.numel < 1 or args.repeat < 1:
        p.error("--numel and --repeat must be >= 1")
    bad = [d for d in args.densities if not 0 < d <= 1]
    if bad:
        p.error(f"--densities must be in (0, 1], got {bad}")
    if _native.library() is None:
        print(f"no native kernel here: {_native.unavailable_reason() or 'turned off'}")
        return 1
    torch.set_num_threads(1)  # as the training workers run
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.numel, generator=gen)
    residual = torch.randn(args.numel, generator=gen).mul_(0.1)
    rows = []
    for density in args.densities:
        row = bench_density(x, residual, density, args.repeat)
        rows.append(row)
        print(f"\ndensity {density:g} (k = {row['k']:,}, {row['selected']:,} selected):")
        for name, ms in row["median_ms"].items():
            vs = row["median_ms"]["read"]
            print(f"  {name:<24} {ms:8.1f} ms   {ms / vs:5.2f}x one read")
    result = {
        "benchmark": "native",
        "command": "python benchmarks/bench_native.py " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "best_version": _native.vector_level(),
        "compiler": _compiler(),  # (the portable C version's speed is the compiler's)
        "environment": environment(),
        "numel": args.numel,
        "repeat": args.repeat,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


def _compiler() -> str | None:
    """The first line of ``$CC --version`` (the kernels' compiler), or None."""
    try:
        out = subprocess.run([*compiler(), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None


if __name__ == "__main__":
    sys.exit(main())
