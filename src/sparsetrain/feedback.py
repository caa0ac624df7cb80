"""Error feedback: keep what compression did not send and add it to the next gradient.

Steps for one tensor at one step (Seide et al. 2014; Stich et al., "Sparsified SGD with Memory",
2018; Karimireddy et al., "Error Feedback Fixes SignSGD", 2019):

1. ``compensated = gradient + residual``
2. the compressor sends an approximation ``sent`` of ``compensated``
3. ``residual = compensated - sent``

so that ``sent + new residual == gradient + old residual`` exactly: nothing is lost, only
delayed. Residuals are kept per parameter name, so they survive DDP's bucket rebuild, a change of
bucket size and a restart from a checkpoint.

The residuals are in the gradients' units, as in Seide et al. and Deep Gradient Compression;
Stich et al. and Karimireddy et al. keep them in the update's (the learning rate times the
gradient). Under a constant learning rate the two are the same; under a schedule, what waits in
the residual is applied at the learning rate of the step that sends it, not of the step that
computed it.

With momentum correction (Lin et al., "Deep Gradient Compression", ICLR 2018) the rank first
folds the gradient into its own velocity, ``u = momentum * u + gradient``, and step 1 adds ``u``
instead of the gradient; after the exchange, the entries that were applied are cleared from ``u``
(:meth:`ErrorFeedback.mask_velocity`). Velocities are kept by name as residuals are.

For float16 and bfloat16 gradients the residuals and velocities are kept in float32, and so is the
compensated gradient: bfloat16's 8 significant bits would round a small gradient added to a
residual hundreds of times larger away step after step, and a float16 residual could pass 65504.
The compressor still sends the gradient's dtype; what the rounding to it leaves out goes into
the residual too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _native
from ._options import is_integer
from .compressors.base import work_dtype


def _check_packing(names: Sequence[str], numels: Sequence[int], flat: Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``flat`` packs ``names`` (distinct) of ``numels`` elements,
    in order: a repeated name would keep one residual of two, and sizes that do not add up
    would fail in torch without naming the parameters."""
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{what}: names must be a list of parameter names (str), one a tensor packed in "
            f"the flat tensor, got {names!r:.100}"
        )
    bad = [k for k in numels if isinstance(k, bool) or not is_integer(k) or k < 0]
    if bad:
        raise ValueError(
            f"{what}: numels must be integers >= 0 (each parameter's number of elements), got "
            f"{bad[0]!r}"
        )
    if not isinstance(flat, Tensor) or flat.dim() != 1:
        raise ValueError(
            f"{what}: the flat tensor must be a 1-D torch.Tensor packing the named parameters, "
            f"got {tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__}"
        )
    if len(names) != len(numels):
        raise ValueError(f"{what}: {len(names)} names but {len(numels)} numels; give one each")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(
            f"{what}: the names must be distinct (each parameter has one residual); repeated: "
            f"{', '.join(map(repr, twice))}"
        )
    if sum(numels) != flat.numel():
        raise ValueError(
            f"{what}: numels add up to {sum(numels)}, but the flat tensor has {flat.numel()} "
            "elements; it must pack the named parameters, in order"
        )


class ErrorFeedback:
    """Residuals keyed by parameter name.

    Args:
        enabled: when False, ``compensate`` returns its input and ``update`` keeps nothing;
            when True, the compensated gradient, residuals and velocities of float16 and
            bfloat16 gradients are float32.
        momentum: 0, or the momentum of momentum correction, in (0, 1) (needs ``enabled``).

    Example:
        >>> ef = ErrorFeedback()
        >>> g = ef.compensate(["w"], [3], torch.ones(3))
        >>> ef.update(["w"], [3], g, torch.tensor([1.0, 0.0, 0.0]))
        >>> ef.residuals["w"]
        tensor([0., 1., 1.])
    """

    def __init__(self, enabled: bool = True, momentum: float = 0.0):
        if not isinstance(enabled, bool):
            raise TypeError(f"ErrorFeedback: enabled must be True or False, got {enabled!r}")
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not 0 <= momentum < 1
        ):
            raise ValueError(
                f"ErrorFeedback: momentum must be 0 (off) or a number in (0, 1), got {momentum!r}"
            )
        self.enabled = enabled
        self.momentum = float(momentum)
        if self.momentum and not self.enabled:
            raise ValueError("momentum correction needs error feedback (enabled=True)")
        self.residuals: dict[str, Tensor] = {}
        self.velocity: dict[str, Tensor] = {}
        # Per bucket key, two flat buffers used in turn by compensate_into/commit_sparse: the
        # residuals live in one (as views) while the next step's compensated gradient is
        # written into the other, so the hot path allocates nothing. With momentum correction
        # the velocities are double-buffered the same way.
        self._buffers: dict[str, list[Tensor]] = {}
        self._vbuffers: dict[str, list[Tensor]] = {}
        self._next: dict[str, int] = {}
        self._buffer_names: dict[str, frozenset[str]] = {}  # the parameters of each key
        # The flat velocity of the exchange in progress, for mask_velocity.
        self._vflat: Tensor | None = None
        self._marked: tuple[dict[str, Tensor], dict[str, int], dict[str, Tensor]] = ({}, {}, {})

    def __repr__(self) -> str:
        extra = f", momentum={self.momentum}" if self.momentum else ""
        return f"ErrorFeedback(enabled={self.enabled}{extra}, residuals={len(self.residuals)})"

    def mark(self) -> None:
        """Remember the residuals (and velocities) as they are now, for :meth:`rollback`
        (references, no copy: a step writes new ones into the other buffer or into new
        tensors)."""
        self._marked = (dict(self.residuals), dict(self._next), dict(self.velocity))

    def rollback(self) -> None:
        """Restore the residuals and velocities of the last :meth:`mark`: a step that was
        dropped (a non-finite gradient on some rank) must not keep what its earlier buckets
        committed."""
        self.residuals, self._next = dict(self._marked[0]), dict(self._marked[1])
        self.velocity = dict(self._marked[2])
        self._vflat = None

    def set_aside(self, names: Sequence[str]) -> dict[str, dict[str, Tensor]]:
        """Take the residuals and velocities of ``names`` out of the step about to run, which
        then compensates those parameters with nothing and keeps nothing of them; return copies
        for :meth:`put_back`. For parameters DDP will not update this step (unused on every
        rank under ``find_unused_parameters=True``): what they would send would be dropped."""
        return {
            "residuals": {n: self.residuals.pop(n).clone() for n in names if n in self.residuals},
            "velocity": {n: self.velocity.pop(n).clone() for n in names if n in self.velocity},
        }

    def put_back(self, held: dict[str, dict[str, Tensor]]) -> None:
        """Restore what :meth:`set_aside` took, added to what the step kept for those
        parameters: nothing of their own, but a region owner's or a merge's dropped sums of
        the other ranks' values (Ok-Topk with ``residuals="owner"``, gTop-k)."""
        for store, part in ((self.residuals, held["residuals"]), (self.velocity, held["velocity"])):
            for name, t in part.items():
                kept = store.get(name)
                store[name] = t if kept is None else t + kept.to(t.dtype).reshape(t.shape)

    def clear(self, name: str, where: Tensor) -> None:
        """Zero the residual and velocity of parameter ``name`` where the flat bool tensor
        ``where`` is True, in place (weights pruned: what they kept would otherwise still be
        sent, and crowd out the kept weights' entries)."""
        for store in (self.residuals, self.velocity):
            t = store.get(name)
            if t is not None:
                t.masked_fill_(where.to(t.device).reshape(t.shape), 0)

    def rescale(self, factor: float) -> None:
        """Multiply the residuals and velocities by ``factor``, in place (the gradients' units
        changed: a new loss scale). The marked ones are the same tensors, so a rollback
        restores them in the new units too."""
        for store in (self.residuals, self.velocity):
            for t in store.values():
                t.mul_(factor)

    def _accumulate(self, names: Sequence[str], numels: Sequence[int], flat: Tensor) -> Tensor:
        """Return the new velocities ``momentum * u + flat`` (a new flat tensor) and keep them."""
        u = flat.to(work_dtype(flat.dtype), copy=True)
        for n, k, part in zip(names, numels, torch.split(u, list(numels))):
            if n in self.velocity:
                part.add_(self._stored(self.velocity, n, k, part).to(u.dtype), alpha=self.momentum)
            self.velocity[n] = part
        self._vflat = u
        return u

    def mask_velocity(self, positions: Tensor) -> None:
        """Clear the velocity at ``positions`` (integer indices into the flat tensor) of the
        exchange in progress: the entries that were applied on every rank (momentum factor
        masking). A no-op without momentum."""
        if self.momentum and self._vflat is not None and positions.numel():
            self._vflat.index_fill_(0, positions.long(), 0)

    def compensate(self, names: Sequence[str], numels: Sequence[int], flat: Tensor) -> Tensor:
        """Return ``flat + residual`` for a flat tensor packing ``names`` in order (a new tensor,
        float32 for half gradients).

        With momentum correction, ``flat`` (the gradient) first goes into the velocity and the
        result is ``velocity + residual``."""
        if not self.enabled:
            return flat
        _check_packing(names, numels, flat, "compensate")
        flat = flat.detach()  # (from backward(create_graph=True): the residual keeps no graph)
        if self.momentum:
            flat = self._accumulate(names, numels, flat)
        dtype = work_dtype(flat.dtype)
        if not any(n in self.residuals for n in names):
            return flat.to(dtype, copy=True)
        parts = [
            self._residual(n, k, flat).to(dtype)
            if n in self.residuals
            else torch.zeros(k, dtype=dtype, device=flat.device)
            for n, k in zip(names, numels)
        ]
        return torch.add(flat, torch.cat(parts))

    def _residual(self, name: str, numel: int, like: Tensor) -> Tensor:
        return self._stored(self.residuals, name, numel, like)

    def _stored(self, store: dict[str, Tensor], name: str, numel: int, like: Tensor) -> Tensor:
        """The residual (or velocity) of ``name``, checked against the parameter's size (a state
        loaded from another model would otherwise be broadcast into it or fail without naming
        it), on the device of ``like`` (the gradient): a state loaded with
        ``map_location="cpu"``, or a rank-0 checkpoint loaded on rank 1, is moved there once, at
        its first use."""
        res = store[name]
        if res.numel() != numel:
            what = "velocity" if store is self.velocity else "residual"
            raise ValueError(
                f"the error-feedback {what} of {name!r} has {res.numel()} elements, but the "
                f"parameter has {numel}: a state loaded from another model, or one name used "
                "for tensors of two sizes (each tensor needs a name of its own)"
            )
        if res.device != like.device:
            res = store[name] = res.to(like.device)
        return res

    def update(
        self, names: Sequence[str], numels: Sequence[int], compensated: Tensor, sent: Tensor
    ) -> None:
        """Set each parameter's residual to its slice of ``compensated - sent``."""
        if not self.enabled:
            return
        _check_packing(names, numels, compensated, "update")
        if not isinstance(sent, Tensor) or sent.numel() != compensated.numel():
            raise ValueError(
                "update: sent must be a tensor of as many elements as compensated "
                f"({compensated.numel()}, what this rank sent of it, decoded), got "
                f"{tuple(sent.shape) if isinstance(sent, Tensor) else type(sent).__name__}"
            )
        compensated, sent = compensated.detach(), sent.detach()
        # (sent may be wider than the compensated gradient, whose dtype the residual keeps)
        residual = (compensated - sent.reshape(compensated.shape)).to(compensated.dtype)
        for n, part in zip(names, torch.split(residual, list(numels))):
            self.residuals[n] = part

    # ---- the allocation-free path for sparse payloads ------------------------------------------
    def reserve(
        self,
        key: str,
        names: Sequence[str],
        numel: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        """Allocate (and fill with zeros) the buffers :meth:`compensate_into` will use for
        ``key``, a layout of ``numel`` elements: memory is taken when the caller is built (as
        DDP takes its buckets) rather than in the first steps. Changes no value."""
        if self.enabled:
            self._buffers_for(
                key, names, numel, work_dtype(dtype), torch.device(device), torch.zeros
            )

    def _buffers_for(
        self,
        key: str,
        names: Sequence[str],
        total: int,
        dtype: torch.dtype,
        device: torch.device,
        make: Callable[..., Tensor],
    ) -> list[Tensor]:
        """The two buffers of ``key``, made with ``make`` when missing or of another size,
        dtype or device."""
        bufs = self._buffers.get(key)
        if (
            bufs is None
            or bufs[0].numel() != total
            or bufs[0].dtype != dtype
            or bufs[0].device != device
        ):
            # A new layout (DDP rebuilt its buckets): forget buffers of keys sharing a name
            # (by the names themselves: a name may hold the keys' separator).
            mine = frozenset(names)
            stale = [k for k in self._buffers if self._buffer_names.get(k, mine) & mine]
            for k in stale:
                del self._buffers[k]
                self._next.pop(k, None)
                self._vbuffers.pop(k, None)
                self._buffer_names.pop(k, None)
            bufs = [make(total, dtype=dtype, device=device) for _ in range(2)]
            self._buffers[key], self._next[key] = bufs, 0
            self._buffer_names[key] = mine
            if self.momentum:
                self._vbuffers[key] = [make(total, dtype=dtype, device=device) for _ in range(2)]
        return bufs

    def compensate_into(
        self,
        key: str,
        names: Sequence[str],
        numels: Sequence[int],
        parts: Sequence[Tensor],
        each_chunk: Callable[[int, int, Tensor, Tensor], None] | None = None,
        chunk: int = 1 << 18,
    ) -> Tensor:
        """Return ``cat(parts) + residual`` (the same values as :meth:`compensate`), written in
        one pass into a buffer kept for ``key`` (float32 for half gradients); ``parts`` are the
        gradients of ``names``, in that order, from anywhere (for example slices of a DDP
        bucket in another order).

        With ``each_chunk``, the sum is written ``chunk`` elements at a time (never across two
        parameters) and ``each_chunk(j, offset, written, source)`` is called on each piece
        right after it is written, while it is still in cache: ``j`` is the parameter's position
        in ``names``, ``offset`` the piece's position in the result, ``source`` the gradient
        piece it came from. A caller that reads the whole result anyway (a selection, a
        finiteness check) or clears the gradient saves a pass over memory. Nothing is
        committed: the residuals stay as they are until :meth:`commit_sparse`.
        """
        if each_chunk is not None and self.momentum:
            raise ValueError("compensate_into: each_chunk is not supported with momentum")
        like = parts[0]
        dtype = work_dtype(like.dtype)
        bufs = self._buffers_for(key, names, sum(numels), dtype, like.device, torch.empty)
        turn = self._next.get(key, 0)
        out = bufs[turn]
        if self.momentum:
            # The new velocities, momentum * u + grad, go into this step's velocity buffer
            # (the old ones stay in the other, for rollback); they are what is compensated.
            vout = self._vbuffers[key][turn]
            for n, k, part, vdst in zip(names, numels, parts, torch.split(vout, list(numels))):
                if n in self.velocity:
                    old = self._stored(self.velocity, n, k, vout).to(vout.dtype)
                    torch.add(part.reshape(-1), old, alpha=self.momentum, out=vdst)
                else:
                    vdst.copy_(part.reshape(-1))
                self.velocity[n] = vdst
            self._vflat = vout
            parts = torch.split(vout, list(numels))
        offset = 0
        for j, (n, k, part, dst) in enumerate(
            zip(names, numels, parts, torch.split(out, list(numels)))
        ):
            res = self._residual(n, k, out) if self.enabled and n in self.residuals else None
            src = part.reshape(-1)
            if res is not None:
                res = res.to(out.dtype)
            step = max(k if each_chunk is None else chunk, 1)
            for a in range(0, k, step):
                b = min(a + step, k)
                if res is None:
                    dst[a:b].copy_(src[a:b])
                else:
                    torch.add(src[a:b], res[a:b], out=dst[a:b])
                if each_chunk is not None:
                    each_chunk(j, offset + a, dst[a:b], src[a:b])
            offset += k
        return out

    def compensate_select_into(
        self,
        key: str,
        names: Sequence[str],
        numels: Sequence[int],
        parts: Sequence[Tensor],
        threshold: float,
        hits: Tensor,
        values: Tensor | None = None,
    ) -> tuple[Tensor, int, list[bool]] | None:
        """:meth:`compensate_into`'s result, with the gradients ``parts`` cleared and the
        positions of the entries above ``threshold`` (``|x| > threshold`` or NaN: what the
        threshold compressor selects) written to ``hits`` in ascending order (and their values
        to ``values``, when given), in one pass over memory by sparsetrain's native kernel
        (:mod:`sparsetrain._native`).

        Returns ``(compensated, count, nonfinite)``: ``count`` may exceed ``hits.numel()``
        (only the first ``hits.numel()`` positions are written), ``nonfinite[j]`` says whether
        ``parts[j]`` held a NaN or an infinity. Returns None, having changed nothing, when the
        kernel cannot do it: unavailable or turned off, momentum, or parts that are not
        contiguous CPU float32/float64 tensors of one dtype.
        """
        like = parts[0]
        if (
            self.momentum
            or not _native.supports(like)
            or any(p.dtype != like.dtype or not p.is_contiguous() for p in parts)
            or any(p.device != like.device for p in parts)
            or (values is not None and values.dtype != like.dtype)
            or _native.library() is None
        ):
            return None
        bufs = self._buffers_for(key, names, sum(numels), like.dtype, like.device, torch.empty)
        out = bufs[self._next.get(key, 0)]
        residuals: list[Tensor | None] = [None] * len(parts)
        if self.enabled:
            stored = self.residuals
            for j, (n, k) in enumerate(zip(names, numels)):
                if n in stored:
                    res = self._residual(n, k, out)
                    if res.dtype != out.dtype or not res.is_contiguous():
                        res = res.to(out.dtype).contiguous()
                    residuals[j] = res
        # One call for the bucket: the checks once, not once a parameter.
        count, nonfinite = _native.compensate_select_parts(
            [p.view(-1) for p in parts], residuals, out, threshold, hits, values=values
        )
        return out, count, nonfinite

    def commit_sparse(
        self,
        key: str,
        names: Sequence[str],
        numels: Sequence[int],
        compensated: Tensor,
        indices: Tensor,
        values: Tensor,
    ) -> None:
        """Make the residuals ``compensated - sent``, where ``sent`` is ``values`` at the unique
        ``indices`` and zero elsewhere: ``compensated`` (from :meth:`compensate_into`) is
        updated in place at those indices and becomes the residuals' storage, so the cost is in
        the sent entries, not the length."""
        if not self.enabled:
            return
        compensated.index_add_(0, indices, values.to(compensated.dtype), alpha=-1)
        for n, part in zip(names, torch.split(compensated, list(numels))):
            self.residuals[n] = part
        self._next[key] = 1 - self._next.get(key, 0)

    def add_back_sparse(self, compensated: Tensor, indices: Tensor, values: Tensor) -> None:
        """Add ``values`` at ``indices`` to the residuals committed from ``compensated``
        (values a global selection dropped after they left this rank)."""
        if self.enabled and indices.numel():
            compensated.index_add_(0, indices, values.to(compensated.dtype))

    def add_back(self, names: Sequence[str], numels: Sequence[int], unsent: Tensor) -> None:
        """Add ``unsent`` (flat, packing ``names``) to the residuals, e.g. values that a global
        selection dropped after they left this rank."""
        if not self.enabled:
            return
        _check_packing(names, numels, unsent, "add_back")
        unsent = unsent.detach()
        for n, k, part in zip(names, numels, torch.split(unsent, list(numels))):
            if n in self.residuals:
                self.residuals[n] = self._residual(n, k, part) + part
            else:
                self.residuals[n] = part.clone()

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "enabled": self.enabled,
            "residuals": {n: r.clone() for n, r in self.residuals.items()},
        }
        if self.momentum:
            sd["momentum"] = self.momentum
            sd["velocity"] = {n: u.clone() for n, u in self.velocity.items()}
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        # (a state saved before half gradients' residuals were kept in float32 is widened)
        self.residuals = {
            n: r.to(work_dtype(r.dtype), copy=True) for n, r in state["residuals"].items()
        }
        self.velocity = {
            n: u.to(work_dtype(u.dtype), copy=True) for n, u in state.get("velocity", {}).items()
        }
        self._vflat = None
        self.mark()

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise what :meth:`load_state_dict` would refuse in ``state``; change nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(
                "error-feedback state must be the dict ErrorFeedback.state_dict() returned, got "
                f"{type(state).__name__}"
            )
        if "residuals" not in state:
            raise ValueError("error-feedback state must have a 'residuals' entry")
        for entry in ("residuals", "velocity"):
            value = state.get(entry, {})
            if not isinstance(value, Mapping) or not all(
                isinstance(t, Tensor) and t.dim() == 1 for t in value.values()
            ):
                raise ValueError(
                    f"error-feedback state's {entry!r} must be a dict of name -> 1-D tensor "
                    "(each parameter's flattened residual)"
                )
            odd = [
                f"{n!r} ({t.dtype} on {t.device})"
                for n, t in value.items()
                if not t.is_floating_point() or t.is_complex() or t.is_meta
            ]
            if odd:
                raise ValueError(
                    f"error-feedback state's {entry!r} must hold real floating-point tensors "
                    f"with values, got {', '.join(odd[:5])}{' and more' if len(odd) > 5 else ''}"
                )
            # A residual is added to every later gradient: one NaN would end the run (or, with
            # on_nonfinite="skip", skip every step without a word).
            bad = [n for n, t in value.items() if not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(
                    f"error-feedback state's {entry!r} of {', '.join(map(repr, bad[:5]))}"
                    f"{' and more' if len(bad) > 5 else ''} hold NaN or Inf: it was saved from "
                    "a run that had already diverged; load an earlier state"
                )
        saved = state.get("enabled", self.enabled)
        if not isinstance(saved, bool):
            raise ValueError(
                f"error-feedback state's 'enabled' must be True or False, got {saved!r:.60}"
            )
        if saved != self.enabled:
            on = {True: "on", False: "off"}
            raise ValueError(
                f"this state was saved with error feedback {on[saved]}, but this sync has it "
                f"{on[self.enabled]}; build it with error_feedback={saved} to resume"
            )
        momentum = float(state.get("momentum", 0.0))
        if momentum != self.momentum:
            raise ValueError(
                f"this state was saved with momentum_correction={momentum}, but this sync has "
                f"momentum_correction={self.momentum}; build it with the same value to resume"
            )

    def stats(self) -> dict[str, float]:
        sq = sum(float(r.double().pow(2).sum()) for r in self.residuals.values())
        return {"residual_norm": sq**0.5, "residual_tensors": len(self.residuals)}
