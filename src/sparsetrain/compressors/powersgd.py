"""PowerSGD: rank-r approximation of each gradient matrix by one warm-started power iteration."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._options import caller_stacklevel, check_state, state_mapping
from . import register_compressor
from .base import (
    Compressor,
    Payload,
    TensorMeta,
    Wire,
    check_floating,
    check_int,
    seeded_generator,
    work_dtype,
)


@dataclass
class _Matrix:
    offset: int  # where the parameter starts in the flat tensor
    rows: int
    cols: int
    rank: int


@dataclass
class PowerSGDContext:
    """What one compress call keeps on this rank between the two rounds.

    Attributes:
        meta: shape, dtype and device of the input.
        key: the tensor's key (the warm start is stored under it).
        matrices: the parameters compressed low-rank (offset, rows, cols, rank).
        dense: ``(offset, length)`` of the parameters sent as they are, in order.
        source: the input in the compute dtype (padded to ``rows * cols`` when no layout was
            given); ``next_round`` reads it, so it must not change in between.
        p_hat: the orthonormalised P of each matrix, set by ``next_round``.
    """

    meta: TensorMeta
    key: str
    matrices: list[_Matrix]
    dense: list[tuple[int, int]]
    source: Tensor
    p_hat: list[Tensor] | None = None


@register_compressor("powersgd")
@dataclass
class PowerSGD(Compressor):
    """Approximate each gradient matrix ``M`` (n x m) by ``P_hat Q^T`` of rank r, in two rounds.

    Steps (Vogels et al., "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
    Optimization", NeurIPS 2019), per matrix, with ``Q`` (m x r) the same on all ranks:

    1. Round 1, ``compress``: ``P = M Q``; the payload is every ``P``, flattened and concatenated;
       the sync layer sums it over ranks.
    2. ``next_round(summed P)``: ``P_hat = orth(sum P)`` (reduced QR, so the same on every rank),
       ``Q = M^T P_hat``; the round-2 payload is every ``Q`` and the uncompressed part.
    3. ``decompress(round-2 payload)``: ``P_hat Q^T`` per matrix and the uncompressed entries.
       It is linear in the payload: the summed payload gives ``P_hat P_hat^T sum M`` (the
       rank-r projection of the sum), this rank's own gives its local approximation (for error
       feedback).
    4. Warm start: ``decompress`` keeps the Q it was given as next step's Q for this key, so the
       last call of a step wins. The sync layer decompresses its own payload (error feedback)
       before the summed one, so the summed Q is kept, as in the paper; any order stays correct,
       because the result is a projection onto the shared ``P_hat`` whatever Q was used.

    Which parameters are compressed: ``layout`` lists the shapes packed in the flat input. A
    parameter with ndim >= 2 is the matrix ``(shape[0], prod(shape[1:]))`` and is compressed at
    rank ``min(rank, rows, cols)`` when ``rank * (rows + cols) < rows * cols``; 1-D parameters
    and matrices where low rank saves no bytes (in particular any with ``rank >= min(rows,
    cols)``: full rank is lossless) are sent as they are. They travel in round 2, not round 1,
    so that ``decompress`` stays linear: the summed round-2 payload carries their sum, this
    rank's payload its own values. Without a layout, a tensor with ndim >= 2 is one matrix
    (first dimension by the rest) and a 1-D tensor of n entries is zero-padded to a near-square
    matrix with ``ceil(sqrt(n))`` rows.

    Computation is in float32 for float16/bfloat16 input; payloads are in the input's dtype,
    except float16's round 2 (Q and the uncompressed part), which travels in float32: Q is
    ``M^T P_hat``, up to a column norm of M, past float16's range for a finite gradient of
    large entries on one rank. The warm-start Q's columns are scaled to unit length (which
    changes no result, up to rounding) so that P does not square the gradient's scale: P fits
    float16's range where M's row norms do, and float32's for finite float32 gradients of up to
    about 1e38 over the root of the row length. For float16 input a summed P that overflows
    anyway raises ``FloatingPointError`` on every rank (the sum is the same everywhere) before
    anything is kept.

    Args:
        rank: r, the rank of the approximation, >= 1.
        seed: seeds the initial Q of each key; must be the same on every rank.

    Example:
        >>> c = PowerSGD(rank=2)
        >>> g = torch.randn(64 * 32 + 10)
        >>> (p,), ctx = c.compress(g, key="b", layout=[torch.Size([64, 32]), torch.Size([10])])
        >>> (q, dense), ctx = c.next_round((p,), ctx)  # p summed over ranks in real use
        >>> c.decompress((q, dense), ctx).shape
        torch.Size([2058])
    """

    summable: ClassVar[bool] = True
    wire: ClassVar[Wire] = "dense"
    biased: ClassVar[bool] = True
    rounds: ClassVar[int] = 2
    # P = M Q and Q = M^T P_hat are linear in M; P_hat = orth(sum of P) is the same for any
    # positive scaling of the P's.
    linear: ClassVar[bool] = True

    rank: int = 1
    seed: int = 0
    _q: dict[str, list[Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_q",)  # state by bucket key
    # The first Q of each key (drawn from the seed), kept where it is used: the warm start
    # falls back to it (see _warm_start).
    _first: dict[str, tuple[Any, list[Tensor]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The keys whose Q came from a loaded state and has not been used yet.
    _loaded: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_int(self.rank, "rank", 1)
        check_int(self.seed, "seed", 0)

    # ---- planning ----------------------------------------------------------------------------
    @classmethod
    def robust_conflict(cls, options: Mapping[str, Any]) -> str | None:
        return (
            "powersgd does not combine with an aggregator or an attack: its first round sums "
            "every rank's P by a plain allreduce, which the rule never sees (one Byzantine rank "
            "steers every rank's projection, and one rank's NaN stops the step), and its warm "
            "start needs the summed Q; use a compressor of one round (topk, randomk, qsgd, "
            "signsgd, ...) or none"
        )

    def _plan(
        self, t: Tensor, layout: Sequence[torch.Size] | None
    ) -> tuple[list[_Matrix], list[tuple[int, int]], Tensor]:
        n = t.numel()
        flat = t.reshape(-1).to(work_dtype(t.dtype))
        if layout is None:
            if t.dim() >= 2:
                shapes = [(t.shape[0], n // max(t.shape[0], 1))]
            else:
                rows = math.isqrt(n - 1) + 1 if n > 0 else 1
                cols = -(-n // rows)
                r = min(self.rank, rows, cols)
                if r * (rows + cols) >= rows * cols:
                    return [], [(0, n)], flat
                if rows * cols > n:
                    flat = torch.cat([flat, flat.new_zeros(rows * cols - n)])
                return [_Matrix(0, rows, cols, r)], [], flat
        else:
            shapes = [tuple(s) for s in layout]
            covered = sum(math.prod(s) for s in shapes)
            if covered != n:
                raise ValueError(
                    f"layout covers {covered} elements but the tensor has {n}; layout must list "
                    "the shapes of the parameters packed in the tensor, in order"
                )
        matrices, dense, offset = [], [], 0
        for shape in shapes:
            size = math.prod(shape)
            if len(shape) >= 2 and size > 0:
                rows, cols = shape[0], size // shape[0]
                r = min(self.rank, rows, cols)
                if r * (rows + cols) < rows * cols:
                    matrices.append(_Matrix(offset, rows, cols, r))
                    offset += size
                    continue
            dense.append((offset, size))
            offset += size
        return matrices, dense, flat

    def _warm_start(self, key: str, matrices: list[_Matrix], like: Tensor) -> list[Tensor]:
        shapes = [(m.cols, m.rank) for m in matrices]
        where = (shapes, like.device, like.dtype)
        cached = self._first.get(key)
        if cached is None or cached[0] != where:
            # Drawn on the CPU and copied: every rank must start from the same Q, and which
            # number a CUDA generator gives to which element depends on the GPU's number of SMs
            # for large draws (ranks on different GPU models or MIG slices would differ).
            gen = seeded_generator(self.seed, key, 0, torch.device("cpu"))
            draw = [torch.randn(s, generator=gen, dtype=like.dtype).to(like.device) for s in shapes]
            cached = self._first[key] = (where, draw)
        first = cached[1]
        qs = self._q.get(key)
        loaded = key in self._loaded
        self._loaded.discard(key)
        if qs is None or [tuple(q.shape) for q in qs] != shapes:
            if qs is not None and loaded:  # (in a run, a key's layout may change: DDP's rebuild)
                warnings.warn(
                    f"powersgd: the loaded warm start of key {key!r} has Q's of shapes "
                    f"{[tuple(q.shape) for q in qs]}, but the tensor compressed under that key "
                    f"needs {shapes}: it starts from the first draw instead (was the state "
                    "saved with another model or bucketing?)",
                    stacklevel=caller_stacklevel(),
                )
            return first
        # A Q left by a step whose gradient held Inf or NaN, or overflowed (a finite float32
        # gradient of 1e20 squares past float32's range in P = M Q), would make every later P
        # non-finite; one left by an all-zero gradient is all zero, and P = M Q would then be
        # zero whatever M is (its orthogonalisation the unit vectors: the next step sent only
        # the first r rows of M). The first draw takes their place, chosen on the device (no
        # sync).
        return [
            torch.where(
                torch.isfinite(q).all() & q.ne(0).any(),
                q.to(device=like.device, dtype=like.dtype),
                f,
            )
            for q, f in zip(qs, first)
        ]

    # ---- the two rounds ----------------------------------------------------------------------
    def compress(
        self, t: Tensor, *, key: str = "", layout: Sequence[torch.Size] | None = None
    ) -> tuple[Payload, PowerSGDContext]:
        check_floating(t)
        matrices, dense, source = self._plan(t, layout)
        qs = self._warm_start(key, matrices, source)
        # With Q's columns of unit length, |P| is at most a row norm of M, where a warm Q
        # (M^T P_hat, M's size) would square it: float16's P overflowed at gradients of a few
        # tens, float32's at 1e19. P_hat = orth(sum P) is the same for any positive column
        # scaling, up to rounding.
        qs = [_unit_columns(q) for q in qs]
        ps = [
            (_view(source, m) @ q).reshape(-1) for m, q in zip(matrices, qs)
        ]  # P = M Q per matrix
        p_flat = torch.cat(ps) if ps else source.new_zeros(0)
        ctx = PowerSGDContext(TensorMeta.of(t), key, matrices, dense, source)
        return (p_flat.to(t.dtype),), ctx

    def next_round(self, reduced: Payload, ctx: PowerSGDContext) -> tuple[Payload, PowerSGDContext]:
        """Orthonormalise the summed P's and return this rank's round-2 payload ``(Q, dense)``."""
        (p_sum,) = reduced
        _check_finite(p_sum, "P", ctx)
        p_sum = p_sum.to(ctx.source.dtype)
        p_hat, qs, start = [], [], 0
        for m in ctx.matrices:
            p = p_sum[start : start + m.rows * m.rank].view(m.rows, m.rank)
            start += m.rows * m.rank
            ph = torch.linalg.qr(p, mode="reduced").Q
            p_hat.append(ph)
            qs.append((_view(ctx.source, m).T @ ph).reshape(-1))  # Q = M^T P_hat
        ctx.p_hat = p_hat
        q_flat = torch.cat(qs) if qs else ctx.source.new_zeros(0)
        parts = [ctx.source[o : o + size] for o, size in ctx.dense]
        dense = torch.cat(parts) if parts else ctx.source.new_zeros(0)
        wire = torch.float32 if ctx.meta.dtype == torch.float16 else ctx.meta.dtype
        return (q_flat.to(wire), dense.to(wire)), ctx

    def decompress(self, payload: Payload, ctx: PowerSGDContext) -> Tensor:
        """Return ``P_hat Q^T`` per matrix plus the dense part; keep the Q's as warm start."""
        return self._decode(payload, ctx).to(ctx.meta.dtype).view(ctx.meta.shape)

    def decompress_sum(self, payload: Payload, ctx: PowerSGDContext) -> Tensor:
        """As :meth:`decompress`, in float32 for half gradients (the sum of the ranks')."""
        return self._decode(payload, ctx).view(ctx.meta.shape)

    def _decode(self, payload: Payload, ctx: PowerSGDContext) -> Tensor:
        if ctx.p_hat is None:
            raise ValueError(
                "powersgd decompresses round-2 payloads: call next_round with the summed "
                "round-1 payload first"
            )
        q_flat, dense = payload
        q_flat = q_flat.to(ctx.source.dtype)
        out = torch.empty_like(ctx.source)
        qs, start = [], 0
        for m, ph in zip(ctx.matrices, ctx.p_hat):
            q = q_flat[start : start + m.cols * m.rank].view(m.cols, m.rank)
            start += m.cols * m.rank
            qs.append(q.detach().clone())
            out[m.offset : m.offset + m.rows * m.cols] = (ph @ q.T).reshape(-1)
        start = 0
        for offset, size in ctx.dense:
            out[offset : offset + size] = dense[start : start + size]
            start += size
        self._q[ctx.key] = qs
        return out[: ctx.meta.numel]

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return the warm-start Q's per key (copies on their device)."""
        return {"q": {key: [q.clone() for q in qs] for key, qs in self._q.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the warm-start Q's; the next compress continues exactly."""
        owner = "compressor 'powersgd'"
        check_state(state, owner, ("q",))
        q = state_mapping(state["q"], f"{owner}: the state's 'q'", "{key: list of 2-D tensors}")
        for k, qs in q.items():
            if not isinstance(qs, (list, tuple)) or not all(
                isinstance(t, Tensor) and t.dim() == 2 for t in qs
            ):
                raise ValueError(
                    f"{owner}: the state's 'q' of key {k!r} must be a list of 2-D tensors, got "
                    f"{qs!r:.200}"
                )
            # (A non-finite Q is replaced by the first draw in use; one saved so is a sign of
            # a state from a diverged run, refused as its residuals would be.)
            if not all(
                t.is_floating_point() and not t.is_meta and bool(torch.isfinite(t).all())
                for t in qs
            ):
                raise ValueError(
                    f"{owner}: the state's 'q' of key {k!r} must hold finite floating-point "
                    f"values, got {[(tuple(t.shape), t.dtype, str(t.device)) for t in qs]}"
                )
        self._q = {str(k): [t.clone() for t in qs] for k, qs in q.items()}
        self._loaded = set(self._q)


def _unit_columns(q: Tensor) -> Tensor:
    """``q`` with each column scaled to unit length (an all-zero column stays zero). Each is
    divided by its largest magnitude first: a plain norm sums squares, which pass float32's
    range once the entries pass about 1.8e19 over the root of the column's length (a warm Q of a
    gradient of 1e19), and dividing by that inf norm had zeroed Q, so that P_hat became the
    unit vectors and only the first ``rank`` rows of M were sent."""
    tiny = torch.finfo(q.dtype).tiny
    q = q / q.abs().amax(dim=0).clamp_min(tiny)
    return q / q.norm(dim=0).clamp_min(tiny)


def _view(source: Tensor, m: _Matrix) -> Tensor:
    return source[m.offset : m.offset + m.rows * m.cols].view(m.rows, m.cols)


def _check_finite(payload: Tensor, what: str, ctx: PowerSGDContext) -> None:
    """Raise ``FloatingPointError`` if a float16 ``payload`` (the P summed over ranks, the same
    on every rank, so every rank raises alike) is not finite: from finite gradients, only the
    float16 wire can have made it Inf. Other dtypes have float32's range and are not read
    back."""
    if ctx.meta.dtype != torch.float16 or bool(torch.isfinite(payload).all()):
        return
    if not bool(torch.isfinite(ctx.source).all()):
        raise FloatingPointError(
            f"powersgd: a {what} payload is not finite: this rank's gradients (with their "
            "error-feedback residuals) hold Inf or NaN"
        )
    raise FloatingPointError(
        f"powersgd: a {what} payload overflowed float16 (this rank's gradients are finite; "
        "another rank's may not be); "
        "send float32 gradients, or train with torch.amp.GradScaler (grad_scaler=...), whose "
        "on_nonfinite='propagate' drops such a step and lowers the scale"
    )
