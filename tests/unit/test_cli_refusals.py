"""Command lines that ran although part of them was ignored, contradictory or out of range, or
that would have replaced the file they read: each is now a usage error (exit 2) naming what was
wrong, before any work. Found by a review that tried bad values on every command."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from sparsetrain import cli
from sparsetrain._procs import available_memory
from tests.unit.test_cli_validation import argparse_error

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cluster_8r_1gbit.json"


@pytest.mark.parametrize(
    "argv, words",
    [
        # prune: options no selected method would use, or a method given twice
        (["--method", "magnitude", "--method", "magnitude"], "--method magnitude given more than once"),
        (["--method", "magnitude", "--block-size", "7", "--no-obs-update"],
         "--block-size, --no-obs-update: WoodFisher's options, but no --method woodfisher"),
        (["--method", "rigl", "--schedule", "oneshot"], "rigl trains sparse from the start"),
        (["--method", "rigl", "--scope", "layer"], "rigl and nm set each layer's sparsity"),
        (["--levels", "0.1", "0.2"], "--levels sets the sparsities of the one-shot curve"),
        (["--schedule", "oneshot", "--prune-epochs", "9"], "--prune-epochs sets the gradual"),
        (["--prune-epochs", "0"], "--prune-epochs 0 leaves the gradual schedule no step"),
        (["--seed", "-1"], "--seed: must be an integer in [0, 2**63), got -1"),
        # WoodFisher's memory budget, checked before dense training (it failed after it, with
        # a traceback, and the results of the methods run before it were lost)
        (["--method", "woodfisher", "--block-size", "10000"],
         "--method woodfisher: WoodFisher blocks of size 10000 need"),
        # (it had advised raising max_memory_bytes, which the command has no flag for)
        (["--method", "woodfisher", "--block-size", "10000"],
         "give --block-size 8192 (the largest below it that fits"),
        (["--method", "woodfisher", "--block-size", "10000"], "; the command's budget is fixed"),
    ],
)  # fmt: skip
def test_prune_refuses_what_it_would_ignore(tmp_path, capsys, argv, words):
    err = argparse_error(capsys, ["prune", *argv, "--report", str(tmp_path / "r.json")])
    assert words in err, err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--option", "nosuch.x=1"], "no selected aggregator or attack is named 'nosuch'"),
        (["--aggregators", "median", "--option", "krum.f=1"],
         "no selected aggregator or attack is named 'krum'"),
        (["--momentum", "2"], "momentum must be in [0, 1), got 2"),
        (["--aggregators", "mean,mean"], "aggregator(s) given more than once: mean"),
        (["--seed", "99999999999999999999"], "must be an integer in [0, 2**63)"),
        (["--aggregators", " , "], "no aggregator(s) given"),
        (["--option", "none.x=1"], "the 'none' column (no attack) takes no options"),
        (["--option", "safeguard.bogus=1"],
         "'safeguard' is an aggregator and an attack, and neither takes 'bogus'"),
        (["--aggregators", "safeguard,mean", "--attacks", "none,sign_flip",
          "--option", "safeguard.scale=0.5"],
         "safeguard.scale: an option of the safeguard attack, which is not among --attacks"),
        (["--aggregators", "mean", "--attacks", "none,safeguard", "--option",
          "safeguard.window1=100"],
         "safeguard.window1: an option of the safeguard aggregator, which is not among"),
    ],
)  # fmt: skip
def test_robust_matrix_refuses_options_it_would_ignore(tmp_path, capsys, argv, words):
    err = argparse_error(
        capsys, ["robust-matrix", "--simulate", *argv, "--out-dir", str(tmp_path / "m")]
    )
    assert words in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--compressor", "topk", "--density", "0.5", "--option", "density=0.1"],
         "density is given twice, 0.5 and in the compressor's options 0.1"),
        (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0, got inf"),
        (["--seed", str(2**63)], "--seed: must be an integer in [0, 2**63)"),
    ],
)  # fmt: skip
def test_train_refuses_contradictory_or_unusable_values(capsys, argv, words):
    assert words in argparse_error(capsys, ["train", "--workers", "2", *argv])


def test_simulate_never_writes_over_the_fit_it_reads(tmp_path, capsys):
    fitted = tmp_path / "fit.json"
    shutil.copy(RESULTS, fitted)
    before = fitted.read_bytes()
    err = argparse_error(
        capsys, ["simulate", "--ranks", "8", "--fitted", str(fitted), "--json", str(fitted)]
    )
    assert "--json" in err and "is the file --fitted reads" in err, err
    assert fitted.read_bytes() == before
    assert json.loads(before)["records"]  # the measurements are still there


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ranks", "8,8"], "--ranks lists 8 more than once"),
        (["--algorithms", "allgather,allgather"], "--algorithms lists allgather more than once"),
        (["--json", ""], "--json needs a file path, got an empty one"),
        # the rates as typed (it printed the parsed 10000000000.0)
        (["--bandwidth", "10gbit,10000mbit"], "--bandwidth lists 10000mbit twice (10gbit and"),
        # seconds that fit, milliseconds that do not: a table of inf, exit status 0
        (["--ranks", "1024", "--overhead-us", "1e308"], "the modelled times overflow"),
    ],
)
def test_simulate_refuses_repeated_rows_and_empty_paths(capsys, argv, words):
    assert words in argparse_error(capsys, ["simulate", *argv])


def test_demo_refuses_an_empty_folder(capsys):
    assert "--out needs a folder, got an empty path" in argparse_error(
        capsys, ["demo", "--out", ""]
    )


def test_refit_names_the_algorithms_it_leaves_out(tmp_path, capsys):
    from tests.unit.test_cli_validation import results

    data = results()
    for r in data["records"]:
        r["algorithm"] = "mystery"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    err = argparse_error(capsys, ["bench", "refit", str(path)])
    assert "fewer than 3 modelled points (left out: the records of mystery, which have no" in err


# More worker processes than this machine's free memory holds: each needs at least the floor
# (Python and PyTorch, 128 MiB) before its model and data. Started, they pushed the machine into
# the out-of-memory killer instead of failing with an error. 100,000 workers need 12.5 TB.
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--workers", "100000"],
        ["demo", "--workers", "100000"],
        ["robust-matrix", "--workers", "100000", "--byzantine", "1"],
        ["bench", "cluster", "--ranks", "1000", "--sizes", "1G"],
    ],
)
def test_commands_refuse_more_worker_processes_than_memory_holds(tmp_path, capsys, argv):
    if available_memory() is None:  # nothing is refused there: the command would start them
        pytest.skip("this machine does not say how much memory is free (/proc/meminfo)")
    out = ["--out-dir" if argv[0] == "robust-matrix" else "--out", str(tmp_path / "o")]
    if argv[0] == "train":
        out = ["--report", str(tmp_path / "o")]
    err = argparse_error(capsys, [*argv, *out])
    # ("use at most N here" too, unless not one fits: a 1G-element rank needs 4 GiB)
    assert "processes need at least" in err and "of memory" in err and "available;" in err, err
    assert not any(tmp_path.iterdir())


def test_robust_matrix_names_simulate_as_the_remedy(tmp_path, capsys):
    if available_memory() is None:
        pytest.skip("this machine does not say how much memory is free (/proc/meminfo)")
    argv = ["robust-matrix", "--workers", "100000", "--out-dir", str(tmp_path / "m")]
    assert "or run the workers in one process with --simulate" in argparse_error(capsys, argv)


def test_robust_matrix_gives_safeguards_options_to_the_rule_or_the_attack_that_takes_them(
    tmp_path, capsys
):
    """safeguard is an aggregator and an attack: its help's own example (safeguard.window1)
    was refused by the attack, and the attack's scale by the rule."""
    out = tmp_path / "m"
    assert cli.main(["robust-matrix", "--simulate", "--steps", "1", "--workers", "5",
                     "--byzantine", "1", "--aggregators", "safeguard", "--attacks", "safeguard",
                     "--option", "safeguard.window1=100", "--option", "safeguard.scale=0.5",
                     "--out-dir", str(out)]) == 0  # fmt: skip
    (cell,) = json.loads((out / "robust_matrix.json").read_text())["cells"]
    assert cell["aggregator_options"] == {"window1": 100}
    assert cell["attack_options"] == {"scale": 0.5}


def test_the_one_process_simulation_names_layers_it_cannot_follow():
    # vmap raised from inside torch.func ("called random operation while in randomness error
    # mode"; with BatchNorm, an in-place update in a grad transform)
    from torch import nn
    from torch.utils.data import TensorDataset

    from sparsetrain.robust.simulate import RobustRunConfig, simulate
    from sparsetrain.tasks import Task

    data = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    for layer, words in ((nn.Dropout(0.1), "random layers (Dropout)"),
                         (nn.BatchNorm1d(4), "running statistics (BatchNorm1d)")):  # fmt: skip
        task = Task("t", lambda layer=layer: nn.Sequential(nn.Linear(4, 4), layer, nn.Linear(4, 2)),
                    data, data, num_classes=2)  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)) as e:
            simulate(task, RobustRunConfig(workers=3, steps=1))
        assert "without --simulate" in str(e.value)

    class Scaled(nn.Linear):  # a constant buffer: vmap follows it, as before
        def __init__(self):
            super().__init__(4, 2)
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)

        def forward(self, x):
            return super().forward(x) * self.scale

    out = simulate(
        Task("t", Scaled, data, data, num_classes=2), RobustRunConfig(workers=3, steps=1)
    )
    assert not out["diverged"]


def test_prune_and_robust_matrix_name_a_task_whose_data_is_not_a_tensor_dataset(
    tmp_path, capsys, monkeypatch
):
    # Both read the tensors whole; a Dataset of the user's own failed with a traceback
    # ("'Synth' object has no attribute 'tensors'") where `sparsetrain train` takes it.
    from torch.utils.data import Dataset

    from sparsetrain import tasks

    class Synth(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(4), 0

    def factory(seed=0):
        return tasks.Task("own-data", lambda: torch.nn.Linear(4, 2), Synth(), Synth(), 2)

    tasks._load_all()
    monkeypatch.setitem(tasks._TASKS, "own-data", factory)
    for argv in (["prune", "--task", "own-data", "--report", str(tmp_path / "r.json")],
                 ["robust-matrix", "--simulate", "--task", "own-data", "--out-dir",
                  str(tmp_path / "m")]):  # fmt: skip
        err = argparse_error(capsys, argv)
        assert "reads a task's data as the tensors of a TensorDataset" in err, err
        assert "the train set of task 'own-data' is a Synth" in err
    assert not any(tmp_path.iterdir())


def test_find_unused_parameters_is_ddps_and_needs_it():
    from sparsetrain.train import TrainConfig

    with pytest.raises(ValueError, match="find_unused_parameters=True is DDP's option: it needs"):
        TrainConfig(find_unused_parameters=True, ddp=False)
    with pytest.raises(TypeError, match="find_unused_parameters must be True or False"):
        TrainConfig(find_unused_parameters=1)
