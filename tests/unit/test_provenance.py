"""Benchmark files record where and on what they ran."""

from __future__ import annotations

import json
import re
import subprocess

import torch

from sparsetrain import _provenance


def test_environment_is_json_with_the_processor_versions_and_commit():
    env = json.loads(json.dumps(_provenance.environment(["bench", "x"])))
    assert env["command"] == ["bench", "x"]
    assert env["cpu"] and env["cores"] >= 1 and env["torch"] == torch.__version__
    src = env["source"]
    if src is not None:  # run from a git checkout (an editable install)
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"])
        assert isinstance(src["package_modified"], bool)


def test_no_git_or_no_checkout_records_no_commit(monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    assert _provenance.source_commit() is None

    def not_a_repo(argv, **k):
        return subprocess.CompletedProcess(argv, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(subprocess, "run", not_a_repo)
    assert _provenance.source_commit() is None

    def untracked_copy(argv, **k):  # an installed copy inside some other work tree
        if "ls-files" in argv:
            return subprocess.CompletedProcess(argv, 1, "", "error: pathspec did not match")
        return subprocess.CompletedProcess(argv, 0, "a" * 40 + "\n", "")

    monkeypatch.setattr(subprocess, "run", untracked_copy)
    assert _provenance.source_commit() is None


def test_modified_package_files_are_flagged(monkeypatch):
    def git(argv, **k):
        out = {"rev-parse": "a" * 40 + "\n", "ls-files": "__init__.py\n"}
        text = next((v for key, v in out.items() if key in argv), "?? comm/new.py\n")
        return subprocess.CompletedProcess(argv, 0, text, "")

    monkeypatch.setattr(subprocess, "run", git)
    assert _provenance.source_commit() == {"commit": "a" * 40, "package_modified": True}
