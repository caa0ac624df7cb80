"""`sparsetrain robust-matrix` without --simulate: every cell is a gloo run, one process a worker."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

from sparsetrain.commands.robust_matrix import run_ranks
from sparsetrain.robust.simulate import RobustRunConfig, simulate
from sparsetrain.tasks import get_task


def test_a_cell_run_on_real_ranks_equals_the_one_process_simulation():
    # What --simulate promises: the same numbers, faster (same seeds, shards and batches).
    cfg = RobustRunConfig(workers=3, byzantine=1, aggregator="median", attack="sign_flip", steps=12)
    ranks = run_ranks("digits-mlp", cfg, timeout_s=120)
    alone = simulate(get_task("digits-mlp", cfg.seed), cfg)
    assert ranks["accuracy"] == alone["accuracy"]
    assert ranks["aggregator_stats"] == alone["aggregator_stats"]
    assert ranks["diverged"] is False


def test_a_cell_that_diverges_on_real_ranks_scores_as_in_the_simulation():
    # Real ranks stopped at the non-finite update but scored the model as it was (6.5%) and
    # said it had not diverged; the simulation scores such a run 0.
    cfg = RobustRunConfig(workers=3, byzantine=1, aggregator="mean", attack="gaussian", steps=5,
                          attack_options={"std": 1e38, "mean": 1e38})  # fmt: skip
    ranks = run_ranks("digits-mlp", cfg, timeout_s=120)
    alone = simulate(get_task("digits-mlp", cfg.seed), cfg)
    assert alone["diverged"] is True and alone["accuracy"] == 0.0
    assert (ranks["diverged"], ranks["accuracy"]) == (True, 0.0)


def test_a_rank_killed_mid_cell_is_an_error_at_once_not_a_wait_for_the_timeout():
    # It waited for the cell's timeout (600 s by default) on the other ranks' result queue.
    cfg = RobustRunConfig(workers=2, steps=10**6)  # trains until one is killed
    caught: list[BaseException] = []

    def cell() -> None:
        try:
            run_ranks("digits-mlp", cfg, timeout_s=300)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            caught.append(e)

    thread = threading.Thread(target=cell)
    thread.start()
    deadline = time.monotonic() + 120
    while len(multiprocessing.active_children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    victim = multiprocessing.active_children()[0]
    time.sleep(3)  # past the imports, into training
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    assert time.monotonic() - started < 60
    assert len(caught) == 1 and isinstance(caught[0], RuntimeError)
    assert "died without a result (exit code -9): killed" in str(caught[0])
    assert not multiprocessing.active_children()  # the other rank was stopped too


def test_sigterm_to_the_command_stops_the_cells_workers(tmp_path):
    # SIGTERM (`timeout`, kill) ended the parent at once and left the cell's workers training
    # until their steps were done, and a temporary folder behind.
    import subprocess
    import sys

    from .test_train import _alive, _children

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsetrain", "robust-matrix", "--workers", "2", "--byzantine",
         "0", "--steps", "100000", "--aggregators", "mean", "--attacks", "none", "--out-dir",
         str(tmp_path / "out")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while len(_children(proc.pid)) < 3:  # the two ranks and multiprocessing's tracker
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    workers = _children(proc.pid)
    time.sleep(3)  # into training
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 20
    while [p for p in workers if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], "workers still training after the command left"
    # No temporary folder of its own left (torch's inductor cache may stay there, by design).
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]


_RANDOM_TASK = '''
import os, dataclasses, torch
from sparsetrain.tasks import get_task, register_task

class Drawing(torch.nn.Module):
    """Writes the first number it draws in training to OUT/<pid>."""
    def __init__(self, inner, out):
        super().__init__()
        self.inner, self.out, self.drawn = inner, out, False
    def forward(self, x):
        if self.training and not self.drawn:
            self.drawn = True
            with open(os.path.join(self.out, str(os.getpid())), "w") as f:
                f.write(repr(torch.rand(1).item()))
        return self.inner(x)

@register_task("drawing-mlp")
def drawing_mlp(seed: int = 0, out: str = ""):
    task = get_task("digits-mlp", seed=seed, hidden=8)
    return dataclasses.replace(task, build_model=lambda: Drawing(task.build_model(), out))
'''


def test_real_ranks_take_the_task_options_and_each_draws_its_own_random_numbers(
    tmp_path, monkeypatch
):
    # The ranks built the task without its options, and every rank drew the same random
    # numbers (a task's Dropout masks alike on every worker).
    from sparsetrain.tasks import TASK_MODULES_ENV

    module = tmp_path / "drawing_task.py"
    module.write_text(_RANDOM_TASK)
    monkeypatch.setenv(TASK_MODULES_ENV, str(module))
    draws = tmp_path / "draws"
    draws.mkdir()
    cfg = RobustRunConfig(workers=3, byzantine=0, aggregator="mean", steps=2)
    run_ranks("drawing-mlp", cfg, timeout_s=120, task_options={"out": str(draws)})
    drawn = [p.read_text() for p in draws.iterdir()]
    assert len(drawn) == 3 and len(set(drawn)) == 3, drawn
