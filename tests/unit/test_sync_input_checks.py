"""Arguments of the DDP hook and GradientSync checked where they are given, in one process: option
names, the model, the process group, and the states they load."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetrain
from sparsetrain.sync import SyncEngine
from sparsetrain.sync.config import make_config
from tests.states import same


@pytest.fixture
def group(one_thread):
    """A process group of one rank (gloo, in memory), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _hook(**kwargs: Any) -> sparsetrain.SyncState:
    compressor = kwargs.pop("compressor", "threshold")
    return sparsetrain.register_ddp_hook(DDP(_model()), compressor, **kwargs)


def _sync(**kwargs: Any) -> sparsetrain.GradientSync:
    compressor = kwargs.pop("compressor", "threshold")
    return sparsetrain.GradientSync(_model(), compressor, **kwargs)


MAKERS = {"register_ddp_hook": _hook, "GradientSync": _sync}


def _stepped(**kwargs: Any) -> sparsetrain.GradientSync:
    """A GradientSync after two steps, so its state holds residuals and thresholds."""
    sync = _sync(**kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for _, p in sync.params:
            p.grad = torch.randn(p.shape, generator=g)
        assert sync.synchronize()
    return sync


def _as_saved_by(target: Any, state: dict) -> dict:
    """A GradientSync's state as ``target`` saves it: a hook's records DDP's groups of
    parameters instead of GradientSync's buckets (a hook refuses GradientSync's state)."""
    if not isinstance(target, sparsetrain.SyncState):
        return state
    rest = {k: v for k, v in state.items() if k != "buckets"}
    return rest | {"ddp_groups": None, "ddp_bucket_caps_bytes": None}


def _loads(target: Any, state: dict) -> None:
    """Load ``state`` into ``target`` and check that it took the state's residuals, compressor
    state, step and counters (the settings may differ)."""
    state = _as_saved_by(target, state)
    target.load_state_dict(state)
    got = target.state_dict()
    assert state["step"] > 0 and state["feedback"]  # a stepped state, not a fresh one
    for key in ("step", "counters", "feedback", "compressor"):
        assert same(got[key], state[key]), key


# ---- 1. misspelt options: neither the hook's/sync's nor the compressor's ----------------------
@pytest.mark.parametrize("caller", list(MAKERS))
@pytest.mark.parametrize(
    ("option", "value", "meant"),
    [
        ("colective", "oktopk", "collective"),
        ("error_feeback", True, "error_feedback"),
        ("on_non_finite", "skip", "on_nonfinite"),
        ("densty", 0.1, "density"),
        ("proces_group", None, "process_group"),
        ("reestimate_evry", 4, "reestimate_every"),
    ],
)
def test_a_misspelt_option_is_named_with_both_lists_and_the_closest_name(
    group, caller, option, value, meant
):
    with pytest.raises(ValueError) as e:
        MAKERS[caller](density=0.1, **{option: value})
    msg = str(e.value)
    assert f"compressor 'threshold' does not take option(s) ['{option}']" in msg
    assert f"it is not an option of {caller} either" in msg
    assert f"did you mean '{meant}'?" in msg
    # Both lists: the caller's own arguments and sync options, and the compressor's options.
    assert f"{caller} takes: compressor, density, process_group" in msg
    for name in ("grad_scaler", "error_feedback", "collective", "on_nonfinite"):
        assert name in msg.split(f"{caller} takes:")[1]
    assert "compressor 'threshold' takes: density, reestimate_every" in msg
    assert ("bucket_cap_mb" in msg) == (caller == "GradientSync")


def test_bucket_cap_mb_given_to_the_hook_points_to_gradient_sync_and_to_ddp(group):
    with pytest.raises(ValueError) as e:
        _hook(density=0.1, bucket_cap_mb=1.0)
    msg = str(e.value)
    assert "bucket_cap_mb is an argument of GradientSync" in msg
    assert "DistributedDataParallel(model, bucket_cap_mb=...)" in msg
    _sync(density=0.1, bucket_cap_mb=1.0)  # where it belongs


def test_a_misspelt_bucket_cap_mb_of_gradient_sync_is_suggested(group):
    with pytest.raises(ValueError, match=r"did you mean 'bucket_cap_mb'\?"):
        _sync(density=0.1, bucket_cap=1.0)


def test_several_unknown_options_are_named_together(group):
    with pytest.raises(ValueError) as e:
        _sync(density=0.1, colective="oktopk", error_feeback=True)
    msg = str(e.value)
    assert "['colective', 'error_feeback'], and they are not options of GradientSync" in msg
    assert "did you mean 'collective'?" in msg and "did you mean 'error_feedback'?" in msg


def test_an_option_of_another_compressor_names_that_compressor(group):
    with pytest.raises(ValueError) as e:
        _sync(compressor="topk", density=0.1, levels=4)
    msg = str(e.value)
    assert msg.startswith("compressor 'topk' does not take option(s) ['levels']")
    assert "'levels' is an option of compressor(s) qsgd" in msg


def test_an_option_nothing_is_close_to_gets_the_lists_without_a_guess():
    with pytest.raises(ValueError) as e:
        make_config("topk", 0.1, {"zzzz": 1})
    msg = str(e.value)
    assert "did you mean" not in msg
    assert "not an option of the gradient sync either" in msg
    assert "compressor 'topk' takes: density" in msg


def test_a_collective_option_among_the_compressors_keeps_its_own_hint(group):
    with pytest.raises(ValueError, match=r"it is an option of the collective"):
        _sync(density=0.1, collective="oktopk", repartition_every=8)


# ---- 2. GradientSync refuses a model DDP already synchronises ---------------------------------
def test_gradient_sync_refuses_a_ddp_model(group):
    with pytest.raises(TypeError) as e:
        sparsetrain.GradientSync(DDP(_model()), "threshold", density=0.1)
    msg = str(e.value)
    assert "DistributedDataParallel" in msg
    assert "register_ddp_hook" in msg and "model.module" in msg


def test_gradient_sync_refuses_in_the_forward_a_plain_ddp_around_its_model(group):
    """GradientSync(model) with DDP(model) also made (without the hook) averaged every step
    twice, DDP's allreduce then GradientSync's exchange, without a word."""
    import gc
    import pickle

    model = _model()
    sync = sparsetrain.GradientSync(model, "topk", density=0.5)
    outer = nn.Sequential(model)  # DDP around a module holding it, too
    for ddp in (DDP(model), DDP(outer)):
        with pytest.raises(RuntimeError, match="runs in the forward of a DistributedDataParallel"):
            ddp(torch.ones(3, 4))
        with ddp.no_sync():  # DDP averages nothing there
            ddp(torch.ones(3, 4)).sum().backward()
    model(torch.ones(3, 4)).sum().backward()  # alone, as GradientSync is meant
    assert sync.synchronize()
    pickle.loads(pickle.dumps(model))  # the check keeps the model picklable
    del sync
    gc.collect()
    DDP(model)(torch.ones(3, 4))  # its GradientSync gone, the model is DDP's alone
    scripted = torch.jit.script(_model())  # takes no hooks: left unchecked, not refused
    sync = sparsetrain.GradientSync(scripted, "topk", density=0.5)
    scripted(torch.ones(3, 4)).sum().backward()
    assert sync.synchronize()


def test_the_hook_registers_on_the_ddp_model_inside_torch_compile(group):
    """torch.compile(ddp) is an OptimizedModule around the DDP model: the hook goes on that
    model, as the wrapper's own register_comm_hook does (it was refused as not DDP)."""
    ddp = DDP(_model())
    state = sparsetrain.register_ddp_hook(torch.compile(ddp, backend="eager"), "topk", 0.5)
    ddp(torch.ones(3, 4)).sum().backward()
    assert state.stats()["steps"] == 1


def test_a_ddp_model_with_dynamos_python_reducer_is_refused_naming_it(group):
    """Under optimize_ddp="python_reducer" DDP calls a hook per parameter with (grad, param);
    the hook failed at the first backward with an AttributeError on a tuple."""
    import torch._dynamo

    with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
        ddp = DDP(_model())
    with pytest.raises(TypeError, match="python_reducer"):
        sparsetrain.register_ddp_hook(ddp, "topk", 0.5)


# ---- 3. integer options refuse bools ---------------------------------------------------------
@pytest.mark.parametrize("name", ["dense_warmup_steps", "byzantine"])
@pytest.mark.parametrize("value", [True, False, 1.0, "2"])
def test_integer_sync_options_refuse_bools_and_non_integers(group, name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer >= 0, got {value!r}"):
        _sync(density=0.1, **{name: value})


def test_dense_warmup_steps_still_takes_integers(group):
    assert _sync(density=0.1, dense_warmup_steps=3).config.dense_warmup_steps == 3
    with pytest.raises(ValueError, match="dense_warmup_steps must be an integer >= 0, got -1"):
        _sync(density=0.1, dense_warmup_steps=-1)


# ---- 4. the process group must be one ----------------------------------------------------------
@pytest.mark.parametrize("caller", list(MAKERS))
@pytest.mark.parametrize("bad", ["world", 0, dist])
def test_a_process_group_that_is_not_one_is_a_type_error(group, caller, bad):
    with pytest.raises(TypeError) as e:
        MAKERS[caller](density=0.1, process_group=bad)
    msg = str(e.value)
    assert msg.startswith("process_group must be a torch.distributed.ProcessGroup")
    assert "or None" in msg and type(bad).__name__ in msg


@pytest.mark.parametrize("caller", list(MAKERS))
def test_the_world_group_and_none_are_taken(group, caller):
    for given in (dist.group.WORLD, None):
        made = MAKERS[caller](density=0.1, process_group=given)
        # None: the default group, looked up at each call; the hook takes the DDP model's group,
        # here the default one, and a group given must have its ranks.
        assert made.engine.group is (None if caller == "register_ddp_hook" else given)


def test_the_engine_refuses_a_group_that_is_not_one():
    with pytest.raises(TypeError, match=r"^group must be a torch.distributed.ProcessGroup"):
        SyncEngine(make_config("topk", 0.1, {}), "world")


# ---- 5. load_state_dict names what a state must be -------------------------------------------
OWNERS = {"GradientSync": lambda: _sync(density=0.1), "SyncState": lambda: _hook(density=0.1)}


@pytest.mark.parametrize("owner", list(OWNERS))
@pytest.mark.parametrize("state", [None, [], "state", 3])
def test_a_state_that_is_not_a_dict_is_a_type_error(group, owner, state):
    with pytest.raises(TypeError) as e:
        OWNERS[owner]().load_state_dict(state)
    msg = str(e.value)
    assert f"{owner}.load_state_dict takes the dict that {owner}.state_dict() returned" in msg
    assert type(state).__name__ in msg


@pytest.mark.parametrize("owner", list(OWNERS))
def test_a_state_without_its_entries_names_the_missing_ones(group, owner):
    sync = OWNERS[owner]()
    with pytest.raises(ValueError) as e:
        sync.load_state_dict({})
    assert "lacks step, counters, feedback, compressor" in str(e.value)
    partial = {k: v for k, v in sync.state_dict().items() if k not in ("counters", "feedback")}
    with pytest.raises(ValueError, match=r"lacks counters, feedback$"):
        sync.load_state_dict(partial)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("step", -1, "'step' must be an integer >= 0, got -1"),
        ("step", True, "'step' must be an integer >= 0, got True"),
        ("step", "3", "'step' must be an integer >= 0, got '3'"),
        ("counters", None, "'counters' must be a dict"),
        ("feedback", [], "'feedback' must be a dict"),
        ("config", "threshold", "'config' must be a dict"),
        ("rank", 2, r"0 <= rank < world .*, got rank=2, world=\d"),
        ("rank", -1, r"0 <= rank < world .*, got rank=-1"),
        ("world", 0, r"0 <= rank < world .*, got rank=0, world=0"),
        ("world", "4", r"got rank=0, world='4'"),
    ],
)
def test_a_state_with_malformed_entries_is_refused(group, key, value, message):
    sync = _sync(density=0.1)
    with pytest.raises(ValueError, match=message):
        sync.load_state_dict({**sync.state_dict(), key: value})


# ---- 6. a state saved under other settings ----------------------------------------------------
@pytest.mark.parametrize("owner", list(OWNERS))
@pytest.mark.parametrize(
    ("saved", "differs"),
    [
        ({"density": 0.05}, "compressor option density: saved 0.05, now 0.1"),
        ({"compressor": "topk", "density": 0.1}, "compressor: saved 'topk', now 'threshold'"),
        ({"density": 0.1, "reestimate_every": 3}, "compressor option reestimate_every: saved 3"),
        ({"density": 0.1, "collective": "oktopk"}, "collective: saved 'oktopk', now 'allgather'"),
        ({"density": 0.1, "error_feedback": False}, "error_feedback: saved False, now True"),
        ({"density": 0.1, "dense_warmup_steps": 2}, "dense_warmup_steps: saved 2, now 0"),
    ],
)
def test_a_state_saved_under_other_settings_is_refused_naming_them(group, owner, saved, differs):
    target = OWNERS[owner]()
    state = _as_saved_by(target, _stepped(**saved).state_dict())
    before = target.state_dict()
    with pytest.raises(ValueError) as e:
        target.load_state_dict(state)
    msg = str(e.value)
    assert msg.startswith("this state was saved with other gradient-sync settings (")
    assert differs in msg
    assert f"{owner} must be built with the saved settings" in msg
    assert same(target.state_dict(), before)  # nothing was loaded


def test_every_differing_setting_is_named():
    a = SyncEngine(make_config("threshold", 0.05, {"collective": "oktopk"}))
    b = SyncEngine(make_config("threshold", 0.1, {}))
    with pytest.raises(ValueError) as e:
        b.load_state_dict(a.state_dict())
    msg = str(e.value)
    assert "density: saved 0.05, now 0.1" in msg and "collective: saved 'oktopk'" in msg
    assert "SyncEngine must be built" in msg


def test_on_nonfinite_may_differ_and_equivalent_settings_load(group):
    state = _stepped(density=0.1, on_nonfinite="skip").state_dict()
    _loads(_sync(density=0.1, on_nonfinite="propagate"), state)
    # error_feedback=None is on for the (biased) threshold compressor: the same as True.
    _loads(_sync(density=0.1, error_feedback=True), state)
    # The compressor's default density given explicitly is the same setting as leaving it out.
    default = _stepped().state_dict()
    _loads(_sync(density=_sync().engine.compressor.density), default)


def test_a_state_from_before_settings_were_recorded_loads_as_before(group):
    state = _stepped(density=0.1).state_dict()
    old = {k: v for k, v in state.items() if k != "config"}
    _loads(_sync(density=0.05), old)  # no config recorded: nothing to compare
    # A setting newer than the state (absent from its config) is not compared.
    older = {**state, "config": {k: v for k, v in state["config"].items() if k != "byzantine"}}
    _loads(_sync(density=0.1), older)


@pytest.mark.parametrize("owner", list(OWNERS))
def test_states_round_trip_exactly_through_a_file(group, owner):
    if owner == "GradientSync":
        source = _stepped(density=0.1, collective="oktopk")
        target = _sync(density=0.1, collective="oktopk")
    else:
        source, target = _hook(density=0.1), _hook(density=0.1)
        stepped = _stepped(density=0.1).state_dict()
        _loads(source, stepped)  # the hook's source holds a stepped state, not a fresh one
    state = source.state_dict()
    assert state["step"] > 0 and state["feedback"]
    assert state["config"] == source.engine.config.to_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    target.load_state_dict(torch.load(buf, weights_only=False))
    assert same(target.state_dict(), state)


@pytest.mark.parametrize("owner", list(OWNERS))
def test_a_state_with_entries_this_version_does_not_save_loads_with_a_warning_naming_them(
    group, owner
):
    """An entry no sparsetrain saves (a newer version's, a typo in an edited state) was
    dropped without a word; the state as saved loads without a warning."""
    sync = OWNERS[owner]()
    state = sync.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sync.load_state_dict(state)  # every entry of its own is known
    with pytest.warns(UserWarning, match=r"the state's entries 'residualz' are not ones") as w:
        sync.load_state_dict({**state, "residualz": {}})
    assert w[0].filename == __file__  # pointed at the call that loads it


# ---- a state of another layout: the other kind's, other buckets, another model -------------
def _trained_hook(net: nn.Module, cap_mb: float | None = None) -> dict:
    """A hook's state after three steps: DDP has rebuilt its buckets, and the state records
    them."""
    ddp = DDP(net) if cap_mb is None else DDP(net, bucket_cap_mb=cap_mb)
    hook = sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
    g = torch.Generator().manual_seed(2)
    dtype = next(net.parameters()).dtype
    for _ in range(3):
        ddp(torch.randn(8, 4, generator=g, dtype=dtype)).pow(2).mean().backward()
    return hook.state_dict()


def _refuses(target: Any, state: dict, *words: str) -> None:
    """``target`` refuses ``state`` naming ``words`` and loads nothing; strict=False loads it."""
    before = target.state_dict()
    with pytest.raises(ValueError) as e:
        target.load_state_dict(state)
    for w in words:
        assert w in str(e.value)
    assert "strict=False" in str(e.value)
    assert same(target.state_dict(), before)
    target.load_state_dict(state, strict=False)


def test_one_kinds_state_is_refused_by_the_other_kind(group):
    """A hook's state in GradientSync (or the other way) loaded without a word: the groups of
    parameters differ, so what was kept per group was dropped at the first step."""
    _refuses(_sync(density=0.1), _trained_hook(_model()), "saved by the DDP hook")
    _refuses(_hook(density=0.1), _stepped(density=0.1).state_dict(), "saved by GradientSync")


def test_a_hook_state_saved_under_another_ddp_bucket_cap_is_refused(group):
    """DDP's buckets under another cap are other groups of parameters: the saved groups were
    exchanged for one step, then every per-group threshold was dropped."""
    state = _trained_hook(_model(), cap_mb=0.0001)
    assert state["ddp_bucket_caps_bytes"] == [104, 104]  # the first bucket's, then the cap
    ddp = DDP(_model())
    target = sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
    _refuses(target, state, "DDP bucket caps of 9.92e-05 MB (104 bytes), 9.92e-05 MB (104 "
             "bytes), and this DDP model's are 1 MB (1048576 bytes), 25 MB (26214400 bytes)")  # fmt: skip
    same_cap = DDP(_model(), bucket_cap_mb=0.0001)
    sparsetrain.register_ddp_hook(same_cap, "threshold", density=0.1).load_state_dict(state)
    # DDP's default and bucket_cap_mb=25 differ in the first bucket's cap (1 MiB against 25),
    # which rebuilds other groups: both were recorded as [25 MiB] and loaded silently.
    default = _trained_hook(_model())
    given = DDP(_model(), bucket_cap_mb=25)
    hook = sparsetrain.register_ddp_hook(given, "threshold", density=0.1)
    _refuses(hook, default, "1 MB (1048576 bytes), 25 MB", "are 25 MB (26214400 bytes), 25 MB")


def test_a_pickled_hook_state_keeps_the_bucket_caps_it_hands_on(group):
    import pickle

    ddp = DDP(_model(), bucket_cap_mb=0.0001)
    hook = sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
    again = pickle.loads(pickle.dumps(hook))
    assert again.state_dict()["ddp_bucket_caps_bytes"] == [104, 104]


def test_a_hook_state_of_a_model_with_other_trained_parameters_is_refused(group):
    state = _trained_hook(_model())
    assert state["ddp_groups"]
    bigger = nn.Sequential(*_model(), nn.ReLU(), nn.Linear(2, 2))
    ddp = DDP(bigger)
    target = sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
    _refuses(target, state, "other parameters in DDP's buckets", "now with 4.bias, 4.weight")


def test_a_hook_state_saved_after_freezing_a_layer_ddp_buckets_loads(group):
    """A layer frozen after DDP was built stays in DDP's groups (under find_unused_parameters):
    the same program, built again, had its own state refused as another model's."""

    def build() -> tuple[nn.Module, DDP, sparsetrain.SyncState]:
        net = _model()
        ddp = DDP(net, find_unused_parameters=True)
        hook = sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
        net[0].requires_grad_(False)
        return net, ddp, hook

    net, ddp, hook = build()
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        ddp(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
    state = hook.state_dict()
    assert "0.weight" in {n for group in state["ddp_groups"] for n in group}
    _, ddp2, hook2 = build()
    hook2.load_state_dict(state)


@pytest.mark.parametrize("cap_mb", [25.0, 0.0001])
@pytest.mark.parametrize("owner", ["GradientSync", "SyncState"])
def test_a_state_of_a_model_in_another_dtype_is_refused_naming_the_dtype(group, owner, cap_mb):
    """A float64 model's residuals were rounded into a float32 one's without a word, and with
    small buckets GradientSync blamed bucket_cap_mb."""
    if owner == "GradientSync":
        saved = _stepped(density=0.1, bucket_cap_mb=cap_mb).state_dict()
        as_float64 = {k: v for k, v in saved.items() if k != "feedback"}
        residuals = {n: r.double() for n, r in saved["feedback"]["residuals"].items()}
        as_float64["feedback"] = {**saved["feedback"], "residuals": residuals}
        wide = sparsetrain.GradientSync(_model().double(), "threshold", 0.1, bucket_cap_mb=cap_mb)
        as_float64["buckets"] = wide.state_dict()["buckets"]  # a float64 run's buckets
        target = _sync(density=0.1, bucket_cap_mb=cap_mb)
    else:
        as_float64 = _trained_hook(_model().double(), cap_mb)
        ddp = DDP(_model(), bucket_cap_mb=cap_mb)
        target = sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
    _refuses(target, as_float64, "residuals of another dtype", "0.weight (torch.float64 saved, "
             "for a torch.float32 parameter now)")  # fmt: skip


@pytest.mark.parametrize(
    "edit, words",
    [
        ("int64", ("0.weight", "torch.int64")),
        ("bool", ("0.weight", "torch.bool")),
        ("complex", ("0.weight", "torch.complex64")),
        ("meta", ("real floating-point tensors with values, got '0.weight'", "on meta")),
        ("enabled", ("'enabled' must be True or False, got 'no'",)),
        ("collectives", ("the state's 'collectives' must be a dict {name: state}, got [1]",)),
    ],
)
def test_a_hand_edited_state_is_refused_naming_the_entry(group, edit, words):
    """Integer, boolean and complex residuals loaded (and trained with their truncated values),
    a meta one failed in a .item(), "no" read as enabled, and a list of collectives failed
    with an AttributeError."""
    saved = _stepped(density=0.1, collective="oktopk").state_dict()
    state = {**saved, "feedback": dict(saved["feedback"])}
    residuals = dict(saved["feedback"]["residuals"])
    kinds = {"int64": torch.int64, "bool": torch.bool, "complex": torch.complex64}
    if edit in kinds:
        residuals["0.weight"] = residuals["0.weight"].to(kinds[edit])
    elif edit == "meta":
        residuals["0.weight"] = residuals["0.weight"].to("meta")
    elif edit == "enabled":
        state["feedback"]["enabled"] = "no"
    else:
        state["collectives"] = [1]
    state["feedback"]["residuals"] = residuals
    target = _sync(density=0.1, collective="oktopk")
    before = target.state_dict()
    for strict in (True, False):
        with pytest.raises(ValueError) as e:
            target.load_state_dict(state, strict=strict)
        assert all(w in str(e.value) for w in words), (strict, str(e.value))
        assert same(target.state_dict(), before)


def test_strict_false_takes_a_robust_rules_state_under_its_new_settings(group):
    """The rules now refuse a state saved with other settings; strict=False through the sync
    still goes on under the new ones, as it did (the engine lets the settings differ)."""

    def make(momentum: float) -> tuple[nn.Module, sparsetrain.GradientSync]:
        net = _model()
        options = {"momentum": momentum}
        return net, sparsetrain.GradientSync(
            net, "none", aggregator="centered_clipping", aggregator_options=options
        )

    net, sync = make(0.9)
    for _ in range(2):
        net.zero_grad()
        net(torch.randn(3, 4)).sum().backward()
        sync.synchronize()
    saved = sync.state_dict()
    assert saved["aggregator"]["options"]["momentum"] == 0.9
    _, other = make(0.5)
    with pytest.raises(ValueError, match="aggregator_options: saved {'momentum': 0.9}"):
        other.load_state_dict(saved)
    other.load_state_dict(saved, strict=False)
    assert same(other.state_dict()["aggregator"]["anchor"], saved["aggregator"]["anchor"])


# ---- settings compared by their effect, and strict=False -------------------------------------
@pytest.mark.parametrize(
    "saved, now",
    [
        # a collective's defaults given explicitly
        ({"collective": "oktopk"}, {"collective": "oktopk",
                                    "collective_options": {"repartition_every": 64}}),
        # "auto"'s defaults given explicitly
        ({"collective": "auto"}, {"collective": "auto", "auto_candidates": "EXACT"}),
        ({"collective": "auto"}, {"collective": "auto", "auto_network": "DEFAULT"}),
        # the same link in seconds and in tc notation (floats that parse apart)
        ({"collective": "auto", "auto_network": (1e9, 1e-5)},
         {"collective": "auto", "auto_network": (1e9, "10us")}),
    ],
)  # fmt: skip
def test_a_state_loads_under_settings_that_are_the_same_in_effect(group, saved, now):
    from sparsetrain import perfmodel

    def real(options: dict) -> dict:
        out = dict(options, density=0.25)
        if out.get("auto_candidates") == "EXACT":
            out["auto_candidates"] = list(perfmodel.EXACT)
        net = out.get("auto_network")
        if net == "DEFAULT":
            out["auto_network"] = perfmodel.DEFAULT_PARAMS
        elif isinstance(net, tuple):
            out["auto_network"] = perfmodel.NetworkParams.from_link(*net)
        return out

    state = _stepped(**real(saved)).state_dict()
    _loads(_sync(**real(now)), state)


def test_strict_false_takes_a_state_saved_under_another_density_but_not_compressor(group):
    state = _stepped(density=0.25).state_dict()
    with pytest.raises(ValueError, match=r"density: saved 0.25, now 0.5.*or pass strict=False"):
        _sync(density=0.5).load_state_dict(state)
    sync = _sync(density=0.5)
    sync.load_state_dict(state, strict=False)  # the residuals carry over
    assert same(sync.state_dict()["feedback"], state["feedback"])
    with pytest.raises(ValueError, match="compressor: saved 'threshold', now 'topk'"):
        _sync(compressor="topk", density=0.25).load_state_dict(state, strict=False)
    with pytest.raises(TypeError, match="strict must be True or False"):
        _sync(density=0.25).load_state_dict(state, strict="no")
    # Nor residuals kept otherwise: strict=False is not offered (it would refuse them too)
    for other in ({"error_feedback": False}, {"momentum_correction": 0.9}):
        with pytest.raises(ValueError, match="saved with other gradient-sync") as refused:
            _sync(density=0.25, **other).load_state_dict(state)
        assert "strict=False" not in str(refused.value)


def test_an_unpickled_hook_state_registered_by_hand_says_how_to_restore_it(group):
    import pickle

    from sparsetrain.sync import ddp_hook

    state = _hook(density=0.25)
    restored = pickle.loads(pickle.dumps(state))  # pickling keeps no model
    model = DDP(_model())
    model.register_comm_hook(restored, ddp_hook._hook)
    with pytest.raises(RuntimeError, match="register_ddp_hook.*state.load_state_dict"):
        model(torch.ones(3, 4)).sum().backward()


# ---- a round payload that overflows its wire dtype ------------------------------------------
@pytest.mark.parametrize("mode", ["propagate", "skip", "raise"])
def test_a_powersgd_payload_that_overflows_float16_drops_or_raises(group, mode):
    torch.manual_seed(0)
    model = nn.Linear(256, 256, bias=False).half()
    sync = sparsetrain.GradientSync(model, "powersgd", rank=1, on_nonfinite=mode)
    model.weight.grad = torch.ones(256, 256).half()
    assert sync.synchronize()
    before = sync.state_dict()
    model.weight.grad = torch.full((256, 256), 60000.0).half()  # finite; P is not in float16
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="a P payload overflowed float16"):
            sync.synchronize()
    else:  # the step is dropped on every rank: NaN gradients, for a GradScaler to skip, or
        # zero ones under "skip" (which raised here before)
        assert not sync.synchronize()
        dropped = torch.isnan if mode == "propagate" else (lambda g: g == 0)
        assert dropped(model.weight.grad).all()
        assert sync.engine.stats()["skipped_steps"] == 1
    # Neither the residuals nor the warm start took anything from the overflowed step.
    after = sync.state_dict()
    assert same(after["feedback"], before["feedback"])
    assert same(after["compressor"], before["compressor"])
    model.weight.grad = torch.ones(256, 256).half()
    assert sync.synchronize() and torch.isfinite(model.weight.grad).all()


@pytest.mark.parametrize("mode", ["propagate", "skip", "raise"])
@pytest.mark.parametrize("sync_class", ["GradientSync", "exchange"])
def test_an_exchange_that_overflows_is_dropped_or_raised_in_every_mode(group, mode, sync_class):
    """The fp16 compressor's cast of a finite float32 gradient past 65504 is Inf: "propagate"
    dropped the step, but "skip" and "raise" handed the Inf on as the average gradient."""
    model = nn.Linear(4, 2)
    sync = sparsetrain.GradientSync(model, "fp16", on_nonfinite=mode)
    grads = [torch.full_like(p, 7e4) for p in model.parameters()]  # finite in float32
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    run = (
        sync.synchronize
        if sync_class == "GradientSync"
        else lambda: sync.engine.exchange(
            torch.cat([g.view(-1) for g in grads]),
            [n for n, _ in model.named_parameters()],
            [p.shape for p in model.parameters()],
        )
    )
    if mode == "raise":
        with pytest.raises(
            FloatingPointError, match="the exchange overflowed .the fp16 compressor"
        ):
            run()
        return
    out = run()
    if sync_class == "GradientSync":
        assert out is False and sync.skipped_last_step
        got = torch.cat([p.grad.view(-1) for p in model.parameters()])
    else:
        sync.engine.end_step()
        got = out
    assert (torch.isnan(got) if mode == "propagate" else got == 0).all(), got
    assert sync.engine.stats()["skipped_steps"] == 1


# ---- a refused load changes nothing ------------------------------------------------------------
@pytest.mark.parametrize("broken", ["feedback", "residuals", "compressor", "collective"])
def test_a_state_refused_half_way_leaves_the_sync_as_it_was(group, broken):
    # The step and counters were set, and the residuals replaced, before a later part of the
    # state was refused: the sync went on half loaded.
    sync = _stepped(density=0.25, collective="oktopk")
    before = sync.state_dict()
    state = _stepped(density=0.5, collective="oktopk").state_dict()  # other residuals, steps
    state["step"] = 99
    if broken == "feedback":
        state["feedback"]["enabled"] = False
    elif broken == "residuals":  # checked without copying the residuals first
        state["feedback"]["residuals"] = {"weight": [1.0, 2.0]}
    elif broken == "compressor":
        state["compressor"] = {"wrong": 1}
    else:
        state["collectives"] = {"oktopk": {"wrong": 1}}
    with pytest.raises(ValueError):
        sync.load_state_dict(state, strict=False)
    assert same(sync.state_dict(), before)
    assert sync.engine.step == before["step"] == 2


def test_a_load_keeps_the_memory_reserved_when_the_sync_was_built(group):
    # GradientSync reserves its error-feedback buffers when built (as DDP takes its buckets);
    # a load that built its parts anew dropped them, and the first steps took memory again.
    sync = _stepped(density=0.25)
    reserved = dict(sync.engine.feedback._buffers)
    assert reserved
    sync.load_state_dict(sync.state_dict())
    assert sync.engine.feedback._buffers.keys() == reserved.keys()


# ---- layers that make sparse gradients ---------------------------------------------------------
class _SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(100, 8, sparse=True)
        self.l = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.e(x))


@pytest.mark.parametrize("caller", list(MAKERS))
def test_a_layer_with_sparse_gradients_is_refused_by_name(group, caller):
    """nn.Embedding(sparse=True) failed on the first step deep inside torch ("Could not run
    'aten::as_strided' with arguments from the 'SparseCPU' backend")."""
    model = _SparseEmbedding()
    make = {
        "register_ddp_hook": lambda: sparsetrain.register_ddp_hook(DDP(model), "topk", 0.1),
        "GradientSync": lambda: sparsetrain.GradientSync(model, "topk", 0.1),
    }[caller]
    with pytest.raises(TypeError, match=r"parameter 'e.weight' gets sparse gradients \(Embedding"):
        make()
    model.e.weight.requires_grad_(False)  # a frozen sparse layer makes no gradient to exchange
    make()


def test_gradient_sync_makes_a_sparse_gradient_it_is_handed_dense(group):
    """It raised on the rank that had one, alone, and the other ranks waited in the exchange
    (a sparse embedding tied to a dense layer makes one on a step that uses only the
    embedding)."""
    sync = _sync(compressor="none")
    _, p = sync.params[0]
    dense = torch.randn(p.shape)
    p.grad = dense.to_sparse()
    assert sync.synchronize()
    assert p.grad.layout == torch.strided and torch.equal(p.grad, dense)


def test_a_placeholder_for_a_group_without_this_rank_is_named(group):
    with pytest.raises(ValueError, match=r"process_group does not include this rank \(0 "):
        sparsetrain.GradientSync(
            _model(), "topk", 0.1, process_group=dist.GroupMember.NON_GROUP_MEMBER
        )


class _Tied(nn.Module):
    """A sparse embedding tied to a dense output layer: autograd adds the two gradients into a
    dense one. ``head_first``: the dense layer registered first, as DDP needs it."""

    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.out = nn.Linear(8, 50, bias=False)
            self.emb = nn.Embedding(50, 8, sparse=True)
            self.emb.weight = self.out.weight
        else:
            self.emb = nn.Embedding(50, 8, sparse=True)
            self.out = nn.Linear(8, 50, bias=False)
            self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def test_sparse_layers_whose_gradients_never_reach_the_exchange_are_accepted(group):
    # Left out of DDP's buckets (synchronised some other way), a sparse embedding is no concern
    # of the hook's; tied to a dense layer, its gradient is dense.
    model = _SparseEmbedding()
    DDP._set_params_and_buffers_to_ignore_for_model(model, ["e.weight"])
    ddp = DDP(model)
    sparsetrain.register_ddp_hook(ddp, "topk", 0.5)
    ddp(torch.randint(0, 100, (4, 3))).sum().backward()
    assert model.e.weight.grad.layout == torch.sparse_coo and model.l.weight.grad is not None
    tied = _Tied()
    sync = sparsetrain.GradientSync(tied, "topk", 0.5)
    tied(torch.randint(0, 50, (4,))).sum().backward()
    assert tied.emb.weight.grad.layout == torch.strided and sync.synchronize()
    tied.zero_grad()
    tied.emb(torch.randint(0, 50, (4,))).sum().backward()  # the dense layer unused: sparse
    assert tied.emb.weight.grad.layout == torch.sparse_coo
    assert sync.synchronize() and tied.emb.weight.grad.layout == torch.strided


def test_the_hook_refuses_a_tied_sparse_embedding_that_ddp_takes_for_sparse(group):
    """DDP expects a sparse gradient for a weight whose first holder is a sparse embedding, and
    raised its own "Expected variable to have sparse gradient" at the first backward, while the
    hook's exchange of another bucket could still be running (a review saw the group broken
    afterwards). The dense layer first, DDP and the hook train it."""
    with pytest.raises(TypeError, match=r"'emb.weight' is tied to a dense layer, but DDP takes"):
        sparsetrain.register_ddp_hook(DDP(_Tied()), "topk", 0.5)
    ddp = DDP(_Tied(head_first=True))
    sparsetrain.register_ddp_hook(ddp, "topk", 0.5)
    ddp(torch.randint(0, 50, (4,))).sum().backward()
    assert ddp.module.out.weight.grad.layout == torch.strided


def test_a_weight_only_sparse_layers_share_is_refused(group):
    """Two sparse embeddings sharing one weight passed as if tied to a dense layer, and every
    gradient was sparse."""
    model = _SparseEmbedding()
    model.f = nn.Embedding(100, 8, sparse=True)
    model.f.weight = model.e.weight
    with pytest.raises(TypeError, match=r"parameter 'e.weight' gets sparse gradients"):
        sparsetrain.GradientSync(model, "topk", 0.5)


def test_the_hook_names_a_sparse_bucket_it_is_handed(group, monkeypatch):
    """A layer of the model's own that makes sparse gradients, which the registration cannot
    see: the hook names the bucket's parameters instead of failing inside torch."""
    import sparsetrain.sync.ddp_hook as hook_module

    monkeypatch.setattr(hook_module, "check_dense_gradients", lambda *args, **kwargs: None)
    ddp = DDP(_SparseEmbedding())
    sparsetrain.register_ddp_hook(ddp, "topk", 0.5)
    with pytest.raises(TypeError, match="the bucket of e.weight holds a torch.sparse_coo"):
        ddp(torch.randint(0, 100, (4, 3))).sum().backward()


@pytest.mark.parametrize("caller", list(MAKERS))
def test_a_pruner_given_the_sync_clears_the_residuals_of_pruned_weights(group, caller):
    """Error feedback kept what pruned weights had not sent, and sent it after they were
    pruned, crowding out the kept weights' entries for many steps."""
    from sparsetrain.pruning import get_pruner

    net = _model()
    if caller == "register_ddp_hook":
        model = DDP(net)
        sync = sparsetrain.register_ddp_hook(model, "topk", 0.1)
    else:
        model = net
        sync = sparsetrain.GradientSync(net, "topk", 0.1)
    x = torch.randn(16, 4)
    for _ in range(3):
        net.zero_grad()
        model(x).pow(2).sum().backward()
        if caller == "GradientSync":
            sync.synchronize()
    residuals = sync.engine.feedback.residuals
    assert residuals["0.weight"].count_nonzero() > 0
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(model, sync=sync)
    pruner.prune()
    for name, mask in pruner.masks.items():
        kept = residuals[name].reshape(mask.shape)
        assert not kept[~mask].any(), name  # cleared where pruned
        assert kept[mask].count_nonzero() > 0, name  # kept where not
    with pytest.raises(TypeError, match="sync must be the state sparsetrain.register_ddp_hook"):
        get_pruner("magnitude", sparsity=0.5).prepare(_model(), sync=object())


def test_rigls_deferred_initial_masks_clear_the_residuals_when_they_take_effect(group):
    from sparsetrain.pruning import get_pruner

    net = _model()
    sync = sparsetrain.GradientSync(net, "topk", 0.1)
    x = torch.randn(16, 4)
    for _ in range(3):
        net.zero_grad()
        net(x).pow(2).sum().backward()
        sync.synchronize()
    pruner = get_pruner("rigl", sparsity=0.5, delta_t=10, end=100).prepare(net, sync=sync)
    net(x)  # RigL's initial masks take effect at the first forward pass
    residuals = sync.engine.feedback.residuals
    for name, mask in pruner.masks.items():
        assert not residuals[name].reshape(mask.shape)[~mask].any(), name


@pytest.mark.parametrize("method", ["magnitude", "rigl"])
@pytest.mark.parametrize("sync_first", [True, False], ids=["sync_loaded_first", "pruner_first"])
def test_a_pruner_state_loaded_keeps_the_syncs_residuals_so_the_resume_is_exact(
    group, method, sync_first
):
    """With mask_gradients=False residuals build up at pruned weights between mask changes;
    loading the pruner's state cleared them, so a resume that loaded the sync's state first
    sent other entries than the run that never stopped."""
    from sparsetrain.pruning import Gradual, get_pruner

    def build():
        net = _model()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sync = sparsetrain.GradientSync(net, "topk", 0.1)
        options = {"schedule": Gradual(start=0, end=4, frequency=2)}
        if method == "rigl":
            options = {"delta_t": 3, "end": 12}
        pruner = get_pruner(method, sparsity=0.8, mask_gradients=False, **options)
        return net, opt, sync, pruner.prepare(net, opt, sync=sync)

    def train(net, opt, sync, pruner, steps):
        for s in steps:
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(s))
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            sync.synchronize()
            opt.step()
            pruner.step(s)

    net, opt, sync, pruner = build()
    train(net, opt, sync, pruner, range(8))
    saved = copy.deepcopy([net.state_dict(), opt.state_dict(), sync.state_dict(),
                           pruner.state_dict()])  # fmt: skip
    train(net, opt, sync, pruner, range(8, 12))
    net2, opt2, sync2, pruner2 = build()
    net2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    loads = [lambda: sync2.load_state_dict(saved[2]), lambda: pruner2.load_state_dict(saved[3])]
    for load in loads if sync_first else loads[::-1]:
        load()
    residuals = saved[2]["feedback"]["residuals"]
    pruned = {n: ~m.reshape(-1) for n, m in saved[3]["masks"].items()}
    assert any(residuals[n][at].any() for n, at in pruned.items()), (
        "the saved residuals hold nothing at pruned weights: the test shows nothing"
    )
    train(net2, opt2, sync2, pruner2, range(8, 12))
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert same(sync2.state_dict()["feedback"], sync.state_dict()["feedback"])  # the residuals


def test_powersgd_recovers_after_a_step_whose_gradient_was_not_finite(group):
    """One bad step drops itself, not the rest of training: PowerSGD kept the Q of a NaN step
    as its warm start, so every later step was non-finite and skipped too. And a finite float32
    gradient of 1e20 is no bad step: a warm Q squared it past float32's range in P = M Q."""
    torch.manual_seed(0)
    model = nn.Linear(32, 32, bias=False)
    sync = sparsetrain.GradientSync(model, "powersgd", rank=1, on_nonfinite="skip")
    for scale in (1.0, 1e20, 1e20, 1.0, 1.0):
        model.weight.grad = torch.randn(32, 32) * scale
        assert sync.synchronize() and torch.isfinite(model.weight.grad).all()
    model.weight.grad = torch.randn(32, 32)
    model.weight.grad[0, 0] = float("nan")
    assert not sync.synchronize()
    model.weight.grad = torch.randn(32, 32)
    assert sync.synchronize() and torch.isfinite(model.weight.grad).all()


@pytest.mark.parametrize("name", ["allgather", "ssar_rd", "oktopk", "gtopk"])
def test_a_rank_outside_the_group_is_told_so(group, name):
    # new_group returns GroupMember.NON_GROUP_MEMBER (-100) on the ranks it leaves out: the
    # message said an int is not a ProcessGroup, of what new_group itself had returned.
    from sparsetrain.comm import get_collective

    with pytest.raises(ValueError, match="this rank is not a member of the group"):
        get_collective(name)(
            torch.tensor([0]), torch.ones(1), 4, group=dist.GroupMember.NON_GROUP_MEMBER
        )


def test_another_models_state_is_refused_naming_the_parameters(group):
    # It was taken where names and sizes matched, kept for ever where they did not (a bigger
    # model's extra layers), and failed inside a later backward where sizes differed.
    saved = _stepped(density=0.5).state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    shorter = nn.Sequential(nn.Linear(4, 8))
    for model, words in (
        (wider, r"parameters of other sizes: 0.bias \(8 elements saved, 16 now\)"),
        (shorter, "parameters this model does not have: 2.bias, 2.weight"),
    ):
        sync = sparsetrain.GradientSync(model, "threshold", density=0.5)
        before = sync.state_dict()
        with pytest.raises(
            ValueError, match=f"GradientSync: this state is another model's.*{words}"
        ):  # noqa: E501
            sync.load_state_dict(saved)
        assert same(sync.state_dict(), before)  # nothing loaded
        sync.load_state_dict(saved, strict=False)  # what fits, as Module.load_state_dict
    del sync  # (the hook refuses a model a live GradientSync exchanges)
    hook = sparsetrain.register_ddp_hook(DDP(shorter), "threshold", density=0.5)
    with pytest.raises(ValueError, match="SyncState: this state is another model's"):
        hook.load_state_dict({**saved, "ddp_groups": None})


def test_a_second_hook_on_one_ddp_model_is_refused_and_leaves_nothing_behind(group):
    from sparsetrain.sync import ddp_hook

    model = DDP(_model())
    first = sparsetrain.register_ddp_hook(model, "threshold", density=0.5)
    with pytest.raises(ValueError, match="already has a communication hook"):
        sparsetrain.register_ddp_hook(model, "threshold", density=0.5, overlap=False)
    # The refused state neither stays in the model's hooks nor pins exchanges to the
    # backward thread (it moved every hooked model's there).
    assert len(model._comm_hooks) == 1 and model._comm_hooks[0][1] is first
    assert not ddp_hook._ON_BACKWARD_THREAD
    plain = DDP(_model())
    plain.register_comm_hook(None, lambda _, bucket: None)  # torch's own, first
    with pytest.raises(ValueError, match="already has a communication hook"):
        sparsetrain.register_ddp_hook(plain, "threshold", density=0.5)


def test_gradient_sync_refuses_the_module_of_a_hooked_ddp_model(group):
    # Each step was compressed and exchanged twice: by the hook in backward, then again.
    model = DDP(_model())
    sparsetrain.register_ddp_hook(model, "threshold", density=0.5)
    with pytest.raises(ValueError, match="module of a DDP model that has sparsetrain's hook"):
        sparsetrain.GradientSync(model.module, "threshold", density=0.5)
    sparsetrain.GradientSync(DDP(_model()).module, "threshold", density=0.5)  # not hooked
    # A layer of the hooked model, and a model holding it (one order only was refused)
    with pytest.raises(ValueError, match="this model is inside the module of a DDP model"):
        sparsetrain.GradientSync(model.module[0], "threshold", density=0.5)
    with pytest.raises(ValueError, match="this model holds the module of a DDP model"):
        sparsetrain.GradientSync(nn.Sequential(model.module), "threshold", density=0.5)


def test_the_hook_refuses_a_model_whose_gradients_a_gradient_sync_exchanges(group):
    """GradientSync first, then the hook on a DDP model of the same module: each step was
    compressed and exchanged twice, without a word."""
    net = _model()
    sync = sparsetrain.GradientSync(net, "threshold", density=0.5)
    for module, how in ((net, "is"), (net[0], "is inside"), (nn.Sequential(net), "holds")):
        with pytest.raises(ValueError, match=f"module {how} the model of a sparsetrain.Gradi"):
            sparsetrain.register_ddp_hook(DDP(module), "threshold", density=0.5)
    del sync  # dropped: the model may move to the hook
    sparsetrain.register_ddp_hook(DDP(net), "threshold", density=0.5)


def test_a_gradient_sync_its_model_reaches_is_freed_with_it(group):
    """The registry the hook checks held each GradientSync's model: one the model reaches back
    (a pruner prepared with sync=, through its gradient hooks) was kept for the process's life."""
    import gc
    import weakref

    from sparsetrain.pruning import get_pruner

    net = _model()
    sync = sparsetrain.GradientSync(net, "threshold", density=0.5)
    get_pruner("magnitude", sparsity=0.5).prepare(net, sync=sync)
    gone = weakref.ref(net)
    del net, sync
    gc.collect()
    assert gone() is None


def test_a_state_saved_before_ddp_rebuilt_its_buckets_warns_once(group):
    """A run resumed from it compressed other groups than the uninterrupted one, without a word
    (README promised exactness only from checkpoints written after DDP rebuilt)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(600, 600), nn.Linear(600, 10))  # 1.4 MB: two first buckets
    ddp = DDP(net)
    state = sparsetrain.register_ddp_hook(ddp, "topk", 0.01)

    def step() -> list:
        model = ddp.module
        ddp(torch.randn(4, model[0].in_features)).sum().backward()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            saved = state.state_dict()
            state.state_dict()
        return [saved["ddp_groups"], [str(w.message) for w in seen]]

    groups, seen = step()
    assert groups is None and len(seen) == 1 and "before DDP has rebuilt its buckets" in seen[0]
    groups, seen = step()
    assert groups is not None and seen == []
    # A model within DDP's first bucket (1 MiB) is one bucket before and after: no warning.
    ddp = DDP(_model())
    state = sparsetrain.register_ddp_hook(ddp, "topk", 0.5)
    groups, seen = step()
    assert groups is None and seen == []


def test_gradient_sync_refuses_a_layer_replaced_after_it_was_built():
    # A new head after GradientSync was built was in no bucket: its gradients were never
    # exchanged, and each rank's copy drifted apart without a word.
    model = _model()
    sync = sparsetrain.GradientSync(model, "none")
    model(torch.randn(3, 4)).sum().backward()
    assert sync.synchronize()
    model[2] = nn.Linear(8, 2)
    model(torch.randn(3, 4)).sum().backward()
    for _ in range(2):  # every call, not the first only (a caller may catch it and go on)
        with pytest.raises(ValueError, match=r"parameter\(s\) 2\.weight, 2\.bias are not those "
                           r"it was built with .* build GradientSync again after changing"):  # fmt: skip
            sync.synchronize()
    sparsetrain.GradientSync(model, "none").synchronize()  # built again: it goes on


@pytest.mark.parametrize("when", ["frozen_before_building", "added_frozen"])
def test_gradient_sync_refuses_a_layer_unfrozen_that_no_bucket_holds(when):
    """Gradual unfreezing: a layer frozen when GradientSync was built (or added frozen later)
    and trainable now is in no bucket. It got a warning, once, and its copies drifted apart."""
    model = _model()
    if when == "frozen_before_building":
        model[2].requires_grad_(False)
    sync = sparsetrain.GradientSync(model, "none")
    if when == "added_frozen":
        model.append(nn.Linear(2, 2).requires_grad_(False))
    model(torch.randn(3, 4)).sum().backward()
    assert sync.synchronize()  # frozen: left alone
    layer = model[2] if when == "frozen_before_building" else model[3]
    layer.requires_grad_(True)
    named = "2.weight, 2.bias" if when == "frozen_before_building" else "3.weight, 3.bias"
    for _ in range(2):  # every call, while it trains
        model.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        with pytest.raises(ValueError, match=rf"parameter\(s\) {named} were frozen when it was "
                           r"built \(or added\) and are trainable now.* strict=False"):  # fmt: skip
            sync.synchronize()
    layer.requires_grad_(False)
    model.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    assert sync.synchronize()  # frozen again: it goes on
    layer.requires_grad_(True)
    rebuilt = sparsetrain.GradientSync(model, "none")
    rebuilt.load_state_dict(sync.state_dict(), strict=False)  # as the message says
    assert rebuilt.synchronize()


def test_a_frozen_layer_taken_out_of_the_model_is_not_refused_when_it_trains(group):
    model = nn.Module()
    model.body, model.teacher = nn.Linear(4, 2), nn.Linear(4, 2).requires_grad_(False)
    sync = sparsetrain.GradientSync(model, "none")
    teacher = model.teacher
    del model.teacher  # trained on its own from now on
    teacher.requires_grad_(True)
    model.body(torch.randn(3, 4)).sum().backward()
    assert sync.synchronize()


def test_strict_false_takes_the_residuals_that_fit_and_drops_the_others():
    # The strict error says "pass strict=False to take what fits"; done, the next step failed
    # on the resized layer's residual.
    state = _stepped(compressor="topk", density=0.2).state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # a 3-class head
    sync = sparsetrain.GradientSync(wider, "topk", density=0.2)
    with pytest.raises(ValueError, match="2.bias .2 elements saved, 3 now"):
        sync.load_state_dict(state)
    sync.load_state_dict(state, strict=False)
    residuals = sync.state_dict()["feedback"]["residuals"]
    assert sorted(residuals) == ["0.bias", "0.weight"]  # the head's are dropped, not the rest
    assert torch.equal(residuals["0.weight"], state["feedback"]["residuals"]["0.weight"])
    wider(torch.randn(5, 4)).sum().backward()
    assert sync.synchronize()


@pytest.mark.parametrize(
    "spoil, words",
    [
        (lambda s: s["feedback"]["residuals"]["0.weight"].__setitem__(3, float("nan")),
         r"error-feedback state's 'residuals' of '0.weight' hold NaN or Inf: .* diverged"),
        (lambda s: s["counters"].__setitem__("bytes_sent", "x"),
         r"'counters' must map bytes_sent, .* to finite numbers >= 0, got \{'bytes_sent': 'x'\}"),
        (lambda s: s["counters"].__setitem__("steps", -1), r"got \{'steps': -1\}"),
    ],
)  # fmt: skip
def test_a_state_with_values_no_run_could_save_is_refused_at_load(spoil, words):
    # A NaN residual loaded silently, then every step was skipped (on_nonfinite="skip") or
    # called an overflow; a counter of the wrong type failed at the next step.
    state = _stepped(compressor="topk", density=0.2).state_dict()
    spoil(state)
    sync = _stepped(compressor="topk", density=0.2)
    before = sync.state_dict()
    with pytest.raises(ValueError, match=words):
        sync.load_state_dict(state)
    assert same(sync.state_dict(), before)


@pytest.mark.parametrize("compressor", sparsetrain.available_compressors())
def test_gradients_from_create_graph_are_exchanged_as_values(compressor):
    """After backward(create_graph=True) (a gradient penalty, MAML) the gradients require grad:
    synchronize failed inside autograd for eight of the ten compressors."""
    options = {"density": 0.5} if compressor in ("topk", "threshold", "randomk") else {}
    if compressor == "randomk":
        options["error_feedback"] = False
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    sync = sparsetrain.GradientSync(net, compressor, **options)
    net(torch.randn(8, 4)).square().sum().backward(create_graph=True)
    before = [p.grad.detach().clone() for p in net.parameters()]
    assert sync.synchronize()
    for p, g in zip(net.parameters(), before):
        assert not p.grad.requires_grad
        if compressor == "none":  # one rank: the average is the gradient
            torch.testing.assert_close(p.grad, g)


def test_the_hook_states_reads_wait_for_exchanges_still_running(group):
    """After backward raised (a NaN under on_nonfinite="raise": DDP re-raises the first failed
    bucket at once), the step's later buckets and its end still ran on the background thread,
    and a state read then was half a step behind."""
    import time

    state = sparsetrain.register_ddp_hook(DDP(_model()), "threshold", density=0.5)
    for read in (
        lambda: state.stats(),
        lambda: state.skipped_last_step,
        lambda: state.state_dict(),
        lambda: state.clear_residuals({}),
    ):
        ran: list[int] = []
        state._executor.submit(lambda ran=ran: (time.sleep(0.2), ran.append(1)))  # a step's end
        read()
        assert ran == [1]
