"""The pruning API keeps what users saved and refuses what it cannot do, saying why.

RigL resumes exactly whether its state is loaded before or after prepare(); prepare() twice
changes nothing; pruned weights never come back through prune(); states saved under other
settings, incomplete or broken states are refused before anything changes; bad masks, options
and stale parameters get clear errors.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from sparsetrain.pruning import (
    Gradual,
    export_compact,
    get_pruner,
    load_compact,
    pack_bits,
    sparsity_stats,
    to_torch_sparse,
)

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
Y = X[:, :4].argmax(1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train(model, opt, pruner, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        pruner.step(step)


def _saved(*objs) -> bytes:
    buf = io.BytesIO()
    torch.save([o.state_dict() for o in objs], buf)
    return buf.getvalue()


def _load(raw: bytes) -> list:
    return torch.load(io.BytesIO(raw), weights_only=True)  # fresh tensors on every call


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _momenta(opt: torch.optim.Optimizer, model: nn.Module) -> dict:
    return {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}


RIGL = {"sparsity": 0.8, "delta_t": 2, "end": 100}


# ---- 1. RigL resumes exactly in both orders; prepare() destroys nothing a load restores ----------
def test_rigl_state_loaded_after_prepare_restores_the_checkpoint_exactly() -> None:
    model = _model()
    opt = _sgd(model)
    pruner = get_pruner("rigl", **RIGL).prepare(model, opt)
    _train(model, opt, pruner, 7)
    raw = _saved(model, opt, pruner)
    _train(model, opt, pruner, 8, start=7)

    # Model and optimizer loaded first, the pruner's state after prepare() (the reported order).
    m_state, o_state, p_state = _load(raw)
    model2 = _model(1)
    model2.load_state_dict(m_state)
    opt2 = _sgd(model2)
    opt2.load_state_dict(o_state)
    pruner2 = get_pruner("rigl", **RIGL).prepare(model2, opt2)
    pruner2.load_state_dict(p_state)
    assert _same_tensors(model2.state_dict(), m_state), "prepare() zeroed weights the state keeps"
    saved_momenta = {
        n: s["momentum_buffer"] for n, s in zip(m_state, o_state["state"].values())
    }  # parameters in order: 0.weight, 0.bias, 2.weight, 2.bias
    assert _same_tensors(_momenta(opt2, model2), saved_momenta), "momentum lost"
    _train(model2, opt2, pruner2, 8, start=7)
    assert _same_tensors(model2.state_dict(), model.state_dict())
    assert _same_tensors(pruner2.masks, pruner.masks)

    # Everything loaded after prepare().
    m_state, o_state, p_state = _load(raw)
    model3 = _model(2)
    opt3 = _sgd(model3)
    pruner3 = get_pruner("rigl", **RIGL).prepare(model3, opt3)
    model3.load_state_dict(m_state)
    opt3.load_state_dict(o_state)
    pruner3.load_state_dict(p_state)
    _train(model3, opt3, pruner3, 8, start=7)
    assert _same_tensors(model3.state_dict(), model.state_dict())


def test_rigl_initial_masks_take_effect_at_the_first_forward_pass() -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = get_pruner("rigl", **RIGL).prepare(model)
    masks = pruner.masks
    assert pruner.stats()["sparsity"] == pytest.approx(0.8, abs=0.01)
    # Nothing destroyed yet: a state loaded now could still restore every weight.
    assert _same_tensors({n: p.detach() for n, p in model.named_parameters()}, before)
    # The first forward pass already runs the sparse model.
    w0, w2 = (before[n] * masks[n] for n in ("0.weight", "2.weight"))
    expected = nn.functional.linear(
        torch.relu(nn.functional.linear(X, w0, before["0.bias"])), w2, before["2.bias"]
    )
    assert torch.equal(model(X), expected)
    for n, m in masks.items():
        assert (model.get_parameter(n)[~m] == 0).all()


def test_rigl_second_prepare_keeps_masks_and_weights() -> None:
    model = _model()
    opt = _sgd(model)
    pruner = get_pruner("rigl", sparsity=0.8, delta_t=1, end=50).prepare(model, opt)
    _train(model, opt, pruner, 5)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks, state = pruner.masks, pruner.state_dict()
    pruner.prepare(model, opt)
    assert _same_tensors(pruner.masks, masks)
    assert _same_tensors({n: p.detach() for n, p in model.named_parameters()}, weights)
    assert pruner.state_dict()["num_updates"] == state["num_updates"]


@pytest.mark.parametrize("name", ["magnitude", "structured", "nm", "rigl"])
def test_prepare_on_another_model_is_refused(name: str) -> None:
    pruner = get_pruner(name).prepare(_model())
    with pytest.raises(RuntimeError, match="already prepared on another model"):
        pruner.prepare(_model(1))


def test_second_prepare_of_a_scheduled_pruner_keeps_its_masks_and_schedule() -> None:
    model = _model()
    opt = _sgd(model)
    pruner = get_pruner(
        "magnitude", sparsity=0.9, schedule=Gradual(start=0, end=4, frequency=1)
    ).prepare(model, opt)
    _train(model, opt, pruner, 3)
    masks, stats = pruner.masks, pruner.stats()
    pruner.prepare(model)  # no optimizer given: the one attached stays attached
    assert _same_tensors(pruner.masks, masks) and pruner.stats() == stats
    _train(model, opt, pruner, 4, start=3)
    assert pruner.stats()["sparsity"] == pytest.approx(0.9, abs=1e-3)
    for n, m in pruner.masks.items():
        p = model.get_parameter(n)
        assert (p[~m] == 0).all() and (opt.state[p]["momentum_buffer"][~m] == 0).all()


# ---- 2. prune() never brings pruned weights back ----------------------------------------------
@pytest.mark.parametrize("name", ["magnitude", "structured", "nm", "woodfisher"])
def test_prune_below_the_reached_sparsity_is_refused_and_changes_nothing(name: str) -> None:
    model = _model()
    opts = {"fisher_samples": 4, "block_size": 16} if name == "woodfisher" else {}
    pruner = get_pruner(name, **({} if name == "nm" else {"sparsity": 0.9}), **opts)
    pruner.prepare(model)
    g = torch.Generator().manual_seed(0)

    def closure():
        return model(torch.randn(1, 16, generator=g)).pow(2).sum()

    masks = pruner.prune(closure=closure)
    stats = pruner.stats()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already reached.*stay pruned"):
        pruner.prune(0.25, closure=closure)
    assert _same_tensors(pruner.masks, masks) and pruner.stats() == stats
    assert _same_tensors({n: p.detach() for n, p in model.named_parameters()}, weights)
    again = pruner.prune(closure=closure)  # the same sparsity again is fine
    assert not any((again[n] & ~masks[n]).any() for n in masks)


# ---- 4. load_state_dict: settings, missing entries, atomic, prepare() failing -----------------
@pytest.mark.parametrize(
    ("saved", "now", "named"),
    [
        ({"sparsity": 0.9}, {"sparsity": 0.5}, "sparsity: saved 0.9, now 0.5"),
        ({"scope": "global"}, {"scope": "layer"}, "scope: saved 'global', now 'layer'"),
        ({"schedule": Gradual(end=10)}, {"schedule": Gradual(end=20)}, "schedule: saved"),
    ],
)
@pytest.mark.parametrize("prepared", [False, True])
def test_a_state_saved_with_other_settings_is_refused_naming_them(
    saved: dict, now: dict, named: str, prepared: bool
) -> None:
    source = get_pruner("magnitude", **saved).prepare(_model())
    source.prune()
    target = get_pruner("magnitude", **now)
    if prepared:
        target.prepare(_model())
    before = target.state_dict()
    with pytest.raises(ValueError, match="other 'magnitude' pruner settings") as e:
        target.load_state_dict(source.state_dict())
    assert named in str(e.value)
    after = target.state_dict()
    assert _same_tensors(after.pop("masks"), before.pop("masks")) and after == before


def test_the_settings_are_recorded_and_old_states_without_them_still_load() -> None:
    source = get_pruner("magnitude", sparsity=0.9, scope="layer").prepare(_model())
    source.prune()
    state = source.state_dict()
    assert state["options"]["sparsity"] == 0.9 and state["options"]["scope"] == "layer"
    buf = io.BytesIO()
    torch.save(state, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    other = get_pruner("magnitude", sparsity=0.9, scope="layer", mask_gradients=False)
    other.prepare(_model()).load_state_dict(loaded)  # mask_gradients may differ
    assert _same_tensors(other.masks, source.masks)
    old = {k: v for k, v in state.items() if k != "options"}  # as saved before this change
    legacy = get_pruner("magnitude", sparsity=0.5).prepare(_model())
    legacy.load_state_dict(old)
    assert _same_tensors(legacy.masks, source.masks)


@pytest.mark.parametrize("key", ["method", "masks", "step", "num_updates", "extra"])
@pytest.mark.parametrize("prepared", [False, True])
def test_a_state_missing_entries_is_refused_naming_them(key: str, prepared: bool) -> None:
    source = get_pruner("magnitude", sparsity=0.9).prepare(_model())
    source.prune()
    state = {k: v for k, v in source.state_dict().items() if k != key}
    target = get_pruner("magnitude", sparsity=0.9)
    if prepared:
        target.prepare(_model())
    with pytest.raises(ValueError, match=f"this one lacks {key}"):
        target.load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"step": 99, "bad_mask": True}, "has shape \\(3,\\)"),
        ({"step": 99, "float_masks": True}, "must be a bool tensor"),
        ({"step": 99, "extra": {}}, "lacks 'current_sparsity'"),
        ({"step": "7"}, "'step' must be an integer"),
    ],
)
def test_a_failed_load_leaves_the_pruner_unchanged(change: dict, match: str) -> None:
    source = get_pruner("magnitude", sparsity=0.9).prepare(_model())
    source.prune()
    bad = copy.deepcopy(source.state_dict())
    if change.pop("bad_mask", False):
        bad["masks"]["2.weight"] = torch.ones(3, dtype=torch.bool)
    if change.pop("float_masks", False):
        bad["masks"] = {n: m.float() * 0.5 for n, m in bad["masks"].items()}
    bad.update(change)
    target = get_pruner("magnitude", sparsity=0.9).prepare(_model(1))
    target.prune(0.5)
    before, stats = target.state_dict(), target.stats()
    with pytest.raises((ValueError, TypeError), match=match):
        target.load_state_dict(bad)
    assert target.stats() == stats
    assert _same_tensors(target.state_dict()["masks"], before["masks"])


def test_a_state_that_does_not_fit_the_model_leaves_the_pruner_unprepared() -> None:
    source = get_pruner("magnitude", sparsity=0.9).prepare(_model())
    source.prune()
    state = source.state_dict()
    pruner = get_pruner("magnitude", sparsity=0.9, params=["0.weight"])
    pruner.load_state_dict(state)
    model = _model(1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="loaded before prepare.*does not prune \\['2.weight'\\]"):
        pruner.prepare(model)
    with pytest.raises(RuntimeError, match="call prepare"):
        pruner.step(0)
    assert _same_tensors({n: p.detach() for n, p in model.named_parameters()}, weights)
    # The loaded state is still there, and a model it fits takes it.
    other = get_pruner("magnitude", sparsity=0.9)
    other.load_state_dict(pruner.state_dict())
    other.prepare(_model(1))
    assert _same_tensors(other.masks, source.masks)
    bigger = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    shaped = get_pruner("magnitude", sparsity=0.9)
    shaped.load_state_dict(state)
    with pytest.raises(ValueError, match="mask '0.weight' has shape \\(32, 16\\)"):
        shaped.prepare(bigger)
    with pytest.raises(RuntimeError, match="call prepare"):
        shaped.stats()


# ---- 5. clear errors instead of AttributeError, IndexError, KeyError ---------------------------
def test_apply_and_set_masks_before_prepare_say_to_prepare() -> None:
    for call in (lambda p: p.apply(), lambda p: p.set_masks({}), lambda p: p.stats()):
        with pytest.raises(RuntimeError, match="call prepare\\(model, optimizer\\) before"):
            call(get_pruner("magnitude"))


def test_set_masks_checks_every_mask_before_replacing_any() -> None:
    model = _model()
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    half = torch.zeros(32, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask '2.weight' has shape \\(3,\\)"):
        pruner.set_masks({"0.weight": half, "2.weight": torch.ones(3, dtype=torch.bool)})
    assert pruner.masks["0.weight"].all() and (model[0].weight != 0).all()
    with pytest.raises(TypeError, match="must be a bool tensor"):
        pruner.set_masks({"0.weight": torch.full((32, 16), 0.5)})
    assert pruner.masks["0.weight"].all()


def test_export_compact_checks_the_masks() -> None:
    model = _model()
    masks = get_pruner("magnitude", sparsity=0.9).prepare(model).prune()
    with pytest.raises(ValueError, match="mask '0.weight' has shape \\(3,\\), but the tensor"):
        export_compact(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="mask '0.weight' must be a bool tensor.*float32"):
        export_compact(model, {"0.weight": masks["0.weight"].float()})
    with pytest.raises(TypeError, match="mask '0.weight' must be a bool tensor.*list"):
        export_compact(model, {"0.weight": [1, 0]})
    with pytest.raises(TypeError, match="masks must be a dict"):
        export_compact(model, [masks["0.weight"]])
    stricter = masks["0.weight"].clone()
    i, j = stricter.nonzero()[0].tolist()
    stricter[i, j] = False  # a kept, non-zero weight
    with pytest.raises(ValueError, match="prunes 1 non-zero value"):
        export_compact(model, {"0.weight": stricter})
    bn = nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="'num_batches_tracked' is for a torch.int64 tensor"):
        export_compact(bn, {"num_batches_tracked": torch.ones((), dtype=torch.bool)})
    back = load_compact(export_compact(model, masks))  # good masks still round-trip
    assert _same_tensors(back, model.state_dict())


def test_load_compact_names_what_a_checkpoint_lacks() -> None:
    ckpt = export_compact(_model())
    for key in ("order", "sparse", "dense"):
        with pytest.raises(ValueError, match=f"lacks {key}"):
            load_compact({k: v for k, v in ckpt.items() if k != key})
    bad = {
        "format": ckpt["format"],
        "sparse": {"w": {"shape": (16,), "bits": pack_bits(torch.ones(16, dtype=torch.bool))}},
        "dense": {},
        "order": ["w"],
    }
    with pytest.raises(ValueError, match="entry 'w' lacks values"):
        load_compact(bad)
    bad["sparse"]["w"]["values"] = torch.ones(3)
    with pytest.raises(ValueError, match="3 values for 16 kept positions"):
        load_compact(bad)


def test_to_torch_sparse_refuses_1d_tensors_clearly() -> None:
    with pytest.raises(ValueError, match="2 or more dimensions, got shape \\(2,\\)"):
        to_torch_sparse(torch.tensor([0.0, 1.0]), "csr")


# ---- 6. options are checked, not silently taken ------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        ("magnitude", {"mask_gradients": "no"}, TypeError, "mask_gradients must be True or"),
        ("woodfisher", {"obs_update": "no"}, TypeError, "obs_update must be True or False"),
        ("nm", {"sparsity": float("nan")}, ValueError, "sparsity must be in \\[0, 1\\)"),
        ("nm", {"sparsity": "0.5"}, TypeError, "sparsity must be a number in \\[0, 1\\)"),
        ("nm", {"sparsity": -1.0}, ValueError, "sparsity must be in \\[0, 1\\)"),
        ("nm", {"sparsity": math.inf}, ValueError, "sparsity must be in \\[0, 1\\)"),
        ("rigl", {"seed": -1}, ValueError, "seed must be an integer"),
        ("rigl", {"seed": "a"}, ValueError, "seed must be an integer"),
        ("rigl", {"seed": True}, ValueError, "seed must be an integer"),
        # It trained with the masks it started with, never moving a connection, without a word.
        (
            "rigl",
            {"delta_t": 100, "end": 10},
            ValueError,
            r"delta_t \(100\) must be smaller than end \(10\): .* never move one",
        ),
        ("woodfisher", {"damping": math.inf}, ValueError, "damping must be a positive number"),
    ],
)
def test_bad_options_are_refused_when_the_pruner_is_built(
    name: str, options: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        get_pruner(name, **options)


@pytest.mark.parametrize("power", [float("nan"), float("inf")])
def test_gradual_power_must_be_finite(power: float) -> None:
    with pytest.raises(ValueError, match="power must be a positive number"):
        Gradual(power=power)


def test_nm_sparsity_is_still_accepted_when_consistent() -> None:
    assert get_pruner("nm", sparsity=0.5).sparsity == 0.5
    assert get_pruner("nm", n=1, m=4).sparsity == 0.75
    with pytest.raises(ValueError, match="means sparsity 0.5"):
        get_pruner("nm", sparsity=0.25)
    with pytest.raises(ValueError, match="sparsity must be in"):
        get_pruner("nm", sparsity=-1.0)  # once the "not given" marker, now out of range


# ---- 7. replaced layers or parameters are noticed ----------------------------------------------
def test_a_replaced_layer_or_parameter_is_named_instead_of_pruning_stale_tensors() -> None:
    model = _model()
    pruner = get_pruner("magnitude", sparsity=0.9).prepare(model, _sgd(model))
    pruner.prune()
    model[0] = nn.Linear(16, 32)
    for call in (lambda: pruner.step(1), pruner.apply, pruner.stats, pruner.finalize):
        with pytest.raises(RuntimeError, match="\\['0.weight'\\] are no longer the tensors"):
            call()
    model2 = _model()
    pruner2 = get_pruner("magnitude", sparsity=0.9).prepare(model2)
    pruner2.prune()
    model2[2].weight = nn.Parameter(torch.randn(4, 32))
    with pytest.raises(RuntimeError, match="\\['2.weight'\\] are no longer the tensors"):
        pruner2.step(1)
    with pytest.raises(RuntimeError, match="\\['2.weight'\\]"):
        pruner2.prepare(model2)
    # Casting the model in place keeps its parameters: still fine.
    model3 = _model()
    pruner3 = get_pruner("magnitude", sparsity=0.9).prepare(model3)
    pruner3.prune()
    model3.double()
    pruner3.step(1)
    assert pruner3.stats()["sparsity"] == pytest.approx(0.9, abs=1e-3)


# ---- found in review: workflows the checks must not refuse -----------------------------------
def test_strict_false_goes_on_from_a_state_under_new_settings():
    """Iterative pruning (0.5, then 0.75 from there) and a longer RigL run load the earlier
    state with strict=False; strict (the default) names what differs."""
    from sparsetrain.pruning import get_pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    first = get_pruner("magnitude", sparsity=0.5).prepare(model)
    first.prune()
    second = get_pruner("magnitude", sparsity=0.75)
    with pytest.raises(ValueError, match=r"sparsity: saved 0.5, now 0.75.*strict=False"):
        second.load_state_dict(first.state_dict())
    second.load_state_dict(first.state_dict(), strict=False)
    second.prepare(model)
    before = {n: m.clone() for n, m in second.masks.items()}
    second.prune()
    assert second.stats()["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert all(not (second.masks[n] & ~before[n]).any() for n in before)  # nothing regrows
    with pytest.raises(TypeError, match="strict must be True or False"):
        second.load_state_dict(first.state_dict(), strict="no")


def test_numpy_and_tensor_steps_are_integers_and_a_state_round_trips():
    import numpy as np

    from sparsetrain.pruning import get_pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    pr = get_pruner("magnitude", sparsity=0.5).prepare(model)
    pr.step(np.int64(3))
    pr.step(torch.tensor(4))
    state = pr.state_dict()
    assert type(state["step"]) is int and state["step"] == 4
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    copy = get_pruner("magnitude", sparsity=0.5)
    copy.load_state_dict(state)
    copy.prepare(twin)
    back = copy.state_dict()
    assert back["step"] == 4 and back["num_updates"] == state["num_updates"] >= 1
    assert back["masks"].keys() == state["masks"].keys()
    assert all(torch.equal(back["masks"][n], m) for n, m in state["masks"].items())
    assert any(not m.all() for m in back["masks"].values())  # the pruned masks, not fresh ones
    with pytest.raises(TypeError, match="step must be an integer"):
        pr.step(2.5)


def test_prune_at_the_sparsity_reached_within_a_weight_changes_nothing():
    """0.7 rounded to float32, or the pruned share stats() reports (67 of 96 weights), asks for
    what is pruned already: accepted, masks unchanged; well below it is refused."""
    from sparsetrain.pruning import get_pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12, bias=False))
    pr = get_pruner("magnitude", sparsity=0.9).prepare(model)
    pr.prune(0.7)
    masks = {n: m.clone() for n, m in pr.masks.items()}
    pr.prune(float(torch.tensor(0.7)))
    pr.prune(pr.stats()["sparsity"])
    assert all(torch.equal(masks[n], pr.masks[n]) for n in masks)
    with pytest.raises(ValueError, match="weights pruned once stay pruned"):
        pr.prune(0.5)


# ---- edge cases found by a review of the pruners (each failed before its fix) -----------------
@pytest.mark.parametrize("name", ["magnitude", "rigl", "nm", "woodfisher"])
def test_a_frozen_layer_is_left_alone_by_default_and_pruned_when_named(name):
    """prepare() registered a gradient hook on every weight: torch refused the frozen one
    ("cannot register a hook on a tensor that doesn't require gradient"), and the pruner was
    left prepared without hooks."""
    model = _model()
    model[0].requires_grad_(False)
    opts = {} if name == "nm" else {"sparsity": 0.5}
    pruner = get_pruner(name, **opts).prepare(model)
    assert list(pruner.masks) == ["2.weight"]
    if name in ("magnitude", "nm"):  # named, a frozen weight is pruned: its mask needs no hook
        model = _model()
        model[0].requires_grad_(False)
        pruner = get_pruner(name, params=["0.weight", "2.weight"], **opts).prepare(model)
        pruner.prune()
        assert int((model[0].weight == 0).sum()) == int((~pruner.masks["0.weight"]).sum()) > 0
        model(X).sum().backward()  # the trained layer's gradient is still masked
        assert not model[2].weight.grad[~pruner.masks["2.weight"]].any()
    else:  # these read the weights' gradients: a frozen one named is refused, by name
        with pytest.raises(ValueError, match=r"\['0.weight'\] are frozen .* reads the gradients"):
            get_pruner(name, params=["0.weight", "2.weight"], **opts).prepare(model)


def test_a_pruned_weight_unfrozen_after_prepare_has_its_gradient_masked():
    """Gradual unfreezing: a weight frozen at prepare() had no gradient hook, and none came
    when it was unfrozen; its gradient then moved pruned weights (and their momentum)."""
    model = _model()
    model[0].requires_grad_(False)
    pruner = get_pruner("magnitude", sparsity=0.5, params=["0.weight", "2.weight"]).prepare(model)
    pruner.prune()
    model[0].requires_grad_(True)
    model(X).sum().backward()
    pruned = ~pruner.masks["0.weight"]
    assert model[0].weight.grad.abs().sum() > 0 and not model[0].weight.grad[pruned].any()
    model[0].weight.grad = None
    pruner.finalize()  # the hooks are gone: the gradient is the layer's own again
    model(X).sum().backward()
    assert model[0].weight.grad[pruned].any()


@pytest.mark.parametrize("name", ["rigl", "woodfisher"])
def test_a_weight_frozen_after_prepare_is_refused_where_its_gradient_is_read(name):
    """RigL grew by a zero gradient and WoodFisher sampled a zero Fisher for a weight frozen
    after prepare(), without a word."""
    model = _model()
    opts = {"delta_t": 1, "end": 10} if name == "rigl" else {}
    pruner = get_pruner(name, sparsity=0.5, **opts).prepare(model)
    model[0].requires_grad_(False)
    model(X).sum().backward()
    with pytest.raises(ValueError, match=r"\['0.weight'\] are frozen .* unfreeze them before"):
        if name == "rigl":
            pruner.step(0)
            pruner.step(1)
        else:
            pruner.prune(closure=lambda: model(X).sum())


def test_rigl_at_sparsity_zero_keeps_every_layer_dense():
    """ERK's scale put a lone layer a rounding over density 1: it went dense, and then the
    division over the layers left was by zero."""
    from sparsetrain.pruning.rigl import erk_densities

    assert erk_densities({"w": torch.Size([34, 17])}, 0.0) == {"w": 1.0}
    model = nn.Sequential(nn.Linear(17, 34))
    pruner = get_pruner("rigl", sparsity=0.0).prepare(model)
    model(torch.randn(2, 17))
    assert pruner.masks["0.weight"].all()


def test_a_sparsity_just_below_one_keeps_a_weight_of_each_layer():
    from sparsetrain.pruning.masks import num_pruned

    assert num_pruned(10, 1 - 1e-10) == 9 and num_pruned(10, 0.9) == 9 and num_pruned(0, 0.5) == 0
    # exact past 1e8 weights (one fewer had been pruned), and a sparsity computed in floats
    assert num_pruned(362806040, 0.7) == 253964228 and num_pruned(3, 1 / 3) == 1
    model = _model()
    pruner = get_pruner("magnitude", sparsity=1 - 1e-10, scope="layer").prepare(model)
    masks = pruner.prune()
    assert all(int(m.sum()) == 1 for m in masks.values())


def test_structured_pruning_may_be_asked_again_at_the_share_it_reports():
    """Whole channels left layer-scoped structured pruning at 0.6667 for a target of 0.7, and
    prune(0.6667), the share stats() reports, was refused as going back."""
    model = _model()
    pruner = get_pruner("structured", sparsity=0.7, scope="layer").prepare(model)
    masks = pruner.prune()
    reported = pruner.stats()["sparsity"]
    assert reported < 0.7 - 1 / 576
    assert _same_tensors(pruner.prune(reported), masks)
    with pytest.raises(ValueError, match=r"already reached \(0.7, 0.6\d+ of the weights pruned\)"):
        pruner.prune(0.5)


def test_rigl_waits_for_its_own_parameters_under_functional_call():
    """The first-forward hook that applies RigL's initial masks ran inside
    torch.func.functional_call, saw other tensors in the model and refused them as replaced."""
    model = _model()
    pruner = get_pruner("rigl", sparsity=0.8).prepare(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.func.functional_call(model, params, (X,))
    assert not (model[0].weight == 0).any()  # not yet: the call ran on other tensors
    model(X)  # the model's own first forward applies them
    assert int((model[0].weight == 0).sum()) == int((~pruner.masks["0.weight"]).sum()) > 0


def test_a_schedule_given_numpy_numbers_saves_a_state_a_plain_torch_load_reads():
    import numpy as np

    pruner = get_pruner("magnitude", sparsity=0.5, schedule=Gradual(0, 10, 2, power=np.float64(3)))
    pruner.prepare(_model())
    pruner.step(10)
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)  # weights_only=True: it refused the NumPy power
    assert state["options"]["schedule"]["power"] == 3.0


def test_a_state_loaded_before_prepare_is_a_copy_and_so_is_what_it_hands_back():
    source = get_pruner("magnitude", sparsity=0.5).prepare(_model())
    source.prune()
    saved = copy.deepcopy(source.state_dict())
    ckpt = copy.deepcopy(saved)
    pruner = get_pruner("magnitude", sparsity=0.5)
    pruner.load_state_dict(ckpt)  # before prepare(): kept until it runs
    for m in ckpt["masks"].values():  # the caller reuses its dict
        m.fill_(True)
    ckpt["extra"]["current_sparsity"] = 0.0
    handed = pruner.state_dict()
    handed["extra"]["current_sparsity"] = 0.1
    assert pruner.state_dict()["extra"] == saved["extra"]
    pruner.prepare(_model())
    for name, mask in pruner.masks.items():
        assert torch.equal(mask.cpu(), saved["masks"][name]), name


@pytest.mark.parametrize(
    "args, words",
    [
        # The sync given in the optimizer's or the group's place failed inside torch.distributed
        # ("'GradientSync' object has no attribute 'size'") or was accepted in one process.
        (lambda m, s: (m, s), r"optimizer must be a torch.optim.Optimizer or None, got "
         r"GradientSync \(the state register_ddp_hook returned or a GradientSync goes as sync=\)"),
        (lambda m, s: (m, None, s), r"group must be a torch.distributed.ProcessGroup or None .* "
         r"got GradientSync .*goes as sync=\)"),
        (lambda m, s: (m, None, "world"), r"group must be .* got str 'world'"),
        (lambda m, s: ("model",), r"prepare needs the model as a torch.nn.Module, got 'model'"),
    ],
)  # fmt: skip
def test_prepare_names_an_argument_given_in_the_wrong_place(args, words) -> None:
    import sparsetrain

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sync = sparsetrain.GradientSync(model, "topk", density=0.5)
    pruner = get_pruner("magnitude", sparsity=0.5)
    with pytest.raises(TypeError, match=words):
        pruner.prepare(*args(model, sync))
    assert pruner.prepare(model, sync=sync) is pruner  # refused, nothing changed


def test_step_takes_the_optimizer_steps_index_from_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0 .* got -1"):
        pruner.step(-1)  # accepted, though the error for 1.5 said >= 0
    with pytest.raises(TypeError, match=r"step must be an integer >= 0 .* got 1.5"):
        pruner.step(1.5)
    pruner.step(0)


def test_a_tied_weights_second_name_points_to_its_listed_name() -> None:
    """A tied output layer named by its own name was refused as "not in the model", with a list
    of parameters that has no such name and no word of why."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    message = r"\['head.weight'\] are not listed by that name .*'head.weight' is the tensor listed as 'embed.weight' \(tied\)"  # noqa: E501
    with pytest.raises(ValueError, match=message):
        get_pruner("magnitude", sparsity=0.5, params=["head.weight"]).prepare(Tied())
    with pytest.raises(ValueError, match=message):
        sparsity_stats(Tied(), ["head.weight"])


def test_helpers_given_the_wrong_thing_say_what_they_take() -> None:
    """A list failed with AttributeError inside the helpers; erk_densities(..., 1.0) gave every
    layer density 0 where the pruners refuse sparsity 1; a NaN weight ranked largest and was
    kept, without a word."""
    from sparsetrain.pruning import count_flops, erk_densities, masks

    with pytest.raises(TypeError, match="export_compact takes a torch.nn.Module or its state"):
        export_compact([torch.zeros(2)])
    with pytest.raises(TypeError, match="sparsity_stats takes a torch.nn.Module, got list"):
        sparsity_stats([torch.zeros(2)])
    with pytest.raises(TypeError, match="count_flops takes a torch.nn.Module, got list"):
        count_flops([torch.zeros(2)], torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        erk_densities({"a": torch.Size([4, 4])}, 1.0)
    with pytest.raises(ValueError, match="weight 'a' holds NaN or Inf, which has no magnitude"):
        masks({"a": torch.tensor([1.0, float("nan"), 0.5, 2.0])}, 0.5)


def test_nothing_to_prune_says_why():
    # Both said "the model has no weight with 2 or more dims", which it had.
    from sparsetrain.pruning import get_pruner

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"params is empty \(None prunes the default weights\)"):
        get_pruner("magnitude", sparsity=0.5, params=[]).prepare(model)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every weight with 2 or more dimensions is frozen "
                       r"\(requires_grad=False: \['0.weight', '1.weight'\]\)"):  # fmt: skip
        get_pruner("magnitude", sparsity=0.5).prepare(model)
    with pytest.raises(ValueError, match="the model has no weight with 2 or more dimensions"):
        get_pruner("magnitude", sparsity=0.5).prepare(nn.LayerNorm(4))


def test_a_name_with_ddps_module_prefix_is_pointed_to_the_unwrapped_name():
    from sparsetrain.pruning import get_pruner

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'module.0.weight' name\(s\) the DDP wrapper's "
                       r"parameters: give them without 'module.'"):  # fmt: skip
        get_pruner("magnitude", sparsity=0.5, params=["module.0.weight"]).prepare(model)


def test_step_says_true_only_when_the_masks_changed():
    # nm reaches 2:4 before the schedule's end; its later steps said True, changing nothing.
    from sparsetrain.pruning import Gradual, get_pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    pruner = get_pruner("nm", sparsity=0.5, schedule=Gradual(0, 40, 10)).prepare(model)
    said, sparsity = {}, {}
    for s in range(0, 41, 10):
        before = pruner.masks
        said[s] = pruner.step(s)
        assert said[s] == any(not torch.equal(before[n], m) for n, m in pruner.masks.items())
        sparsity[s] = pruner.stats()["sparsity"]
    assert sparsity == {0: 0.0, 10: 0.25, 20: 0.5, 30: 0.5, 40: 0.5}  # 4:4, 3:4, then 2:4
    assert said == {0: False, 10: True, 20: True, 30: False, 40: False}


def test_a_finalized_pruner_refuses_to_go_on_until_prepared_again():
    # step() after finalize() re-applied the masks without the hooks that keep pruned
    # gradients zero: half a pruner, without a word.
    from sparsetrain.pruning import get_pruner

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model)
    pruner.prune()
    pruner.finalize()
    for call in (lambda: pruner.step(1), lambda: pruner.prune(0.6)):
        with pytest.raises(RuntimeError, match=r"after finalize\(\): its masks are baked"):
            call()
    pruner.prepare(model)  # again: hooks back, pruning goes on
    pruner.prune(0.6)
    assert pruner.stats()["sparsity"] == pytest.approx(0.6, abs=0.02)


# ---- from a review of the pruning API (2026-12-07) ------------------------------------------
def test_structured_pruning_refuses_a_one_dimensional_weight_at_prepare():
    # It had been accepted and failed only at the first scheduled prune, steps later.
    model = nn.Sequential(nn.Linear(4, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = get_pruner("structured", sparsity=0.5, params=["0.weight", "0.bias"],
                        schedule=Gradual(start=500, end=1000, frequency=100))  # fmt: skip
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(8,\): leave them out of params"):
        pruner.prepare(model, opt)


def test_masks_are_named_as_the_plain_models_under_dataparallel_and_torch_compile():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        pruner = get_pruner("magnitude", sparsity=0.5)
        pruner.prepare(wrapped, opt)
        assert list(pruner.masks) == ["0.weight", "1.weight"]  # not module. or _orig_mod.


def test_numpy_integers_are_taken_where_ints_are():
    import numpy as np

    from sparsetrain.pruning import OneShot

    assert Gradual(end=np.int64(100)).end == 100 and type(OneShot(at=np.int32(3)).at) is int
    assert type(get_pruner("rigl", delta_t=np.int64(10), end=100).delta_t) is int
    assert type(get_pruner("nm", n=np.int64(2), m=np.int64(4)).n) is int
    # NumPy floats of any width, and a NumPy seed (they had been refused as not numbers).
    rigl = get_pruner("rigl", alpha=np.float32(0.25), seed=np.int64(3))
    assert (rigl.alpha, rigl.seed) == (0.25, 3) and type(rigl.seed) is int
    assert type(Gradual(end=10, power=np.float32(2)).power) is float


def test_erk_densities_take_shapes_as_tuples():
    from sparsetrain.pruning import erk_densities

    sizes = {"a": torch.Size([100, 10]), "b": torch.Size([10, 10])}
    tuples = {n: tuple(s) for n, s in sizes.items()}
    assert erk_densities(tuples, 0.5) == erk_densities(sizes, 0.5)


def test_keep_top_checks_its_scope_and_sparsity():
    from sparsetrain.pruning.masks import keep_top

    scores = {"a": torch.rand(10), "b": torch.rand(50)}
    with pytest.raises(ValueError, match="scope must be one of"):
        keep_top(scores, 0.5, "layers")  # had ranked globally, pruning all of 'a'
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        keep_top(scores, 1.5, "layer")


def test_nm_says_when_m_is_too_small_rather_than_advise_an_n_it_has():
    from sparsetrain.pruning.masks import masks

    w = {"w": torch.randn(4, 8)}
    with pytest.raises(ValueError, match=r"no n reaches it with m=4 .* use a larger m, of at "
                       r"least 10"):  # fmt: skip
        masks(w, 0.9, method="nm")
    with pytest.raises(ValueError, match="use n <= 1"):  # (n=1 does reach 0.6)
        masks(w, 0.6, method="nm", n=2)


def test_a_weight_of_no_elements_counts_as_not_pruned():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = get_pruner("magnitude", sparsity=0.5)
    pruner.prepare(model, opt)
    pruner.prune()
    assert pruner.stats()["layers"] == {"0.weight": 0.5, "1.weight": 0.0}  # (it had divided by 0)
    rigl = get_pruner("rigl", sparsity=0.5, distribution="erk")
    rigl.prepare(model, opt)
    assert rigl.stats()["layers"]["0.weight"] == 0.5


def test_a_pruner_is_built_again_from_the_settings_its_state_records():
    model = nn.Sequential(nn.Linear(4, 8))
    pruner = get_pruner("magnitude", sparsity=0.5, schedule=Gradual(end=100, frequency=10))
    pruner.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = pruner.state_dict()
    again = get_pruner(state["method"], **state["options"])  # the schedule as a dict
    assert again.schedule == pruner.schedule
    with pytest.raises(TypeError, match="a dict with its 'name' and options"):
        get_pruner("magnitude", sparsity=0.5, schedule={"end": 100})
