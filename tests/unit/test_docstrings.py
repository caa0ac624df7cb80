"""The examples in the docstrings run, and every public name says what it is (help())."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import sparsetrain

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(sparsetrain.__path__, "sparsetrain.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["sparsetrain", *MODULES])
def test_docstring_examples_run(name):
    """Examples that stand alone run as written; those that need a model, a group or a
    launch of workers are marked ``# doctest: +SKIP``."""
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        if test.examples:
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize(
    "package",
    ["sparsetrain", *(m for m in MODULES if hasattr(importlib.import_module(m), "__all__"))],
)
def test_public_names_have_docstrings(package):
    module = importlib.import_module(package)
    missing = [
        n
        for n in module.__all__
        if (inspect.isfunction(obj := getattr(module, n)) or inspect.isclass(obj))
        and not inspect.getdoc(obj)
    ]
    assert not missing, f"{package}: {missing} have no docstring"
