"""The functional core: which weights masks keep, schedules, and refusals of bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.pruning import Gradual, OneShot, get_pruner, get_schedule, masks
from sparsetrain.pruning.masks import num_pruned


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(16, 8, generator=g),
        "b": torch.randn(8, 12, generator=g) * 3.0,
        "c": torch.randn(4, 2, 3, 3, generator=g) * 0.1,
    }


@pytest.mark.filterwarnings("ignore:global magnitude pruning")  # tensor "c" goes whole
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.99))
def test_global_magnitude_removes_exactly_the_smallest_over_all_layers(
    seed: int, sparsity: float
) -> None:
    w = _weights(seed)
    m = masks(w, sparsity, "magnitude", "global")
    flat_w = torch.cat([t.abs().reshape(-1) for t in w.values()])
    flat_m = torch.cat([m[n].reshape(-1) for n in w])
    k = num_pruned(flat_w.numel(), sparsity)
    assert int((~flat_m).sum()) == k
    if 0 < k < flat_w.numel():
        # Every pruned |w| is at most every kept |w|.
        assert flat_w[~flat_m].max() <= flat_w[flat_m].min()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_layer_scope_prunes_each_layer_to_its_target(sparsity: float) -> None:
    w = _weights(1)
    m = masks(w, sparsity, "magnitude", "layer")
    for n, t in w.items():
        pruned = ~m[n]
        assert int(pruned.sum()) == math.floor(sparsity * t.numel() + 1e-9)
        assert m[n].any(), "layer scope keeps at least one weight per layer"
        if pruned.any():
            assert t.abs()[pruned].max() <= t.abs()[m[n]].min()


def test_previous_masks_stay_pruned_even_when_the_weight_grew() -> None:
    w = {"a": torch.tensor([5.0, 0.1, 0.2, 3.0, 4.0, 0.3])}
    prev = {"a": torch.tensor([False, True, True, True, True, True])}
    m = masks(w, 0.5, previous=prev)["a"]
    assert not m[0]  # the largest weight, but pruned before
    assert m.tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_keeps_exactly_n_in_every_group_of_m(n: int, m: int) -> None:
    g = torch.Generator().manual_seed(n * 10 + m)
    w = {"lin": torch.randn(12, 16, generator=g), "conv": torch.randn(4, 8, 3, 3, generator=g)}
    out = masks(w, 1 - n / m, "nm", n=n, m=m)

    def groups_of(t: torch.Tensor) -> torch.Tensor:  # runs of m input channels (dimension 1)
        return t.permute(0, *range(2, t.dim()), 1).reshape(-1, m)

    for name, t in w.items():
        groups = groups_of(out[name])
        assert (groups.sum(dim=1) == n).all()
        # The kept ones are the largest |w| of their group.
        a = groups_of(t.abs())
        assert (
            a.masked_fill(~groups, float("inf")).min(1).values
            >= a.masked_fill(groups, -1).max(1).values
        ).all()


def test_nm_groups_a_convolution_along_its_input_channels() -> None:
    # One filter of 4 input channels and a 1x4 kernel, channels 0 and 1 large: 2:4 along the
    # input channels keeps those two at every kernel position (sparse tensor cores reduce over
    # them). Grouping the kernel's width instead kept two taps of every channel, and refused
    # 1x1 and 3x3 kernels outright.
    w = torch.ones(1, 4, 1, 4)
    w[:, :2] = 10.0
    keep = masks({"conv": w}, 0.5, "nm", n=2, m=4)["conv"]
    assert keep.shape == w.shape
    assert keep.sum(dim=(0, 2, 3)).tolist() == [4, 4, 0, 0]
    for kernel in (1, 3):
        conv = torch.nn.Conv2d(8, 4, kernel).weight
        kept = masks({"c": conv}, 0.5, "nm", n=2, m=4)["c"]
        assert (kept.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2).all()
    with pytest.raises(ValueError, match=r"input channels of 'c' .* 6 is not divisible by 4"):
        masks({"c": torch.randn(4, 6, 3, 3)}, 0.5, "nm", n=2, m=4)


def test_nm_derives_n_from_sparsity_and_ties_keep_exactly_n() -> None:
    w = {"z": torch.zeros(4, 8)}  # all ties
    out = masks(w, 0.5, "nm", m=4)["z"]
    assert (out.reshape(-1, 4).sum(1) == 2).all()


def test_structured_prunes_whole_rows_with_smallest_norm() -> None:
    w = {"a": torch.arange(1.0, 9.0).unsqueeze(1).repeat(1, 5)}  # row r has norm ~ r+1
    out = masks(w, 0.5, "structured", "layer")["a"]
    assert out.all(dim=1).tolist() == [False] * 4 + [True] * 4
    assert (out.all(dim=1) | ~out.any(dim=1)).all()  # rows are all-or-nothing


def test_structured_global_prunes_channels_in_order_up_to_the_target() -> None:
    out = masks(_weights(2), 0.6, "structured", "global")
    total = sum(t.numel() for t in out.values())
    pruned = sum(int((~t).sum()) for t in out.values())
    assert 0.4 < pruned / total <= 0.6


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        masks(_weights(), bad)


def test_bad_input_messages_name_the_problem() -> None:
    w = {"a": torch.randn(4, 6)}
    with pytest.raises(ValueError, match="n <= m"):
        masks(w, 0.0, "nm", n=5, m=4)
    with pytest.raises(ValueError, match="not divisible by 4"):
        masks(w, 0.5, "nm", n=2, m=4)
    with pytest.raises(ValueError, match="prunes 0.25 of the weights, less than"):
        masks({"a": torch.randn(4, 8)}, 0.5, "nm", n=3, m=4)
    with pytest.raises(
        ValueError, match="unknown pruning method 'nope'; valid names are: magnitude"
    ):
        masks(w, 0.5, "nope")
    with pytest.raises(ValueError, match="scope must be one of"):
        masks(w, 0.5, scope="model")
    with pytest.raises(TypeError, match="only floating-point"):
        masks({"i": torch.ones(3, dtype=torch.long)}, 0.5)
    with pytest.raises(ValueError, match="previous mask 'x' names no weight"):
        masks(w, 0.5, previous={"x": torch.ones(4, 6, dtype=torch.bool)})


def test_gradual_schedule_is_cubic_monotone_and_ends_at_final() -> None:
    g = Gradual(start=10, end=110, frequency=10, initial_sparsity=0.1)
    assert g.target(5, 0.9) is None and g.target(15, 0.9) is None
    assert g.target(10, 0.9) == pytest.approx(0.1)
    assert g.target(60, 0.9) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert g.target(110, 0.9) == pytest.approx(0.9) and g.target(500, 0.9) == pytest.approx(0.9)
    values = [g.target(t, 0.9) for t in range(10, 111, 10)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert OneShot(at=3).target(2, 0.5) is None and OneShot(at=3).target(3, 0.5) == 0.5


def test_schedule_options_are_validated() -> None:
    with pytest.raises(ValueError, match="end must be after start"):
        Gradual(start=10, end=10)
    with pytest.raises(ValueError, match="frequency must be an integer >= 1"):
        Gradual(frequency=0)
    with pytest.raises(ValueError, match="does not take"):
        get_schedule("gradual", every=3)
    with pytest.raises(ValueError, match="valid names are: gradual, oneshot"):
        get_schedule("cosine")


def test_a_schedule_starting_above_the_final_sparsity_is_refused() -> None:
    # Pruned weights never come back: the run would end at 0.9, not at the 0.5 asked for.
    with pytest.raises(ValueError, match=r"initial_sparsity=0.9, above the final sparsity=0.5"):
        get_pruner("magnitude", sparsity=0.5, schedule=Gradual(initial_sparsity=0.9))
    get_pruner("magnitude", sparsity=0.5, schedule=Gradual(initial_sparsity=0.5))


@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_global_pruning_warns_when_it_removes_a_layer_whole(method: str) -> None:
    # A layer whose weights are all small loses every one to a global ranking (layer collapse):
    # it passes nothing on, which the total sparsity does not show. It is the ranking's answer,
    # so it is kept, and named in a warning.
    w = {
        "big": torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) + 10,
        "small": torch.full((2, 4), 0.01),
    }
    with pytest.warns(UserWarning, match=r"removed every weight of 'small': that layer") as rec:
        m = masks(w, 0.2, method, "global")
    assert not m["small"].any() and m["big"].all()
    assert rec[0].filename == __file__  # points at the call, not inside sparsetrain
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks(w, 0.2, method, "layer")  # each layer keeps its share
        masks(w, 0.2, method, "global", previous=m)  # removed before: said already


def test_mask_sparsity_takes_boolean_masks_and_is_zero_for_none():
    from torch import nn

    from sparsetrain.pruning import mask_sparsity, sparsity_stats

    assert mask_sparsity({"a": torch.tensor([True, False, False, True])}) == 0.5
    # It said 1.0 (all pruned) for no masks, and -0.67 for a 0/1/2/3 weight given as a mask.
    assert mask_sparsity({}) == 0.0
    with pytest.raises(TypeError, match=r"masks must be boolean tensors .* \['a'\] are not"):
        mask_sparsity({"a": torch.tensor([0, 2, 3])})
    assert sparsity_stats(nn.ReLU())["global_sparsity"] == 0.0  # no weights: none pruned


def test_unpack_bits_refuses_more_bits_than_the_bytes_hold():
    from sparsetrain.pruning.export import pack_bits, unpack_bits

    mask = torch.tensor([True, False, True, True, False])
    assert torch.equal(unpack_bits(pack_bits(mask), 5), mask)
    for numel in (100, -1, 2.5):  # it returned 8 (or 7) entries, not the numel asked for
        with pytest.raises(ValueError, match=r"numel must be an integer in \[0, 8\] for 1 packed"):
            unpack_bits(pack_bits(mask), numel)


def test_gradual_nm_passes_through_each_n_the_schedule_reaches():
    """The cubic schedule's first level from 0 to 0.5 over four steps is 0.29; rounded down
    to 2:4 at once, the gradual N:M run was a one-shot one, where the docs promise
    4:4 -> 3:4 -> 2:4."""
    from sparsetrain.pruning import Gradual, get_pruner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    pruner = get_pruner("nm", schedule=Gradual(start=0, end=4, frequency=1)).prepare(model)
    kept = []
    for step in range(6):
        pruner.step(step)
        kept.append(int(pruner.masks["0.weight"].reshape(-1, 4).sum(1).max()))
    assert kept == [4, 3, 2, 2, 2, 2]


# ---- from a review of the pruning helpers (each failed before its fix) ------------------------
def test_count_flops_leaves_batchnorm_statistics_and_the_mode_as_they_were():
    """Its forward pass ran in train mode and moved BatchNorm's running statistics."""
    from torch import nn

    from sparsetrain.pruning import count_flops

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    m[3].eval()  # a part kept in eval mode stays so
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flops = count_flops(m, torch.randn(2, 3, 8, 8))
    assert flops["dense"] == 2 * 108 * 36 + 4 * 36 + 2 * 288 + 2
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert m.training and m[1].training and not m[3].training


def test_count_flops_refuses_an_unbatched_example_and_names_what_it_leaves_out():
    """An unbatched example counted 0 for a linear layer; attention's projections were left
    out without a word."""
    from torch import nn

    from sparsetrain.pruning import count_flops

    with pytest.raises(ValueError, match=r"batched example .* Linear got input of shape \(4,\)"):
        count_flops(nn.Linear(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"Conv2d got input of shape \(3, 10, 10\)"):
        count_flops(nn.Conv2d(3, 8, 3), torch.zeros(3, 10, 10))

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.a(x, x, x)[0])

    with pytest.warns(UserWarning, match="MultiheadAttention are not counted") as said:
        assert count_flops(Attention(), torch.zeros(1, 5, 8))["dense"] == 5 * (2 * 16 + 2)
    assert said[0].filename == __file__  # the user's call, not torch's no_grad wrapper


def test_previous_masks_keep_their_weights_pruned_at_a_lower_sparsity():
    """A sparsity below what the previous masks pruned ranked some of their weights back in."""
    w = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    prev = {"a": torch.tensor([False, False, True, True])}
    for method, extra in (("magnitude", {}), ("structured", {}), ("nm", {})):
        weights = {"a": w["a"].view(1, 4)} if method != "magnitude" else w
        previous = {"a": prev["a"].view_as(weights["a"])}
        out = masks(weights, 0.25, method, previous=previous, **extra)["a"].reshape(-1)
        assert not out[:2].any(), (method, out)


def test_global_magnitude_ranks_float64_weights_in_float64():
    """Ranked in float32, weights 1e-12 apart tied, and the larger one was pruned."""
    w = {"a": torch.tensor([1.0 + 1e-12, 1.0], dtype=torch.float64)}
    assert masks(w, 0.5)["a"].tolist() == [True, False]
    assert masks(w, 0.5, scope="layer")["a"].tolist() == [True, False]


def test_the_metrics_and_export_refuse_odd_input_by_name():
    """A zero-size weight divided by zero, a string of names was read a letter at a time, and
    a meta model failed inside torch's .item()."""
    from torch import nn

    from sparsetrain.pruning import count_flops, export_compact, sparsity_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: initialising a zero-element tensor
        empty = nn.Linear(0, 3)
    assert sparsity_stats(empty)["layers"]["weight"]["sparsity"] == 0.0
    with pytest.raises(TypeError, match="names must be a list of parameter names, got the str"):
        sparsity_stats(nn.Linear(2, 2), "weight")
    meta = nn.Linear(4, 2, device="meta")
    for call in (
        lambda: sparsity_stats(meta),
        lambda: count_flops(meta, torch.zeros(1, 4, device="meta")),
        lambda: export_compact(meta),
    ):
        with pytest.raises(ValueError, match=r"\['weight', 'bias'\] are on the meta device"):
            call()


def test_count_flops_checks_the_batch_at_the_first_layer_only():
    """A linear layer applied to a vector of the model's own (a parameter) was refused as an
    unbatched example."""
    from torch import nn

    from sparsetrain.pruning import count_flops

    class Film(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.film, self.z = (
                nn.Linear(4, 2),
                nn.Linear(8, 2),
                nn.Parameter(torch.ones(8)),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.film(self.z)

    # fc on each of the 2 examples; film once a pass, half of it an example
    assert count_flops(Film(), torch.randn(2, 4))["dense"] == 2 * 8 + 2 + (2 * 16 + 2) // 2


def test_a_pruning_method_that_returns_no_bool_masks_is_refused_by_name():
    """A method of the user's returning float masks worked alone and failed in a bitwise and
    with previous masks."""
    from sparsetrain.pruning.masks import _METHODS, register_method

    @register_method("test-float-masks")
    def float_masks(weights, sparsity, scope, previous):
        return {n: (w.abs() > w.abs().median()).float() for n, w in weights.items()}

    try:
        w = {"a": torch.randn(4, 4)}
        for previous in (None, {"a": torch.ones(4, 4, dtype=torch.bool)}):
            with pytest.raises(TypeError, match="'test-float-masks' must return a bool mask"):
                masks(w, 0.5, "test-float-masks", previous=previous)
    finally:
        _METHODS.pop("test-float-masks")
