"""Reference tasks (a model and a data set) for the CLI, tests and benchmarks.

A task is registered by name with :func:`register_task`; adding one takes a few lines::

    @register_task("my-task")
    def my_task(seed: int = 0) -> Task:
        train, test = load_my_data(seed)          # two TensorDatasets (inputs, integer labels)
        return Task("my-task", lambda: MyModel(), train, test, num_classes=10)

From Python (``sparsetrain.train.launch``) register it at the top level of your script (the
spawned workers import that module, not its ``if __name__ == "__main__":`` block). For the
``sparsetrain`` command, put it in a module and name that module with ``--task-module``: a
dotted name importable from the current folder or ``PYTHONPATH`` (``my_tasks``), or the path of
a ``.py`` file. The command adds it to the environment variable ``SPARSETRAIN_TASK_MODULES``
(entries separated by ``os.pathsep``), whose modules every process loads, the workers it
spawns included, before it looks up a task; setting that variable works under ``torchrun`` and
from Python too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import operator
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .._options import check_options, is_integer


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
        if not fn.__module__.startswith(f"{__name__}."):
            # The built-ins load on first use: first, so one registered again under its own
            # name replaces it for good instead of being replaced at that use.
            _load_all()
        _TASKS[name] = fn
        if check is not None:
            _CHECKS[name] = check
        else:  # a task registered again under this name brings its own checks or none
            _CHECKS.pop(name, None)
        return fn

    return wrap


TASK_MODULES_ENV = "SPARSETRAIN_TASK_MODULES"


class TaskModuleError(ValueError):
    """A task module named by ``--task-module`` or ``SPARSETRAIN_TASK_MODULES`` that is not
    there, or registers no task (not an error raised by the module itself)."""


_LOADED: set[str] = set()  # the entries of SPARSETRAIN_TASK_MODULES imported in this process


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    for entry in os.environ.get(TASK_MODULES_ENV, "").split(os.pathsep):
        if entry and entry not in _LOADED:
            _LOADED.add(entry)  # first: its register_task calls come back here
            try:
                _import_task_module(entry)
            except BaseException:
                _LOADED.discard(entry)
                raise


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or os.sep in entry or (os.altsep or os.sep) in entry


def _import_task_module(entry: str) -> None:
    """Import ``entry``, a ``.py`` file's path or a dotted module name (looked for on
    ``sys.path``, then in the current folder); a missing one raises ValueError naming it."""
    if _is_path(entry):
        path = os.path.abspath(entry)
        if not os.path.isfile(path):
            raise TaskModuleError(f"task module {entry!r}: no such file ({path})")
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem if stem.isidentifier() and stem not in sys.modules else f"_sparsetrain_{stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TaskModuleError(f"task module {entry!r}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (dataclasses and pickle look a module up there)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return

    def missing(e: ModuleNotFoundError) -> bool:  # the entry itself, or a package above it
        return bool(e.name) and (entry == e.name or entry.startswith(f"{e.name}."))

    cwd = os.getcwd()
    try:
        importlib.import_module(entry)
        return
    except ModuleNotFoundError as e:
        if not missing(e):
            raise  # a module it imports is missing: the user's to see, with its traceback
    if cwd not in sys.path:  # the console script's sys.path lacks the current folder
        sys.path.append(cwd)
        try:
            importlib.import_module(entry)
            return
        except ModuleNotFoundError as e:
            sys.path.remove(cwd)
            if not missing(e):
                raise
    raise TaskModuleError(
        f"task module {entry!r}: no module of that name on sys.path or in the current folder "
        f"{cwd}; give a dotted module name or the path of a .py file"
    )


def add_task_modules(entries: list[str]) -> list[str]:
    """Import the task modules ``entries`` (each a ``.py`` file's path or a dotted module name)
    and add them to ``SPARSETRAIN_TASK_MODULES``, so the processes this one starts load them
    too; return the names of the tasks they registered.

    Raises:
        TaskModuleError: an entry names no file or module, or registers no task (a
            ValueError).
    """
    _load_all()
    known = os.environ.get(TASK_MODULES_ENV, "")
    registered: list[str] = []
    for entry in entries:
        entry = os.path.abspath(entry) if _is_path(entry) else entry
        if os.pathsep in entry or not entry.strip():
            raise TaskModuleError(
                f"task module {entry!r}: must be one non-empty module name or path"
            )
        if entry in known.split(os.pathsep):
            continue  # loaded already, in this process and its workers
        before = dict(_TASKS)
        # Imported before (by the user's code): its tasks registered then, from its functions.
        imported = any(
            fn.__module__ == entry or fn.__module__.startswith(f"{entry}.")
            for fn in _TASKS.values()
        )
        previous = os.environ.get(TASK_MODULES_ENV)  # (None: not set)
        known = f"{known}{os.pathsep}{entry}" if known else entry
        os.environ[TASK_MODULES_ENV] = known
        try:
            _load_all()
            new = sorted(n for n in _TASKS if before.get(n) is not _TASKS[n])
            if not new and not imported:
                found = getattr(sys.modules.get(entry), "__file__", None)
                where = (
                    f" (the module imported is {found})" if found and not _is_path(entry) else ""
                )
                raise TaskModuleError(
                    f"task module {entry!r}{where} registered no task; decorate a factory at its "
                    "top level with @sparsetrain.tasks.register_task('name')"
                )
        except BaseException:  # not left in the environment, where every lookup would fail
            known = previous or ""
            if previous is None:
                del os.environ[TASK_MODULES_ENV]
            else:
                os.environ[TASK_MODULES_ENV] = previous
            raise
        replaced = [n for n in new if n in before]
        if replaced:
            warnings.warn(
                f"task module {entry!r} registers {', '.join(map(repr, replaced))} again: it "
                "replaces the task of that name",
                stacklevel=2,
            )
        registered += new
    return registered


def available_tasks() -> list[str]:
    """Return the registered task names, sorted (``sparsetrain train --task``)."""
    _load_all()
    return sorted(_TASKS)


def get_task(name: str, seed: int = 0, **options) -> Task:
    """Build the task registered as ``name``; the train/test split is fixed by ``seed``."""
    _load_all()
    if name not in _TASKS:
        raise ValueError(
            f"unknown task {name!r}; valid names are: {', '.join(sorted(_TASKS))} (a task of "
            "your script's must be registered at its top level, not under `if __name__ == "
            '"__main__":`, for the spawned workers to see it; the command loads a module of tasks '
            "with --task-module)"
        )
    check_task_options(name, options)
    if not is_integer(seed, 0) or operator.index(seed) >= 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    task = _TASKS[name](seed=operator.index(seed), **options)
    check_task(task, name)
    return task


def check_task(task: Task, name: str) -> None:
    """Refuse, naming the task and what is wrong, a task whose data training cannot use:
    ``num_classes`` not a positive integer, an empty train or test set, and in a
    ``TensorDataset`` (of two tensors: the inputs, then the labels) labels that are not integers in
    ``[0, num_classes)`` or inputs that hold NaN or Inf. Other data sets are checked for
    length only (their items are not read); an object other than a Task is left to its user
    (anything with the attributes the caller reads will do)."""
    if not isinstance(task, Task):
        return
    if not is_integer(task.num_classes, 1):
        raise ValueError(
            f"task {name!r}: num_classes must be an integer >= 1, got {task.num_classes!r}"
        )
    for part in ("train", "test"):
        data = getattr(task, part)
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"task {name!r}: the {part} set is empty")
        if not isinstance(data, TensorDataset) or not data.tensors:
            continue
        if len(data.tensors) != 2:  # (the trainer unpacks (input, label) pairs)
            raise ValueError(
                f"task {name!r}: the {part} set is a TensorDataset of {len(data.tensors)} "
                "tensors; a task's examples are (input, label) pairs: one input tensor, then "
                "the labels (a model of several inputs takes them stacked, or a Dataset of "
                "its own)"
            )
        *inputs, labels = data.tensors
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"task {name!r}: the {part} set's labels (its last tensor) must be integer "
                f"class indices, got dtype {labels.dtype}"
            )
        if labels.numel():
            lo, hi = (int(v) for v in torch.aminmax(labels))
            if lo < 0 or hi >= task.num_classes:
                raise ValueError(
                    f"task {name!r}: the {part} set's labels lie in [{lo}, {hi}], but "
                    f"num_classes={task.num_classes} allows [0, {task.num_classes - 1}]"
                )
        for i, x in enumerate(inputs):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"task {name!r}: the {part} set's input tensor {i} holds NaN or Inf"
                )


def require_tensor_data(task: Task, name: str, what: str) -> None:
    """Refuse (ValueError), for ``what`` (a command that reads a task's tensors whole), a task
    whose train or test set is not a ``TensorDataset``; the trainer takes any Dataset."""
    for part in ("train", "test"):
        data = getattr(task, part)
        if not isinstance(data, TensorDataset):
            raise ValueError(
                f"{what} reads a task's data as the tensors of a TensorDataset (inputs, labels), "
                f"and the {part} set of task {name!r} is a {type(data).__name__}; `sparsetrain "
                "train` takes any Dataset"
            )


def check_logits(out: object, batch: int, task: Task) -> None:
    """Raise ``ValueError`` unless ``out``, the model's output for ``batch`` examples, is
    ``[batch, task.num_classes]`` logits, as accuracy (their argmax) and the default loss read
    them. A narrower output failed inside cross-entropy ("Target 5 is out of bounds") and a
    wider one trained on, its argmax free to name classes the task does not have."""
    if isinstance(out, torch.Tensor) and tuple(out.shape) == (batch, task.num_classes):
        return
    got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(
        f"task {task.name!r}: its model gave {got} for a batch of {batch}; a task's model must "
        f"give [batch, num_classes] logits, here [{batch}, {task.num_classes}] (num_classes is "
        "the task's)"
    )


def check_model_output(task: Task) -> None:
    """Build ``task``'s model and raise ``ValueError`` (:func:`check_logits`) unless it maps
    two training inputs to ``[2, num_classes]`` logits: for the commands that read a
    ``TensorDataset``, before any training. In eval mode without gradients, so nothing is
    drawn or learned; the model is not kept."""
    x = task.train.tensors[0][:2]
    model = task.build_model().eval()
    with torch.no_grad():
        out = model(x)
    check_logits(out, len(x), task)


def check_task_options(name: str, options: dict) -> None:
    """Raise ``ValueError`` naming the options task ``name`` does not take, and the ones it does
    (from its factory's signature), before any data is loaded."""
    _load_all()
    params = _parameters(_TASKS[name])
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        check_options("task", name, options, [p for p in params if p != "seed"])
    for key, value in options.items():
        kind = _kind(params[key]) if key in params else None
        if kind is None:
            continue
        types, what = _VALUE_KINDS[kind]
        if not isinstance(value, types) or isinstance(value, bool) != (kind is bool):
            raise ValueError(f"task {name!r} option {key} must be {what}, got {value!r}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            # (torch takes sizes and seeds as int64: a larger one had failed in every worker)
            raise ValueError(
                f"task {name!r} option {key} must be {what} in [-2**63, 2**63), got {value!r}"
            )
    if name in _CHECKS:
        _CHECKS[name](dict(options))


def string_options(name: str) -> set[str]:
    """The options of task ``name`` whose factory annotates them as ``str``."""
    _load_all()
    return {k for k, p in _parameters(_TASKS[name]).items() if p.annotation is str}


def _parameters(fn: Callable[..., Task]) -> Mapping[str, inspect.Parameter]:
    """The factory's parameters, with string annotations evaluated where they can be."""
    try:
        return inspect.signature(fn, eval_str=True).parameters
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated: go without
        return inspect.signature(fn).parameters


def _kind(param: inspect.Parameter) -> type | None:
    """The type a task option's values must have: its annotation's, where that is bool, int
    or float; else, unannotated, from its default (an int default takes any number, as
    ``scale=1`` often means a float); None: anything."""
    if param.annotation in _VALUE_KINDS:
        return param.annotation
    if param.annotation is not inspect.Parameter.empty:
        return None  # another type, or a string that could not be evaluated: not checked
    default = param.default
    if isinstance(default, bool):
        return bool
    return float if isinstance(default, (int, float)) else None


# A task option of this type takes values of these types (bool is an int to Python, but a
# width of True is a mistake, so bools are refused where the type is not bool).
_VALUE_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "True or False"),
    int: ((int,), "an int"),
    float: ((int, float), "a number"),
}


__all__ = ["Task", "available_tasks", "get_task", "register_task"]
