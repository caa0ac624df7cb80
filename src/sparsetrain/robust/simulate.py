"""Run n data-parallel workers in one process, some Byzantine, to compare rules and attacks fast.

The simulation is the multi-process run with the network taken out: every worker draws its own
batches, from the whole training set or from a shard of its own (``split``), with its own seeded
generator (the same draws as rank i of a real run, see ``sparsetrain robust-matrix``); the
workers' gradients are computed together with ``torch.func.vmap``; the last ``byzantine``
workers' rows are replaced by the attack (omniscient attacks see the honest rows); the rule
aggregates the [n, d] matrix; one optimizer updates the single model copy that all workers
share.

A *task* is anything with ``build_model()``, ``train`` and ``test`` (TensorDatasets of inputs and
integer labels), ``num_classes`` and ``loss_fn``, such as ``sparsetrain.tasks.get_task(...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from . import get_aggregator
from .attacks import get_attack
from .base import check_int, check_positive


@dataclass
class RobustRunConfig:
    """One training run with Byzantine workers.

    Args:
        workers: n, the number of workers.
        byzantine: how many of them (the last ones) attack.
        aggregator: the rule's name; aggregator_options its options.
        aggregator_f: the f the rule is built for; None means ``byzantine`` (Krum needs
            n > 2f + 2, so with 4 of 10 Byzantine it can only be built for f = 3).
        attack: the attack's name (None: the Byzantine workers behave); attack_options its options.
        steps, batch_size, lr, momentum, weight_decay: SGD on every worker's batch of
            ``batch_size`` samples per step.
        seed: fixes the model initialisation, the shards and every batch.
        split: ``"iid"``: every worker draws its batches from the whole training set with its own
            generator (the i.i.d. workers of SafeguardSGD's Assumption 2.1); ``"shard"``: every
            worker owns a disjoint shard (heterogeneous workers).
    """

    workers: int = 10
    byzantine: int = 0
    aggregator: str = "mean"
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    aggregator_f: int | None = None
    attack: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    split: str = "iid"

    def __post_init__(self) -> None:
        if self.split not in ("iid", "shard"):
            raise ValueError(f"split must be 'iid' or 'shard', got {self.split!r}")
        check_int(self.workers, "workers", 1)
        check_int(self.byzantine, "byzantine", 0)
        if self.byzantine >= self.workers:
            raise ValueError(
                f"byzantine ({self.byzantine}) must be fewer than workers ({self.workers})"
            )
        if self.byzantine and self.attack is None:
            raise ValueError("byzantine > 0 needs an attack name")
        check_int(self.steps, "steps", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_positive(self.lr, "lr")
        check_positive(self.momentum, "momentum", allow_zero=True)
        if not self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum:g}")
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_int(self.seed, "seed", 0)

    @property
    def rule_f(self) -> int:
        return self.byzantine if self.aggregator_f is None else self.aggregator_f

    def build(self):
        """Return (aggregator, attack or None), validated."""
        rule = get_aggregator(
            self.aggregator, n=self.workers, f=self.rule_f, **self.aggregator_options
        )
        attack = None
        if self.attack is not None and self.byzantine > 0:
            attack = get_attack(
                self.attack, n=self.workers, f=self.byzantine, **self.attack_options
            )
        return rule, attack


def shards(num: int, workers: int, seed: int, split: str = "shard") -> list[Tensor]:
    """Return each worker's sample indices: all of them (``"iid"``), or 0..num-1 shuffled by
    ``seed`` and split into ``workers`` near-equal disjoint shards (``"shard"``)."""
    if split == "iid":
        return [torch.arange(num)] * workers
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(perm, workers))


def batch_generator(seed: int, worker: int) -> torch.Generator:
    """The random generator of ``worker``'s mini-batches in a run seeded ``seed``: the same in
    the simulation and in real gloo ranks, so both draw the same batches."""
    # Modulo 2**64, what manual_seed takes (a large --seed overflowed; small ones unchanged).
    return torch.Generator().manual_seed((seed * 7_919 + 1_000_003 * (worker + 1)) % 2**64)


def draw(shard: Tensor, batch_size: int, gen: torch.Generator) -> Tensor:
    """Draw ``batch_size`` indices from ``shard`` with replacement."""
    return shard[torch.randint(len(shard), (batch_size,), generator=gen)]


def write_grads(model: nn.Module, flat: Tensor) -> None:
    """Set every parameter's ``.grad`` from the flat vector (parameters in registration order)."""
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch: int = 1024) -> float:
    """Return the accuracy (0..1) of ``model`` on a TensorDataset; non-finite weights give 0."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return 0.0
    x, y = dataset.tensors
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(dim=1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / len(y)


def _refuse_unsimulable(model: nn.Module, name: str) -> None:
    """Refuse a model the one-process simulation cannot train: it computes every worker's
    gradient at once with ``torch.func.vmap`` over the parameters alone, which refuses random
    layers (Dropout) and the in-place updates of running statistics (BatchNorm's, in
    training); buffers that stay as they are (a constant scale) are taken."""
    random = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _DropoutNd)})
    running = sorted(
        {type(m).__name__ for m in model.modules()
         if isinstance(m, _NormBase) and m.track_running_stats}
    )  # fmt: skip
    if random or running:
        has = " and ".join(
            ([f"random layers ({', '.join(random)})"] if random else [])
            + ([f"running statistics ({', '.join(running)})"] if running else [])
        )
        raise ValueError(
            f"the one-process simulation (--simulate) computes the workers' gradients with "
            f"torch.func.vmap over the parameters, and the model of task {name!r} has {has}, "
            "which it cannot follow: run one process a worker (without --simulate)"
        )


def simulate(task, config: RobustRunConfig, *, eval_every: int = 0) -> dict[str, Any]:
    """Train ``task`` with ``config.workers`` simulated workers; return the outcome.

    Returns:
        ``{"accuracy": final test accuracy in [0, 1], "history": [(step, accuracy), ...],
        "diverged": bool, "aggregator_stats": rule.stats()}``.

    Example:
        >>> out = simulate(get_task("digits-mlp"), RobustRunConfig(workers=10, byzantine=4,  # doctest: +SKIP
        ...     attack="alie", aggregator="safeguard"))
    """
    rule, attack = config.build()
    n, b = config.workers, config.byzantine
    h = n - b
    torch.manual_seed(config.seed)
    model = task.build_model()
    _refuse_unsimulable(model, task.name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    x, y = task.train.tensors
    parts = shards(len(y), n, config.seed, config.split)
    gens = [batch_generator(config.seed, i) for i in range(n)]

    def loss_of(p, xb, yb):
        return task.loss_fn(functional_call(model, p, (xb,)), yb)

    per_worker = vmap(grad(loss_of), in_dims=(None, 0, 0))
    flips = attack is not None and attack.flips_labels
    history: list[tuple[int, float]] = []
    diverged = False
    for step in range(config.steps):
        idx = torch.stack([draw(parts[i], config.batch_size, gens[i]) for i in range(n)])
        xb, yb = x[idx], y[idx]
        if flips and b:
            yb[h:] = attack.flip_labels(yb[h:], task.num_classes)
        params = {k: v.detach() for k, v in model.named_parameters()}
        g = per_worker(params, xb, yb)
        flat = torch.cat([g[k].reshape(n, -1) for k in names], dim=1)
        if attack is not None and b:
            honest = flat[:h] if attack.omniscient else None
            flat[h:] = attack(flat[h:], honest=honest, key="model", step=step, workers=range(h, n))
        update = rule(flat, key="model")
        rule.end_step()
        if not bool(torch.isfinite(update).all()):
            diverged = True
            break
        write_grads(model, update)
        opt.step()
        if eval_every and (step + 1) % eval_every == 0:
            history.append((step + 1, evaluate(model, task.test)))
    acc = 0.0 if diverged else evaluate(model, task.test)
    if math.isnan(acc):
        acc = 0.0
    return {
        "accuracy": acc,
        "history": history,
        "diverged": diverged,
        "aggregator_stats": rule.stats(),
    }


__all__ = [
    "RobustRunConfig",
    "batch_generator",
    "draw",
    "evaluate",
    "shards",
    "simulate",
    "write_grads",
]
