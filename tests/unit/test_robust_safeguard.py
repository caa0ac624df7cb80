"""SafeguardSGD: removes drifting workers for good, keeps honest noisy ones, exact state round trip."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.robust import get_aggregator


def _honest(gen, n, d, true):
    return true + torch.randn(n, d, generator=gen)


def test_removes_a_slow_alie_like_drift_and_keeps_honest_noisy_workers():
    n, f, d = 10, 3, 50
    gen = torch.Generator().manual_seed(0)
    # multiplier 1: removal at twice the estimated honest spread; the honest test below uses it too
    sg = get_aggregator("safeguard", n=n, f=f, window0=10, window1=100, threshold_multiplier=1.0)
    true = torch.ones(d)
    for _ in range(400):
        g = _honest(gen, n, d, true)
        honest = g[: n - f]
        # ALIE-like: every coordinate shifted by 0.5 standard deviations, within the honest spread
        g[n - f :] = honest.mean(0) - 0.5 * honest.std(0)
        out = sg(g[:, :25], key="a")
        sg(g[:, 25:], key="b")
        sg.end_step()
        assert torch.isfinite(out).all()
    stats = sg.stats()
    assert set(stats["removed"]) == {7, 8, 9}
    assert stats["good"] == list(range(7))
    # a single step of this attack is indistinguishable: the removal needed the windows
    assert min(stats["removed"].values()) > 10


def test_honest_noisy_workers_are_never_removed():
    n, d = 8, 30
    gen = torch.Generator().manual_seed(1)
    sg = get_aggregator("safeguard", n=n, f=3, window0=5, window1=40, threshold_multiplier=1.0)
    for _ in range(500):
        sg(_honest(gen, n, d, torch.full((d,), 0.3)) * 2.0)
        sg.end_step()
    assert sg.stats()["removed"] == {}


def test_a_warm_up_without_spread_goes_on_until_it_sees_one():
    # Every worker sends zeros for the first 5 steps (the whole warm-up): thresholds made from
    # that would be ~0, leave no majority and remove nobody. The warm-up waits for a spread.
    n, f, d = 7, 2, 10
    gen = torch.Generator().manual_seed(1)
    sg = get_aggregator("safeguard", n=n, f=f, window0=5, window1=20)
    for t in range(60):
        g = torch.zeros(n, d) if t < 5 else _honest(gen, n, d, torch.ones(d))
        g[n - f :] = -10.0 * g[n - f :]  # sign flip, scaled
        sg(g)
        sg.end_step()
        if t == 4:
            assert sg.stats()["warming_up"]
    stats = sg.stats()
    assert not stats["warming_up"] and stats["no_majority_steps"] == 0
    assert set(stats["removed"]) == {5, 6} and stats["good"] == list(range(5))


def test_removal_is_permanent_and_the_output_is_the_mean_of_the_good():
    sg = get_aggregator("safeguard", n=5, f=1, window0=2, window1=4, threshold0=1.0, threshold1=2.0)
    bad = torch.tensor([[1.0], [1.1], [0.9], [1.0], [-40.0]])
    assert torch.allclose(sg(bad), bad.mean(0))  # step 0 still uses everyone
    sg.end_step()
    assert sg.stats()["removed"] == {4: 0}
    nice = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0]])
    for _ in range(6):  # it behaves now, but stays out
        assert torch.allclose(sg(nice * 3), torch.tensor([3.0]))
        sg.end_step()
    assert sg.stats()["good"] == [0, 1, 2, 3]


def test_after_a_removal_the_accumulations_divide_by_the_good_workers_left():
    """Each step adds g_i / |good| to the accumulations (Allen-Zhu et al.'s A_i): after one
    removal, dividing by all n instead shrank a second, slower drift below the thresholds, and
    worker 3 was never removed (from a review of the tests)."""
    sg = get_aggregator("safeguard", n=5, f=1, window0=2, window1=4, threshold0=1.0, threshold1=2.0)
    sg(torch.tensor([[1.0], [1.0], [1.0], [1.0], [-40.0]]))  # worker 4: out at step 0
    sg.end_step()
    drift = torch.tensor([[1.0], [1.0], [1.0], [5.6], [1.0]])  # worker 3: 4.6 off each step
    sg(drift)
    acc = sg.state_dict()["acc"][""]
    # the four good workers' gradients over 4, added to what step 0 left (window0 = 2)
    good = [0, 1, 2, 3]
    assert torch.allclose(acc["short"][good], 1.0 / 5 + drift[good] / 4)
    sg.end_step()
    for _ in range(3):
        sg(drift)
        sg.end_step()
    assert sg.stats()["removed"] == {4: 0, 3: 3}


def test_state_round_trip_is_exact():
    gen = torch.Generator().manual_seed(2)
    a = get_aggregator("safeguard", n=6, f=2, window0=3, window1=9, noise_std=0.1, seed=3)
    for _ in range(13):
        g = torch.randn(6, 7, generator=gen)
        g[5] -= 3.0
        a(g[:, :4], key="x")
        a(g[:, 4:], key="y")
        a.end_step()
    b = get_aggregator("safeguard", n=6, f=2, window0=3, window1=9, noise_std=0.1, seed=3)
    b.load_state_dict(a.state_dict())
    assert b.stats() == a.stats()
    for _ in range(12):
        g = torch.randn(6, 7, generator=gen)
        for key, part in (("x", g[:, :4]), ("y", g[:, 4:])):
            assert torch.equal(a(part, key=key), b(part, key=key))
        a.end_step()
        b.end_step()
    assert a.stats() == b.stats()
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["good"], sb["good"])
    assert sa["acc"].keys() == sb["acc"].keys() == {"x", "y"}  # the loop below checks something
    assert all(sa["acc"].values()) and all(
        sa["acc"][k].keys() == sb["acc"][k].keys() for k in sa["acc"]
    )
    for k in sa["acc"]:
        for w in sa["acc"][k]:
            assert torch.equal(sa["acc"][k][w], sb["acc"][k][w])


def test_noise_is_identical_for_identical_inputs():
    g = torch.randn(4, 5)
    outs = []
    for _ in range(2):
        sg = get_aggregator(
            "safeguard", n=4, f=1, threshold0=10.0, threshold1=20.0, noise_std=1.0, seed=7
        )
        outs.append(sg(g, key="k"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], g.mean(0))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"window0": 20, "window1": 10}, "must not exceed window1"),
        ({"threshold0": 1.0}, "both threshold0 and threshold1"),
        ({"threshold0": 3.0, "threshold1": 1.0}, "must not exceed threshold1"),
        ({"threshold0": -1.0, "threshold1": 1.0}, "threshold0 must be a finite number > 0"),
        ({"window0": 0}, "window0"),
        ({"noise_std": -0.5}, "noise_std"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("safeguard", n=5, f=1, **options)


@pytest.mark.parametrize("noise_std", (0.0, 0.1))
def test_state_loaded_on_cpu_follows_the_gradients_device(noise_std):
    # "meta" stands in for a GPU (torch refuses to mix it with CPU tensors, as CUDA ones); the
    # noise is drawn on CPU, so every rank adds the same whatever its GPU.
    g = torch.randn(3, 4)
    a = get_aggregator("safeguard", n=3, f=1, window0=2, window1=4, noise_std=noise_std)
    for _ in range(3):
        a(g, key="w")
        a.end_step()
    b = get_aggregator("safeguard", n=3, f=1, window0=2, window1=4, noise_std=noise_std)
    b.load_state_dict(a.state_dict())
    assert b.aggregate(g.to("meta"), "w").device.type == "meta"
    assert {t.device.type for t in b.state_dict()["acc"]["w"].values()} == {"meta"}


def test_the_reference_is_a_worker_with_a_majority_also_when_distances_are_huge():
    # Worker 6's sum, 1e20 (or Inf) away, made every candidate's tie-break spread infinite,
    # and argmin over all workers then chose worker 0, an attacker with no majority, as the
    # reference: every honest worker was removed.
    for far in (1e20, float("inf")):
        sg = get_aggregator(
            "safeguard", n=7, f=3, window0=1, window1=1, threshold0=1.0, threshold1=1.0
        )
        g = torch.zeros(7, 4)
        g[1:6] = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 0.01
        g[0, 0] = 2.5 * 7  # 2.5 from the honest sums, divided by |good| = 7
        g[6] = far
        sg(g)
        sg.end_step()
        assert sg.stats()["good"] == [1, 2, 3, 4, 5], far


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_worker_sending_nan_or_inf_is_left_out_at_once_and_removed(bad):
    # A NaN attacker in the warm-up made the median radius NaN: the warm-up never ended and no
    # one was removed. Now such a worker is out of the step it sends it in and removed.
    n, d = 7, 6
    gen = torch.Generator().manual_seed(1)
    sg = get_aggregator("safeguard", n=n, f=2, window0=3, window1=6)
    for step in range(12):
        g = 1.0 + 0.1 * torch.randn(n, d, generator=gen)
        g[n - 1] = bad
        out = sg(g)
        assert torch.isfinite(out).all(), step
        sg.end_step()
    stats = sg.stats()
    assert stats["removed"] == {n - 1: 0} and not stats["warming_up"]
    assert stats["good"] == list(range(n - 1))


def test_an_overflow_on_most_workers_drops_the_step_and_removes_no_one():
    # A float16 overflow on every rank: the step's output is NaN (the sync layer drops it),
    # nothing is accumulated, no one is removed, and the next step goes on.
    sg = get_aggregator("safeguard", n=4, f=1, window0=2, window1=4, threshold0=1.0, threshold1=2.0)
    g = torch.ones(4, 3, dtype=torch.float16)
    sg(g)
    sg.end_step()
    before = sg.state_dict()["acc"][""]["long"].clone()
    g[:3] = float("inf")
    assert torch.isnan(sg(g)).all()
    sg.end_step()
    assert sg.stats()["good"] == [0, 1, 2, 3]
    assert torch.equal(sg.state_dict()["acc"][""]["long"], before)
    assert torch.isfinite(sg(torch.ones(4, 3, dtype=torch.float16))).all()


def test_workers_lost_at_an_earlier_bucket_count_against_the_majority_of_a_later_one():
    # Workers 0 and 1 overflow in bucket "a", worker 2 in bucket "b": only 2 of 5 are usable in
    # "b". It had counted 3 finite there, removed 0, 1 and 2, and left a minority good: every
    # later output was NaN. Now "b" has no majority (its output is NaN, the step is dropped)
    # and only the workers left out at "a" are removed.
    sg = get_aggregator("safeguard", n=5, f=2, window0=2, window1=4, threshold0=1.0, threshold1=2.0)
    a, b = torch.ones(5, 3), torch.ones(5, 3)
    a[[0, 1]] = float("nan")
    b[2] = float("nan")
    assert torch.equal(sg(a, key="a"), torch.ones(3))
    assert torch.isnan(sg(b, key="b")).all()
    sg.end_step()
    assert sg.stats()["good"] == [2, 3, 4]
    for _ in range(3):
        assert torch.equal(sg(torch.ones(5, 3), key="a"), torch.ones(3))
        sg.end_step()


def test_windows_that_keep_different_majorities_remove_no_one_and_warn():
    # The short window keeps {0, 1, 4} and the long one {0, 2, 3}: each a majority, their
    # intersection {0} not. The removals had been made, and every later output was NaN.
    sg = get_aggregator(
        "safeguard", n=5, f=2, window0=1, window1=2, threshold0=0.72, threshold1=1.64
    )
    x = torch.tensor([[3.43, 3.84], [1.78, 0.28], [3.33, 3.80], [2.74, 2.74], [1.76, 0.14]])
    y = torch.tensor([[1.98, 0.31], [1.75, 0.41], [4.22, 0.57], [4.11, 0.64], [1.62, 0.37]])
    sg(5 * x)
    sg.end_step()
    sg(5 * y)
    counted = sg.stats()["no_majority_steps"]
    with pytest.warns(UserWarning, match=r"removing workers \[1, 2, 3, 4\] at step 1 would leave "
                      r"1 of the n=5 workers good, not a majority"):  # fmt: skip
        sg.end_step()
    stats = sg.stats()
    assert stats["good"] == [0, 1, 2, 3, 4] and stats["removed"] == {}
    assert stats["no_majority_steps"] == counted + 1
    assert torch.isfinite(sg(5 * x)).all()
    state = sg.state_dict()  # and the state says so too
    assert bool(state["good"].all()) and state["removed"] == {}


def test_the_last_warm_up_step_is_checked_so_the_next_step_averages_no_stray_worker():
    # Attackers who stray from the start were averaged into the first step after the warm-up
    # (removed only at its end): one huge sign flip there was enough to ruin a run.
    n, f, d = 10, 3, 20
    gen = torch.Generator().manual_seed(0)
    sg = get_aggregator("safeguard", n=n, f=f, window0=4, window1=8)
    for _ in range(sg.warmup):
        g = 1.0 + 0.1 * torch.randn(n, d, generator=gen)
        g[n - f :] = -1e5
        sg(g)
        sg.end_step()
    assert not sg.stats()["warming_up"]
    assert sg.stats()["good"] == list(range(n - f))
    g = 1.0 + 0.1 * torch.randn(n, d, generator=gen)
    g[n - f :] = -1e5
    assert (sg(g) - 1.0).abs().max() < 0.5


def test_half_gradients_are_averaged_in_float32():
    sg = get_aggregator("safeguard", n=4, f=1, window0=2, window1=4, threshold0=1.0, threshold1=2.0)
    out = sg(torch.full((4, 3), 40000.0, dtype=torch.float16))
    assert out.dtype == torch.float16 and (out == 40000.0).all()
