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


def _interleaved(rank: int, world: int):
    from sparsetrain.commands.bench import _time_points

    order = []

    def call(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)
            return 1, 1

        return fn

    recs = _time_points(
        {"fast": call("fast", 0.01), "slow": call("slow", 0.05)},
        reps=3, warmup=1, min_time=0.1, max_reps=25,
    )  # fmt: skip
    return order, {n: (len(r["warmup_s"]), len(r["times_s"])) for n, r in recs.items()}


def test_points_are_timed_in_turn_so_a_slow_spell_is_shared(tmp_path):
    (order0, counts0), (order1, counts1) = oks(run_world(_interleaved, 2, tmp_path))
    assert order0 == order1 and counts0 == counts1
    # Warm-ups first, then the timed runs alternate until the slow call has its 3 runs (0.15 s,
    # past min_time); the fast one goes on alone until its runs add up to 0.1 s.
    assert order0[:8] == ["fast", "slow"] * 4
    assert counts0["slow"] == (1, 3)
    assert order0[8:] == ["fast"] * (counts0["fast"][1] - 3)
    assert 4 <= counts0["fast"][1] <= 10 and counts0["fast"][0] == 1
