"""WoodFisher: second-order pruning with a block-diagonal inverse empirical Fisher.

Singh & Alistarh (2020), "WoodFisher: Efficient Second-Order Approximation for Neural Network
Compression". The loss near the trained weights is modelled as ``L(w + dw) ~ L(w) + dw^T F dw / 2``
with the empirical Fisher ``F = lambda I + (1/N) sum_n g_n g_n^T`` of ``N`` per-sample (or
micro-batch) gradients. Steps:

1. Split every weight tensor into blocks of ``block_size`` consecutive weights (the last block of a
   tensor is padded); keep one ``block_size x block_size`` inverse per block, so memory is
   ``num_blocks * block_size^2`` numbers however large the model.
2. Build each block's ``F^-1`` from ``I / lambda`` by ``N`` rank-1 Sherman-Morrison (Woodbury)
   updates ``F^-1 <- F^-1 - (F^-1 g)(F^-1 g)^T / (N + g^T F^-1 g)``, all blocks at once.
3. Score every weight by the optimal-brain-surgeon saliency ``rho_q = w_q^2 / (2 [F^-1]_qq)``, the
   loss increase of removing ``w_q`` alone and letting the others compensate; prune the lowest.
4. Optimal-brain-surgeon update of the kept weights. The paper removes many weights at once; here
   the update is the joint OBS solution within each block: with ``Q`` the block's pruned set,
   ``dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q``, which sets every pruned weight exactly to zero (earlier
   pruned ones included, so they stay zero) and moves the kept ones to the minimiser of the
   quadratic model under that constraint. With ``obs_update=False`` the weights are only masked:
   the diagonal, OBD-like variant that uses the same statistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import Masks, check_scope, check_sparsity, keep_top, register_method

DEFAULT_MAX_MEMORY = 2**30


@dataclass(frozen=True)
class BlockLayout:
    """How weight tensors map to Fisher blocks: each tensor padded to whole blocks, in order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    block_size: int

    @classmethod
    def of(cls, weights: Mapping[str, Tensor], block_size: int) -> BlockLayout:
        return cls(tuple(weights), tuple(w.shape for w in weights.values()), block_size)

    @property
    def blocks_per_tensor(self) -> list[int]:
        return [math.ceil(s.numel() / self.block_size) for s in self.shapes]

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks_per_tensor)

    def to_blocks(self, tensors: Mapping[str, Tensor] | list[Tensor], fill: float = 0.0) -> Tensor:
        """Return the tensors as one ``(num_blocks, block_size)`` matrix, padding with ``fill``.

        Tensors may carry leading batch dimensions (``(N, *shape)``): the result is then
        ``(N, num_blocks, block_size)``.
        """
        items = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        parts = []
        for t, shape, nb in zip(items, self.shapes, self.blocks_per_tensor):
            lead = t.shape[: t.dim() - len(shape)]
            flat = t.reshape(*lead, shape.numel())
            pad = nb * self.block_size - shape.numel()
            if pad:
                flat = torch.nn.functional.pad(flat, (0, pad), value=fill)
            parts.append(flat.reshape(*lead, nb, self.block_size))
        return torch.cat(parts, dim=-2)

    def from_blocks(self, blocks: Tensor) -> dict[str, Tensor]:
        """Invert :meth:`to_blocks` (no batch dimension)."""
        out, row = {}, 0
        for name, shape, nb in zip(self.names, self.shapes, self.blocks_per_tensor):
            out[name] = blocks[row : row + nb].reshape(-1)[: shape.numel()].reshape(shape)
            row += nb
        return out


def check_block_memory(
    layout: BlockLayout, max_memory_bytes: int, dtype: torch.dtype = torch.float32
) -> int:
    """Return the bytes the block inverses need; refuse (ValueError) more than the budget."""
    if (
        isinstance(layout.block_size, bool)
        or not isinstance(layout.block_size, int)
        or layout.block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer, got {layout.block_size!r}")
    size = torch.empty((), dtype=dtype).element_size()
    need = layout.num_blocks * layout.block_size**2 * size
    if need > max_memory_bytes:
        fits = _largest_block_size(layout, max_memory_bytes, size)
        advice = (
            f"use block_size {fits} (the largest below it that fits: each tensor is padded to "
            "whole blocks, so some smaller sizes need more), or raise max_memory_bytes"
            if fits
            else "no block_size fits: raise max_memory_bytes"
        )
        raise ValueError(
            f"WoodFisher blocks of size {layout.block_size} need {layout.num_blocks} x "
            f"{layout.block_size}^2 x {size} bytes = {need / 2**20:.1f} MiB for the inverse "
            f"Fisher, over max_memory_bytes={max_memory_bytes} ({max_memory_bytes / 2**20:.1f} "
            f"MiB); {advice}"
        )
    return need


def _largest_block_size(layout: BlockLayout, budget: int, size: int) -> int:
    """The largest block size below ``layout``'s whose inverses fit ``budget`` bytes (0: none).
    Each tensor is padded to whole blocks, so the need is not monotone in the block size (the
    digits MLP's 8192 fits 1 GiB in 4 blocks where 7998 needs 6), nor the refused size's block
    count scaled."""
    numels = [s.numel() for s in layout.shapes if s.numel()]  # (an empty one has no block)
    total, tensors, cap = sum(numels), len(numels), layout.block_size - 1
    if total == 0:
        return cap
    largest = max(numels)
    # From the largest tensor's size up, every tensor is one block and the need, tensors * b^2
    # * size, grows with b: the largest b it allows is the answer if it is that large.
    whole = min(cap, math.isqrt(budget // (tensors * size)))
    if whole >= largest:
        return whole
    # Below: under b weights of padding a tensor, the need is at most (total + tensors * b) * b
    # * size, which grows with b, so the largest b that bound allows fits; with no padding it
    # is at least total * b * size, so none above budget / (total * size) does. Between them,
    # every size is tried, from the top, a slice at a time (in float64: no int64 overflow).
    lo, hi = 0, min(cap, largest - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if (total + tensors * mid) * mid * size <= budget else (lo, mid - 1)
    top = min(cap, largest - 1, budget // (total * size))
    while top > lo:
        sizes = torch.arange(max(lo + 1, top - 2**16 + 1), top + 1, dtype=torch.float64)
        blocks = sum(torch.ceil(n / sizes) for n in numels)
        fits = sizes[blocks * sizes * sizes * size <= budget]
        if fits.numel():
            return int(fits.max())
        top = int(sizes[0]) - 1
    return lo


def init_inverse(num_blocks: int, block_size: int, damping: float, like: Tensor) -> Tensor:
    """Return ``I / damping`` for every block: the inverse of the Fisher before any sample."""
    if not (damping > 0 and math.isfinite(damping)):
        raise ValueError(
            f"damping must be finite and > 0 (it keeps the Fisher invertible), got {damping}"
        )
    eye = torch.eye(block_size, dtype=torch.float32, device=like.device) / damping
    return eye.expand(num_blocks, block_size, block_size).clone()


def woodbury_update_(finv: Tensor, grads: Tensor, num_samples: int) -> Tensor:
    """Fold gradient samples into the block inverses, in place, by Sherman-Morrison updates.

    Args:
        finv: ``(num_blocks, B, B)`` current inverses.
        grads: ``(n, num_blocks, B)`` gradient samples, already in block layout.
        num_samples: ``N``, the total number of samples the Fisher averages over (each sample
            adds ``g g^T / N``).

    Returns:
        ``finv``, updated.
    """
    step = _blocks_per_chunk(finv)
    for g in grads.to(finv.dtype):  # one rank-1 update per sample, all blocks at once
        u = torch.bmm(finv, g.unsqueeze(-1)).squeeze(-1)  # F^-1 g, (num_blocks, B)
        denom = num_samples + (g * u).sum(-1)
        v = u / denom.unsqueeze(-1)
        # The outer products u v^T a chunk of blocks at a time: all at once they took a second
        # copy of the inverses' memory.
        for lo in range(0, finv.shape[0], step):
            finv[lo : lo + step].sub_(
                u[lo : lo + step].unsqueeze(-1) * v[lo : lo + step].unsqueeze(-2)
            )
    return finv


# The working memory of a chunk of blocks beyond the inverses: budgeted as float64 temporaries
# (the OBS update's; the Woodbury updates' are float32 and take half of it).
CHUNK_BYTES = 64 * 2**20


def _blocks_per_chunk(finv: Tensor, copies: int = 1) -> int:
    """How many ``(B, B)`` blocks ``copies`` float64 temporaries of them fit in CHUNK_BYTES."""
    per_block = finv.shape[-1] ** 2 * 8 * copies
    return max(1, CHUNK_BYTES // max(per_block, 1))


def inverse_fisher(
    grads: Tensor, block_size: int, damping: float, layout: BlockLayout | None = None
) -> Tensor:
    """Return the block-diagonal inverse of ``damping * I + (1/N) sum g g^T``.

    Args:
        grads: ``(N, d)`` gradient samples of a flat vector (or ``(N, num_blocks, block_size)``
            when ``layout`` was already applied).
        block_size: the block size ``B``; ``d`` is padded to whole blocks.
        damping: ``lambda > 0``.

    Returns:
        ``(num_blocks, B, B)`` inverses.

    Example:
        >>> g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        >>> f = inverse_fisher(g, 8, 1e-2)[0]
        >>> exact = torch.linalg.inv(1e-2 * torch.eye(8) + g.T @ g / 16)
        >>> bool((f - exact).abs().max() <= 1e-4 * exact.abs().max())  # float32 rounding
        True
    """
    if grads.dim() == 2:
        layout = BlockLayout(("flat",), (torch.Size([grads.shape[1]]),), block_size)
        grads = layout.to_blocks([grads])
    finv = init_inverse(grads.shape[1], grads.shape[2], damping, grads)
    return woodbury_update_(finv, grads, grads.shape[0])


def check_inverse(finv: Tensor, damping: float) -> None:
    """Refuse (ValueError) inverses whose diagonal is not positive and finite. They are built
    in float32: once the damped Fisher's condition number nears float32's precision (about
    1e7; a damping far below the gradients' squares), the rank-one updates cancel to noise and
    some ``[F^-1]_qq`` come out negative, which would rank those weights first to prune and
    send the OBS update far off. (Accuracy degrades before that: keep the damping above about
    1e-6 of the squared gradients' scale.)"""
    diag = torch.diagonal(finv, dim1=-2, dim2=-1)
    bad = int((~(diag > 0) | ~torch.isfinite(diag)).sum())
    if bad:
        raise ValueError(
            f"woodfisher: {bad} of {diag.numel()} diagonal entries of the inverse Fisher are not "
            f"positive and finite: at damping {damping:g} the float32 Woodbury updates lost "
            "them to rounding (the damped Fisher is too ill-conditioned); raise damping"
        )


def saliency(w_blocks: Tensor, finv: Tensor) -> Tensor:
    """Return ``rho_q = w_q^2 / (2 [F^-1]_qq)`` for weights in block layout."""
    diag = torch.diagonal(finv, dim1=-2, dim2=-1)
    return w_blocks.float().square() / (2.0 * diag)


def obs_update(w_blocks: Tensor, finv: Tensor, pruned: Tensor) -> Tensor:
    """Return the weights after the joint optimal-brain-surgeon update within each block.

    For the pruned set ``Q`` of a block, solve ``[F^-1]_QQ x_Q = w_Q`` and set
    ``w <- w - F^-1[:, Q] x_Q``: the pruned weights become zero and the kept ones minimise the
    quadratic model of the loss under that constraint. Blocks are solved in one batched call by
    padding the system with the identity outside ``Q``.

    Args:
        w_blocks: ``(num_blocks, B)`` weights.
        finv: ``(num_blocks, B, B)`` inverse Fisher blocks.
        pruned: ``(num_blocks, B)`` bool, True where a weight is removed.

    Returns:
        ``(num_blocks, B)`` updated weights (pruned entries exactly zero).
    """
    out = torch.empty_like(w_blocks)
    # A chunk of blocks at a time, each solved alone as before: all at once, the float64 copies
    # (the inverses, the pruned set's outer product, the system, the solver's) took about ten
    # times the inverses' own memory.
    step = _blocks_per_chunk(finv, copies=6)
    for lo in range(0, finv.shape[0], step):
        hi = lo + step
        p = pruned[lo:hi].to(torch.float64)
        f = finv[lo:hi].to(torch.float64)
        w = w_blocks[lo:hi].to(torch.float64)
        system = f * (p.unsqueeze(-1) * p.unsqueeze(-2)) + torch.diag_embed(1.0 - p)
        x = torch.linalg.solve(system, (w * p).unsqueeze(-1))
        new = w - torch.bmm(f, x).squeeze(-1)
        out[lo:hi] = new.masked_fill(pruned[lo:hi], 0.0).to(w_blocks.dtype)
    return out


def woodfisher_prune(
    weights: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | Tensor,
    sparsity: float,
    scope: str = "global",
    *,
    block_size: int = 128,
    damping: float = 1e-4,
    obs: bool = True,
    previous: Mapping[str, Tensor] | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    finv: Tensor | None = None,
) -> tuple[Masks, dict[str, Tensor]]:
    """Return WoodFisher masks and the weights after the OBS update.

    Args:
        weights: name -> weight tensor.
        grads: name -> ``(N, *shape)`` gradient samples of each weight; or a ready
            ``(N, num_blocks, block_size)`` tensor; ignored when ``finv`` is given.
        sparsity: fraction to remove, in [0, 1).
        scope: ``"global"`` or ``"layer"``.
        block_size, damping: the Fisher blocks and ``lambda``.
        obs: apply the OBS update of the kept weights (False: only mask, the OBD-like variant).
        previous: masks of an earlier step; their pruned weights stay pruned.
        max_memory_bytes: refuse a ``block_size`` whose inverses would need more.
        finv: precomputed ``(num_blocks, block_size, block_size)`` inverses.

    Returns:
        ``(masks, new_weights)``.
    """
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    layout = BlockLayout.of(weights, block_size)
    check_block_memory(layout, max_memory_bytes)
    w_blocks = layout.to_blocks({n: w.detach() for n, w in weights.items()})
    if finv is None:
        g = _grad_blocks(weights, grads, layout)
        finv = init_inverse(layout.num_blocks, block_size, damping, w_blocks)
        woodbury_update_(finv, g, g.shape[0])
    check_inverse(finv, damping)
    rho = layout.from_blocks(saliency(w_blocks, finv))
    if previous:
        rho = {
            n: r.masked_fill(~previous[n], float("-inf")) if n in previous else r
            for n, r in rho.items()
        }
    keep = keep_top(rho, sparsity, scope)
    if obs:
        pruned = layout.to_blocks({n: ~keep[n] for n in layout.names}, fill=False)
        updated = obs_update(w_blocks, finv, pruned)
        if not bool(torch.isfinite(updated).all()):
            raise ValueError(
                f"woodfisher: the OBS update of the kept weights is not finite at damping "
                f"{damping:g} (the inverse Fisher is too ill-conditioned in float32); raise "
                "damping, or prune without the update (obs=False)"
            )
        new = layout.from_blocks(updated)
    else:
        new = {n: w.detach().masked_fill(~keep[n], 0.0) for n, w in weights.items()}
    return keep, {n: new[n].to(weights[n].dtype) for n in layout.names}


def _grad_blocks(
    weights: Mapping[str, Tensor], grads: Mapping[str, Tensor] | Tensor, layout: BlockLayout
) -> Tensor:
    """The gradient samples in block layout, ``(N, num_blocks, block_size)``, after checking
    that they are samples of these weights (they had failed in torch's reshape or bmm)."""
    want = (layout.num_blocks, layout.block_size)
    if isinstance(grads, Tensor):
        if grads.dim() != 3 or tuple(grads.shape[1:]) != want or grads.shape[0] < 1:
            raise ValueError(
                f"woodfisher: grads as one tensor must be (N >= 1, {want[0]}, {want[1]}) "
                f"samples in block layout, got {tuple(grads.shape)}"
            )
        return grads
    if not isinstance(grads, Mapping) or set(grads) != set(weights):
        raise ValueError("woodfisher needs grads: a dict with (N, *shape) samples for every weight")
    counts = set()
    for n, w in weights.items():
        g = grads[n]
        if not isinstance(g, Tensor) or g.dim() != w.dim() + 1 or g.shape[1:] != w.shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(
                f"woodfisher: grads[{n!r}] must be (N, {', '.join(map(str, w.shape))}): N "
                f"gradient samples of the weight, got {got}"
            )
        counts.add(g.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"woodfisher: every weight needs the same number N >= 1 of gradient samples, got "
            f"{sorted(counts)}"
        )
    return layout.to_blocks([grads[n] for n in layout.names])


@register_method("woodfisher")
def woodfisher_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    previous: Mapping[str, Tensor] | None,
    *,
    grads: Mapping[str, Tensor],
    block_size: int = 128,
    damping: float = 1e-4,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
) -> Masks:
    """Masks by the WoodFisher saliency; ``grads`` maps each name to ``(N, *shape)`` samples."""
    if not isinstance(grads, Mapping):
        raise ValueError("woodfisher needs grads: a dict with (N, *shape) samples for every weight")
    keep, _ = woodfisher_prune(
        weights,
        grads,
        sparsity,
        scope,
        block_size=block_size,
        damping=damping,
        obs=False,
        previous=previous,
        max_memory_bytes=max_memory_bytes,
    )
    return keep
