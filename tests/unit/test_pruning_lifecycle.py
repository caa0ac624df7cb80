"""Pruners in a training loop: masks hold, state round-trips, RigL moves, export and metrics."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from sparsetrain.pruning import (
    Gradual,
    RigLPruner,
    available_pruners,
    compact_size_report,
    count_flops,
    erk_densities,
    export_compact,
    get_pruner,
    load_compact,
    pack_bits,
    pruned_parameter_efficiency,
    sparsity_stats,
    to_torch_sparse,
    unpack_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 16, generator=g)
    return x, (x[:, :4].argmax(1))


def _train(model, opt, pruner, steps: int, start: int = 0, closure=None) -> None:
    x, y = _data()
    for step in range(start, start + steps):
        i = torch.arange(step * 16, step * 16 + 16) % len(y)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        pruner.step(step, closure)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("mask_gradients", [True, False])
def test_masks_survive_100_steps_with_momentum_and_weight_decay(
    optim: str, mask_gradients: bool
) -> None:
    model = _model()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        if optim == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    )
    pruner = get_pruner("magnitude", sparsity=0.8, mask_gradients=mask_gradients).prepare(
        model, opt
    )
    _train(model, opt, pruner, 5)  # momentum builds up on every weight first
    masks = pruner.prune()
    params = dict(model.named_parameters())
    _train(model, opt, pruner, 100, start=5)
    assert all(torch.equal(m, pruner.masks[n]) for n, m in masks.items())
    for n, m in masks.items():
        assert (params[n][~m] == 0).all()
        checked = 0
        for v in opt.state[params[n]].values():
            if torch.is_tensor(v) and v.shape == m.shape:
                assert (v[~m] == 0).all(), "optimizer state would revive pruned weights"
                checked += 1
        # SGD's momentum_buffer; AdamW's exp_avg and exp_avg_sq.
        assert checked == (1 if optim == "sgd" else 2), (n, list(opt.state[params[n]]))
        assert (params[n][m] != 0).float().mean() > 0.9  # the kept weights still train
    assert sparsity_stats(model)["global_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_gradual_pruning_reaches_the_final_sparsity_monotonically() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = get_pruner("magnitude", sparsity=0.75, schedule=Gradual(start=0, end=40, frequency=10))
    pruner.prepare(model, opt)
    seen, prev = [], None
    x, y = _data()
    for step in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if pruner.step(step):
            seen.append(pruner.stats()["sparsity"])
            if prev is not None:  # a weight pruned once stays pruned
                assert not any((pruner.masks[n] & ~prev[n]).any() for n in prev)
            prev = pruner.masks
    # Pruning steps 10, 20, 30 and 40 (step 0 is at the initial sparsity, 0): strictly rising,
    # ending at the final sparsity.
    assert len(seen) == 4
    assert all(a < b for a, b in zip(seen, seen[1:])), seen
    assert seen[-1] == pytest.approx(0.75, abs=1e-3)


def test_state_dict_round_trips_exactly_and_restores_masks_in_a_new_model() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = get_pruner(
        "magnitude", sparsity=0.6, scope="layer", schedule=Gradual(end=20, frequency=5)
    )
    pruner.prepare(model, opt)
    _train(model, opt, pruner, 12)
    state = pruner.state_dict()
    ckpt = {"model": model.state_dict(), "pruner": state}

    fresh = _model(seed=1)
    fresh.load_state_dict(ckpt["model"])
    fopt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    again = get_pruner(
        "magnitude", sparsity=0.6, scope="layer", schedule=Gradual(end=20, frequency=5)
    )
    again.load_state_dict(ckpt["pruner"])  # before prepare: kept until it runs
    assert _equal_state(again.state_dict(), state)
    again.prepare(fresh, fopt)
    assert _equal_state(again.state_dict(), state)
    fopt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may share tensors
    # Both continue identically.
    _train(model, opt, pruner, 10, start=12)
    _train(fresh, fopt, again, 10, start=12)
    assert all(torch.equal(pruner.masks[n], again.masks[n]) for n in pruner.masks)
    with pytest.raises(ValueError, match="not a 'rigl' pruner state"):
        RigLPruner().load_state_dict(state)


def _equal_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys() or a["masks"].keys() != b["masks"].keys():
        return False
    same_masks = all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    rest = {k: v for k, v in a.items() if k != "masks"} == {
        k: v for k, v in b.items() if k != "masks"
    }
    return same_masks and rest


@pytest.mark.parametrize("name", ["structured", "nm"])
def test_structured_and_nm_pruners_keep_their_pattern_through_training(name: str) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opts = {"n": 2, "m": 4} if name == "nm" else {"sparsity": 0.5, "scope": "layer"}
    pruner = get_pruner(name, schedule=Gradual(end=20, frequency=5), **opts).prepare(model, opt)
    _train(model, opt, pruner, 40)
    for n, p in model.named_parameters():
        if p.dim() < 2:
            continue
        if name == "nm":
            assert ((p.reshape(-1, 4) != 0).sum(1) <= 2).all()
            assert (pruner.masks[n].reshape(-1, 4).sum(1) == 2).all()
        else:
            rows = p != 0
            assert (rows.any(1) == pruner.masks[n].all(1)).all()
            assert int((~pruner.masks[n].all(1)).sum()) == p.shape[0] // 2


def test_pruner_options_and_names_are_validated() -> None:
    assert {"magnitude", "structured", "nm", "woodfisher", "rigl"} <= set(available_pruners())
    with pytest.raises(
        ValueError, match="valid names are: magnitude, nm, rigl, structured, woodfisher"
    ):
        get_pruner("lottery")
    with pytest.raises(ValueError, match="does not take option.*block_size"):
        get_pruner("magnitude", block_size=4)
    with pytest.raises(ValueError, match=r"\['nope.weight'\] are not in the model"):
        get_pruner("magnitude", params=["nope.weight"]).prepare(_model())
    with pytest.raises(ValueError, match="n <= m"):
        get_pruner("nm", n=5, m=4)
    with pytest.raises(ValueError, match="not divisible by 3"):
        get_pruner("nm", n=1, m=3).prepare(_model())
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        get_pruner("rigl", sparsity=1.0)
    with pytest.raises(RuntimeError, match="call prepare"):
        get_pruner("magnitude").step(0)


def test_erk_gives_small_layers_more_density_and_keeps_the_budget() -> None:
    shapes = {"a": torch.Size([256, 64]), "b": torch.Size([64, 64]), "c": torch.Size([4, 64])}
    d = erk_densities(shapes, 0.9)
    assert d["c"] >= d["b"] > d["a"]
    kept = sum(d[n] * s.numel() for n, s in shapes.items())
    assert kept == pytest.approx(0.1 * sum(s.numel() for s in shapes.values()))
    assert max(d.values()) <= 1.0


@pytest.mark.parametrize("use_closure", [False, True])
def test_rigl_is_sparse_from_the_start_and_moves_connections_at_constant_count(
    use_closure: bool,
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLPruner(sparsity=0.8, delta_t=5, end=40, alpha=0.3).prepare(model, opt)
    counts0 = {n: int(m.sum()) for n, m in pruner.masks.items()}
    assert pruner.stats()["sparsity"] == pytest.approx(0.8, abs=0.01)
    first = pruner.masks
    x, y = _data()
    closure = (lambda: nn.functional.cross_entropy(model(x), y)) if use_closure else None
    _train(model, opt, pruner, 50, closure=closure)
    assert pruner.stats()["num_updates"] == 7  # steps 5, 10, ..., 35
    assert {n: int(m.sum()) for n, m in pruner.masks.items()} == counts0
    assert any(not torch.equal(first[n], pruner.masks[n]) for n in first)
    for n, p in model.named_parameters():
        if n in first:
            assert (p[~pruner.masks[n]] == 0).all()
    assert pruner.update_fraction(0) == pytest.approx(0.3) and pruner.update_fraction(
        40
    ) == pytest.approx(0.0)


@pytest.mark.parametrize("load_before_prepare", [False, True])
def test_rigl_resumed_right_before_an_update_step_continues_like_the_uninterrupted_run(
    load_before_prepare: bool,
) -> None:
    # A checkpoint after step 9 with delta_t=10: the next step updates the masks, from the dense
    # gradient of a backward pass that the resumed pruner must capture too.
    def start():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt

    model, opt = start()
    pruner = RigLPruner(sparsity=0.8, delta_t=10, end=40).prepare(model, opt)
    _train(model, opt, pruner, 10)
    saved = [copy.deepcopy(x.state_dict()) for x in (model, opt, pruner)]
    _train(model, opt, pruner, 1, start=10)
    assert pruner.stats()["num_updates"] == 1

    model2, opt2 = start()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    pruner2 = RigLPruner(sparsity=0.8, delta_t=10, end=40)
    if load_before_prepare:
        pruner2.load_state_dict(saved[2])
        pruner2.prepare(model2, opt2)
    else:
        pruner2.prepare(model2, opt2).load_state_dict(saved[2])
    _train(model2, opt2, pruner2, 1, start=10)
    assert pruner2.stats()["num_updates"] == 1
    assert all(torch.equal(pruner.masks[n], pruner2.masks[n]) for n in pruner.masks)


def test_rigl_state_round_trips_before_prepare() -> None:
    model = _model()
    pruner = RigLPruner(sparsity=0.7, seed=3).prepare(model)
    state = pruner.state_dict()
    other = RigLPruner(sparsity=0.7, seed=99)
    other.load_state_dict(state)
    other.prepare(_model(2))
    assert all(torch.equal(other.masks[n], state["masks"][n]) for n in state["masks"])


def test_bits_pack_and_unpack() -> None:
    m = torch.rand(1000, generator=torch.Generator().manual_seed(0)) > 0.7
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == 125
    assert torch.equal(unpack_bits(packed, 1000), m)
    assert torch.equal(unpack_bits(pack_bits(m[:13]), 13), m[:13])


def test_compact_export_round_trip_is_exact_and_smaller(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    model.register_buffer("counter", torch.tensor(7))
    get_pruner("magnitude", sparsity=0.9).prepare(model).prune()
    ckpt = export_compact(model)
    path = tmp_path / "compact.pt"
    torch.save(ckpt, path)
    restored = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    restored.register_buffer("counter", torch.tensor(0))
    restored.load_state_dict(load_compact(torch.load(path)))
    for (n, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    sizes = compact_size_report(model)
    # 10% of the values plus one bit a weight: about 0.1 + 1/32 of the dense bytes, plus overhead.
    assert sizes["compact_bytes"] < 0.2 * sizes["dense_bytes"]
    with pytest.raises(ValueError, match="not a compact checkpoint"):
        load_compact(model.state_dict())


def test_torch_sparse_conversion_matches_dense() -> None:
    w = torch.randn(8, 12) * (torch.rand(8, 12) > 0.8)
    for layout in ("coo", "csr"):
        assert torch.equal(to_torch_sparse(w, layout).to_dense(), w)
    with pytest.raises(ValueError, match="semi_structured.*CUDA"):
        to_torch_sparse(w, "semi_structured")
    # A convolution's N:M groups run along its input channels, not along (out, -1) rows.
    with pytest.raises(ValueError, match=r"semi_structured \(2:4\) takes a 2-D weight"):
        to_torch_sparse(torch.randn(8, 4, 3, 3), "semi_structured")
    with pytest.raises(ValueError, match="layout must be"):
        to_torch_sparse(w, "bsr2")


def test_flops_count_only_nonzero_weights() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    dense = count_flops(model, torch.zeros(2, 1, 6, 6))
    assert dense["dense"] == dense["sparse"] == 2 * 36 * 36 + 4 * 36 + 2 * 144 * 3 + 3
    with torch.no_grad():
        model[2].weight[:, :72] = 0
    assert count_flops(model, torch.zeros(2, 1, 6, 6))["sparse"] == dense["dense"] - 2 * 72 * 3


def test_flops_of_a_transposed_convolution_count_each_weight_at_each_input_position() -> None:
    # (it was left out: a model of one counted 0)
    model = nn.ConvTranspose2d(3, 5, 3, stride=2, bias=False)
    dense = count_flops(model, torch.zeros(2, 3, 4, 4))
    assert dense["dense"] == dense["sparse"] == 2 * (3 * 5 * 9) * 16
    with torch.no_grad():
        model.weight[0] = 0  # the weights of input channel 0
    assert count_flops(model, torch.zeros(2, 3, 4, 4))["sparse"] == 2 * (2 * 5 * 9) * 16


def test_pruned_parameter_efficiency_definition() -> None:
    assert pruned_parameter_efficiency(0.99, 1.0, 0.1) == pytest.approx(9.9)
    assert pruned_parameter_efficiency(0.5, 0.5, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kept_fraction"):
        pruned_parameter_efficiency(0.5, 0.5, 0.0)


def test_prune_command_writes_json_and_png(tmp_path) -> None:
    from sparsetrain.commands.prune import main

    out = tmp_path / "r.json"
    rc = main(
        [
            "--task",
            "digits-mlp",
            "--method",
            "magnitude",
            "--method",
            "woodfisher",
            "--sparsity",
            "0.8",
            "--schedule",
            "oneshot",
            "--epochs",
            "2",
            "--finetune-epochs",
            "1",
            "--levels",
            "0.5",
            "--fisher-samples",
            "16",
            "--block-size",
            "32",
            "--report",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["runs"]] == ["magnitude", "woodfisher"]
    for r in report["runs"]:
        assert r["final"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
        assert [round(p["sparsity"], 2) for p in r["curve"]] == [0.5, 0.8, 0.8]
        assert r["final"]["flops_sparse"] < 0.3 * r["final"]["flops_dense"]
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_prune_oneshot_fine_tunes_the_model_at_sparsity_not_at_the_highest_level(tmp_path):
    # The last model of the curve was fine-tuned: --sparsity 0.6 with the default levels
    # (0.5, 0.7, 0.8) ended at 0.8.
    from sparsetrain.commands.prune import main

    out = tmp_path / "r.json"
    argv = ["--method", "magnitude", "--schedule", "oneshot", "--sparsity", "0.6", "--epochs",
            "1", "--finetune-epochs", "1", "--report", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["final"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert [round(p["sparsity"], 2) for p in run["curve"]][:4] == [0.5, 0.6, 0.7, 0.8]


def test_prune_command_passes_woodfisher_options_to_the_pruner() -> None:
    from sparsetrain.commands.prune import PruneConfig, _build_pruner
    from sparsetrain.pruning import OneShot

    cfg = PruneConfig(
        methods=["woodfisher"], obs_update=False, block_size=32, damping=1e-3, fisher_samples=8
    )
    p = _build_pruner("woodfisher", cfg, 0.9, OneShot(), nn.Linear(4, 4))
    assert (p.obs_update, p.block_size, p.damping, p.fisher_samples) == (False, 32, 1e-3, 8)


def test_rigl_grows_by_the_gradient_summed_over_accumulated_micro_batches() -> None:
    # With gradient accumulation a step has several backward passes; RigL grows by their sum,
    # as the optimizer steps by .grad. It kept only the last micro-batch's gradient.
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    pruner = RigLPruner(sparsity=0.5, delta_t=1, end=10).prepare(model)
    xs = [torch.randn(3, 8) for _ in range(2)]
    pruner.step(0)  # armed: step 1 is an update step
    for x in xs:
        model(x).sum().backward()  # dL/dW[i, j] = sum over the batch of x[:, j], every row
    want = (xs[0].sum(0) + xs[1].sum(0)).expand(4, 8)
    torch.testing.assert_close(pruner._dense_grads["weight"], want)
    assert pruner.step(1)  # the update consumed them
    assert pruner._dense_grads == {}


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_rigl_grown_weights_start_with_zero_optimizer_state(optim: str) -> None:
    # With mask_gradients=False pruned weights get gradients, so the optimizer keeps momentum
    # there; a weight RigL grows must start at zero with zero state, as its docstring says.
    model = _model()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optim == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    pruner = RigLPruner(sparsity=0.8, delta_t=2, end=40, mask_gradients=False)
    pruner.prepare(model, opt)
    checked = 0
    x, y = _data()
    for step in range(12):
        before = {n: m.clone() for n, m in pruner.masks.items()}
        i = torch.arange(step * 16, step * 16 + 16) % len(y)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        if pruner.step(step):
            for n, w in pruner._weights.items():
                grown = pruner.masks[n] & ~before[n]
                checked += int(grown.sum())
                assert not w[grown].any(), n
                for v in opt.state[w].values():
                    if v.shape == w.shape:
                        assert not v[grown].any(), (n, step)
    assert checked > 0  # some weights were grown


def test_rigl_repeated_step_changes_nothing_and_an_earlier_one_is_refused() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLPruner(sparsity=0.8, delta_t=5, end=40).prepare(model, opt)
    _train(model, opt, pruner, 6)  # steps 0..5: an update at 5
    masks, updates = pruner.masks, pruner.stats()["num_updates"]
    # A loop that did not advance its counter (a step GradScaler skipped): nothing happens. It
    # had raised that no dense gradient was captured, blaming a pruner.step that was called.
    assert pruner.step(5) is False
    assert pruner.stats()["num_updates"] == updates
    assert all(torch.equal(masks[n], m) for n, m in pruner.masks.items())
    with pytest.raises(ValueError, match="step 3 comes before step 5, which this pruner"):
        pruner.step(3)  # had updated at step 5 a second time on the way back up
    _train(model, opt, pruner, 5, start=6)  # and it goes on: an update at 10
    assert pruner.stats()["num_updates"] == updates + 1


def test_rigl_step_says_false_for_an_update_that_moves_no_weight() -> None:
    # Near the end the update fraction floors to k = 0 in every layer: the masks stay, and
    # step() must not report a change (it had said True, as for a real update).
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLPruner(sparsity=0.8, delta_t=1, end=1000, alpha=0.3).prepare(model, opt)
    x, y = _data()
    said = {}
    for step in (0, 1, 998, 999):
        pruner.load_state_dict(pruner.state_dict() | {"step": step - 1})
        before = pruner.masks
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        said[step] = pruner.step(step)
        moved = any(not torch.equal(before[n], m) for n, m in pruner.masks.items())
        assert said[step] == moved, step
    assert said == {0: False, 1: True, 998: False, 999: False}


def test_a_rigl_state_loaded_after_a_forward_pass_warns_of_the_weights_it_lost() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLPruner(sparsity=0.8, delta_t=5, end=40).prepare(model, opt)
    _train(model, opt, pruner, 12)
    saved = copy.deepcopy({"model": model.state_dict(), "pruner": pruner.state_dict()})
    x, _ = _data()

    def resumed(forward_first: bool):
        m = _model(seed=1)
        m.load_state_dict(saved["model"])
        p = RigLPruner(sparsity=0.8, delta_t=5, end=40, seed=7).prepare(m)
        if forward_first:
            m(x)  # a validation pass: the initial random masks take effect
        return m, p

    m, p = resumed(True)
    with pytest.warns(UserWarning, match=r"rigl: the masks this state keeps include \d+ weights"):
        p.load_state_dict(saved["pruner"])
    lost = sum(int((w == 0).sum()) for w in m.state_dict().values())
    assert lost > sum(int((w == 0).sum()) for w in saved["model"].values())
    m.load_state_dict(saved["model"])  # as the warning says: the model's state again
    m(x)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in saved["model"].items())
    # Loaded before any forward pass (or the model loaded after the forward): no warning.
    import warnings

    for order in ("pruner first", "model again"):
        m, p = resumed(order == "model again")
        if order == "model again":
            m.load_state_dict(saved["model"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p.load_state_dict(saved["pruner"])
            m(x)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in saved["model"].items())


def test_compact_export_keeps_the_sign_of_negative_zero() -> None:
    model = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, :3] = torch.tensor([-0.0, 1.5, -0.0])
    restored = nn.Linear(64, 8, bias=False)
    restored.load_state_dict(load_compact(export_compact(model)))
    assert torch.equal(torch.signbit(restored.weight), torch.signbit(model.weight))
    assert torch.equal(restored.weight, model.weight)
    # float8, which torch.signbit has no kernel for (the export failed there): bit for bit
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        w = model.weight.detach().to(dtype)
        back = load_compact(export_compact({"w": w}))["w"]
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))


def test_rigl_refuses_a_closure_whose_gradients_are_not_finite() -> None:
    # NaN scores chose the regrown connections silently.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLPruner(sparsity=0.8, delta_t=5, end=40).prepare(model, opt)
    x, _ = _data()
    first = pruner.masks
    with pytest.raises(ValueError, match="rigl: the closure's dense gradients that choose "
                       "regrowth hold NaN or Inf .* Nothing was pruned"):  # fmt: skip
        _train(model, opt, pruner, 6, closure=lambda: model(x).sum() * float("inf"))
    assert pruner.stats()["num_updates"] == 0
    assert all(torch.equal(first[n], pruner.masks[n]) for n in first)


def test_rigl_leaves_the_masks_alone_after_an_overflowed_backward() -> None:
    """Under AMP an overflowed backward makes GradScaler skip the optimizer step; RigL still
    grew connections by the top-k of Inf/NaN scores, that is at random."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLPruner(sparsity=0.8, delta_t=2, end=20).prepare(model, opt)
    _train(model, opt, pruner, 2)  # steps 0 and 1; step 2 is the first update step
    x, y = _data()
    opt.zero_grad()
    (nn.functional.cross_entropy(model(x), y) * float("inf")).backward()  # opt.step skipped
    before = pruner.masks
    with pytest.warns(UserWarning, match="rigl: the dense gradients of step 2 hold NaN or Inf"):
        assert not pruner.step(2)
    assert all(torch.equal(before[n], pruner.masks[n]) for n in before)
    assert pruner.stats()["num_updates"] == 0
    _train(model, opt, pruner, 2, start=3)  # the next update (step 4) goes ahead
    assert pruner.stats()["num_updates"] == 1


def test_weights_loaded_into_a_pruned_model_are_masked_again_before_use() -> None:
    """Dense weights loaded after prepare() made the model dense again until the next step(),
    while stats() still said 0.5; a load into the layer alone, too."""
    model = _model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    pruner.prune()
    masks = pruner.masks
    x, _ = _data()
    for load in (lambda: model.load_state_dict(dense),
                 lambda: model[0].load_state_dict({"weight": dense["0.weight"],
                                                   "bias": dense["0.bias"]})):  # fmt: skip
        load()
        model(x)
        for name, p in model.named_parameters():
            if name in masks:
                assert torch.equal(p != 0, masks[name]), name


def test_a_tied_weight_loaded_through_its_second_name_is_masked_again_before_use() -> None:
    """Only the layer of the name the pruner keeps had the load hook: dense weights loaded into
    the decoder that shares the embedding's weight reached the next forward pass unmasked."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.dec = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.emb(x))

    torch.manual_seed(0)
    model = Tied()
    dense = model.emb.weight.detach().clone()
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    mask = pruner.prune()["emb.weight"]
    seen = []
    model.dec.register_forward_pre_hook(lambda mod, _: seen.append(mod.weight != 0))
    model.dec.load_state_dict({"weight": dense})
    model(torch.tensor([1, 2]))
    assert torch.equal(seen[-1], mask)


def test_a_pruner_state_loaded_after_the_models_weights_sets_their_masks() -> None:
    """The masks apply at the next forward pass, not at the model's load: applied then, the
    pruner's masks of the moment would zero weights the checkpoint's masks keep."""
    x, _ = _data()
    saved_model = _model(1)
    saved_pruner = get_pruner("magnitude", sparsity=0.5).prepare(saved_model)
    saved_pruner.prune()
    saved = {k: v.clone() for k, v in saved_model.state_dict().items()}
    model = _model(2)
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    pruner.prune()  # masks of other weights than the checkpoint's
    assert any(not torch.equal(pruner.masks[n], m) for n, m in saved_pruner.masks.items())
    model.load_state_dict(saved)
    pruner.load_state_dict(saved_pruner.state_dict())
    model(x)
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_a_prepared_model_saves_and_copies_without_its_pruner() -> None:
    """The load hook must not tie the model to its pruner: torch.save(model) would pickle the
    pruner's gradient hooks (and fail), and an EMA copy would be masked by the original's."""
    import copy
    import io

    x, _ = _data()
    model = _model()
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    pruner.prune()
    rigl = _model(1)
    RigLPruner(sparsity=0.8, delta_t=5, end=40).prepare(rigl)  # its masks wait for a forward
    # Right after a prune, after a load (the masks wait for a forward pass), and RigL's.
    for when in ("pruned", "loaded", "rigl"):
        if when == "loaded":
            model.load_state_dict(model.state_dict())
        subject = rigl if when == "rigl" else model
        torch.save(subject, io.BytesIO())
        ema = copy.deepcopy(subject)
        ema.load_state_dict({k: torch.ones_like(v) for k, v in ema.state_dict().items()})
        ema(x)
        assert all(bool((p == 1).all()) for p in ema.parameters()), when


@pytest.mark.parametrize("method", ["magnitude", "rigl", "woodfisher"])
def test_an_embedding_with_sparse_gradients_is_pruned_and_trains(method: str) -> None:
    """nn.Embedding(sparse=True) gives sparse COO gradients: the gradient mask (masked_fill),
    RigL's dense gradients and WoodFisher's Fisher samples raised on them at the first
    backward or update, where the model trains without a pruner."""
    from tests.unit.test_sync_input_checks import _SparseEmbedding

    torch.manual_seed(0)
    net = _SparseEmbedding()  # Embedding(100, 8, sparse=True), then Linear(8, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    options = {
        "magnitude": {"scope": "layer"},
        "rigl": {"delta_t": 2, "end": 10},
        "woodfisher": {"fisher_samples": 4, "scope": "layer"},
    }
    pruner = get_pruner(method, sparsity=0.5, **options.get(method, {})).prepare(net, opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 100, (16,), generator=g)
    y = torch.randint(0, 2, (16,), generator=g)
    loss_fn = nn.functional.cross_entropy
    for step in range(6):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        if step == 1:  # the gradient reaching the optimizer is masked, sparse as it came
            grad = net.e.weight.grad
            assert grad.is_sparse and not grad.to_dense()[~pruner.masks["e.weight"]].any()
        opt.step()
        closure = (lambda: loss_fn(net(x), y)) if method == "woodfisher" else None
        pruner.step(step, closure)
    if method != "rigl":
        pruner.prune(0.5, closure)
    mask = pruner.masks["e.weight"]
    assert not mask.all() and not net.e.weight[~mask].any()


@pytest.mark.parametrize("copies", [False, True])
def test_optimizer_state_of_a_wrapper_like_zero_is_cleared_at_pruned_weights(copies) -> None:
    """ZeroRedundancyOptimizer steps with its shard's state in .optim.state (its own .state is
    empty, or after a load holds copies): momentum stayed at every pruned weight and the next
    step moved them off zero."""

    class Wrapper:  # as ZeroRedundancyOptimizer holds the optimizer it steps
        def __init__(self, params) -> None:
            self.optim = torch.optim.SGD(params, lr=0.1, momentum=0.9)
            self.param_groups, self.state = self.optim.param_groups, {}

        def step(self) -> None:
            self.optim.step()

        def zero_grad(self) -> None:
            self.optim.zero_grad()

    x, y = _data()
    model = _model()
    opt = Wrapper(model.parameters())
    for _ in range(3):  # momentum everywhere, before any pruning
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if copies:  # its own state copies the wrapped one's (cast to the parameters' device)
        opt.state = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.optim.state.items()}
    pruner = get_pruner("magnitude", sparsity=0.5, scope="layer").prepare(model, opt)
    pruner.prune(0.5)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # masked: only momentum could move
    opt.step()  # them, before the pruner's next step masks the weights again
    for n, w in pruner._weights.items():
        assert not w[~pruner.masks[n]].any(), n


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_convolutions_are_pruned_along_their_own_channels(groups: int) -> None:
    """A transposed convolution's weight is (in, out / groups, *kernel): N:M grouped its output
    channels (ConvTranspose2d(8 -> 6) was refused: "6 is not divisible by 4") and structured
    pruning removed input channels."""

    def by_output_channel(mask: torch.Tensor, c_in: int, c_out: int) -> torch.Tensor:
        # (out, in / groups, kH * kW): each output channel with its group's input channels
        grouped = mask.reshape(groups, c_in // groups, c_out // groups, -1).transpose(1, 2)
        return grouped.reshape(c_out, c_in // groups, -1)

    torch.manual_seed(0)
    nm = get_pruner("nm", params=["0.weight"])
    model = nn.Sequential(nn.ConvTranspose2d(8, 6, 3, groups=groups))
    mask = nm.prepare(model).prune()["0.weight"]
    kept = by_output_channel(mask, 8, 6).transpose(1, 2).reshape(-1, 4).sum(1)
    assert kept.unique().tolist() == [2]  # 2 of every 4 input channels, at each output, position
    structured = get_pruner("structured", sparsity=0.5, params=["0.weight"], scope="layer")
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=groups))
    channels = by_output_channel(structured.prepare(model).prune()["0.weight"], 4, 8)
    per_channel = channels.reshape(8, -1).sum(1).tolist()
    assert sorted(per_channel) == [0] * 4 + [channels[0].numel()] * 4  # whole output channels
    with pytest.raises(ValueError, match="6 input channels a group along dimension 0"):
        get_pruner("nm", params=["0.weight"]).prepare(nn.Sequential(nn.ConvTranspose2d(6, 8, 3)))
