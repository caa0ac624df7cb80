"""Keeping freed host memory: large CPU tensors made again reuse pages instead of faulting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsetrain import hostmem

# Runs in a fresh interpreter: the setting is per process and cannot be undone.
# Makes a 96 MiB tensor (above glibc's largest mmap threshold, 32 MiB, and above the 64 MiB
# heaps it gives threads other than the main one), each freed before the next, on the main
# thread or on a thread started afterwards (as the DDP hook's is). It warms up until two in a
# row fault in almost nothing, or 24 times: with kept memory the heap still grows by a tensor
# for the first few (PyTorch asks for 64-byte-aligned blocks, which need a little more than
# the block freed before, until freed blocks have merged; 2 to 9 times in a thread here). Then
# six more, whose page faults are counted one by one.
_PROBE = """
import json, resource, sys, threading
import torch
import sparsetrain
hostmem = sparsetrain.hostmem  # as README calls it: after a plain `import sparsetrain`
applied = hostmem.reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = []
def make():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(24 << 20, dtype=torch.float32)
    t.fill_(1.0)  # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def run():
    quiet = 0
    for _ in range(24):
        quiet = quiet + 1 if make() < 1000 else 0
        if quiet == 2:
            break
    for _ in range(6):
        faults.append(make())
if sys.argv[2] == "thread":
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
else:
    run()
print(json.dumps({"applied": applied, "faults": faults,
                  "reusing": hostmem.reusing_freed_memory()}))
"""
PAGES = (96 << 20) // os.sysconf("SC_PAGE_SIZE")  # pages one tensor covers

_ALLOCATOR_ENV = (*hostmem._USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD")


def probe(mode: str, where: str = "main", **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_ENV}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, where],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(not hostmem._glibc(), reason="needs Linux with glibc")


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return "[always]" in fh.read()
    except OSError:
        return False


# The counts below are of 4 KiB pages; where the kernel backs every large mapping with 2 MiB
# pages (transparent huge pages "always", RHEL's default) a tensor faults in 512 times fewer.
four_kib_pages = pytest.mark.skipif(
    _huge_pages_always(),
    reason="transparent huge pages are 'always' here: page faults are not counted in 4 KiB pages",
)


@glibc_only
@four_kib_pages
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_large_tensor_made_again_reuses_pages_instead_of_faulting_them_in(where):
    default = probe("default", where)
    reused = probe("reuse", where)
    # glibc's own setting: every 96 MiB tensor is a fresh mapping, faulted in page by page.
    assert all(f >= 0.9 * PAGES for f in default["faults"]), default
    assert default["reusing"] is False
    assert reused["applied"] is True and reused["reusing"] is True
    # Kept memory, once warm: the tensors reuse the pages of the one before. One of the six
    # may still fault in a tensor's worth, where a small block the interpreter allocated in
    # between took the front of the freed region and the heap grew once more.
    quiet = [f <= 0.05 * PAGES for f in reused["faults"]]
    assert sum(quiet) >= 5, reused


@glibc_only
@four_kib_pages
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_MAX_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_ARENA_MAX": "4"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"},
        {"LD_PRELOAD": "/nonexistent/libjemalloc.so"},
    ],
)
def test_an_allocator_the_user_chose_through_the_environment_is_left_alone(env):
    result = probe("reuse", **env)
    assert result["applied"] is False and result["reusing"] is False
    # glibc's defaults (or the user's) stand: every tensor is faulted in afresh
    assert all(f >= 0.9 * PAGES for f in result["faults"]), result


@pytest.mark.parametrize(
    ("keep", "error", "words"),
    [
        (True, TypeError, "keep_bytes must be an int"),
        (1.5e9, TypeError, "keep_bytes must be an int"),
        (1 << 19, ValueError, "from 1 MiB to 2 GiB - 1"),
        (1 << 31, ValueError, "from 1 MiB to 2 GiB - 1"),
    ],
)
def test_bad_keep_bytes_is_refused_before_anything_changes(keep, error, words):
    with pytest.raises(error, match=words):
        hostmem.reuse_freed_memory(keep)


# A reserve, then a first 96 MiB tensor: its pages were faulted in by the reserve.
_RESERVE_PROBE = """
import json, resource, sys
import torch
import sparsetrain
hostmem = sparsetrain.hostmem  # as README calls it: after a plain `import sparsetrain`
applied = hostmem.reuse_freed_memory() if sys.argv[1] == "reuse" else None
reserved = hostmem.reserve(160 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.empty(24 << 20, dtype=torch.float32)
t.fill_(1.0)
print(json.dumps({"reserved": reserved,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@glibc_only
@four_kib_pages
def test_a_reserve_takes_the_first_tensors_page_faults_out_of_the_step():
    clean = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_ENV}
    runs = {}
    for mode in ("reuse", "default"):
        out = subprocess.run(
            [sys.executable, "-c", _RESERVE_PROBE, mode],
            capture_output=True,
            text=True,
            timeout=120,
            env={**clean, "OMP_NUM_THREADS": "1"},
            check=True,
        )
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["reuse"]["reserved"] == 160 << 20
    assert runs["reuse"]["faults"] <= 0.05 * PAGES, runs
    # without kept memory glibc would give a reserve back at once: none is made
    assert runs["default"]["reserved"] == 0
    assert runs["default"]["faults"] >= 0.9 * PAGES, runs


@pytest.mark.parametrize(
    ("nbytes", "error", "words"),
    [
        (-1, ValueError, "nbytes must be >= 0"),
        (1.5, TypeError, "nbytes must be an int"),
        (True, TypeError, "nbytes must be an int"),
    ],
)
def test_bad_reserve_sizes_are_refused(nbytes, error, words):
    with pytest.raises(error, match=words):
        hostmem.reserve(nbytes)
