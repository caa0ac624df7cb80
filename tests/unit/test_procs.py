"""Starting worker processes: the memory check that refuses more than this machine can hold, and
the start method."""

from __future__ import annotations

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
    import sys

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
