"""Registering a name: a built-in's name is refused when it is registered (or, for tasks, replaces
the built-in for good), whenever the built-ins load. Found by an API bad-input review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparsetrain.comm import SparseCollective
from sparsetrain.comm.registry import register_collective
from sparsetrain.compressors import register_compressor
from sparsetrain.perfmodel import register_model
from sparsetrain.pruning.schedules import Schedule, register_schedule

SRC = str(Path(__file__).resolve().parents[2] / "src")


def fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (the built-ins not loaded yet); return its output."""
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_a_built_in_compressors_name_is_refused_before_the_built_ins_are_used():
    # Accepted while the built-ins had not loaded; every get_compressor after failed then.
    out = fresh(
        "from sparsetrain.compressors import Compressor, get_compressor, register_compressor\n"
        "class Mine(Compressor):\n    pass\n"
        "try:\n    register_compressor('fp16')(Mine)\n"
        "except ValueError as e:\n    print('refused:', e)\n"
        "print(type(get_compressor('topk', density=0.1)).__name__)\n"
    )
    assert "refused: compressor name 'fp16' is already registered by" in out
    assert out.strip().endswith("TopK")


def test_a_compressor_must_be_a_compressor_class():
    with pytest.raises(TypeError, match=r"register_compressor\('mine'\) takes a subclass of "
                       r"sparsetrain.compressors.Compressor, got <class 'object'>"):  # fmt: skip
        register_compressor("mine")(object)


@pytest.mark.parametrize(
    "register, name, base, words",
    [
        (register_collective, "oktopk", SparseCollective, "collective name 'oktopk' is already"),
        (register_schedule, "gradual", Schedule, "schedule name 'gradual' is already"),
        (register_model, "dense", None, "a cost model for 'dense' is already registered"),
    ],
)
def test_a_built_in_name_is_not_silently_replaced(register, name, base, words):
    from sparsetrain import perfmodel
    from sparsetrain.comm import registry
    from sparsetrain.pruning import schedules

    tables = [registry._COLLECTIVES, schedules._SCHEDULES, perfmodel._MODELS]
    saved = [dict(t) for t in tables]
    what = type("Mine", (base,), {}) if base is not None else (lambda q: None)
    try:
        with pytest.raises(ValueError, match=words):
            register(name)(what)
    finally:  # were it replaced after all, tests elsewhere would not see the built-in
        for table, before in zip(tables, saved):
            table.clear()
            table.update(before)


def test_a_task_registered_under_a_built_in_name_before_first_use_stays_registered():
    # The built-in, loaded at the first lookup, replaced the user's silently.
    out = fresh(
        "from sparsetrain.tasks import get_task, register_task\n"
        "@register_task('digits-mlp')\n"
        "def mine(seed=0):\n    return 'mine'\n"
        "print(get_task('digits-mlp'))\n"
    )
    assert out.strip() == "mine"
