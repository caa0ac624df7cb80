"""Which worker `sparsetrain train` blames when one dies by a signal: the one that died, not a
peer that lost its connection to it."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparsetrain.train import _first_error, _killed_worker


def _folder(tmp_path: Path, errors: dict[int, str], started=(0, 1, 2)) -> str:
    for r in started:
        Path(tmp_path, f"started-rank{r}").touch()
    for r, message in errors.items():
        error = {"rank": r, "type": "RuntimeError", "message": message, "traceback": "",
                 "time": 1.0 + r, "points_to_another": False}  # fmt: skip
        Path(tmp_path, f"error-rank{r}.json").write_text(json.dumps(error))
    return str(tmp_path)


def _procs(*codes: int) -> SimpleNamespace:
    return SimpleNamespace(processes=[SimpleNamespace(exitcode=c) for c in codes])


def test_a_worker_killed_outside_is_blamed_not_the_peer_that_lost_it(tmp_path):
    # Rank 1 was killed (kill -9, the OOM killer); rank 0 then failed on its lost connection
    # and torch.multiprocessing saw rank 0 first. Rank 0's error was reported.
    folder = _folder(tmp_path, {0: "Connection reset by peer"})
    error = _killed_worker(_procs(1, -signal.SIGKILL, -signal.SIGTERM), SimpleNamespace(
        error_index=0), folder)  # fmt: skip
    assert error is not None and error.rank == 1, error
    assert "terminated with signal SIGKILL during training, without a Python error" in str(error)
    assert _first_error(folder).rank == 0  # what was reported before


@pytest.mark.parametrize(
    ("codes", "first", "errors", "blamed"),
    [
        # Rank 0 had a Python error; torch then stopped the others with SIGTERM: not them.
        ((1, -signal.SIGTERM, -signal.SIGTERM), 0, {0: "ValueError"}, None),
        # The one torch saw first died by SIGTERM from outside (no error file): it.
        ((-signal.SIGTERM, 1, 0), 0, {1: "Connection closed by peer"}, 0),
        # A native crash.
        ((1, 1, -signal.SIGSEGV), 0, {0: "lost", 1: "lost"}, 2),
        # A worker killed before it started training is launch()'s other case.
        ((1, -signal.SIGKILL, 1), 0, {0: "lost"}, None),
    ],
)
def test_which_worker_is_blamed(tmp_path, codes, first, errors, blamed):
    started = (0, 2) if codes == (1, -signal.SIGKILL, 1) else (0, 1, 2)
    folder = _folder(tmp_path, errors, started)
    error = _killed_worker(_procs(*codes), SimpleNamespace(error_index=first), folder)
    assert (None if error is None else error.rank) == blamed


def test_a_rank_that_hung_while_its_peers_timed_out_is_named_as_such(tmp_path):
    # Rank 1 stopped (SIGSTOP) or hung: rank 0 timed out waiting, and torch.multiprocessing
    # killed rank 1 when SIGTERM did not stop it. Rank 0's timeout was reported.
    folder = _folder(tmp_path, {0: "[gloo] Timed out waiting 15000ms for send operation"})
    error = _killed_worker(_procs(1, -signal.SIGKILL), SimpleNamespace(error_index=0), folder)
    assert error is not None and error.rank == 1, error
    assert "the other ranks timed out waiting for it, so it hung" in str(error), error


def test_a_timeout_names_the_ranks_still_running_when_the_run_stopped(tmp_path):
    # A rank hung in Python (a deadlock, a busy loop) is ended by torch.multiprocessing's
    # SIGTERM, as innocent ranks are: it cannot be told apart, so the ranks are named.
    folder = _folder(tmp_path, {0: "[gloo] Timed out waiting 300000ms for recv operation"})
    procs = _procs(1, -signal.SIGTERM)
    assert _killed_worker(procs, SimpleNamespace(error_index=0), folder) is None
    error = _first_error(folder, procs)
    assert error.rank == 0 and "(rank(s) 1 were still running without an error" in str(error)
    # Another error than a timeout: the stopped ranks are not suspects.
    (tmp_path / "other").mkdir()
    other = _folder(tmp_path / "other", {0: "ValueError: bad"})
    assert "still running" not in str(_first_error(other, procs))
