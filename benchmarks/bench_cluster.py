"""Sparse collectives against dense allreduce on an emulated bandwidth-limited cluster.

The same as ``sparsetrain bench cluster`` (see :mod:`sparsetrain.commands.bench`): builds RANKS
network namespaces with tc-shaped links, times dense allreduce and every registered sparse
collective over sizes and densities, fits the cost model, and writes JSON, one PNG per size and
a table of medians with the ratios to dense allreduce and to allgather. Needs root.

Usage (the goal point of issue 3: 8 ranks, 1 Gbit/s, 25M elements, density 1%)::

    sudo .venv/bin/python benchmarks/bench_cluster.py --ranks 8 --bandwidth 1gbit \
        --latency 100us --sizes 25M --densities 0.01
    sudo .venv/bin/python benchmarks/bench_cluster.py --full       # 1M-25M x 0.1%-10%
"""

from __future__ import annotations

import argparse
import sys

from sparsetrain.commands import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cluster")
    sub = parser.add_subparsers()
    bench.register(sub)
    args = parser.parse_args(["bench", "cluster", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
