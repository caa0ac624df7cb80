"""Where and on what a benchmark ran, recorded next to its results.

Times measured on this kind of machine depend on its processor as much as on the code: a fit of
the cost model made on one day's host can miss another day's run by 50% or more where the local
work (merges, sorts) runs at another speed. So every benchmark file records the processor, the
cores, the library versions and the commit of the source it ran (``bench cluster``,
``bench_end_to_end`` and ``bench_latency_steps`` write it), and ``bench refit --predict`` says
when two runs came from different processors.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def source_commit() -> dict[str, Any] | None:
    """The git commit of this package's source and whether the package's files differ from it
    (modified, deleted or new files, ignored ones aside), where the package runs from a git
    checkout that tracks it (an editable install); None otherwise, also for an installed copy
    that merely sits inside some git work tree (a virtual environment in a checkout)."""
    here = Path(__file__).resolve().parent

    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(here), *argv], capture_output=True, text=True, timeout=10
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        if git("ls-files", "--error-unmatch", "--", "__init__.py").returncode != 0:
            return None  # a copy the repository does not track
        diff = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "package_modified": bool(diff.stdout.strip())}


def machine_cores() -> int:
    """Processors this process may run on (emulated ranks on one machine all share them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """A JSON-ready record of this run: when (UTC), the command, the processor and the cores
    this process may use, the Python, PyTorch and sparsetrain versions, and the source commit."""
    import torch

    import sparsetrain

    return {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv if argv is None else argv),
        "cpu": cpu_model(),
        # (the kernels torch picks by it round differently: results can differ between hosts)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": machine_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparsetrain": sparsetrain.__version__,
        "source": source_commit(),
    }
