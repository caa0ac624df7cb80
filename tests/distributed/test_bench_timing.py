"""`bench cluster` times a short collective more often than a long one, on every rank alike.

The runs are timed by a fake clock that each call moves on by a set amount, so what is tested
is the stopping rule and the reduction over ranks, not how long this host takes to sleep."""

from __future__ import annotations

from .harness import oks, run_world

STEP = 2.0**-5  # a call's seconds: a power of two, so sums and differences are exact


class _Clock:
    """Stands in for the ``time`` module in ``sparsetrain.commands.bench``: wall and CPU
    seconds move only when a timed call moves them."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu


def _with_clock():
    from sparsetrain.commands import bench

    clock = _Clock()
    bench.time = clock  # this worker process only
    return bench._time_point, clock


def _timed(rank: int, world: int, min_time: float, max_reps: int):
    time_point, clock = _with_clock()
    calls = []

    def fn():  # rank 1 is the slow one: each time is the slowest rank's
        calls.append(1)
        clock.wall += STEP * (rank + 1)
        return 10 * (rank + 1), 20 * (rank + 1)

    rec = time_point(fn, reps=3, warmup=1, min_time=min_time, max_reps=max_reps)
    return rec, len(calls)


def test_short_points_repeat_until_min_time_and_ranks_stop_together(tmp_path):
    # Each run takes 1/16 s on the slow rank: 0.3 s is reached at the 5th (0.3125 s).
    for min_time, max_reps, runs in ((0.0, 25, 3), (0.3, 25, 5), (0.3, 4, 4)):
        results = oks(run_world(_timed, 2, tmp_path, min_time, max_reps))
        (rec0, calls0), (rec1, calls1) = results
        assert rec0 == rec1  # every rank decided on the same all-reduced times
        times = rec0["times_s"]
        assert calls0 == calls1 == runs + 1  # one untimed warmup, recorded apart
        assert rec0["warmup_s"] == [2 * STEP]
        assert times == [2 * STEP] * runs  # the slowest rank's time
        assert rec0["median_s"] == 2 * STEP
        assert rec0["bytes_sent_max"] == 20 and rec0["bytes_recv_max"] == 40


def _cpu(rank: int, world: int):
    time_point, clock = _with_clock()

    def sleeping():  # wall time and none of the CPU
        clock.wall += STEP
        return 0, 0

    def spinning():  # as much of this process's CPU as well
        clock.wall += STEP
        clock.cpu += STEP
        return 0, 0

    return [time_point(fn, reps=3, warmup=0) for fn in (sleeping, spinning)]


def test_each_run_records_the_cpu_seconds_of_all_ranks(tmp_path):
    """``cpu_s`` sums the ranks' CPU time, which says whether a call kept the host busy."""
    (slept, spun), same = oks(run_world(_cpu, 2, tmp_path))
    assert (slept, spun) == tuple(same)  # all-reduced: every rank records the same
    assert spun["cpu_s"] == [2 * STEP] * 3  # both ranks' CPU time, summed
    assert slept["cpu_s"] == [0.0] * 3
