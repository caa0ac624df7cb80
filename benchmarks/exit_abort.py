"""How often a short DDP script aborts as it exits, with and without sparsetrain.

A torch issue (pytorch/pytorch#190489): after a collective issued from Python on a gloo group
that a DDP model still holds, a process can abort at exit with "terminate called without an
active exception" (SIGABRT), when gloo's worker threads outlive the interpreter's shutdown.
``register_ddp_hook`` issues such a collective (its settings check on every rank), so a script
that registers the hook and exits without training can meet it. This script runs 2-rank
``torchrun`` jobs of each variant, ``--parallel`` jobs at once (the issue shows under load),
and counts the runs whose output holds that message:

* ``torch``: build DDP, ``all_gather_object``, ``destroy_process_group``; sparsetrain is not
  imported;
* ``hook``: build DDP, ``register_ddp_hook``, ``destroy_process_group``;
* ``none``: build DDP, ``destroy_process_group`` (no collective from Python);
* ``plain``: no DDP and no sparsetrain: ``all_gather_object`` and ``all_reduce``, then exit
  without ``destroy_process_group``;
* ``sync``: no DDP: ``GradientSync`` and three steps, then exit without
  ``destroy_process_group``;
* ``sync-destroy``: as ``sync``, then ``destroy_process_group``.

Usage::

    .venv/bin/python benchmarks/exit_abort.py --runs 40 --parallel 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_HEAD = """\
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
"""
_DDP = "model = DDP(net)\n"
_DESTROY = "dist.destroy_process_group()\n"
_SYNC = (
    "import sparsetrain\nsync = sparsetrain.GradientSync(net, 'threshold', density=0.01)\n"
    "for _ in range(3):\n    net(torch.randn(8, 20)).sum().backward()\n    sync.synchronize()\n"
)
VARIANTS = {
    "torch": _DDP + "out = [None] * dist.get_world_size()\n"
    "dist.all_gather_object(out, dist.get_rank())\n" + _DESTROY,
    "hook": _DDP + "import sparsetrain\n"
    "sparsetrain.register_ddp_hook(model, 'threshold', density=0.01)\n" + _DESTROY,
    "none": _DDP + _DESTROY,
    "plain": "out = [None] * dist.get_world_size()\ndist.all_gather_object(out, dist.get_rank())\n"
    "dist.all_reduce(torch.zeros(3))\n",
    "sync": _SYNC,
    "sync-destroy": _SYNC + _DESTROY,
}
MESSAGE = "terminate called without an active exception"


def _run(script: Path, timeout: float) -> tuple[bool, int]:
    """One 2-rank torchrun job: (whether it printed the abort message, its exit status)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script)]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, -1
    return MESSAGE in done.stdout + done.stderr, done.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=40, help="jobs of each variant")
    p.add_argument("--parallel", type=int, default=3, help="jobs at once")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a job")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants: valid are {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.runs < 1 or args.parallel < 1:
        p.error(f"--runs and --parallel must be at least 1, got {args.runs}, {args.parallel}")

    with tempfile.TemporaryDirectory(prefix="sparsetrain-exit-abort-") as tmp:
        scripts = {}
        for v in variants:
            scripts[v] = Path(tmp, f"exit_{v}.py")  # (not torch.py: it would import itself)
            scripts[v].write_text(_HEAD + VARIANTS[v])
        jobs = [v for _ in range(args.runs) for v in variants]  # the variants interleaved
        src = str(Path(__file__).resolve().parent.parent / "src")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [src, os.environ.get("PYTHONPATH")])
        )
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda v: (v, *_run(scripts[v], args.timeout)), jobs))
    print(f"2-rank torchrun jobs, {args.parallel} at once; runs that printed {MESSAGE!r}:")
    for v in variants:
        mine = [(hit, rc) for name, hit, rc in results if name == v]
        other = sum(1 for hit, rc in mine if rc != 0 and not hit)
        print(f"  {v:<12} {sum(hit for hit, _ in mine)} of {len(mine)}"
              + (f" ({other} other failures)" if other else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
