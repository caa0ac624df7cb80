"""Single-process reference definitions of the sparse collectives, and unit tests of them and of
the pure helpers the collectives are built from.

The distributed tests compare every rank's result with these definitions:

* exact algorithms (ssar_rd, ssar_split, dsar): the dense sum of all ranks' inputs;
* gTop-k: the binomial-tree merge of Shi et al.: node r starts with its input's top k; at
  distance d = 1, 2, 4, ... node r (a multiple of 2d) absorbs node r + d (if it exists) and keeps
  the k largest magnitudes of the sum; the result is node 0;
* Ok-Topk with threshold t (the one the call reports it used): exactly the indices in the union
  of the inputs' supports whose summed magnitude is >= t, with the exact sums as values; and,
  on calls that estimate t, at least k and at most k + max(1, k // 100) such indices (unless
  fewer than k exist, then t = 0 and all are kept).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.comm import p2p
from sparsetrain.comm.gtopk import keep_topk
from sparsetrain.comm.oktopk import BRACKET, OkTopk, estimate_threshold, next_threshold
from sparsetrain.comm.p2p import (
    backend_for,
    coalesce,
    device_of,
    error_type,
    even_bounds,
    input_error,
    merge,
    pack,
    split_by_bounds,
    unpack,
)

Sparse = tuple[torch.Tensor, torch.Tensor]


# ---- reference definitions (imported by tests/distributed/test_sparse_collectives.py) ------
def dense_sum(inputs: list[Sparse], numel: int) -> torch.Tensor:
    """Sum of all ranks' sparse inputs as a dense float64 vector."""
    out = torch.zeros(numel, dtype=torch.float64)
    for idx, val in inputs:
        out.index_add_(0, idx.long(), val.double())
    return out


def union_support(inputs: list[Sparse], numel: int) -> torch.Tensor:
    """Boolean mask of the indices present on at least one rank."""
    mask = torch.zeros(numel, dtype=torch.bool)
    for idx, _ in inputs:
        mask[idx.long()] = True
    return mask


def _dense_topk(
    x: torch.Tensor, support: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (vector, support) keeping the k supported entries of largest magnitude."""
    if int(support.sum()) <= k:
        return x, support
    score = torch.where(support, x.abs(), torch.full_like(x, -1.0))
    keep = torch.zeros_like(support)
    keep[torch.topk(score, k).indices] = True
    return torch.where(keep, x, torch.zeros_like(x)), keep


def _gtopk_tree(inputs: list[Sparse], numel: int, k: int):
    """gTop-k's tree in one process (float64): the root's (vector, support), and by rank what
    its merges drop, dense (a rank's own entries beyond k, and what it leaves out of each pair
    of vectors it merges)."""
    dropped = [torch.zeros(numel, dtype=torch.float64) for _ in inputs]
    nodes = []
    for r, (idx, val) in enumerate(inputs):
        x = dense_sum([(idx, val)], numel)
        nodes.append(_dense_topk(x, union_support([(idx, val)], numel), k))
        dropped[r] += x - nodes[r][0]
    p, d = len(inputs), 1
    while d < p:
        for r in range(0, p, 2 * d):
            if r + d < p:
                (xa, sa), (xb, sb) = nodes[r], nodes[r + d]
                nodes[r] = _dense_topk(xa + xb, sa | sb, k)
                dropped[r] += xa + xb - nodes[r][0]
        d *= 2
    return nodes[0], dropped


def gtopk_reference(inputs: list[Sparse], numel: int, k: int) -> Sparse:
    """gTop-k's tree merge computed in one process (float64); returns (indices, values)."""
    (x, support), _ = _gtopk_tree(inputs, numel, k)
    idx = support.nonzero().flatten()
    return idx, x[idx]


def gtopk_dropped_reference(inputs: list[Sparse], numel: int, k: int) -> list[torch.Tensor]:
    """What each rank's merges drop in :func:`gtopk_reference`'s tree, dense (float64)."""
    return _gtopk_tree(inputs, numel, k)[1]


def oktopk_reference(inputs: list[Sparse], numel: int, threshold: float) -> Sparse:
    """Ok-Topk's selection for a given threshold: union indices with |sum| >= threshold."""
    s = dense_sum(inputs, numel)
    keep = union_support(inputs, numel) & (s.abs() >= threshold)
    idx = keep.nonzero().flatten()
    return idx, s[idx]


def threshold_tolerance(k: int) -> int:
    return max(1, k // 100)


# ---- the reference definitions on hand-worked cases ------------------------------------------
def _sp(idx, val):
    return torch.tensor(idx), torch.tensor(val, dtype=torch.float64)


def test_dense_sum_adds_overlapping_indices():
    s = dense_sum([_sp([0, 2], [1.0, 2.0]), _sp([2, 3], [5.0, -1.0])], 5)
    assert s.tolist() == [1.0, 0.0, 7.0, -1.0, 0.0]


def test_gtopk_reference_drops_at_each_merge():
    # k = 1. Rank 0 and 1 merge first: {0: 3} + {1: 4} -> keep {1: 4}; rank 2 {0: 5} merges
    # at distance 2: {1: 4} + {0: 5} -> {0: 5}. Although index 0 sums to 8 overall, the
    # tree keeps it only as 5: the first merge dropped rank 0's 3.
    inputs = [_sp([0], [3.0]), _sp([1], [4.0]), _sp([0], [5.0])]
    idx, val = gtopk_reference(inputs, 4, 1)
    assert idx.tolist() == [0] and val.tolist() == [5.0]
    # Rank 0 merged both times: it dropped rank 0's 3, then rank 1's 4; with the result that
    # is every input.
    dropped = gtopk_dropped_reference(inputs, 4, 1)
    assert [d.tolist() for d in dropped] == [[3.0, 4.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4]


def test_oktopk_reference_keeps_union_entries_at_threshold():
    inputs = [_sp([0, 1], [2.0, 1.0]), _sp([1, 3], [-3.0, 0.5])]
    idx, val = oktopk_reference(inputs, 5, 2.0)
    assert idx.tolist() == [0, 1] and val.tolist() == [2.0, -2.0]
    idx, _ = oktopk_reference(inputs, 5, 0.0)
    assert idx.tolist() == [0, 1, 3]  # index 2 is in no input, so never selected


# ---- pure helpers of the collectives ---------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=60), st.integers(0, 2**31 - 1))
def test_coalesce_sums_duplicates_and_sorts(idx_list, seed):
    # As given (unsorted, duplicates), sorted with duplicates, and sorted unique (the case that
    # skips the sort): the same sums.
    given_idx = torch.tensor(idx_list, dtype=torch.int64)
    val = torch.randn(len(idx_list), generator=torch.Generator().manual_seed(seed))
    uniq = torch.unique(given_idx)
    first = torch.zeros(31).index_add_(0, given_idx, val)[uniq]
    for idx, v in ((given_idx, val), (torch.sort(given_idx).values, val[torch.sort(given_idx).indices]),
                   (uniq, first)):  # fmt: skip
        u, s = coalesce(idx, v)
        assert torch.equal(u, uniq)
        expected = torch.zeros(31).index_add_(0, idx, v)
        torch.testing.assert_close(s, expected[u])


def test_merge_of_two_sparse_vectors_equals_dense_sum():
    a, b = _sp([5, 1], [1.0, 2.0]), _sp([1, 7], [3.0, 4.0])
    i, v = merge([a, b])
    assert i.tolist() == [1, 5, 7] and v.tolist() == [5.0, 1.0, 4.0]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_split_by_bounds_partitions_every_entry_into_its_range(numel, parts, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=g)[: numel // 2]
    if seed % 2:  # sorted input takes the path without a sort
        idx = torch.sort(idx).values
    val = torch.randn(idx.numel(), generator=g)
    edges = even_bounds(numel, parts)
    assert edges[0] == 0 and edges[-1] == numel and len(edges) == parts + 1
    pieces = split_by_bounds(idx, val, edges)
    assert sum(p[0].numel() for p in pieces) == idx.numel()
    lookup = dict(zip(idx.tolist(), val.tolist()))
    for q, (i, v) in enumerate(pieces):
        assert bool(((i >= edges[q]) & (i < edges[q + 1])).all())
        assert i.tolist() == sorted(i.tolist())
        assert v.tolist() == [lookup[j] for j in i.tolist()]


def test_pack_unpack_round_trips_misaligned_layouts():
    # 3 int32 indices put the float64 values at byte 12, not a multiple of 8.
    idx = torch.tensor([4, 0, 9], dtype=torch.int32)
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.float32):
        val = torch.tensor([1.5, -2.0, 3.25], dtype=dtype)
        i, v = unpack(pack(idx, val), torch.int32, dtype)
        assert torch.equal(i, idx) and torch.equal(v, val)


def test_pack_copies_strided_slices_that_torch_calls_contiguous():
    # A one-element (or empty) slice with stride 2 is "contiguous" to torch, yet cannot be
    # viewed as bytes; ranks holding such a part must pack it like any other.
    idx, val = torch.tensor([7, 0, 9, 0])[::2], torch.tensor([1.5, 0.0, -2.0, 0.0])[::2]
    for n in (0, 1, 2):
        i, v = unpack(pack(idx[:n], val[:n]), torch.int64, torch.float32)
        assert i.tolist() == idx[:n].tolist() and v.tolist() == val[:n].tolist()


def test_only_the_four_float_dtypes_pass_the_input_check():
    # float8 formats would share one dtype code across ranks and cannot be scatter-added.
    idx = torch.tensor([1, 2])
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int32):
        err = input_error(idx, torch.ones(2).to(dtype), 10)
        assert err is not None and "float16, bfloat16, float32, float64" in err, dtype
    assert input_error(idx, torch.ones(2, dtype=torch.bfloat16), 10) is None


def _backends(monkeypatch, config: str) -> None:
    """Pretend the default group is initialized with backend config ``config``."""
    monkeypatch.setattr(p2p.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(p2p.dist, "get_backend_config", lambda group=None: config)


def test_under_nccl_headers_go_to_the_current_cuda_device(monkeypatch):
    # NCCL moves only CUDA memory. Values that are not a CUDA tensor (bad input) must still get
    # their size header onto the GPU: it carries the error to every rank, where a CPU header
    # would fail on this rank alone and leave the others waiting.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    cuda1 = torch.device("cuda", 1)
    for config in ("cuda:nccl", "nccl", "NCCL"):
        _backends(monkeypatch, config)
        for values in (torch.ones(2), [1.0, 2.0], torch.ones(2, device="meta")):
            assert device_of(values) == cuda1, config
    err = input_error(torch.tensor([1]), torch.ones(1), 10, cuda1)
    assert err is not None and "cuda:1" in err and error_type(err) is ValueError

    # gloo moves CPU memory: the values' own device, CPU for a non-tensor. So does a group
    # with a backend for each device (init_process_group() without a backend on a GPU host).
    def no_cuda():
        raise AssertionError("a group with a CPU backend must not ask for a CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    for config in ("cpu:gloo,cuda:gloo", "gloo", "cpu:gloo,cuda:nccl", "mpi"):
        _backends(monkeypatch, config)
        assert device_of(torch.ones(2)) == device_of([1.0]) == torch.device("cpu"), config
        # No backend moves meta memory: its header goes on CPU, which carries the error.
        assert device_of(torch.ones(2, device="meta")) == torch.device("cpu"), config
    assert input_error(torch.tensor([1]), torch.ones(1), 10, torch.device("cpu")) is None


def test_the_backend_that_moves_a_device_is_looked_up_per_device(monkeypatch):
    cases = {
        "cpu:gloo,cuda:nccl": {"cpu": "gloo", "cuda": "nccl", "mps": None},
        "cpu:gloo,cuda:gloo": {"cpu": "gloo", "cuda": "gloo"},
        "gloo": {"cpu": "gloo", "cuda": "gloo"},
        "cuda:nccl": {"cpu": None, "cuda": "nccl"},
        "mpi": {"cpu": "mpi", "cuda": "mpi", "meta": None},
        "nccl": {"cpu": None, "cuda": "nccl"},
        " cpu : gloo , cuda : NCCL ": {"cpu": "gloo", "cuda": "nccl"},
    }
    for config, want in cases.items():
        _backends(monkeypatch, config)
        assert {dev: backend_for(None, dev) for dev in want} == want, config
    # Without a process group, no backend moves anything.
    monkeypatch.setattr(p2p.dist, "is_initialized", lambda: False)
    assert backend_for(None, "cpu") is None
    assert device_of(torch.ones(2)) == torch.device("cpu")


def test_keep_topk_keeps_largest_magnitudes_sorted_by_index():
    i, v = keep_topk(torch.tensor([1, 3, 6, 8]), torch.tensor([0.1, -5.0, 2.0, 0.3]), 2)
    assert i.tolist() == [3, 6] and v.tolist() == [-5.0, 2.0]
    i, _ = keep_topk(torch.tensor([2]), torch.tensor([1.0]), 5)
    assert i.tolist() == [2]


# ---- Ok-Topk's saved state (pure: no process group needed) ----------------------------------
def _oktopk_key_state(**changes):
    return {
        "step": 5,
        "numel": 100,
        "world": 2,
        "bounds": [0, 40, 100],
        "threshold": 0.5,
        **changes,
    }


def test_oktopk_state_round_trips_exactly():
    coll = OkTopk()
    state = {
        "keys": {"w": _oktopk_key_state(), "b": _oktopk_key_state(bounds=None, threshold=None)}
    }
    coll.load_state_dict(state)
    assert coll.state_dict() == state


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"w": _oktopk_key_state(extra=1)}, "must have the entries"),
        ({"w": {"step": 1}}, "must have the entries"),
        ({"w": _oktopk_key_state(bounds=[0, 100])}, "bounds must be world"),
        ({"w": _oktopk_key_state(world=3, bounds=[0, 60, 40, 100])}, "bounds must be world"),
        ({"w": _oktopk_key_state(bounds=[0, 50, 99])}, "bounds must be world"),
        # a negative threshold kept every entry until the next estimate; NaN and Inf loaded
        ({"w": _oktopk_key_state(threshold=-0.5)}, "threshold must be None or a finite number"),
        ({"w": _oktopk_key_state(threshold=float("nan"))}, "finite number >= 0"),
        ({"w": _oktopk_key_state(threshold=float("inf"))}, "finite number >= 0"),
    ],
)
def test_oktopk_refuses_a_malformed_state(bad, match):
    with pytest.raises(ValueError, match=match):
        OkTopk().load_state_dict({"keys": bad})


def test_byte_accounting_follows_the_ring_formulas_worked_by_hand():
    from sparsetrain.comm.accounting import ring_allgather_bytes, ring_allreduce_bytes

    # Ring allreduce: 2 (p-1)/p * n * b. 1000 float32 on 4 ranks: 2 * 3/4 * 4000 = 6000.
    assert ring_allreduce_bytes(1000, 4, 4) == 6000
    assert ring_allreduce_bytes(1000, 4, 2) == 4000  # 2 * 1/2 * 4000
    assert ring_allreduce_bytes(1000, 2, 8) == 3500  # float16: 2 * 7/8 * 2000
    assert ring_allreduce_bytes(10, 4, 3) == 53  # 2 * 2/3 * 40 = 53.33..., rounded
    # Ring allgather of blocks totalling B: (p-1)/p * B. 800 B on 4 ranks: 600.
    assert ring_allgather_bytes(800, 4) == 600
    assert ring_allgather_bytes(800, 2) == 400
    assert ring_allgather_bytes(100, 3) == 67  # 66.66..., rounded
    # One rank sends nothing.
    assert ring_allreduce_bytes(1000, 4, 1) == 0
    assert ring_allgather_bytes(800, 1) == 0


def test_next_threshold_steps_to_k_on_a_power_law():
    # Counts falling as 400 / t**2: k = 100 is kept at t = 2; from t = 1 (400 kept, 400/c**2
    # at t * c) the secant step lands there, and from t = 4 (25 kept) it comes back down.
    def count(t):
        return 400 / t**2

    assert next_threshold(1.0, 400, count(BRACKET), count(1 / BRACKET), 100) == pytest.approx(2.0)
    t = next_threshold(4.0, 25, count(4 * BRACKET), count(4 / BRACKET), 100)
    assert t == pytest.approx(2.0)


def test_next_threshold_moves_at_most_a_factor_of_two_and_in_the_right_direction():
    # Far too many kept and the count barely falls: the step is clamped to doubling.
    assert next_threshold(1.0, 10_000, 9_999, 10_001, 10) == 2.0
    assert next_threshold(1.0, 1, 1, 2, 1_000) == 0.5
    # Flat over the bracket (ties): move by the bracket, toward k.
    assert next_threshold(1.0, 50, 50, 50, 10) == pytest.approx(BRACKET)
    assert next_threshold(1.0, 5, 5, 5, 10) == pytest.approx(1 / BRACKET)
    # Nothing kept on the far side: still a step up, inside the bracket.
    assert 1.0 < next_threshold(1.0, 20, 0, 30, 10) < BRACKET


def test_next_threshold_keeps_a_hit_and_keep_everything():
    assert next_threshold(0.3, 10, 4, 20, 10) == 0.3  # exactly k kept
    assert next_threshold(0.0, 5, 5, 5, 10) == 0.0  # threshold 0 keeps all; stays
    assert next_threshold(0.3, 50, 4, 60, 10, tied=True) == 0.3  # ties at it straddle k


def _kept_by_estimate(mags: torch.Tensor, k: int) -> int:
    t = estimate_threshold(p2p.Wire(None, torch.device("cpu")), mags, k)
    return int((mags >= t).sum())


@pytest.mark.parametrize("width", [1e-3, 1e-9, 1e-12])
def test_estimate_resolves_a_kth_magnitude_inside_a_narrow_cluster_far_from_zero(width):
    """Six rounds of 64 bins resolve 64**-6 = 1.5e-11 of [0, max]: with every magnitude in
    1000 * (1 + [0, 1e-12)), the whole cluster fell in one bin and all 10,000 were kept for
    k = 100. Rounds go on while more than 2k (what a reused threshold may keep) are."""
    gen = torch.Generator().manual_seed(1)
    mags = 1000 * (1 + width * torch.rand(10_000, dtype=torch.float64, generator=gen))
    assert 100 <= _kept_by_estimate(mags, 100) <= 200


def test_estimate_takes_no_extra_rounds_for_ties(monkeypatch):
    """Ties at the k-th magnitude (clipped gradients) cannot be split: past the six rounds,
    one check of the bin's span (a single value) ends the estimate; ten more histograms had
    been taken to keep the same 316,603 entries of 1M."""
    reduced = []
    allreduce = p2p.Wire.allreduce

    def counting(self, t, *args):
        reduced.append(t.numel())
        return allreduce(self, t, *args)

    monkeypatch.setattr(p2p.Wire, "allreduce", counting)
    gen = torch.Generator().manual_seed(3)
    clipped = torch.randn(1_000_000, dtype=torch.float64, generator=gen).clamp(-1, 1).abs()
    assert _kept_by_estimate(clipped, 1000) == int((clipped == 1).sum())
    # the maximum, six histograms, the bin's span
    assert reduced == [2] + [64] * 6 + [2]
    # the tied value itself, not the lower edge of its bin, so a reuse can tell ties apart
    assert estimate_threshold(p2p.Wire(None, torch.device("cpu")), clipped, 1000) == 1.0


def test_oktopk_reuses_a_threshold_at_ties_that_keep_more_than_2k(monkeypatch):
    """Clipped gradients tie at the clip value: 31,641 of 100,000 for k = 1,000. No threshold
    keeps fewer of them and still k, so the estimate keeps them all; every later call had
    re-estimated it (eight allreduces) because the count exceeded 2k, and the corrected
    threshold above the ties kept none. Now the tied threshold is reused as it is."""
    reduced = []
    allreduce = p2p.Wire.allreduce
    monkeypatch.setattr(
        p2p.Wire, "allreduce", lambda self, t, *a: reduced.append(1) or allreduce(self, t, *a)
    )
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(100_000, generator=gen).clamp(-1, 1)
    tied = int((grad.abs() == 1).sum())
    assert tied > 2 * 1000
    coll, idx = OkTopk(k=1000), torch.arange(100_000)
    for step in range(4):
        reduced.clear()
        res = coll(idx, grad, 100_000, key="w")
        st = coll.stats()["w"]
        assert st["selected"] == res.indices.numel() == tied and st["tied"]
        assert st["threshold"] == st["next_threshold"] == 1.0
        assert st["estimated"] == (step == 0) and (reduced == []) == (step > 0)
    # gradients no longer clipped: the threshold keeps more than 2k, none tied: estimated again
    coll(idx, torch.randn(100_000, generator=gen), 100_000, key="w")
    st = coll.stats()["w"]
    assert st["estimated"] and not st["tied"] and st["selected"] <= 1000 + 10


def test_oktopk_reuses_a_threshold_at_ties_that_keep_between_k_and_2k(monkeypatch):
    """Gradients clipped where 1,500 of 100,000 tie at the clip value, k = 1,000: the estimate
    keeps the ties; the next threshold, corrected above them, kept next to none, so every
    call re-estimated it (seven allreduces). Now a threshold at ties stays and is reused."""
    reduced = []
    allreduce = p2p.Wire.allreduce
    monkeypatch.setattr(
        p2p.Wire, "allreduce", lambda self, t, *a: reduced.append(1) or allreduce(self, t, *a)
    )
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(100_000, generator=gen)
    clip = float(grad.abs().kthvalue(100_000 - 1500).values)  # the 1,500th largest magnitude
    grad = grad.clamp(-clip, clip)
    tied = int((grad.abs() == clip).sum())
    assert 1000 < tied <= 2000 and int((grad.abs() > clip).sum()) == 0
    coll, idx = OkTopk(k=1000, threshold_every=100), torch.arange(100_000)
    for step in range(4):
        reduced.clear()
        res = coll(idx, grad, 100_000, key="w")
        st = coll.stats()["w"]
        assert st["selected"] == res.indices.numel() == tied and st["tied"], (step, st)
        assert st["threshold"] == st["next_threshold"] == clip
        assert st["estimated"] == (step == 0) and (reduced == []) == (step > 0)
    # Unclipped gradients of the same scale: ties no more, the threshold moves toward k.
    coll(idx, torch.randn(100_000, generator=gen), 100_000, key="w")
    assert not coll.stats()["w"]["tied"]


def test_estimate_keeps_about_k_of_training_like_and_heavy_tailed_magnitudes():
    gen = torch.Generator().manual_seed(2)
    normal = torch.randn(100_000, dtype=torch.float64, generator=gen).abs()
    assert 1000 <= _kept_by_estimate(normal, 1000) <= 1000 + threshold_tolerance(1000)
    # a few entries 1e40 times the rest: the scale is found first, then the k-th of the rest
    heavy = torch.cat([normal, torch.full((5,), 1e40, dtype=torch.float64)])
    assert 1000 <= _kept_by_estimate(heavy, 1000) <= 1000 + threshold_tolerance(1000)
    # ties at the k-th magnitude: every tied entry is kept (no threshold separates them)
    low = 0.25 * torch.rand(1000, dtype=torch.float64, generator=gen)
    tied = torch.cat([torch.ones(50, dtype=torch.float64), torch.full((300,), 0.5).double(), low])
    assert _kept_by_estimate(tied, 100) == 350


def _call_each(names: list[str]) -> dict:
    from sparsetrain.comm import get_collective

    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(1000, generator=gen)[:100].sort().values
    val = torch.randn(100, generator=gen)
    out = {}
    for name in names:
        coll = get_collective(name, **({"k": 30} if name in ("oktopk", "gtopk") else {}))
        out[name] = [coll(idx, val, 1000, key="a") for _ in range(3)]  # state kept between calls
    return out


def test_without_a_process_group_a_collective_runs_as_a_world_of_one():
    """Before, every sparse collective but the allgather raised when torch.distributed was not
    initialized, so GradientSync with one of them could not be tried in one process."""
    import torch.distributed as dist

    names = ["allgather", "ssar_rd", "ssar_split", "dsar", "oktopk", "gtopk"]
    alone = _call_each(names)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        grouped = _call_each(names)
    finally:
        dist.destroy_process_group()
    for name in names:
        for a, b in zip(alone[name], grouped[name]):
            for field in ("dense", "indices", "values", "dropped"):
                x, y = getattr(a, field), getattr(b, field)
                if isinstance(x, tuple):  # gTop-k's dropped (indices, values)
                    assert all(torch.equal(u, v) for u, v in zip(x, y)), (name, field)
                else:
                    assert (x is None and y is None) or torch.equal(x, y), (name, field)
            assert a.bytes_sent == b.bytes_sent == 0, name
