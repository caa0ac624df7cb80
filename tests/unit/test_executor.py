"""The hook's background thread: order, errors, and a clean exit while work is in flight."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sparsetrain.sync.executor import SerialExecutor


def test_runs_in_submission_order_and_reports_errors():
    ex = SerialExecutor()
    seen: list[int] = []
    futs = [ex.submit(lambda i=i: seen.append(i) or i) for i in range(20)]
    assert [f.wait() for f in futs] == list(range(20))
    assert seen == list(range(20))

    def boom():
        raise ValueError("bad bucket")

    with pytest.raises(ValueError, match="bad bucket"):
        ex.submit(boom).wait()
    ex.shutdown()
    # a submit after shutdown starts a fresh thread
    assert ex.submit(lambda: 7).wait() == 7
    ex.shutdown()


def test_interpreter_exit_while_thread_is_in_torch_code_does_not_abort():
    # A daemon thread still inside torch's C++ code when the interpreter finalizes is killed
    # mid-unwind and the process aborts ("terminate called without an active exception").
    # The executor is joined at exit, so the process ends normally after the work finishes.
    script = textwrap.dedent(
        """
        import threading, time, torch
        from sparsetrain.sync.executor import SerialExecutor
        torch.set_num_threads(1)
        ex = SerialExecutor()
        inside, leaving = threading.Event(), threading.Event()
        def work():
            a = torch.randn(400, 400)
            while not leaving.is_set():
                a = (a @ a).tanh()
                inside.set()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                a = (a @ a).tanh()
        ex.submit(work)
        started = inside.wait(30)  # the thread is inside the matmul loop
        leaving.set()              # and stays there 0.5 s more: exit without waiting
        assert started, "the work never started"
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
