"""What a pruned model costs and keeps: sparsity, parameters, FLOPs, parameter efficiency.

Definitions used throughout sparsetrain:

* sparsity of a tensor: ``1 - nonzero / numel``; global sparsity: the same over all pruned
  tensors together.
* dense-equivalent FLOPs of a pruned model: the floating-point operations of one forward pass of
  one example when every zero weight is skipped, counting a multiply-add as 2 FLOPs. A linear
  layer costs ``2 * nnz(W)`` (plus ``out_features`` for its bias); a convolution
  ``2 * nnz(W) * (output positions)`` (plus one per output for its bias). Other layers are free.
* pruned-parameter efficiency (PPE): accuracy retained per fraction of parameters kept,
  ``PPE = (acc_pruned / acc_dense) / (nonzero_params / total_params)``, over all parameters of
  the model (biases and normalisation included). A dense model has PPE 1; a model that keeps 10%
  of its parameters and 99% of the dense accuracy has PPE 9.9.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def not_in_model(model: nn.Module, unknown: list[str], named: Iterable[str]) -> str:
    """The error for parameter names ``unknown`` that ``model`` does not list: a tied weight's
    second name (``named_parameters()`` lists each tensor once, by its first name) is pointed
    to the name it is listed by."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        listed = first.setdefault(id(p), name)
        if listed != name:
            aliases[name] = listed
    tied = [f"{n!r} is the tensor listed as {aliases[n]!r} (tied)" for n in unknown if n in aliases]
    if tied and len(tied) == len(unknown):
        return (
            f"parameter(s) {unknown} are not listed by that name (named_parameters() lists a "
            "tied tensor once, by its first name; give that one): " + "; ".join(tied)
        )
    wrapped = [n for n in unknown if n.startswith("module.") and n[len("module.") :] in named]
    hint = (
        f" ({', '.join(map(repr, wrapped))} name(s) the DDP wrapper's parameters: give them "
        "without 'module.', as the unwrapped model lists them)"
        if wrapped
        else ""
    )
    return (
        f"parameter(s) {unknown} are not in the model; its parameters are: {sorted(named)}"
        + (f" ({'; '.join(tied)})" if tied else "")
        + hint
    )


def sparsity_stats(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Return per-layer and global sparsity and parameter counts.

    Args:
        model: the model.
        names: parameters reported per layer and in ``global_sparsity``; None: every weight with
            2 or more dimensions.

    Returns:
        ``{"layers": {name: {"numel", "nonzero", "sparsity"}}, "global_sparsity",
        "params", "nonzero_params", "kept_fraction"}``; the last three count every parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsity_stats takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(names, str):
        raise TypeError(f"names must be a list of parameter names, got the string {names!r}")
    refuse_meta(model.named_parameters(), "sparsity_stats")
    params = dict(model.named_parameters())
    chosen = list(names) if names is not None else [n for n, p in params.items() if p.dim() >= 2]
    unknown = [n for n in chosen if n not in params]
    if unknown:
        raise ValueError(not_in_model(model, unknown, params))
    layers = {}
    for n in chosen:
        p = params[n]
        nz = int(torch.count_nonzero(p))
        sparsity = 1.0 - nz / p.numel() if p.numel() else 0.0  # (nothing to prune: none pruned)
        layers[n] = {"numel": p.numel(), "nonzero": nz, "sparsity": sparsity}
    total = sum(v["numel"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    all_params = sum(p.numel() for p in params.values())
    all_nonzero = sum(int(torch.count_nonzero(p)) for p in params.values())
    return {
        "layers": layers,
        "global_sparsity": 1.0 - nonzero / total if total else 0.0,  # no weights: none pruned
        "params": all_params,
        "nonzero_params": all_nonzero,
        "kept_fraction": all_nonzero / max(all_params, 1),
    }


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)  # a lookup: free by the definition above


def refuse_meta(named: Iterable[tuple[str, Any]], who: str) -> None:
    """Raise, naming them, where tensors among ``named`` are on the meta device, which holds
    no values for ``who`` to read."""
    meta = [n for n, t in named if isinstance(t, Tensor) and t.is_meta]
    if meta:
        raise ValueError(
            f"{who} reads the tensors' values, but {meta[:5]} are on the meta device, which "
            "holds none: materialise the model first (model.to_empty(device=...) and load its "
            "weights)"
        )


def _uncounted(model: nn.Module) -> list[str]:
    """The kinds of module that hold a weight matrix of their own (2 or more dims) that
    count_flops does not count (attention's projections, recurrent layers)."""
    counted = (nn.Linear, *_CONVS, *_TRANSPOSED, *_LOOKUPS)
    return sorted(
        {
            type(m).__name__
            for m in model.modules()
            if not isinstance(m, counted) and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        }
    )


def count_flops(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Return dense and sparse (zero weights skipped) forward FLOPs per example.

    Runs one forward pass on ``example`` (a batch, batch dimension first) in eval mode (the
    model's mode is restored after it; BatchNorm's statistics are left as they were), with hooks
    on linear and convolution layers (transposed ones too). Other layers count as free; a module
    that holds a weight matrix of its own (``nn.MultiheadAttention``'s input projection, an
    ``nn.LSTM``) is not counted, and a warning names such modules.

    Returns:
        ``{"dense": ..., "sparse": ...}``, FLOPs per example.

    Example:
        >>> count_flops(nn.Linear(4, 2), torch.zeros(1, 4))
        {'dense': 18, 'sparse': 18}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops takes a torch.nn.Module, got {type(model).__name__}")
    refuse_meta(model.named_parameters(), "count_flops")
    uncounted = _uncounted(model)
    if uncounted:
        warnings.warn(
            f"count_flops counts linear and convolution layers only; the weights of the "
            f"model's {', '.join(uncounted)} are not counted",
            stacklevel=2,
        )
    totals = {"dense": 0, "sparse": 0}
    batch = example.shape[0] if example.dim() > 0 else 1
    first = [True]

    def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
        w = mod.weight
        # Unbatched input, which torch's layers take: the batch was read off a wrong dimension.
        # Checked at the first layer counted, which takes the example (a later one may take a
        # vector of the model's own, a parameter say).
        batched = 2 if isinstance(mod, nn.Linear) else len(mod.kernel_size) + 2
        checked, first[0] = first[0], False
        if checked and inp[0].dim() < batched:
            raise ValueError(
                f"count_flops needs a batched example (batch dimension first), but a "
                f"{type(mod).__name__} got input of shape {tuple(inp[0].shape)}; add one: "
                "example.unsqueeze(0)"
            )
        # Over the whole forward pass, divided by the batch at the end: a layer that runs once
        # a pass on a vector of the model's own costs its share of an example.
        if isinstance(mod, nn.Linear):
            positions = out.numel() // mod.out_features
        elif isinstance(mod, _TRANSPOSED):  # every weight meets each input position once
            positions = inp[0].numel() // mod.in_channels
        else:
            positions = out.numel() // mod.out_channels
        bias = out.numel() if mod.bias is not None else 0
        totals["dense"] += 2 * w.numel() * positions + bias
        totals["sparse"] += 2 * int(torch.count_nonzero(w)) * positions + bias

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, *_CONVS, *_TRANSPOSED))
    ]
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in training:  # (each module's own: a model may hold frozen eval parts)
            m.training = mode
    return {k: round(v / batch) for k, v in totals.items()}


def pruned_parameter_efficiency(acc_pruned: float, acc_dense: float, kept_fraction: float) -> float:
    """Return ``(acc_pruned / acc_dense) / kept_fraction``: accuracy retained per parameter kept.

    Args:
        acc_pruned: accuracy of the pruned model.
        acc_dense: accuracy of the dense model it was pruned from (> 0).
        kept_fraction: non-zero parameters over all parameters, in (0, 1].
    """
    if not acc_dense > 0:
        raise ValueError(f"acc_dense must be > 0, got {acc_dense}")
    if not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    return (acc_pruned / acc_dense) / kept_fraction
