"""Task options are checked before any data is loaded or worker started: by the factory's
annotations (or, unannotated, its defaults) and by the checks a task registers."""

from __future__ import annotations

import re

import pytest
import torch

from sparsetrain import tasks
from sparsetrain.tasks import check_task_options, register_task


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
               {"any_": "x"}):  # fmt: skip
        check_task_options("user-task", ok)
    for bad, words in (
        ({"layers": 1.5}, "option layers must be an int, got 1.5"),
        ({"layers": True}, "option layers must be an int, got True"),
        ({"scale": "x"}, "option scale must be a number, got 'x'"),
        ({"flag": 1}, "option flag must be True or False, got 1"),
        ({"free": "x"}, "option free must be a number"),
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
