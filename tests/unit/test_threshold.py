"""The threshold compressor: it tracks k over training-like gradients while estimating rarely."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.compressors import get_compressor
from sparsetrain.compressors.threshold import Threshold

pytestmark = pytest.mark.usefixtures("one_thread")


def training_like(n: int, steps: int, seed: int):
    """Yield a slowly drifting heavy-tailed gradient whose scale decays, as in training.

    Each step keeps 95% of the previous direction and mixes in fresh heavy-tailed noise;
    per-coordinate scales differ (like layers) and the overall norm decays by 2/3 over the run.
    """
    gen = torch.Generator().manual_seed(seed)

    def noise():
        # A normal with log-normal scale: tails far heavier than Gaussian, cheap to draw.
        z = torch.randn(2, n, generator=gen)
        return z[0] * z[1].mul_(0.75).exp_()

    layer_scale = torch.logspace(-2, 0, n).flip(0)[torch.randperm(n, generator=gen)]
    g = noise()
    for step in range(steps):
        g = 0.95 * g + (1 - 0.95**2) ** 0.5 * noise()
        yield g * layer_scale * (1 - step / (1.5 * steps))


def counting_estimates(c: Threshold):
    calls = []
    original = c._estimate

    def wrapped(*args, **kwargs):
        calls.append(args[-1])
        return original(*args, **kwargs)

    c._estimate = wrapped
    return calls


def counting_selections(c: Threshold):
    counts = []
    original = c._select

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        counts.append(out.numel())
        return out

    c._select = wrapped
    return counts


def estimating_once():
    """A compressor at density 0.01 that estimates on its first call and then only when the count
    leaves the band, the list of its estimates' steps, and a 50,000-entry gradient (k = 500)."""
    c = get_compressor("threshold", density=0.01, reestimate_every=1000)
    return c, counting_estimates(c), torch.randn(50_000, generator=torch.Generator().manual_seed(0))


# k >= 400 in every case: below that the count's own Poisson-like noise (sqrt(k)) nears 5%.
# reestimate_every=1000 estimates once: the count-based correction alone follows the drift.
@pytest.mark.parametrize(
    "n, density, every",
    [(200_000, 0.002, 10), (100_000, 0.01, 10), (40_000, 0.1, 10), (40_000, 0.01, 1000)],
)
def test_count_stays_within_20_percent_of_k_over_200_training_like_steps(n, density, every):
    c = get_compressor("threshold", density=density, reestimate_every=every)
    calls = counting_estimates(c)
    k = round(density * n)
    counts = []
    for g in training_like(n, 200, seed=int(density * 1e4) + n):
        (idx, _), _ = c.compress(g, key="layer")
        counts.append(idx.numel())
    counts = torch.tensor(counts, dtype=torch.float64)
    assert ((counts - k).abs() <= 0.2 * k).all(), (counts.min() / k, counts.max() / k)
    # The threshold is estimated on schedule, not on every step.
    assert len(calls) <= -(-200 // every) + 5


def test_an_abrupt_change_triggers_an_immediate_estimate():
    c, calls, g = estimating_once()
    for _ in range(3):
        c.compress(g, key="w")
    assert calls == [0]
    (idx, _), _ = c.compress(g * 0.01, key="w")  # the old threshold would keep nothing
    assert calls == [0, 3]
    assert 400 <= idx.numel() <= 600


def test_an_over_full_selection_is_cut_to_the_exact_top_k_without_an_estimate():
    c, calls, g = estimating_once()
    c.compress(g, key="w")
    big = g * 1.3  # the reused threshold keeps ~10 k: over band * k, under 1/16 of the tensor
    (idx, vals), _ = c.compress(big, key="w")
    assert calls == [0]
    exact = torch.sort(torch.topk(big.abs(), 500).indices).values
    assert torch.equal(idx.long(), exact)
    assert torch.equal(vals, big[exact])
    # The next step starts just below this step's k-th magnitude, so the same gradient keeps
    # exactly k with no cut.
    kth = big.abs()[exact].min()
    assert c.state_dict()["w"]["threshold"] == float(torch.nextafter(kth, torch.zeros(())))
    selected = counting_selections(c)
    (again, _), _ = c.compress(big, key="w")
    assert selected == [500] and torch.equal(again.long(), exact) and calls == [0]


def test_a_selection_of_much_of_the_tensor_is_estimated_again_not_cut():
    # A cut costs a topk over what was selected: past 1/16 of the tensor, a fresh estimate and
    # selection is cheaper, as before the cut existed.
    c, calls, g = estimating_once()
    c.compress(g, key="w")
    (idx, _), _ = c.compress(g * 100, key="w")  # the reused threshold keeps most entries
    assert calls == [0, 1]
    assert 400 <= idx.numel() <= 600


def test_a_zero_threshold_does_not_stick():
    # A first step with fewer than k nonzeros estimates 0; the next real gradient must not be
    # cut from an all-entries selection step after step, but estimated again.
    c, calls, g = estimating_once()
    c.compress(torch.zeros(50_000), key="w")
    assert c.state_dict()["w"]["threshold"] == 0.0
    (idx, _), _ = c.compress(g, key="w")
    assert calls == [0, 1] and c.state_dict()["w"]["threshold"] > 0
    assert 400 <= idx.numel() <= 600


def test_schedule_is_per_key():
    c = get_compressor("threshold", density=0.05, reestimate_every=2)
    calls = counting_estimates(c)
    g = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        c.compress(g, key="a")
        c.compress(g, key="b")
    assert calls == [0, 0, 2, 2]  # steps of a and b, counted separately
    assert {k: s["step"] for k, s in c.state_dict().items()} == {"a": 4, "b": 4}


def test_ties_never_send_more_than_band_times_k():
    c = get_compressor("threshold", density=0.01, band=2.0)
    (idx, vals), _ = c.compress(torch.ones(10_000), key="t")
    assert idx.numel() <= 200
    assert torch.equal(vals, torch.ones(idx.numel()))
    # Still in ascending order, as the class promises (sorted_indices): no collective sorts it.
    assert c.sorted_indices and bool((idx[1:] > idx[:-1]).all())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.001, 0.01, 0.2]))
def test_indices_come_out_sorted(seed, density):
    c = get_compressor("threshold", density=density, reestimate_every=3)
    g = torch.Generator().manual_seed(seed)
    for step in range(4):
        (idx, _), _ = c.compress(torch.randn(20_000, generator=g) ** 3, key="w")
        assert bool((idx[1:] > idx[:-1]).all()), step


def test_zero_gradient_sends_nothing():
    c = get_compressor("threshold", density=0.1)
    for _ in range(3):
        (idx, vals), ctx = c.compress(torch.zeros(1000), key="z")
        assert idx.numel() == 0 and vals.numel() == 0
        assert torch.equal(c.decompress((idx, vals), ctx), torch.zeros(1000))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    threshold=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_selection_is_exactly_the_entries_above_the_threshold(n, threshold, seed, dtype):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    g[::7] = 0.0
    expected = torch.nonzero(g.abs() > threshold).squeeze(1)
    # expected=None scans every word of the mask; expected * 500 <= n (here expected=1 from
    # n = 500, and n // 500) takes the two-level scan of grouped words. Same result either way.
    for hint in (None, 1, max(1, n // 500)):
        assert torch.equal(Threshold()._select(g, threshold, expected=hint), expected), hint


def test_selection_spans_several_chunks():
    g = torch.randn(300_001, generator=torch.Generator().manual_seed(2))
    expected = torch.nonzero(g.abs() > 2.0).squeeze(1)
    for hint in (None, 1):  # the plain and the two-level word scan
        assert torch.equal(Threshold()._select(g, 2.0, expected=hint), expected), hint


@pytest.mark.parametrize("piece", [1000, 70_001, 300_000])
def test_marking_in_pieces_selects_what_compress_selects_alone(piece):
    # The sync engine marks |g| > the reused threshold while it writes the compensated
    # gradient (marker), and compress(marked=...) takes those marks: the payloads and the
    # per-key state must be the same as without marks, at every step, estimates included.
    marked, plain = (
        Threshold(density=0.01, reestimate_every=4),
        Threshold(density=0.01, reestimate_every=4),
    )
    used = 0
    for step, g in enumerate(training_like(300_001, 12, seed=5)):
        threshold = marked.reused_threshold("k", g.numel())
        assert (threshold is None) == (step % 4 == 0)  # None where compress estimates
        if threshold is not None:
            mark = marked.marker(g.numel(), threshold)
            for a in range(0, g.numel(), piece):
                mark(a, g[a : a + piece])
            used += 1
        (i1, v1), _ = marked.compress(g, key="k", marked=threshold)
        (i2, v2), _ = plain.compress(g, key="k")
        assert torch.equal(i1, i2) and torch.equal(v1, v2), step
        assert marked.state_dict() == plain.state_dict()
    assert used == 9


def test_marks_for_another_threshold_are_not_used():
    c, plain = Threshold(density=0.01), Threshold(density=0.01)
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    c.compress(g, key="k")
    plain.compress(g, key="k")
    threshold = c.reused_threshold("k", g.numel())
    c.marker(g.numel(), threshold * 2)(0, g)  # stale marks, for the wrong threshold
    (i1, _), _ = c.compress(g, key="k", marked=threshold * 2)
    (i2, _), _ = plain.compress(g, key="k")
    assert torch.equal(i1, i2)


def test_no_threshold_is_reused_when_everything_is_sent():
    c = Threshold(density=1.0)
    c.compress(torch.randn(10), key="k")
    assert c.reused_threshold("k", 10) is None and c.reused_threshold("other", 10) is None


def test_estimate_from_a_sample_is_close_to_the_exact_kth_largest():
    g = torch.randn(2_000_000, generator=torch.Generator().manual_seed(3))
    c = Threshold(density=0.01)  # the sample has 1024 / 0.01 = 102400 entries
    threshold, slope = c._estimate(g, 20_000, "s", 0)
    kept = int((g.abs() > threshold).sum())
    assert abs(kept - 20_000) <= 0.1 * 20_000
    assert 3 < slope < 12  # Gaussian tail near the 1% quantile: count ~ threshold^-6.7


def test_state_round_trip_is_bit_exact_for_resume():
    grads = list(training_like(30_000, 25, seed=4))
    a = get_compressor("threshold", density=0.02, reestimate_every=4)
    for g in grads[:13]:
        a.compress(g, key="x")
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = get_compressor("threshold", density=0.02, reestimate_every=4)
    b.load_state_dict(torch.load(buf))
    assert b.state_dict() == a.state_dict()
    for g in grads[13:]:
        (ia, va), _ = a.compress(g, key="x")
        (ib, vb), _ = b.compress(g, key="x")
        assert torch.equal(ia, ib) and torch.equal(va, vb)
    assert b.state_dict() == a.state_dict()


def test_malformed_state_is_refused():
    with pytest.raises(ValueError, match="must have threshold, slope, step and last_estimate"):
        Threshold().load_state_dict({"x": {"threshold": 1.0}})


def test_pickling_keeps_state_and_drops_the_workspace():
    c = get_compressor("threshold", density=0.01)
    g = torch.randn(20_000, generator=torch.Generator().manual_seed(5))
    c.compress(g, key="p")
    restored = pickle.loads(pickle.dumps(c))
    assert restored._mask is None and restored.state_dict() == c.state_dict()
    (ia, _), _ = c.compress(g, key="p")
    (ib, _), _ = restored.compress(g, key="p")
    assert torch.equal(ia, ib)


@pytest.mark.parametrize("other", [torch.float64, torch.float16])
def test_a_model_of_two_dtypes_selects_in_each(one_thread, other):
    """The hits buffer's positions are shared by every dtype and its values kept per dtype:
    after a larger float32 bucket, a float64 one got 18 positions and 9 values, and the native
    kernel refused them at the first reused threshold (every step failed from then on)."""
    import torch.distributed as dist
    from torch import nn

    import sparsetrain

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4).to(other))
        sync = sparsetrain.GradientSync(model, "threshold", density=0.1)
        assert len(sync.buckets) == 2
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            assert sync.synchronize()
            for bucket in sync.buckets:  # each sends some of its entries, not all
                sent = sum(int((p.grad != 0).sum()) for _, p in bucket)
                assert 0 < sent < sum(p.numel() for _, p in bucket)
    finally:
        dist.destroy_process_group()


def test_a_float16_tensor_of_tied_large_values_is_compressed_again():
    """Tied top values of 40000 (saturated gradients under loss scaling) doubled the kept
    threshold past float16's 65504: every later call for that key raised in torch."""
    c = get_compressor("threshold", density=0.01)
    t = torch.full((1000,), 40000.0, dtype=torch.float16)
    for _ in range(3):
        (idx, values), _ = c.compress(t, key="a")
        assert idx.numel() == 10 and bool((values == 40000.0).all())


def test_fewer_non_zeros_than_k_are_not_estimated_again_every_step():
    # Under a threshold of 0 the selection is every non-zero entry, and a new estimate finds 0
    # again: an embedding-like gradient (0.5% non-zero at density 1%) re-estimated every step.
    c, calls, g = estimating_once()
    mostly_zero = torch.zeros_like(g)
    mostly_zero[::200] = g[::200]  # 250 non-zeros, k = 500
    for _ in range(5):
        (idx, _), _ = c.compress(mostly_zero, key="w")
        assert torch.equal(idx.long(), torch.nonzero(mostly_zero).flatten())
    assert calls == [0]
    (idx, _), _ = c.compress(g, key="w")  # dense again: estimated at once
    assert calls == [0, 5] and 400 <= idx.numel() <= 600
