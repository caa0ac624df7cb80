"""Robust aggregation rules on hand-made inputs with known answers, invariances and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.robust import aggregate, available_aggregators, get_aggregator, get_attack
from sparsetrain.robust.base import key_seed
from tests.states import same

ORDER_FREE = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median"]


def test_registry_lists_every_rule():
    assert set(available_aggregators()) >= {
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "geometric_median",
        "centered_clipping",
        "bucketing",
        "safeguard",
    }


def test_median_odd_and_even():
    g = torch.tensor([[1.0, 9.0], [2.0, 0.0], [100.0, 1.0]])
    assert torch.equal(aggregate("median", g, f=1), torch.tensor([2.0, 1.0]))
    g4 = torch.tensor([[1.0], [2.0], [4.0], [100.0]])
    assert torch.equal(aggregate("median", g4, f=1), torch.tensor([3.0]))


def test_trimmed_mean_drops_f_each_side_per_coordinate():
    g = torch.tensor([[0.0, 10.0], [1.0, -50.0], [3.0, 11.0], [50.0, 12.0], [-7.0, 13.0]])
    # coordinate 0 sorted: -7 0 1 3 50 -> mean(0, 1, 3); coordinate 1: -50 10 11 12 13 -> mean(10, 11, 12)
    out = aggregate("trimmed_mean", g, f=1)
    assert torch.allclose(out, torch.tensor([4.0 / 3.0, 11.0]))
    assert torch.allclose(aggregate("trimmed_mean", g, f=1, trim=2), torch.tensor([1.0, 11.0]))


def test_krum_picks_the_worker_closest_to_its_neighbours():
    g = torch.tensor([[0.0], [0.1], [0.2], [0.3], [9.0]])
    # n - f - 2 = 2 neighbours; scores: 0.05, 0.02, 0.02, 0.05, ... -> worker 1 (lowest index on a tie)
    assert torch.equal(aggregate("krum", g, f=1), torch.tensor([0.1]))
    two_d = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.4, 0.4], [50.0, 50.0]])
    assert torch.equal(aggregate("krum", two_d, f=1), torch.tensor([0.4, 0.4]))


def test_multi_krum_averages_the_m_best():
    g = torch.tensor([[0.0], [0.2], [0.4], [0.6], [9.0]])
    assert torch.allclose(aggregate("multi_krum", g, f=1, m=3), torch.tensor([0.2]))
    assert torch.allclose(aggregate("multi_krum", g, f=1, m=5), g.mean(0))


def test_geometric_median_matches_the_fermat_point():
    # the Fermat point of an equilateral-ish right triangle (0,0), (1,0), (0,1): x = y = (3 - sqrt 3) / 6
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = (3 - 3**0.5) / 6
    assert torch.allclose(
        aggregate("geometric_median", g, f=1), torch.tensor([expected, expected]), atol=1e-5
    )
    # a far outlier barely moves it, unlike the mean
    far = torch.cat([torch.zeros(4, 2), torch.tensor([[1e6, 1e6]])])
    assert aggregate("geometric_median", far, f=1).abs().max() < 1.0


@pytest.mark.parametrize("scale", [1e-9, 1e-8, 1.0, 1e160])
def test_geometric_median_scales_with_its_input(scale):
    """Rows 1e-8 apart were all within eps of the start (z stayed the coordinate-wise median,
    0); float64 rows past 1e154 squared to Inf in the distances, and z came back 0."""
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = (3 - 3**0.5) / 6
    out = aggregate("geometric_median", g * scale, f=1) / scale
    torch.testing.assert_close(
        out, torch.tensor([expected] * 2, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_centered_clipping_bounds_an_outlier_and_keeps_its_anchor():
    cc = get_aggregator("centered_clipping", n=3, f=1, tau=1.0)
    out = cc(torch.tensor([[0.5], [0.5], [100.0]]))
    assert torch.allclose(out, torch.tensor([(0.5 + 0.5 + 1.0) / 3]))
    # second step starts from the previous output
    out2 = cc(torch.tensor([[0.5], [0.5], [100.0]]))
    assert torch.allclose(out2, out + torch.tensor([(2 * (0.5 - out.item()) + 1.0) / 3]))
    sd = cc.state_dict()
    other = get_aggregator("centered_clipping", n=3, f=1, tau=1.0)
    other.load_state_dict(sd)
    g = torch.randn(3, 1)
    assert torch.equal(other(g), cc(g))


def test_centered_clipping_clips_a_difference_whose_squares_overflow_to_tau():
    # |(1e20, 1e20)| overflows float32's squares: the row had norm Inf, scale 0, and counted as
    # no move at all. Karimireddy et al. clip it to length tau along its direction.
    cc = get_aggregator("centered_clipping", n=3, f=1, tau=1.0)
    out = cc(torch.tensor([[1e20, 1e20], [0.5, 0.0], [0.5, 0.0]]))
    s = 0.5**0.5
    torch.testing.assert_close(out, torch.tensor([(s + 1.0) / 3, s / 3]))
    # A row holding Inf still moves the anchor by nothing.
    cc = get_aggregator("centered_clipping", n=3, f=1, tau=1.0)
    out = cc(torch.tensor([[float("inf"), 1e20], [0.5, 0.0], [0.5, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([1 / 3, 0.0]))


def test_centered_clipping_with_momentum_clips_the_workers_momenta():
    """m_i <- beta m_i + (1 - beta) g_i (Karimireddy et al.'s worker momentum) is what gets
    clipped around the anchor; a momentum without the (1 - beta) came out up to 1 / (1 - beta)
    times too large, unnoticed (from a review of the tests)."""
    g1 = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]])
    g2 = torch.tensor([[-2.0, 0.0], [1.0, 1.0], [2.0, -2.0]])
    cc = get_aggregator("centered_clipping", n=3, f=1, tau=1e9, momentum=0.5)
    out1 = cc(g1)  # tau this large clips nothing: the mean of the momenta
    assert torch.equal(cc.state_dict()["momenta"][""], 0.5 * g1)
    assert torch.allclose(out1, (0.5 * g1).mean(0))
    out2 = cc(g2)
    assert torch.equal(cc.state_dict()["momenta"][""], 0.25 * g1 + 0.5 * g2)
    assert torch.allclose(out2, (0.25 * g1 + 0.5 * g2).mean(0))
    # with a radius that clips, the anchor moves by the mean of the clipped momenta
    cc = get_aggregator("centered_clipping", n=3, f=1, tau=0.5, momentum=0.5)
    m = 0.5 * g1
    clipped = m * torch.clamp(0.5 / m.norm(dim=1, keepdim=True), max=1.0)
    assert torch.allclose(cc(g1), clipped.mean(0))


def test_bucketing_averages_buckets_before_the_base_rule():
    g = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [50.0]])
    rule = get_aggregator("bucketing", n=6, f=1, base="median", bucket_size=2)
    assert torch.equal(rule(g), torch.tensor([1.0]))
    # bucket size 1 is the base rule itself
    x = torch.randn(7, 5)
    rule = get_aggregator("bucketing", n=7, f=2, base="median", bucket_size=1)
    assert torch.equal(rule(x), aggregate("median", x, f=2))


def test_bucketing_is_not_a_one_call_rule():
    """Built afresh by aggregate() at every call, bucketing drew step 0's permutation every
    time: Karimireddy et al. reshuffle the workers each round."""
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="keeps state across steps.*end_step"):
        aggregate("bucketing", x, f=1, base="median", bucket_size=2)


def _bucketing_reference(x: torch.Tensor, f: int, s: int, seed: int, step: int) -> torch.Tensor:
    """The definition: shuffle the rows by the permutation seeded by (seed, step), average
    consecutive groups of s (the last may be smaller), take the median of the means."""
    g = torch.Generator().manual_seed(key_seed(seed, step, ""))
    perm = torch.randperm(x.shape[0], generator=g)
    means = torch.stack([part.mean(0) for part in x[perm].split(s)])
    return aggregate("median", means, f=f)


def test_bucketing_uses_the_seeded_permutation_of_each_step():
    # Heterogeneous rows (row i near i): which rows share a bucket changes the median of the
    # bucket means, so a permutation that ignored the seed or the step would be seen.
    x = torch.arange(7, dtype=torch.float64)[:, None] + 0.1 * torch.randn(
        7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    b = get_aggregator("bucketing", n=7, f=1, base="median", bucket_size=2)
    outs = []
    for step in range(3):
        out = b(x)
        assert torch.equal(out, _bucketing_reference(x, f=1, s=2, seed=0, step=step)), step
        outs.append(out)
        b.end_step()
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    other_seed = get_aggregator("bucketing", n=7, f=1, base="median", bucket_size=2, seed=1)
    out = other_seed(x)
    assert torch.equal(out, _bucketing_reference(x, f=1, s=2, seed=1, step=0))
    assert not torch.equal(out, outs[0])


def test_bucketing_sums_each_bucket_in_permutation_order():
    # float32: the sum of 1e8, 1, -1e8 depends on the order. It is the order of the seeded
    # permutation, on every device (a scatter-add on CUDA would add in any order).
    b = get_aggregator("bucketing", n=3, f=0, base="mean", bucket_size=3)
    g = torch.tensor([[1e8], [1.0], [-1e8]])
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(key_seed(0, 0, "")))
    expected = torch.zeros(1)
    for row in g[perm]:
        expected += row
    assert torch.equal(b(g), expected / 3)
    # Half precision accumulates in float32: 2048 + 1 + 1 is 2050 in any order (in float16,
    # 2048 + 1 rounds back to 2048).
    half = get_aggregator("bucketing", n=3, f=0, base="mean", bucket_size=3)
    out = half(torch.tensor([[2048.0], [1.0], [1.0]], dtype=torch.float16))
    assert torch.equal(out, torch.tensor([2050.0], dtype=torch.float16) / 3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(7, 12))
def test_rules_are_invariant_to_worker_order(seed, n):
    g = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    for name in ORDER_FREE:
        assert torch.allclose(aggregate(name, g, f=2), aggregate(name, g[perm], f=2), atol=1e-9), (
            name
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "name",
    ["median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping"],
)
def test_one_non_finite_worker_neither_wins_nor_poisons_the_output(name, bad):
    # Krum used to pick a NaN row (argmin ranks NaN first); the geometric median started from a
    # NaN mean; centered clipping computed inf * 0. One such worker is within f = 1.
    honest = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 0.1 + 1.0
    grads = torch.cat([honest, torch.full((1, 4), bad)])
    out = get_aggregator(name, n=7, f=1)(grads)
    assert torch.isfinite(out).all(), (name, out)
    if name == "krum":
        assert any(torch.equal(out, row) for row in honest)
    if name == "geometric_median":
        torch.testing.assert_close(out, get_aggregator(name, n=6, f=1)(honest))
    if name == "centered_clipping":  # first step: anchor 0, the bad row adds nothing
        clipped = get_aggregator(name, n=7, f=1)(torch.cat([honest, torch.zeros(1, 4)]))
        torch.testing.assert_close(out, clipped)


def test_stateful_rules_are_refused_by_aggregate():
    with pytest.raises(ValueError, match="get_aggregator"):
        aggregate("safeguard", torch.randn(5, 3), f=1)
    with pytest.raises(ValueError, match="get_aggregator"):
        aggregate("centered_clipping", torch.randn(5, 3), f=1)


@pytest.mark.parametrize(
    "name, n, f, match",
    [
        ("krum", 10, 4, r"n > 2f \+ 2"),
        ("multi_krum", 6, 2, r"n > 2f \+ 2"),
        ("median", 4, 2, "n > 2f"),
        ("trimmed_mean", 6, 3, "n > 2f"),
        ("geometric_median", 2, 1, "n > 2f"),
        ("safeguard", 8, 4, "n > 2f"),
    ],
)
def test_f_too_large_for_the_rule(name, n, f, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator(name, n=n, f=f)


def test_bad_names_options_and_shapes():
    with pytest.raises(ValueError, match="unknown aggregator 'nope'.*krum"):
        get_aggregator("nope", n=3)
    with pytest.raises(ValueError, match="does not take option"):
        get_aggregator("median", n=3, tau=1.0)
    with pytest.raises(ValueError, match="n=4 workers but got 3 rows"):
        get_aggregator("mean", n=4)(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"shape \[n, d\]"):
        aggregate("mean", torch.zeros(3))
    with pytest.raises(ValueError, match="leaves 3 inputs"):
        get_aggregator("bucketing", n=6, f=2, base="krum", bucket_size=2)
    with pytest.raises(ValueError, match="tau"):
        get_aggregator("centered_clipping", n=3, tau=-1.0)
    with pytest.raises(ValueError, match="trim=0 is below f=2"):
        get_aggregator("trimmed_mean", n=5, f=2, trim=0)
    with pytest.raises(TypeError, match="floating point"):
        aggregate("mean", torch.zeros(3, 2, dtype=torch.long))


def test_centered_clipping_state_loaded_on_cpu_follows_the_gradients_device():
    # A checkpoint loaded with map_location="cpu" (or saved on another rank's GPU) must not mix
    # devices at the next step. "meta" stands in for a GPU: every machine has it, and torch
    # refuses to mix it with CPU tensors as it refuses CUDA ones.
    g = torch.randn(3, 4)
    a = get_aggregator("centered_clipping", n=3, f=1, momentum=0.5)
    a(g, key="w")
    b = get_aggregator("centered_clipping", n=3, f=1, momentum=0.5)
    b.load_state_dict(a.state_dict())
    assert b(g.to("meta"), key="w").device.type == "meta"


def test_geometric_median_keeps_a_far_rows_pull_and_leaves_the_honest_rows_apart():
    """Scaled by the largest magnitude, one Byzantine row 1e9 out put the honest rows within eps
    of the start (z stayed the coordinate-wise median); one 1e300 out squared to Inf, and its
    pull (of unit length, whatever its distance) was lost."""
    from sparsetrain.robust.rules import coordinate_median

    honest = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = {}
    for big in (1e6, 1e9, 1e300):
        rows = torch.cat([honest, torch.full((1, 8), big, dtype=torch.float64)])
        outs[big] = aggregate("geometric_median", rows, f=2)
        assert not torch.allclose(outs[big], coordinate_median(rows))
    torch.testing.assert_close(outs[1e9], outs[1e6], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1e300], outs[1e6], rtol=0, atol=1e-6)


def test_centered_clipping_refuses_a_state_whose_anchor_and_momenta_differ_in_width():
    """It loaded, and the next call failed inside torch on the sizes."""
    a = get_aggregator("centered_clipping", n=3, f=1, momentum=0.5)
    bad = {"anchor": {"a": torch.zeros(4)}, "momenta": {"a": torch.zeros(3, 3)}}
    with pytest.raises(ValueError, match="anchor of key 'a' has 4 entries but its momenta have 3"):
        a.load_state_dict(bad)
    assert a.state_dict()["anchor"] == {}


@pytest.mark.parametrize("name", ["krum", "multi_krum"])
def test_krum_keeps_its_choice_when_squared_distances_pass_float32(name):
    # Rows 1e19 apart have squared distances past float32's range: every score was Inf, and
    # argmin chose row 0 whatever it held (NaN here, or 3e38).
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 1e19
    for bad in (float("nan"), 3e38):
        rows = g.clone()
        rows[0] = bad
        options = {"m": 2} if name == "multi_krum" else {}
        out = get_aggregator(name, n=7, f=1, **options)(rows)
        assert torch.isfinite(out).all() and out.abs().max() < 1e21


def test_one_huge_row_leaves_the_others_distances_exact():
    """Scaled down to fit one row of 1e30, the honest rows' squared distances flushed to 0:
    every honest Krum score tied, and Krum chose row 0, a Byzantine row 20 from the others."""
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(5, 5, generator=gen)
    rows = torch.cat([honest[:1] + 20.0, honest[1:], torch.full((2, 5), 1e30)])
    exact = ((rows.double()[:, None] - rows.double()[None]) ** 2).sum(-1)
    nearest = exact.sort(dim=1).values[:, 1 : 7 - 2 - 1].sum(dim=1)
    choice = int(nearest.argmin())
    assert choice != 0  # the exact Krum does not take the Byzantine row
    assert torch.equal(get_aggregator("krum", n=7, f=2)(rows), rows[choice])
    chosen = nearest.argsort()[: 7 - 2]
    torch.testing.assert_close(get_aggregator("multi_krum", n=7, f=2)(rows), rows[chosen].mean(0))


def test_rows_near_the_dtypes_limit_do_not_overflow_the_robust_rules():
    """In float64 a row of 1e308 raised OverflowError in Krum, Multi-Krum and SafeguardSGD;
    two gave the geometric median NaN (its start, the mean, overflowed); two rows of 3e38
    gave SafeguardSGD and the median of an even count Inf where the mean of what they keep
    is finite."""
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    rows = torch.cat([honest, torch.full((2, 5), 1e308, dtype=torch.float64)])
    for name in ("krum", "multi_krum", "geometric_median", "median", "trimmed_mean"):
        out = get_aggregator(name, n=7, f=2)(rows)
        assert torch.isfinite(out).all() and out.abs().max() < 10, name
    rule = get_aggregator("safeguard", n=7, f=2, window0=2, window1=4, threshold0=1.0,
                          threshold1=2.0)  # fmt: skip
    assert torch.isfinite(rule(rows)).all()
    rule.end_step()
    big = torch.full((2, 5), 3e38)  # float32: their sum is past the range, their mean is not
    assert torch.isfinite(get_aggregator("median", n=2)(big)).all()
    rule = get_aggregator("safeguard", n=2, window0=2, window1=4, threshold0=1.0,
                          threshold1=2.0, warmup_steps=0)  # fmt: skip
    torch.testing.assert_close(rule(big), big[0])


@pytest.mark.parametrize(
    "name, options",
    [
        ("mean", {}),
        ("trimmed_mean", {}),
        ("multi_krum", {}),
        ("bucketing", {"base": "mean", "bucket_size": 3}),
        ("bucketing", {"base": "median", "bucket_size": 2}),
    ],
)
def test_rules_that_average_keep_a_mean_whose_sum_passes_float32(name, options):
    """float32 rows near 3.4e38 summed to Inf where their mean fits: the mean, the trimmed
    mean, Multi-Krum and bucketing returned Inf. Coordinates that fit keep their plain mean."""
    rows = torch.tensor([[3e38, 1.0], [3.2e38, 2.0], [3.1e38, 3.0], [2.9e38, 4.0], [3e38, 5.0]])
    out = get_aggregator(name, n=5, f=1 if name != "bucketing" else 0, **options)(rows)
    assert out.dtype == torch.float32 and torch.isfinite(out).all(), out
    assert 2.8e38 < float(out[0]) < 3.3e38 and 1.0 <= float(out[1]) <= 5.0
    if name == "mean":  # the plain mean's bits where it is finite, the exact mean where not
        assert float(out[1]) == float(rows[:, 1].mean())
        assert float(out[0]) == pytest.approx(float(rows[:, 0].double().mean()), rel=1e-6)
    nan = rows.clone()
    nan[0, 1] = float("nan")
    assert torch.isnan(get_aggregator("mean", n=5)(nan)[1])  # a NaN still reads NaN


def test_half_gradients_are_clipped_and_bucketed_in_float32():
    # A float16 difference of norm past 65504 had norm Inf and scale 0: the workers were
    # left out and the output was the anchor, 0; bucket sums of 40000s overflowed to Inf.
    rows = torch.full((5, 4), 35400.0)
    cc = {dt: get_aggregator("centered_clipping", n=5, f=1, tau=1.0)(rows.to(dt)) for dt in
          (torch.float16, torch.float32)}  # fmt: skip
    assert cc[torch.float16].dtype == torch.float16
    assert torch.allclose(cc[torch.float16].float(), cc[torch.float32], rtol=1e-3)
    assert float(cc[torch.float32].norm()) == pytest.approx(1.0)
    b = get_aggregator("bucketing", n=4, f=0, base="mean", bucket_size=2)
    assert (b(torch.full((4, 3), 40000.0, dtype=torch.float16)) == 40000.0).all()


def test_bucketing_refuses_base_rules_with_state_kept_per_input():
    # The buckets are reshuffled every step: Safeguard removed bucket slots (random workers),
    # centered clipping's momenta followed slots, not workers.
    with pytest.raises(ValueError, match="cannot wrap 'safeguard' with state kept per input"):
        get_aggregator("bucketing", n=9, f=1, base="safeguard")
    with pytest.raises(ValueError, match="use centered_clipping with momentum=0"):
        get_aggregator(
            "bucketing", n=9, f=1, base="centered_clipping", base_options={"momentum": 0.9}
        )
    get_aggregator("bucketing", n=9, f=1, base="centered_clipping")
    # A momentum that is no number is named as such (it had been told to use momentum=0)
    with pytest.raises(TypeError, match="momentum must be a number"):
        get_aggregator("bucketing", n=9, f=1, base="centered_clipping",
                       base_options={"momentum": "0.9"})  # fmt: skip
    with pytest.raises(ValueError, match="does not take option.*'bad'"):
        get_aggregator("bucketing", n=9, f=1, base="median", base_options={"bad": 1})


def test_bucketing_takes_a_state_saved_with_base_options_empty_or_none_alike():
    # {} and None mean the same options; a state saved under one had been refused by the other
    empty = get_aggregator("bucketing", n=9, f=1, base="median", base_options={})
    none = get_aggregator("bucketing", n=9, f=1, base="median")
    none.load_state_dict(empty.state_dict())
    empty.load_state_dict(none.state_dict())
    clipped = get_aggregator("bucketing", n=9, f=1, base="centered_clipping",
                             base_options={"tau": 2.0})  # fmt: skip
    other = get_aggregator("bucketing", n=9, f=1, base="centered_clipping")
    with pytest.raises(ValueError, match=r"base_options: saved \{'tau': 2.0\}, now \{\}"):
        other.load_state_dict(clipped.state_dict())


def test_options_must_be_finite():
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got inf"):
        get_aggregator("geometric_median", n=3, f=1, eps=float("inf"))
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        get_aggregator("safeguard", n=3, f=1, noise_std=float("inf"))


def test_robust_matrix_lowers_f_to_what_bucketing_accepts():
    from sparsetrain.commands.robust_matrix import largest_f

    # 10 workers in buckets of 2 leave 5 inputs for the median: f = 2 at most (n > 2f).
    assert largest_f("bucketing", 10, 4) == 2
    get_aggregator("bucketing", n=10, f=2)
    assert largest_f("bucketing", 10, 4, {"bucket_size": 1}) == 4
    assert largest_f("krum", 10, 4) == 3


@pytest.mark.parametrize("name", ["safeguard", "centered_clipping"])
def test_a_stateful_rule_refuses_one_key_for_tensors_of_two_widths(name):
    # Called once a layer with the default key, SafeguardSGD threw its sums away at every
    # change of width (it never removed anyone) and centered clipping failed inside torch.
    rule = get_aggregator(name, n=5, f=1)
    rule(torch.randn(5, 30))
    before = rule.state_dict()
    with pytest.raises(ValueError, match=rf"aggregator '{name}' holds state of width 30 for key "
                       r"'' .* got gradients of width 20: .* give each tensor its own key"):  # fmt: skip
        rule(torch.randn(5, 20))
    assert same(rule.state_dict(), before)  # the refused call changed nothing
    assert rule(torch.randn(5, 20), key="head").shape == (20,)
    assert rule(torch.randn(5, 30)).shape == (30,)
    # A key that is no string: a saved state's keys load as strings, so key 0 had started
    # afresh after a reload while its state sat under '0'
    with pytest.raises(TypeError, match="key must be a str .* got 0 of type int"):
        rule(torch.randn(5, 30), key=0)
    with pytest.raises(TypeError, match="key must be a str"):
        get_attack("delayed", n=5, f=1)(torch.randn(30), key=1)


def test_safeguard_with_a_key_a_layer_removes_a_drifting_worker_across_layers():
    torch.manual_seed(0)
    rule = get_aggregator("safeguard", n=5, f=1, window0=5, window1=20)
    for _ in range(60):
        for i, d in enumerate((30, 20)):
            g = torch.randn(5, d) * 0.1 + 1
            g[4] += 0.3  # worker 4 drifts
            rule(g, key=f"layer{i}")
        rule.end_step()
    assert 4 in rule.stats()["removed"]


def test_bucketing_names_base_options_that_are_not_a_dict():
    with pytest.raises(TypeError, match=r"base_options must be a dict of the base rule's options"):
        get_aggregator("bucketing", n=6, f=1, base="median", base_options=[1])


def test_one_nan_leaves_a_workers_clipping_momentum_as_it_was():
    """One NaN from a worker (an fp16 overflow) made its momentum NaN for good: it was left out
    of every later step, without a word."""
    rule = get_aggregator("centered_clipping", n=3, f=1, tau=10.0, momentum=0.5)
    ref = get_aggregator("centered_clipping", n=3, f=1, tau=10.0, momentum=0.5)
    g = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1]])
    rule(g), ref(g)
    bad = g.clone()
    bad[2] = float("nan")
    assert torch.isfinite(rule(bad)).all()
    momenta = rule.state_dict()["momenta"][""]
    torch.testing.assert_close(momenta[2], ref.state_dict()["momenta"][""][2])  # kept
    assert torch.isfinite(momenta).all()
    rule(g)  # worker 2 counts again: its momentum moves with its gradient
    assert not torch.equal(rule.state_dict()["momenta"][""][2], momenta[2])


def test_the_geometric_median_is_not_pinned_at_a_row():
    """A Weiszfeld step whose weight at a row is 1/eps stays on a row it starts on: started at
    the coordinate-wise median (a row here), it returned [8, -2] (objective 6.0 where the
    geometric median has 5.7956); started at the mean, two colluding Byzantine rows placed the
    mean on one of theirs and it returned that row."""
    rule = get_aggregator("geometric_median", n=3, f=1)
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]) * 3 + torch.tensor([5.0, -2.0])
    objective = float(torch.linalg.vector_norm(rows - rule(rows), dim=1).sum())
    assert objective == pytest.approx(5.7956, abs=1e-3)
    # A row that is the geometric median is kept (three of five workers agree).
    one_d = torch.tensor([[0.0], [0.0], [0.0], [4.0], [1.0]])
    assert float(get_aggregator("geometric_median", n=5, f=2)(one_d)) == pytest.approx(0, abs=1e-6)
    # Two Byzantine rows whose mean is one of them.
    gen = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.1 * torch.randn(3, 1000, generator=gen)
    b1 = torch.full((1000,), -100.0)
    b2 = 4 * b1 - honest.sum(0)
    out = get_aggregator("geometric_median", n=5, f=2)(torch.cat([honest, b1[None], b2[None]]))
    assert float((out - honest.mean(0)).abs().max()) < 1.0  # near the honest rows, not at b1
