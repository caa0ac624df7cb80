"""How long ``launch()`` takes, launched several times from one Python process, with its
workers forked from the fork server (the default on Linux) or spawned (each importing torch
anew): digits-mlp, one epoch, as a notebook or a script that runs one job after another does.
Each start method runs in a fresh Python process of its own, one after the other; their
results (the same in both) are checked to be equal.

Usage::

    .venv/bin/python benchmarks/launch_start.py --workers 2 --launches 4 \\
        --out benchmarks/results/launch_start.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _one_method(method: str, workers: int, launches: int) -> dict:
    """Run in a process of its own: ``launches`` launches, their seconds and results."""
    import os

    from sparsetrain.train import TrainConfig, launch

    os.environ["SPARSETRAIN_START_METHOD"] = method  # spawn: what launch() did before
    seconds, accuracy = [], []
    for _ in range(launches):
        began = time.perf_counter()
        config = TrainConfig(
            task="digits-mlp", compressor="topk", density=0.01, workers=workers, epochs=1,
            progress=False,
        )  # fmt: skip
        run = launch(config)["runs"][0]
        seconds.append(time.perf_counter() - began)
        accuracy.append(run["final_test_accuracy"])
    out = {"method": method, "seconds": seconds, "final_test_accuracy": accuracy}
    if method == "forkserver":  # what the server holds of its own once the launches are done
        import multiprocessing.forkserver as forkserver

        pid = forkserver._forkserver._forkserver_pid
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["server_private_mib"] = int(fields["Private_Dirty"].split()[0]) / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--launches", type=int, default=4)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    p.add_argument("--method", choices=("forkserver", "spawn"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.method:  # the child process of one start method
        print(json.dumps(_one_method(args.method, args.workers, args.launches)))
        return 0
    from sparsetrain._provenance import environment

    results = []
    for method in ("forkserver", "spawn"):
        out = subprocess.run(
            [sys.executable, __file__, "--method", method, "--workers", str(args.workers),
             "--launches", str(args.launches)],  # fmt: skip
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        later = statistics.median(r["seconds"][1:]) if len(r["seconds"]) > 1 else float("nan")
        print(f"{method:>10}: first launch {r['seconds'][0]:.2f} s, later ones (median) "
              f"{later:.2f} s; final test accuracy {r['final_test_accuracy'][0]:.4f}")  # fmt: skip
        if "server_private_mib" in r:
            print(f"{'':>10}  the server holds {r['server_private_mib']:.0f} MiB of its own")
    same = results[0]["final_test_accuracy"] == results[1]["final_test_accuracy"]
    print(f"the same results under both: {same}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "workers": args.workers,
                    "launches": args.launches,
                    "results": results,
                    "same_results": same,
                    "environment": environment(argv),
                },
                indent=1,
            )
            + "\n"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
