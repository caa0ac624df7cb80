"""Starting worker processes: the memory check that refuses more than this machine can hold, and
the start method."""

from __future__ import annotations

import os
import sys

import pytest

from sparsetrain._procs import WORKER_FLOOR_BYTES, available_memory, too_many_processes
from sparsetrain.train import TrainConfig, check_launch

GIB = 2**30


def test_processes_that_fit_pass():
    assert too_many_processes(8, "workers=8", available=8 * WORKER_FLOOR_BYTES) is None
    assert too_many_processes(1, "workers=1", GIB, available=WORKER_FLOOR_BYTES + GIB) is None


def test_processes_that_do_not_fit_are_named_with_how_many_would():
    problem = too_many_processes(9, "workers=9", available=8 * WORKER_FLOOR_BYTES)
    assert problem.startswith("workers=9: 9 processes need at least 1.1 GiB of memory (128 MiB ")
    assert "1.0 GiB available; use at most 8 here, or spread them over machines" in problem


def test_each_process_data_counts_toward_it():
    # 2 GiB of data each: 4 fit in 8 GiB by the floor alone, not with the data.
    assert too_many_processes(4, "--ranks 4", available=8 * GIB) is None
    problem = too_many_processes(4, "--ranks 4", 2 * GIB, available=8 * GIB, remedy="or less")
    assert "(2.1 GiB each for Python and PyTorch and its data)" in problem
    assert problem.endswith("use at most 3 here, or less")


def test_when_not_even_one_fits_it_gives_only_the_remedy():
    problem = too_many_processes(2, "workers=2", available=WORKER_FLOOR_BYTES // 2)
    assert "at most" not in problem
    assert problem.endswith("available; spread them over machines with torchrun")


def test_unknown_free_memory_refuses_nothing(monkeypatch):
    monkeypatch.setattr("sparsetrain._procs.available_memory", lambda: None)
    assert too_many_processes(10**9, "workers=1000000000") is None


def test_free_memory_is_read_where_linux_gives_it():
    free = available_memory()
    if free is None:
        pytest.skip("no /proc/meminfo MemAvailable here")
    assert 0 < free < 2**50


def test_launch_checks_the_workers_against_free_memory(monkeypatch):
    monkeypatch.setattr("sparsetrain._procs.available_memory", lambda: 3 * WORKER_FLOOR_BYTES)
    check_launch([TrainConfig(workers=3)])
    with pytest.raises(ValueError, match=r"workers=4: 4 processes need .* use at most 3 here"):
        check_launch([TrainConfig(workers=4)])
    monkeypatch.setenv("RANK", "0")  # under torchrun this process is one rank: nothing to spawn
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_launch([TrainConfig(workers=4)])


def test_the_start_method_is_linuxs_fork_server_unless_the_environment_names_another(
    monkeypatch,
):
    from sparsetrain._procs import chosen_start_method

    monkeypatch.delenv("SPARSETRAIN_START_METHOD", raising=False)
    assert chosen_start_method() == ("forkserver" if sys.platform == "linux" else "spawn")
    monkeypatch.setenv("SPARSETRAIN_START_METHOD", " Spawn ")
    assert chosen_start_method() == "spawn"
    monkeypatch.setenv("SPARSETRAIN_START_METHOD", "fork")  # (unsafe after torch's import)
    with pytest.raises(ValueError, match=r"SPARSETRAIN_START_METHOD='fork': the workers start "
                       r"by one of forkserver, spawn"):  # fmt: skip
        chosen_start_method()
    # Refused before any worker starts, as the command's other usage errors are.
    with pytest.raises(ValueError, match="SPARSETRAIN_START_METHOD='fork'"):
        check_launch([TrainConfig(workers=2)])


def _fake_server(monkeypatch, pid):
    import multiprocessing.forkserver as forkserver

    monkeypatch.setattr(forkserver._forkserver, "_forkserver_pid", pid)
    monkeypatch.delenv("SPARSETRAIN_START_METHOD", raising=False)
    return forkserver


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux's")
def test_a_launch_after_an_import_time_variable_changed_spawns_its_workers(monkeypatch):
    # TORCH_DISTRIBUTED_DEBUG is read when torch.distributed is imported, in the server: set
    # before a second launch, forked workers had kept the server's (DebugLevel.OFF).
    from sparsetrain import _procs

    _fake_server(monkeypatch, 12345)  # a server this module started, with this environment
    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG", raising=False)
    monkeypatch.setattr(_procs, "_server_env", _procs._import_time_env(os.environ))
    assert _procs.worker_start_method() == "forkserver"
    monkeypatch.setenv("SPARSETRAIN_NATIVE", "0")  # read when used, in the worker: no matter
    assert _procs.worker_start_method() == "forkserver"
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    assert _procs.worker_start_method() == "spawn"
    monkeypatch.setattr(_procs, "_server_env", None)  # a server another started: as it is
    assert _procs.worker_start_method() == "forkserver"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux's")
def test_a_fork_server_that_cannot_start_falls_back_to_spawn_with_a_warning(monkeypatch):
    # Its Unix socket's path under a TMPDIR of 76 characters or more is too long: every launch
    # had failed with "OSError: AF_UNIX path too long".
    from sparsetrain import _procs

    forkserver = _fake_server(monkeypatch, None)

    def too_long():
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(forkserver, "ensure_running", too_long)
    monkeypatch.setattr(_procs, "_server_env", None)
    with pytest.warns(RuntimeWarning, match=r"could not start \(AF_UNIX path too long; under "
                      r"TMPDIR=.*SPARSETRAIN_START_METHOD=spawn"):  # fmt: skip
        assert _procs.worker_start_method() == "spawn"
    assert _procs._server_env is None


def test_a_forked_worker_draws_numpys_global_numbers_afresh():
    # Forked workers share the server's numpy state (seeded once when torch imported numpy
    # there): every rank of every launch drew the same numbers, as no spawned worker does.
    np = pytest.importorskip("numpy")
    from sparsetrain._procs import fresh_random_state

    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    fresh_random_state()
    assert not (np.random.get_state()[1] == state).all()
