"""Attacks against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.robust import available_attacks, get_attack


def test_registry():
    assert set(available_attacks()) == {
        "sign_flip",
        "label_flip",
        "gaussian",
        "zero",
        "delayed",
        "alie",
        "ipm",
        "safeguard",
    }


def test_sign_flip_scale_and_zero():
    g = torch.tensor([[1.0, -2.0]])
    assert torch.equal(
        get_attack("sign_flip", n=4, f=1, scale=10.0)(g), torch.tensor([[-10.0, 20.0]])
    )
    assert torch.equal(get_attack("zero", n=4, f=1)(g), torch.zeros(1, 2))


def test_label_flip_maps_labels_and_keeps_the_gradient():
    a = get_attack("label_flip", n=4, f=1)
    assert a.flips_labels
    assert torch.equal(a.flip_labels(torch.tensor([0, 1, 9]), 10), torch.tensor([9, 8, 0]))
    g = torch.randn(2, 3)
    assert torch.equal(a(g), g)


def test_alie_z_from_n_and_f_and_vector():
    a = get_attack("alie", n=10, f=4)
    s = math.floor(10 / 2 + 1) - 4
    expected_z = float(torch.special.ndtri(torch.tensor((10 - s) / 10, dtype=torch.float64)))
    assert a.z_value == pytest.approx(expected_z) and a.z_value == pytest.approx(0.8416, abs=1e-4)
    honest = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 6.0]])
    out = a(torch.zeros(2, 2), honest=honest)
    expected = honest.mean(0) - a.z_value * honest.std(0)
    assert torch.allclose(out, expected.expand(2, 2))
    with pytest.raises(ValueError, match="omniscient"):
        a(torch.zeros(1, 2))


def test_ipm_and_safeguard_attack_send_the_negated_scaled_honest_mean():
    honest = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    ipm = get_attack("ipm", n=3, f=1, epsilon=0.5)(torch.zeros(1, 2), honest=honest)
    assert torch.allclose(ipm, torch.tensor([[-0.5, -0.5]]))
    sg = get_attack("safeguard", n=3, f=1)(torch.zeros(1, 2), honest=honest)
    assert torch.allclose(sg, torch.tensor([[-0.4, -0.4]]))


def test_delayed_sends_the_gradient_of_delay_steps_ago():
    a = get_attack("delayed", n=4, f=1, delay=2)
    sent = [a(torch.full((1, 3), float(t)), key="k", step=t)[0, 0].item() for t in range(6)]
    assert sent == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    b = get_attack("delayed", n=4, f=1, delay=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(torch.full((1, 3), 6.0), key="k"), a(torch.full((1, 3), 6.0), key="k"))


def test_gaussian_is_reproducible_per_worker_and_step():
    a = get_attack("gaussian", n=4, f=2, std=3.0)
    x = a(torch.zeros(2, 1000), step=5, workers=[2, 3])
    y = a(torch.zeros(2, 1000), step=5, workers=[2, 3])
    assert torch.equal(x, y)
    assert not torch.equal(x[0], x[1])
    assert x.std().item() == pytest.approx(3.0, rel=0.1)
    # a real rank computing only its own row gets the same row
    assert torch.equal(a(torch.zeros(1000), step=5, workers=[3]), x[1])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown attack 'x'.*alie"):
        get_attack("x", n=4, f=1)
    with pytest.raises(ValueError, match="does not take option"):
        get_attack("zero", n=4, f=1, scale=2.0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        get_attack("sign_flip", n=4, f=1, scale=0.0)
    with pytest.raises(ValueError, match="f must be smaller than n"):
        get_attack("zero", n=4, f=4)
    with pytest.raises(ValueError, match="pass z explicitly"):
        get_attack("alie", n=4, f=3)
    get_attack("alie", n=4, f=2)  # f <= floor(n/2)
    with pytest.raises(ValueError, match="mean must be a finite number, got nan"):
        get_attack("gaussian", n=4, f=1, mean=math.nan)  # std=nan was refused, mean=nan not


def test_a_delayed_history_loaded_on_cpu_follows_the_gradients_device():
    # "meta" stands in for a GPU: the attacker's forged gradient must be on its gradients'
    # device, or the exchange fails on the attacker alone and the honest ranks wait.
    g = torch.randn(3, 4)
    a = get_attack("delayed", n=3, f=1, delay=2)
    for step in range(3):
        a.forge(g[0], g[1:], "w", step, 3)
    b = get_attack("delayed", n=3, f=1, delay=2)
    b.load_state_dict(a.state_dict())
    assert b.forge(g[0].to("meta"), g[1:].to("meta"), "w", 3, 3).device.type == "meta"


def test_a_delayed_attack_refuses_another_shape_and_keeps_its_history():
    # The new gradient was kept before its shape was checked: the history then held two
    # shapes, its state was refused on loading, and the attack raised again `delay` calls on.
    a = get_attack("delayed", n=4, f=1, delay=2)
    a(torch.zeros(1, 3), key="k")
    with pytest.raises(ValueError, match=r"changed shape from \(1, 3\) to \(1, 5\)"):
        a(torch.zeros(1, 5), key="k")
    b = get_attack("delayed", n=4, f=1, delay=2)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert a(torch.ones(1, 3), key="k").shape == (1, 3)


@pytest.mark.parametrize("name", ["alie", "ipm", "safeguard"])
def test_omniscient_attacks_forge_from_the_finite_honest_rows(name):
    """One honest row with NaN made every forged row NaN, so a rule saw f + 1 bad rows and the
    step was lost where it would have been tolerated."""
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(6, 3, generator=gen)
    bad = honest.clone()
    bad[0, 1] = math.nan
    attack = get_attack(name, n=10, f=4)
    forged = attack(torch.zeros(4, 3), honest=bad, key="k")
    assert torch.isfinite(forged).all()
    torch.testing.assert_close(forged, attack(torch.zeros(4, 3), honest=honest[1:], key="k"))
    everywhere = torch.full((6, 3), math.nan)  # no finite row: as before, from all of them
    assert torch.isnan(attack(torch.zeros(4, 3), honest=everywhere, key="k")).all()
