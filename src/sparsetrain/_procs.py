"""Ending worker processes whose work is done."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import sys
from typing import NoReturn


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
            stream.flush()
        except (OSError, ValueError):  # closed or redirected to a broken pipe
            pass
    os._exit(code)
