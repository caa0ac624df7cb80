"""Byzantine-resilient aggregation: robust rules, SafeguardSGD and the known attacks.

Stateless rules are plain functions of the ``[n, d]`` matrix of the workers' gradients::

    from sparsetrain.robust import aggregate
    update = aggregate("median", grads, f=2)              # coordinate-wise median
    update = aggregate("krum", grads, f=2)                 # needs n > 2f + 2

Stateful rules (centered clipping's momentum anchor, SafeguardSGD) are objects that live across
steps; the same interface serves every rule::

    rule = get_aggregator("safeguard", n=10, f=4, window0=10, window1=50)
    for step in ...:
        update = rule(grads, key="bucket0")                # once a key (DDP bucket) a step
        rule.end_step()                                    # once a step, after the last key
    rule.stats()["removed"]                                # {worker: step removed}
    rule.state_dict(); rule.load_state_dict(sd)            # exact round trip

Attacks replace the Byzantine workers' gradients (``get_attack("alie", n=10, f=4)``); in a
multi-process run the last ``f`` ranks attack (``sparsetrain.sync.robust_exchange``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import bucketing, clipping, rules, safeguard  # noqa: F401  (register the rules)
from .attacks import Attack, available_attacks, get_attack, register_attack
from .base import (
    Aggregator,
    aggregator_class,
    available_aggregators,
    build,
    check_grads,
    register_aggregator,
)
from .bucketing import Bucketing
from .clipping import CenteredClipping
from .rules import CoordinateMedian, GeometricMedian, Krum, Mean, MultiKrum, TrimmedMean
from .safeguard import Safeguard


def get_aggregator(name: str, *, n: int, f: int = 0, **options: Any) -> Aggregator:
    """Build the aggregation rule registered as ``name`` for ``n`` workers, ``f`` of them Byzantine.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones), or ``n`` too small
            for ``f`` under this rule (for example Krum needs n > 2f + 2).
    """
    return build(name, n, f, options)


def aggregate(name: str, grads: Tensor, f: int = 0, **options: Any) -> Tensor:
    """Aggregate ``grads`` ([n, d], one row a worker) with the stateless rule ``name``.

    Args:
        name: one of the stateless rules: mean, median, trimmed_mean, krum, multi_krum,
            geometric_median (bucketing draws a new permutation each step: build it with
            :func:`get_aggregator` and call ``end_step()`` after each step).
        grads: the workers' gradients.
        f: the number of Byzantine workers to tolerate.
        **options: the rule's options.

    Returns:
        The [d] aggregate.

    Example:
        >>> import torch
        >>> aggregate("median", torch.tensor([[1.0], [2.0], [100.0]]), f=1)
        tensor([2.])
    """
    check_grads(grads, grads.shape[0] if isinstance(grads, Tensor) and grads.dim() == 2 else -1)
    rule = build(name, grads.shape[0], f, options)
    if not rule.stateless:
        raise ValueError(
            f"aggregator {name!r} keeps state across steps; build it once with "
            f"get_aggregator({name!r}, n=..., f=..., ...), call it every step and call its "
            "end_step() after each step"
        )
    return rule(grads)


__all__ = [
    "Aggregator",
    "Attack",
    "Bucketing",
    "CenteredClipping",
    "CoordinateMedian",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MultiKrum",
    "Safeguard",
    "TrimmedMean",
    "aggregate",
    "aggregator_class",
    "available_aggregators",
    "available_attacks",
    "get_aggregator",
    "get_attack",
    "register_aggregator",
    "register_attack",
]
