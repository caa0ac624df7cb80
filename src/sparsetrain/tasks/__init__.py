"""Reference tasks (a model and a data set) for the CLI, tests and benchmarks.

A task is registered by name with :func:`register_task`; adding one takes a few lines::

    @register_task("my-task")
    def my_task(seed: int = 0) -> Task:
        train, test = load_my_data(seed)          # two TensorDatasets (inputs, integer labels)
        return Task("my-task", lambda: MyModel(), train, test, num_classes=10)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .._options import check_options


@dataclass
class Task:
    """A classification task.

    Attributes:
        name: the registered name.
        build_model: returns a freshly initialised model (seed torch before calling it).
        train, test: data sets of (input, label) pairs.
        num_classes: number of labels.
        loss_fn: the training loss (cross-entropy by default).
    """

    name: str
    build_model: Callable[[], nn.Module]
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy


_TASKS: dict[str, Callable[..., Task]] = {}
_CHECKS: dict[str, Callable[[dict], None]] = {}
_MODULES = ("digits",)


def register_task(name: str, check: Callable[[dict], None] | None = None):
    """Decorator: register a task factory ``f(seed=0, **options) -> Task`` under ``name``.

    ``check(options)``, if given, raises ``ValueError`` for option values the factory cannot
    use (a layer width of 0, say); it runs before any data is loaded or worker started. The
    options' types are checked against the factory's defaults without it.
    """

    def wrap(fn: Callable[..., Task]) -> Callable[..., Task]:
        _TASKS[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn

    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def available_tasks() -> list[str]:
    _load_all()
    return sorted(_TASKS)


def get_task(name: str, seed: int = 0, **options) -> Task:
    """Build the task registered as ``name``; the train/test split is fixed by ``seed``."""
    _load_all()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid names are: {', '.join(sorted(_TASKS))}")
    check_task_options(name, options)
    return _TASKS[name](seed=seed, **options)


def check_task_options(name: str, options: dict) -> None:
    """Raise ``ValueError`` naming the options task ``name`` does not take, and the ones it does
    (from its factory's signature), before any data is loaded."""
    _load_all()
    params = inspect.signature(_TASKS[name]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        check_options("task", name, options, [p for p in params if p != "seed"])
    for key, value in options.items():
        default = params[key].default if key in params else None
        kinds = _VALUE_KINDS.get(type(default))
        wants_bool = kinds is not None and kinds[0] == (bool,)
        if kinds is not None and not (
            isinstance(value, kinds[0]) and isinstance(value, bool) == wants_bool
        ):
            raise ValueError(
                f"task {name!r} option {key} must be {kinds[1]} (its default is {default!r}), "
                f"got {value!r}"
            )
    if name in _CHECKS:
        _CHECKS[name](dict(options))


# An option whose default is of the key's type takes values of these types (bool is an int
# to Python, but a width of True is a mistake).
_VALUE_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "True or False"),
    int: ((int,), "an int"),
    float: ((int, float), "a number"),
}


__all__ = ["Task", "available_tasks", "get_task", "register_task"]
