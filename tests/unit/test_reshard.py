"""reshard_state: carrying gradient-sync states to another number of ranks keeps what error
feedback holds back, and refuses states it cannot carry, naming why."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain import reshard_sources, reshard_state
from sparsetrain.sync.reshard import _weights


def _states(world: int, momentum: float = 0.0, seed: int = 0) -> list[dict]:
    """States as ``world`` ranks of one run would save them: alike but for the residuals,
    velocities and counters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    sync = sparsetrain.GradientSync(net, "topk", density=0.25, momentum_correction=momentum)
    nn.functional.cross_entropy(net(torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    sync.synchronize()
    base = sync.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        s = copy.deepcopy(base)
        s["rank"], s["world"] = r, world
        for entry in ("residuals", "velocity"):
            for n, t in s["feedback"].get(entry, {}).items():
                s["feedback"][entry][n] = torch.randn(t.shape, generator=g)
        s["counters"]["bytes_sent"] = 1000 * (r + 1)
        s["counters"]["comm_seconds"] = 0.5 * (r + 1)
        out.append(s)
    return out


def _pending(states: list[dict], entry: str = "residuals") -> dict[str, torch.Tensor]:
    """What the model has yet to receive: the ranks' mean residual (velocity)."""
    names = states[0]["feedback"][entry]
    return {n: sum(s["feedback"][entry][n].double() for s in states) / len(states) for n in names}


@pytest.mark.parametrize("old", range(1, 10))
@pytest.mark.parametrize("new", range(1, 10))
def test_each_new_rank_takes_a_mean_and_each_old_rank_is_spread_in_full(old, new):
    rows = [_weights(old, r, new) for r in range(new)]
    for row in rows:
        assert sum(w for _, w in row) == 1  # a (weighted) mean of old ranks
        assert len(row) <= math.ceil(old / new) + 1
    for r in range(old):  # W'/W of every old rank: the pending update is kept
        assert sum(w for row in rows for q, w in row if q == r) == pytest.approx(new / old)
    if old == new:
        assert rows == [[(r, 1)] for r in range(old)]


@pytest.mark.parametrize(("old", "new"), [(4, 2), (4, 3), (2, 4), (3, 5), (4, 1), (1, 3)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_ranks_mean_residual_and_velocity_are_kept(old, new, momentum):
    states = _states(old, momentum)
    before = [copy.deepcopy(s) for s in states]
    if momentum:  # kept as the ranks' mean, but not what the saved run would have applied
        with pytest.warns(UserWarning, match="spread differently over the weights"):
            resharded = [reshard_state(states, r, new) for r in range(new)]
    else:
        resharded = [reshard_state(states, r, new) for r in range(new)]
    entries = ("residuals", "velocity") if momentum else ("residuals",)
    for entry in entries:
        want, got = _pending(states, entry), _pending(resharded, entry)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
            assert all(s["feedback"][entry][n].dtype == torch.float32 for s in resharded)
    for r, s in enumerate(resharded):
        assert (s["rank"], s["world"], s["step"]) == (r, new, states[0]["step"])
    # the counters read as an average rank's
    assert sum(s["counters"]["bytes_sent"] for s in resharded) / new == pytest.approx(
        sum(1000 * (r + 1) for r in range(old)) / old, abs=1
    )
    assert all(isinstance(s["counters"]["bytes_sent"], int) for s in resharded)
    for a, b in zip(states, before):  # the inputs are not changed
        assert all(
            torch.equal(a["feedback"]["residuals"][n], t)
            for n, t in b["feedback"]["residuals"].items()
        )


def test_as_many_ranks_keep_their_own_state_exactly():
    states = _states(3)
    for r in range(3):
        out = reshard_state(states, r, 3)
        for n, t in states[r]["feedback"]["residuals"].items():
            assert torch.equal(out["feedback"]["residuals"][n], t)
        assert out["counters"] == states[r]["counters"]


def test_a_rank_needs_only_the_files_reshard_sources_names():
    states = _states(4)
    assert reshard_sources(4, 1, 2) == [2, 3]
    assert reshard_sources(4, 1, 3) == [1, 2]
    out = reshard_state({2: states[2], 3: states[3]}, 1, 2)
    full = reshard_state(states, 1, 2)
    for n, t in full["feedback"]["residuals"].items():
        assert torch.equal(out["feedback"]["residuals"][n], t)
    with pytest.raises(ValueError, match=r"rank 0 of 2 needs the states of old rank\(s\) \[0, 1\]"):
        reshard_state({2: states[2], 3: states[3]}, 0, 2)


def test_the_resharded_state_loads_strictly_on_its_rank():
    """The result records the new rank and world, so a GradientSync in a world of one (rank 0
    of 1) takes it with strict=True and steps without the check at the first step refusing."""
    states = _states(3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    sync = sparsetrain.GradientSync(net, "topk", density=0.25)
    sync.load_state_dict(reshard_state(states, 0, 1))
    nn.functional.cross_entropy(net(torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    sync.synchronize()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    sync = sparsetrain.GradientSync(net, "topk", density=0.25)
    sync.load_state_dict(states[0])  # the old state itself is refused at the step
    nn.functional.cross_entropy(net(torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    with pytest.raises(RuntimeError, match="reshard_state"):
        sync.synchronize()


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda s: s[1].update(step=s[1]["step"] + 1), r"old ranks 0 and 1 differ in 'step'"),
        (lambda s: s[2].update(loss_scale=2.0), r"old ranks 0 and 2 differ in 'loss_scale'"),
        (lambda s: s[1]["config"].update(density=0.5), r"differ in 'config'"),
        (lambda s: s[1].update(world=5), r"runs of different numbers of ranks \(\[3, 5\]\)"),
        (lambda s: s.insert(0, s.pop()), r"state given for old rank 0 was saved by rank 2"),
        (
            lambda s: [(x.pop("rank"), x.pop("world")) for x in s],
            r"does not record the rank and number of ranks",
        ),
        (lambda s: s[1].update(rank=None), r"old rank 1: the state's 'rank' and 'world' must be"),
        (lambda s: s[0].pop("feedback"), r"lacks feedback"),
    ],
)
def test_states_that_cannot_be_combined_are_refused_by_name(spoil, match):
    states = _states(3)
    spoil(states)
    with pytest.raises((ValueError, TypeError), match=match):
        reshard_state(states, 0, 2)


def test_bad_ranks_and_arguments_are_refused():
    states = _states(2)
    with pytest.raises(ValueError, match=r"rank must be an integer with 0 <= rank < 2, got 2"):
        reshard_state(states, 2, 2)
    with pytest.raises(ValueError, match=r"world must be an integer >= 1, got 0"):
        reshard_state(states, 0, 0)
    with pytest.raises(
        TypeError, match=r"a list of the old ranks' states in rank order.*got dict \(one state\?"
    ):
        reshard_state(states[0], 0, 1)
    with pytest.raises(TypeError, match=r"with keys \['0', '1'\]; the keys must be int ranks"):
        reshard_state({"0": states[0], "1": states[1]}, 0, 1)
    # ranks as 0-d tensors or numpy integers are taken as ints
    out = reshard_state(states, torch.tensor(1), torch.tensor(3))
    assert (out["rank"], out["world"]) == (1, 3) and type(out["rank"]) is int
    with pytest.raises(ValueError, match="no states given"):
        reshard_state([], 0, 1)
    with pytest.raises(TypeError, match="reset_robust must be True or False"):
        reshard_state(states, 0, 1, reset_robust="yes")


def test_a_robust_rules_state_is_refused_or_dropped():
    """A SafeguardSGD state is about the workers that saved it: carried to another number it
    would be refused at load (or compare the wrong workers)."""
    states = _states(2)
    for s in states:
        s["aggregator"] = {"step": 3, "good": torch.ones(2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"robust aggregator state, which is about the 2 workers"):
        reshard_state(states, 0, 3)
    out = reshard_state(states, 0, 3, reset_robust=True)
    assert "aggregator" not in out
    for s in states:  # a rule without state ("mean") is carried as it is
        s["aggregator"] = {}
    assert reshard_state(states, 0, 3)["aggregator"] == {}
    for s in states:  # and so is one of numbers only (bucketing's step), or empty histories
        s["aggregator"] = {"step": 3, "base": {}}
        s["attack"] = {"history": {}}
    out = reshard_state(states, 0, 3)
    assert out["aggregator"] == {"step": 3, "base": {}} and out["attack"] == {"history": {}}
    states[1]["attack"] = {"history": {"0": [torch.zeros(3)]}}  # a delayed attack's gradients
    with pytest.raises(ValueError, match=r"robust attack state, which is about the 2 workers"):
        reshard_state(states, 0, 3)
