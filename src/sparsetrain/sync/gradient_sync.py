"""Gradient synchronisation for training loops that do not use DDP."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._options import plain
from .config import (
    check_consistent,
    check_dense_gradients,
    check_process_group,
    make_config,
    refuse_everywhere,
    with_grad_scaler,
)
from .devices import cuda_device_of
from .engine import SyncEngine, check_state_fits, describe

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# GradientSync's own arguments, besides the SyncConfig fields and the compressor's options.
_SYNC_ARGUMENTS = ("compressor", "density", "process_group", "bucket_cap_mb", "grad_scaler")


_registered = [0]  # parameters and submodules set on any module of this process
_watching: list[Any] = []


def _registrations() -> int | None:
    """How many parameters and submodules were set on modules of this process since the first
    call, counted by torch's global registration hooks, so that GradientSync looks for new
    parameters only after one was set, not by walking the model every step; None where this
    torch lacks those hooks (the model is then walked every step)."""
    if not _watching:
        hooks = torch.nn.modules.module
        param = getattr(hooks, "register_module_parameter_registration_hook", None)
        module = getattr(hooks, "register_module_module_registration_hook", None)
        if param is None or module is None:
            _watching.append(None)
        else:

            def count(*_: Any) -> None:
                _registered[0] += 1

            _watching.extend([param(count), module(count)])
    return None if _watching[0] is None else _registered[0]


# Models a GradientSync was built for, whose forward checks that no plain DDP averages them too.
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _refuse_plain_ddp(module: nn.Module, args: Any) -> None:
    """A forward pre-hook: refuse, in the forward (every rank runs it, so every rank raises),
    a model of a live GradientSync that runs inside the forward of a DistributedDataParallel
    without its hook (one with it was refused when either was made) over the same ranks,
    which averages the gradients in backward before GradientSync exchanges them again: twice
    the traffic, and the compression's error feedback on gradients already averaged. Under
    ``no_sync()`` DDP averages nothing, and over other ranks (DDP within a node, GradientSync
    across nodes) the two average different things: both are let be. A module-level
    function, so the model still pickles; once its GradientSync is gone, it does nothing."""
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None or not ddp.require_backward_grad_sync:
        return
    from .ddp_hook import _synced_overlap

    ranks = sorted(dist.get_process_group_ranks(ddp.process_group))
    if _synced_overlap(
        ddp.module,
        lambda s: sorted(dist.get_process_group_ranks(s.engine.group or dist.group.WORLD)) == ranks,
    ):
        raise RuntimeError(
            "GradientSync: this model runs in the forward of a DistributedDataParallel over "
            "the same ranks, which averages its gradients in backward; GradientSync would "
            "exchange them a second time. Use sparsetrain.register_ddp_hook(ddp_model, ...) on "
            "the DDP model instead of GradientSync, or train the module without DDP"
        )


def _refuse_ddp_children(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Refuse a model holding a DistributedDataParallel (of a layer) over ``group``'s ranks,
    which averages that layer's gradients in backward before GradientSync exchanges them
    again. Its forward runs inside the model's, where :func:`_refuse_plain_ddp` cannot see
    it. One over other ranks (within a node, GradientSync across nodes) is let be."""
    children = [
        (name, sub)
        for name, sub in model.named_modules()
        if sub is not model and isinstance(sub, DistributedDataParallel)
    ]
    if not children:
        return
    ranks = sorted(dist.get_process_group_ranks(group or dist.group.WORLD))
    for name, sub in children:
        if sorted(dist.get_process_group_ranks(sub.process_group)) == ranks:
            raise ValueError(
                f"GradientSync: the model's module {name!r} is a DistributedDataParallel over "
                "the same ranks, which averages its gradients in backward; GradientSync would "
                f"exchange them a second time. Pass its module ({name}.module) unwrapped, or "
                "wrap the whole model in DDP and use sparsetrain.register_ddp_hook"
            )


class GradientSync:
    """Average a model's gradients across ranks through a compressor, in place.

    Call :meth:`synchronize` after ``backward()`` and before ``optimizer.step()``. Parameters are
    grouped into buckets of about ``bucket_cap_mb`` (in reverse registration order, as DDP does;
    a new one starts where the dtype or device changes, so a model spread over devices works),
    each exchanged with the same engine as the DDP hook. With a sparse compressor and collective
    the exchange reads and writes the ``.grad`` tensors where they are, so no gradient is copied
    into a bucket and back (DDP copies each fresh gradient into its bucket). A parameter without a
    gradient is
    exchanged as zeros and gets a zero gradient (an optimizer with weight decay then still moves
    it); DDP with ``find_unused_parameters=True`` leaves such parameters alone. A parameter
    frozen after GradientSync was built (``requires_grad=False``) is left alone: its gradient
    stays as it is (None stays None), its residual is dropped, and zeros take its place in the
    exchange, so the ranks' buckets still match. Every rank must freeze the same parameters at
    the same step: a parameter frozen on some ranks only raises a ``RuntimeError`` on every
    rank, naming it and the ranks (checked in the one small allreduce a bucket that agrees on
    finiteness). Parameters frozen before GradientSync was built are in no bucket: unfrozen
    later, every step is refused on every rank while they train (their gradients would not be
    exchanged), so build GradientSync with every parameter that will train unfrozen and freeze
    afterwards, or build it again after unfreezing. A state records its buckets:
    a GradientSync with others (another ``bucket_cap_mb``, or built after freezing where the
    saved run froze later) refuses it unless ``strict=False``.

    Unlike DDP, GradientSync neither broadcasts the initial weights nor the buffers (BatchNorm's
    running statistics): build the model identically on every rank (or broadcast it), and
    keep buffers in step where they matter.

    Args:
        model: the model whose ``.grad`` fields are synchronised (identical on every rank), not
            wrapped in ``DistributedDataParallel`` (for a DDP model use
            :func:`sparsetrain.register_ddp_hook`).
        compressor, density, **options: as for :func:`sparsetrain.register_ddp_hook`.
        process_group: the group (default: WORLD).
        bucket_cap_mb: bucket size in MiB.
        grad_scaler: as for :func:`sparsetrain.register_ddp_hook`: with a
            ``torch.amp.GradScaler``, a step that overflowed on some rank leaves every gradient
            NaN, for ``scaler.step`` to skip (call it whatever :meth:`synchronize` returns).

    Example:
        >>> sync = GradientSync(model, "topk", density=0.01)  # doctest: +SKIP
        >>> loss.backward()  # doctest: +SKIP
        >>> if sync.synchronize():  # doctest: +SKIP
        ...     optimizer.step()

        With float16 mixed precision (``GradientSync(..., grad_scaler=scaler)``):

        >>> scaler.scale(loss).backward()  # doctest: +SKIP
        >>> sync.synchronize()  # before any scaler.unscale_(optimizer): residuals are scaled  # doctest: +SKIP
        >>> scaler.step(optimizer)  # skips a step that overflowed on any rank  # doctest: +SKIP
        >>> scaler.update()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: str = "threshold",
        density: float | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        grad_scaler: torch.amp.GradScaler | None = None,
        **options: Any,
    ):
        try:
            check_process_group(process_group)
        except TypeError as e:
            # No group at all: told over the default one, which every rank shares, so that the
            # others (given None, the usual case) raise too instead of waiting for this rank.
            refuse_everywhere(e, None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"GradientSync needs the model as a torch.nn.Module, got {type(model).__name__}"
            )
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # Frozen now, so in no bucket: a state may still hold their residuals (saved by a run
        # that froze them after building), and unfrozen they would not be exchanged.
        self._left_out = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        self._sizes = {n: p.numel() for n, p in model.named_parameters()}
        self._model = model
        self._built_with = {id(p) for p in model.parameters()}
        self._registrations = _registrations()  # parameters and modules made in this process
        self._superseded = False
        self._written: list[tuple[int, int] | None] | None = None  # (see _unchanged_since_last)
        # Each trained parameter's dtype and device: a bucket is one tensor of one kind.
        self._kinds = {n: (p.dtype, p.device) for n, p in self.params}
        device = cuda_device_of(p for _, p in self.params)
        try:  # a rank's bad options: every rank gets an error (check_consistent's gather)
            if isinstance(model, DistributedDataParallel):
                raise TypeError(
                    "GradientSync needs a model that is not wrapped in DistributedDataParallel: "
                    "DDP already averages the gradients in backward, and GradientSync would "
                    "exchange them again. For a DDP model use sparsetrain.register_ddp_hook(model, "
                    "...); or pass the unwrapped module (model.module) to GradientSync without DDP"
                )
            _refuse_ddp_children(model, process_group)
            from .ddp_hook import HOOKED_MODULES, overlap

            how = overlap(model, list(HOOKED_MODULES))  # (a layer of one, or one holding it)
            if how is not None:
                raise ValueError(
                    f"GradientSync: this model {how} the module of a DDP model that has "
                    "sparsetrain's hook, which already exchanges its gradients in backward; "
                    "GradientSync would exchange them again. Use one of the two"
                )
            bucket_cap_mb = plain(bucket_cap_mb)  # (np.float32(1.0) was refused as no number)
            if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
                raise TypeError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
            if not 0 < bucket_cap_mb < math.inf:
                raise ValueError(
                    f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}"
                )
            options, grad_scaler = with_grad_scaler(grad_scaler, options)  # None if disabled
            self.config = make_config(
                compressor, density, options, caller="GradientSync", own=_SYNC_ARGUMENTS
            )
            check_dense_gradients(model)
            for n, p in self.params:
                if p.dtype not in _FLOATS:
                    raise TypeError(
                        f"parameter {n!r} has dtype {p.dtype}; gradients must be floating point"
                    )
        except (TypeError, ValueError) as e:
            refuse_everywhere(e, process_group, device)
        layout = [(n, tuple(p.shape), str(p.dtype)) for n, p in self.params]
        # Buckets decide which collectives run: ranks with other sizes would not pair up.
        extra = {"bucket_cap_mb": bucket_cap_mb, "grad_scaler": grad_scaler is not None}
        check_consistent(self.config, layout, process_group, extra, device=device)
        self.engine = SyncEngine(self.config, process_group, grad_scaler)
        self.buckets = self._make_buckets(bucket_cap_mb * 2**20)
        # Each bucket's names and shapes, as every step passes them.
        self._layouts = [([n for n, _ in b], [p.shape for _, p in b]) for b in self.buckets]
        # Parameters frozen since: the zeros that stand in for their gradients.
        self._frozen_since: dict[str, torch.Tensor] = {}
        for bucket in self.buckets:
            self.engine.reserve(
                [n for n, _ in bucket], [p.shape for _, p in bucket], bucket[0][1].dtype,
                bucket[0][1].device,
            )  # fmt: skip
        from .ddp_hook import SYNCS

        # A GradientSync built before over any of these parameters is superseded: both would
        # exchange them every step (the second one averaging what the first averaged).
        mine = {id(p) for _, p in self.params}
        for other in list(SYNCS):
            if other is not self and mine & {id(p) for _, p in other.params}:
                other._superseded = True
        SYNCS.add(self)  # register_ddp_hook refuses this model while this object lives
        # (One hook a model, however many syncs it has had; a TorchScript module takes no
        # hooks, and goes unchecked.)
        if model not in _WATCHED and not isinstance(model, torch.jit.ScriptModule):
            model.register_forward_pre_hook(_refuse_plain_ddp)
            _WATCHED.add(model)

    def __repr__(self) -> str:
        engine = self.engine
        return (
            f"GradientSync({describe(engine.config, engine.compressor)}, "
            f"buckets={len(self.buckets)}, step={engine.step})"
        )

    def _make_buckets(self, cap_bytes: float) -> list[list[tuple[str, nn.Parameter]]]:
        buckets: list[list[tuple[str, nn.Parameter]]] = []
        size = 0.0
        for n, p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            first = buckets[-1][0][1] if buckets else None
            new = (  # a bucket is exchanged as one tensor: of one dtype, on one device
                first is None
                or size + nbytes > cap_bytes
                or (first.dtype, first.device) != (p.dtype, p.device)
            )
            if new:
                buckets.append([])
                size = 0.0
            buckets[-1].append((n, p))
            size += nbytes
        return buckets

    def synchronize(self) -> bool:
        """Replace every gradient by the compressed average over ranks.

        Gradients that require grad (from ``backward(create_graph=True)``) are exchanged as
        values: each is replaced by a detached tensor, as the optimizer uses them.

        Returns:
            False when the step was dropped because some rank had NaN/Inf: with
            ``on_nonfinite="skip"`` the gradients are then zero and the caller should not step
            the optimizer; with ``"propagate"`` (a ``grad_scaler``) they are all NaN, which
            ``scaler.step`` skips.

        A second call with no backward since the last (no gradient changed) is refused on every
        rank with a ``ValueError``: it would average the averaged gradients again.
        """
        if self._superseded:  # (every rank built both, in the same order: every rank raises)
            raise RuntimeError(
                "GradientSync: a newer GradientSync was built over this model's parameters; "
                "this one would exchange their gradients a second time: synchronize() the new "
                "one only (the old one's state_dict() still reads)"
            )
        moved = [n for n, p in self.params if (p.dtype, p.device) != self._kinds[n]]
        if moved:
            n = moved[0]
            p = dict(self.params)[n]
            message = (
                f"GradientSync: parameter(s) {', '.join(moved[:5])}"
                f"{' ...' if len(moved) > 5 else ''} changed dtype or device since it was built "
                f"({n}: {self._kinds[n][0]} on {self._kinds[n][1]}, now {p.dtype} on "
                f"{p.device}); its buckets were sized and typed for the old ones: build "
                "GradientSync after model.to(...)"
            )
            self._refuse(message)
        if self._unchanged_since_last():
            message = (
                "GradientSync: synchronize() was called again with no backward since its last "
                "call: it would compress and average the gradients it wrote (already averaged) "
                "a second time, and count what error feedback kept twice; call it once a step, "
                "after backward"
            )
            self._refuse(message)
        self._written = None
        unfrozen = [n for n, p in self._left_out if p.requires_grad]
        if unfrozen:  # only those still in the model (a frozen teacher taken out trains alone)
            present = {id(p) for p in self._model.parameters()}
            self._left_out = [(n, p) for n, p in self._left_out if id(p) in present]
            unfrozen = [n for n, p in self._left_out if p.requires_grad]
        now = _registrations()
        if (now is None or now != self._registrations or unfrozen) and self._in_buckets(unfrozen):
            self._registrations = now  # (a refused model is looked at again at every call)
        try:
            for bucket, (names, shapes) in zip(self.buckets, self._layouts):
                grads = []
                for n, p in bucket:
                    if not p.requires_grad:
                        grads.append(self._frozen(n, p))
                        continue
                    self._frozen_since.pop(n, None)
                    # The exchange writes into the gradients themselves, so each must be one
                    # dense block: a missing one becomes zeros, a strided one a contiguous copy.
                    if p.grad is None:
                        p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    elif p.grad.requires_grad:  # backward(create_graph=True): their values
                        p.grad = p.grad.detach()  # are exchanged, not the graph behind them
                    if p.grad.layout != torch.strided:
                        # A sparse embedding tied to a dense layer, on a step that used only
                        # the embedding (or a layer of the model's own making sparse ones):
                        # raising here, on this rank alone, would leave the others waiting.
                        p.grad = p.grad.to_dense()
                    elif not p.grad.is_contiguous():
                        p.grad = p.grad.contiguous()
                    grads.append(p.grad.view(-1))
                self.engine.exchange_into(
                    grads, names, shapes, frozen=[not p.requires_grad for _, p in bucket]
                )
        finally:
            self.engine.end_step()
        if self.engine.skipped_last_step:
            if self.config.on_nonfinite != "propagate":  # (else the engine made them all NaN)
                # Buckets exchanged before the one that held NaN/Inf were averaged: zero them.
                for _, p in self.params:
                    if p.grad is not None and p.requires_grad:
                        p.grad.zero_()
        self._written = self._grad_versions()
        return not self.engine.skipped_last_step

    def _refuse(self, message: str) -> None:
        """Refuse this step with ``ValueError(message)``: here at once where no other rank
        waits (one rank, or no buckets: no message would carry it), else on every rank in the
        step's first exchange (:meth:`SyncEngine.refuse_step`)."""
        if self.engine.world == 1 or not self.buckets:
            raise ValueError(message)
        self.engine.refuse_step(message)

    def _grad_versions(self) -> list[tuple[int, int] | None]:
        """Each trained parameter's gradient as (identity, in-place version counter)."""
        return [
            None if p.grad is None or not p.requires_grad else (id(p.grad), p.grad._version)
            for _, p in self.params
        ]

    def _unchanged_since_last(self) -> bool:
        """Whether no gradient changed since the last :meth:`synchronize` wrote them: backward
        makes new gradients or adds into them (either changes this), as do ``zero_grad()``
        and any in-place change of the user's (clipping)."""
        return (
            self._written is not None
            and any(v is not None for v in self._written)
            and self._grad_versions() == self._written
        )

    def _in_buckets(self, unfrozen: list[str]) -> bool:
        """Return True, or refuse the step, naming them, if the model holds trainable
        parameters that no bucket holds: ones GradientSync was not built with (a layer replaced
        or added since), and ``unfrozen``, frozen when it was built (or when added) and
        trainable now. Their gradients would not be exchanged, so each rank's copy would drift
        apart. The refusal travels with the step's first message, so every rank raises, not
        this one alone while the others wait. New frozen parameters are left alone, as those
        frozen at build."""
        new = [(n, p) for n, p in self._model.named_parameters() if id(p) not in self._built_with]
        self._built_with.update(id(p) for _, p in new if not p.requires_grad)
        self._left_out.extend((n, p) for n, p in new if not p.requires_grad)
        trained = [n for n, p in new if p.requires_grad]
        if not trained and not unfrozen:
            return True
        parts = []
        if trained:
            parts.append(
                f"parameter(s) {', '.join(trained)} are not those it was built with (a layer "
                "replaced or added since)"
            )
        if unfrozen:
            parts.append(
                f"parameter(s) {', '.join(unfrozen)} were frozen when it was built (or added) "
                "and are trainable now"
            )
        message = (
            f"GradientSync: {'; '.join(parts)}, so no bucket holds them and their gradients "
            "would not be exchanged: build GradientSync again after changing the model or "
            "unfreezing (new.load_state_dict(old.state_dict(), strict=False) keeps the "
            "residuals), or build it while every parameter that will train is trainable: "
            "parameters frozen after it was built are left alone"
        )
        self._refuse(message)
        return False

    def _frozen(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """The zeros that stand in the exchange for a parameter frozen since GradientSync was
        built (the exchange writes into them, so they are zeroed each step). Its residual and
        velocity are dropped when it is first seen frozen: they would otherwise still be sent,
        and the result would move a frozen weight."""
        buf = self._frozen_since.get(name)
        if buf is None:
            buf = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
            self._frozen_since[name] = buf
            self.engine.feedback.clear(
                name, torch.ones(param.numel(), dtype=torch.bool, device=param.device)
            )
        else:
            buf.zero_()
        return buf

    def clear_residuals(self, where: Mapping[Any, torch.Tensor]) -> None:
        """As :meth:`sparsetrain.SyncState.clear_residuals`: zero the residuals (and
        velocities) of the parameters in ``where`` where their bool tensor is True."""
        names = {id(p): n for n, p in self.params}
        for p, pruned in where.items():
            name = names.get(id(p))
            if name is not None:
                self.engine.feedback.clear(name, pruned)

    @property
    def skipped_last_step(self) -> bool:
        return self.engine.skipped_last_step

    def stats(self) -> dict[str, Any]:
        """Bytes sent by this rank so far, dense-equivalent bytes, seconds in compression and
        communication (host wall time: on CUDA, launches and syncs, not kernel time), steps and
        skipped steps; see :meth:`SyncEngine.stats`."""
        return self.engine.stats()

    def state_dict(self) -> dict[str, Any]:
        """The engine's state: residuals, compressor and collective state, counters, and the
        configuration it was saved under; and the parameters of each bucket (``"buckets"``)."""
        return {**self.engine.state_dict(), "buckets": self._bucket_names()}

    def _bucket_names(self) -> list[list[str]]:
        return [list(names) for names, _ in self._layouts]

    def _check_buckets(self, saved: Any) -> None:
        """Refuse a state saved with other buckets: what is kept per bucket (a threshold,
        PowerSGD's Q, Ok-Topk's edges) would not carry over, and the resumed run would select
        from other groups of parameters than the first run did."""
        if not (
            isinstance(saved, list)
            and all(isinstance(b, list) and all(isinstance(n, str) for n in b) for b in saved)
        ):
            raise ValueError(
                f"GradientSync: the state's 'buckets' must be a list of lists of parameter "
                f"names (as state_dict() returns it), got {type(saved).__name__}"
            )
        mine = self._bucket_names()
        had, have = {n for b in saved for n in b}, {n for b in mine for n in b}
        if saved == mine or not had <= set(self._sizes):
            return  # (parameters this model does not have: the engine's check names them)
        if had != have:
            why = "other trained parameters, another model's or other ones frozen: " + "; ".join(
                f"{what} {', '.join(sorted(names))}"
                for what, names in (("saved with", had - have), ("now with", have - had))
                if names
            )
        else:
            why = f"{len(saved)} bucket(s) saved against {len(mine)} now: another bucket_cap_mb?"
        raise ValueError(
            f"GradientSync: this state was saved with other buckets of parameters ({why}); "
            "the resumed run would compress other groups than the first one did. Build "
            "GradientSync as the saved run did, or pass strict=False to take the state (the "
            "residuals by parameter; what is kept per bucket starts afresh)"
        )

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned. A state saved under other settings
        (another compressor, density, collective, ...) is refused, naming them;
        ``on_nonfinite`` may differ. Each rank must load the state it saved, from a run of as
        many ranks, or the one :func:`sparsetrain.reshard_state` built for it from a run of
        another number: the next step raises on every rank if not. ``strict=False`` takes a state
        saved under another density, collective and so on (not another compressor), or by
        another rank or number of ranks, as ``torch.nn.Module.load_state_dict`` takes one with
        other keys. With ``strict``, a state saved by the DDP hook, with other buckets or of
        another model (other parameters, sizes or dtypes) is refused too, naming the
        difference."""
        dtypes = {n: p.dtype for n, p in self._model.named_parameters()}
        if strict and isinstance(state, Mapping):
            if "ddp_groups" in state and "buckets" not in state:
                raise ValueError(
                    "GradientSync: this state was saved by the DDP hook (register_ddp_hook), "
                    "whose groups of parameters are DDP's buckets, not GradientSync's: load it "
                    "into the hook of a DDP model built as the saved one was, or pass "
                    "strict=False to take its residuals by parameter (what is kept per bucket "
                    "then starts afresh)"
                )
            if state.get("buckets") is not None:
                # Another model's state first: its other buckets follow from that.
                check_state_fits(state, self._sizes, "GradientSync", dtypes)
                self._check_buckets(state["buckets"])
        self.engine.load_state_dict(
            state, owner="GradientSync", strict=strict, sizes=self._sizes, dtypes=dtypes
        )
