"""The DDP hook and GradientSync on real gloo ranks: equivalence, checkpoints, bad input."""

from __future__ import annotations

import math
import os
import pickle
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetrain
from tests.states import same

from .harness import oks, run_world

# Every compressor with a loss-less setting, and that setting.
LOSSLESS = [
    ("none", {}),
    ("fp16", {}),  # loss-less up to half precision: compared with a half-precision tolerance
    ("topk", {"density": 1.0}),
    ("threshold", {"density": 1.0}),
    ("randomk", {"density": 1.0}),
    ("powersgd", {"rank": 64}),
]


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)
    )


def _batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def _reference_grads(net: nn.Module, rank: int, world: int) -> torch.Tensor:
    ref = _net()
    ref.load_state_dict(net.state_dict())
    x, y = _batch(rank)
    nn.functional.cross_entropy(ref(x), y).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    dist.all_reduce(flat)
    return flat / world


def _equivalence(rank: int, world: int) -> dict:
    errors = {}
    for name, opts in LOSSLESS:
        for how in ("ddp", "gradient_sync"):
            torch.manual_seed(0)
            net = _net()
            x, y = _batch(rank)
            if how == "ddp":
                model = DDP(net)
                sparsetrain.register_ddp_hook(model, name, **opts)
                nn.functional.cross_entropy(model(x), y).backward()
            else:
                sync = sparsetrain.GradientSync(net, name, **opts)
                nn.functional.cross_entropy(net(x), y).backward()
                assert sync.synchronize()
            got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            errors[(name, how)] = float((got - _reference_grads(net, rank, world)).abs().max())
    return errors


def test_lossless_settings_equal_plain_ddp(tmp_path):
    for errs in oks(run_world(_equivalence, 3, tmp_path)):
        for (name, how), err in errs.items():
            tol = 2e-3 if name == "fp16" else 1e-5
            assert err <= tol, f"{name} via {how}: max |hook - DDP| = {err}"


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.spare = nn.Linear(5, 5)  # never used in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _find_unused(rank: int, world: int) -> dict:
    # DDP allreduces its map of used parameters during backward: the hook's exchanges must not
    # run on another thread then (they were paired with DDP's collective, and gloo aborted).
    out = {}
    for name, opts in (("none", {}), ("topk", {"density": 1.0}), ("threshold", {"density": 0.2})):
        grads = []
        for hooked in (False, True):
            torch.manual_seed(0)
            model = DDP(_WithUnused(), find_unused_parameters=True)
            if hooked:
                sparsetrain.register_ddp_hook(model, name, **opts)
            for step in range(3):
                x, y = _batch(rank, step)
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.module.net.parameters()]))
            assert model.module.spare.weight.grad is None
        out[name] = float((grads[0] - grads[1]).abs().max())
    return out


def test_hook_under_find_unused_parameters(tmp_path):
    for errs in oks(run_world(_find_unused, 2, tmp_path)):
        # Lossless settings equal plain DDP; the lossy threshold run had to finish on every rank.
        assert errs["none"] <= 1e-6 and errs["topk"] <= 1e-6, errs


# ---- checkpoint: 30 + 30 steps after a restart == 60 steps, bit for bit ----------------------
def _train(
    rank: int,
    world: int,
    path: str,
    start: int,
    stop: int,
    save_at: int | None,
    bucket_mb: float = 25.0,
    options: dict | None = None,
) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = _net()
    options = dict(options or {})
    static = options.pop("static_graph", False)
    model = DDP(net, bucket_cap_mb=bucket_mb, static_graph=static)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    state = sparsetrain.register_ddp_hook(
        model, "threshold", density=0.05, reestimate_every=7, **options
    )
    if start:
        ckpt = torch.load(f"{path}.{rank}", weights_only=False)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        state.load_state_dict(ckpt["hook"])
    for step in range(start, stop):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if save_at is not None and step + 1 == save_at:
            torch.save(
                {"model": net.state_dict(), "optim": opt.state_dict(), "hook": state.state_dict()},
                f"{path}.{rank}",
            )
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(
    "world, bucket_mb, options",
    [
        (2, 25.0, {}),  # one DDP bucket
        # Several buckets, which DDP regroups after its first step (and so again after the
        # restart): the resumed first step must exchange the groups the uninterrupted run did.
        (2, 0.001, {"collective": "oktopk"}),
        # static_graph: DDP rebuilds its buckets only before its third iteration.
        (2, 0.001, {"static_graph": True}),
        # A dense allreduce sums a bucket in an order that depends on its length (exact
        # anyway for 2 ranks: a + b == b + a), so the warm-up needs the same groups too.
        (3, 0.001, {"dense_warmup_steps": 40}),
    ],
    ids=["one-bucket", "buckets-oktopk", "buckets-static-graph", "buckets-dense-warmup"],
)
def test_checkpoint_resume_is_bit_exact(tmp_path, world, bucket_mb, options):
    path = str(tmp_path / "ckpt")
    straight = oks(run_world(_train, world, tmp_path, path, 0, 60, 30, bucket_mb, options))
    resumed = oks(run_world(_train, world, tmp_path, path, 30, 60, None, bucket_mb, options))
    for a_rank, b_rank in zip(straight, resumed):
        for a, b in zip(a_rank, b_rank):
            assert torch.equal(a, b), "resumed run differs from the uninterrupted one"


# ---- bad input: an error on every rank, never a hang ---------------------------------------
def _bad_input(rank: int, world: int) -> dict:
    out = {}
    # 1. options that differ across ranks
    try:
        sparsetrain.register_ddp_hook(DDP(_net()), "topk", density=0.01 if rank == 0 else 0.02)
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # 2. NaN in one rank's gradient, on_nonfinite="raise"
    for mode in ("raise", "skip"):
        torch.manual_seed(0)
        net = _net()
        model = DDP(net)
        state = sparsetrain.register_ddp_hook(model, "topk", density=0.1, on_nonfinite=mode)
        x, y = _batch(rank)
        if rank == 1:
            x[0, 0] = float("nan")
        try:
            nn.functional.cross_entropy(model(x), y).backward()
            out[mode] = {
                "skipped": state.skipped_last_step,
                "zero": all(bool((p.grad == 0).all()) for p in net.parameters()),
            }
        except Exception as e:  # noqa: BLE001
            out[mode] = str(e)
    # GradientSync with skip: every rank skips, and every gradient is zero (with small buckets
    # the Inf is in the last one, after the others were already averaged)
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(
        net, "threshold", density=0.1, on_nonfinite="skip", bucket_cap_mb=0.001
    )
    x, y = _batch(rank)
    nn.functional.cross_entropy(net(x), y).backward()
    assert sync.synchronize()  # a normal step first: residuals to keep
    before = {n: r.clone() for n, r in sync.engine.feedback.residuals.items()}
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    if rank == 0:
        next(net.parameters()).grad[0, 0] = float("inf")
    out["gs_skip"] = (sync.synchronize(), sync.stats()["skipped_steps"], len(sync.buckets) > 1)
    out["gs_zero"] = all(bool((p.grad == 0).all()) for p in net.parameters())
    # The buckets exchanged before the bad one committed residuals: the skip takes them back.
    after = sync.engine.feedback.residuals
    out["gs_residuals_kept"] = (
        len(before) > 0
        and before.keys() == after.keys()
        and all(torch.equal(before[n], after[n]) for n in before)
    )
    # The first step after a load exchanges the saved groups of parameters: an error there
    # (a NaN on rank 1) still reaches every rank, through every bucket's future.
    torch.manual_seed(0)
    model = DDP(_net(), bucket_cap_mb=0.001)
    state = sparsetrain.register_ddp_hook(model, "topk", density=0.1)
    for step in range(2):
        x, y = _batch(rank, step)
        nn.functional.cross_entropy(model(x), y).backward()
    saved = state.state_dict()
    out["groups"] = len(saved["ddp_groups"])
    model = DDP(_net(), bucket_cap_mb=0.001)
    state = sparsetrain.register_ddp_hook(model, "topk", density=0.1)
    try:
        state.load_state_dict({**saved, "ddp_groups": "w"})
        out["bad_groups"] = None
    except ValueError as e:
        out["bad_groups"] = str(e)
    state.load_state_dict(saved)
    x, y = _batch(rank)
    if rank == 1:
        x[0, 0] = float("nan")
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        out["regroup_nan"] = None
    except Exception as e:  # noqa: BLE001
        out["regroup_nan"] = str(e)
    # The threshold compressor checks finiteness in the pass that compensates (when it reuses
    # its threshold): a NaN there still raises on every rank, naming the rank and parameter,
    # while a gradient whose values are finite but whose sums overflow is no error.
    torch.manual_seed(0)
    net = _net()
    model = DDP(net)
    state = sparsetrain.register_ddp_hook(model, "threshold", density=0.3)
    for step in range(2):
        x, y = _batch(rank, step)
        if step == 1 and rank == 1:
            x[0, 0] = float("nan")
        try:
            nn.functional.cross_entropy(model(x), y).backward()
            out[f"threshold_nan_{step}"] = None
        except Exception as e:  # noqa: BLE001
            out[f"threshold_nan_{step}"] = str(e)
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(net, "threshold", density=0.3, on_nonfinite="skip")
    huge = []
    for step in range(2):
        for p in net.parameters():
            # Finite values whose sum over a tensor overflows (the compressor's check sums them),
            # and whose average over the ranks is finite (3e38 on each of two overflowed).
            p.grad = torch.full_like(p, 1.5e38 if step else 1.0)
        huge.append(sync.synchronize())
    out["threshold_huge"] = huge
    # GradientSync ranks with other bucket sizes: an error naming the option on every rank
    try:
        sparsetrain.GradientSync(_net(), "topk", density=0.1, bucket_cap_mb=25.0 if rank else 1.0)
        out["gs_buckets"] = None
    except ValueError as e:
        out["gs_buckets"] = str(e)
    # Equivalent settings written differently on each rank are one setting (they were refused).
    sparsetrain.GradientSync(_net(), "signsgd", **({"majority_vote": False} if rank else {}))
    sparsetrain.GradientSync(
        _net(), "topk", density=0.1, **({"error_feedback": True} if rank else {})
    )
    sparsetrain.GradientSync(
        _net(), "topk", density=0.1, collective="oktopk",
        **({"collective_options": {"repartition_every": 64}} if rank else {}),
    )  # fmt: skip
    from sparsetrain.perfmodel import DEFAULT_PARAMS

    candidates = ["dense", "allgather", "ssar_rd", "ssar_split", "dsar", "oktopk"]
    sparsetrain.GradientSync(
        _net(), "topk", density=0.1, collective="auto", auto_candidates=candidates,
        **({"collective_options": {"oktopk": {"repartition_every": 64}},
            "auto_network": DEFAULT_PARAMS} if rank else {}),
    )  # fmt: skip
    sparsetrain.GradientSync(
        _net(), "topk", density=0.1, collective="auto",
        **({"auto_candidates": list(candidates[:5])} if rank else {}),
    )  # fmt: skip
    out["equivalent"] = True
    return out


def test_bad_input_errors_on_every_rank(tmp_path):
    results = oks(run_world(_bad_input, 2, tmp_path))
    for r in results:
        assert r["mismatch"] and "disagree" in r["mismatch"] and "density" in r["mismatch"], r[
            "mismatch"
        ]
        assert (
            isinstance(r["raise"], str) and "non-finite" in r["raise"] and "on rank 1" in r["raise"]
        ), r["raise"]
        assert ".weight" in r["raise"]  # names the parameter
        assert r["groups"] > 1
        assert "'ddp_groups' must be None or a list of lists" in r["bad_groups"]
        assert "non-finite" in r["regroup_nan"] and "on rank 1" in r["regroup_nan"]
        assert r["skip"] == {"skipped": True, "zero": True}
        assert r["gs_skip"] == (False, 1, True) and r["gs_zero"] and r["gs_residuals_kept"]
        assert "bucket_cap_mb: rank 0 has 1.0, rank 1 has 25.0" in r["gs_buckets"]
        assert r["equivalent"]
        assert r["threshold_nan_0"] is None
        assert "non-finite" in r["threshold_nan_1"] and "on rank 1" in r["threshold_nan_1"]
        assert ".weight" in r["threshold_nan_1"]
        assert r["threshold_huge"] == [True, True]  # finite values: not skipped


# ---- collective=: every sparse collective through the hook --------------------------------
def _collectives(rank: int, world: int) -> dict:
    from sparsetrain.comm import available_collectives

    grads = {}
    for name in [*available_collectives(), "auto"]:
        torch.manual_seed(0)
        net = _net()
        model = DDP(net)
        state = sparsetrain.register_ddp_hook(model, "topk", density=0.3, collective=name)
        for step in range(3):  # a few steps, so stateful collectives (Ok-Topk) get past their start
            x, y = _batch(rank, step)
            net.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        assert state.stats()["bytes_sent"] > 0
    return grads


def test_every_collective_runs_through_the_hook(tmp_path):
    results = oks(run_world(_collectives, 3, tmp_path))
    for name in results[0]:
        for other in results[1:]:  # every rank applies the same gradient
            torch.testing.assert_close(other[name], results[0][name], rtol=0, atol=0)
    for name in ("ssar_rd", "ssar_split", "dsar", "auto"):  # exact algorithms: the allgather sum
        torch.testing.assert_close(results[0][name], results[0]["allgather"], rtol=1e-5, atol=1e-6)
    for name in ("oktopk", "gtopk"):  # a global selection of that sum: fewer non-zeros
        nnz, ref = int((results[0][name] != 0).sum()), int((results[0]["allgather"] != 0).sum())
        assert 0 < nnz <= ref


# ---- aggregator= / attack=: robust aggregation through the engine ----------------------------
def _robust(rank: int, world: int) -> dict:
    out = {}
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(
        net,
        "none",
        aggregator="median",
        attack="sign_flip",
        attack_options={"scale": 10.0},
        byzantine=1,
    )
    x, y = _batch(rank)
    nn.functional.cross_entropy(net(x), y).backward()
    honest = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    rows = [torch.empty_like(honest) for _ in range(world)]
    dist.all_gather(rows, honest)
    sync.synchronize()
    out["got"] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    table = torch.stack(rows)
    table[-1] *= -10.0  # the last rank is the Byzantine one
    out["median"] = torch.quantile(table, 0.5, dim=0)
    out["mean"] = table.mean(dim=0)
    # In a dense warm-up too: uncompressed, but through the rule and the attack (a plain mean
    # had let the attacker's gradient through, and the experiment ran without its attack).
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(
        net, "topk", density=0.1, aggregator="median", attack="sign_flip",
        attack_options={"scale": 10.0}, byzantine=1, dense_warmup_steps=1,
    )  # fmt: skip
    nn.functional.cross_entropy(net(x), y).backward()
    sync.synchronize()
    out["warmup"] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    # Safeguard through the DDP hook: runs, and every rank applies the same update.
    torch.manual_seed(0)
    net = _net()
    model = DDP(net)
    state = sparsetrain.register_ddp_hook(
        model,
        "topk",
        density=0.5,
        aggregator="safeguard",
        attack="sign_flip",
        attack_options={"scale": 10.0},
        byzantine=1,
    )
    for step in range(3):
        x, y = _batch(rank, step)
        net.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    out["safeguard"] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    out["stats"] = state.stats()
    return out


def test_robust_aggregation_through_the_engine(tmp_path):
    results = oks(run_world(_robust, 4, tmp_path))
    for r in results:
        # coordinate-wise median of the 4 rows (mean of the two middle ones), attacker included
        torch.testing.assert_close(r["got"], r["median"], rtol=0, atol=1e-7)
        assert not torch.allclose(r["got"], r["mean"])
        torch.testing.assert_close(r["warmup"], r["median"], rtol=0, atol=1e-7)
        torch.testing.assert_close(r["safeguard"], results[0]["safeguard"], rtol=0, atol=0)
        assert r["stats"]["steps"] == 3 and r["stats"]["bytes_sent"] > 0


def _tolerated(rank: int, world: int) -> dict:
    """A real run with no simulated attack: the rule is built for the f the user gives."""
    import warnings

    out = {}
    for options in ({}, {"f": 1}):
        torch.manual_seed(0)
        net = _net()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sync = sparsetrain.GradientSync(
                net, "none", aggregator="trimmed_mean", aggregator_options=options
            )
        x, y = _batch(rank)
        nn.functional.cross_entropy(net(x), y).backward()
        if rank == world - 1:  # a faulty worker, not one the library makes attack
            for p in net.parameters():
                p.grad.mul_(1e3)
        rows = [torch.empty(sum(p.numel() for p in net.parameters())) for _ in range(world)]
        dist.all_gather(rows, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        sync.synchronize()
        out[str(options)] = {
            "got": torch.cat([p.grad.reshape(-1) for p in net.parameters()]),
            "rows": torch.stack(rows),
            "warned": [str(w.message) for w in caught],
        }
    return out


def test_a_robust_rule_tolerates_the_f_it_is_given_without_an_attack(tmp_path):
    """Without a simulated attack the rule was always built for f=0: trimmed_mean trimmed
    nothing (it was the mean), krum and multi_krum tolerated no one, and aggregator_options
    {"f": ...} was refused, so a real run had no protection and no word of it."""
    results = oks(run_world(_tolerated, 4, tmp_path))
    for rank, r in enumerate(results):
        plain, given = r["{}"], r["{'f': 1}"]
        torch.testing.assert_close(plain["got"], plain["rows"].mean(dim=0))  # f=0: the mean
        trimmed = plain["rows"].sort(dim=0).values[1:3].mean(dim=0)  # 4 ranks, f=1
        torch.testing.assert_close(given["got"], trimmed, rtol=0, atol=1e-7)
        assert given["warned"] == []
        if rank == 0:  # the rank that warns
            (said,) = plain["warned"]
            assert "f=0" in said and "aggregator_options={'f': F}" in said, said
        else:
            assert plain["warned"] == []


def _one_faulty_rank(rank: int, world: int, compressor: str, options: dict) -> dict:
    """Rank 2 of 3 sends NaN at step 1 (steps 0 and 2: no one; 3: ranks 1 and 2, more than f=1)."""
    import warnings

    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(
        net, compressor, aggregator="median", aggregator_options={"f": 1}, **options
    )
    out = {"steps": []}
    for step, faulty in enumerate([set(), {2}, set(), {1, 2}]):
        net.zero_grad()
        x, y = _batch(rank, step)
        loss = nn.functional.cross_entropy(net(x), y)
        (loss * (math.nan if rank in faulty else 1.0)).backward()
        residuals = {k: v.clone() for k, v in sync.engine.feedback.residuals.items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sync.synchronize()
            except FloatingPointError as e:
                out["steps"].append({"error": str(e)})
                continue
        got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        now = sync.engine.feedback.residuals
        kept = residuals.keys() == now.keys() and all(
            torch.equal(v, now[k]) for k, v in residuals.items()
        )
        out["steps"].append({"got": got, "residuals_kept": kept,
                             "warned": [str(w.message) for w in caught]})  # fmt: skip
    out["compressor"] = sync.engine.compressor.state_dict()
    return out


@pytest.mark.parametrize(
    ("compressor", "options"),
    [("topk", {"density": 0.5}), ("randomk", {"density": 0.5, "error_feedback": False})],
)
def test_a_robust_rule_outvotes_a_rank_whose_gradient_is_not_finite(tmp_path, compressor, options):
    """One rank's NaN stopped every rank (on_nonfinite="raise", the default) before the robust
    rule, built to outvote f such ranks, ever saw it; and a NaN compensated into that rank's
    error feedback would have poisoned its residuals for good. Random-k's step counters, which
    draw the indices every rank shares, move on with the others' on the faulty rank."""
    results = oks(run_world(_one_faulty_rank, 3, tmp_path, compressor, options))
    for rank, r in enumerate(results):
        _, faulty, after, two = r["steps"]
        assert torch.isfinite(faulty["got"]).all()
        torch.testing.assert_close(faulty["got"], results[0]["steps"][1]["got"], rtol=0, atol=0)
        if rank == 2:  # its residuals stay as they were; it is told why
            assert faulty["residuals_kept"]
            (said,) = [w for w in faulty["warned"] if "NaN or Inf" in w]
            assert "as a Byzantine row (f=1; 1 rank(s) sent one)" in said, said
        else:
            assert not faulty["warned"]
            assert compressor == "randomk" or not faulty["residuals_kept"]
        assert torch.isfinite(after["got"]).all()  # and the run goes on
        torch.testing.assert_close(after["got"], results[0]["steps"][2]["got"], rtol=0, atol=0)
        assert "non-finite gradient (NaN or Inf) in" in two["error"]  # 2 > f: as before
        assert "on rank 1" in two["error"] and "on rank 2" in two["error"]
        assert same(r["compressor"], results[0]["compressor"])


def _faulty_rank_under_shared_terngrad(rank: int, world: int) -> str:
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(net, "terngrad", scaler_sharing=True, on_nonfinite="raise")
    x, y = _batch(rank)
    loss = nn.functional.cross_entropy(net(x), y)
    (loss * (math.nan if rank == 2 else 1.0)).backward()
    try:
        sync.synchronize()
    except FloatingPointError as e:
        return str(e)
    return "no error"


def _faulty_rank_with_a_scaler(rank: int, world: int) -> list:
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(
        net, "topk", density=0.5, aggregator="median", aggregator_options={"f": 1},
        on_nonfinite="propagate",
    )  # fmt: skip
    x, y = _batch(rank)
    loss = nn.functional.cross_entropy(net(x), y)
    (loss * (math.inf if rank == 2 else 1.0)).backward()
    kept = sync.synchronize()
    return [kept, bool(torch.isnan(next(net.parameters()).grad).all())]


def test_an_overflow_under_a_grad_scaler_is_the_scalers_to_see(tmp_path):
    """With a grad scaler ("propagate") an overflow on f ranks, outvoted, never reached the
    scaler, which then never lowered its scale."""
    for kept, nan in oks(run_world(_faulty_rank_with_a_scaler, 3, tmp_path)):
        assert kept is False and nan  # every rank drops the step, its gradients NaN


def test_a_compressor_of_two_rounds_stops_every_rank_at_a_faulty_one(tmp_path):
    """A first round summed before the exchange (shared TernGrad's scale; PowerSGD's P, which
    a robust rule now refuses): the healthy ranks waited in that sum while the faulty one had
    gone on, until the timeout."""
    for said in oks(run_world(_faulty_rank_under_shared_terngrad, 3, tmp_path, timeout=120)):
        assert "non-finite gradient (NaN or Inf) in" in said and "on rank 2" in said, said


# ---- the in-place fast paths compute what the general path computes --------------------------
def _fast_vs_reference(rank: int, world: int) -> dict:
    out = {}
    for compressor, collective in [
        ("threshold", "oktopk"),
        ("topk", "gtopk"),
        ("topk", "allgather"),
        ("threshold", "ssar_rd"),
        ("topk", "dsar"),
        ("none", None),  # the dense in-place path
        ("fp16", None),
    ]:
        runs = []
        # The fast path with sparsetrain's native kernel (where it builds), without it (the
        # PyTorch ops that mark while they compensate), and the general path.
        for how in ("fast", "fast-torch", "general"):
            os.environ["SPARSETRAIN_NATIVE"] = "0" if how == "fast-torch" else "1"
            torch.manual_seed(0)
            net = _net()
            model = DDP(net, bucket_cap_mb=0.001)  # several buckets, in DDP's (reversed) order
            opts = {"density": 0.1, "collective": collective} if collective else {}
            state = sparsetrain.register_ddp_hook(model, compressor, **opts)
            if how == "general":
                state.engine._sparse_fast_path = lambda: False
                state.engine._dense_fast_path = lambda: False
            grads = []
            for step in range(4):
                x, y = _batch(rank, step)
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
            residuals = state.engine.feedback.residuals
            runs.append((grads, {n: r.clone() for n, r in residuals.items()}))
        os.environ.pop("SPARSETRAIN_NATIVE")
        (rg, rr) = runs[-1]
        out[(compressor, collective)] = (
            all(torch.equal(a, b) for fg, _ in runs[:2] for a, b in zip(fg, rg)),
            all(
                sorted(fr) == sorted(rr) and all(torch.equal(fr[n], rr[n]) for n in fr)
                for _, fr in runs[:2]
            ),
            len(rr) > 0,
        )
    return out


def test_fast_paths_are_bit_identical_to_the_general_path(tmp_path):
    for result in oks(run_world(_fast_vs_reference, 3, tmp_path)):
        for combo, (same_grads, same_residuals, has_residuals) in result.items():
            assert same_grads, f"{combo}: averaged gradients differ"
            assert same_residuals, f"{combo}: residuals differ"
            # error feedback is on for the biased sparse compressors, off for none and fp16
            assert has_residuals == (combo[1] is not None), combo


def _in_place(rank: int, world: int) -> dict:
    """GradientSync's sparse path writes into the gradients themselves: the same values as the
    DDP hook (one bucket each) and as its own general path (several buckets)."""
    out = {}
    for compressor, collective in [
        ("threshold", "oktopk"),
        ("topk", "gtopk"),
        ("topk", "allgather"),
        ("topk", "dsar"),
    ]:
        runs = {}
        for how in ("ddp", "sync", "sync-buckets", "sync-buckets-general"):
            torch.manual_seed(0)
            net = _net()
            opts = {"density": 0.1, "collective": collective}
            if how == "ddp":
                model = DDP(net, bucket_cap_mb=25.0)  # the whole small net in one bucket
                engine = sparsetrain.register_ddp_hook(model, compressor, **opts).engine
            else:
                model = net
                cap = 25.0 if how == "sync" else 0.001  # one bucket, or one a parameter
                sync = sparsetrain.GradientSync(net, compressor, bucket_cap_mb=cap, **opts)
                engine = sync.engine
                # Error feedback's buffers are taken when GradientSync is built (as DDP takes
                # its buckets), one pair a bucket, not in the first steps.
                reserved = engine.feedback._buffers
                if len(reserved) != len(sync.buckets) or any(
                    bool(b.any()) for pair in reserved.values() for b in pair
                ):
                    raise AssertionError(f"{how}: buffers not reserved at construction")
                if how.endswith("general"):
                    engine._sparse_fast_path = lambda: False
            grads, same_storage = [], True
            for step in range(4):
                x, y = _batch(rank, step)
                model.zero_grad(set_to_none=step % 2 == 0)  # both: fresh and kept gradients
                nn.functional.cross_entropy(model(x), y).backward()
                if how != "ddp":
                    before = [p.grad.data_ptr() for p in net.parameters()]
                    assert sync.synchronize()
                    same_storage &= before == [p.grad.data_ptr() for p in net.parameters()]
                grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
            residuals = {n: r.clone() for n, r in engine.feedback.residuals.items()}
            runs[how] = (grads, residuals, same_storage)

        def same(a: str, b: str, runs: dict = runs) -> bool:
            (ga, ra, _), (gb, rb, _) = runs[a], runs[b]
            return all(torch.equal(u, v) for u, v in zip(ga, gb)) and (
                sorted(ra) == sorted(rb) and all(torch.equal(ra[n], rb[n]) for n in ra)
            )

        out[(compressor, collective)] = {
            "sync equals the DDP hook": same("sync", "ddp"),
            "fast equals general": same("sync-buckets", "sync-buckets-general"),
            "written in place": runs["sync"][2] and runs["sync-buckets"][2],
            "gradients move": not torch.equal(runs["sync"][0][0], runs["sync"][0][1]),
        }
    return out


def test_gradient_sync_averages_sparse_gradients_in_place(tmp_path):
    for result in oks(run_world(_in_place, 3, tmp_path)):
        for combo, checks in result.items():
            for what, ok in checks.items():
                assert ok, f"{combo}: {what}"


# ---- dense_warmup_steps: plain averaged allreduce first, then compression ------------------
WARMUP = 2


def _warmup(rank: int, world: int) -> dict:
    out = {}
    for hooked in (False, True):
        torch.manual_seed(0)
        net = _net()
        model = DDP(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        state = None
        if hooked:
            state = sparsetrain.register_ddp_hook(
                model, "topk", density=0.01, dense_warmup_steps=WARMUP
            )
        grads, stats = [], []
        for step in range(WARMUP + 1):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
            if state is not None:
                stats.append(state.stats())
            opt.step()
        out["hook" if hooked else "ddp"] = grads
        if hooked:
            out["stats"] = stats
    return out


def test_dense_warmup_is_plain_ddp_then_compression_starts(tmp_path):
    from sparsetrain.compressors import k_for

    numel = sum(p.numel() for p in _net().parameters())  # 1037, one DDP bucket
    # By hand, for 2 ranks: a ring allreduce of n float32 sends 2 (2-1)/2 * 4n = 4n bytes, and
    # the finite check a one-element allreduce of 4 bytes a bucket.
    ring, check = 4 * numel, 4
    results = oks(run_world(_warmup, 2, tmp_path))
    for r in results:
        # The same weights every step (identical updates so far), and during the warm-up the
        # same gradient as DDP's own allreduce, bit for bit ((a + b) / 2 == a / 2 + b / 2).
        for step in range(WARMUP):
            assert torch.equal(r["hook"][step], r["ddp"][step]), step
            assert r["stats"][step]["dense_bytes"] == (step + 1) * ring
            assert r["stats"][step]["bytes_sent"] == (step + 1) * (ring + check)
        # Step WARMUP compresses: top-k of each rank (k = 10), gathered and summed.
        assert not torch.equal(r["hook"][WARMUP], r["ddp"][WARMUP])
        nnz = int((r["hook"][WARMUP] != 0).sum())
        assert 0 < nnz <= 2 * k_for(numel, 0.01)
        sent = r["stats"][WARMUP]["bytes_sent"] - r["stats"][WARMUP - 1]["bytes_sent"]
        assert 0 < sent < 0.1 * ring
        assert r["stats"][WARMUP]["dense_bytes"] == (WARMUP + 1) * ring
    torch.testing.assert_close(results[0]["hook"], results[1]["hook"], rtol=0, atol=0)


# ---- packed, half-precision and random-k compressors on real ranks -------------------------
# (name, options, error feedback by default: README's table, on for the biased ones)
COMPRESSED = [
    ("qsgd", {}, False),
    ("terngrad", {}, False),
    ("signsgd", {}, True),
    ("signsgd", {"majority_vote": True, "bucket_size": 64}, False),
    ("bf16", {}, False),
    ("randomk", {"density": 0.25}, False),
    ("powersgd", {"rank": 2}, True),
]


def _label(name: str, opts: dict) -> str:
    """One entry of COMPRESSED: its name, and its options where it has any."""
    return name + "".join(f" {k}={v}" for k, v in sorted(opts.items()))


def _local_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's own gradient (before any exchange), from a replica with the same weights."""
    ref = _net()
    ref.load_state_dict(net.state_dict())
    nn.functional.cross_entropy(ref(x), y).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def _compressed(rank: int, world: int) -> dict:
    out = {}
    for name, opts, _ in COMPRESSED:
        torch.manual_seed(0)
        net = _net()
        model = DDP(net)  # one bucket
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        state = sparsetrain.register_ddp_hook(model, name, **opts)
        first = None
        for step in range(3):
            x, y = _batch(rank, step)
            local = _local_grads(net, x, y) if step == 0 else None
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step == 0:
                first = (local, {n: p.grad.clone() for n, p in net.named_parameters()})
            opt.step()
        out[_label(name, opts)] = {
            "first": first,
            "last_grad": torch.cat([p.grad.reshape(-1) for p in net.parameters()]),
            "params": torch.cat([p.detach().reshape(-1) for p in net.parameters()]),
            "error_feedback": state.engine.feedback.enabled,
        }
    return out


def _single_process_reference(name: str, opts: dict, local: list[dict]) -> dict:
    """The first step's averaged gradient from the ranks' own gradients, in one process: each
    rank's compressor (seeded as the engine seeds it, with the rank for rank-seeded ones) on the
    bucket in canonical (name-sorted) order, the payloads summed (summable) or aggregated in
    rank order (packed), divided by the number of ranks."""
    world = len(local)
    names = sorted(local[0])
    shapes = [local[0][n].shape for n in names]
    key = "|".join(names)
    comps, states = [], []
    for r in range(world):
        c = sparsetrain.SyncConfig(compressor=name, compressor_options=opts).build_compressor()
        if c.rank_seeded:
            c.seed += r
        flat = torch.cat([local[r][n].reshape(-1) for n in names])
        comps.append(c)
        states.append(c.compress(flat, key=key, layout=shapes))
    assert comps[0].rounds == 1, name
    ctx = states[0][1]
    if comps[0].summable:
        summed = tuple(sum(parts) for parts in zip(*(p for p, _ in states)))
        total = comps[0].decompress(summed, ctx)
    else:
        total = comps[0].aggregate([p for p, _ in states], ctx)
    avg = (total.reshape(-1) / world).to(torch.float32)
    pieces = torch.split(avg, [math.prod(s) for s in shapes])
    return {n: piece.view(shape) for n, piece, shape in zip(names, pieces, shapes)}


def test_packed_half_and_random_compressors_agree_on_every_rank_with_a_reference(tmp_path):
    results = oks(run_world(_compressed, 3, tmp_path))
    for name, opts, ef in COMPRESSED:
        label = _label(name, opts)
        # Every rank applies the same gradient, bit for bit, and so holds the same weights.
        for r in results[1:]:
            assert torch.equal(r[label]["last_grad"], results[0][label]["last_grad"]), label
            assert torch.equal(r[label]["params"], results[0][label]["params"]), label
            assert r[label]["error_feedback"] is ef, label
        if name == "powersgd":  # two rounds of allreduce: no one-shot reference here
            continue
        local = [r[label]["first"][0] for r in results]
        ref = _single_process_reference(name, opts, local)
        plain = {n: sum(g[n] for g in local) / len(local) for n in ref}
        for r in results:
            got = r[label]["first"][1]
            for n in ref:
                if name in ("qsgd", "terngrad", "signsgd"):
                    # Gathered and added in rank order on every rank: exactly the reference.
                    assert torch.equal(got[n], ref[n]), (label, n)
                else:
                    # Summed by gloo's allreduce, in its own order of ranks: rounding differs.
                    tol = (1e-2 if name == "bf16" else 1e-6) * float(ref[n].abs().max())
                    torch.testing.assert_close(got[n], ref[n], rtol=0, atol=tol)
            # Lossy: not the plain average.
            assert any(not torch.allclose(got[n], plain[n]) for n in ref), label


def _terngrad_shared(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    net = _net()
    model = DDP(net)  # one bucket
    state = sparsetrain.register_ddp_hook(model, "terngrad", scaler_sharing=True, bucket_size=64)
    x, y = _batch(rank)
    local = _local_grads(net, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    first = state.stats()["bytes_sent"]
    nn.functional.cross_entropy(model(x), y).backward()  # a step without first-step checks
    return {
        "local": local,
        "got": got,
        "step_bytes": state.stats()["bytes_sent"] - first,
        "error_feedback": state.engine.feedback.enabled,
    }


def test_terngrad_with_scaler_sharing_sums_codes_under_the_ranks_largest_scale(tmp_path):
    """TernGrad's scaler sharing (Wen et al. 2017): every rank ternarizes with the largest
    scale over the ranks, and the int8 codes are summed by an allreduce, not gathered."""
    from sparsetrain.comm import ring_allreduce_bytes

    world = 3
    results = oks(run_world(_terngrad_shared, world, tmp_path))
    names = sorted(results[0]["local"])
    flats = [torch.cat([r["local"][n].reshape(-1) for n in names]) for r in results]
    comps, pending = [], []
    for r in range(world):  # each rank's compressor, seeded with its rank as the engine does
        c = sparsetrain.SyncConfig(
            compressor="terngrad", compressor_options={"scaler_sharing": True, "bucket_size": 64}
        ).build_compressor()
        c.seed += r
        c.bind(world)
        comps.append(c)
        pending.append(c.compress(flats[r], key="|".join(names)))
    shared = torch.stack([p[0][0] for p in pending]).amax(0)
    rounds = [c.next_round((shared,), ctx) for c, (_, ctx) in zip(comps, pending)]
    assert all(codes.dtype == torch.int8 for (codes,), _ in rounds)
    summed = sum(codes.to(torch.int32) for (codes,), _ in rounds).to(torch.int8)
    want = comps[0].decompress((summed,), rounds[0][1]) / world
    numel = want.numel()
    pieces = dict(zip(names, torch.split(want, [results[0]["local"][n].numel() for n in names])))
    for res in results:
        assert not res["error_feedback"]  # unbiased: off by default
        for n in names:
            assert torch.equal(res["got"][n].reshape(-1), pieces[n]), n
        # The finite check, the scales' maximum (float32, a bucket each), the codes (a byte
        # an entry): allreduces, whose bytes do not grow with the ranks.
        buckets = -(-numel // 64)
        assert res["step_bytes"] == (
            ring_allreduce_bytes(1, 4, world)
            + ring_allreduce_bytes(buckets, 4, world)
            + ring_allreduce_bytes(numel, 1, world)
        )
    # Each entry is a multiple of the shared scale over the ranks, at most the ranks' count.
    steps = torch.round(
        want.view(-1)[: numel - numel % 64].view(-1, 64) * world / shared[:-1, None]
    )
    assert steps.abs().max() <= world and steps.abs().max() > 0


def _half_sums(rank: int, world: int) -> dict:
    from sparsetrain.sync.engine import SyncEngine

    torch.set_num_threads(1)
    out = {}
    # Gradients of 40000 on every rank: each fits in float16 and so does their average, but
    # their sum does not. The ranks' average was summed first and divided after, so it was Inf.
    options = {
        "vote-half": {"majority_vote": True},
        "terngrad-shared-half": {"scaler_sharing": True},
    }
    for name, compressor, dtype in (("fp16", "fp16", torch.float32),
                                    ("none-half", "none", torch.float16),
                                    ("signsgd-half", "signsgd", torch.float16),
                                    ("vote-half", "signsgd", torch.float16),
                                    ("terngrad-shared-half", "terngrad", torch.float16),
                                    ("powersgd-half", "powersgd", torch.float16)):  # fmt: skip
        opts = options.get(name, {})
        model = nn.Linear(4, 1, bias=False).to(dtype)
        sync = sparsetrain.GradientSync(model, compressor, **opts)
        model.weight.grad = torch.full((1, 4), 40000.0, dtype=dtype)
        try:
            out[name] = (sync.synchronize(), model.weight.grad.float().tolist())
        except FloatingPointError as e:
            out[name] = str(e)
    # The sparse exchanges summed float16 values and then divided: 3 x 40000 was Inf. They
    # send the values divided by the ranks now, on the fast and the general path, and so does
    # random-k (its values are summed in one allreduce).
    for collective in ("allgather", "ssar_rd", "ssar_split", "dsar", "oktopk", "gtopk", "auto"):
        for fast in (True, False):
            model = nn.Linear(4, 1, bias=False).half()
            sync = sparsetrain.GradientSync(model, "topk", density=1.0, collective=collective)
            if not fast:
                sync.engine._sparse_fast_path = lambda: False
            model.weight.grad = torch.full((1, 4), 40000.0, dtype=torch.float16)
            stepped = sync.synchronize()
            residual = sync.engine.feedback.residuals["weight"]
            out[f"{collective}-{fast}"] = (
                stepped, model.weight.grad.float().tolist(), residual.float().tolist()
            )  # fmt: skip
    # Rank 0's residual of 30000 plus its gradient of 60000 is 90000 in float32, past 65504,
    # but its share of the average, 30000, fits: it was cast to Inf before it was divided,
    # and the step was dropped. Entries that a global selection drops go back into residuals
    # whole (3 a rank), not as the shares that went out (1): Ok-Topk's into the ranks that sent
    # them, gTop-k's into the rank whose merges dropped them (rank 0, both).
    for collective in ("allgather", "ssar_rd", "ssar_split", "dsar", "oktopk", "gtopk", "auto"):
        for fast in (True, False):
            model = nn.Linear(4, 1, bias=False).half()
            sync = sparsetrain.GradientSync(
                model, "topk", density=0.25, collective=collective, on_nonfinite="skip"
            )
            if not fast:
                sync.engine._sparse_fast_path = lambda: False
            steps = []
            for grad in ([30000.0, 60000.0], [60000.0, 0.0]) if rank == 0 else ([0, 3.0],) * 2:
                model.weight.grad = torch.tensor([grad + [0.0, 0.0]], dtype=torch.float16)
                steps.append(sync.synchronize())
            residual = sync.engine.feedback.residuals["weight"]
            out[f"headroom-{collective}-{fast}"] = (
                steps, model.weight.grad.float().tolist(), residual.tolist()
            )  # fmt: skip
    model = nn.Linear(4, 1, bias=False).half()
    sync = sparsetrain.GradientSync(model, "randomk", density=1.0)
    model.weight.grad = torch.full((1, 4), 40000.0, dtype=torch.float16)
    out["randomk-all-half"] = (sync.synchronize(), model.weight.grad.float().tolist())
    # A sparse exchange that drops the step under "skip" (Ok-Topk refuses the Inf sum of
    # float16 values: 65504 / 3 rounds to 21840, and three of those to 65520, past 65504)
    # left each rank's own gradient in the parts instead of zeros.
    config = sparsetrain.SyncConfig(
        compressor="topk", compressor_options={"density": 1.0}, collective="oktopk",
        error_feedback=False, on_nonfinite="skip",
    )  # fmt: skip
    engine = SyncEngine(config)
    part = torch.tensor([65504.0, 1.0 + rank, -2.0, 3.0], dtype=torch.float16)
    engine.exchange_into([part], ["w"], [torch.Size([4])])
    engine.end_step()
    out["skip_parts"] = (engine.skipped_last_step, part.tolist())
    # fp16 with error feedback on float16 gradients: 65504's share on 3 ranks casts to 21840,
    # and 3 * 21840 = 65520 is no float16: the residual became -Inf, and every later step
    # non-finite. It is taken and kept in float32 now: 65504 - 65520 = -16.
    model = nn.Linear(4, 1, bias=False).half()
    sync = sparsetrain.GradientSync(model, "fp16", error_feedback=True, on_nonfinite="skip")
    model.weight.grad = torch.tensor([[65504.0 if rank == 0 else 1.0, 1.0, 1.0, 1.0]]).half()
    stepped = sync.synchronize()
    residual = sync.engine.feedback.residuals["weight"]
    out["ef_half"] = (stepped, residual.dtype == torch.float32, residual.tolist())
    # Under a robust rule, which takes every rank's whole gradient, nothing is divided first.
    model = nn.Linear(4, 1, bias=False).half()
    sync = sparsetrain.GradientSync(model, "fp16", aggregator="mean", on_nonfinite="skip")
    model.weight.grad = torch.tensor([[65504.0 if rank == 0 else 1.0, 1.0, 1.0, 1.0]]).half()
    out["robust_half"] = (sync.synchronize(), model.weight.grad.float().tolist())
    # Random-k scales the ranks' sum by numel / k: 3 x 400 x 100 is no float16, the average
    # 400 x 100 is (an unbiased estimate of the gradient 400, four entries of 400 sent).
    model = nn.Linear(400, 1, bias=False).half()
    sync = sparsetrain.GradientSync(model, "randomk", density=0.01)
    model.weight.grad = torch.full((1, 400), 400.0).half()
    stepped = sync.synchronize()
    sent = model.weight.grad[model.weight.grad != 0].float()
    out["randomk_half"] = (stepped, sent.tolist())
    # During the dense warm-up the fp16 compressor sends no cast: the fast path did.
    model = nn.Linear(4, 1, bias=False)
    sync = sparsetrain.GradientSync(model, "fp16", dense_warmup_steps=1)
    model.weight.grad = torch.full((1, 4), 1 / 3 + rank * 1e-4)
    sync.synchronize()
    out["warmup_cast"] = bool((model.weight.grad.half().float() == model.weight.grad).all())
    return out


def test_averages_that_fit_do_not_overflow_in_their_sum_and_skipped_parts_are_zero(tmp_path):
    for rank, res in enumerate(oks(run_world(_half_sums, 3, tmp_path))):
        for name in ("fp16", "none-half", "signsgd-half", "vote-half", "terngrad-shared-half",
                     "powersgd-half"):  # fmt: skip
            assert res[name] == (True, [[40000.0] * 4]), (name, res[name])
        assert res["skip_parts"] == (True, [0.0] * 4), res["skip_parts"]
        for collective in ("allgather", "ssar_rd", "ssar_split", "dsar", "oktopk", "gtopk",
                           "auto"):  # fmt: skip
            for fast in (True, False):
                got = res[f"headroom-{collective}-{fast}"]
                if collective == "oktopk":  # the global top-1: rank 0's entry
                    want = ([True, True], [[30000.0, 0.0, 0.0, 0.0]], [0, 3.0 * (rank > 0), 0, 0])
                elif collective == "gtopk":  # rank 0 merged and dropped both ranks' entry
                    want = ([True, True], [[30000.0, 0.0, 0.0, 0.0]], [0, 6.0 * (rank == 0), 0, 0])
                else:
                    want = ([True, True], [[30000.0, 2.0, 0.0, 0.0]], [0.0] * 4)
                assert got == want, (collective, fast, got)
                # 3 x fp16(40000 / 3) = 40008 -> 40000; each rank sent 40008, 8 too many
                got = res[f"{collective}-{fast}"]
                assert got == (True, [[40000.0] * 4], [-8.0] * 4), (collective, fast, got)
        assert res["randomk-all-half"] == (True, [[40000.0] * 4]), res["randomk-all-half"]
        stepped, half, residual = res["ef_half"]
        assert stepped and half and all(math.isfinite(r) for r in residual), res["ef_half"]
        # What the rank did not send: 65504 - 3 * 21840, and 1 - 3 * float16(1 / 3).
        assert residual == [-16.0 if rank == 0 else 2**-12] + [2**-12] * 3, residual
        assert not res["warmup_cast"]
        assert res["randomk_half"] == (True, [40000.0] * 4), res["randomk_half"]
        assert res["robust_half"] == (True, [[21840.0, 1.0, 1.0, 1.0]]), res[
            "robust_half"
        ]  # fp16(65506 / 3)


def _powersgd_half_residual(rank: int, world: int) -> list:
    from sparsetrain.compressors.powersgd import _Matrix
    from sparsetrain.sync.engine import SyncEngine

    torch.set_num_threads(1)
    n = 16
    config = sparsetrain.SyncConfig(compressor="powersgd", compressor_options={"rank": 1})
    probe = config.build_compressor()
    q = probe._warm_start("w", [_Matrix(0, n, n, 1)], torch.zeros(n * n))[0][:, 0]
    q = q / q.norm()  # as float16 input normalises it
    ones = torch.ones(n)
    v = torch.zeros(n)
    v[0] = 1
    v += ones / ones.norm()
    if rank == 0:  # its P is about zero, so rank 1 steers the shared P_hat towards v, on which
        w = ones - (ones @ q) * q  # rank 0's own P_hat Q^T reaches 2.5 x 40000
        grad = 40000.0 * torch.outer(ones, w / w.abs().max())  # entries fit float16
    else:
        grad = 4000.0 * torch.outer(v, q)
    engine = SyncEngine(config)
    result = engine.exchange(grad.half().reshape(-1), ["w"], [torch.Size([n, n])])
    engine.end_step()
    residual = engine.feedback.residuals["w"]
    return [bool(torch.isfinite(result).all()), bool(torch.isfinite(residual).all())]


def test_a_float16_powersgd_residual_stays_finite_where_the_average_does(tmp_path):
    """This rank's own rank-1 approximation can pass float16's range where its gradient and
    the average do not: decoded in float16 it left an Inf residual, which no loss scale could
    bring back (every later step then failed). It is decoded in float32, as the ranks' sum
    is. (The residual, tens of thousands here, can still make the next P overflow float16:
    that step is then dropped or raised on every rank, and a GradScaler's lower scale
    shrinks it.)"""
    for res in oks(run_world(_powersgd_half_residual, 2, tmp_path)):
        assert res == [True, True], res


# ---- momentum correction (Deep Gradient Compression) ----------------------------------------
MOMENTUM = 0.9


def _momentum_corrected(rank: int, world: int) -> dict:
    """Train a few steps with momentum correction: one bucket (for the reference) on the fast
    and the general path, and several buckets with a global selection on both paths."""
    out = {}
    for label, collective, bucket_mb, fast in [
        ("one-bucket", "allgather", 25.0, True),
        ("one-bucket-general", "allgather", 25.0, False),
        ("buckets-gtopk", "gtopk", 0.001, True),
        ("buckets-gtopk-general", "gtopk", 0.001, False),
    ]:
        torch.manual_seed(0)
        net = _net()
        model = DDP(net, bucket_cap_mb=bucket_mb)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)  # the momentum is in the hook
        state = sparsetrain.register_ddp_hook(
            model, "topk", density=0.1, collective=collective, momentum_correction=MOMENTUM
        )
        if not fast:
            state.engine._sparse_fast_path = lambda: False
        local, applied = [], []
        for step in range(4):
            x, y = _batch(rank, step)
            local.append(_local_grads(net, x, y))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            applied.append({n: p.grad.clone() for n, p in net.named_parameters()})
            opt.step()
        fb = state.engine.feedback
        out[label] = {
            "local": local,
            "applied": applied,
            "velocity": {n: u.clone() for n, u in fb.velocity.items()},
            "residuals": {n: r.clone() for n, r in fb.residuals.items()},
            "state": state.state_dict(),
        }
    return out


def _dgc_reference(local: list[list[dict]], density: float) -> list[dict]:
    """Momentum correction by its definition, one bucket of the parameters in name order: each
    rank keeps u and v; u = m u + g; v = v + u; it sends the top-k of |v| and clears them from
    v and u; the applied gradient is the average of what the ranks sent."""
    world, steps = len(local), len(local[0])
    names = sorted(local[0][0])
    shapes = [local[0][0][n].shape for n in names]
    numel = sum(math.prod(s) for s in shapes)
    k = max(1, round(density * numel))
    u = [torch.zeros(numel) for _ in range(world)]
    v = [torch.zeros(numel) for _ in range(world)]
    out = []
    for step in range(steps):
        total = torch.zeros(numel)
        for r in range(world):
            g = torch.cat([local[r][step][n].reshape(-1) for n in names])
            u[r] = MOMENTUM * u[r] + g
            v[r] = v[r] + u[r]
            sel = torch.topk(v[r].abs(), k).indices
            total[sel] += v[r][sel]
            v[r][sel] = 0
            u[r][sel] = 0
        pieces = torch.split(total / world, [math.prod(s) for s in shapes])
        out.append({n: p.view(s) for n, p, s in zip(names, pieces, shapes)})
    return out


def test_momentum_correction_follows_its_definition_on_both_paths(tmp_path):
    results = oks(run_world(_momentum_corrected, 3, tmp_path))
    local = [r["one-bucket"]["local"] for r in results]
    want = _dgc_reference(local, 0.1)
    for r in results:
        for step, ref in enumerate(want):
            for n, g in r["one-bucket"]["applied"][step].items():
                torch.testing.assert_close(g, ref[n], rtol=1e-5, atol=1e-6)
        # The fast path and the general path compute the same thing, bit for bit, also with a
        # global selection (gTop-k) over several buckets: gradients, residuals and velocities.
        for fast, general in (
            ("one-bucket", "one-bucket-general"),
            ("buckets-gtopk", "buckets-gtopk-general"),
        ):
            a, b = r[fast], r[general]
            for step in range(len(a["applied"])):
                assert all(
                    torch.equal(a["applied"][step][n], b["applied"][step][n])
                    for n in a["applied"][step]
                )
            for what in ("velocity", "residuals"):
                assert sorted(a[what]) == sorted(b[what])
                assert all(torch.equal(a[what][n], b[what][n]) for n in a[what]), (fast, what)
        # Momentum is real: entries that waited carry velocity, and it is in the saved state.
        velocity = r["buckets-gtopk"]["velocity"]
        assert any(float(u.abs().max()) > 0 for u in velocity.values())
        saved = r["buckets-gtopk"]["state"]["feedback"]
        assert saved["momentum"] == MOMENTUM and sorted(saved["velocity"]) == sorted(velocity)


# ---- error feedback of a global selection, against its definition ------------------------------
def _selection_feedback(rank: int, world: int) -> list[str]:
    """Each step, for Ok-Topk and gTop-k: what this rank sends is the top k of its compensated
    gradient (gradient plus residual). Ok-Topk's result is the average of all sent values over
    the kept positions (it sums before it selects), and the new residual is the compensated
    gradient less what this rank sent at positions the selection kept (the paper's); with
    residuals="owner", less all it sent plus the sums of its own region that the selection
    dropped. gTop-k's result is its
    tree's (some ranks' shares of a kept position may have been dropped on the way), and the
    new residual is the compensated gradient less all it sent plus what its own merges
    dropped."""
    from sparsetrain.compressors import k_for
    from tests.unit.test_collective_reference import gtopk_dropped_reference, gtopk_reference

    problems = []
    for collective, residuals in (("oktopk", "local"), ("oktopk", "owner"), ("gtopk", None)):
        torch.manual_seed(0)
        model = nn.Linear(50, 20, bias=False)  # 1,000 entries, k = 50
        options = {"collective_options": {"residuals": residuals}} if residuals else {}
        sync = sparsetrain.GradientSync(
            model, "topk", density=0.05, collective=collective, **options
        )
        numel, k = model.weight.numel(), k_for(1000, 0.05)
        residual = torch.zeros(numel)
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(3):
            grad = torch.randn(numel, generator=g) * (1 + rank)
            model.weight.grad = grad.reshape(model.weight.shape).clone()
            compensated = grad + residual
            sent = torch.topk(compensated.abs(), k).indices
            sync.synchronize()
            result = model.weight.grad.reshape(-1)
            kept = result.nonzero().flatten()  # the global selection (sums of randn are not 0)
            # Every rank's sent values, to check the average over the kept positions.
            everyone = [torch.zeros(numel) for _ in range(world)]
            mine = torch.zeros(numel)
            mine[sent] = compensated[sent]
            dist.all_gather(everyone, mine)
            want = torch.stack(everyone).sum(0) / world
            exact_sums = collective == "oktopk"
            # (Ok-Topk keeps what passes its estimated threshold, which it reuses between
            # estimates, so its count varies around k; gTop-k keeps at most k.)
            if not exact_sums and kept.numel() > k:
                problems.append(f"{collective} step {step}: {kept.numel()} kept, more than k")
            if exact_sums and not torch.allclose(result[kept], want[kept], rtol=1e-5, atol=1e-6):
                problems.append(f"{collective} step {step}: kept values are not the average")
            residual = compensated.clone()
            if residuals == "owner":
                residual[sent] = 0  # all it sent left it; its region's dropped sums come back
                stats = sync.engine._collectives["oktopk"].stats()
                sizes = next(iter(stats.values()))["region_sizes"]
                lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
                back = torch.zeros(numel, dtype=torch.bool)
                back[lo:hi] = True
                back[kept] = False
                residual[back] += torch.stack(everyone).sum(0)[back]
            elif exact_sums:
                residual[sent[torch.isin(sent, kept)]] = 0  # sent and kept: applied
            else:
                inputs = [(row.nonzero().flatten(), row[row != 0]) for row in everyone]
                tree_idx, tree_val = gtopk_reference(inputs, numel, k)
                tree = torch.zeros(numel, dtype=torch.float64).index_put_((tree_idx,), tree_val)
                if not torch.allclose(result.double(), tree / world, rtol=1e-5, atol=1e-6):
                    problems.append(f"{collective} step {step}: not the tree's selection")
                residual[sent] = 0  # all it sent left it; what its merges dropped comes back
                residual += gtopk_dropped_reference(inputs, numel, k)[rank].float()
            got = sync.engine.feedback.residuals["weight"].reshape(-1)
            tol = 1e-5 if residuals == "owner" else 1e-6  # sums of three in another order
            if not torch.allclose(got, residual, rtol=tol, atol=tol):
                bad = (got - residual).abs().gt(tol).sum().item()
                problems.append(
                    f"{collective} ({residuals}) step {step}: residual differs at {bad} entries"
                )
            if step == 0 and torch.isin(sent, kept).all():
                problems.append(f"{collective}: the selection dropped nothing this rank sent")
    return problems


def test_a_global_selection_puts_what_it_dropped_back_into_the_residual(tmp_path):
    for rank, problems in enumerate(oks(run_world(_selection_feedback, 3, tmp_path))):
        assert problems == [], f"rank {rank}: {problems}"


def _cancelling(rank: int, world: int, residuals: str | None) -> dict:
    """Two ranks whose gradients keep opposite signs on 50 entries (their sum is 0 there) and
    differ elsewhere; the largest residual on those entries over 300 steps."""
    torch.manual_seed(0)
    model = nn.Linear(100, 100, bias=False)
    opts = {"collective_options": {"residuals": residuals}} if residuals else {}
    collective = "oktopk" if residuals else "allgather"
    sync = sparsetrain.GradientSync(model, "threshold", density=0.01, collective=collective,
                                    **opts)  # fmt: skip
    shared, mine = torch.Generator().manual_seed(7), torch.Generator().manual_seed(100 + rank)
    cancel = torch.zeros(10_000, dtype=torch.bool)
    cancel[torch.randperm(10_000, generator=shared)[:50]] = True
    largest = []
    for _ in range(300):
        grad = 0.1 * (torch.randn(10_000, generator=shared) + torch.randn(10_000, generator=mine))
        grad[cancel] = 0.05 if rank == 0 else -0.05
        model.weight.grad = grad.reshape(100, 100)
        sync.synchronize()
        residual = sync.engine.feedback.residuals["weight"].reshape(-1)
        largest.append(residual[cancel].abs().max().item())
    return {"last": largest[-1], "peak_after_100": max(largest[100:])}


@pytest.mark.parametrize("residuals", ["local", "owner", None])
def test_oktopk_residuals_where_the_ranks_gradients_cancel(residuals, tmp_path):
    """The paper's residuals (local) grow by each step's gradient on entries whose sum over
    ranks is 0: sent every step, never selected, put back (0.05 x 300 = 15). The region
    owners' residuals stay as small as the allgather's (None), which applies the 0 sum."""
    for res in oks(run_world(_cancelling, 2, tmp_path, residuals)):
        if residuals == "local":
            assert res["last"] > 10, res
        else:
            assert res["peak_after_100"] < 3, res


# ---- one rank's bad options: an error on every rank, not a wait -------------------------------
def _one_rank_refuses(rank: int, world: int) -> list[str]:
    errors = []
    # GradientSync: rank 1's collective option is out of range.
    opts = {"repartition_every": 0 if rank == 1 else 8}
    try:
        sparsetrain.GradientSync(_net(), "threshold", density=0.1, collective="oktopk",
                                 collective_options=opts)  # fmt: skip
    except (TypeError, ValueError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    # The DDP hook: rank 0 names a compressor option that does not exist.
    model = DDP(_net())
    try:
        sparsetrain.register_ddp_hook(
            model, "topk", density=0.1, **({"levels": 4} if rank == 0 else {})
        )
    except (TypeError, ValueError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_a_rank_with_bad_options_makes_every_rank_raise(tmp_path):
    (zero, one) = oks(run_world(_one_rank_refuses, 2, tmp_path, timeout=120))
    assert len(zero) == len(one) == 2, (zero, one)
    assert one[0].startswith("ValueError: repartition_every must be a positive int")
    assert (
        "rank(s) [1] refused their gradient-sync options (rank 1: ValueError: "
        "repartition_every must be a positive int" in zero[0]
    )
    assert zero[1].startswith("ValueError: compressor 'topk' does not take option(s) ['levels']")
    assert "rank(s) [0] refused their gradient-sync options" in one[1] and "levels" in one[1]


def _accumulation(rank: int, world: int) -> dict:
    out = {}
    for comp, opts in (
        ("topk", {"density": 0.1}),
        ("threshold", {"density": 0.1, "collective": "oktopk"}),
    ):
        torch.manual_seed(0)
        a = _net()
        torch.manual_seed(0)
        b = _net()
        model = DDP(a)  # one bucket, as GradientSync's default makes of this model
        hook = sparsetrain.register_ddp_hook(model, comp, **opts)
        sync = sparsetrain.GradientSync(b, comp, **opts)
        worst = 0.0
        for step in range(4):
            a.zero_grad()
            b.zero_grad()
            for micro in range(3):
                x, y = _batch(rank, 10 * step + micro)
                if micro < 2:
                    with model.no_sync():  # accumulate locally, no exchange
                        nn.functional.cross_entropy(model(x), y).backward()
                else:
                    nn.functional.cross_entropy(model(x), y).backward()
                nn.functional.cross_entropy(b(x), y).backward()
            sync.synchronize()
            for p, q in zip(a.parameters(), b.parameters()):
                worst = max(worst, float((p.grad - q.grad).abs().max()))
        out[comp] = (worst, hook.stats()["steps"])
    return out


def test_gradient_accumulation_under_no_sync_exchanges_the_sum_once(tmp_path):
    """DDP's no_sync(): the micro-batches inside it only accumulate, and the hook compresses
    and exchanges the accumulated gradient once, on the backward outside it: exactly what
    GradientSync makes of the same accumulated gradients, one exchange an optimizer step (the
    compressor's state and the residuals advance once a step, not once a micro-batch)."""
    for r in oks(run_world(_accumulation, 2, tmp_path)):
        for comp, (worst, steps) in r.items():
            assert worst == 0.0, (comp, worst)
            assert steps == 4, comp


# ---- ranks whose gradients are on different device types: an error on every rank -----------
def _mixed_devices(rank: int, world: int) -> dict:
    from sparsetrain.sync.config import make_config
    from sparsetrain.sync.ddp_hook import SyncState

    state = SyncState(make_config("none", None, {}), {}, None)
    # Rank 1's model is on a GPU, rank 0's on the CPU. Under "cpu:gloo,cuda:nccl" their first
    # headers would go to different backends and both ranks would wait; the first step's check
    # meets on the CPU, so no GPU is needed here to see it (nothing is put on the GPU).
    device = torch.device("cuda", 0) if rank == 1 else torch.device("cpu")
    out = {}
    try:
        state.engine._begin_step(device)
    except RuntimeError as e:
        out["error"] = str(e)
    # Once the ranks agree, the check runs again and the step goes ahead.
    flat, names, shapes = torch.full((4,), float(rank + 1)), ["w"], [torch.Size([4])]
    out["after"] = state.engine.exchange(flat, names, shapes).tolist()
    return out


def test_ranks_with_gradients_on_different_device_types_fail_on_every_rank(tmp_path):
    zero, one = oks(run_world(_mixed_devices, 2, tmp_path, timeout=120))
    assert "rank(s) [0] on cpu, rank(s) [1] on another" in zero["error"], zero
    assert "rank(s) [1] on cuda, rank(s) [0] on another" in one["error"], one
    assert zero["after"] == one["after"] == [1.5, 1.5, 1.5, 1.5]  # the mean


# ---- the DDP hook among other collectives -------------------------------------------------------
def _flat_params(*nets: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for net in nets for p in net.parameters()])


def _refusals(call) -> list[str]:
    """The message of the ValueError ``call()`` raises, in a list (empty if none)."""
    try:
        call()
    except ValueError as e:
        return [str(e)]
    return []


def _two_models(rank: int, world: int, g_finds_unused: bool) -> float:
    out = {}
    for mode in ("plain", "hook"):
        torch.manual_seed(0)
        g_net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
        d_net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
        g_ddp = DDP(g_net, bucket_cap_mb=0.01, find_unused_parameters=g_finds_unused)
        d_ddp = DDP(d_net, bucket_cap_mb=0.01)
        if mode == "hook":
            sparsetrain.register_ddp_hook(g_ddp, "none")
            sparsetrain.register_ddp_hook(d_ddp, "none")
        opt = torch.optim.SGD([*g_net.parameters(), *d_net.parameters()], lr=0.05)
        for step in range(6):
            x = torch.randn(4, 32, generator=torch.Generator().manual_seed(100 * rank + step))
            opt.zero_grad()
            d_ddp(g_ddp(x)).pow(2).mean().backward()
            opt.step()
        out[mode] = _flat_params(g_net, d_net)
    return float((out["plain"] - out["hook"]).abs().max())


@pytest.mark.parametrize("g_finds_unused", [False, True])
def test_two_hooked_ddp_models_in_one_backward_train_as_plain_ddp(tmp_path, g_finds_unused):
    # A GAN-like D(G(x)): both models' buckets become ready in one backward. With a thread a
    # hook, their collectives went out in a different order on each rank (a gloo size mismatch
    # or a hang); the hooks now share one thread, fed in autograd's order. With G under
    # find_unused_parameters (its exchanges on the backward thread), D's run there too.
    results = run_world(_two_models, 2, tmp_path, g_finds_unused, timeout=120)
    for diff in oks(results):
        assert diff <= 1e-6


def _gathered_loss(rank: int, world: int) -> dict:
    import torch.distributed.nn.functional as dist_nn

    out = {}
    for mode in ("plain", "hook"):
        torch.manual_seed(0)
        net = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32)),
                             "head": nn.Linear(32, 32)})  # fmt: skip
        ddp = DDP(net.enc, bucket_cap_mb=0.001)
        if mode == "hook":
            sparsetrain.register_ddp_hook(ddp, "none", overlap=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(4):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * rank + step))
            opt.zero_grad()
            f = ddp(x)
            everyone = net.head(torch.cat(dist_nn.all_gather(f)))  # its backward gathers too
            (f @ everyone.t()).logsumexp(1).mean().backward()
            opt.step()
        out[mode] = _flat_params(net.enc)
    refused = _refusals(
        lambda: sparsetrain.register_ddp_hook(
            DDP(nn.Linear(4, 4), find_unused_parameters=True), "none", overlap=True
        )
    )
    return {"diff": float((out["plain"] - out["hook"]).abs().max()), "refused": refused}


def test_overlap_false_runs_beside_collectives_in_the_loss_as_plain_ddp(tmp_path):
    # A contrastive loss over all ranks' features: torch.distributed.nn's all_gather issues a
    # collective in backward, which the exchanges on a second thread would pair up with
    # differently on each rank (a hang); overlap=False keeps them on the backward thread.
    for r in oks(run_world(_gathered_loss, 2, tmp_path, timeout=120)):
        assert r["diff"] <= 1e-6
        assert len(r["refused"]) == 1 and "overlap=True" in r["refused"][0]


def _subgroups(rank: int, world: int) -> dict:
    groups = [dist.new_group([0, 1]), dist.new_group([2])]
    mine = groups[0] if rank < 2 else groups[1]
    out = {}
    for mode in ("plain", "hook"):
        torch.manual_seed(0)
        net = _net()
        ddp = DDP(net, process_group=mine)
        if mode == "hook":
            sparsetrain.register_ddp_hook(ddp, "none")  # takes the model's group
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(3):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        out[mode] = _flat_params(net)
    refused = _refusals(  # a group other than the model's
        lambda: sparsetrain.register_ddp_hook(
            DDP(_net(), process_group=mine), "none", process_group=dist.group.WORLD
        )
    )
    # A process_group that leaves rank 2 out, given to a model over every rank: rank 2 got a
    # TypeError naming an int, and ranks 0 and 1 waited for it until the timeout.
    left_out = dist.new_group([0, 1])
    outsider = _refusals(
        lambda: sparsetrain.register_ddp_hook(DDP(_net()), "none", process_group=left_out)
    )
    return {
        "diff": float((out["plain"] - out["hook"]).abs().max()),
        "refused": refused,
        "outsider": outsider,
    }


def test_the_hook_averages_over_the_ddp_models_own_group(tmp_path):
    # Two replicas, on ranks {0, 1} and {2}: the hook averaged over WORLD, mixing them.
    for rank, r in enumerate(oks(run_world(_subgroups, 3, tmp_path, timeout=120))):
        assert r["diff"] <= 1e-6
        assert len(r["refused"]) == 1 and "process_group has the ranks [0, 1, 2]" in r["refused"][0]
        assert len(r["outsider"]) == 1, r
        if rank == 2:
            assert "process_group does not include this rank (2 " in r["outsider"][0]
        else:
            assert "process_group has the ranks [0, 1], but the DDP model" in r["outsider"][0]


class Branchy(nn.Module):
    """Layer b is used only when forward is told to: a parameter DDP can find unused."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(h + self.b(h) if use_b else h)


def _unused_keeps_residual(rank: int, world: int, compressor: str) -> dict:
    import copy

    torch.manual_seed(0)
    net = Branchy()
    ddp = DDP(net, find_unused_parameters=True)
    state = sparsetrain.register_ddp_hook(ddp, compressor, density=0.3)
    weight = net.b.weight
    applied, computed, residuals = torch.zeros_like(weight), torch.zeros_like(weight), []
    for step in range(4):
        use_b = step == 0  # b is used at step 0 only, on every rank
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * rank + step))
        if use_b:  # this rank's own gradient of b, without any exchange
            alone = copy.deepcopy(net)
            alone(x, use_b).pow(2).sum().backward()
            computed += alone.b.weight.grad
        for p in net.parameters():
            p.grad = None
        ddp(x, use_b).pow(2).sum().backward()
        if weight.grad is not None:
            applied += weight.grad
        residuals.append(state.state_dict()["feedback"]["residuals"]["b.weight"].clone())
    # The mean over ranks of what was computed = what was applied + the mean residual left.
    dist.all_reduce(computed)
    left = residuals[-1].reshape(weight.shape).clone()
    dist.all_reduce(left)
    gap = (computed / world - applied - left / world).abs().max()
    return {
        "gap": float(gap),
        "kept": all(torch.equal(r, residuals[0]) for r in residuals[1:]),
        "sent_some": bool(applied.any()),
    }


@pytest.mark.parametrize("compressor", ["topk", "threshold"])
def test_a_parameter_no_rank_used_keeps_its_residual_under_find_unused_parameters(
    tmp_path, compressor
):
    # DDP leaves such a parameter's .grad as it was and drops what the hook returns for it; the
    # hook sent its residual anyway, and at density 0.3 lost about half of its gradient in
    # three steps. Now the residual waits for a step that uses the parameter.
    for r in oks(run_world(_unused_keeps_residual, 2, tmp_path, compressor, timeout=120)):
        assert r["sent_some"] and r["kept"]
        assert r["gap"] <= 1e-5


def _raised_in_backward(rank: int, world: int) -> dict:
    out = {}
    for overlap in (True, False):
        torch.manual_seed(0)
        model = DDP(_net())
        sparsetrain.register_ddp_hook(model, "topk", density=0.5, overlap=overlap)
        x, y = _batch(rank)
        if rank == 1:
            x[0, 0] = math.nan
        try:
            nn.functional.cross_entropy(model(x), y).backward()
            out[overlap] = None
        except RuntimeError as e:
            out[overlap] = str(e)
    return out


def test_backward_under_ddp_raises_the_hooks_error_by_its_type_and_message(tmp_path):
    """DDP's reducer read the exception a hook's future held as its result, and backward
    raised "Unable to cast <message> to Tensor"; now the error's type and text come first."""
    for res in oks(run_world(_raised_in_backward, 2, tmp_path)):
        for overlap, message in res.items():
            assert message is not None, overlap
            assert "Unable to cast" not in message, message
            assert "FloatingPointError: non-finite gradient (NaN or Inf) in 0.weight on rank 1" in (
                message
            ), message


def _loaded_on_one_rank(rank: int, world: int) -> dict:
    out = {}
    for label, compressor, opts in (
        ("warmup", "topk", {"density": 0.1, "dense_warmup_steps": 2}),
        ("randomk", "randomk", {"density": 0.1}),
    ):
        torch.manual_seed(0)
        net = _net()
        sync = sparsetrain.GradientSync(net, compressor, **opts)
        for step in range(3):
            x, y = _batch(rank, step)
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            sync.synchronize()
        saved = sync.state_dict()
        sync = sparsetrain.GradientSync(net, compressor, **opts)
        if rank == 0:
            sync.load_state_dict(saved)
        x, y = _batch(rank, 3)
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        try:
            sync.synchronize()
            out[label] = None
        except RuntimeError as e:
            out[label] = str(e)
        # Loaded on every rank, the same step: it goes on.
        sync = sparsetrain.GradientSync(net, compressor, **opts)
        sync.load_state_dict(saved)
        out[f"{label}-all"] = sync.synchronize()
    # Under the hook, the loading rank holds its buckets to exchange the saved groups: gloo
    # aborted the process on allreduces of other lengths.
    torch.manual_seed(0)
    net = _net()
    model = DDP(net, bucket_cap_mb=0.001)
    state = sparsetrain.register_ddp_hook(model, "randomk", density=0.1)
    for step in range(3):
        x, y = _batch(rank, step)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    saved = state.state_dict()
    torch.manual_seed(0)
    net = _net()
    model = DDP(net, bucket_cap_mb=0.001)
    state = sparsetrain.register_ddp_hook(model, "randomk", density=0.1)
    if rank == 0:
        state.load_state_dict(saved)
    x, y = _batch(rank, 3)
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        out["hook"] = None
    except RuntimeError as e:
        out["hook"] = str(e)
    return out


def test_ranks_whose_loaded_states_are_at_different_steps_raise_together(tmp_path):
    """A state loaded on one rank only put the ranks at different steps: one in the dense
    warm-up's allreduce and the other in the sparse gather (a hang), or random-k drawing
    different indices on each rank (a silently wrong average)."""
    for res in oks(run_world(_loaded_on_one_rank, 2, tmp_path, timeout=120)):
        for label in ("warmup", "randomk", "hook"):
            assert res[label] is not None, label
            assert "rank 0 at step 3, rank 1 at step 0" in res[label], res[label]
        assert res["warmup-all"] and res["randomk-all"]


def _conserved(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    gen = torch.Generator().manual_seed(123 + rank)
    grad = torch.randn(1, 40, generator=gen) * torch.linspace(0.01, 1, 40)
    for collective in ("gtopk", "oktopk", "allgather"):
        for fast in (True, False):
            model = nn.Linear(40, 1, bias=False)
            sync = sparsetrain.GradientSync(model, "topk", density=0.1, collective=collective)
            if not fast:
                sync.engine._sparse_fast_path = lambda: False
            applied = torch.zeros(1, 40, dtype=torch.float64)
            for _ in range(30):
                model.weight.grad = grad.clone()
                assert sync.synchronize()
                applied += model.weight.grad.double()
            held = sync.engine.feedback.residuals["weight"].double().reshape(1, 40)
            owed = torch.stack([held, 30 * grad.double()])
            dist.all_reduce(owed)
            gap = applied + owed[0] / world - owed[1] / world
            out[(collective, fast)] = float(gap.abs().max())
    return out


def test_a_global_selection_loses_nothing_on_three_ranks(tmp_path):
    """gTop-k put back only this rank's values at indices outside the final selection: a
    contribution one merge dropped at an index another branch brought in was neither applied
    nor kept (about 3 of 34 lost over 30 steps of a constant gradient on 3 ranks). The ranks
    that merged keep what they dropped now; over the ranks applied plus residuals is what the
    gradients owe."""
    for res in oks(run_world(_conserved, 3, tmp_path)):
        for case, gap in res.items():
            assert gap < 1e-4, (case, gap)


# ---- a layer frozen after GradientSync was built ------------------------------------------------
def _sync_step(model: nn.Module, sync, g: torch.Generator) -> None:
    x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    sync.synchronize()


def _frozen_on_one_rank(rank: int, world: int) -> dict:
    out = {}
    for name in ("threshold", "topk", "none"):  # fused selection, sparse path, dense path
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5))
        sync = sparsetrain.GradientSync(model, name, density=None if name == "none" else 0.1)
        g = torch.Generator().manual_seed(rank)
        _sync_step(model, sync, g)
        if rank == 1:
            model[0].weight.requires_grad_(False)
        try:
            _sync_step(model, sync, g)
            out[name] = None
        except RuntimeError as e:
            out[name] = str(e)
        model[0].weight.requires_grad_(True)  # the same again on every rank: steps go on
        _sync_step(model, sync, g)
        out[name + "_stats"] = sync.stats()
    return out


def test_a_parameter_frozen_on_some_ranks_only_raises_on_every_rank(tmp_path):
    """Before, the rank that froze it sent zeros in its place and the others averaged their
    gradients with them: the ranks' copies of the layer drifted apart without an error."""
    for res in oks(run_world(_frozen_on_one_rank, 3, tmp_path)):
        for name in ("threshold", "topk", "none"):
            assert res[name] is not None, name
            assert "'0.weight' frozen on rank(s) [1], trainable on [0, 2]" in res[name]
            assert "0.bias" not in res[name]
            stats = res[name + "_stats"]
            assert stats["steps"] == 3 and stats["skipped_steps"] == 1, stats


def _frozen_later(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5))
    first = model[0]
    sync = sparsetrain.GradientSync(model, "topk", density=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)

    def step(held: torch.Tensor | None = None) -> None:
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if held is not None:
            first.weight.grad = held
        sync.synchronize()
        opt.step()

    for _ in range(3):
        step()
    had_residual = bool(sync.engine.feedback.residuals["0.weight"].abs().sum() > 0)
    first.requires_grad_(False)  # fine-tune the head only from here
    frozen = [t.detach().clone() for t in first.parameters()]
    head = model[1].weight.detach().clone()
    for _ in range(3):
        step()
    out = {
        "had_residual": had_residual,
        "frozen_moved": any(not torch.equal(a, b) for a, b in zip(frozen, first.parameters())),
        "frozen_grads": [t.grad for t in first.parameters()],
        "head_moved": not torch.equal(head, model[1].weight),
        "residual_dropped": float(sync.engine.feedback.residuals["0.weight"].abs().sum()),
    }
    # A gradient a frozen parameter still holds is left as it was (SGD then applies it).
    step(held=torch.full_like(first.weight, 2.0))
    out["kept_grad"] = bool(first.weight.grad.eq(2.0).all())
    first.requires_grad_(True)  # and unfrozen, it trains again, the same on every rank
    step()
    out["unfrozen_moved"] = not torch.equal(frozen[0], first.weight)
    out["weights"] = [t.detach().clone() for t in model.parameters()]
    return out


def test_a_layer_frozen_after_gradient_sync_was_built_stays_still(tmp_path):
    """Before, its zero gradient was exchanged with the residual it had built up, and the
    average that came back moved the frozen weights (and gave them a gradient)."""
    res = oks(run_world(_frozen_later, 2, tmp_path))
    for r in res:
        assert r["had_residual"], r  # so sending it would have moved the layer
        assert not r["frozen_moved"] and r["frozen_grads"] == [None, None], r
        assert r["head_moved"] and r["residual_dropped"] == 0.0, r
        assert r["kept_grad"] and r["unfrozen_moved"], r
    for a, b in zip(res[0]["weights"], res[1]["weights"]):
        assert torch.equal(a, b)


# ---- DDP's rebuilt buckets: no state kept for its first ones ---------------------------------
def _rebuilt_buckets(rank: int, world: int) -> dict:
    out = {}
    for label, options in [
        ("threshold+oktopk", {"compressor": "threshold", "density": 0.1,
                                    "collective": "oktopk"}),
        ("safeguard", {"compressor": "none", "aggregator": "safeguard"}),
        ("powersgd", {"compressor": "powersgd"}),
    ]:  # fmt: skip
        torch.manual_seed(0)
        net = _net()
        model = DDP(net, bucket_cap_mb=0.001)  # several buckets, regrouped after the first step
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        options = dict(options)
        state = sparsetrain.register_ddp_hook(model, options.pop("compressor"), **options)
        for step in range(4):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sd = state.state_dict()
        per_key = {"compressor": sd["compressor"]} if sd["compressor"] else {}  # none: nothing
        if "collectives" in sd:
            per_key["oktopk"] = sd["collectives"]["oktopk"]["keys"]
        if "aggregator" in sd:
            per_key["safeguard"] = sd["aggregator"]["acc"]
        for part, keyed in per_key.items():
            if part == "compressor" and label == "powersgd":
                keyed = keyed["q"]
            out[f"{label}: {part}"] = sorted(n for key in keyed for n in key.split("|"))
        out[f"{label}: parameters"] = sorted(n for n, _ in net.named_parameters())
        out[f"{label}: groups"] = sd["ddp_groups"]
    return out


def test_state_kept_for_ddps_first_buckets_is_dropped_once_it_rebuilds_them(tmp_path):
    """Before, per-key state of DDP's first buckets (a threshold, Ok-Topk's edges, Safeguard's
    accumulations, PowerSGD's Q) stayed for the whole run and in every checkpoint, each
    parameter under two keys, and Safeguard counted the stale accumulations in its
    distances."""
    for res in oks(run_world(_rebuilt_buckets, 2, tmp_path)):
        for label in ("threshold+oktopk", "safeguard", "powersgd"):
            names = res[f"{label}: parameters"]
            assert len(res[f"{label}: groups"]) > 1, res  # several buckets
            for part, named in res.items():
                if part.startswith(f"{label}: ") and not part.endswith(("parameters", "groups")):
                    # Each parameter under one key at most (PowerSGD keeps no Q for biases).
                    assert named and len(named) == len(set(named)), (part, named)
                    assert set(named) <= set(names), (part, named)


# ---- from a review of the above -----------------------------------------------------------------
class _SometimesExtra(nn.Module):
    def __init__(self, use_extra: bool):
        super().__init__()
        self.a, self.extra, self.b = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 5)
        self.use_extra = use_extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h + self.extra(h) if self.use_extra else h)


def _unused_on_one_rank(rank: int, world: int, residuals: str) -> dict:
    """Under find_unused_parameters, a layer only rank 0 uses: over all ranks, residuals
    before plus gradients must equal residuals after plus what was applied, every step."""
    import copy

    torch.manual_seed(0)
    net = _SometimesExtra(use_extra=rank == 0)
    model = DDP(net, find_unused_parameters=True)
    state = sparsetrain.register_ddp_hook(
        model, "threshold", density=0.05, collective="oktopk",
        collective_options={"residuals": residuals},
    )  # fmt: skip
    feedback = state.engine.feedback
    params = dict(net.named_parameters())

    def residual(n: str) -> torch.Tensor:
        r = feedback.residuals.get(n)
        return torch.zeros(params[n].numel(), dtype=torch.float64) if r is None else r.double()

    worst: dict[str, float] = {}
    for step in range(8):
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
        ref = copy.deepcopy(net)
        nn.functional.cross_entropy(ref(x), y).backward()
        local = {n: p.grad for n, p in ref.named_parameters()}
        before = {n: residual(n).reshape(-1).clone() for n in params}
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in params.items():
            mine = torch.zeros(params[n].numel(), dtype=torch.float64)
            if local[n] is not None:
                mine += local[n].double().reshape(-1)
            applied = p.grad.double().reshape(-1) if p.grad is not None else torch.zeros_like(mine)
            t = torch.stack([before[n] + mine - residual(n).reshape(-1) - applied, mine])
            dist.all_reduce(t)
            worst[n] = max(worst.get(n, 0.0), float(t[0].norm()) / max(float(t[1].norm()), 1e-30))
    return worst


@pytest.mark.parametrize("residuals", ["local", "owner"])
def test_a_layer_one_rank_leaves_unused_loses_nothing_in_its_residuals(residuals, tmp_path):
    """Before, with residuals="owner", the owner of the unused layer's region added the other
    rank's dropped sums to its residual, and putting back the residual set aside for that
    step replaced them: up to 74% of a step's gradient was neither applied nor kept."""
    for worst in oks(run_world(_unused_on_one_rank, 2, tmp_path, residuals)):
        assert max(worst.values()) < 1e-5, worst


def _separator_in_names(rank: int, world: int) -> dict:
    out = {}
    for middle in ("a_b", "a|b"):  # a ModuleDict key may hold the keys' separator
        torch.manual_seed(0)
        model = nn.ModuleDict({"m": nn.ModuleDict({middle: nn.Linear(16, 16)}),
                               "b": nn.Linear(16, 16)})  # fmt: skip
        sync = sparsetrain.GradientSync(
            model, "threshold", density=0.1, collective="oktopk", bucket_cap_mb=0.0005
        )  # a bucket a parameter
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        kept = []
        for _ in range(4):
            x = torch.randn(8, 16, generator=g)
            opt.zero_grad()
            model["b"](model["m"][middle](x)).square().mean().backward()
            sync.synchronize()
            opt.step()
            kept.append((len(sync.engine.compressor._keys),
                         len(sync.engine._collectives["oktopk"]._keys)))  # fmt: skip
        out[middle] = {"kept": kept, "weights": [p.detach().clone() for p in model.parameters()]}
    return out


def test_names_that_hold_the_key_separator_keep_their_state(tmp_path):
    """Keys join the bucket's names with "|"; a name holding "|" split into pieces that
    overlapped other buckets, and each first use dropped the others' state, every step."""
    for res in oks(run_world(_separator_in_names, 2, tmp_path)):
        assert res["a|b"]["kept"] == [(4, 4)] * 4, res["a|b"]["kept"]
        for a, b in zip(res["a_b"]["weights"], res["a|b"]["weights"]):
            assert torch.equal(a, b)


def _frozen_and_resumed(rank: int, world: int, path: str) -> dict:
    def build() -> tuple[nn.Module, sparsetrain.GradientSync]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5))
        return model, sparsetrain.GradientSync(model, "topk", density=0.1)

    model, sync = build()
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    sync.synchronize()
    model[0].requires_grad_(False)  # frozen after building, then saved
    torch.save(sync.state_dict(), f"{path}.{rank}")
    # The resumed run freezes before building: the state holds the frozen layer's residual.
    torch.manual_seed(0)
    again = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5))
    again[0].requires_grad_(False)
    resumed = sparsetrain.GradientSync(again, "topk", density=0.1)
    saved = torch.load(f"{path}.{rank}", weights_only=False)
    try:  # other buckets (the frozen layer is in none): not an exact resume
        resumed.load_state_dict(saved)
        refused = None
    except ValueError as e:
        refused = str(e)
    resumed.load_state_dict(saved, strict=False)
    # Unfrozen, that layer is in no bucket: every step is refused on every rank (a warning
    # was given once, and the ranks' copies of the layer drifted apart).
    again[0].requires_grad_(True)
    caught = []
    for _ in range(2):
        again.zero_grad()
        nn.functional.cross_entropy(again(x), y).backward()
        try:
            resumed.synchronize()
        except ValueError as e:
            caught.append(str(e))
    # Frozen again, the steps go on.
    again[0].requires_grad_(False)
    again.zero_grad()
    nn.functional.cross_entropy(again(x), y).backward()
    went_on = resumed.synchronize()
    # Another bucket_cap_mb: refused too, naming it.
    model, sync = build()
    smaller = sparsetrain.GradientSync(model, "topk", density=0.1, bucket_cap_mb=0.0001)
    try:
        smaller.load_state_dict(sync.state_dict())
    except ValueError as e:
        other_cap = str(e)
    return {"unfrozen": caught, "went_on": went_on, "refused": refused, "other_cap": other_cap}


def test_a_state_saved_after_freezing_loads_where_the_layer_is_frozen_before_building(tmp_path):
    """Before, it was refused as another model's state (the frozen layer was in no bucket),
    with strict=False too; now strict=True names the buckets that differ (another
    bucket_cap_mb was not noticed at all) and strict=False takes it."""
    for res in oks(run_world(_frozen_and_resumed, 2, tmp_path, str(tmp_path / "ckpt"))):
        assert res["refused"].startswith(
            "GradientSync: this state was saved with other buckets of parameters (other "
            "trained parameters, another model's or other ones frozen: saved with 0.bias, "
            "0.weight)"
        ), res
        assert "(1 bucket(s) saved against 4 now: another bucket_cap_mb?)" in res["other_cap"], res
        assert len(res["unfrozen"]) == 2, res
        for message in res["unfrozen"]:
            assert message.startswith(
                "GradientSync: parameter(s) 0.weight, 0.bias were frozen when it was built (or "
                "added) and are trainable now, so no bucket holds them"
            ), res
        assert res["went_on"] is True, res


def _all_frozen_then_one_unfrozen(rank: int, world: int) -> str:
    torch.manual_seed(0)
    model = _net().requires_grad_(False)
    sync = sparsetrain.GradientSync(model, "none")
    assert not sync.buckets
    next(model.children()).requires_grad_(True)
    x, y = _batch(rank)
    nn.functional.cross_entropy(model(x), y).backward()
    try:
        sync.synchronize()
    except ValueError as e:
        return str(e)
    return "not refused"


def test_gradient_sync_built_with_every_layer_frozen_refuses_one_unfrozen(tmp_path):
    """No bucket carried the refusal, so it never went out: the layer trained on each rank
    apart, without an error or a warning (the message of the step that agrees on finiteness
    carries a refusal, and with no bucket there is none)."""
    for said in oks(run_world(_all_frozen_then_one_unfrozen, 2, tmp_path)):
        assert "were frozen when it was built (or added) and are trainable now" in said, said


def _raised_step(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(net, "topk", density=0.3, bucket_cap_mb=0.001)
    first = next(net.parameters())  # registered first, so in the last bucket exchanged

    def backward(step: int, poison: bool = False) -> None:
        net.zero_grad()
        x, y = _batch(rank, step)
        nn.functional.cross_entropy(net(x), y).backward()
        if poison:
            first.grad.view(-1)[0] = float("nan")

    backward(0)
    sync.synchronize()
    before = {n: r.clone() for n, r in sync.engine.feedback.residuals.items()}
    backward(1, poison=rank == 1)
    try:
        sync.synchronize()
        raised = None
    except FloatingPointError as e:
        raised = str(e)
    after = sync.engine.feedback.residuals
    same = sorted(n for n in before if torch.equal(before[n], after[n]))
    backward(2)
    return {"raised": raised, "same": same, "names": sorted(before),
            "next_ok": sync.synchronize(), "skipped": sync.stats()["skipped_steps"]}  # fmt: skip


def test_a_step_that_raised_keeps_the_residuals_it_started_with(tmp_path):
    """With the default on_nonfinite="raise", the buckets exchanged before the one holding NaN
    had already taken what they sent out of their residuals: a caller that catches the error
    and skips the batch lost it (the documentation promised the residuals from before)."""
    for res in oks(run_world(_raised_step, 2, tmp_path)):
        assert res["raised"] and "non-finite gradient" in res["raised"], res
        assert res["same"] == res["names"] and len(res["names"]) > 1, res
        assert res["next_ok"] and res["skipped"] == 1, res


# ---- a state loaded by another rank, or by a run of another size --------------------------------
def _hook_step(model: nn.Module, rank: int, step: int) -> str | None:
    x, y = _batch(rank, step)
    model.zero_grad()
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    except RuntimeError as e:
        return str(e)
    return None


def _loaded_elsewhere(rank: int, world: int, path: str) -> dict:
    torch.manual_seed(0)
    model = DDP(_net())
    state = sparsetrain.register_ddp_hook(model, "threshold", density=0.1)
    for step in range(3):
        _hook_step(model, rank, step)
    torch.save(state.state_dict(), os.path.join(path, f"rank{rank}.pt"))
    with open(os.path.join(path, f"hook{rank}.pkl"), "wb") as f:
        pickle.dump(state, f)
    dist.barrier()
    single = torch.load(os.path.join(path, "single.pt"), weights_only=False)
    out = {}
    for case in ("rank0", "fewer", "rank0_not_strict", "own", "pickled_rank0", "pickled_own"):
        torch.manual_seed(0)
        model = DDP(_net())
        state = sparsetrain.register_ddp_hook(model, "threshold", density=0.1)
        if case == "fewer":  # saved by a run of 1 rank, loaded on rank 0 only
            if rank == 0:
                state.load_state_dict(single)
        elif case.startswith("pickled"):  # unpickled, then handed over as the README says
            mine = "hook0.pkl" if case == "pickled_rank0" else f"hook{rank}.pkl"
            with open(os.path.join(path, mine), "rb") as f:
                state.load_state_dict(pickle.load(f).state_dict())
        else:
            mine = "rank0.pt" if case.startswith("rank0") else f"rank{rank}.pt"
            saved = torch.load(os.path.join(path, mine), weights_only=False)
            state.load_state_dict(saved, strict=case != "rank0_not_strict")
        out[case] = _hook_step(model, rank, 3)
    return out


def test_a_state_saved_by_another_rank_or_world_size_is_refused_on_every_rank(tmp_path):
    """Before, every rank loading rank 0's file (the habit of saving on rank 0 only) or a run
    resumed on another number of ranks was taken without a word, and the first step applied
    another update: one rank's residuals counted on every rank, or some ranks' lost."""
    torch.manual_seed(0)
    model = _net()
    sync = sparsetrain.GradientSync(model, "threshold", density=0.1)  # one process: world 1
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    sync.synchronize()
    # As a hook's state (a hook refuses GradientSync's, whose buckets are not DDP's groups).
    single = {k: v for k, v in sync.state_dict().items() if k != "buckets"} | {"ddp_groups": None}
    assert (single["rank"], single["world"]) == (0, 1)
    torch.save(single, tmp_path / "single.pt")
    for r in oks(run_world(_loaded_elsewhere, 2, tmp_path, str(tmp_path))):
        assert (
            "ranks loaded gradient sync states saved by other ranks (rank 1 the state of "
            "rank 0)" in r["rank0"]
        ), r
        assert "each rank must load the state it saved itself" in r["rank0"]
        assert (
            "saved by a run of another number of ranks (ranks [0] loaded states saved by a run of 1); "
            "this run has 2" in r["fewer"]
        ), r
        assert r["rank0_not_strict"] is None and r["own"] is None, r
        # A pickled state is rebuilt on the default group (here, in a process without one): it
        # still says whose it is, so rank 0's is refused on rank 1 and each rank's own is taken.
        assert "rank 1 the state of rank 0" in r["pickled_rank0"] and r["pickled_own"] is None, r
    for rank in range(2):
        with open(tmp_path / f"hook{rank}.pkl", "rb") as f:
            offline = pickle.load(f).state_dict()
        assert (offline["rank"], offline["world"]) == (rank, 2)


# ---- torch.compile: DDP's graph split at the buckets calls the hook as eager DDP does -------
def _compiled(rank: int, world: int) -> dict:
    def train(compiled: bool, comp: str, opts: dict) -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(48, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        # Two buckets: dynamo's DDPOptimizer compiles one graph a bucket (it needs the first
        # bucket no larger than the others: DDP's first is 1 MiB).
        ddp = DDP(net, bucket_cap_mb=1.0)
        sparsetrain.register_ddp_hook(ddp, comp, **opts)
        model = torch.compile(ddp, backend="aot_eager") if compiled else ddp
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.repeat(1, 4)), y).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    out = {}
    for comp, opts in (
        ("topk", {"density": 0.1}),
        ("threshold", {"density": 0.1, "collective": "oktopk"}),
        ("powersgd", {}),
    ):
        eager, compiled = train(False, comp, opts), train(True, comp, opts)
        out[comp] = float((eager - compiled).abs().max()), float(eager.abs().sum())
    return out


def test_a_ddp_model_under_torch_compile_trains_as_the_eager_one(tmp_path):
    """torch.compile(ddp_model), as DDP users write it: dynamo splits the model into a graph a
    bucket and DDP's reducer calls the hook on each bucket, so the weights after three steps
    are bit for bit those of the eager model (with aot_eager, which needs no C compiler)."""
    for r in oks(run_world(_compiled, 2, tmp_path)):
        for comp, (diff, size) in r.items():
            assert diff == 0.0 and size > 0, (comp, diff)


def _changed_on_one_rank(rank: int, world: int) -> dict:
    out = {}
    for compressor in ("topk", "none"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        sync = sparsetrain.GradientSync(
            model, compressor, **({"density": 0.5} if compressor == "topk" else {})
        )
        x = torch.randn(4, 6)
        model(x).sum().backward()
        sync.synchronize()
        # A frozen module added on every rank (a teacher, say) is no new trainable parameter.
        model.add_module("teacher", nn.Linear(3, 3).requires_grad_(False))
        model(x).sum().backward()
        out[compressor + "_frozen_added"] = sync.synchronize()
        if rank == 0:  # this rank alone replaces the head
            model[2] = nn.Linear(8, 3)
        for call in ("", "_again"):  # every call refuses, not the first only
            model.zero_grad()
            model(x).sum().backward()
            try:
                sync.synchronize()
                out[compressor + call] = None
            except ValueError as e:
                out[compressor + call] = str(e)
    return out


def test_a_layer_replaced_on_one_rank_raises_on_every_rank(tmp_path):
    """It raised on the rank that replaced it only, and the others waited for it until the
    collective timed out."""
    res = oks(run_world(_changed_on_one_rank, 2, tmp_path))
    for rank, r in enumerate(res):
        for compressor in ("topk", "none"):
            assert r[compressor + "_frozen_added"] is True, r
            for got in (r[compressor], r[compressor + "_again"]):
                if rank == 0:
                    assert got.startswith("GradientSync: parameter(s) 2.weight, 2.bias are not "
                                          "those it was built with"), r  # fmt: skip
                else:
                    assert got.startswith("1 other rank(s) refused this step; see their"), r


def _no_group_on_one_rank(rank: int, world: int) -> dict:
    try:
        sparsetrain.GradientSync(
            nn.Linear(4, 2), "topk", density=0.5, process_group="world" if rank == 1 else None
        )
    except (TypeError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def test_a_process_group_that_is_no_group_on_one_rank_raises_on_every_rank(tmp_path):
    # It raised on that rank alone; the others waited in the settings' gather until the timeout.
    res = oks(run_world(_no_group_on_one_rank, 2, tmp_path))
    assert res[1]["error"].startswith("TypeError: process_group must be a torch.distributed"), res
    assert res[0]["error"].startswith("ValueError: sparsetrain: rank(s) [1] refused their "
                                      "gradient-sync options (rank 1: TypeError: process_group"), res  # fmt: skip


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _channels_last_step(model: nn.Module, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(4, 3, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    ((model(x) - torch.randn(4, 4, generator=g)) ** 2).mean().backward()


def _channels_last(rank: int, world: int, path: str) -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    for comp, opts in [("randomk", {"density": 0.2}), ("powersgd", {"rank": 1})]:
        torch.manual_seed(0)
        a = _ConvNet().to(memory_format=torch.channels_last)
        b = _ConvNet().to(memory_format=torch.channels_last)
        b.load_state_dict(a.state_dict())
        model = DDP(a)
        sparsetrain.register_ddp_hook(model, comp, **opts)
        sync = sparsetrain.GradientSync(b, comp, **opts)
        worst = 0.0
        for step in range(3):
            a.zero_grad()
            b.zero_grad()
            _channels_last_step(model, rank, step)
            _channels_last_step(b, rank, step)
            sync.synchronize()
            worst = max(worst, float((a.conv.weight.grad - b.conv.weight.grad).abs().max()))
        out[comp] = worst
    # A pruner's mask clears the residuals at its (row-major) positions and nowhere else.
    torch.manual_seed(0)
    net = _ConvNet().to(memory_format=torch.channels_last)
    model = DDP(net, bucket_cap_mb=0.0001)  # several buckets: DDP rebuilds them after a step
    state = sparsetrain.register_ddp_hook(model, "topk", density=0.05)
    _channels_last_step(model, rank, 0)
    before = state.engine.feedback.residuals["conv.weight"].clone().view(8, 3, 3, 3)
    local = _ConvNet().to(memory_format=torch.channels_last)
    local.load_state_dict(net.state_dict())  # (no step taken: the weights it started from)
    _channels_last_step(local, rank, 0)
    kept = before != 0  # the residual is the local gradient where it was not sent
    out["residual_is_local_grad"] = bool(torch.equal(before[kept], local.conv.weight.grad[kept]))
    pruned = torch.zeros(8, 3, 3, 3, dtype=torch.bool)
    pruned[0, 0] = True
    state.clear_residuals({net.conv.weight: pruned})
    after = state.engine.feedback.residuals["conv.weight"].view(8, 3, 3, 3)
    out["cleared"] = bool(
        (after[pruned] == 0).all() and torch.equal(after[~pruned], before[~pruned])
    )
    # Resumed in the first step after a load (the saved groups, before DDP rebuilds its
    # buckets), the run goes on as the uninterrupted one.
    runs = []
    for resume in (False, True):
        torch.manual_seed(0)
        net = _ConvNet().to(memory_format=torch.channels_last)
        model = DDP(net, bucket_cap_mb=0.0001)
        state = sparsetrain.register_ddp_hook(model, "randomk", density=0.2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        start = 0
        if resume:
            ckpt = torch.load(f"{path}.{rank}", weights_only=False)
            net.load_state_dict(ckpt["model"])
            state.load_state_dict(ckpt["hook"])
            start = 3
        for step in range(start, 6):
            opt.zero_grad()
            _channels_last_step(model, rank, step)
            opt.step()
            if not resume and step == 2:
                torch.save(
                    {"model": net.state_dict(), "hook": state.state_dict()}, f"{path}.{rank}"
                )
        runs.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    out["resumed_exactly"] = bool(torch.equal(*runs))
    return out


def test_channels_last_weights_are_exchanged_and_masked_in_row_major_order(tmp_path):
    """DDP lays a channels_last weight's gradient out in its bucket in NHWC order. The hook kept
    residuals and selected in that order, so a pruner's mask (row-major) cleared the residuals
    of other weights, and the hook's randomk and PowerSGD averages differed from GradientSync's
    (by 0.47 and 0.05) on the same gradients."""
    for res in oks(run_world(_channels_last, 2, tmp_path, str(tmp_path / "ckpt"))):
        assert res == {
            "randomk": 0.0,
            "powersgd": 0.0,
            "residual_is_local_grad": True,
            "cleared": True,
            "resumed_exactly": True,
        }, res


def _qsgd_half(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for aggregator in (None, "mean", "median"):
        net = nn.Linear(512, 1, bias=False).half()
        opts = {"levels": 7, "bucket_size": 512}
        if aggregator:
            opts["aggregator"] = aggregator
        sync = sparsetrain.GradientSync(net, "qsgd", **opts)
        net.weight.grad = torch.full((1, 512), 25000.0 if rank == 0 else 0.0).half()
        try:
            sync.synchronize()
            grad = net.weight.grad.float()
            out[str(aggregator)] = (bool(torch.isfinite(grad).all()), float(grad.abs().max()))
        except FloatingPointError as e:
            out[str(aggregator)] = str(e)
    return out


def test_qsgd_averages_half_gradients_whose_levels_pass_the_half_range(tmp_path):
    """A rank's QSGD levels (norm / s = 80,812 for 25,000 in a bucket of 512) pass float16's
    range where the ranks' average (40,406) does not: each rank's decode was cast to float16
    (Inf) before the sum, and before a robust rule, and the finite step was refused."""
    for res in oks(run_world(_qsgd_half, 2, tmp_path)):
        for aggregator, got in res.items():
            assert isinstance(got, tuple) and got[0] and 0 < got[1] < 65504, (aggregator, got)


def _ddp_within_sync_across(rank: int, world: int) -> tuple:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    sync = sparsetrain.GradientSync(model, "topk", density=0.5)
    alone = [dist.new_group([r]) for r in range(world)]  # (every rank makes every group)
    ddp = DDP(model, process_group=alone[rank])  # over other ranks than GradientSync's
    ddp(torch.ones(3, 4)).sum().backward()
    synced = sync.synchronize()
    # A DDP of a child layer: over a rank's own group let be, over the same ranks refused
    outer = nn.Sequential(DDP(nn.Linear(4, 4), process_group=alone[rank]), nn.Linear(4, 2))
    sparsetrain.GradientSync(outer, "topk", density=0.5)
    try:
        sparsetrain.GradientSync(nn.Sequential(DDP(nn.Linear(4, 4)), nn.Linear(4, 2)), "topk")
        child = None
    except ValueError as e:
        child = str(e)
    try:
        DDP(model)(torch.ones(3, 4))  # over the same ranks: each step averaged twice
    except RuntimeError as e:
        return synced, str(e), child
    return synced, None, child


def test_a_plain_ddp_around_a_gradient_syncs_model_is_refused_on_every_rank_over_its_ranks_only(
    tmp_path,
):
    """A hierarchy (DDP over a rank's own group, GradientSync across) averages different
    things and is let be; a DDP over GradientSync's ranks is refused in its forward, on every
    rank, rather than averaging every step twice."""
    for synced, error, child in oks(run_world(_ddp_within_sync_across, 2, tmp_path)):
        assert synced
        assert error is not None and "forward of a DistributedDataParallel over the same" in error
        # (its forward runs inside the model's, so the forward's check never saw it)
        assert "module '0' is a DistributedDataParallel over the same ranks" in (child or "")


def _hook_on_one_rank(rank: int, world: int) -> dict:
    import datetime
    import io
    from contextlib import redirect_stderr

    from sparsetrain.sync import config

    config.ARRIVAL_WARN_S = 1.0
    dist.distributed_c10d._get_default_store().set_timeout(datetime.timedelta(seconds=6))
    model = DDP(_net())
    err = io.StringIO()
    try:
        if rank == 0:  # the user's `if rank == 0:` around the registration
            with redirect_stderr(err):
                sparsetrain.register_ddp_hook(model, "topk", density=0.1)
        else:
            x, y = _batch(rank)
            nn.functional.cross_entropy(model(x), y).backward()  # plain DDP's allreduce
        return {"error": None, "stderr": err.getvalue()}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(e).__name__}: {e}", "stderr": err.getvalue()}


def test_a_rank_that_never_registers_the_hook_is_named_not_waited_for_silently(tmp_path):
    # Rank 0 waited in the settings' gather, without a word, until the process group's
    # timeout (30 minutes under gloo's default), while rank 1 waited in DDP's allreduce.
    first, second = oks(run_world(_hook_on_one_rank, 2, tmp_path, timeout=120))
    # (the store is polled: the seconds printed are at least those set)
    said = r"rank 0 has waited [1-5] s: rank\(s\) \[1\] of 2 have not set up the gradient sync"
    assert re.search(said, first["stderr"]), first
    assert re.match(
        r"RuntimeError: sparsetrain: rank 0 waited [6-9] s, the process group's timeout: "
        r"rank\(s\) \[1\] of 2 have not set up",
        first["error"],
    ), first
    assert second["error"] is not None  # its allreduce lost its peer, or timed out


def _changed_after_building(rank: int, world: int) -> dict:
    out = {}
    torch.manual_seed(0)
    net = _net()
    sync = sparsetrain.GradientSync(net, "topk", density=0.1)
    net.to(torch.float64)  # after building: its buckets were typed and sized for float32
    x, y = _batch(rank)
    nn.functional.cross_entropy(net(x.double()), y).backward()
    try:
        sync.synchronize()
        out["dtype"] = None
    except (ValueError, RuntimeError) as e:
        out["dtype"] = f"{type(e).__name__}: {e}"
    net.zero_grad()
    again = sparsetrain.GradientSync(net, "topk", density=0.1)  # built after .to(): fine
    newer = sparsetrain.GradientSync(net, "topk", density=0.1)  # supersedes `again`
    nn.functional.cross_entropy(net(x.double()), y).backward()
    try:
        again.synchronize()
        out["old"] = None
    except RuntimeError as e:
        out["old"] = str(e)
    out["new"] = newer.synchronize()
    out["old_state"] = sorted(again.state_dict())  # still reads, for new.load_state_dict
    # Called again with no backward in between: the averaged gradients would be averaged and
    # their residuals kept again. Refused on every rank; a backward after it goes on.
    try:
        newer.synchronize()
        out["twice"] = None
    except (ValueError, RuntimeError) as e:
        out["twice"] = str(e)
    nn.functional.cross_entropy(net(x.double()), y).backward()
    out["after"] = newer.synchronize()
    return out


def test_a_model_changed_or_synced_anew_after_building_is_named_on_every_rank(tmp_path):
    """A dtype change after building trained silently with buckets of the old sizes (and
    its state could not be loaded by a GradientSync built for the new model), and two
    GradientSyncs over one model exchanged every gradient twice."""
    for res in oks(run_world(_changed_after_building, 2, tmp_path)):
        assert "changed dtype or device since it was built" in res["dtype"], res
        assert "torch.float32 on cpu, now torch.float64 on cpu" in res["dtype"], res
        assert "a newer GradientSync was built over this model's parameters" in res["old"], res
        assert res["new"] is True and "buckets" in res["old_state"]
        assert "synchronize() was called again with no backward" in (res["twice"] or ""), res
        assert res["after"] is True
