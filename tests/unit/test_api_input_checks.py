"""Input checks of the public APIs below the sync layer: the states that robust rules, attacks,
compressors and collectives load; the process group the collectives take; the attack and rule
that the robust exchange is given. A bad input gets an error that names what is wrong and what
is allowed, and a refused state leaves the object as it was."""

from __future__ import annotations

import copy
import io
import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

from sparsetrain.comm import all_gather_variable, available_collectives, get_collective
from sparsetrain.comm.oktopk import OkTopk
from sparsetrain.compressors import available_compressors, get_compressor
from sparsetrain.robust import available_aggregators, available_attacks, get_aggregator, get_attack
from sparsetrain.sync.robust_exchange import robust_exchange
from tests.distributed.harness import oks, run_world
from tests.states import same


@pytest.fixture
def group(one_thread):
    """A process group of one rank (gloo, in memory), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _refused(obj, state, error=ValueError, match=None) -> str:
    """Load ``state`` into ``obj``, expect ``error``, check nothing was loaded; the message."""
    before = copy.deepcopy(obj.state_dict())
    with pytest.raises(error, match=match) as e:
        obj.load_state_dict(state)
    assert same(obj.state_dict(), before), "a refused state changed the object"
    return str(e.value)


# ---- robust rules ---------------------------------------------------------------------------
def _stream(n: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(n, 6, generator=g) * 0.1 + 1.0
        x[-1] = -5.0 * x[:-1].mean(0)
        yield x


def _stepped(name: str, n: int = 7, f: int = 1, steps: int = 6, **options):
    rule = get_aggregator(name, n=n, f=f, **options)
    for x in _stream(n, steps):
        rule(x, key="a")
        rule.end_step()
    return rule


SAFEGUARD_ENTRIES = ("step", "good", "removed", "acc", "spread", "calibrated_good", "no_majority")


@pytest.mark.parametrize(
    "make",
    [
        lambda: _stepped("safeguard", window0=2, window1=4),
        lambda: _stepped("bucketing", base="centered_clipping", bucket_size=1),
    ],
    ids=["safeguard", "bucketing-over-centered-clipping"],
)
def test_an_empty_state_is_refused_naming_the_entries_expected(make):
    rule = make()
    msg = _refused(rule, {})
    expected = ("step", "base") if rule.name == "bucketing" else SAFEGUARD_ENTRIES
    assert all(repr(k) in msg for k in expected), msg


@pytest.mark.parametrize(
    ("name", "saved_with", "loaded_into", "named"),
    [
        ("safeguard", {"window0": 2, "window1": 4}, {"window0": 3, "window1": 4},
         "window0: saved 2, now 3"),
        ("safeguard", {"window0": 2, "window1": 4}, {"window0": 2, "window1": 4, "f": 2},
         "f: saved 1, now 2"),
        ("centered_clipping", {"momentum": 0.9, "tau": 0.5}, {"momentum": 0.0, "tau": 0.5},
         "momentum: saved 0.9, now 0.0"),
        ("bucketing", {"base": "mean", "bucket_size": 2}, {"base": "median", "bucket_size": 2},
         "base: saved 'mean', now 'median'"),
        ("bucketing", {"bucket_size": 2}, {"bucket_size": 2, "seed": 4}, "seed: saved 0, now 4"),
    ],
)  # fmt: skip
def test_a_rule_refuses_a_state_saved_with_other_settings_unless_not_strict(
    name, saved_with, loaded_into, named
):
    """Loaded silently before: SafeguardSGD with other windows, clipping with another
    momentum, bucketing over another rule went on from sums and anchors made otherwise."""
    saved = _stepped(name, **saved_with).state_dict()
    rule = _stepped(name, **loaded_into)
    msg = _refused(rule, saved)
    assert "this state was saved with other settings (" in msg and named in msg, msg
    rule.load_state_dict(saved, strict=False)
    assert same(rule.state_dict()["step" if name != "centered_clipping" else "anchor"],
                saved["step" if name != "centered_clipping" else "anchor"])  # fmt: skip
    same_settings = _stepped(name, steps=0, **saved_with)
    same_settings.load_state_dict(saved)
    assert same(same_settings.state_dict(), saved)
    old = {k: v for k, v in saved.items() if k != "options"}  # saved before settings were kept
    _stepped(name, **loaded_into).load_state_dict(old)


def test_bucketings_state_loads_on_another_number_of_workers():
    # n is the world's, not a setting: reshard_state carries bucketing's state (its step) to
    # another number of ranks, and the recorded n=7 refused the resume on 5.
    saved = _stepped("bucketing", n=7, bucket_size=2).state_dict()
    assert saved["options"]["n"] == 7
    rule = get_aggregator("bucketing", n=5, f=1, bucket_size=2)
    rule.load_state_dict(saved)
    assert rule.state_dict()["step"] == saved["step"]


def test_safeguard_refuses_a_centered_clipping_state_naming_what_it_lacks():
    cc = _stepped("centered_clipping", momentum=0.5)
    sg = _stepped("safeguard", window0=2, window1=4)
    msg = _refused(sg, cc.state_dict())
    assert "lacks 'step', 'good'" in msg and "unknown entries 'anchor', 'momenta'" in msg
    bk = _stepped("bucketing", base="centered_clipping", bucket_size=1)
    msg = _refused(bk, {"step": 3, "base": sg.state_dict()})
    assert "base rule 'centered_clipping'" in msg and "lacks 'anchor', 'momenta'" in msg


def test_centered_clipping_refuses_a_state_that_lacks_its_entries():
    cc = _stepped("centered_clipping", momentum=0.5)
    msg = _refused(cc, {})
    assert "'anchor', 'momenta'" in msg
    _refused(cc, {"anchor": {}, "momenta": {"a": torch.zeros(3, 6)}}, match="momenta of key")


@pytest.mark.parametrize("name", available_aggregators())
@pytest.mark.parametrize("bad", [[1, 2], None, "state"])
def test_every_rule_refuses_a_state_that_is_not_a_dict(name, bad):
    rule = get_aggregator(name, n=7, f=1)
    with pytest.raises(TypeError, match="load_state_dict takes the dict that state_dict"):
        rule.load_state_dict(bad)


@pytest.mark.parametrize(
    "saved, now, kind",
    [
        ({}, {"threshold0": 1.0, "threshold1": 2.0}, "automatic"),
        ({"threshold0": 1.0, "threshold1": 2.0}, {}, "fixed"),
    ],
)
def test_safeguard_refuses_a_state_saved_with_the_other_kind_of_thresholds(saved, now, kind):
    state = _stepped("safeguard", window0=2, window1=4, **saved).state_dict()
    target = get_aggregator("safeguard", n=7, f=1, window0=2, window1=4, **now)
    msg = _refused(target, state)
    assert f"saved by a rule with {kind} thresholds" in msg, msg
    # the same kind loads, exactly
    twin = get_aggregator("safeguard", n=7, f=1, window0=2, window1=4, **saved)
    twin.load_state_dict(state)
    assert same(twin.state_dict(), state)


def test_a_safeguard_state_from_before_the_thresholds_entry_still_loads_and_is_checked():
    state = _stepped("safeguard", window0=2, window1=4).state_dict()
    old = {k: v for k, v in state.items() if k != "auto_thresholds"}
    rule = get_aggregator("safeguard", n=7, f=1, window0=2, window1=4)
    rule.load_state_dict(old)
    assert rule.stats() == _stepped("safeguard", window0=2, window1=4).stats()
    # it measured a spread, so it came from automatic thresholds
    fixed = get_aggregator("safeguard", n=7, f=1, threshold0=1.0, threshold1=2.0)
    _refused(fixed, old, match="saved by a rule with automatic thresholds")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"good": [True] * 7}, "'good' must be a 1-D tensor"),
        ({"good": torch.zeros(7, dtype=torch.bool)}, "marks no worker good"),
        ({"removed": [6]}, "'removed' must be a dict"),
        ({"removed": {9: 1}}, "worker in the state's 'removed'"),
        ({"step": -1}, "'step' must be an integer >= 0"),
        ({"step": "3"}, "'step' must be an integer >= 0"),
        ({"spread": [0.1]}, "'spread' must be a list of 2 numbers"),
        ({"acc": {"a": {"short": torch.zeros(7, 6)}}}, "entries 'short' and 'long'"),
        ({"acc": {"a": {"short": torch.zeros(7, 6), "long": torch.zeros(5, 6)}}}, "same shape"),
        ({"auto_thresholds": "yes"}, "'auto_thresholds' must be True or False"),
        ({"extra": 1}, "unknown entries 'extra'"),
    ],
)
def test_safeguard_refuses_malformed_entries_and_loads_nothing(change, match):
    rule = _stepped("safeguard", window0=2, window1=4)
    _refused(rule, {**rule.state_dict(), **change}, match=match)


def test_safeguard_refuses_a_state_of_another_number_of_workers_and_says_what_to_do():
    saved = _stepped("safeguard", n=7, window0=2, window1=4).state_dict()
    fewer = get_aggregator("safeguard", n=5, f=1, window0=2, window1=4)
    _refused(fewer, saved, match="is for 7 workers, this rule has n=5: resume with as many")


def test_a_state_round_trips_exactly_through_a_file():
    for name, options in [
        ("safeguard", {"window0": 2, "window1": 4}),
        ("safeguard", {"threshold0": 1.0, "threshold1": 2.0}),
        ("centered_clipping", {"momentum": 0.5}),
        ("bucketing", {"base": "centered_clipping", "bucket_size": 1}),
    ]:
        a = _stepped(name, **options)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        b = get_aggregator(name, n=7, f=1, **options)
        b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        assert same(b.state_dict(), a.state_dict())
        for x in _stream(7, 5, seed=1):
            assert torch.equal(a(x, key="a"), b(x, key="a"))
            a.end_step()
            b.end_step()


# ---- attacks --------------------------------------------------------------------------------
def _delayed(delay: int, steps: int = 6):
    a = get_attack("delayed", n=4, f=1, delay=delay)
    for i in range(steps):
        a(torch.full((1, 3), float(i)), key="k")
    return a


@pytest.mark.parametrize(
    "state, match",
    [
        ({"history": {}, "foo": 1}, "unknown entries 'foo'"),
        ({"foo": 1}, "lacks 'history'"),
        ({}, "lacks 'history'"),
        ({"history": [1]}, "'history' must be a dict"),
        ({"history": {"k": torch.zeros(3)}}, "must be a list of tensors"),
        ({"history": {"k": [torch.zeros(3), torch.zeros(4)]}}, "different shapes"),
    ],
)
def test_the_delayed_attack_refuses_unknown_missing_or_malformed_entries(state, match):
    _refused(_delayed(2), state, match=match)


def test_the_delayed_attack_refuses_a_history_its_delay_would_cut():
    msg = _refused(_delayed(2), _delayed(5).state_dict())
    assert "holds 6 gradients, more than delay=2 keeps (3)" in msg
    longer = _delayed(5, steps=0)
    shorter = _delayed(2).state_dict()
    with pytest.raises(ValueError, match=r"other settings \(delay: saved 2, now 5\)"):
        longer.load_state_dict(shorter)
    longer.load_state_dict(shorter, strict=False)  # a shorter history loses nothing
    assert shorter["history"] and same(longer.state_dict()["history"], shorter["history"])


@pytest.mark.parametrize("name", available_attacks())
def test_every_attack_refuses_a_state_that_is_not_a_dict(name):
    attack = get_attack(name, n=10, f=2)
    with pytest.raises(TypeError, match="load_state_dict takes the dict that state_dict"):
        attack.load_state_dict([("history", {})])
    if name != "delayed":
        with pytest.raises(ValueError, match="keeps no state"):
            attack.load_state_dict({"history": {}})


# ---- compressors ----------------------------------------------------------------------------
def _used(name: str):
    c = get_compressor(name)
    for _ in range(3):
        payload, ctx = c.compress(torch.randn(64, 80), key="k")
        if c.rounds == 2:
            payload, ctx = c.next_round(payload, ctx)
        c.decompress(payload, ctx)
    return c


@pytest.mark.parametrize("name", available_compressors())
@pytest.mark.parametrize("bad", [[1, 2], None, 5])
def test_every_compressor_refuses_a_state_that_is_not_a_dict(name, bad):
    c = _used(name)
    before = copy.deepcopy(c.state_dict())
    with pytest.raises(TypeError, match="load_state_dict takes the dict"):
        c.load_state_dict(bad)
    assert same(c.state_dict(), before)


_STEP_COUNTERS = ("randomk", "qsgd", "terngrad")


@pytest.mark.parametrize("saver", _STEP_COUNTERS)
@pytest.mark.parametrize("loader", _STEP_COUNTERS)
def test_step_counter_states_load_only_into_their_own_compressor(saver, loader):
    # The three keep states of the same form; before the name was saved, a random-k state
    # loaded into QSGD without a word.
    state = _used(saver).state_dict()
    fresh = get_compressor(loader)
    if saver == loader:
        fresh.load_state_dict(state)
        assert same(fresh.state_dict(), state)
        return
    with pytest.raises(
        ValueError, match=f"compressor '{loader}': the state was saved by compressor '{saver}'"
    ):
        fresh.load_state_dict(state)
    assert fresh.state_dict()["steps"] == {}


@pytest.mark.parametrize("name", _STEP_COUNTERS)
def test_step_counter_states_saved_without_a_name_still_load(name):
    # States saved before the name was written are the bare {"steps": ...}.
    c = get_compressor(name)
    c.load_state_dict({"steps": {"k": 7}})
    assert c.state_dict() == {"compressor": name, "steps": {"k": 7}}


@pytest.mark.parametrize(
    "name, state, match",
    [
        ("qsgd", {"steps": 5}, "'steps' must be a dict"),
        ("randomk", {"steps": [1]}, "'steps' must be a dict"),
        ("terngrad", {"steps": {"k": -1}}, "step counter of key 'k' must be an integer >= 0"),
        ("qsgd", {"steps": {"k": "2"}}, "step counter of key 'k' must be an integer >= 0"),
        ("qsgd", {}, "lacks 'steps'"),
        ("powersgd", {"q": {"k": torch.randn(3)}}, "must be a list of 2-D tensors"),
        ("powersgd", {"q": {"k": [torch.ones(3, 1, dtype=torch.int64)]}}, "finite floating"),
        ("powersgd", {"q": {"k": [torch.full((3, 1), math.nan)]}}, "finite floating-point"),
        ("powersgd", {"q": [1]}, "'q' must be a dict"),
        ("powersgd", {"q": {}, "steps": {}}, "unknown entries 'steps'"),
        (
            "threshold",
            {"k": {"threshold": 0.1, "slope": 1.0, "step": 2, "last_estimate": 1, "x": 0}},
            "exactly these entries",
        ),
        (
            "threshold",
            {"k": {"threshold": "0.1", "slope": 1.0, "step": 2, "last_estimate": 1}},
            "threshold must be a finite number",
        ),
        (
            "threshold",
            {"k": {"threshold": math.nan, "slope": 1.0, "step": 2, "last_estimate": 1}},
            "threshold must be a finite number, got nan",
        ),
        (
            "threshold",
            {"k": {"threshold": 0.1, "slope": math.inf, "step": 2, "last_estimate": 1}},
            "slope must be a finite number, got inf",
        ),
        (
            "threshold",
            {"k": {"threshold": -1.0, "slope": 1.0, "step": 2, "last_estimate": 1}},
            "threshold must be >= 0",
        ),
        (
            "threshold",
            {"k": {"threshold": 0.1, "slope": 0.0, "step": 2, "last_estimate": 1}},
            "slope must be > 0",
        ),
        (
            "threshold",
            {"k": {"threshold": 0.1, "slope": 1.0, "step": 2, "last_estimate": 5}},
            "must not exceed step",
        ),
    ],
)
def test_compressors_refuse_wrong_or_missing_entries_and_load_nothing(name, state, match):
    _refused(_used(name), state, match=match)


@pytest.mark.parametrize("name", available_compressors())
def test_compressor_states_still_round_trip_exactly(name):
    a = _used(name)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = get_compressor(name)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert same(b.state_dict(), a.state_dict())


# ---- collectives ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", available_collectives())
@pytest.mark.parametrize("bad", ["x", 0, dist.group])
def test_collectives_refuse_a_group_that_is_not_a_process_group(group, name, bad):
    coll = get_collective(name)
    idx, val = torch.tensor([1, 3], dtype=torch.int32), torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed\.ProcessGroup"):
        coll(idx, val, 10, group=bad)
    coll(idx, val, 10, group=dist.group.WORLD)  # a real group still works
    coll(idx, val, 10)


@pytest.mark.parametrize("name", available_collectives())
def test_collectives_take_a_numpy_integer_numel_as_the_int_it_holds(group, name):
    idx, val = torch.tensor([1, 3], dtype=torch.int32), torch.tensor([1.0, 2.0])
    want = get_collective(name)(idx, val, 10)
    got = get_collective(name)(idx, val, np.int64(10))
    for field in ("dense", "indices", "values"):
        a, b = getattr(want, field), getattr(got, field)
        assert (a is None and b is None) or torch.equal(a, b)
    assert type(got.bytes_sent) is int and type(got.bytes_recv) is int
    for bad in (np.float64(10), True, np.int64(0)):
        with pytest.raises(ValueError, match="numel must be a positive int below 2"):
            get_collective(name)(idx, val, bad)


def test_all_gather_variable_names_what_it_takes(group):
    with pytest.raises(ValueError, match="needs at least one tensor"):
        all_gather_variable([])
    with pytest.raises(TypeError, match="sequence .* of 1-D tensors, got Tensor"):
        all_gather_variable(torch.zeros(3))
    with pytest.raises(TypeError, match=r"got elements of type \['float'\]"):
        all_gather_variable([1.0])
    with pytest.raises(TypeError, match="group must be"):
        all_gather_variable([torch.zeros(2)], group="x")
    out, _, _ = all_gather_variable([torch.arange(3.0)])
    assert torch.equal(out[0][0], torch.arange(3.0))


@pytest.mark.parametrize("name", available_collectives())
def test_collective_states_are_checked(name):
    coll = get_collective(name)
    with pytest.raises(TypeError, match="load_state_dict takes the dict"):
        coll.load_state_dict([("keys", {})])
    if not isinstance(coll, OkTopk):
        coll.load_state_dict({})
        with pytest.raises(ValueError, match="keeps no state"):
            coll.load_state_dict({"keys": {}})
    else:
        with pytest.raises(ValueError, match="single entry 'keys'"):
            coll.load_state_dict({"keys": [1]})
        with pytest.raises(ValueError, match="step must be an integer >= 0"):
            bad = {"step": "x", "numel": 4, "world": 1, "bounds": None, "threshold": None}
            coll.load_state_dict({"keys": {"w": bad}})


# ---- the robust exchange --------------------------------------------------------------------
def test_robust_exchange_refuses_an_attack_built_for_another_world(group):
    rule = get_aggregator("mean", n=1)
    g = torch.ones(4)
    with pytest.raises(ValueError, match=r"attack 'alie' was built for n=10 workers of which f=4"):
        robust_exchange(g, key="b", aggregator=rule, attack=get_attack("alie", n=10, f=4))
    with pytest.raises(ValueError, match=r"get_attack\('sign_flip', n=1, f=0"):
        robust_exchange(g, key="b", aggregator=rule, attack=get_attack("sign_flip", n=3, f=0))
    out, _ = robust_exchange(g, key="b", aggregator=rule, attack=get_attack("zero", n=1, f=0))
    assert torch.equal(out, g)  # built for this world: runs (no rank attacks)


def test_robust_exchanges_check_reads_equal_options_alike():
    """Its cross-rank check compared the options' repr: std=1 on one rank and std=1.0 on
    another (equal rules), or a dict of options in another order, were called different."""
    import numpy as np

    from sparsetrain.sync.robust_exchange import _settings

    def same(a, b) -> bool:
        return _settings(a) == _settings(b)

    assert same(get_attack("gaussian", n=4, f=1, std=1), get_attack("gaussian", n=4, f=1, std=1.0))
    assert same(
        get_attack("gaussian", n=4, f=1, std=np.float32(0.5)),
        get_attack("gaussian", n=4, f=1, std=0.5),
    )
    base = {"base": "centered_clipping", "n": 8, "f": 1}
    assert same(
        get_aggregator("bucketing", **base, base_options={"tau": 1.0, "iterations": 2}),
        get_aggregator("bucketing", **base, base_options={"iterations": 2, "tau": 1}),
    )
    assert not same(get_aggregator("median", n=4, f=1), get_aggregator("median", n=4, f=0))
    assert not same(get_attack("gaussian", n=4, f=1, std=2), get_attack("gaussian", n=4, f=1))


def test_robust_exchange_names_bad_arguments(group):
    rule = get_aggregator("mean", n=1)
    g = torch.ones(4)
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        robust_exchange(g, key="b", aggregator=rule, group="x")
    with pytest.raises(TypeError, match="aggregator must be a rule"):
        robust_exchange(g, key="b", aggregator="median")
    with pytest.raises(TypeError, match="attack must be None or an attack"):
        robust_exchange(g, key="b", aggregator=rule, attack="alie")
    with pytest.raises(TypeError, match="byzantine must be an integer"):
        robust_exchange(g, key="b", aggregator=rule, byzantine="0")
    with pytest.raises(TypeError, match="byzantine_ranks must be integers"):
        robust_exchange(g, key="b", aggregator=rule, byzantine_ranks=[0.0])
    import numpy as np  # numpy's integers are integers: rank 0 of 1 is refused for its range

    with pytest.raises(ValueError, match=r"byzantine ranks \(0,\) must be fewer than world=1"):
        robust_exchange(g, key="b", aggregator=rule, byzantine_ranks=[np.int64(0)])


def _mismatched_attack(rank: int, world: int, attack_n: int, attack_f: int, byzantine: int):
    rule = get_aggregator("mean", n=world)
    attack = get_attack("alie", n=attack_n, f=attack_f)
    try:
        g = torch.full((3,), float(rank))
        robust_exchange(g, key="b", aggregator=rule, attack=attack, byzantine=byzantine)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "attack_n, attack_f, byzantine",
    [(10, 4, 1), (2, 0, 1)],
    ids=["n-and-f-of-another-world", "f-differs-from-the-byzantine-ranks"],
)
def test_every_rank_refuses_a_mismatched_attack_without_hanging(
    tmp_path, attack_n, attack_f, byzantine
):
    msgs = oks(run_world(_mismatched_attack, 2, tmp_path, attack_n, attack_f, byzantine))
    for msg in msgs:
        assert msg is not None and f"built for n={attack_n} workers of which f={attack_f}" in msg
        assert "the group has 2 ranks of which 1 attack" in msg


def test_a_numpy_float32_density_is_taken_as_float64s_always_was():
    # np.float64 passed (a float subclass); np.float32 was refused as "not a number".
    import numpy as np

    import sparsetrain
    from sparsetrain.train import TrainConfig

    assert get_compressor("topk", density=np.float32(0.25)).density == 0.25
    sync = sparsetrain.GradientSync(torch.nn.Linear(4, 2), "topk", density=np.float32(0.25))
    assert type(sync.config.compressor_options["density"]) is float
    config = TrainConfig(compressor="topk", density=np.float32(0.25))
    assert type(config.density) is float and config.density == 0.25


def test_numpy_numbers_are_taken_where_python_numbers_are():
    """n=np.int64(7) was refused as "must be an integer, got np.int64(7)", and
    bucket_cap_mb=np.float32(1.0) as "must be a finite number > 0", while a density of
    np.float32 was taken: counts and sizes read from arrays are NumPy's."""
    import sparsetrain

    rule = get_aggregator("trimmed_mean", n=np.int64(5), f=np.int64(1), trim=np.int64(2))
    assert (type(rule.n), type(rule.f), type(rule.trim)) == (int, int, int)
    attack = get_attack("sign_flip", n=np.int64(5), f=np.int64(1), scale=np.float32(2.0))
    assert type(attack.scale) is float and attack.scale == 2.0
    sync = sparsetrain.GradientSync(torch.nn.Linear(3, 3), "none", bucket_cap_mb=np.float32(1.0))
    assert sync.synchronize()


@pytest.mark.parametrize("name", available_collectives())
def test_collectives_return_values_not_a_graph(name):
    """Values that require grad came back attached to the autograd graph, on some ranks only
    (gTop-k's on rank 0 and not on rank 1), and Ok-Topk warned converting one to a number."""
    import warnings

    values = torch.tensor([1.0, 2.0], requires_grad=True) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conversion's UserWarning
        res = get_collective(name, **({"k": 2} if name == "gtopk" else {}))(
            torch.tensor([0, 3]), values, 5
        )
    out = res.dense if res.dense is not None else res.values
    assert not out.requires_grad


def test_allreduce_sum_refuses_bools_and_returns_values():
    # Summed, bools were a logical or, without a word.
    from sparsetrain.comm import allreduce_sum

    with pytest.raises(TypeError, match="allreduce_sum takes numbers, got bool tensors"):
        allreduce_sum([torch.ones(2, dtype=torch.bool)])
    (out,), _ = allreduce_sum([torch.ones(2, requires_grad=True) * 3])
    assert not out.requires_grad and out.tolist() == [3.0, 3.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"label": 5}, TypeError, "label must be a string or None, got 5"),
        ({"label": "../esc"}, ValueError, "label must be a name without a path separator"),
        ({"label": "a/b"}, ValueError, "label must be a name without a path separator"),
        ({"label": " "}, ValueError, "label must be a name without a path separator"),
        ({"checkpoint_dir": 123}, TypeError, "checkpoint_dir must be a folder path or None"),
        ({"checkpoint_dir": ""}, ValueError, "got an empty one, which wrote none"),
    ],
)
def test_train_config_names_a_bad_label_or_checkpoint_folder(kwargs, error, words):
    # label=5 and checkpoint_dir=123 failed in the workers with a TypeError naming no field;
    # label="../esc" wrote checkpoints outside checkpoint_dir; checkpoint_dir="" wrote none.
    from sparsetrain.train import TrainConfig

    with pytest.raises(error, match=re.escape(words)):
        TrainConfig(**kwargs)


def test_train_config_takes_a_path_object_as_its_checkpoint_folder(tmp_path):
    from sparsetrain.train import TrainConfig

    assert TrainConfig(checkpoint_dir=tmp_path / "ck").checkpoint_dir == str(tmp_path / "ck")
