"""A run resumed on another number of ranks, from states carried over by reshard_state, applies
what the saved run had yet to apply: nothing error feedback held back is lost or counted twice."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetrain

from .harness import oks, run_world

LR = 0.1
FLUSH_STEPS = 12  # top-k at density 0.1 of a zero gradient sends all of a residual in 10 steps


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))


def _build(mode: str) -> tuple[nn.Module, nn.Module, object]:
    """(the module to call, the plain module, its sync state)."""
    net = _net()
    if mode == "ddp":
        model = DDP(net)
        return model, net, sparsetrain.register_ddp_hook(model, "topk", density=0.1)
    return net, net, sparsetrain.GradientSync(net, "topk", density=0.1)


def _step(model: nn.Module, sync, x: torch.Tensor, y: torch.Tensor, zero: bool) -> None:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    (loss * 0 if zero else loss).backward()
    if isinstance(sync, sparsetrain.GradientSync):
        sync.synchronize()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(LR * p.grad)


def _flush(mode: str, weights: dict, state: dict, strict: bool = True) -> dict:
    """Resume from ``weights`` and ``state``; step on zero gradients until error feedback has
    sent everything it held. Returns the weights, and what is left in the residuals."""
    model, net, sync = _build(mode)
    net.load_state_dict(weights)
    sync.load_state_dict(state, strict=strict)
    x, y = torch.zeros(4, 12), torch.zeros(4, dtype=torch.long)
    for _ in range(FLUSH_STEPS):
        _step(model, sync, x, y, zero=True)
    engine = sync.engine
    left = max(float(r.abs().max()) for r in engine.feedback.residuals.values())
    return {"weights": {k: v.clone() for k, v in net.state_dict().items()}, "left": left}


def _train_save_flush(rank: int, world: int, path: str) -> dict:
    """Train a few steps on this rank's own data, save, then resume on as many ranks."""
    out = {}
    for mode in ("sync", "ddp"):
        model, net, sync = _build(mode)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(3):
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
            _step(model, sync, x, y, zero=False)
        torch.save(sync.state_dict(), os.path.join(path, f"{mode}{rank}.pt"))
        if rank == 0:
            torch.save(net.state_dict(), os.path.join(path, f"{mode}_weights.pt"))
        dist.barrier()
        weights = torch.load(os.path.join(path, f"{mode}_weights.pt"))
        state = torch.load(os.path.join(path, f"{mode}{rank}.pt"), weights_only=False)
        out[mode] = _flush(mode, weights, state)
    return out


def _load_resharded(mode: str, path: str, old: int, rank: int, world: int) -> dict:
    """What the README says each rank of the new run does: load only the files it needs."""
    need = sparsetrain.reshard_sources(old, rank, world)
    states = {r: torch.load(os.path.join(path, f"{mode}{r}.pt"), weights_only=False) for r in need}
    return sparsetrain.reshard_state(states, rank, world)


def _resume_resharded(rank: int, world: int, path: str, old: int) -> dict:
    out = {}
    for mode in ("sync", "ddp"):
        weights = torch.load(os.path.join(path, f"{mode}_weights.pt"))
        out[mode] = _flush(mode, weights, _load_resharded(mode, path, old, rank, world))
        if world == 2:  # what a resume did before: each rank its own old file, not strict
            own = torch.load(os.path.join(path, f"{mode}{rank}.pt"), weights_only=False)
            out[mode + "_own"] = _flush(mode, weights, own, strict=False)
    return out


def _expected(path: str, mode: str, old: int) -> dict:
    """The weights once the saved run has applied all it held back: with SGD, the saved
    weights minus the learning rate times the ranks' mean residual."""
    weights = torch.load(os.path.join(path, f"{mode}_weights.pt"))
    states = [
        torch.load(os.path.join(path, f"{mode}{r}.pt"), weights_only=False) for r in range(old)
    ]
    out = {}
    for name, w in weights.items():
        pending = sum(s["feedback"]["residuals"][name].double() for s in states) / old
        out[name] = w.double() - LR * pending.reshape(w.shape)
    return out


def _close(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_a_run_resumed_on_other_numbers_of_ranks_applies_what_the_saved_run_held_back(tmp_path):
    """Four ranks train and save; the run resumes on 2 and on 3 ranks from states carried over
    by reshard_state (and on 4 from its own, and alone), then steps on zero gradients until
    error feedback has sent all it held. Every resumed run ends at the weights the saved run
    had yet to reach."""
    old, path = 4, str(tmp_path)
    results = {old: oks(run_world(_train_save_flush, old, tmp_path, path))}
    for world in (2, 3):
        results[world] = oks(run_world(_resume_resharded, world, tmp_path, path, old))
    weights = torch.load(tmp_path / "sync_weights.pt")
    # A process with no process group is a world of one (GradientSync only: DDP needs a group).
    results[1] = [{"sync": _flush("sync", weights, _load_resharded("sync", path, old, 0, 1))}]
    for mode in ("sync", "ddp"):
        expected = _expected(path, mode, old)
        shift = _close(expected, torch.load(tmp_path / f"{mode}_weights.pt"))
        assert shift > 1e-3, "the saved run held nothing back: the test would prove nothing"
        for world, ranks in results.items():
            for rank, res in enumerate(ranks):
                if mode in res:
                    assert res[mode]["left"] == 0.0, (world, rank, mode)  # all of it was sent
                    assert _close(res[mode]["weights"], expected) < 1e-6, (world, rank, mode)
        # Each rank taking its own old file (strict=False, as before) loses ranks 2 and 3's.
        for res in results[2]:
            assert _close(res[mode + "_own"]["weights"], expected) > 1e-4, mode
