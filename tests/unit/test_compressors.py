"""Behaviour every compressor promises: shapes, the summable/packed wire contracts, unbiasedness,
what error feedback gets back, lossless settings, clear errors and exact state round trips."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.compressors import (
    available_compressors,
    get_compressor,
    pack_bits,
    unpack_bits,
)
from sparsetrain.compressors.randomk import sample_without_replacement

ALL = available_compressors()


pytestmark = pytest.mark.usefixtures("one_thread")


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUT = [torch.Size([24, 16]), torch.Size([16]), torch.Size([12, 3, 4]), torch.Size([5])]
NUMEL = sum(s.numel() for s in LAYOUT)

# Options that make every compressor actually lossy on small test tensors.
SMALL = {
    "topk": {"density": 0.1},
    "threshold": {"density": 0.1},
    "randomk": {"density": 0.1},
    "qsgd": {"levels": 3, "bucket_size": 50},
    "terngrad": {"bucket_size": 50},
    "signsgd": {"bucket_size": 50},
    "powersgd": {"rank": 2},
}


def assert_close(actual, expected, rtol=1e-7, atol=1e-7):
    """Like torch.testing.assert_close, without importing torch.distributed (seconds)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"max abs difference {float((actual - expected).abs().max())}"
    )


def make(name: str, **options):
    return get_compressor(name, **{**SMALL.get(name, {}), **options})


def run(c, t, key="k", layout=None, reduce=None):
    """compress -> (reduce) -> next_round ... -> (payload, ctx) of the last round."""
    payload, ctx = c.compress(t, key=key, layout=layout)
    for _ in range(c.rounds - 1):
        payload, ctx = c.next_round(reduce(payload) if reduce else payload, ctx)
    return payload, ctx


def roundtrip(c, t, key="k", layout=None):
    payload, ctx = run(c, t, key, layout)
    return c.decompress(payload, ctx)


def test_the_compressors_of_the_issue_are_registered():
    expected = {"none", "fp16", "bf16", "topk", "threshold", "randomk", "qsgd", "terngrad"}
    assert expected | {"signsgd", "powersgd"} <= set(ALL)


# ---- shape, dtype, device ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_roundtrip_keeps_shape_dtype_device(name, dtype):
    torch.manual_seed(0)
    t = torch.randn(NUMEL, dtype=torch.float64).to(dtype)
    out = roundtrip(make(name), t, layout=LAYOUT)
    assert out.shape == t.shape and out.dtype == dtype and out.device == t.device
    assert torch.isfinite(out).all()
    m = torch.randn(6, 5, 4).to(dtype)
    out = roundtrip(make(name), m)
    assert out.shape == m.shape and out.dtype == dtype


# ---- how payloads of several ranks combine ---------------------------------------------------
def simulate_ranks(name, tensors, **options):
    """Run one step on len(tensors) 'ranks' in one process; return (summed decode, own decodes)."""
    comps = [make(name, **options) for _ in tensors]
    states = [c.compress(t, key="b", layout=LAYOUT) for c, t in zip(comps, tensors)]
    for _ in range(comps[0].rounds - 1):
        summed = tuple(sum(parts) for parts in zip(*(p for p, _ in states)))
        states = [c.next_round(summed, ctx) for c, (_, ctx) in zip(comps, states)]
    own = [c.decompress(p, ctx) for c, (p, ctx) in zip(comps, states)]
    if comps[0].summable:
        summed = tuple(sum(parts) for parts in zip(*(p for p, _ in states)))
        totals = [c.decompress(summed, ctx) for c, (_, ctx) in zip(comps, states)]
    else:
        payloads = [p for p, _ in states]
        totals = [c.aggregate(payloads, ctx) for c, (_, ctx) in zip(comps, states)]
    return totals, own


# Rank r's float32 values at indices 0, 1, 2. Summed in rank order (1e8 + 1) - 1e8 == 0 and
# (1e8 - 1e8) + 1 == 1 and (1 + 1e8) - 1e8 == 0; other orders give other bits. Every rank must
# add in one order, the same everywhere (rank order), or the replicas drift apart.
RANK_ORDER_VALUES = [[1e8, 1e8, 1.0], [1.0, -1e8, 1e8], [-1e8, 1.0, -1e8]]
RANK_ORDER_SUM = [0.0, 1.0, 0.0, 0.0]


def test_sparse_aggregate_adds_the_ranks_in_rank_order():
    idx = torch.tensor([2, 0, 1])  # unique on each rank, not sorted
    payloads = [(idx, torch.tensor(v)[idx]) for v in RANK_ORDER_VALUES]
    for name in ("topk", "threshold"):
        _, ctx = make(name).compress(torch.zeros(4), key="b")
        assert make(name).aggregate(payloads, ctx).tolist() == RANK_ORDER_SUM, name


@pytest.mark.parametrize("name", ALL)
def test_combined_payloads_decode_to_the_sum_of_each_ranks_decode(name):
    torch.manual_seed(1)
    tensors = [torch.randn(NUMEL, dtype=torch.float64) for _ in range(3)]
    totals, own = simulate_ranks(name, tensors)
    tol = 1e-2 if name in ("fp16", "bf16") else 1e-9
    for total in totals:  # every rank gets the same answer ...
        assert_close(total, totals[0], rtol=0, atol=0)
        # ... which is the sum of what each rank sent
        assert_close(total, sum(own), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", [n for n in ALL if make(n).wire == "packed"])
def test_packed_payload_decodes_with_any_ranks_ctx(name):
    torch.manual_seed(2)
    a, b = torch.randn(NUMEL), 10 * torch.randn(NUMEL)
    ca, cb = make(name), make(name)
    (pa, ctx_a), (pb, ctx_b) = ca.compress(a, key="x"), cb.compress(b, key="x")
    assert torch.equal(ca.decompress(pb, ctx_a), cb.decompress(pb, ctx_b))
    assert torch.equal(cb.decompress(pa, ctx_b), ca.decompress(pa, ctx_a))


def test_randomk_sends_values_as_they_are_and_scales_after_the_sum():
    # A float16 value of 100 at density 1/1000 is 1e5 once scaled: over float16's range, so the
    # scaling must not happen on the wire. scale=False is random-k with memory (unscaled).
    x = torch.full((1000,), 100.0, dtype=torch.float16)
    c = make("randomk", density=0.004)
    (vals,), ctx = c.compress(x, key="w")
    assert torch.equal(vals, torch.full((4,), 100.0, dtype=torch.float16))
    y = torch.randn(1000, dtype=torch.float64)
    (vals,), ctx = c.compress(y, key="v")
    out = c.decompress((vals,), ctx)
    assert out.dtype == torch.float64 and torch.equal(out[ctx[1]], vals * 250.0)
    plain = make("randomk", density=0.004, scale=False)
    (vals,), ctx = plain.compress(y, key="v")
    assert torch.equal(plain.decompress((vals,), ctx)[ctx[1]], vals)
    with pytest.raises(TypeError, match="scale must be True or False"):
        make("randomk", scale=1)


@pytest.mark.parametrize("name", ["topk", "threshold", "randomk"])
def test_sparse_compressors_accept_an_empty_tensor(name):
    c = make(name)
    payload, ctx = c.compress(torch.zeros(0), key="e")  # topk asked torch.topk for 1 of 0
    assert all(p.numel() == 0 for p in payload)
    assert c.decompress(payload, ctx).shape == (0,)


def test_threshold_with_a_sample_smaller_than_one_run_estimates_from_every_value():
    c = make("threshold", density=0.1, sample_kept=1)  # a sample of 10 values: under one run
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    (idx, _), _ = c.compress(g, key="a")
    # An estimate from every value is exact: the k = 100 largest magnitudes, no more, no fewer
    # (a sampled estimate, e.g. sample_kept=2, keeps 74 of this input).
    top = torch.topk(g.abs(), 100)
    assert idx.numel() == 100
    assert torch.equal(idx.long(), torch.sort(top.indices).values)
    # The threshold sits just below the 100th magnitude, and a count of exactly k leaves it there.
    kth = top.values[-1]
    assert c.state_dict()["a"]["threshold"] == float(torch.nextafter(kth, torch.zeros_like(kth)))


def test_randomk_ranks_draw_the_same_indices_and_new_ones_each_step():
    a, b = make("randomk", seed=3), make("randomk", seed=3)
    x = torch.randn(1000)
    (_, (_, ia1)), (_, (_, ib1)) = a.compress(x, key="w"), b.compress(-x, key="w")
    (_, (_, ia2)) = a.compress(x, key="w")
    assert torch.equal(ia1, ib1)
    assert not torch.equal(ia1, ia2)
    (_, (_, other)) = make("randomk", seed=4).compress(x, key="w")
    assert not torch.equal(ia1, other)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_sampling_without_replacement_gives_k_distinct_sorted_indices(n, frac, seed):
    k = max(1, min(n, round(frac * n)))
    gen = torch.Generator().manual_seed(seed)
    idx = sample_without_replacement(n, k, gen, torch.device("cpu"))
    assert idx.numel() == k and idx.dtype == torch.int64
    assert torch.equal(idx, torch.unique(idx))  # distinct and sorted
    assert 0 <= int(idx[0]) and int(idx[-1]) < n


def test_sampling_without_replacement_is_uniform():
    n, k, draws = 50, 5, 4000
    counts = torch.zeros(n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(draws):
        counts[sample_without_replacement(n, k, gen, torch.device("cpu"))] += 1
    expected = draws * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100  # 49 degrees of freedom: P(chi2 > 100) < 1e-5


# ---- selection and unbiasedness --------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 400), density=st.floats(0.001, 1.0), seed=st.integers(0, 2**31))
def test_topk_keeps_exactly_the_k_largest_magnitudes(n, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mags = torch.randperm(n, generator=gen).double() + 1  # distinct magnitudes
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    t = mags * signs
    (idx, vals), _ = get_compressor("topk", density=density).compress(t)
    k = max(1, min(n, round(density * n)))
    assert set(idx.tolist()) == set(torch.argsort(mags, descending=True)[:k].tolist())
    assert torch.equal(vals, t[idx.long()])


def decoded_samples(c, x: torch.Tensor, copies: int = 50, calls: int = 100) -> torch.Tensor:
    """``copies * calls`` independent decodes of ``x`` (one bucket per copy), one a row."""
    n = x.numel()
    return torch.cat(
        [roundtrip(c, x.repeat(copies), key="u").view(copies, n) for _ in range(calls)]
    )


def unbiased(c, x: torch.Tensor, std: torch.Tensor) -> bool:
    """Whether every entry's sample mean over many decodes of ``x`` is within 5 standard errors
    of the true value, the standard error from ``std``, the spread of one decode that the
    compressor's definition gives. (A sample's own spread is too uncertain to judge by: an entry
    rounded up rarely can show almost none, and that check failed for 2 of 300 seeds of QSGD's
    rounding and 5 of 300 of TernGrad's.)"""
    samples = decoded_samples(c, x)
    return bool(((samples.mean(0) - x).abs() <= 5 * std / math.sqrt(len(samples)) + 1e-12).all())


def qsgd_std(x: torch.Tensor, levels: int, bucket: int) -> torch.Tensor:
    """One QSGD decode's standard deviation per entry: a step of ``norm / levels`` taken with
    probability p, the fractional part of ``levels |x| / norm``, so ``step * sqrt(p (1 - p))``.
    In float64, with each bucket scaled by its largest magnitude so no square overflows."""
    v = x.double().view(-1, bucket)
    big = v.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    norm = (v / big).norm(dim=1, keepdim=True) * big
    r = levels * v.abs() / norm
    p = r - r.floor()
    return (norm / levels * (p * (1 - p)).sqrt()).view(-1)


def terngrad_std(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """One TernGrad decode's standard deviation per entry: ``sign(x) S`` with probability
    ``|x| / S`` (S the bucket's largest magnitude), else 0, so ``sqrt(|x| S - x^2)``."""
    v = x.double().view(-1, bucket)
    return (v.abs() * v.abs().amax(1, keepdim=True) - v**2).clamp_min(0).sqrt().view(-1)


def randomk_std(x: torch.Tensor, density: float, scale: bool = True) -> torch.Tensor:
    """One random-k decode's standard deviation per entry: kept with probability k / n, as
    ``x n / k`` when scaled (else ``x``), and 0 otherwise; k / n is ``density`` where
    ``density * n`` is whole, as in these tests."""
    kept = 1 / density if scale else 1.0
    return x.double().abs() * kept * math.sqrt(density * (1 - density))


UNBIASED_X = torch.randn(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
UNBIASED_X *= torch.linspace(0.01, 3, 64, dtype=torch.float64)
UNBIASED = {
    "qsgd": ({"bucket_size": 64}, lambda c: qsgd_std(UNBIASED_X, c.levels, 64)),
    "terngrad": ({"bucket_size": 64}, lambda c: terngrad_std(UNBIASED_X, 64)),
    "randomk": ({"density": 0.25}, lambda c: randomk_std(UNBIASED_X, 0.25)),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(UNBIASED))
def test_randomised_compressors_are_unbiased(name, seed):
    options, std = UNBIASED[name]
    c = make(name, seed=seed, **options)
    assert unbiased(c, UNBIASED_X, std(c))


@pytest.mark.parametrize("name", list(UNBIASED))
def test_randomised_compressors_spread_as_their_definitions_say(name):
    # The variance the unbiasedness check assumes is the compressor's: summed over the entries
    # (5000 decodes each), the sample variance is within 5% of the definition's.
    options, std = UNBIASED[name]
    c = make(name, **options)
    samples = decoded_samples(c, UNBIASED_X)
    assert float(samples.var(0).sum() / (std(c) ** 2).sum()) == pytest.approx(1, abs=0.05)


def test_the_unbiasedness_check_rejects_biased_compressors():
    # The negative controls of the check above. Random-k without scaling is random and biased:
    # its mean is density * x.
    biased_random = make("randomk", density=0.25, scale=False)
    assert (decoded_samples(biased_random, UNBIASED_X, calls=2).std(0) > 0).any()
    assert not unbiased(biased_random, UNBIASED_X, randomk_std(UNBIASED_X, 0.25, scale=False))
    # signsgd is deterministic and biased (a scaled sign).
    signsgd = make("signsgd", bucket_size=None)
    assert not unbiased(signsgd, UNBIASED_X, torch.zeros_like(UNBIASED_X))


# ---- what error feedback gets back ------------------------------------------------------------
@pytest.mark.parametrize("name", ["topk", "threshold"])
def test_sparse_residual_is_exactly_the_unsent_entries(name):
    torch.manual_seed(5)
    t = torch.randn(5000)
    (idx, vals), ctx = make(name).compress(t, key="r")
    residual = t - make(name).decompress((idx, vals), ctx)
    sent = torch.zeros(5000, dtype=torch.bool)
    sent[idx.long()] = True
    assert torch.equal(residual[sent], torch.zeros(int(sent.sum())))
    assert torch.equal(residual[~sent], t[~sent])
    # Both send the largest magnitudes: threshold sends |t| > tau (cut to the top k of those if
    # too many pass), so nothing left in the residual is larger than what was sent.
    assert t[sent].abs().min() >= t[~sent].abs().max()


def test_signsgd_residual_is_orthogonal_to_the_sent_signs_per_bucket():
    torch.manual_seed(6)
    t = torch.randn(1000, dtype=torch.float64)
    c = make("signsgd", bucket_size=100)
    residual = t - roundtrip(c, t)
    dots = (residual * torch.sign(t)).view(10, 100).sum(1)
    assert_close(dots, torch.zeros(10, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("ranks", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_signsgd_majority_vote_follows_its_definition(ranks, dtype):
    """sign(sum of the ranks' signs) times the ranks' mean scale of the bucket, zero on a tie
    (Bernstein et al., 2019); aggregate returns it times the number of ranks, which the sync
    layer divides by."""
    torch.manual_seed(ranks)
    c = make("signsgd", bucket_size=7, majority_vote=True)
    grads = [torch.randn(40).to(dtype) for _ in range(ranks)]
    grads[0][:5] = 0.0  # a zero abstains (torch.sign's 0)
    for g in grads:  # an entry no rank has a gradient for: it voted plus on every rank, and
        g[20:23] = 0.0  # the weight drifted by the mean scale every step
    packed = [c.compress(g) for g in grads]
    got = c.aggregate([p for p, _ in packed], packed[0][1]) / ranks
    assert got.dtype == torch.float32 and got.shape == (40,)  # summed in the work dtype
    assert (got[20:23] == 0).all()
    signs = torch.stack([torch.sign(g.float()) for g in grads])
    pad = (-40) % 7
    scales = torch.stack(
        [torch.nn.functional.pad(g.float().abs(), (0, pad)).view(-1, 7).sum(1) for g in grads]
    ) / torch.tensor([7.0] * 5 + [5.0])  # the last bucket has 5 real entries
    want = signs.sum(0).sign() * scales.mean(0).repeat_interleave(7)[:40]
    assert_close(got, want, rtol=1e-6)
    if ranks == 2:  # ties happen, and give zero
        assert (got[signs.sum(0) == 0] == 0).all() and (signs.sum(0) == 0).any()
    # Without the vote: the mean of the scaled signs.
    plain = make("signsgd", bucket_size=7)
    own = [plain.compress(g) for g in grads]
    mean = sum(plain.decompress(*p).float() for p in own)
    assert_close(plain.aggregate([p for p, _ in own], own[0][1]), mean)
    # Two bits an entry under the vote (+, -, 0), one without.
    assert packed[0][0][1].numel() == 2 * own[0][0][1].numel()


def test_signsgd_majority_vote_gives_one_rank_one_vote():
    """A rank whose gradient is huge and opposed does not turn the direction two ranks agree
    on, as it does in the average of scaled signs."""
    g = torch.linspace(-1, 1, 64)
    grads = [g, g * 1.5, -1000 * g]
    for vote, follows in ((True, True), (False, False)):
        c = make("signsgd", bucket_size=None, majority_vote=vote)
        packed = [c.compress(x) for x in grads]
        out = c.aggregate([p for p, _ in packed], packed[0][1])
        assert bool((torch.sign(out) == torch.sign(g)).all()) is follows


def test_signsgd_majority_vote_must_be_a_bool():
    with pytest.raises(TypeError, match="majority_vote must be True or False, got 'yes'"):
        make("signsgd", majority_vote="yes")


def test_powersgd_residual_is_what_lies_outside_the_shared_subspace():
    torch.manual_seed(7)
    t = torch.randn(NUMEL, dtype=torch.float64)
    c = make("powersgd")
    payload, ctx = run(c, t, layout=LAYOUT)
    residual = (t - c.decompress(payload, ctx)).view(-1)
    m = ctx.matrices[0]
    block = residual[m.offset : m.offset + m.rows * m.cols].view(m.rows, m.cols)
    assert_close(ctx.p_hat[0].T @ block, torch.zeros(m.rank, m.cols, dtype=t.dtype))
    for offset, size in ctx.dense:  # uncompressed parameters leave nothing behind
        assert torch.equal(residual[offset : offset + size], torch.zeros(size, dtype=t.dtype))


# ---- lossless settings ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, options",
    [
        ("none", {}),
        ("topk", {"density": 1.0}),
        ("threshold", {"density": 1.0}),
        ("randomk", {"density": 1.0}),
        ("powersgd", {"rank": 24}),
    ],
)
def test_lossless_settings_are_exact(name, options):
    torch.manual_seed(8)
    c = make(name, **options)
    for _ in range(3):  # later steps too (warm starts, thresholds)
        t = torch.randn(NUMEL)
        assert torch.equal(roundtrip(c, t, layout=LAYOUT), t)


def test_powersgd_recovers_a_low_rank_matrix_exactly():
    torch.manual_seed(9)
    m = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    c = make("powersgd", rank=3)
    assert_close(roundtrip(c, m), m)
    assert c.state_dict()["q"]  # the warm start was kept


def test_powersgd_without_layout_uses_a_near_square_matrix():
    c = make("powersgd", rank=1)
    (p,), ctx = c.compress(torch.randn(1000))
    assert (ctx.matrices[0].rows, ctx.matrices[0].cols) == (32, 32)  # ceil(sqrt(1000)) rows
    assert p.numel() == 32


def test_powersgd_warm_start_improves_a_fixed_gradient():
    torch.manual_seed(10)
    m = torch.randn(60, 50, dtype=torch.float64)
    c = make("powersgd", rank=4)
    errors = [float((roundtrip(c, m) - m).norm()) for _ in range(6)]
    assert errors[-1] < errors[0]  # power iteration across steps converges to the top subspace


def test_powersgd_keeps_float16_payloads_in_range():
    # A rank-1 float16 gradient of entries up to ~40: a warm Q of M's size made P = M Q square
    # M's scale and overflow float16 at the second step, and the NaN warm start then poisoned
    # every later step, however small the gradient.
    torch.manual_seed(0)
    a, b = torch.randn(256, 1), torch.randn(1, 256)
    c = make("powersgd", rank=1)
    for scale in (3.0, 3.0, 0.5, 0.01):
        g = (a @ b * scale).half()
        out = roundtrip(c, g)
        assert torch.isfinite(out).all()
        assert_close(out.float(), g.float(), rtol=1e-2, atol=2e-2 * float(g.abs().max()))
        assert all(torch.isfinite(q).all() for q in c.state_dict()["q"]["k"])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)], ids=str)
def test_powersgd_sends_every_row_of_a_gradient_whose_squares_pass_float32(dtype, atol):
    # A warm Q of a gradient of 1e19 has entries whose squares sum past float32's range: its
    # plain column norm was inf, Q became zero, and from the second step on only the first
    # `rank` rows of the gradient were sent, with nothing to say so. A rank-3 gradient comes
    # back whole at rank 3 (entries up to about 8; bfloat16 rounds them to 1 part in 256).
    torch.manual_seed(11)
    m = torch.randn(64, 3) @ torch.randn(3, 32)
    c = make("powersgd", rank=3)
    for _ in range(3):
        out = roundtrip(c, (m * 1e19).to(dtype)).float() / 1e19
        assert_close(out, m, rtol=0, atol=atol)


def test_powersgd_sends_float16_round_two_in_float32():
    # Q = M^T P_hat is up to a column norm of M: 4 x 20000 here, past float16's 65504, for a
    # finite float16 gradient. In float16 it overflowed on this rank alone (the other ranks
    # then waited in the next exchange); in float32 the rank-1 gradient comes back exactly.
    g = torch.zeros(16, 16, dtype=torch.float16)
    g[:, 0] = 20000.0
    c = make("powersgd", rank=1)
    payload, ctx = c.compress(g, key="k")
    (q, dense), ctx = c.next_round(payload, ctx)
    assert q.dtype == dense.dtype == torch.float32 and torch.isfinite(q).all()
    out = c.decompress((q, dense), ctx)
    assert out.dtype == torch.float16
    assert_close(out.float(), g.float(), rtol=1e-3, atol=1.0)


def test_powersgd_raises_on_a_float16_overflow_and_keeps_its_warm_start():
    torch.manual_seed(0)
    c = make("powersgd", rank=1)
    roundtrip(c, torch.randn(256, 256).half())
    kept = c.state_dict()
    huge = torch.full((256, 256), 60000.0).half()  # finite, but P's rows have norm 960000
    with pytest.raises(FloatingPointError, match="a P payload overflowed float16"):
        roundtrip(c, huge)
    assert_close(c.state_dict()["q"]["k"][0], kept["q"]["k"][0], rtol=0, atol=0)
    # float32 input of the same size is fine: its payloads are float32
    assert torch.isfinite(roundtrip(c, huge.float())).all()


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["topk", "threshold", "randomk"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range_is_refused(name, density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        get_compressor(name, density=density)


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("topk", {"density": "0.1"}, TypeError, "density must be a number"),
        ("qsgd", {"levels": 0}, ValueError, r"levels must be in \[1, 127\], got 0"),
        ("qsgd", {"levels": 200}, ValueError, r"levels must be in \[1, 127\]"),
        ("qsgd", {"levels": 2.5}, TypeError, "levels must be an integer"),
        ("qsgd", {"bucket_size": 0}, ValueError, "bucket_size"),
        ("terngrad", {"bucket_size": -4}, ValueError, "bucket_size"),
        ("powersgd", {"rank": 0}, ValueError, "rank must be >= 1, got 0"),
        ("threshold", {"reestimate_every": 0}, ValueError, "reestimate_every must be >= 1"),
        ("threshold", {"band": 1.0}, ValueError, "band must be a finite number > 1"),
        ("threshold", {"band": float("inf")}, ValueError, "band must be a finite number > 1"),
        ("randomk", {"seed": -1}, ValueError, "seed must be >= 0"),
        ("topk", {"k": 3}, ValueError, "does not take option.*'k'.*it takes: density"),
        ("fp16", {"density": 0.1}, ValueError, "does not take option"),
    ],
)
def test_bad_options_are_refused_with_a_message_naming_them(name, options, error, message):
    with pytest.raises(error, match=message):
        get_compressor(name, **options)


@pytest.mark.parametrize("name", ALL)
def test_non_floating_tensors_are_refused(name):
    with pytest.raises(TypeError, match="floating-point tensors only"):
        make(name).compress(torch.arange(12))
    with pytest.raises(TypeError, match="gradient must be a torch.Tensor, got list"):
        make(name).compress([1.0, 2.0])


def test_powersgd_warm_start_from_a_non_finite_step_falls_back_to_the_first_draw():
    torch.manual_seed(0)
    bad = torch.randn(16, 16)
    bad[3, 3] = float("nan")
    c, fresh = make("powersgd", rank=1), make("powersgd", rank=1)
    assert not torch.isfinite(roundtrip(c, bad)).all()
    g = torch.randn(16, 16)
    # As a compressor that never saw the bad step: the Q drawn from the seed, not NaN.
    assert_close(roundtrip(c, g), roundtrip(fresh, g), rtol=0, atol=0)


def test_powersgd_warm_start_from_an_all_zero_step_falls_back_to_the_first_draw():
    """A zero gradient left Q = 0, so the next P = M Q was zero whatever M was and the step
    sent the first row of M alone (rank 1)."""
    c, fresh = make("powersgd", rank=1), make("powersgd", rank=1)
    roundtrip(c, torch.zeros(16, 16))
    g = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    assert_close(roundtrip(c, g), roundtrip(fresh, g), rtol=0, atol=0)


def test_powersgd_says_when_a_loaded_warm_start_does_not_fit_the_key():
    """A saved Q that did not fit the key's matrices (another model's state) was replaced by the
    first draw without a word; a key whose layout changes within a run (DDP's rebuilt buckets)
    still changes without one."""
    c = make("powersgd", rank=1)
    roundtrip(c, torch.randn(16, 16), key="a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roundtrip(c, torch.randn(16, 8), key="a")  # in a run: no warning
    loaded = make("powersgd", rank=1)
    loaded.load_state_dict(c.state_dict())
    g = torch.randn(16, 12)
    with pytest.warns(UserWarning, match=r"warm start of key 'a' has Q's of shapes \[\(8, 1\)\]"):
        out = roundtrip(loaded, g, key="a")
    assert_close(out, roundtrip(make("powersgd", rank=1), g, key="a"), rtol=0, atol=0)


def test_threshold_hits_buffer_is_never_longer_than_the_tensor():
    c = make("threshold", density=0.9, band=1e5)
    c.compress(torch.randn(10_000))
    positions, values = c.hits_buffer(10_000)
    assert positions.numel() == values.numel() == 10_001


def test_sparse_aggregate_sums_half_payloads_in_float32():
    c = make("topk", density=0.5)
    payload, ctx = c.compress(torch.tensor([40000.0, 1.0, 40000.0, 2.0], dtype=torch.float16))
    total = c.aggregate([payload, payload], ctx)
    assert total.dtype == torch.float32
    assert total.tolist() == [80000.0, 0.0, 80000.0, 0.0]


def test_qsgd_decodes_half_payloads_in_float32_where_their_levels_pass_its_range():
    """A rank's QSGD levels reach norm / s, past float16's range for a gradient of 25,000
    everywhere in a bucket of 512 (80,812), while the average with a rank of zeros (40,406)
    fits: each payload was cast to float16 (Inf) before the float32 sum, and the step dropped."""
    grads = [torch.full((512,), 25000.0, dtype=torch.float16), torch.zeros(512).half()]
    payloads = []
    for seed, g in enumerate(grads):
        payload, ctx = make("qsgd", levels=7, bucket_size=512, seed=seed).compress(g, key="b")
        payloads.append(payload)
    c = make("qsgd", levels=7, bucket_size=512)
    average = c.aggregate(payloads, ctx) / 2
    assert average.dtype == torch.float32 and bool(torch.isfinite(average).all())
    assert 0 < float(average.max()) < 65504
    wide = c.decompress_wide(payloads[0], ctx)
    assert wide.dtype == torch.float32 and torch.equal(c.decompress(payloads[0], ctx), wide.half())


def test_threshold_kept_past_the_half_range_selects_as_its_largest_value_does():
    """The engine rescales kept thresholds with a growing loss scale (or a state is loaded):
    past float16's 65504 the next compress of a float16 tensor raised in hardshrink."""
    c = make("threshold", density=0.1)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0)).mul(15000).clamp(-6e4, 6e4)
    c.compress(g.half(), key="w")
    c.rescale(1e6)
    (idx, values), _ = c.compress(g.half(), key="w")  # nothing above 65504: estimated again
    assert 90 <= idx.numel() <= 110 and float(values.abs().min()) > 10000


def test_powersgd_refuses_a_layout_that_does_not_cover_the_tensor():
    with pytest.raises(ValueError, match="layout covers 20 elements but the tensor has 21"):
        make("powersgd").compress(torch.randn(21), layout=[torch.Size([4, 5])])


def test_powersgd_refuses_to_decompress_a_round_one_payload():
    c = make("powersgd")
    payload, ctx = c.compress(torch.randn(30, 20))
    with pytest.raises(ValueError, match="call next_round"):
        c.decompress(payload, ctx)


# ---- state ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["threshold", "randomk", "powersgd", "qsgd", "terngrad"])
def test_state_dict_round_trip_continues_with_identical_payloads(name):
    torch.manual_seed(11)
    grads = [torch.randn(NUMEL) * (1 + 0.1 * i) for i in range(8)]
    a = make(name, **({"reestimate_every": 3} if name == "threshold" else {}))
    for g in grads[:5]:
        for key in ("p", "q"):
            a.decompress(*run(a, g, key=key, layout=LAYOUT))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(name, **({"reestimate_every": 3} if name == "threshold" else {}))
    b.load_state_dict(torch.load(buf))
    assert b.state_dict().keys() == a.state_dict().keys()
    for g in grads[5:]:
        for key in ("p", "q"):
            pa, ctx_a = run(a, g, key=key, layout=LAYOUT)
            pb, ctx_b = run(b, g, key=key, layout=LAYOUT)
            assert all(torch.equal(x, y) for x, y in zip(pa, pb))
            assert torch.equal(a.decompress(pa, ctx_a), b.decompress(pb, ctx_b))


def test_state_of_a_fresh_compressor_differs_from_a_used_one():
    a, b = make("randomk"), make("randomk")
    a.compress(torch.randn(100), key="z")
    x = torch.randn(100)
    assert not torch.equal(a.compress(x, key="z")[1][1], b.compress(x, key="z")[1][1])


@pytest.mark.parametrize("name", ["randomk", "qsgd", "powersgd", "terngrad"])
def test_malformed_state_is_refused(name):
    with pytest.raises(ValueError, match="state must have exactly the key"):
        make(name).load_state_dict({"wrong": 1})


# ---- bit packing ------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_bits_round_trips_and_uses_bits_per_entry(bits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8) * bits
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("levels, bits", [(1, 2), (2, 3), (3, 3), (4, 4), (7, 4), (8, 5), (127, 8)])
def test_qsgd_sends_ceil_log2_2s_plus_1_bits_per_entry(levels, bits):
    c = get_compressor("qsgd", levels=levels, bucket_size=64)
    (norms, packed), _ = c.compress(torch.randn(640))
    assert norms.numel() == 10 and packed.numel() == 640 * bits // 8


@pytest.mark.parametrize(
    "name, options, bits",
    [
        ("qsgd", {"levels": 4}, 4),
        ("terngrad", {}, 2),
        ("signsgd", {}, 1),
        ("signsgd", {"majority_vote": True}, 2),
    ],
)
def test_bit_packed_payloads_send_no_code_for_the_last_buckets_padding(name, options, bits):
    # 746 entries in buckets of 512: 278 padding entries had been sent too (+37% codes).
    torch.manual_seed(0)
    x = torch.randn(746, dtype=torch.float64)
    c = get_compressor(name, bucket_size=512, **options)
    payload, ctx = c.compress(x, key="w")
    assert payload[0].numel() == 2 and payload[1].numel() == math.ceil(746 / 8) * bits
    out = c.decompress(payload, ctx)
    if name == "signsgd":  # per bucket: sign times the mean magnitude of its real entries
        want = torch.cat([v.sign() * v.abs().mean() for v in (x[:512], x[512:])])
        assert_close(out, want, rtol=1e-12, atol=0)
    else:  # the same draws and codes as the tensor padded to whole buckets by hand
        padded = torch.cat([x, x.new_zeros(1024 - 746)])
        ref = get_compressor(name, bucket_size=512, **options)
        assert torch.equal(out, roundtrip(ref, padded, key="w")[:746])


def test_qsgd_levels_are_multiples_of_norm_over_s():
    c = get_compressor("qsgd", levels=4, bucket_size=None)
    x = torch.randn(300, dtype=torch.float64)
    out = roundtrip(c, x)
    steps = out / (x.norm() / 4)
    assert_close(steps, steps.round())
    assert ((steps - 4 * x / x.norm()).abs() < 1 + 1e-9).all()  # rounded to a neighbour level


@pytest.mark.parametrize(
    "dtype, magnitude, levels, bucket",
    [
        # Squares overflowed to inf (float32 and bfloat16 both compute in float32): every entry
        # was sent as level 0 of an inf norm, and came back NaN.
        (torch.float32, 1e19, 3, 64),
        (torch.bfloat16, 1e19, 3, 64),
        (torch.float64, 1e300, 3, 64),
        # Squares vanished: the norm was sent as 0, and every entry came back 0.
        (torch.float32, 1e-30, 3, 64),
        # float16 near its largest value (65504); the norm is in float32, and with small buckets
        # every level a decoded entry can take stays below 65504.
        (torch.float16, 5e4, 7, 4),
    ],
    ids=str,
)
def test_qsgd_is_unbiased_for_huge_and_tiny_magnitudes(dtype, magnitude, levels, bucket):
    g = torch.Generator().manual_seed(6)
    base = torch.linspace(-1, 1, 64, dtype=torch.float64)[torch.randperm(64, generator=g)]
    x = (base * magnitude).to(dtype)
    truth = x.double()
    c = get_compressor("qsgd", levels=levels, bucket_size=bucket)
    (norms, _), _ = c.compress(x, key="n")
    expected = (truth / magnitude).view(-1, bucket).norm(dim=1) * magnitude  # float64 overflows too
    assert_close(norms.double(), expected, rtol=1e-6, atol=0)
    copies = 50
    samples = torch.cat(
        [roundtrip(c, x.repeat(copies), key="u").double().view(copies, 64) for _ in range(60)]
    )
    assert torch.isfinite(samples).all()
    mean = samples.mean(0)
    # Within 5 standard errors, plus the rounding of the decoded levels to the input dtype.
    std = qsgd_std(truth, levels, bucket)
    slack = 5 * std / math.sqrt(len(samples)) + 4 * torch.finfo(dtype).eps * magnitude
    assert ((mean - truth).abs() <= slack).all(), (mean - truth).abs().max()
    assert (samples.std(0) > 0).any()


@pytest.mark.parametrize("magnitude", [1.0, 1e-20, 1e-42], ids=str)
def test_terngrad_is_unbiased_down_to_subnormal_buckets(magnitude):
    # A bucket whose largest magnitude is below float32's smallest normal (1.2e-38) had its
    # probabilities computed against that normal instead: its mean shrank towards zero.
    g = torch.Generator().manual_seed(6)
    x = torch.linspace(-1, 1, 64, dtype=torch.float64)[torch.randperm(64, generator=g)] * magnitude
    x = x.float()
    truth = x.double()
    c = get_compressor("terngrad", bucket_size=64)
    copies = 50
    samples = torch.cat(
        [roundtrip(c, x.repeat(copies), key="t").double().view(copies, 64) for _ in range(40)]
    )
    std = terngrad_std(truth, 64)
    assert ((samples.mean(0) - truth).abs() <= 5 * std / math.sqrt(len(samples))).all()
    assert (samples.std(0) > 0).any()


def test_terngrad_sends_minus_zero_or_plus_bucket_max():
    x = torch.randn(1000, dtype=torch.float64)
    out = roundtrip(get_compressor("terngrad", bucket_size=100), x).view(10, 100)
    scale = x.view(10, 100).abs().amax(1, keepdim=True)
    assert torch.isin(out / scale, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)).all()
    assert ((out == 0) | (torch.sign(out) == torch.sign(x.view(10, 100)))).all()


# ---- TernGrad's scaler sharing ---------------------------------------------------------------
def test_terngrad_scaler_sharing_is_unbiased_under_another_ranks_larger_scale():
    # Another rank's bucket maximum, 3x this rank's, is the shared scale: every entry decodes
    # to -3s, 0 or 3s, and is still the gradient on average.
    torch.manual_seed(4)
    c = make("terngrad", bucket_size=64, scaler_sharing=True)
    copies, samples = 50, []
    for _ in range(100):
        (scales,), pending = c.compress(UNBIASED_X.repeat(copies), key="u")
        shared = scales * 3
        (codes,), ctx = c.next_round((shared,), pending)
        assert codes.dtype == torch.int32  # not bound to a number of ranks: room for any sum
        out = c.decompress((codes,), ctx).view(copies, 64)
        assert torch.isin(out / shared[:, None], torch.tensor([-1.0, 0.0, 1.0]).double()).all()
        samples.append(out)
    samples = torch.cat(samples)
    # Within 5 standard errors of the truth, from the rounding's own variance |x| S - x^2 (a
    # sample's spread is zero for the smallest entry, hit about 3 times in 5000 draws).
    big = 3 * UNBIASED_X.abs().max()
    std = (UNBIASED_X.abs() * big - UNBIASED_X**2).sqrt()
    assert ((samples.mean(0) - UNBIASED_X).abs() <= 5 * std / math.sqrt(len(samples))).all()
    assert (samples.std(0) > 0).sum() >= 60


def test_terngrad_scaler_sharing_sums_codes_in_the_narrowest_integer_that_holds_them():
    x = torch.randn(100)
    # (gloo and NCCL sum no int16)
    for world, dtype in ((1, torch.int8), (127, torch.int8), (128, torch.int32),
                         (40000, torch.int32)):  # fmt: skip
        c = make("terngrad", scaler_sharing=True)
        c.bind(world)
        assert c.rounds == 2 and c.round_ops == ("max",) and c.summable
        (codes,), _ = c.next_round(*c.compress(x))
        assert codes.dtype == dtype and codes.numel() == 100  # no padding on the wire
    # Without sharing nothing changes: one gathered round of packed codes.
    plain = make("terngrad")
    assert plain.rounds == 1 and not plain.summable and plain.wire == "packed"


def test_terngrad_scaler_sharing_is_one_draw_of_the_unshared_rounding():
    # Under a shared scale equal to its own, a rank sends what it sends without sharing.
    x = torch.randn(300)
    shared, plain = make("terngrad", scaler_sharing=True), make("terngrad")
    (scales,), pending = shared.compress(x, key="k")
    with pytest.raises(RuntimeError, match="call next_round"):
        shared.decompress((scales,), pending)
    got = shared.decompress(*shared.next_round((scales,), pending))
    assert torch.equal(got, plain.decompress(*plain.compress(x, key="k")))
    with pytest.raises(RuntimeError, match="only with scaler_sharing=True"):
        plain.next_round(*plain.compress(x))
    with pytest.raises(TypeError, match="scaler_sharing must be True or False, got 1"):
        make("terngrad", scaler_sharing=1)
