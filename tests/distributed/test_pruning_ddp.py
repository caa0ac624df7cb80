"""2 gloo ranks under DDP, each on its own data: every pruner ends with identical masks."""

from __future__ import annotations

import datetime
import os
import pickle
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsetrain._procs import exit_finished_worker

WORLD = 2


METHODS = ("magnitude", "woodfisher", "rigl")


def _worker(rank: int, root: str, hook: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(root, "store"), WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:  # one world for all methods: starting processes costs more than pruning
        result = {m: _prune(rank, m, hook) for m in METHODS}
    except Exception as e:  # noqa: BLE001 - reported to the test on every rank
        result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    with open(os.path.join(root, f"r{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()
    exit_finished_worker(0)  # skip interpreter teardown, where gloo can abort a finished rank


def _prune(rank: int, method: str, hook: str) -> dict:
    from sparsetrain.pruning import Gradual, get_pruner

    torch.manual_seed(0)  # same initial model on both ranks (DDP would broadcast it anyway)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    if hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        ddp.register_comm_hook(
            psgd.PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2),
            psgd.powerSGD_hook,
        )
    elif hook == "sparsetrain-threshold":
        # Error feedback keeps residuals at coordinates a mask has since pruned: sending them
        # later must neither revive a pruned weight nor let the ranks' masks drift apart.
        import sparsetrain

        sparsetrain.register_ddp_hook(ddp, "threshold", density=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randn(256, 16, generator=g)
    y = x[:, :4].argmax(1)
    opts = {
        "magnitude": {"sparsity": 0.8, "schedule": Gradual(end=20, frequency=5)},
        "woodfisher": {
            "sparsity": 0.7,
            "schedule": Gradual(end=20, frequency=10),
            "fisher_samples": 8,
            "block_size": 16,
        },
        "rigl": {"sparsity": 0.8, "delta_t": 4, "end": 24},
    }[method]
    pruner = get_pruner(method, **opts).prepare(ddp, opt)

    def closure() -> torch.Tensor:  # per-rank samples: the unwrapped module, no DDP averaging
        i = torch.randint(len(y), (1,), generator=g)
        return nn.functional.cross_entropy(ddp.module(x[i]), y[i])

    for step in range(30):
        i = torch.arange(step * 16, step * 16 + 16) % len(y)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[i]), y[i]).backward()
        opt.step()
        pruner.step(step, closure)
    return {
        "masks": pruner.masks,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "stats": pruner.stats(),
    }


def _run(tmp_path, hook: str) -> list[dict]:
    ctx = mp.start_processes(
        _worker, args=(str(tmp_path), hook), nprocs=WORLD, join=False, start_method="spawn"
    )
    import time

    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"pruning with hook {hook} did not finish in 120 s (hang?)")
    results = []
    for r in range(WORLD):
        with open(tmp_path / f"r{r}.pkl", "rb") as f:
            res = pickle.load(f)
        assert "error" not in res, f"rank {r}: {res['error']}"
        results.append(res)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["none", "powersgd", "sparsetrain-threshold"])
def test_two_gloo_ranks_prune_to_identical_masks(tmp_path, hook: str) -> None:
    """Without and with gradient compression (torch's PowerSGD DDP hook, and sparsetrain's own
    hook with threshold sparsification and error feedback)."""
    ranks = _run(tmp_path, hook)
    for method in METHODS:
        r0, r1 = (r[method] for r in ranks)
        assert r0["masks"].keys() == r1["masks"].keys()
        for n in r0["masks"]:
            assert torch.equal(r0["masks"][n], r1["masks"][n]), (method, n)
            assert torch.equal(r0["weights"][n], r1["weights"][n]), (method, n)
            assert (r0["weights"][n][~r0["masks"][n]] == 0).all()
        assert r0["stats"]["num_updates"] >= 2, method
        expected = {"magnitude": 0.8, "woodfisher": 0.7, "rigl": 0.8}[method]
        assert r0["stats"]["sparsity"] == pytest.approx(expected, abs=0.01), method


def _disagreements(rank: int, world: int) -> dict:
    from sparsetrain.pruning import get_pruner

    def attempt(fn) -> str | None:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    out = {}
    # Another sparsity on rank 1: it took rank 0's masks and reported its own target.
    out["sparsity"] = attempt(
        lambda: get_pruner("magnitude", sparsity=0.5 if rank == 0 else 0.8).prepare(model())
    )
    # Another method on rank 1: named in the gather, not two set-ups waiting for each other.
    out["method"] = attempt(
        lambda: get_pruner("magnitude" if rank == 0 else "structured", sparsity=0.5).prepare(
            model()
        )
    )
    # An option that decides a collective's size (WoodFisher's chunk of gathered samples)
    # passed the check, which skipped the options a loaded state may change, and gloo aborted.
    out["chunk"] = attempt(
        lambda: get_pruner("woodfisher", sparsity=0.5, chunk=4 if rank == 0 else 8).prepare(model())
    )
    # A name one rank's model lacks: that rank raised, the other waited in the broadcast.
    out["refused"] = attempt(
        lambda: get_pruner("magnitude", params=["0.weight"] if rank == 0 else ["9.weight"]).prepare(
            model()
        )
    )
    # A state loaded on rank 0 only (the broadcast in its load waited for rank 1), and states
    # saved at different steps: the first step() raises on every rank.
    net = model()
    pruner = get_pruner("rigl", sparsity=0.5, delta_t=2, end=20).prepare(net)
    for step in range(4):
        net(torch.randn(4, 8)).sum().backward()
        pruner.step(step)
    saved = pruner.state_dict()
    net = model()
    pruner = get_pruner("rigl", sparsity=0.5, delta_t=2, end=20).prepare(net)
    if rank == 0:
        pruner.load_state_dict(saved)
    out["one_loads"] = attempt(lambda: pruner.step(4))
    # Loaded on both, the same step: goes on (and the update step's collective runs).
    net = model()
    pruner = get_pruner("rigl", sparsity=0.5, delta_t=2, end=20).prepare(net)
    pruner.load_state_dict(saved)
    net(torch.randn(4, 8)).sum().backward()
    out["both_load"] = attempt(lambda: pruner.step(4))
    return out


def test_ranks_whose_pruners_differ_raise_on_every_rank(tmp_path) -> None:
    from .harness import oks, run_world

    for res in oks(run_world(_disagreements, 2, tmp_path, timeout=120)):
        assert "the ranks disagree" in res["sparsity"] and "sparsity" in res["sparsity"]
        assert "the ranks disagree" in res["method"] and "structured" in res["method"], res
        assert "rank(s) [1] refused their input" in res["refused"], res["refused"]
        assert "the ranks disagree" in res["chunk"] and "chunk" in res["chunk"], res["chunk"]
        assert "the ranks disagree" in res["one_loads"] and "last step" in res["one_loads"]
        assert res["both_load"] is None, res["both_load"]


def _subgroups(rank: int, world: int) -> list:
    from sparsetrain.pruning import get_pruner

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    torch.manual_seed(rank // 2)  # a model a group, alike within it
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = get_pruner("magnitude", sparsity=0.5).prepare(net, group=group)
    pruner.prune()  # the masks' broadcast from the group's first rank
    return [m.flatten().tolist() for m in pruner.masks.values()]


def test_pruners_synchronise_masks_over_a_subgroup_without_global_rank_0(tmp_path) -> None:
    # The masks were broadcast from global rank 0, which the group {2, 3} does not hold.
    from .harness import oks, run_world

    res = oks(run_world(_subgroups, 4, tmp_path, timeout=120))
    assert res[0] == res[1] and res[2] == res[3]


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.a(x)
        return self.out(self.b(h) if use_b else h)


def _rigl_unused(rank: int, world: int) -> dict:
    from sparsetrain.pruning import get_pruner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = _Branchy()
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    pruner = get_pruner("rigl", sparsity=0.5, delta_t=2, end=10).prepare(ddp, opt)
    g = torch.Generator().manual_seed(rank)
    for step in range(4):
        opt.zero_grad()
        # rank 1 leaves b out of the backward whose gradients choose the update at step 2
        use_b = not (rank == 1 and step == 2)
        ddp(torch.randn(4, 8, generator=g), use_b).sum().backward()
        opt.step()
        pruner.step(step)
    # The forgotten step (no gradient captured on any rank): an error on every rank.
    pruner._dense_grads = {}
    try:
        pruner.update(4, None)
        forgotten = None
    except ValueError as e:
        forgotten = str(e)
    # Rank 1 skips pruner.step(1), which arms the capture for the update at step 2: its zeros
    # were averaged in as a gradient; now every rank raises.
    net = _Branchy()
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    other = get_pruner("rigl", sparsity=0.5, delta_t=2, end=10).prepare(ddp, opt)
    skipped = None
    try:
        for step in range(3):
            opt.zero_grad()
            ddp(torch.randn(4, 8, generator=g), True).sum().backward()
            opt.step()
            if not (rank == 1 and step == 1):
                other.step(step)
    except ValueError as e:
        skipped = str(e)
    # Rank 1 freezes a pruned weight before the update at step 2: it alone raised, and the other
    # waited in the allreduce until the process died.
    net = _Branchy()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    third = get_pruner("rigl", sparsity=0.5, delta_t=2, end=10).prepare(net, opt)
    frozen = None
    try:
        for step in range(3):
            if rank == 1 and step == 2:
                net.a.weight.requires_grad_(False)
            opt.zero_grad()
            net(torch.randn(4, 8, generator=g), True).sum().backward()
            opt.step()
            third.step(step)
    except ValueError as e:
        frozen = str(e)
    return {
        "masks": {n: m.flatten().tolist() for n, m in pruner.masks.items()},
        "forgotten": forgotten,
        "skipped": skipped,
        "frozen": frozen,
    }


def test_rigl_updates_where_a_pruned_layer_was_unused_on_one_rank(tmp_path) -> None:
    """A layer one rank's batch left out before an update step (DDP's find_unused_parameters)
    has a zero gradient there, as DDP averages it: that rank had raised "no dense gradient"
    while the other waited in RigL's allreduce."""
    from .harness import oks, run_world

    res = oks(run_world(_rigl_unused, 2, tmp_path, timeout=120))
    assert res[0]["masks"] == res[1]["masks"]
    for r in res:
        assert r["forgotten"] and "no dense gradient for any weight" in r["forgotten"], r
        assert r["skipped"] and "rank(s) [1] of the group captured no" in r["skipped"], r
    assert "rank(s) [1] of the group have pruned parameters frozen" in res[0]["frozen"], res[0]
    assert "['a.weight'] are frozen" in res[1]["frozen"], res[1]


def _pruner_on_one_rank(rank: int, world: int) -> str | None:
    import datetime

    from sparsetrain.pruning import get_pruner
    from sparsetrain.sync import config

    config.ARRIVAL_WARN_S = 1.0
    dist.distributed_c10d._get_default_store().set_timeout(datetime.timedelta(seconds=4))
    if rank == 1:
        return None  # never prepares its pruner
    try:
        get_pruner("magnitude", sparsity=0.5).prepare(torch.nn.Linear(4, 4))
    except RuntimeError as e:
        return str(e)
    return "prepared"


def test_a_rank_that_never_prepares_its_pruner_is_named(tmp_path):
    # Rank 0 waited in the options' gather until the process group's timeout, without a word.
    from .harness import oks, run_world

    first, second = oks(run_world(_pruner_on_one_rank, 2, tmp_path, timeout=120))
    assert second is None
    assert "rank(s) [1] of 2 have not prepared their pruner" in first, first
