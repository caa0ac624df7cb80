"""The trainer's optimizer: fused SGD where torch has it, taking the default one's steps."""

from __future__ import annotations

import torch

from sparsetrain.train import sgd


def _run(make, steps=4):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = make(net.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 8, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return opt, [p.detach().clone() for p in net.parameters()]


def test_fused_sgd_takes_the_steps_of_the_default_one():
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}
    fused, got = _run(lambda ps: sgd(ps, **options))
    assert fused.defaults["fused"] is True  # torch 2.13 has a fused SGD on CPU
    _, want = _run(lambda ps: torch.optim.SGD(ps, foreach=False, **options))
    # The same update; a fused multiply-add rounds differently in the last bit now and then.
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_a_fused_kernel_the_default_sgd_is_used(monkeypatch):
    real = torch.optim.SGD

    def no_fused(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", no_fused)
    opt = sgd((p for p in torch.nn.Linear(2, 2).parameters()), lr=0.5)  # a generator is fine
    assert not opt.defaults.get("fused")
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
