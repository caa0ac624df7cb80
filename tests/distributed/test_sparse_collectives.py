"""The sparse collectives on 2, 3, 4, 5 and 8 gloo ranks against their single-process definitions.

One world is spawned per world size; inside it every algorithm runs every case. Each rank
regenerates every rank's input from a seed, so references are computed locally (exact
algorithms) or in the test process (gTop-k, Ok-Topk; definitions in
tests/unit/test_collective_reference.py).

Tolerances: float64 inputs are compared at 1e-12 relative; float32 at 1e-5; float16 at 1e-2
(sums of up to 8 values rounded in a different order).

Everything runs twice: with the few-int exchanges (agreement, count gathers) as direct sends to
every peer, as below ``p2p.TREE_FROM`` ranks, and in their log2 p-round form, which large worlds
use, forced here on 2 to 8 ranks.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import sparsetrain
from sparsetrain.comm import dsar, gtopk, oktopk, p2p, ssar  # noqa: F401  (register them)
from sparsetrain.comm.registry import get_collective
from tests.distributed.harness import oks, run_world
from tests.unit.test_collective_reference import (
    dense_sum,
    gtopk_reference,
    oktopk_reference,
    threshold_tolerance,
    union_support,
)
from tests.unit.test_compressors import RANK_ORDER_SUM, RANK_ORDER_VALUES

EXACT = ("allgather", "ssar_rd", "ssar_split", "dsar")
ALL = (*EXACT, "gtopk", "oktopk")
POINT_TO_POINT = ALL[1:]  # all but the allgather baseline, which checks in a library all_gather
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2}


def random_input(seed: int, rank: int, numel: int, count: int, dtype, idx_dtype=torch.int64):
    """Rank ``rank``'s sparse input: ``count`` distinct random indices, normal values; sorted by
    index for odd seeds (as the threshold compressor gives them: no sort in the collectives)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    count = min(count, numel)
    idx = torch.randperm(numel, generator=g)[:count].to(idx_dtype)
    if seed % 2:
        idx = torch.sort(idx).values
    return idx, torch.randn(count, generator=g, dtype=torch.float64).to(dtype)


# (seed, numel, per-rank counts as a function of rank, value dtype, index dtype)
EXACT_CASES = [
    (1, 1000, lambda r: 10, torch.float64, torch.int64),  # sparse, little overlap
    (2, 64, lambda r: 40, torch.float32, torch.int32),  # dense enough for DSAR to switch
    (3, 500, lambda r: 0 if r == 1 else 30 + r, torch.float32, torch.int64),  # one rank empty
    (4, 100, lambda r: 0, torch.float64, torch.int64),  # nothing anywhere
    (5, 3, lambda r: 2, torch.float64, torch.int32),  # fewer elements than ranks
    (6, 200, lambda r: 50, torch.float16, torch.int32),
]


def training_like(step: int, rank: int, numel: int, k: int):
    """Top-k of a gradient that is a slowly drifting heavy-tailed signal plus rank noise: the
    ranks' index sets overlap heavily and move a little every step."""
    base = torch.Generator().manual_seed(7)
    signal = torch.randn(numel, generator=base, dtype=torch.float64) ** 3
    drift = torch.randn(
        numel, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64
    )
    noise = torch.randn(
        numel, generator=torch.Generator().manual_seed(1000 * step + rank), dtype=torch.float64
    )
    grad = signal + 0.05 * step * drift + 0.3 * noise
    idx = torch.topk(grad.abs(), k).indices
    return idx.to(torch.int32), grad[idx]


OK_NUMEL, OK_K, OK_STEPS = 20_000, 400, 8


def _cases(rank: int, world: int, group) -> dict:
    """Run every algorithm and case on ``group`` (``world`` ranks; ``rank`` within it)."""
    out: dict = {"exact": [], "gtopk": [], "oktopk": [], "errors": {}}
    for seed, numel, count, dtype, idx_dtype in EXACT_CASES:
        inputs = [random_input(seed, r, numel, count(r), dtype, idx_dtype) for r in range(world)]
        ref = dense_sum(inputs, numel)
        sent = {}
        for name in EXACT:
            res = get_collective(name)(*inputs[rank], numel, group=group)
            assert res.dense.dtype == dtype and res.dense.shape == (numel,)
            err = (res.dense.double() - ref).abs().max().item() if numel else 0.0
            scale = ref.abs().max().item() + 1.0
            assert err <= TOL[dtype] * scale * world, (name, seed, err)
            sent[name] = res.bytes_sent
        # DSAR sends a part dense only when that takes fewer bytes than sparse; where every
        # rank's input is denser than the break-even (seed 2: 40 of 64, float32 and int32
        # against 1/2), it does, so it sends strictly less (a DSAR that never switched sent
        # the split-allgather's bytes and passed).
        assert sent["dsar"] <= sent["ssar_split"], (seed, sent)
        if seed == 2:
            assert sent["dsar"] < sent["ssar_split"], sent
        out["exact"].append(sent)

    # Every rank holds the same 20 indices (values differ): a range receives enough entries to
    # pass DSAR's break-even, but their sum has few non-zeros, so DSAR sums it in a dense
    # accumulator and sends it sparse, or dense where that is smaller.
    numel = 64
    shared = torch.randperm(numel, generator=torch.Generator().manual_seed(7))[:20]
    shared = shared.sort().values.to(torch.int32)
    inputs = [
        (shared, torch.randn(20, generator=torch.Generator().manual_seed(70 + r)))
        for r in range(world)
    ]
    ref = dense_sum(inputs, numel)
    sent = {}
    for name in EXACT:
        res = get_collective(name)(*inputs[rank], numel, group=group)
        err = (res.dense.double() - ref).abs().max().item()
        assert err <= TOL[torch.float32] * (ref.abs().max().item() + 1.0) * world, (name, err)
        sent[name] = res.bytes_sent
    assert sent["dsar"] <= sent["ssar_split"], sent
    out["exact"].append(sent)

    # gTop-k: one process computes the reference from the same seeds.
    for seed, numel, count in [(11, 300, 12), (12, 50, 30), (13, 40, 0)]:
        inputs = [
            random_input(seed, r, numel, count if r else count // 2, torch.float64)
            for r in range(world)
        ]
        res = get_collective("gtopk")(*inputs[rank], numel, group=group)
        out["gtopk"].append((seed, numel, count, res.indices, res.values))

    # Ok-Topk over training-like steps with repartitioning and threshold reuse.
    coll = get_collective("oktopk", repartition_every=3, threshold_every=2)
    restored = None
    for step in range(OK_STEPS):
        inp = training_like(step, rank, OK_NUMEL, OK_K)
        res = coll(*inp, OK_NUMEL, key="w", group=group)
        out["oktopk"].append((res.indices, res.values, coll.stats()["w"]))
        if restored is not None:
            # Restored from the state before a call that reuses both the saved threshold and
            # the saved region edges (step 7: neither a multiple of 2 nor of 3): the same
            # selection, threshold, regions and traffic as the original's.
            again = restored(*inp, OK_NUMEL, key="w", group=group)
            assert not coll.stats()["w"]["estimated"] and step % 3 != 0
            assert torch.equal(again.indices, res.indices)
            assert torch.equal(again.values, res.values)
            assert restored.stats() == coll.stats()
        if step == OK_STEPS - 2:
            restored = get_collective("oktopk", repartition_every=3, threshold_every=2)
            restored.load_state_dict(coll.state_dict())
    # A copy restored from the state continues exactly like the original (the next call both
    # reuses and re-estimates nothing different: same step counter, edges and threshold).
    fresh = get_collective("oktopk", repartition_every=3, threshold_every=2)
    fresh.load_state_dict(coll.state_dict())
    assert fresh.state_dict() == coll.state_dict()
    nxt = training_like(OK_STEPS + 1, rank, OK_NUMEL, OK_K)
    c = coll(*nxt, OK_NUMEL, key="w", group=group)
    d = fresh(*nxt, OK_NUMEL, key="w", group=group)
    assert torch.equal(c.indices, d.indices) and torch.equal(c.values, d.values)
    # Gradients shrink 100x on a call that would reuse the threshold: it is re-estimated at
    # once instead of keeping almost nothing.
    assert coll.stats()["w"]["step"] % 2 == 0  # so the next call is a reuse call
    small = [
        (i, v * 0.01)
        for i, v in (training_like(OK_STEPS + 1, r, OK_NUMEL, OK_K) for r in range(world))
    ]
    res = coll(*small[rank], OK_NUMEL, key="w", group=group)
    stats = coll.stats()["w"]
    assert stats["estimated"] and OK_K <= stats["selected"] <= OK_K + threshold_tolerance(OK_K)
    ri, _ = oktopk_reference(small, OK_NUMEL, stats["threshold"])
    assert torch.equal(res.indices.long(), ri)

    # The balance step (equal shares before the allgather) runs only when some rank kept more
    # than 1.1 times an equal share: here the large values all lie in the first eighth of the
    # vector, so the first region keeps nearly everything; with uniform values (and k large
    # enough that the regions' counts differ by chance by much less than a tenth) it is
    # skipped. The selection is the definition's either way.
    out["oktopk_balance"] = []
    n_b, k_b = 200_000, 20_000
    for skewed in (True, False):
        inputs = []
        for r in range(world):
            i, v = random_input(40 + r, 0, n_b, k_b, torch.float64)
            if skewed:
                v = torch.where(i < n_b // 8, v * 100, v)
            inputs.append((i, v))
        coll = get_collective("oktopk")
        res = coll(*inputs[rank], n_b, key="b", group=group)
        st = coll.stats()["b"]
        ri, rv = oktopk_reference(inputs, n_b, st["threshold"])
        out["oktopk_balance"].append(
            (
                st["rebalanced"],
                torch.equal(res.indices.long(), ri) and torch.allclose(res.values, rv),
            )
        )

    # Gradients that shrink by 15% a call, with the threshold estimated only on the first
    # call: the reused threshold follows them (corrected from each call's counts), so every
    # call keeps between k/2 and 2k without a second estimation.
    drifting = get_collective("oktopk", threshold_every=100)
    out["oktopk_drift"] = []
    for step in range(8):
        i, v = training_like(step, rank, OK_NUMEL, OK_K)
        drifting(i, v * 0.85**step, OK_NUMEL, key="d", group=group)
        st = drifting.stats()["d"]
        out["oktopk_drift"].append((st["estimated"], st["selected"]))

    # int32 indices of a vector longer than 2**31 elements: no wrap-around anywhere.
    big = 2**31
    i32 = torch.tensor([5, big - 1], dtype=torch.int32)
    v64 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out["big"] = [
        (r.indices.long().tolist(), r.values.tolist())
        for r in (get_collective(n)(i32, v64, big, group=group) for n in ("oktopk", "gtopk"))
    ]
    # gTop-k never makes room for more entries than the vector holds.
    out["gtopk_cap"] = get_collective("gtopk", k=10**6)(i32[:1], v64[:1], 10, group=group)
    # k = 1 (a small layer at low density): a reused threshold that keeps nothing after the
    # gradient shrinks is re-estimated at once, as for any k (it keeps fewer than k/2).
    coll = get_collective("oktopk")
    out["oktopk_k1"] = []
    for scale in (10.0, 1.0, 1.0):
        res = coll(torch.tensor([3]), torch.tensor([scale]), 10, group=group, key="k1")
        out["oktopk_k1"].append(res.indices.tolist())

    # Bad input: a clear error on every rank, and the group still works afterwards.
    idx, val = random_input(20, rank, 100, 5, torch.float32)
    stateful = get_collective("oktopk")
    stateful(idx, val, 100, key="s", group=group)
    if rank == 0:
        stateful.load_state_dict({"keys": {}})  # only one rank restarts its state
    with_inf = val.clone()
    with_nan = val.clone()
    if rank == 0:
        with_inf[0] = float("inf")
        with_nan[1] = float("nan")
    reusing = get_collective("oktopk", threshold_every=8)
    reusing(idx, val, 100, key="r", group=group)  # estimates; the next call reuses
    # On a call that reuses its region edges, the agreement also carries the sizes of the
    # split (one round fewer): bad input there must still fail on every rank, and so must a
    # rank whose saved state is for a vector of another length (it would split afresh while
    # the others do not).
    shorter = get_collective("oktopk")
    shorter(*random_input(20, rank, 50, 5, torch.float32), 50, key="m", group=group)
    lengths = get_collective("oktopk")
    lengths(idx, val, 100, key="m", group=group)
    if rank == 0:
        lengths.load_state_dict(shorter.state_dict())
    cases = {
        "allgather_numel": lambda: get_collective("allgather")(idx, val, 100 + rank, group=group),
        "allgather_dtype": lambda: get_collective("allgather")(
            idx.to(torch.int32) if rank == 0 else idx, val, 100, group=group
        ),
        "allgather_2d": lambda: get_collective("allgather")(
            idx, val.view(1, -1) if rank == world - 1 else val, 100, group=group
        ),
        "numel_zero": lambda: get_collective("ssar_rd")(
            idx, val, 0 if rank == 1 else 100, group=group
        ),  # fmt: skip
        "not_tensor": lambda: get_collective("oktopk")(
            idx.tolist() if rank == 0 else idx, val, 100, group=group
        ),
        # The split collectives split their input before the agreement: one rank's input
        # that cannot be split (not tensors, a numel that is no int) still reaches every rank.
        **{
            f"not_tensor_{name}": lambda name=name: get_collective(name)(
                idx.tolist() if rank == 0 else idx, val, 100, group=group
            )
            for name in ("ssar_split", "dsar")
        },
        **{
            f"numel_str_{name}": lambda name=name: get_collective(name)(
                idx, val, "100" if rank == 1 else 100, group=group
            )
            for name in ("ssar_split", "dsar")
        },
        "gtopk_k": lambda: get_collective("gtopk", k=5 + rank)(idx, val, 100, group=group),
        "oktopk_options": lambda: get_collective("oktopk", repartition_every=2 + rank)(
            idx, val, 100, group=group
        ),
        "oktopk_residuals": lambda: get_collective(
            "oktopk", residuals="owner" if rank == 1 else "local"
        )(idx, val, 100, group=group),
        "oktopk_state": lambda: stateful(idx, val, 100, key="s", group=group),
        "oktopk_inf": lambda: get_collective("oktopk")(idx, with_inf, 100, group=group),
        # gTop-k passed them through: a NaN took a slot of the selection on every rank.
        "gtopk_inf": lambda: get_collective("gtopk")(idx, with_inf, 100, group=group),
        "gtopk_nan": lambda: get_collective("gtopk")(idx, with_nan, 100, group=group),
        "oktopk_nan_reused": lambda: reusing(idx, with_nan, 100, key="r", group=group),
        "oktopk_range_reused": lambda: reusing(
            idx + (1000 if rank == world - 1 else 0), val, 100, key="r", group=group
        ),
        "oktopk_numel_reused": lambda: reusing(idx, val, 100 + rank, key="r", group=group),
        "oktopk_state_length": lambda: lengths(idx, val, 100, key="m", group=group),
        "numel": lambda: get_collective("ssar_rd")(idx, val, 100 + rank, group=group),
        "range": lambda: get_collective("oktopk")(
            idx + (1000 if rank == world - 1 else 0), val, 100, group=group
        ),
        "dtype": lambda: get_collective("gtopk")(idx, val.to(torch.int64), 100, group=group),
        "length": lambda: get_collective("dsar")(
            idx, val[:-1] if rank == 0 else val, 100, group=group
        ),
        # The split collectives split before their agreement (which carries the sizes):
        # a rank with bad input splits nothing, and every rank still gets the error.
        "split_range": lambda: get_collective("ssar_split")(
            idx + (1000 if rank == world - 1 else 0), val, 100, group=group
        ),
        "split_numel": lambda: get_collective("dsar")(idx, val, 100 + rank, group=group),
    }
    # Ranks reducing different tensors at once (here: keys "a" and "b" of the same length,
    # as a loop over a set of names gives on ranks with other hash seeds) or calling different
    # collectives: an error on every rank, not a sum of the wrong tensors.
    for name in ALL:
        cases[f"key_{name}"] = lambda name=name: get_collective(name)(
            idx, val, 100, key="a" if rank == 0 else "b", group=group
        )
    cases["split_vs_dsar"] = lambda: get_collective("ssar_split" if rank == 0 else "dsar")(
        idx, val, 100, group=group
    )
    # Any two point-to-point collectives: their first messages had other sizes (gloo aborted
    # the receiving process, or both waited until the timeout).
    for a, b in itertools.combinations(POINT_TO_POINT, 2):
        cases[f"mixed_{a}_{b}"] = lambda a=a, b=b: get_collective(a if rank == 0 else b)(
            idx, val, 100, group=group
        )
    # Tensors on a device no backend of the group moves (gloo: CPU and CUDA; "meta" stands in
    # for another accelerator's): an error on every rank, not a crash on one and a hang.
    for name in ALL:
        cases[f"meta_{name}"] = lambda name=name: get_collective(name)(
            *((idx.to("meta"), val.to("meta")) if rank == world - 1 else (idx, val)),
            100,
            group=group,
        )
    for case, call in cases.items():
        try:
            call()
            out["errors"][case] = None
        except (ValueError, TypeError, FloatingPointError) as e:
            out["errors"][case] = (type(e).__name__, str(e))
    res = get_collective("ssar_split")(idx, val, 100, group=group)
    inputs = [random_input(20, r, 100, 5, torch.float32) for r in range(world)]
    torch.testing.assert_close(res.dense.double(), dense_sum(inputs, 100), rtol=1e-5, atol=1e-5)

    return out


SIZES = (2, 3, 4, 5, 8)
SCATTERED = (1, 4, 6)  # a group whose ranks are neither contiguous nor a power of two


def _worker(rank: int, world: int, tree: bool) -> dict:
    """Spawned once on 8 ranks: each size runs on the group of the first ``size`` ranks (the
    default group for 8), so one spawn covers every world size. ``tree``: every world size
    exchanges few ints in log2 p rounds."""
    p2p.TREE_FROM = 2 if tree else 10**9
    out = {}
    for size in SIZES:
        group = None if size == world else dist.new_group(list(range(size)))
        if rank < size:
            out[size] = _cases(rank, size, group)
    sub = dist.new_group(list(SCATTERED))
    if rank in SCATTERED:
        inputs = [random_input(30, r, 300, 20, torch.float64) for r in range(len(SCATTERED))]
        mine = inputs[SCATTERED.index(rank)]
        for name in EXACT:
            got = get_collective(name)(*mine, 300, group=sub).dense
            torch.testing.assert_close(got, dense_sum(inputs, 300))
        res = get_collective("gtopk")(*mine, 300, group=sub)
        ri, rv = gtopk_reference(inputs, 300, 20)
        assert torch.equal(res.indices.long(), ri)
        torch.testing.assert_close(res.values, rv)
        out["scattered"] = True
    return out


FORMS = ("direct", "tree")


@pytest.fixture(scope="module")
def by_form(tmp_path_factory):
    """Every rank's results, from one spawn of 8 gloo ranks for each form of the few-int
    exchanges."""
    return {
        form: oks(
            run_world(_worker, 8, tmp_path_factory.mktemp("sparse"), form == "tree", timeout=300)
        )
        for form in FORMS
    }


@pytest.mark.parametrize("form", FORMS)
def test_scattered_group_addresses_peers_by_global_rank(form, by_form):
    assert all(by_form[form][r].get("scattered") for r in SCATTERED)


@pytest.mark.parametrize("world", SIZES)
def test_both_forms_of_the_few_int_exchanges_give_the_same_selections(world, by_form):
    """The form of the agreement and count gathers changes messages, not results: Ok-Topk's
    thresholds and selections, gTop-k's selections and every error are the same."""
    direct, tree = ([by_form[f][r][world] for r in range(world)] for f in FORMS)
    for a, b in zip(direct, tree):
        for (ia, va, sa), (ib, vb, sb) in zip(a["oktopk"], b["oktopk"]):
            assert torch.equal(ia, ib) and torch.equal(va, vb)
            assert sa["threshold"] == sb["threshold"]
        for ga, gb in zip(a["gtopk"], b["gtopk"]):
            assert torch.equal(ga[3], gb[3]) and torch.equal(ga[4], gb[4])
        assert a["errors"] == b["errors"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("world", SIZES)
def test_sparse_collectives(world, form, by_form):
    """Exact algorithms equal the dense sum (checked on the ranks); gTop-k and Ok-Topk equal
    their definitions; Ok-Topk sends under 6k elements; bad input fails on every rank."""
    results = [by_form[form][r][world] for r in range(world)]

    # The allgather pads every rank's payload to the largest one, and the padding is charged:
    # the ring allgather formula, (p-1)/p * B, over B = the size headers (p ranks' 9 int64s,
    # the header's fixed width: its own width, the tensor count, the gather's error flag, two
    # byte lengths, and the collective's error flag, numel and two codes naming the call: the
    # dtypes with the collective, and the key) plus p payloads
    # of the largest count. In case 3 rank 1 sends no entries and still pays for the widest.
    seed, numel, count, dtype, idx_dtype = EXACT_CASES[2]
    assert seed == 3 and count(1) == 0
    widest = max(count(r) for r in range(world)) * (idx_dtype.itemsize + dtype.itemsize)
    padded = round((world - 1) / world * (world * 9 * 8 + world * widest))
    assert padded == (world - 1) * (72 + 12 * max(30 + r for r in range(world) if r != 1))
    for r in range(world):
        assert results[r]["exact"][2]["allgather"] == padded, (r, results[r]["exact"][2])

    # gTop-k: the tree-merge definition, identical on every rank.
    for case in range(len(results[0]["gtopk"])):
        seed, numel, count, _, _ = results[0]["gtopk"][case]
        inputs = [
            random_input(seed, r, numel, count if r else count // 2, torch.float64)
            for r in range(world)
        ]
        k = max(i.numel() for i, _ in inputs)
        ri, rv = gtopk_reference(inputs, numel, k)
        for r in range(world):
            _, _, _, idx, val = results[r]["gtopk"][case]
            assert torch.equal(idx.long(), ri), (r, seed)
            torch.testing.assert_close(val, rv, rtol=1e-12, atol=1e-12)

    # Ok-Topk: the set {union entries with |sum| >= threshold used}, exact sums, same on all
    # ranks; about k of them on calls that estimate the threshold; under 6k elements sent.
    for step in range(OK_STEPS):
        inputs = [training_like(step, r, OK_NUMEL, OK_K) for r in range(world)]
        idx0, val0, stats0 = results[0]["oktopk"][step]
        ri, rv = oktopk_reference(inputs, OK_NUMEL, stats0["threshold"])
        assert torch.equal(idx0.long(), ri), step
        torch.testing.assert_close(val0, rv, rtol=1e-12, atol=1e-12)
        assert stats0["estimated"] == (step % 2 == 0)  # every threshold_every=2 calls
        if stats0["estimated"]:
            assert OK_K <= ri.numel() <= OK_K + threshold_tolerance(OK_K), (step, ri.numel())
        # Independently of the threshold the call reports: the selection is the exact global
        # top-m of the summed vector (m = its size), so on estimating calls it holds the top k.
        top = torch.topk(dense_sum(inputs, OK_NUMEL).abs(), ri.numel()).indices
        assert torch.equal(idx0.long(), top.sort().values), step
        for r in range(world):
            idx, val, stats = results[r]["oktopk"][step]
            assert torch.equal(idx, idx0) and torch.equal(val, val0)
            assert stats["threshold"] == stats0["threshold"]
            assert stats["elems_sent"] < 6 * OK_K, (r, step, stats)
    assert results[0]["oktopk_balance"] == [(world > 1, True), (False, True)]
    # A reused threshold follows drifting gradients: estimated once, then always in the band.
    drift = results[0]["oktopk_drift"]
    assert [e for e, _ in drift] == [True] + [False] * 7, drift
    assert all(OK_K <= 2 * n <= 4 * OK_K for _, n in drift), drift
    # The overlap is heavy: the union of the ranks' supports is far below world * k, so an
    # allgather would send (p-1) k pairs for what Ok-Topk reduces to about k.
    union = union_support([training_like(0, r, OK_NUMEL, OK_K) for r in range(world)], OK_NUMEL)
    assert int(union.sum()) < world * OK_K

    # Bad input raises on every rank (none hangs), naming what was wrong.
    for r in range(world):
        errs = results[r]["errors"]
        assert errs["numel"][0] == "ValueError" and "numel differs" in errs["numel"][1]
        assert errs["dtype"][0] == "TypeError" and "floating-point" in errs["dtype"][1]
        if r == world - 1:
            assert "indices must lie in [0, numel=100)" in errs["range"][1]
        else:
            assert errs["range"][0] == "ValueError" and "another rank" in errs["range"][1]
        if r == 0:
            assert "values has 4" in errs["length"][1]
        else:
            assert "another rank" in errs["length"][1]
        for name in ALL:
            kind, text = errs[f"meta_{name}"]
            assert kind == "ValueError", (name, text)
            if r == world - 1:
                assert "on meta, but the collective runs on cpu" in text, (name, text)
                assert "no backend of the process group moves meta memory" in text, (name, text)
            else:
                assert "another rank" in text, (name, text)
        for name in ALL:
            kind, text = errs[f"key_{name}"]
            assert kind == "ValueError", (name, text)
            assert f"call {name!r} with different keys (this rank: {'a' if r == 0 else 'b'!r})" in (
                text
            ), (name, text)
        mine = "ssar_split" if r == 0 else "dsar"
        assert f"call different collectives here (this rank: {mine!r})" in errs["split_vs_dsar"][1]
        for a, b in itertools.combinations(POINT_TO_POINT, 2):
            mine = a if r == 0 else b
            text = errs[f"mixed_{a}_{b}"][1]
            assert f"call different collectives here (this rank: {mine!r})" in text, (a, b, text)
        # The allgather baseline checks as the others do, in its size header.
        assert "numel differs" in errs["allgather_numel"][1]
        assert "dtypes differ" in errs["allgather_dtype"][1]
        words = "must be 1-D" if r == world - 1 else "another rank"
        assert words in errs["allgather_2d"][1]
        # Errors that one rank finds in its own arguments still reach every rank.
        words = "numel must be a positive int" if r == 1 else "another rank"
        assert words in errs["numel_zero"][1]
        assert errs["not_tensor"][0] == ("TypeError" if r == 0 else "ValueError")
        assert ("must be tensors" if r == 0 else "another rank") in errs["not_tensor"][1]
        for name in ("ssar_split", "dsar"):
            kind, text = errs[f"not_tensor_{name}"]
            assert kind == ("TypeError" if r == 0 else "ValueError"), (name, text)
            assert ("must be tensors" if r == 0 else "another rank") in text, (name, text)
            kind, text = errs[f"numel_str_{name}"]
            assert kind == "ValueError", (name, text)
            words = "numel must be a positive int" if r == 1 else "another rank"
            assert words in text, (name, text)
        # Options or state that differ across ranks: an error everywhere, not a hang or a
        # silently different k.
        assert "differ in k (between 5 and" in errs["gtopk_k"][1]
        assert "differ in repartition_every" in errs["oktopk_options"][1]
        assert "differ in residuals" in errs["oktopk_residuals"][1]
        assert "differ in the per-key step" in errs["oktopk_state"][1]
        assert errs["oktopk_inf"][0] == "FloatingPointError"
        assert "Inf or NaN" in errs["oktopk_inf"][1]
        for case in ("gtopk_inf", "gtopk_nan"):
            assert errs[case][0] == "FloatingPointError", (case, errs[case])
            assert "gtopk: the selected sums hold Inf or NaN" in errs[case][1]
        assert errs["oktopk_nan_reused"][0] == "FloatingPointError"  # on a reuse step too
        if r == world - 1:
            assert "indices must lie in [0, numel=100)" in errs["oktopk_range_reused"][1]
        else:
            assert "another rank" in errs["oktopk_range_reused"][1]
        assert "numel differs" in errs["oktopk_numel_reused"][1]
        if r == world - 1:
            assert "indices must lie in [0, numel=100)" in errs["split_range"][1]
        else:
            assert "another rank" in errs["split_range"][1]
        assert "numel differs" in errs["split_numel"][1]
        assert (
            "differ in the length of the vector the saved state is for (between 50 and 100)"
            in (errs["oktopk_state_length"][1])
        )
        for n, (idx, val) in zip(("oktopk", "gtopk"), results[r]["big"]):
            assert idx == [5, 2**31 - 1] and val == [world * 1.0, world * 2.0], n
        assert results[r]["gtopk_cap"].bytes_sent < 1000
        assert results[r]["oktopk_k1"] == [[3], [3], [3]]


def _few_ints(rank: int, world: int) -> dict:
    """The two forms of the agreement and of a gather of ints, side by side, with the
    messages each sends counted."""
    sent = []
    exchange = p2p.Wire.exchange

    def counting(self, sends, *args, **kwargs):
        sent.append(sum(1 for b in sends.values() if b.numel()))
        return exchange(self, sends, *args, **kwargs)

    p2p.Wire.exchange = counting
    idx, val = torch.tensor([rank]), torch.tensor([1.0])
    tell = {q: 100 * rank + q for q in range(world) if q != rank}
    out = {}
    for form, tree_from in (("direct", 10**9), ("tree", 2)):
        p2p.TREE_FROM = tree_from
        wire = p2p.Wire(None, torch.device("cpu"))
        sent.clear()
        out[form] = {
            "gather": wire.allgather_ints([rank, -rank, 7]),
            "agree": wire.agree(idx, val, 10, options={"o": 3}, tell=tell),
        }
        out[form]["messages"] = list(sent)
        # Small allreduces (Ok-Topk's histograms, maxima and votes): sums of ints, maxima,
        # and a float sum, whose bits must be the same on every rank.
        wire = p2p.Wire(None, torch.device("cpu"))
        sent.clear()
        ints = wire.allreduce(torch.tensor([rank, 1, -rank], dtype=torch.int64))
        out[form]["allreduce_messages"] = sum(sent)
        top = wire.allreduce(torch.tensor([rank, -rank], dtype=torch.float64), dist.ReduceOp.MAX)
        floats = wire.allreduce(torch.tensor([0.1 * (rank + 1), 1e16, -1e16], dtype=torch.float64))
        # Maxima of -0.0 and +0.0 (ranks alternate): torch.maximum's answer depends on the
        # order of its operands, and every rank must still get the same sign.
        signs = torch.tensor([-0.0 if rank % 2 else 0.0, 0.0 if rank % 2 else -0.0])
        zeros = wire.allreduce(signs, dist.ReduceOp.MAX)
        out[form]["allreduce"] = (
            ints.tolist(),
            top.tolist(),
            floats.tolist(),
            torch.signbit(zeros).tolist(),
        )
        # The bytes each sends, for the cost model: with and without per-peer ints (the same),
        # a gather.
        out[form]["bytes"] = []
        for call in (
            lambda w: w.agree(idx, val, 10, options={"o": 3}, tell=tell),
            lambda w: w.agree(idx, val, 10, options={"o": 3}),
            lambda w: w.allgather_ints([rank, -rank, 7]),
        ):
            wire = p2p.Wire(None, torch.device("cpu"))
            call(wire)
            out[form]["bytes"].append(wire.traffic.bytes_sent)
        # Options that differ on one rank: an error on every rank, naming the range.
        try:
            wire.agree(idx, val, 10, options={"o": 3 + (rank == world - 1)})
            out[form]["differ"] = None
        except ValueError as e:
            out[form]["differ"] = str(e)
    return out


@pytest.mark.parametrize("world", (3, 6, 8))
def test_few_int_exchanges_take_log2_p_rounds_in_the_tree_form(world, tmp_path):
    """The tree form gathers every rank's ints and delivers every peer's per-peer int as the
    direct form does, in ceil(log2 p) messages a rank instead of p - 1 each."""
    results = oks(run_world(_few_ints, world, tmp_path))
    rounds = (world - 1).bit_length()
    for rank, res in enumerate(results):
        for form in ("direct", "tree"):
            got = res[form]
            assert got["gather"] == [[q, -q, 7] for q in range(world)], (rank, form)
            k, heard = got["agree"]
            assert k == 1 and heard == {q: 100 * q + rank for q in range(world) if q != rank}
            assert "differ in o (between 3 and 4)" in got["differ"], (rank, form)
        assert results[rank]["direct"]["messages"] == [world - 1] * 2, rank
        assert results[rank]["tree"]["messages"] == [1] * (2 * rounds), rank
        for form in ("direct", "tree"):
            ints, top, floats, signs = res[form]["allreduce"]
            total = sum(range(world))
            assert ints == [total, world, -total] and top == [world - 1, 0], (rank, form)
            assert floats == results[0][form]["allreduce"][2], (rank, form)  # same bits
            assert signs == results[0][form]["allreduce"][3], (rank, form)
            assert floats[0] == pytest.approx(0.1 * world * (world + 1) / 2)
        # Recursive doubling: a message a bit of the largest power of two in p, and one more
        # for a rank that folds or unfolds (the library's ring sends none of ours).
        core = 1 << (world.bit_length() - 1)
        assert results[rank]["direct"]["allreduce_messages"] == 0
        assert 1 <= results[rank]["tree"]["allreduce_messages"] <= core.bit_length(), rank
    # The cost model counts the bytes the tree form sends (the direct form's are left out).
    from sparsetrain import perfmodel as pm

    saved, p2p.TREE_FROM = p2p.TREE_FROM, 2
    try:
        agreement = pm._agreement(world).bytes
        modelled = [agreement, agreement, pm._gather_ints(world, 3).bytes]
    finally:
        p2p.TREE_FROM = saved
    # With per-peer ints or without, the agreement sends the same: ranks that call different
    # collectives meet messages of one size.
    assert all(res["tree"]["bytes"] == modelled for res in results), modelled
    assert all(res["direct"]["bytes"][0] == res["direct"]["bytes"][1] for res in results)


def _rank_order(rank: int, world: int) -> list[float]:
    idx = torch.tensor([2, 0, 1])  # unique on each rank, not sorted
    values = torch.tensor(RANK_ORDER_VALUES[rank])[idx]
    return get_collective("allgather")(idx, values, 4).dense.tolist()


def test_allgather_adds_the_ranks_in_rank_order_on_every_rank(tmp_path):
    """float32 sums of 1e8, 1, -1e8 depend on the order: every rank adds in rank order, so all
    ranks hold the same bits (replicas that summed in their own orders would drift apart)."""
    assert oks(run_world(_rank_order, 3, tmp_path)) == [RANK_ORDER_SUM] * 3


def _run_all(rank: int, world: int) -> dict:
    """Every collective on a few steps of training-like inputs (Ok-Topk estimating and
    repartitioning on the way), with fresh collectives: each one's results and traffic."""
    out = {}
    for name in ALL:
        coll = get_collective(name)
        runs = []
        for step in range(3):
            res = coll(*training_like(step, rank, OK_NUMEL, OK_K), OK_NUMEL, key="w")
            runs.append(
                (
                    *(t.tolist() if t is not None else None for t in (res.dense, res.indices)),
                    res.values.tolist() if res.values is not None else None,
                    res.bytes_sent,
                    res.bytes_recv,
                )
            )
        out[name] = runs
    return out


def _staged(rank: int, world: int, tree: bool) -> dict:
    """The collectives with their point-to-point messages staged through host memory, as on a
    gloo group with CUDA tensors, against the same collectives unstaged."""
    p2p.TREE_FROM = 2 if tree else 10**9
    flags = {
        "cuda": p2p.Wire(None, torch.device("cuda", 0)).staged,
        "cpu": p2p.Wire(None, torch.device("cpu")).staged,
    }
    plain = _run_all(rank, world)
    init = p2p.Wire.__init__
    calls = []

    def staged_init(self, group, device, *call):
        init(self, group, device, *call)
        self.staged = True
        calls.append(1)

    # On CPU a copy "to host" or "to the device" would return the tensor itself: the test's
    # copies are clones, so it can check that the clones, not the originals, go on the wire,
    # and that what is received is copied back.
    to_host, to_device, post = p2p.Wire._to_host, p2p.Wire._to_device, p2p.dist.P2POp
    copies, host_ids, back, sent_ids = [], set(), [], []

    def counted(t):
        copies.append(t)
        clone = to_host(t).clone()
        host_ids.add(id(clone))
        return clone

    def copied_back(t, device):
        back.append(t)
        return to_device(t, device).clone()

    def recording(op, tensor, *args, **kwargs):
        if op is p2p.dist.isend:
            sent_ids.append(id(tensor))
        return post(op, tensor, *args, **kwargs)

    p2p.Wire.__init__ = staged_init
    p2p.Wire._to_host = staticmethod(counted)
    p2p.Wire._to_device = staticmethod(copied_back)
    p2p.dist.P2POp = recording
    try:
        staged = _run_all(rank, world)
        on_wire = bool(sent_ids) and all(i in host_ids for i in sent_ids)
        copied = len(back)
        # A block gathered by every peer is copied to host memory once, not once a peer.
        copies.clear()
        wire = p2p.Wire(None, torch.device("cpu"))
        block = torch.arange(5, dtype=torch.uint8) + rank
        got = wire.allgatherv(block, [5] * world, 5)
        gathered = [t.tolist() for t in got]
        block_copies = len(copies)
    finally:
        p2p.Wire.__init__ = init
        p2p.Wire._to_host = staticmethod(to_host)
        p2p.Wire._to_device = staticmethod(to_device)
        p2p.dist.P2POp = post
    return {
        "flags": flags,
        "same": plain == staged,
        "host_copies_on_wire": on_wire,
        "copied_back": copied,
        "staged_calls": len(calls),
        "gathered": gathered,
        "block_copies": block_copies,
    }


@pytest.mark.parametrize("tree", (False, True), ids=("direct", "tree"))
def test_messages_staged_through_host_memory_give_the_same_results(tree, tmp_path):
    """gloo's send and receive take host memory only; CUDA tensors on a gloo group are staged
    (on a GPU host tests/distributed/test_cuda.py runs them on CUDA tensors)."""
    for res in oks(run_world(_staged, 3, tmp_path, tree)):
        assert res["flags"] == {"cuda": True, "cpu": False}
        # Every call but the allgather baseline's (gloo's own all_gather) has a Wire.
        assert res["staged_calls"] >= (len(ALL) - 1) * 3
        assert res["same"]
        assert res["host_copies_on_wire"]  # every send posted the host copy
        assert res["copied_back"] > 0  # and what came in went back to the device
        assert res["gathered"] == [[r + j for j in range(5)] for r in range(3)]
        assert res["block_copies"] == 1


def test_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="repartition_every must be a positive int"):
        get_collective("oktopk", repartition_every=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        get_collective("gtopk", k=-3)
    with pytest.raises(ValueError, match="residuals must be one of 'local', 'owner', got 'own'"):
        get_collective("oktopk", residuals="own")
    # Past int64, which the ranks' agreement packs them in (they had failed there, in a worker)
    for name, option in (("oktopk", "k"), ("oktopk", "threshold_every"), ("gtopk", "k")):
        with pytest.raises(ValueError, match=f"{option} must be a positive int below 2\\*\\*63"):
            get_collective(name, **{option: 2**63})
        assert getattr(get_collective(name, **{option: 2**63 - 1}), option) == 2**63 - 1
    # NumPy integers, as numel takes them (k had been refused), kept as ints
    import numpy as np

    assert get_collective("gtopk", k=np.int64(5)).k == 5
    ok = get_collective("oktopk", k=np.int64(5), threshold_every=np.int32(3))
    assert (type(ok.k), type(ok.threshold_every)) == (int, int)


def test_without_a_process_group_a_launched_process_is_told_to_start_one(monkeypatch):
    # One process alone is a world of one (tests/unit/test_collective_reference.py); one that
    # torchrun launched as one of several must not train alone without a word.
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    result = get_collective("ssar_rd")(torch.tensor([0]), torch.tensor([1.0]), 4)
    assert result.dense.tolist() == [1.0, 0.0, 0.0, 0.0] and result.bytes_sent == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=4 .* call torch.distributed.init_proc"):
        get_collective("ssar_rd")(torch.tensor([0]), torch.tensor([1.0]), 4)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=4 .* each process would train alone"):
        sparsetrain.GradientSync(torch.nn.Linear(3, 2), "topk", density=0.5)


def _gather_dtypes(rank: int, world: int) -> dict:
    from sparsetrain.comm import all_gather_variable

    torch.set_num_threads(1)
    same = all_gather_variable([torch.arange(rank + 1, dtype=torch.int32), torch.ones(2)])[0]
    dtype = torch.float16 if rank == 1 else torch.float32  # rank 1 sends half the bytes
    try:
        all_gather_variable([torch.ones(3, dtype=dtype)])
    except TypeError as e:
        return {"same": [[t.tolist() for t in row] for row in same], "error": str(e)}
    return {"error": None}


def test_all_gather_variable_refuses_other_dtypes_on_every_rank(tmp_path):
    """Another rank's bytes were read as this rank's dtype: every rank now raises, naming the
    ranks whose dtypes differ; gathers whose dtypes agree are unchanged."""
    results = oks(run_world(_gather_dtypes, 2, tmp_path))
    for rank, res in enumerate(results):
        assert res["error"] and "gather tensors of other dtypes" in res["error"], res
        assert f"rank(s) [{1 - rank}]" in res["error"], res
        assert res["same"] == [[[0], [1.0, 1.0]], [[0, 1], [1.0, 1.0]]], res


def _errors_of(call, cases: dict) -> dict:
    """For each case's tensors, the error ``call`` raised on them ("Type: message"), or None."""
    errors = {}
    for name, tensors in cases.items():
        try:
            call(tensors)
            errors[name] = None
        except (TypeError, ValueError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def _gather_disagreements(rank: int, world: int) -> dict:
    from sparsetrain.comm import all_gather_variable

    torch.set_num_threads(1)
    cases = {
        # rank 1 passes one tensor more: the size headers of the old layout differed in length
        "count": [torch.ones(2)] * (2 + (rank == 1)),
        "shape": [torch.ones(2, 2) if rank == 0 else torch.ones(4)],
        "empty": [] if rank == 2 else [torch.ones(1)],
        "not_tensors": [1.0] if rank == 1 else [torch.ones(1)],
        "sparse_layout": [torch.ones(4).to_sparse() if rank == 0 else torch.ones(4)],
    }
    errors = _errors_of(all_gather_variable, cases)
    # A header wider than the first round's 9 slots (nine tensors: nine lengths, nine dtypes)
    # on every rank, then on one rank only, whose width the others learn in the first round.
    wide = all_gather_variable([torch.full((rank + j,), float(j)) for j in range(9)])[0]
    try:
        all_gather_variable([torch.ones(1)] * (9 if rank == 0 else 1))
        errors["wide_count"] = None
    except ValueError as e:
        errors["wide_count"] = str(e)
    after = all_gather_variable([torch.tensor([float(rank)])])[0]
    return {
        "errors": errors,
        "wide": [[t.tolist() for t in row] for row in wide],
        "after": [row[0].tolist() for row in after],
    }


def test_all_gather_variable_raises_on_every_rank_when_the_ranks_disagree(tmp_path):
    """A rank passing another number of tensors, a bad shape, nothing, or no tensors made the
    other ranks wait (or gloo abort the process on size headers of different lengths): the
    header's first round now has the same size on every rank, so every rank raises, naming the
    rank at fault, and the group stays usable."""
    results = oks(run_world(_gather_disagreements, 3, tmp_path))
    for rank, res in enumerate(results):
        err = res["errors"]
        assert err["count"] == (
            "ValueError: the ranks pass different numbers of tensors to the gather "
            "([2, 3, 2], by rank); every rank passes the same number, with the same dtypes"
        ), res
        assert err["wide_count"].startswith("the ranks pass different numbers of tensors to "
                                            "the gather ([9, 1, 1], by rank)"), res  # fmt: skip
        own = {"shape": 0, "empty": 2, "not_tensors": 1, "sparse_layout": 0}
        for case, culprit in own.items():
            if rank == culprit:
                assert "invalid" not in err[case] and err[case], (case, res)
            else:
                assert err[case] == (
                    f"ValueError: the tensors rank(s) [{culprit}] passed to the gather are "
                    "invalid (see the error there); this rank's are fine"
                ), (case, res)
        if rank == 0:
            assert "must be 1-D, got shapes [(2, 2)]" in err["shape"], res
        assert res["wide"] == [[[float(j)] * (r + j) for j in range(9)] for r in range(3)]
        assert res["after"] == [[0.0], [1.0], [2.0]]


def _nothing_lost(rank: int, world: int) -> dict:
    """gTop-k's dropped partial sums, Ok-Topk's owners' dropped sums, and Ok-Topk's selections
    where k has room for all."""
    out: dict = {"gtopk": [], "oktopk": [], "oktopk_owner": [], "oktopk_local": []}
    for seed, numel, count in [(21, 60, 12), (22, 40, 30), (23, 500, 40)]:
        inputs = [random_input(seed, r, numel, count, torch.float64) for r in range(world)]
        for label, coll in [
            ("gtopk", get_collective("gtopk")),
            ("oktopk_owner", get_collective("oktopk", residuals="owner")),
        ]:
            res = coll(*inputs[rank], numel)
            mine = torch.zeros(numel, dtype=torch.float64)
            mine.index_add_(0, res.dropped[0].long(), res.dropped[1])
            dist.all_reduce(mine)  # every rank's dropped sums
            total = mine.index_add_(0, res.indices.long(), res.values)
            out[label].append(float((total - dense_sum(inputs, numel)).abs().max()))
        # The paper's residuals: the sync layer keeps each rank's values outside the selection.
        out["oktopk_local"].append(get_collective("oktopk")(*inputs[rank], numel).dropped)
    # Every index on every rank (k = numel), new values each call: the threshold that kept all
    # of them is reused, and a positive one dropped the smaller entries of the next calls.
    coll = get_collective("oktopk", threshold_every=32)
    for step in range(6):
        inputs = [
            (
                torch.arange(40),
                torch.randn(40, generator=torch.Generator().manual_seed(step * 10 + r)),
            )
            for r in range(world)
        ]
        res = coll(*inputs[rank], 40, key="w")
        got = torch.zeros(40, dtype=torch.float64).index_add_(0, res.indices, res.values.double())
        out["oktopk"].append(float((got - dense_sum(inputs, 40)).abs().max()))
    return out


@pytest.mark.parametrize("world", (3, 4, 5))
def test_what_a_selection_drops_is_kept_somewhere_and_room_for_all_keeps_all(world, tmp_path):
    """gTop-k: a contribution one merge dropped at an index that another branch still brought
    into the result was neither applied nor kept (2 ranks have one merge only, so 3 and up).
    Ok-Topk: with k at least the vector's length every entry is kept, as at density 1."""
    for res in oks(run_world(_nothing_lost, world, tmp_path)):
        assert max(res["gtopk"]) < 1e-12, res["gtopk"]
        assert max(res["oktopk"]) < 1e-5, res["oktopk"]
        # residuals="owner": the owners' sums below the threshold and the selection add up to
        # the inputs' sum.
        assert max(res["oktopk_owner"]) < 1e-12, res["oktopk_owner"]
        assert res["oktopk_local"] == [None] * 3


def _inputs_ranks_disagree_on(rank: int, world: int) -> dict:
    """Inputs and per-key states that only some ranks hold: each must fail on every rank."""
    out: dict = {}

    def attempt(case: str, call) -> None:
        try:
            call()
            out[case] = "ok"
        except Exception as e:  # noqa: BLE001  (the message is the result)
            out[case] = f"{type(e).__name__}: {e}"

    idx, val = torch.tensor([1, 4, 7]), torch.tensor([1.0, 2.0, 3.0])
    # A sparse-layout tensor on rank 1 passed the checks and failed there alone.
    sparse_val = val.to_sparse() if rank == 1 else val
    sparse_idx = idx.to_sparse() if rank == 1 else idx
    for name in ("ssar_rd", "dsar", "oktopk", "gtopk"):
        attempt(f"{name}, sparse values", lambda n=name: get_collective(n)(idx, sparse_val, 10))
        attempt(f"{name}, sparse indices", lambda n=name: get_collective(n)(sparse_idx, val, 10))
    # One key used by two groups: pairs (0, 1) and (2, 3) save different region edges for it,
    # then ranks 1 and 2 call it together (each with 5.0 at index 20: got index 20 twice).
    g01, g23, g12 = (dist.new_group(m) for m in ([0, 1], [2, 3], [1, 2]))
    coll = get_collective("oktopk")
    base = 8 if rank < 2 else 28
    coll(torch.arange(base, base + 4), torch.ones(4), 40, group=g01 if rank < 2 else g23, key="a")
    if rank in (1, 2):
        mine = torch.tensor([5, 20, 35]) if rank == 1 else torch.tensor([6, 20, 36])
        attempt("oktopk, a key of two groups", lambda: coll(mine, val, 40, group=g12, key="a"))
    # A state loaded with another threshold on one rank: each region owner applied its own.
    other = get_collective("oktopk")
    other(idx + rank, val, 40, key="b")
    state = other.state_dict()
    if rank == 1:
        state["keys"]["b"]["threshold"] *= 2
    other.load_state_dict(state)
    attempt("oktopk, another threshold loaded", lambda: other(idx + rank, val, 40, key="b"))
    # The edges are the mean of the ranks' index quantiles, summed in int64.
    attempt("oktopk, numel past 2**63 / p", lambda: coll(idx, val, 2**62, key="c"))
    # After all that, a call that every rank makes alike still works.
    attempt("ssar_rd, afterwards", lambda: get_collective("ssar_rd")(idx, val, 10))
    return out


def test_input_and_state_only_some_ranks_hold_fail_on_every_rank(tmp_path):
    """A sparse-layout tensor on one rank, one Ok-Topk key shared by two groups, or a state
    loaded differently on one rank: the other ranks waited until the timeout, or got a wrong
    selection with no error."""
    results = oks(run_world(_inputs_ranks_disagree_on, 4, tmp_path, timeout=150))
    for name in ("ssar_rd", "dsar", "oktopk", "gtopk"):
        for what in ("values", "indices"):
            case = f"{name}, sparse {what}"
            assert "dense (strided) tensors" in results[1][case], results[1][case]
            for r in (0, 2, 3):
                assert "another rank's indices or values are invalid" in results[r][case]
    for r in (1, 2):
        assert "the saved region edges" in results[r]["oktopk, a key of two groups"]
        assert (
            "give each group of ranks keys of its own" in results[r]["oktopk, a key of two groups"]
        )
    for r in range(4):
        assert "the saved threshold" in results[r]["oktopk, another threshold loaded"]
        assert (
            "numel must be at most (2**63 - 1) // p" in results[r]["oktopk, numel past 2**63 / p"]
        )
        assert results[r]["ssar_rd, afterwards"] == "ok"


def _outliers(rank: int, world: int) -> dict:
    out = {}
    for big in (1e9, 1e12, 1e30):
        values = 1 + torch.arange(100, dtype=torch.float64) / 100
        values[0] = big
        idx = torch.arange(100) if rank == 0 else torch.arange(0)
        coll = get_collective("oktopk", k=5, residuals="owner")
        res = coll(idx, values if rank == 0 else values[:0], 100)
        out[big] = (res.indices.numel(), coll.stats()[""]["threshold"])
    top = torch.tensor([torch.finfo(torch.float64).max, 1.0, 2.0], dtype=torch.float64)
    res = get_collective("oktopk", k=1)(
        torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([3]),
        top if rank == 0 else torch.tensor([5.0], dtype=torch.float64),
        10,
    )
    out["dbl_max"] = res.indices.tolist()
    return out


def test_a_few_far_larger_entries_do_not_make_oktopk_select_everything(tmp_path):
    """The threshold's histogram search zoomed six times into the first bin and ended at 0,
    which kept all 100 entries where k is 5 (a 1e12 outlier); the largest float64 made it
    NaN, which kept none."""
    for res in oks(run_world(_outliers, 2, tmp_path)):
        for big in (1e9, 1e12, 1e30):
            count, threshold = res[big]
            assert 5 <= count <= 10 and threshold > 1, (big, res[big])
        assert res["dbl_max"] == [0], res


def _uneven_regions(rank: int, world: int) -> dict:
    from sparsetrain.comm.oktopk import repartition

    numel = 100_000
    idx = {0: torch.arange(0, 10_000, 10), 1: torch.arange(90_000, 90_100, 10)}
    inputs = [idx[min(r, 1)] + r for r in range(world)]  # 1000 entries, then 10 and 10
    edges = repartition(p2p.Wire(None, torch.device("cpu")), inputs[rank], numel)
    union = torch.cat(inputs)
    counts = [int(((union >= a) & (union < b)).sum()) for a, b in zip(edges, edges[1:])]
    # Equal counts: the edges as the plain mean of the ranks' quantiles gives them.
    same = repartition(p2p.Wire(None, torch.device("cpu")), torch.arange(14_000) * 7 + rank, numel)
    return {"edges": edges, "counts": counts, "same": same}


def test_oktopk_regions_weigh_each_ranks_entries_by_their_number(tmp_path):
    """Each rank's quantiles had one vote whatever its count: a rank of 1000 entries next to
    two of 10 put all 1000 in one region (counts [1000, 0, 20]), for one owner to reduce."""
    results = oks(run_world(_uneven_regions, 3, tmp_path))
    assert all(r == results[0] for r in results)  # the same edges on every rank
    counts = results[0]["counts"]
    assert sum(counts) == 1020 and max(counts) <= 600, counts
    want = [sum(r + (j * 14_000 // 3) * 7 for r in range(3)) // 3 for j in (1, 2)]
    assert results[0]["same"] == [0, *want, 100_000]


def _clipped_ties(rank: int, world: int, ties: int) -> list:
    from sparsetrain.comm import get_collective

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    # every rank clipped at 1 the same `ties` of 3,000 positions (all positive there): their
    # sums tie at `world`, above every other sum; for k = 50, 300 are past 2k, 80 between k
    # and 2k
    grad = torch.randn(3000, generator=gen).clamp(-0.2, 0.2)
    grad[:ties] = 1.0
    coll = get_collective("oktopk", k=50, threshold_every=100)
    out = []
    for _ in range(3):
        res = coll(torch.arange(3000), grad, 3000)
        st = coll.stats()[""]
        out.append((res.indices.tolist(), st["estimated"], st["tied"], st["threshold"]))
    return out


@pytest.mark.parametrize("ties", [300, 80])
def test_oktopk_reuses_a_threshold_at_ties_on_every_rank(tmp_path, ties):
    """Ties that straddle the k-th magnitude: every rank tells them from a threshold that
    drifted (the count above it travels with the counts kept) and reuses it, where each call
    had estimated it afresh (ties keeping between k and 2k were not told at all)."""
    for calls in oks(run_world(_clipped_ties, 3, tmp_path, ties)):
        assert [c[1:] for c in calls] == [(True, True, 3.0)] + [(False, True, 3.0)] * 2
        assert all(c[0] == list(range(ties)) for c in calls)


def _allreduce_disagreements(rank: int, world: int) -> dict:
    from sparsetrain.comm import allreduce_max, allreduce_sum

    torch.set_num_threads(1)
    out, sent = allreduce_sum([torch.full((3,), float(rank)), torch.ones(2)])
    peak, _ = allreduce_max([torch.tensor([float(rank), -float(rank)])])
    cases = {
        # gloo aborted rank 1 ("Received data size doesn't match") and rank 0 got a wrong sum
        "size": [torch.ones(5 if rank == 0 else 3)],
        "count": [torch.ones(2)] * (1 + (rank == 1)),
        "dtype": [torch.ones(2, dtype=torch.float64 if rank == 1 else torch.float32)],
        "mixed": [
            torch.ones(2),
            torch.ones(2, dtype=torch.float64 if rank == 0 else torch.float32),
        ],
        # refused on rank 1 only: rank 0 had waited in the allreduce until the timeout
        "sparse": [torch.ones(2).to_sparse() if rank == 1 else torch.ones(2)],
        "meta": [torch.ones(2, device="meta" if rank == 1 else "cpu")],
    }
    errors = _errors_of(allreduce_sum, cases)
    return {"sum": [t.tolist() for t in out], "sent": sent, "max": peak[0].tolist(),
            "errors": errors}  # fmt: skip


def test_allreduce_sum_and_max_refuse_ranks_that_pass_other_tensors_on_every_rank(tmp_path):
    results = oks(run_world(_allreduce_disagreements, 2, tmp_path))
    for rank, res in enumerate(results):
        assert res["sum"] == [[1.0, 1.0, 1.0], [2.0, 2.0]]
        assert res["max"] == [1.0, 0.0]
        assert res["sent"] == 5 * 4 + 10 * 8  # ring: (p-1)/p * 2 * bytes; the check's 10 ints
        for name in ("size", "count", "dtype"):
            assert "the ranks pass different tensors" in res["errors"][name], (name, res)
        mixed = res["errors"]["mixed"]
        if rank == 0:
            assert mixed.startswith("TypeError: summable payload tensors must share one dtype")
        else:
            assert "another rank's tensors are refused (see its error)" in mixed
        sparse, meta = res["errors"]["sparse"], res["errors"]["meta"]
        if rank == 1:
            assert sparse.startswith("TypeError: allreduce_sum takes dense (torch.strided)")
            assert meta.startswith("ValueError: allreduce_sum takes tensors on one device that")
        else:
            assert "another rank's tensors are refused" in sparse and meta == sparse
