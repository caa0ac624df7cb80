"""Starting worker processes on this machine, and ending those whose work is done."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping
from typing import NoReturn

# What the fork server imports once for every worker it starts: torch, and torch._dynamo,
# which DistributedDataParallel imports when it is built (a spawned worker imported both anew:
# about 3 s of CPU, against 0.2 s of training for a small task on 2 cores).
WORKER_PRELOAD = ("torch", "torch.distributed", "torch._dynamo")


START_METHOD_ENV = "SPARSETRAIN_START_METHOD"
START_METHODS = ("forkserver", "spawn")


def chosen_start_method() -> str:
    """The start method :func:`worker_start_method` uses: ``$SPARSETRAIN_START_METHOD`` if set
    (``forkserver`` or ``spawn``), else ``forkserver`` on Linux and ``spawn`` elsewhere. A
    ValueError names another value, or ``forkserver`` where the platform has none."""
    raw = os.environ.get(START_METHOD_ENV, "").strip()
    if not raw:
        return "forkserver" if sys.platform.startswith("linux") else "spawn"
    method = raw.lower()
    if method not in START_METHODS:
        raise ValueError(
            f"{START_METHOD_ENV}={raw!r}: the workers start by one of {', '.join(START_METHODS)}"
        )
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"{START_METHOD_ENV}=forkserver: this platform has no fork server")
    return method


# Variables that the preloaded modules (or the C libraries they load) read when imported, not
# later: where the launcher's differ from those the fork server started with (a notebook that
# sets TORCH_DISTRIBUTED_DEBUG before its second launch), the workers are spawned instead.
IMPORT_TIME_ENV = ("TORCH_", "OMP_", "MKL_", "KMP_", "GOMP_", "MALLOC_", "LD_", "PYTHON",
                   "GLIBC_TUNABLES")  # fmt: skip

_server_env: dict[str, str] | None = None  # of the fork server this module started


def _import_time_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


def worker_start_method() -> str:
    """How to start worker processes on this machine (:func:`chosen_start_method`). Under
    ``"forkserver"`` (Linux's default) they fork from a server process that has imported
    :data:`WORKER_PRELOAD` once, and that serves every later launch of this process too; it
    stays until this process ends, holding about 210 MiB of its own (torch 2.13, CPU build;
    benchmarks/launch_start.py), which the workers share. ``SPARSETRAIN_START_METHOD=spawn``
    spawns each worker, to import torch anew.

    The server starts at the first launch. Workers are handed the launcher's environment when
    they start, but what the preloaded modules read when imported is the server's: where a
    variable of :data:`IMPORT_TIME_ENV` has changed since the server started, that launch
    spawns its workers. So does one where the server cannot start (a Unix socket's path under
    ``$TMPDIR`` past 107 bytes), with a warning. Each worker still imports the main module,
    sparsetrain and the task itself, as a spawned one does. A server started by another (the
    user, with their own preload) is used as it is.
    """
    global _server_env
    method = chosen_start_method()
    if method != "forkserver":
        return method
    import multiprocessing.forkserver as forkserver

    server = getattr(forkserver, "_forkserver", None)
    running = server is not None and getattr(server, "_forkserver_pid", None) is not None
    if running:
        if _server_env is not None and _import_time_env(os.environ) != _server_env:
            return "spawn"
        return "forkserver"
    if server is not None:
        # Not started yet: add ours to what it will preload. Not "__main__" (the default): the
        # server would run the user's script, which a spawned worker imports as __mp_main__.
        current = [m for m in getattr(server, "_preload_modules", ()) if m != "__main__"]
        multiprocessing.set_forkserver_preload(
            current + [m for m in WORKER_PRELOAD if m not in current]
        )
    try:
        forkserver.ensure_running()
    except OSError as e:
        warnings.warn(
            f"sparsetrain: the fork server that starts the workers could not start ({e}; "
            f"under TMPDIR={os.environ.get('TMPDIR', tempfile.gettempdir())!r}), so they are "
            f"spawned, each importing torch anew; set {START_METHOD_ENV}=spawn to say so, or a "
            "shorter TMPDIR",
            RuntimeWarning,
            stacklevel=2,
        )
        return "spawn"
    _server_env = _import_time_env(os.environ)
    return "forkserver"


def fresh_random_state() -> None:
    """Seed anew, from the OS, the global random generators a forked worker shares with the
    fork server and with every other worker (numpy's, which torch's import loaded there;
    Python's ``random`` reseeds itself after a fork), as a spawned worker seeds its own."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


class LauncherState:
    """A worker argument that gives a worker forked from the fork server what a spawned one
    inherits from its launcher at the moment it starts: the launcher's environment, its stdout
    and stderr (the server's are those of the first launch: a caller that redirected its output
    since, as pytest's capture does, would not have seen the workers'), and a numpy random
    state of its own (:func:`fresh_random_state`). Pickled, it carries the environment and
    duplicates of the launcher's descriptors 1 and 2; unpickled in the worker, before its entry
    point runs, it puts them in place."""

    def __reduce__(self):
        from multiprocessing import reduction

        fds = []
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:  # closed in the launcher: the worker keeps its own
                fds.append(None)
            else:
                fds.append(reduction.DupFd(fd))
        return (_take_launcher_state, (dict(os.environ), *fds))


def launcher_state(method: str) -> LauncherState | None:
    """The :class:`LauncherState` to pass workers started by ``method`` (None under spawn,
    whose workers inherit all of it)."""
    return LauncherState() if method == "forkserver" else None


def _take_launcher_state(env: dict[str, str], *passed) -> None:
    if env != os.environ:
        os.environ.clear()
        os.environ.update(env)
    for fd, dup in zip((1, 2), passed):
        if dup is None:
            continue
        stream = sys.stdout if fd == 1 else sys.stderr
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
        new = dup.detach()
        if new != fd:
            os.dup2(new, fd)
            os.close(new)
    fresh_random_state()


def stop_with_parent() -> None:
    """End this spawned worker when the process that started it ends, however it ends.

    A launcher stopped by a signal it can catch stops its workers itself; one killed outright
    (SIGKILL, the out-of-memory killer) cannot, and its workers trained on as orphans until
    the end of their run. The parent's sentinel (a pipe it holds open) turns readable when it
    exits, so a waiting thread costs nothing until then. Nothing to do in a process that
    multiprocessing did not start.
    """
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)  # no one is left to report to, or to wait for a cleaner exit

    threading.Thread(target=watch, name="sparsetrain-parent-watch", daemon=True).start()


def exit_finished_worker(code: int = 0) -> NoReturn:
    """End a spawned worker whose results are written and whose process group is destroyed,
    skipping interpreter finalization.

    Gloo's threads can still hold finished asynchronous work (a DDP comm hook's futures) when
    the interpreter tears down; releasing it then aborts the process ("terminate called without
    an active exception", SIGABRT), so a run whose results are already on disk is reported as a
    crashed worker. It happened in about one in 25 two-rank runs with torch's PowerSGD hook.
    What a worker process does at a normal end still runs first: multiprocessing's own exit
    function (which its child processes run after their target, releasing the semaphores they
    made, such as tqdm's lock), then logging handlers and streams are flushed.
    """
    exit_function = getattr(multiprocessing.util, "_exit_function", None)
    if exit_function is not None and multiprocessing.parent_process() is not None:
        exit_function()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # (None where the launcher's was closed)
                stream.flush()
        except (OSError, ValueError):  # closed or redirected to a broken pipe
            pass
    os._exit(code)


# What a worker process holds of its own before any model or data: Python with PyTorch and
# sparsetrain imported had 153 MiB of private memory (torch 2.13, CPU build, 2026-12-06;
# /proc/self/smaps_rollup). The floor is set below that, so it only refuses what cannot fit.
WORKER_FLOOR_BYTES = 128 << 20


def available_memory() -> int | None:
    """Bytes of memory this machine can still give processes without swapping (Linux's
    ``MemAvailable``), or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def too_many_processes(
    count: int,
    what: str,
    each_bytes: int = 0,
    *,
    remedy: str = "or spread them over machines with torchrun",
    available: int | None = None,
) -> str | None:
    """Why ``count`` processes (named by ``what``, such as ``"workers=1000"``) cannot all run on
    this machine, each holding :data:`WORKER_FLOOR_BYTES` plus ``each_bytes`` of its own, or
    None where they fit or the machine's free memory is not known (``available`` overrides it).

    Started anyway, such a launch would not fail with an error: it would push the machine into
    swapping, or the kernel's out-of-memory killer would end some process, any process."""
    free = available_memory() if available is None else available
    need = WORKER_FLOOR_BYTES + max(0, each_bytes)
    if free is None or count * need <= free:
        return None
    fit = free // need
    held = "Python and PyTorch" + (" and its data" if each_bytes > 0 else "")
    return (
        f"{what}: {count} processes need at least {_gib(count * need)} of memory ({_gib(need)} "
        f"each for {held}) and this machine has {_gib(free)} available; "
        + (f"use at most {fit} here, {remedy}" if fit else remedy.removeprefix("or "))
    )
