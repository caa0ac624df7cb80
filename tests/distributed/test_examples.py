"""The examples a user copies run as documented: under torchrun, on a world that is not a power
of two, with every registered collective."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sparsetrain.comm import available_collectives

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_sparse_allreduce_example_runs_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "3", str(EXAMPLES / "sparse_allreduce.py"), "--numel", "20000", "--density", "0.01"]  # fmt: skip
    # --standalone rendezvouses on a free port of its own choosing
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = done.stdout
    assert "3 ranks, 20,000 elements, 200 a rank (cpu)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in available_collectives():
        assert name in lines, f"{name} missing from the example's table:\n{out}"
    for name in ("allgather", "ssar_rd", "ssar_split", "dsar"):
        assert "dense sum, max |error|" in lines[name] and "WRONG" not in lines[name]
    # Ok-Topk's selection of about k entries holds the largest sums (the paper's claim).
    assert "of them in the sum's top 200" in lines["oktopk"]
