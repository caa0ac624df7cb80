"""The examples a user copies run as documented: under torchrun, on a world that is not a power
of two, with every registered collective."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from sparsetrain.comm import available_collectives
from tests.states import same

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def torchrun(ranks: int, script: str, *args: str, status: int = 0) -> str:
    """Run an example as its docstring says; return its stdout and stderr (it must exit with
    ``status``)."""
    # on the CPU over gloo even where there are GPUs: the assertions below are about that run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # --standalone rendezvouses on a free port of its own choosing
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), str(EXAMPLES / script), *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout if status == 0 else done.stdout + done.stderr


def test_sparse_allreduce_example_runs_under_torchrun():
    out = torchrun(3, "sparse_allreduce.py", "--numel", "20000", "--density", "0.01")
    assert "3 ranks, 20,000 elements, 200 a rank (cpu)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in available_collectives():
        assert name in lines, f"{name} missing from the example's table:\n{out}"
    for name in ("allgather", "ssar_rd", "ssar_split", "dsar"):
        assert "dense sum, max |error|" in lines[name] and "WRONG" not in lines[name]
    # The selections, the same on every rank (else the example exits 1), hold about k entries,
    # nearly all among the k largest sums.
    for name in ("oktopk", "gtopk"):
        found = re.search(r"([\d,]+) entries selected, ([\d,]+) of them in the sum's top 200",
                          lines[name])  # fmt: skip
        assert found, lines[name]
        selected, hits = (int(g.replace(",", "")) for g in found.groups())
        assert 150 <= selected <= 300 and hits >= 180, lines[name]


def test_ddp_hook_example_learns_and_resumes_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = torchrun(2, "ddp_hook.py", "--epochs", "3", "--checkpoint", str(whole))
    last = out.strip().splitlines()[-1]
    accuracy, share = re.search(r"test accuracy ([\d.]+)%, ([\d.]+)% of dense", last).groups()
    assert float(accuracy) >= 85 and float(share) < 3, last
    # Run again without --resume, it overwrote the first run's checkpoints without a word.
    # (The workers exit 2, a usage error; torchrun itself reports 1.)
    refused = torchrun(2, "ddp_hook.py", "--epochs", "1", "--checkpoint", str(whole), status=1)
    assert f"{whole} holds an earlier run's checkpoints, which this run would overwrite" in refused
    torchrun(2, "ddp_hook.py", "--epochs", "2", "--checkpoint", str(split))
    resumed = torchrun(2, "ddp_hook.py", "--epochs", "3", "--checkpoint", str(split), "--resume")
    assert resumed.strip().splitlines() == [last]  # only the last epoch ran, with the same result
    for rank in (0, 1):
        a = torch.load(whole / f"rank{rank}.pt", weights_only=False)
        b = torch.load(split / f"rank{rank}.pt", weights_only=False)
        for state in (a, b):  # wall-clock time spent is the one thing a resumed run cannot keep
            for name in [n for n in state["hook"]["counters"] if n.endswith("_seconds")]:
                del state["hook"]["counters"][name]
        # the model, the optimizer, this rank's residuals, Ok-Topk's state and the byte counts
        assert same(a, b), f"rank {rank}: the resumed run's checkpoint differs"
    # On another number of processes the hook's state is carried over (reshard_state): the
    # third rank, which has no file of its own, takes part of the second's residuals.
    (split / "rank2.pt").unlink(missing_ok=True)
    more = torchrun(3, "ddp_hook.py", "--epochs", "4", "--checkpoint", str(split), "--resume")
    lines = more.strip().splitlines()
    assert lines[0] == "resuming on 3 processes from a checkpoint of 2; the hook's state " \
        "carried over by sparsetrain.reshard_state" and len(lines) == 2, more  # fmt: skip
    accuracy, share = re.search(r"test accuracy ([\d.]+)%, ([\d.]+)% of dense", lines[1]).groups()
    assert float(accuracy) >= 85 and float(share) < 3, lines[1]
    assert torch.load(split / "rank2.pt", weights_only=False)["hook"]["world"] == 3
    # Resuming a run saved without --amp with it stopped every rank on a KeyError ('scaler').
    refused = torchrun(2, "ddp_hook.py", "--checkpoint", str(split), "--resume", "--amp", status=1)
    assert "it was written without --amp; resume without it too" in refused
    # A file missing stops every rank with a message, not a hang.
    (split / "rank1.pt").unlink()
    refused = torchrun(2, "ddp_hook.py", "--checkpoint", str(split), "--resume", status=1)
    assert "a rank's checkpoint is missing" in refused
    # ... and the rank that reads the missing file says which (none had: "see that rank's error")
    assert "the files it reads are not one epoch's (" in refused
    assert "rank1.pt: missing or of another run" in refused
    # No checkpoint at all: said so, not "see that rank's error" (no rank had one).
    none = tmp_path / "none"
    refused = torchrun(2, "ddp_hook.py", "--checkpoint", str(none), "--resume", status=1)
    assert f"no checkpoint in {none} to resume from" in refused


def test_an_example_started_without_torchrun_says_to_use_it():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(EXAMPLES / "ddp_hook.py")], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 1 and "run this example with torchrun" in done.stderr, done.stderr


def test_ddp_hook_example_learns_in_float16_with_a_loss_scaler(tmp_path):
    # --amp: autocast to float16 and a GradScaler handed to the hook. It learns as in float32,
    # and the checkpoint holds the scaler's state next to the hook's, whose residuals are in
    # the scaler's current units.
    out = torchrun(2, "ddp_hook.py", "--epochs", "3", "--amp", "--checkpoint", str(tmp_path))
    last = out.strip().splitlines()[-1]
    accuracy = re.search(r"test accuracy ([\d.]+)%", last).group(1)
    assert float(accuracy) >= 85, last
    state = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert state["hook"]["loss_scale"] == state["scaler"]["scale"] > 1
