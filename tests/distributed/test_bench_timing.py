"""`bench cluster` times a short collective more often than a long one, on every rank alike."""

from __future__ import annotations

import time

from sparsetrain.commands.bench import _time_point

from .harness import oks, run_world


def _timed(rank: int, world: int, min_time: float, max_reps: int):
    calls = []

    def fn():  # rank 1 is the slow one: each time is the slowest rank's
        calls.append(1)
        time.sleep(0.02 * (rank + 1))
        return 10 * (rank + 1), 20 * (rank + 1)

    rec = _time_point(fn, reps=3, warmup=1, min_time=min_time, max_reps=max_reps)
    return rec, len(calls)


def test_short_points_repeat_until_min_time_and_ranks_stop_together(tmp_path):
    for min_time, max_reps, want in ((0.0, 25, "reps"), (0.3, 25, "time"), (0.3, 4, "cap")):
        results = oks(run_world(_timed, 2, tmp_path, min_time, max_reps))
        (rec0, calls0), (rec1, calls1) = results
        assert rec0 == rec1  # every rank decided on the same all-reduced times
        times = rec0["times_s"]
        assert calls0 == calls1 == len(times) + 1  # one untimed warmup, recorded apart
        assert len(rec0["warmup_s"]) == 1 and rec0["warmup_s"][0] >= 0.04
        assert min(times) >= 0.04  # the slowest rank's time
        assert rec0["bytes_sent_max"] == 20 and rec0["bytes_recv_max"] == 40
        if want == "reps":
            assert len(times) == 3
        elif want == "time":  # stopped at the first run that reached 0.3 s, after at least 3
            assert 3 <= len(times) <= 8
            assert sum(times) >= 0.3 and (len(times) == 3 or sum(times[:-1]) < 0.3)
        else:
            assert len(times) == 4 and sum(times) < 0.3


def _cpu(rank: int, world: int):
    def sleeping():
        time.sleep(0.03)
        return 0, 0

    def spinning():  # 30 ms of this process's CPU, however long the host takes to give it
        c0 = time.process_time()
        while time.process_time() - c0 < 0.03:
            pass
        return 0, 0

    return [_time_point(fn, reps=3, warmup=0) for fn in (sleeping, spinning)]


def test_each_run_records_the_cpu_seconds_of_all_ranks(tmp_path):
    """``cpu_s`` sums the ranks' CPU time, which says whether a call kept the host busy."""
    (slept, spun), same = oks(run_world(_cpu, 2, tmp_path))
    assert (slept, spun) == tuple(same)  # all-reduced: every rank records the same
    assert len(slept["cpu_s"]) == len(spun["cpu_s"]) == 3
    assert all(c >= 2 * 0.03 for c in spun["cpu_s"])  # both ranks' 30 ms
    assert all(c < 0.03 for c in slept["cpu_s"])  # a sleep takes no CPU
