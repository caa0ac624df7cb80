"""The functional core: which weights to keep, as boolean masks (True = kept).

``masks(weights, sparsity, method=..., scope=...)`` turns a dict of weight tensors into a dict of
boolean masks of the same shapes. Methods are registered by name with :func:`register_method`;
each is a function ``(weights, sparsity, scope, previous, **options) -> masks``. The built-in ones:

* ``"magnitude"``: unstructured; prunes the smallest ``|w|`` (Han et al., 2015; Zhu & Gupta, 2017).
* ``"structured"``: whole output channels (rows of a linear weight, filters of a convolution)
  with the smallest L2 norm (Li et al., 2017, "Pruning Filters for Efficient ConvNets", rank by
  L1 and find L2 alike).
* ``"nm"``: N:M fine-grained structure, ``n`` kept in every group of ``m`` consecutive weights
  along the input dimension (input channels of a convolution; Mishra et al., 2021,
  "Accelerating Sparse Deep Neural Networks").
* ``"woodfisher"``: second-order saliency ``w_q^2 / (2 [F^-1]_qq)`` from a block-diagonal inverse
  empirical Fisher (Singh & Alistarh, 2020); see :mod:`sparsetrain.pruning.woodfisher`.

How many weights a sparsity removes: ``floor(sparsity * numel)`` over all weights together
(``scope="global"``) or in each tensor (``scope="layer"``), so at least one weight of every tensor
survives in layer scope. Ties are broken by position, so the count is always exact.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from .._options import caller_stacklevel, is_integer

Masks = dict[str, Tensor]
MaskMethod = Callable[..., Masks]

_METHODS: dict[str, MaskMethod] = {}
SCOPES = ("global", "layer")


def register_method(name: str) -> Callable[[MaskMethod], MaskMethod]:
    """Decorator: register a mask method ``f(weights, sparsity, scope, previous, **options)``."""

    def wrap(fn: MaskMethod) -> MaskMethod:
        if name in _METHODS and _METHODS[name] is not fn:
            raise ValueError(f"mask method {name!r} is already registered by {_METHODS[name]}")
        _METHODS[name] = fn
        return fn

    return wrap


def available_methods() -> list[str]:
    """Return the registered mask method names, sorted."""
    from . import woodfisher  # noqa: F401  (registers "woodfisher")

    return sorted(_METHODS)


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, refusing anything but a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:  # also refuses NaN
        why = " (1 would remove every weight)" if s >= 1.0 else ""
        raise ValueError(f"{what} must be in [0, 1){why}, got {sparsity}")
    return s


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def num_pruned(numel: int, sparsity: float) -> int:
    """Return how many of ``numel`` weights a sparsity removes: ``floor(sparsity * numel)``,
    at most ``numel - 1`` (a sparsity below 1 keeps a weight)."""
    # In exact arithmetic, on the float's shortest decimal (0.7 as 7/10, not the binary
    # 0.69999999999999995559...), so 0.7 * 362806040 is 253964228 at any size (the float
    # product fell short past about 1e8 weights), with a slack of 1e-9 of a weight for a
    # sparsity computed in floats (1/3 of 3 is 0.9999999999999999 * 3). The cap keeps it from
    # reaching numel for a sparsity within 1e-9 / numel of 1.
    exact = Fraction(repr(float(sparsity))) * numel + Fraction(1, 10**9)
    return max(0, min(numel - 1, math.floor(exact)))


def _check_weights(weights: Mapping[str, Tensor], previous: Mapping[str, Tensor] | None) -> None:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty dict of name -> tensor")
    for name, w in weights.items():
        if not isinstance(w, Tensor):
            raise TypeError(f"weight {name!r} is a {type(w).__name__}, expected a torch.Tensor")
        if not w.is_floating_point():
            raise TypeError(
                f"weight {name!r} has dtype {w.dtype}; only floating-point weights prune"
            )
        if not w.is_meta and not bool(torch.isfinite(w).all()):  # (NaN ranked largest, kept)
            raise ValueError(
                f"weight {name!r} holds NaN or Inf, which has no magnitude to rank: the "
                "training has diverged (lower the learning rate, or resume from a checkpoint)"
            )
    if previous is not None:
        for name, m in previous.items():
            if name not in weights:
                raise ValueError(
                    f"previous mask {name!r} names no weight; weights: {sorted(weights)}"
                )
            if m.shape != weights[name].shape or m.dtype != torch.bool:
                raise ValueError(
                    f"previous mask {name!r} must be a bool tensor of shape "
                    f"{tuple(weights[name].shape)}, got {m.dtype} {tuple(m.shape)}"
                )


def keep_top(
    scores: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    counts: Mapping[str, int] | None = None,
) -> Masks:
    """Keep the highest scores: prune ``floor(sparsity * n)`` lowest, globally or per tensor.

    Args:
        scores: name -> score tensor (higher = more important); ``-inf`` marks weights that must
            stay pruned (they are pruned first).
        sparsity: the fraction to prune, in [0, 1).
        scope: ``"global"`` (one threshold over all tensors) or ``"layer"`` (each tensor alone).
        counts: how many weights each score stands for (structured pruning scores a channel);
            by default one.

    Returns:
        name -> bool mask of the score's shape, True = kept.
    """
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    if scope == "layer":
        out = {}
        for name, s in scores.items():
            n = s.numel() if counts is None else s.numel() * counts[name]
            k = num_pruned(n, sparsity) // (1 if counts is None else counts[name])
            out[name] = _prune_lowest(s.reshape(-1), k).view_as(s)
        return out
    names = list(scores)
    # Ranked in float64 where a score is (float32 made ties of float64 weights 1e-12 apart, and
    # pruned the larger), else in float32 (half scores too).
    wide = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else None
    flat = torch.cat([scores[n].reshape(-1).to(wide or torch.float32) for n in names])
    if counts is None:
        k = num_pruned(flat.numel(), sparsity)
        mask = _prune_lowest(flat, k)
    else:
        # Weighted selection: prune lowest-scoring groups until their weight count reaches the target.
        sizes = torch.cat(
            [torch.full((scores[n].numel(),), counts[n], device=flat.device) for n in names]
        )
        target = num_pruned(int(sizes.sum()), sparsity)
        order = torch.sort(flat, stable=True).indices
        cum = torch.cumsum(sizes[order], 0)
        n_prune = int(torch.searchsorted(cum, torch.tensor(target, device=cum.device), right=True))
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[order[:n_prune]] = False
    out, offset = {}, 0
    for n in names:
        numel = scores[n].numel()
        out[n] = mask[offset : offset + numel].view_as(scores[n])
        offset += numel
    return out


def _prune_lowest(flat: Tensor, k: int) -> Tensor:
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        # Stable sort: equal scores are pruned in index order, so the count is exact.
        mask[torch.sort(flat, stable=True).indices[:k]] = False
    return mask


def _with_previous(scores: Tensor, previous: Tensor | None) -> Tensor:
    if previous is None:
        return scores
    return scores.masked_fill(~previous, float("-inf"))


@register_method("magnitude")
def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    previous: Mapping[str, Tensor] | None,
) -> Masks:
    """Prune the smallest ``|w|`` over all tensors (global) or in each tensor (layer)."""
    prev = previous or {}
    scores = {n: _with_previous(w.detach().abs(), prev.get(n)) for n, w in weights.items()}
    return keep_top(scores, sparsity, scope)


@register_method("structured")
def structured_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    previous: Mapping[str, Tensor] | None,
) -> Masks:
    """Prune whole output channels (dim 0) with the smallest L2 norm.

    Li et al. rank filters by their L1 norm and report that L2 ranks them alike; this ranks by
    L2. In global scope the channels of different layers compete by their root-mean-square value
    (the L2 norm divided by the square root of the channel's size), so a layer with wide rows is
    not kept just for being wide. Channels are pruned in that order, each for all its weights,
    up to the last one that keeps the pruned share within the target: the sparsity reached is
    the largest of that order not above the target (in global scope a subset outside the order
    can come closer, when a large channel stops the order early).
    """
    prev = previous or {}
    scores, counts = {}, {}
    for n, w in weights.items():
        if w.dim() < 2:
            raise ValueError(
                f"structured pruning needs weights with an output dimension (2-D or more); "
                f"{n!r} has shape {tuple(w.shape)}"
            )
        rows = w.detach().reshape(w.shape[0], -1).float()
        s = rows.norm(dim=1) / math.sqrt(rows.shape[1])
        if n in prev:  # a channel pruned before stays pruned
            s = s.masked_fill(~prev[n].reshape(w.shape[0], -1).any(dim=1), float("-inf"))
        scores[n], counts[n] = s, rows.shape[1]
    keep = keep_top(scores, sparsity, scope, counts=counts)
    return {
        n: keep[n].view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone() for n, w in weights.items()
    }


def nm_for_sparsity(sparsity: float, m: int) -> int:
    """Return the N of an N:M pattern that reaches at least ``sparsity``: ``floor((1-s)·m)``, ≥ 1."""
    return max(1, int(math.floor((1.0 - sparsity) * m + 1e-9)))


def check_nm(n: int, m: int) -> tuple[int, int]:
    """Return ``(n, m)`` as ints (NumPy's too), or refuse them, naming what is wrong."""
    for what, v in (("n", n), ("m", m)):
        if not is_integer(v, 1):
            raise ValueError(f"N:M pruning needs positive integers n and m, got {what}={v!r}")
    n, m = operator.index(n), operator.index(m)
    if n > m:
        raise ValueError(f"N:M pruning keeps n of every m weights, so n <= m; got n={n}, m={m}")
    return n, m


@register_method("nm")
def nm_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    previous: Mapping[str, Tensor] | None,
    *,
    m: int = 4,
    n: int | None = None,
) -> Masks:
    """Keep the ``n`` largest ``|w|`` in every group of ``m`` consecutive input channels.

    Groups run along the input dimension (dimension 1: a linear weight's columns, a
    convolution's input channels, at each output channel and kernel position), as sparse tensor
    cores expect for 2:4 and as NVIDIA's ASP groups convolutions; a 1-D tensor is one row. ``n``
    defaults to ``floor((1 - sparsity) * m)``; when given it must be consistent with
    ``sparsity`` (``sparsity == 0`` keeps everything; otherwise ``1 - n/m >= sparsity``). N:M is
    the same in both scopes: every group is pruned on its own.
    """
    if n is None:
        n = m if sparsity == 0.0 else nm_for_sparsity(sparsity, m)
    n, m = check_nm(n, m)
    if sparsity > 0 and 1.0 - n / m < sparsity - 1e-9:
        fits = nm_for_sparsity(sparsity, m)
        if 1.0 - fits / m >= sparsity - 1e-9 and fits < n:
            advice = f"use n <= {fits}"
        else:  # even n=1 keeps more than 1 - sparsity: m is too small
            advice = (
                f"no n reaches it with m={m} (n=1 prunes {1 - 1 / m:.3g}): use a larger m, of "
                f"at least {math.ceil(1 / (1 - sparsity) - 1e-9)}"
                if sparsity < 1
                else "N:M keeps at least one weight of every m"
            )
        raise ValueError(
            f"N:M with n={n}, m={m} prunes {1 - n / m:.3g} of the weights, less than the "
            f"sparsity {sparsity} asked; {advice}"
        )
    prev = previous or {}
    out = {}
    for name, w in weights.items():
        problem = nm_shape_problem(name, w.shape, m)
        if problem:
            raise ValueError(problem)
        score = _with_previous(w.detach().abs(), prev.get(name))
        # The input dimension last, then groups of m along it.
        order_dims = [0, *range(2, w.dim()), 1] if w.dim() >= 2 else [0]
        s = score.permute(order_dims).reshape(-1, m)
        # Stable: among ties the earlier positions are kept, so exactly n survive per group.
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep.scatter_(1, order[:, :n], True)
        back = [order_dims.index(d) for d in range(w.dim())]
        out[name] = keep.view([w.shape[d] for d in order_dims]).permute(back).contiguous()
    return out


def nm_shape_problem(name: str, shape: Sequence[int], m: int) -> str | None:
    """Why N:M with groups of ``m`` cannot prune a weight of ``shape`` (its input dimension,
    dimension 1, or 0 for a 1-D tensor, is not a multiple of ``m``), or None if it can."""
    dim = 1 if len(shape) >= 2 else 0
    if shape[dim] % m == 0:
        return None
    what = (
        "input channels" if len(shape) > 2 else "input dimension" if len(shape) == 2 else "length"
    )
    return (
        f"N:M pruning groups the {what} of {name!r} (shape {tuple(shape)}, dimension {dim}) by "
        f"m={m}, but {shape[dim]} is not divisible by {m}"
    )


def masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    method: str = "magnitude",
    scope: str = "global",
    *,
    previous: Mapping[str, Tensor] | None = None,
    **options: Any,
) -> Masks:
    """Return which weights to keep at a given sparsity, as boolean masks (True = kept).

    Args:
        weights: name -> weight tensor (for example ``dict(model.named_parameters())`` restricted
            to the layers to prune).
        sparsity: fraction of weights to remove, in [0, 1).
        method: a registered method, see :func:`available_methods` (``"magnitude"``,
            ``"structured"``, ``"nm"``, ``"woodfisher"``).
        scope: ``"global"`` (one ranking over all weights) or ``"layer"`` (each tensor pruned to
            ``sparsity``).
        previous: masks from an earlier pruning step; weights they pruned stay pruned.
        **options: options of the method (``n``, ``m`` for ``"nm"``; ``grads``, ``block_size``,
            ``damping`` for ``"woodfisher"``).

    Returns:
        name -> bool tensor of the weight's shape and device.

    Example:
        >>> w = {"a": torch.tensor([0.1, -2.0, 0.3, 4.0])}
        >>> masks(w, 0.5)["a"].tolist()
        [False, True, False, True]
    """
    available_methods()
    if method not in _METHODS:
        raise ValueError(
            f"unknown pruning method {method!r}; valid names are: {', '.join(sorted(_METHODS))}"
        )
    s = check_sparsity(sparsity)
    check_scope(scope)
    _check_weights(weights, previous)
    out = _METHODS[method](weights, s, scope, previous, **options)
    odd = [
        n
        for n, w in weights.items()
        if not (isinstance(out.get(n), Tensor) and out[n].dtype == torch.bool)
        or out[n].shape != w.shape
    ]
    if odd:  # (a method of the user's: the pruners and masks & previous need bool masks)
        raise TypeError(
            f"pruning method {method!r} must return a bool mask of each weight's shape (True: "
            f"kept), but did not for {odd[:5]}"
        )
    if previous:  # (a sparsity below what they pruned ranks some of those weights back in)
        out = {n: m & previous[n] if n in previous else m for n, m in out.items()}
    if scope == "global":
        _warn_collapsed(out, previous, s, method)
    return out


def _warn_collapsed(
    out: Mapping[str, Tensor], previous: Mapping[str, Tensor] | None, sparsity: float, method: str
) -> None:
    """Warn about tensors that one global ranking pruned whole (layer collapse): such a layer
    passes nothing on, which no sparsity target is worth, and is easy to miss in the total."""
    prev = previous or {}
    whole = [
        n
        for n, m in out.items()
        if m.numel() and not m.any() and (n not in prev or bool(prev[n].any()))
    ]
    if whole:
        warnings.warn(
            f"global {method} pruning at sparsity {sparsity:g} removed every weight of "
            f"{', '.join(repr(n) for n in whole)}: "
            + ("that layer now passes" if len(whole) == 1 else "those layers now pass")
            + " nothing on. Prune with scope='layer', or leave such a layer out of the pruned "
            "parameters",
            stacklevel=caller_stacklevel(os.path.dirname(__file__)),  # the user's call
        )


def mask_sparsity(m: Mapping[str, Tensor]) -> float:
    """Return the fraction of False entries over all masks (boolean tensors); 0.0 for none."""
    if not isinstance(m, Mapping):
        raise TypeError(f"masks must be a dict of name -> boolean tensor, got {type(m).__name__}")
    bad = [n for n, t in m.items() if not (isinstance(t, Tensor) and t.dtype == torch.bool)]
    if bad:
        raise TypeError(
            f"masks must be boolean tensors (True: kept); {bad[:5]} are not (a weight, or a "
            "0/1 tensor? compare it: weight != 0)"
        )
    total = sum(t.numel() for t in m.values())
    kept = sum(int(t.sum()) for t in m.values())
    return 1.0 - kept / total if total else 0.0
