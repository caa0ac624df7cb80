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


def test_modified_package_files_are_flagged(monkeypatch):
    def git(argv, **k):
        out = "a" * 40 + "\n" if "rev-parse" in argv else " M comm/ssar.py\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(subprocess, "run", git)
    assert _provenance.source_commit() == {"commit": "a" * 40, "package_modified": True}
