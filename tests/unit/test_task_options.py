"""Task options are checked before any data is loaded or worker started: by the factory's
annotations (or, unannotated, its defaults) and by the checks a task registers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain import tasks
from sparsetrain.tasks import Task, check_task_options, register_task


@pytest.fixture
def registry():
    tasks._load_all()  # the built-in tasks registered before the registry is saved
    saved, checks = dict(tasks._TASKS), dict(tasks._CHECKS)
    yield
    tasks._TASKS.clear()
    tasks._TASKS.update(saved)
    tasks._CHECKS.clear()
    tasks._CHECKS.update(checks)


def test_a_users_task_options_follow_its_annotations_then_its_defaults(registry):
    @register_task("user-task")
    def user_task(seed: int = 0, scale: float = 1, layers: int = 2, flag=False, free=1, any_=None):
        raise AssertionError("not built")

    for ok in ({"scale": 0.5}, {"scale": 3}, {"layers": 4}, {"flag": True}, {"free": 0.5},
               {"any_": "x"}, {"layers": 2**63 - 1}, {"any_": 2**64}):  # fmt: skip
        check_task_options("user-task", ok)
    for bad, words in (
        ({"layers": 1.5}, "option layers must be an int, got 1.5"),
        ({"layers": True}, "option layers must be an int, got True"),
        ({"scale": "x"}, "option scale must be a number, got 'x'"),
        ({"flag": 1}, "option flag must be True or False, got 1"),
        ({"free": "x"}, "option free must be a number"),
        # torch's int64: a larger one had failed in every worker, past the checks
        ({"layers": 2**63}, r"option layers must be an int in \[-2\*\*63, 2\*\*63\), got 9223"),
        ({"scale": -(2**63) - 1}, r"option scale must be a number in \[-2\*\*63, 2\*\*63\)"),
    ):
        with pytest.raises(ValueError, match=words):
            check_task_options("user-task", bad)


def test_built_in_widths_must_be_positive_and_a_task_registered_again_drops_old_checks(registry):
    with pytest.raises(ValueError, match="task option hidden must be at least 1, got 0"):
        check_task_options("digits-mlp", {"hidden": 0})

    @register_task("digits-mlp")
    def mine(seed: int = 0, hidden: int = -1):
        raise AssertionError("not built")

    check_task_options("digits-mlp", {"hidden": -1})  # its own factory, without the old check


def test_get_task_takes_a_seed_in_the_range_the_trainer_does():
    from sparsetrain.tasks import get_task

    for seed in (1.5, -1, True, 2**63):  # torch's "manual_seed expected a long", or accepted
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            get_task("digits-mlp", seed=seed)


@pytest.mark.parametrize(
    "change, words",
    [
        ("empty test", "the test set is empty"),
        ("empty train", "the train set is empty"),
        ("label 7", "the train set's labels lie in [0, 7], but num_classes=3 allows [0, 2]"),
        ("float labels", "the train set's labels (its last tensor) must be integer class indices"),
        ("nan input", "the train set's input tensor 0 holds NaN or Inf"),
        ("no classes", "num_classes must be an integer >= 1, got 0"),
    ],
)
def test_a_task_whose_data_training_cannot_use_is_refused_by_name(registry, change, words):
    """An empty set failed inside torch.arange or with a ZeroDivisionError, a label out of
    range inside the loss, and a NaN input was blamed on the learning rate."""
    from torch.utils.data import TensorDataset

    from sparsetrain.tasks import Task, get_task, register_task

    x, y = torch.randn(12, 4), torch.arange(12) % 3
    train, test, classes = TensorDataset(x, y), TensorDataset(x, y), 3
    if change == "empty test":
        test = TensorDataset(x[:0], y[:0])
    elif change == "empty train":
        train = TensorDataset(x[:0], y[:0])
    elif change == "label 7":
        train = TensorDataset(x, torch.where(y == 2, 7, y))
    elif change == "float labels":
        train = TensorDataset(x, y.float())
    elif change == "nan input":
        bad = x.clone()
        bad[3, 1] = float("nan")
        train = TensorDataset(bad, y)
    else:
        classes = 0

    @register_task("test-odd-data")
    def odd(seed: int = 0) -> Task:
        return Task("test-odd-data", lambda: torch.nn.Linear(4, 3), train, test, classes)

    with pytest.raises(ValueError, match=re.escape(f"task 'test-odd-data': {words}")):
        get_task("test-odd-data")


_MODULE = (
    "from sparsetrain.tasks import register_task\n"
    "@register_task('from-a-file')\n"
    "def from_a_file(seed=0):\n    return 'built'\n"
)


def test_a_task_module_is_loaded_here_and_by_the_processes_started_from_here(
    registry, tmp_path, monkeypatch
):
    monkeypatch.setenv(
        tasks.TASK_MODULES_ENV, ""
    )  # (restored after: delenv of an unset one is not)
    path = tmp_path / "user_tasks_file.py"
    path.write_text(_MODULE)
    assert tasks.add_task_modules([str(path)]) == ["from-a-file"]
    assert "from-a-file" in tasks.available_tasks()
    assert os.environ[tasks.TASK_MODULES_ENV] == str(path)
    assert tasks.add_task_modules([str(path)]) == []  # given twice: loaded once
    # A process started from here (a worker) finds the task through the environment.
    env = {"PYTHONPATH": str(Path(tasks.__file__).parents[2]), "PATH": "/usr/bin:/bin",
           tasks.TASK_MODULES_ENV: os.environ[tasks.TASK_MODULES_ENV]}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-c", "from sparsetrain.tasks import get_task; print(get_task('from-a-file'))"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "built", res.stderr[-2000:]


@pytest.mark.parametrize(
    "entry, words",
    [
        ("{tmp}/missing.py", "no such file"),
        ("no_such_task_module_here", "'no_such_task_module_here': no module of that name"),
        ("json", "'json' (the module imported is "),
        ("{tmp}/empty.py", "registered no task"),
    ],
)
def test_a_task_module_that_is_missing_or_registers_nothing_is_named_and_not_kept(
    registry, tmp_path, monkeypatch, entry, words
):
    monkeypatch.setenv(
        tasks.TASK_MODULES_ENV, ""
    )  # (restored after: delenv of an unset one is not)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.py").write_text("x = 1\n")
    entry = entry.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=re.escape(words)):
        tasks.add_task_modules([entry])
    assert os.environ[tasks.TASK_MODULES_ENV] == ""  # not kept: later lookups still work
    assert "digits-mlp" in tasks.available_tasks()


def test_the_command_names_a_bad_task_module_as_a_usage_error(monkeypatch, capsys):
    from sparsetrain import cli

    monkeypatch.setenv(
        tasks.TASK_MODULES_ENV, ""
    )  # (restored after: delenv of an unset one is not)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task-module", "no_such_mod_x", "--task", "other"])
    assert e.value.code == 2  # a usage error, as argparse's
    assert "error: argument --task-module: task module 'no_such_mod_x'" in capsys.readouterr().err


def test_the_command_loads_a_task_module_given_by_an_abbreviation_or_with_an_equals_sign(
    registry, tmp_path, monkeypatch, capsys
):
    # --task-mod is taken by the command's parser as --task-module: the module was not loaded
    # first, and its task was "an invalid choice".
    from sparsetrain import cli

    monkeypatch.setenv(
        tasks.TASK_MODULES_ENV, ""
    )  # (restored after: delenv of an unset one is not)
    path = tmp_path / "abbrev_tasks.py"
    path.write_text(_MODULE)
    for argv in (["--task-mod", str(path), "--task", "from-a-file"],
                 ["--task", "from-a-file", f"--task-module={path}", "--task-o", "x=1"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv, "--help"])
        assert e.value.code == 0
        assert "from-a-file" in capsys.readouterr().out


def test_a_bad_entry_in_the_environment_is_a_usage_error_of_every_command(monkeypatch, capsys):
    # It broke every command, --version included, with a traceback.
    from sparsetrain import cli

    monkeypatch.setenv(tasks.TASK_MODULES_ENV, "no_such_env_task_module")
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 2
    assert "error: SPARSETRAIN_TASK_MODULES: task module " in capsys.readouterr().err


def test_an_error_a_task_module_raises_itself_keeps_its_type_and_traceback(
    registry, tmp_path, monkeypatch
):
    # It was shown as a usage error, "argument --task-module: my own bug", without a traceback.
    from sparsetrain import cli

    monkeypatch.setenv(tasks.TASK_MODULES_ENV, "")
    path = tmp_path / "raising_tasks.py"
    path.write_text("raise ValueError('my own bug')\n")
    with pytest.raises(ValueError, match="my own bug") as e:
        cli.main(["train", "--task-module", str(path), "--help"])
    assert not isinstance(e.value, tasks.TaskModuleError)


def test_an_ambiguous_prefix_is_reported_once_by_the_commands_parser(monkeypatch, capsys):
    from sparsetrain import cli

    monkeypatch.setenv(tasks.TASK_MODULES_ENV, "")
    with pytest.raises(SystemExit):
        cli.main(["train", "--ta", "x"])
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "sparsetrain train: error: ambiguous option" in err, err


def test_a_tensor_dataset_of_more_than_input_and_labels_is_refused_by_name(registry):
    # It passed the check, then every command failed unpacking it ("too many values").
    from torch.utils.data import TensorDataset

    from sparsetrain.tasks import Task, get_task

    x, mask, y = torch.zeros(4, 2), torch.ones(4, 2), torch.zeros(4, dtype=torch.long)

    @register_task("three-tensors")
    def three(seed=0):
        data = TensorDataset(x, mask, y)
        return Task("three-tensors", lambda: None, data, data, num_classes=2)

    with pytest.raises(ValueError, match="a TensorDataset of 3 tensors; a task's examples are"):
        get_task("three-tensors")


def test_a_task_module_that_replaces_a_task_says_so(registry, tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.TASK_MODULES_ENV, "")
    path = tmp_path / "replacing_tasks.py"
    path.write_text(_MODULE.replace("from-a-file", "digits-mlp"))
    with pytest.warns(UserWarning, match="registers 'digits-mlp' again: it replaces the task"):
        assert tasks.add_task_modules([str(path)]) == ["digits-mlp"]


def test_a_task_option_annotated_str_takes_the_text_as_typed(registry):
    # act=1 reached the factory as the number 1, and act=None as None.
    from sparsetrain.commands.train import task_option_values

    @register_task("str-option")
    def str_option(seed: int = 0, act: str = "relu", width: int = 2):
        raise AssertionError("not built")

    got = task_option_values("str-option", [("act", "1"), ("width", "4")])
    assert got == {"act": "1", "width": 4}
    assert task_option_values("str-option", [("act", "None")]) == {"act": "None"}
    check_task_options("str-option", got)


def test_prune_and_robust_matrix_take_task_options_as_train_does(registry, tmp_path, capsys):
    # Only `sparsetrain train` had --task-option: a task's width or a user's own option could
    # not be set for pruning or for the Byzantine matrix.
    from sparsetrain.cli import main

    built = []

    @register_task("opt-probe")
    def opt_probe(seed: int = 0, hidden: int = 4, act: str = "relu"):
        built.append((hidden, act))
        return tasks.get_task("digits-mlp", seed=seed, hidden=hidden)

    report = tmp_path / "p.json"
    argv = ["prune", "--task", "opt-probe", "--task-option", "hidden=8", "--task-option",
            "act=1", "--schedule", "oneshot", "--epochs", "1", "--finetune-epochs", "0",
            "--levels", "0.5", "--no-progress", "--report", str(report)]  # fmt: skip
    assert main(argv) == 0
    assert built and set(built) == {(8, "1")}
    assert json.loads(report.read_text())["config"]["task_options"] == {"hidden": 8, "act": "1"}

    built.clear()
    out = tmp_path / "matrix"
    argv = ["robust-matrix", "--task", "opt-probe", "--task-option", "hidden=6", "--simulate",
            "--workers", "3", "--byzantine", "1", "--aggregators", "median", "--attacks",
            "sign_flip", "--steps", "2", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert built and set(built) == {(6, "relu")}
    assert json.loads((out / "robust_matrix.json").read_text())["task_options"] == {"hidden": 6}
    capsys.readouterr()

    # A bad option is a usage error of both commands, before any training.
    for argv in (["prune", "--report", str(report)], ["robust-matrix", "--out-dir", str(out)]):
        built.clear()
        with pytest.raises(SystemExit) as e:
            main([*argv, "--task", "opt-probe", "--task-option", "width=3"])
        assert e.value.code == 2 and not built
        err = capsys.readouterr().err
        assert "does not take option(s) ['width']" in err and "hidden" in err, err


def test_prune_and_robust_matrix_name_a_model_not_num_classes_wide(registry, tmp_path, capsys):
    # prune failed after its imports inside cross-entropy ("Target 5 is out of bounds"), and
    # robust-matrix in its first cell, or trained on with a wider output.
    from sparsetrain.cli import main

    @register_task("narrow")
    def narrow(seed: int = 0):
        task = tasks.get_task("digits-mlp", seed=seed)
        return Task("narrow", lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)),
                    task.train, task.test, task.num_classes)  # fmt: skip

    for argv in (["prune", "--report", str(tmp_path / "p.json")],
                 ["robust-matrix", "--simulate", "--out-dir", str(tmp_path / "m")]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*argv, "--task", "narrow"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "task 'narrow': its model gave shape [2, 5] for a batch of 2" in err, err
        assert "here [2, 10]" in err
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "m").exists()


def test_digits_are_read_as_scikit_learns_loader_gives_them_without_importing_it(monkeypatch):
    """The digits tasks read scikit-learn's bundled CSV themselves: importing sklearn.datasets
    (SciPy and more) had been most of a worker's start after torch. Where the file is not
    found, scikit-learn's loader gives the same arrays."""
    import importlib.util

    import numpy as np
    from sklearn.datasets import load_digits

    from sparsetrain.tasks.digits import _digits_arrays

    want_x, want_y = load_digits(return_X_y=True)
    for find in (importlib.util.find_spec, lambda name: None):
        monkeypatch.setattr(importlib.util, "find_spec", find)
        x, y = _digits_arrays()
        assert x.dtype == want_x.dtype and y.dtype == want_y.dtype
        assert np.array_equal(x, want_x) and np.array_equal(y, want_y)
    monkeypatch.undo()
    code = (
        "import sys; from sparsetrain.tasks import get_task; get_task('digits-mlp'); "
        "print('sklearn.datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
