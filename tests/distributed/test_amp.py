"""Mixed precision: the DDP hook and GradientSync with a torch.amp.GradScaler, on gloo ranks.

A scaler multiplies the loss, hence every gradient, by its scale, which halves after a step that
overflowed and grows now and then. What a user relies on:

- an overflow on any rank reaches the scaler on every rank (every gradient NaN), so
  ``scaler.step`` skips the step everywhere and lowers the scale, and the residuals stay as
  they were before the step;
- residuals and kept thresholds follow the scale, so a run with a scaler sends exactly what the
  same run without one sends, times the scale (the scaler's factors are powers of two);
- the state remembers the scale it is in, so a resumed run, with a scaler or without, goes on
  exactly.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetrain

from .harness import oks, run_world
from .test_sync import Branchy

# A scale for each step: changes by the scaler's factors and by jumps, while thresholds are
# reused (reestimate_every=4, Ok-Topk's threshold_every=32).
SCALES = [2.0**12, 2.0**12, 2.0**11, 2.0**13, 2.0**13, 2.0**10, 2.0**10, 2.0**14, 2.0**14]

CONFIGS = [
    ("threshold", {"density": 0.05, "reestimate_every": 4}),
    ("threshold", {"density": 0.05, "reestimate_every": 4, "collective": "oktopk"}),
    ("threshold", {"density": 0.05, "collective": "gtopk"}),
    ("topk", {"density": 0.05, "collective": "ssar_split"}),
    ("topk", {"density": 0.05, "momentum_correction": 0.9}),
    ("signsgd", {}),
]


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)
    )


def _scaler(scale: float) -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones(()))  # makes its scale tensor, which update(new_scale=) fills
    return scaler


def _grads(net: nn.Module, rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    # Heavy tails, as gradients have: the selections depend on the magnitudes' spread.
    return [torch.randn(p.shape, generator=g) ** 3 * 1e-3 for p in net.parameters()]


def _backward_to(model: DDP, net: nn.Module, grads: list[torch.Tensor]) -> None:
    """A DDP backward whose gradient is ``grads``: the hook sees exactly these values (the
    forward through DDP only prepares its reducer and adds zero)."""
    loss = model(torch.zeros(1, 20)).sum() * 0.0 + sum(
        (p * g).sum() for p, g in zip(net.parameters(), grads)
    )
    net.zero_grad(set_to_none=True)
    loss.backward()


def _scaled_equivalence(rank: int, world: int) -> dict:
    out = {}
    for compressor, opts in CONFIGS:
        for how in ("gradient_sync", "ddp"):
            plain_net, scaled_net = _net(), _net()
            scaler = _scaler(SCALES[0])
            if how == "ddp":
                plain_model, scaled_model = DDP(plain_net), DDP(scaled_net)
                plain = sparsetrain.register_ddp_hook(plain_model, compressor, **opts)
                scaled = sparsetrain.register_ddp_hook(
                    scaled_model, compressor, grad_scaler=scaler, **opts
                )
            else:
                plain = sparsetrain.GradientSync(plain_net, compressor, **opts)
                scaled = sparsetrain.GradientSync(
                    scaled_net, compressor, grad_scaler=scaler, **opts
                )
            worst = 0.0
            for step, scale in enumerate(SCALES):
                scaler.update(new_scale=scale)
                grads = _grads(plain_net, rank, step)
                if how == "ddp":
                    # The gradient reaches the bucket through DDP's backward of a loss whose
                    # gradient is `grads` (times the scale for the scaled model).
                    for model, net, s in (
                        (plain_model, plain_net, 1.0),
                        (scaled_model, scaled_net, scale),
                    ):
                        _backward_to(model, net, [g * s for g in grads])
                else:
                    for p, g in zip(plain_net.parameters(), grads):
                        p.grad = g.clone()
                    for p, g in zip(scaled_net.parameters(), grads):
                        p.grad = g * scale
                    plain.synchronize()
                    scaled.synchronize()
                for p, q in zip(plain_net.parameters(), scaled_net.parameters()):
                    err = float((q.grad - p.grad * scale).abs().max())
                    worst = max(worst, err / max(float(p.grad.abs().max()) * scale, 1e-30))
            # The residuals are in the last step's units.
            rp, rs = plain.engine.feedback.residuals, scaled.engine.feedback.residuals
            same_res = rp.keys() == rs.keys() and all(
                torch.equal(rs[n], rp[n] * SCALES[-1]) for n in rp
            )
            out[f"{compressor}{sorted(opts.items())}/{how}"] = (worst, same_res, len(rp))
    return out


def test_a_scaled_run_sends_what_an_unscaled_one_does_times_the_scale(tmp_path):
    """Gradients times a scale that changes from step to step (halving, doubling, jumps) give
    exactly the unscaled run's averages times the scale, step after step: the residuals, the
    momentum-correction velocities and the thresholds kept between estimates (the threshold
    compressor's, Ok-Topk's global one) follow the scale. Without that, a residual carried at
    the old scale would be sent at the wrong weight and a reused threshold would select other
    entries."""
    for r in oks(run_world(_scaled_equivalence, 2, tmp_path)):
        for name, (worst, same_res, n_res) in r.items():
            assert worst == 0.0, (name, worst)
            assert same_res, name
            if "signsgd" not in name:
                assert n_res > 0, name  # error feedback was on: there were residuals to scale


def _propagate(rank: int, world: int, how: str, device: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    net = _net().to(dev)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    opts = {"density": 0.1, "collective": "oktopk", "reestimate_every": 2}
    if how == "ddp":
        # Several buckets, exchanged one after another (on CUDA both ranks share the GPU).
        model = DDP(net, bucket_cap_mb=0.001, device_ids=[0] if device == "cuda" else None)
        sync = sparsetrain.register_ddp_hook(model, "threshold", grad_scaler=scaler, **opts)
    else:
        model = net
        sync = sparsetrain.GradientSync(
            net, "threshold", grad_scaler=scaler, bucket_cap_mb=0.001, **opts
        )
    engine = sync.engine
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out: dict = {"mode": engine.config.on_nonfinite}

    def step(n: int, overflow: bool = False):
        g = torch.Generator().manual_seed(10 * rank + n)
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
        x, y = x.to(dev), y.to(dev)
        handle = None
        if overflow:
            # The first layer's weight: the last bucket DDP exchanges, after the others
            # have been averaged and returned.
            first = next(net.parameters())
            handle = first.register_hook(
                lambda grad: grad.index_fill(1, torch.tensor([0], device=dev), float("inf"))
            )
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        if handle is not None:
            handle.remove()
        kept = sync.synchronize() if how == "gradient_sync" else None
        return kept

    step(0)
    scaler.step(opt)
    scaler.update()
    before_params = [p.detach().clone() for p in net.parameters()]
    before_res = {n: r.clone() for n, r in engine.feedback.residuals.items()}
    scale = scaler.get_scale()
    kept = step(1, overflow=rank == 1)
    out["kept"] = kept
    out["all_nan"] = all(bool(torch.isnan(p.grad).all()) for p in net.parameters())
    out["skipped"] = sync.skipped_last_step
    scaler.step(opt)
    scaler.update()
    out["params_kept"] = all(torch.equal(a, p) for a, p in zip(before_params, net.parameters()))
    out["scale_halved"] = scaler.get_scale() == scale / 2
    after_res = engine.feedback.residuals
    out["residuals_kept"] = (
        len(before_res) > 1
        and before_res.keys() == after_res.keys()
        and all(torch.equal(before_res[n], after_res[n]) for n in before_res)
    )
    # The next step runs at the halved scale, from the residuals of before the bad step halved.
    step(2)
    out["finite_after"] = all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    out["loss_scale"] = (engine.loss_scale, scaler.get_scale())
    out["skipped_steps"] = sync.stats()["skipped_steps"]
    # The state says which scale its residuals are in; loaded where no scaler scales the
    # gradients, the first step brings them to unscaled units.
    state = sync.state_dict()
    out["state_scale"] = state["loss_scale"]
    plain = sparsetrain.GradientSync(_net(), "threshold", bucket_cap_mb=0.001, **opts)
    plain.load_state_dict(state, strict=False)  # (the hook's state: DDP's groups, not its buckets)
    saved = {n: r.clone() for n, r in state["feedback"]["residuals"].items()}
    plain.engine._begin_step(torch.device("cpu"))
    res = plain.engine.feedback.residuals
    out["unscaled_on_load"] = all(
        torch.equal(res[n], saved[n] / state["loss_scale"]) for n in saved
    )
    return out


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "how, device",
    [
        ("ddp", "cpu"),
        ("gradient_sync", "cpu"),
        pytest.param("ddp", "cuda", marks=needs_cuda),
        pytest.param("gradient_sync", "cuda", marks=needs_cuda),
    ],
)
def test_an_overflow_on_one_rank_is_skipped_by_every_ranks_scaler(tmp_path, how, device):
    """Rank 1's gradient overflows in the bucket exchanged last: every rank's every gradient
    becomes NaN (also in the buckets averaged before), so each rank's GradScaler skips the step
    and halves its scale; the residuals are those of before the step; the next step goes on
    at the halved scale. The saved state carries the scale its residuals are in. On CUDA the
    earlier buckets' futures are completed from the last bucket's work, on its stream."""
    for r in oks(run_world(_propagate, 2, tmp_path, how, device)):
        assert r["mode"] == "propagate"
        if how == "gradient_sync":
            assert r["kept"] is False
        assert r["all_nan"] and r["skipped"], r
        assert r["params_kept"] and r["scale_halved"], r
        assert r["residuals_kept"], r
        assert r["finite_after"], r
        assert r["loss_scale"][0] == r["loss_scale"][1] == 2.0**9, r
        assert r["skipped_steps"] == 1
        assert r["state_scale"] == 2.0**9
        assert r["unscaled_on_load"]


def _bad_scaler(rank: int, world: int) -> dict:
    out = {}
    scaler = torch.amp.GradScaler("cpu")
    cases = {
        "not_a_scaler": lambda: {"grad_scaler": object() if rank == 0 else scaler},
        "skip": lambda: {"grad_scaler": scaler, "on_nonfinite": "skip"},
        "raise": lambda: {"grad_scaler": scaler, "on_nonfinite": "raise"},
        "aggregator": lambda: {"grad_scaler": scaler, "aggregator": "median", "compressor": "none"},
        "one_rank": lambda: {"grad_scaler": scaler if rank == 0 else None},
    }
    for name, make in cases.items():
        for how in ("ddp", "gradient_sync"):
            kwargs = make()
            compressor = kwargs.pop("compressor", "topk")
            density = None if compressor == "none" else 0.1
            try:
                if how == "ddp":
                    sparsetrain.register_ddp_hook(DDP(_net()), compressor, density, **kwargs)
                else:
                    sparsetrain.GradientSync(_net(), compressor, density, **kwargs)
                out[f"{name}/{how}"] = None
            except (TypeError, ValueError) as e:
                out[f"{name}/{how}"] = f"{type(e).__name__}: {e}"
    return out


def test_bad_scaler_arguments_get_an_error_on_every_rank(tmp_path):
    """A scaler that is not one, a mode that would hide overflows from it or stop at the first,
    robust aggregation (whose radii are in unscaled units), and ranks that disagree on having a
    scaler: an error on every rank that says what is wrong, not a hang."""
    results = oks(run_world(_bad_scaler, 2, tmp_path))
    for rank, r in enumerate(results):
        for how in ("ddp", "gradient_sync"):
            msg = r[f"not_a_scaler/{how}"]
            assert msg is not None and "grad_scaler" in msg, msg
            if rank == 0:
                assert "TypeError" in msg and "torch.amp.GradScaler" in msg and "object" in msg
            else:
                assert "rank 0" in msg, msg
            for mode in ("skip", "raise"):
                msg = r[f"{mode}/{how}"]
                assert msg and "on_nonfinite='propagate'" in msg and repr(mode) in msg, msg
            msg = r[f"aggregator/{how}"]
            assert msg and "aggregator='median'" in msg and "bf16" in msg, msg
            msg = r[f"one_rank/{how}"]
            assert msg and "grad_scaler" in msg and "disagree" in msg, msg


def _exchange_overflow(rank: int, world: int, how: str) -> dict:
    # The fp16 compressor with error feedback: rank 0's entry of 3 is finite in float32, but
    # its share of the average, 3 * 2**16 / 2 ranks, passes float16's 65504, so the exchange
    # itself overflows, every rank's gradients being finite. At the halved scale it fits.
    torch.manual_seed(0)
    net = _net()
    scaler = _scaler(2.0**16)
    opts = {"error_feedback": True}
    if how == "ddp":
        model = DDP(net)
        sync = sparsetrain.register_ddp_hook(model, "fp16", grad_scaler=scaler, **opts)
    else:
        sync = sparsetrain.GradientSync(net, "fp16", grad_scaler=scaler, **opts)
    engine = sync.engine
    out = {}

    def step(n: int, big: bool) -> None:
        grads = _grads(net, rank, n)
        if big and rank == 0:
            grads[0][0, 0] = 3.0
        scale = scaler.get_scale()
        if how == "ddp":
            _backward_to(model, net, [g * scale for g in grads])
        else:
            for p, g in zip(net.parameters(), grads):
                p.grad = g * scale
            sync.synchronize()

    step(0, big=False)
    before = {n: r.clone() for n, r in engine.feedback.residuals.items()}
    step(1, big=True)
    out["all_nan"] = all(bool(torch.isnan(p.grad).all()) for p in net.parameters())
    out["skipped"] = sync.skipped_last_step
    after = engine.feedback.residuals
    out["residuals_kept"] = len(before) > 0 and all(
        torch.equal(before[n], after[n]) and bool(torch.isfinite(after[n]).all()) for n in before
    )
    scaler.update(new_scale=scaler.get_scale() / 2)  # what the skipped step makes the scaler do
    step(2, big=True)
    out["finite_after"] = all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    out["skipped_steps"] = sync.stats()["skipped_steps"]
    return out


@pytest.mark.parametrize("how", ["ddp", "gradient_sync"])
def test_an_overflow_in_the_exchange_itself_drops_the_step(tmp_path, how):
    """Every rank's gradient is finite, but their float16 sum is not: the step is dropped as
    for an overflow in backward (every gradient NaN, counted as skipped), and the residuals
    committed from the overflowing values are rolled back instead of carrying -Inf into every
    later step."""
    for r in oks(run_world(_exchange_overflow, 2, tmp_path, how)):
        assert r["all_nan"] and r["skipped"], r
        assert r["residuals_kept"], r
        assert r["finite_after"] and r["skipped_steps"] == 1, r


def test_a_disabled_scaler_is_no_scaler_and_a_pickled_state_asks_for_its_scaler():
    """GradScaler(enabled=False) (the usual `enabled=use_amp`, or a CUDA scaler on a machine
    without CUDA) steps whatever the gradients hold, so it must not turn NaN gradients into
    a step: the hook keeps the default mode, "raise". A hook state pickled from one with a
    scaler does not silently take its scaled residuals for unscaled ones."""
    import pickle

    from sparsetrain.sync.config import make_config, with_grad_scaler
    from sparsetrain.sync.ddp_hook import SyncState

    off = torch.amp.GradScaler("cpu", enabled=False)
    options, active = with_grad_scaler(off, {})
    assert active is None and "on_nonfinite" not in options
    on = _scaler(2.0**8)
    options, active = with_grad_scaler(on, {})
    assert active is on and options["on_nonfinite"] == "propagate"
    state = SyncState(make_config("topk", 0.1, options), {}, None, grad_scaler=on)
    state.engine._begin_step(torch.device("cpu"))
    assert state.engine.loss_scale == 2.0**8
    restored = pickle.loads(pickle.dumps(state))
    with pytest.raises(RuntimeError, match=r"set state.grad_scaler = scaler .* loss scale 256"):
        restored.engine._begin_step(torch.device("cpu"))
    for bad in (None, off):  # NaN gradients would then be applied: refused
        with pytest.raises(ValueError, match="takes an enabled torch.amp.GradScaler"):
            restored.grad_scaler = bad
    restored.grad_scaler = on
    restored.engine._begin_step(torch.device("cpu"))
    assert restored.engine.loss_scale == 2.0**8
    robust = SyncState(
        make_config("none", None, {"aggregator": "median", "on_nonfinite": "propagate"}), {}, None
    )
    with pytest.raises(ValueError, match="aggregator='median'"):
        robust.grad_scaler = on  # as the constructor refuses it
    # A hook that has exchanged steps without a scaler cannot take one: no rank could tell
    # whether the others did too (the first step checks that).
    unscaled = SyncState(make_config("topk", 0.1, {"on_nonfinite": "propagate"}), {}, None)
    unscaled.engine._begin_step(torch.device("cpu"))
    unscaled.engine.end_step()
    with pytest.raises(ValueError, match="has exchanged steps without a grad_scaler"):
        unscaled.grad_scaler = on


def _unpickled_scalers(rank: int, world: int, pickled_scaled: bool) -> dict:
    import pickle

    from sparsetrain.sync.config import make_config
    from sparsetrain.sync.ddp_hook import SyncState

    scaler = _scaler(2.0**8)
    config = make_config("none", None, {"on_nonfinite": "propagate"})
    state = SyncState(config, {}, None, grad_scaler=scaler if pickled_scaled else None)
    restored = pickle.loads(pickle.dumps(state))
    if rank == 0:  # the other ranks forget theirs
        restored.grad_scaler = scaler
    flat, names, shapes = torch.ones(10), ["w"], [torch.Size([10])]
    out = {}
    try:
        restored.engine.exchange(flat, names, shapes)
    except RuntimeError as e:
        out["error"] = str(e)
    restored.engine.end_step()
    restored.grad_scaler = scaler  # now on every rank: the step goes ahead
    out["after"] = restored.engine.exchange(torch.full((10,), 256.0), names, shapes).tolist()
    return out


@pytest.mark.parametrize("pickled_scaled", [True, False])
def test_unpickled_states_whose_ranks_differ_in_having_a_scaler_fail_on_every_rank(
    tmp_path, pickled_scaled
):
    """Each rank sets state.grad_scaler on its own after unpickling. If one forgets, its step
    must not raise alone (the others would wait for it in the exchange): every rank raises,
    naming the ranks without one; and a scaled and an unscaled gradient are never summed."""
    want = "have no grad_scaler" if pickled_scaled else r"rank\(s\) \[0\] have a grad_scaler"
    for r in oks(run_world(_unpickled_scalers, 2, tmp_path, pickled_scaled)):
        assert "error" in r and re.search(want, r["error"]), r
        if pickled_scaled:
            assert "rank(s) [1]" in r["error"], r
        assert r["after"] == [256.0] * 10, r


def _fresh_and_unpickled(rank: int, world: int) -> list:
    import pickle

    from sparsetrain.sync.config import make_config
    from sparsetrain.sync.ddp_hook import SyncState

    state = SyncState(make_config("none", None, {}), {}, None)
    if rank == 1:  # this rank's state comes back from a pickle, rank 0's is new
        state = pickle.loads(pickle.dumps(state))
    names, shapes = ["w"], [torch.Size([4])]
    out = []
    for step in range(2):
        out.append(state.engine.exchange(torch.full((4,), float(rank + step)), names, shapes))
        state.engine.end_step()
    return [t.tolist() for t in out]


def test_a_new_and_an_unpickled_state_run_the_same_collectives(tmp_path):
    """Every engine checks at its first step that the ranks agree on a scaler, so a rank whose
    state was unpickled runs the same collectives as one whose state is new."""
    for r in oks(run_world(_fresh_and_unpickled, 2, tmp_path)):
        assert r == [[0.5] * 4, [1.5] * 4], r


def _sum_overflow(rank: int, world: int) -> dict:
    # Both ranks send 3e38 at the same position: each finite, their float32 sum is not. Ok-Topk
    # cannot select from it and says so on every rank; the allgather's sum is Inf.
    out = {}
    for collective in ("oktopk", "allgather"):
        for mode in ("propagate", "raise"):
            torch.manual_seed(0)
            net = _net()
            sync = sparsetrain.GradientSync(
                net, "threshold", density=0.1, collective=collective, on_nonfinite=mode
            )
            for p, g in zip(net.parameters(), _grads(net, rank, 0)):
                p.grad = g
            sync.synchronize()  # a normal step: residuals to keep
            before = {n: r.clone() for n, r in sync.engine.feedback.residuals.items()}
            grads = _grads(net, rank, 1)
            grads[0][0, 0] = 3e38
            for p, g in zip(net.parameters(), grads):
                p.grad = g
            try:
                kept = sync.synchronize()
            except FloatingPointError as e:
                out[f"{collective}/{mode}"] = f"FloatingPointError: {e}"
                continue
            after = sync.engine.feedback.residuals
            out[f"{collective}/{mode}"] = (
                kept,
                all(bool(torch.isnan(p.grad).all()) for p in net.parameters()),
                all(torch.equal(before[n], after[n]) for n in before),
            )
    return out


def test_a_sum_that_overflows_in_a_sparse_collective_drops_the_step_under_propagate(tmp_path):
    """Finite gradients whose sum over the ranks is not: with "propagate" the step is dropped
    on every rank (every gradient NaN, residuals as before), whether the collective refuses to
    select from the sum (Ok-Topk) or returns it (the allgather); with "raise", Ok-Topk's error
    reaches every rank."""
    for r in oks(run_world(_sum_overflow, 2, tmp_path)):
        for collective in ("oktopk", "allgather"):
            assert r[f"{collective}/propagate"] == (False, True, True), (collective, r)
        assert "FloatingPointError" in r["oktopk/raise"], r


def _unused_follows_the_scale(rank: int, world: int) -> float:
    torch.manual_seed(0)
    net = Branchy()
    ddp = DDP(net, find_unused_parameters=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = sparsetrain.register_ddp_hook(ddp, "topk", density=0.1, grad_scaler=scaler)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    scaler.scale(ddp(x, True).pow(2).mean()).backward()
    before = state.engine.feedback.residuals["b.weight"].clone()
    ddp.zero_grad(set_to_none=True)
    scaler.update(new_scale=512.0)  # the scale halves, as after an overflow
    scaler.scale(ddp(x, False).pow(2).mean()).backward()  # b unused on every rank
    after = state.engine.feedback.residuals["b.weight"]
    assert before.any()  # b kept something to set aside
    return float((after - before / 2).abs().max())


def test_a_residual_set_aside_for_an_unused_parameter_follows_the_loss_scale(tmp_path):
    # Under find_unused_parameters=True the residual of a parameter no rank used waits; it was
    # set aside before the step read the new scale, and came back in the old units (2x).
    for diff in oks(run_world(_unused_follows_the_scale, 2, tmp_path, timeout=120)):
        assert diff == 0.0  # halving is exact
