"""Error feedback: nothing is lost, only delayed; state round-trips exactly."""

from __future__ import annotations

import torch

from sparsetrain import ErrorFeedback, get_compressor


def test_sent_plus_new_residual_equals_gradient_plus_old_residual():
    torch.manual_seed(0)
    ef = ErrorFeedback()
    comp = get_compressor("topk", density=0.1)
    names, numels = ["a", "b"], [30, 70]
    for _ in range(20):
        grad = torch.randn(100)
        old = torch.cat([ef.residuals.get(n, torch.zeros(k)) for n, k in zip(names, numels)])
        compensated = ef.compensate(names, numels, grad)
        payload, ctx = comp.compress(compensated)
        sent = comp.decompress(payload, ctx)
        ef.update(names, numels, compensated, sent)
        new = torch.cat([ef.residuals[n] for n in names])
        torch.testing.assert_close(sent + new, grad + old, rtol=0, atol=1e-6)
        assert int((sent != 0).sum()) == 10


def test_residuals_are_kept_by_name_whatever_the_packing():
    ef = ErrorFeedback()
    ef.update(["a", "b"], [2, 3], torch.arange(5.0), torch.zeros(5))
    # the same parameters packed in the other order (a DDP bucket rebuild)
    out = ef.compensate(["b", "a"], [3, 2], torch.zeros(5))
    assert out.tolist() == [2.0, 3.0, 4.0, 0.0, 1.0]


def test_disabled_feedback_keeps_nothing():
    ef = ErrorFeedback(enabled=False)
    g = torch.ones(4)
    assert ef.compensate(["w"], [4], g) is g
    ef.update(["w"], [4], g, torch.zeros(4))
    assert ef.residuals == {}


def test_state_dict_round_trip_is_exact():
    ef = ErrorFeedback()
    ef.update(
        ["w", "b"], [3, 2], torch.randn(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    )
    other = ErrorFeedback()
    other.load_state_dict(ef.state_dict())
    assert other.residuals.keys() == ef.residuals.keys()
    for n in ef.residuals:
        assert torch.equal(other.residuals[n], ef.residuals[n])
