"""Sparse models: masks, schedules, magnitude, WoodFisher and RigL pruning, export and metrics.

After "Sparsity in Deep Learning" (Hoefler, Alistarh et al., 2021) and WoodFisher (Singh &
Alistarh, 2020). The functional core is :func:`masks`; pruners wrap it in one lifecycle
(``prepare`` -> ``step`` after every optimizer step -> ``finalize``) and are built by name::

    from sparsetrain.pruning import Gradual, get_pruner

    pruner = get_pruner("magnitude", sparsity=0.9, schedule=Gradual(end=2000, frequency=100))
    pruner.prepare(model, optimizer)
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        pruner.step(step)
    pruner.finalize()

This package imports torch only.
"""

from __future__ import annotations

from .base import (
    Pruner,
    ScheduledPruner,
    available_pruners,
    get_pruner,
    pruner_class,
    register_pruner,
)
from .export import (
    checkpoint_bytes,
    compact_size_report,
    export_compact,
    load_compact,
    pack_bits,
    to_torch_sparse,
    unpack_bits,
)
from .magnitude import MagnitudePruner, NMPruner, StructuredPruner
from .masks import available_methods, keep_top, mask_sparsity, masks, register_method
from .metrics import count_flops, pruned_parameter_efficiency, sparsity_stats
from .rigl import RigLPruner, erk_densities
from .schedules import (
    Gradual,
    OneShot,
    Schedule,
    available_schedules,
    get_schedule,
    register_schedule,
)
from .woodfisher import BlockLayout, inverse_fisher, obs_update, saliency, woodfisher_prune
from .woodfisher_pruner import WoodFisherPruner

__all__ = [
    "BlockLayout",
    "Gradual",
    "MagnitudePruner",
    "NMPruner",
    "OneShot",
    "Pruner",
    "RigLPruner",
    "Schedule",
    "ScheduledPruner",
    "StructuredPruner",
    "WoodFisherPruner",
    "available_methods",
    "available_pruners",
    "available_schedules",
    "checkpoint_bytes",
    "compact_size_report",
    "count_flops",
    "erk_densities",
    "export_compact",
    "get_pruner",
    "get_schedule",
    "inverse_fisher",
    "keep_top",
    "load_compact",
    "mask_sparsity",
    "masks",
    "obs_update",
    "pack_bits",
    "pruned_parameter_efficiency",
    "pruner_class",
    "register_method",
    "register_pruner",
    "register_schedule",
    "saliency",
    "sparsity_stats",
    "to_torch_sparse",
    "unpack_bits",
    "woodfisher_prune",
]
