"""The pruner lifecycle shared by every method, and the registry of pruners by name.

Lifecycle::

    pruner = get_pruner("magnitude", sparsity=0.9, schedule=Gradual(end=2000, frequency=100))
    pruner.prepare(model, optimizer)          # pick the weights, install gradient masks
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        pruner.step(step)                     # prune when the schedule says, re-apply masks
    pruner.finalize()                         # masks baked into the weights, hooks removed

Masks hold: after every optimizer step the pruned weights are set back to zero and the
optimizer's per-weight state (momentum, Adam moments) is zeroed there, so neither momentum nor
weight decay can revive them; a gradient hook also zeroes their gradients before DDP or a
compression hook sees them, so compressed gradients spend nothing on pruned weights.

Identical masks under DDP: masks are computed from weights, which DDP keeps identical, from data
gathered or averaged over the process group (WoodFisher, RigL), and broadcast from rank 0 after
every change, so every rank holds the same bits. Masks are kept in a dict keyed by parameter
name, not as module buffers: DDP would otherwise broadcast them every forward and the model's
own ``state_dict`` would change keys. Save them with ``pruner.state_dict()`` next to the model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._options import caller_stacklevel, check_options, is_integer, plain
from .masks import Masks, check_scope, check_sparsity
from .metrics import not_in_model
from .schedules import OneShot, Schedule, get_schedule

Closure = Callable[[], Tensor]


def closure_loss(closure: Closure, who: str) -> Tensor:
    """Call ``closure`` (``who``'s ``closure=``) and return its loss, refusing, with an error
    naming ``closure``, what backward() would fail on or make all zero: not a tensor, not one
    number, or independent of the model. (A loss that is not finite shows in the gradients,
    which the pruners check where every rank sees the same ones, see :func:`check_finite`.)"""
    loss = closure()
    if not isinstance(loss, Tensor):
        hint = " (return the loss itself, not loss.item())" if isinstance(loss, float) else ""
        raise TypeError(
            f"{who}: closure must return the loss as a tensor, got {type(loss).__name__}{hint}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"{who}: closure must return one number, the loss, got a tensor of shape "
            f"{tuple(loss.shape)} (the model's output? apply the loss function to it)"
        )
    if loss.grad_fn is None:
        raise ValueError(
            f"{who}: the loss closure returned does not depend on the model's parameters (it "
            "has no grad_fn), so its gradients are all zero: compute it from the model's output"
        )
    return loss.reshape(())


def check_finite(grads: Sequence[Tensor], who: str, what: str) -> None:
    """Raise if ``grads`` (``what``: gradients gathered or summed over the ranks, the same on
    every rank, so every rank raises) hold NaN or Inf, which would make the weights NaN. One
    read of the device for all of them."""
    if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        raise ValueError(
            f"{who}: {what} hold NaN or Inf (a loss from closure, or its gradients, on some "
            "rank): the pruned weights would be NaN. Nothing was pruned"
        )


_PRUNERS: dict[str, type[Pruner]] = {}


def register_pruner(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator: register a pruner class under ``name``."""

    def wrap(cls: type[Pruner]) -> type[Pruner]:
        if name in _PRUNERS and _PRUNERS[name] is not cls:
            raise ValueError(f"pruner name {name!r} is already registered by {_PRUNERS[name]}")
        cls.name = name
        _PRUNERS[name] = cls
        return cls

    return wrap


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside wrappers that prefix its parameters' names (DDP's and
    DataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``; nested too), so names
    match the plain model's and a state moves between them."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's
            model = model._orig_mod
        else:
            return model


def default_weights(model: nn.Module) -> list[str]:
    """Return the names of the parameters pruned by default: every trained weight
    (``requires_grad``) with 2 or more dims; name a frozen one in ``params`` to prune it."""
    return [
        n
        for n, p in unwrap(model).named_parameters()
        if p.dim() >= 2 and p.is_floating_point() and p.requires_grad
    ]


def _nothing_to_prune(model: nn.Module, params: list[str] | None) -> str:
    """Why no weight was selected: ``params`` empty, or by default every weight frozen or
    none with 2 or more dimensions."""
    if params is not None:
        return "no parameters to prune: params is empty (None prunes the default weights)"
    frozen = [
        n
        for n, p in unwrap(model).named_parameters()
        if p.dim() >= 2 and p.is_floating_point() and not p.requires_grad
    ]
    if frozen:
        return (
            "no parameters to prune: every weight with 2 or more dimensions is frozen "
            f"(requires_grad=False: {frozen[:5]}{' ...' if len(frozen) > 5 else ''}), and frozen "
            "ones are pruned only when named in params"
        )
    return "no parameters to prune: the model has no weight with 2 or more dimensions"


class _PrunerHook:
    """A hook of a pruner's on the model (the masks applied before a forward pass, or again
    after a load), calling ``method`` of the pruner.

    It holds the pruner weakly and pickles (and deep-copies) as a hook that does nothing: the
    model must not carry its pruner along, with the optimizer and sync it holds, into a
    ``torch.save(model)`` (whose gradient hooks cannot be pickled) or an EMA copy (which would
    then be masked by the original's pruner). A pruner copied with its model is prepared on
    the copy again.
    """

    def __init__(self, pruner: Pruner | None = None, method: str = "") -> None:
        self._pruner = weakref.ref(pruner) if pruner is not None else None
        self._method = method

    def __call__(self, *args: Any) -> None:
        pruner = self._pruner() if self._pruner is not None else None
        if pruner is not None:
            getattr(pruner, self._method)(*args)

    def __reduce__(self) -> tuple[type, tuple]:
        return (_PrunerHook, ())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_tensors(tensors: Sequence[Tensor], group: Any = None, src: int = 0) -> None:
    """Broadcast tensors of one dtype from ``src`` in place, as one flat message."""
    if not tensors or not _distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    # ``src`` is a rank of ``group``; broadcast takes it as a global rank.
    root = src if group is None else dist.get_global_rank(group, src)
    dist.broadcast(flat, src=root, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _layout(weights: Mapping[str, Tensor]) -> list[list[str]]:
    """The pruned parameters' names, shapes and dtypes, for ranks to compare."""
    return [[n, str(tuple(w.shape)), str(w.dtype)] for n, w in weights.items()]


def _digest(masks: Mapping[str, Tensor]) -> str:
    """A short hash of the masks, for ranks to compare (one copy of them to the CPU)."""
    h = hashlib.sha256()
    for n in sorted(masks):
        h.update(n.encode())
        h.update(masks[n].detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool; refuse anything else (``"no"`` would act as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


# What every state that Pruner.state_dict returns holds (besides "options", the settings it was
# saved with, which states from before they were recorded lack).
_STATE_ENTRIES = ("method", "masks", "step", "num_updates", "extra")


@dataclass
class Pruner:
    """Base class of the pruners: options as dataclass fields, state in private attributes.

    Args:
        sparsity: the final fraction of the selected weights to remove, in [0, 1).
        params: names of the parameters to prune (as in ``model.named_parameters()`` of the
            unwrapped model); None: every weight with 2 or more dimensions.
        mask_gradients: zero the gradients of pruned weights in a gradient hook.
    """

    name: ClassVar[str] = ""
    # Options a state saved under other values still loads with: they change nothing that the
    # state records or that decides which weights are pruned from here on.
    may_differ_on_load: ClassVar[tuple[str, ...]] = ("params", "mask_gradients")
    # Options ranks may set differently: the parameters pruned are compared by their layout
    # instead (names, shapes, dtypes); every other option decides a collective or the masks.
    may_differ_across_ranks: ClassVar[tuple[str, ...]] = ("params",)
    # Whether the masks prepare() draws prune weights (RigL starts sparse); those are applied at
    # the first forward pass (or step(), apply()), so that a state loaded in between loses nothing.
    defers_initial_masks: ClassVar[bool] = False
    # Whether the method reads the pruned weights' gradients (RigL grows by them, WoodFisher
    # estimates its Fisher from them): a frozen weight is then refused.
    needs_gradients: ClassVar[bool] = False

    sparsity: float = 0.5
    params: Sequence[str] | None = None
    mask_gradients: bool = True

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        check_flag("mask_gradients", self.mask_gradients)
        if self.params is not None:
            if isinstance(self.params, str) or not all(isinstance(p, str) for p in self.params):
                raise TypeError(f"params must be a list of parameter names, got {self.params!r}")
            self.params = list(self.params)
        self._masks: Masks = {}
        self._weights: dict[str, Tensor] = {}
        self._pending: dict[str, Any] | None = None
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._group: Any = None
        self._handles: list[Any] = []
        self._hooked: set[str] = set()  # the pruned weights with a gradient hook
        self._forward_handles: list[Any] = []
        self._load_handles: list[Any] = []
        self._deferred = False
        self._clear_deferred = True
        # Where the initial masks zeroed the weights, until a step or a load into the model: a
        # pruner state loaded meanwhile that keeps weights there finds them lost (warned).
        self._initial_zeroed: Masks | None = None
        self._step = -1
        self._num_updates = 0
        self._stash = False
        self._dense_grads: dict[str, Tensor] = {}
        # The first step() after prepare() or a load checks that every rank holds the same
        # options, step, counters and masks (one small gather), so ranks that differ raise
        # together instead of waiting in each other's collectives.
        self._agree = False
        self._sync: Any = None  # prepare(sync=...): the gradient sync to clear residuals in

    # ---- lifecycle -----------------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        group: Any = None,
        sync: Any = None,
    ) -> Pruner:
        """Select the weights, create the masks (all kept) and install gradient hooks.

        A state loaded before (:meth:`load_state_dict`) is restored here; if it does not fit the
        model, this raises and the pruner stays unprepared, with the state still loaded.
        Called again on the same model (plain or wrapped), it changes neither masks nor
        counters: it only re-attaches the ``optimizer`` and ``group`` given (those left out stay
        as they were) and re-installs the gradient hooks. Another model is refused.

        Args:
            model: the model, plain or wrapped in DDP.
            optimizer: its optimizer, whose per-weight state is zeroed at pruned positions.
            group: the process group masks are synchronised over (default: WORLD).
            sync: the state ``sparsetrain.register_ddp_hook`` returned, or a
                ``sparsetrain.GradientSync``, that exchanges this model's gradients: whenever
                the masks change, its error-feedback residuals at pruned weights are cleared,
                so what those weights had kept back is not sent after them (without it, a
                compressor with error feedback goes on sending it until it drains).

        Returns:
            self.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"prepare needs the model as a torch.nn.Module, got {model!r:.100}")
        syncs = "the state register_ddp_hook returned or a GradientSync goes as sync="
        # (By what it is used for: wrappers that are not Optimizer subclasses have these too.)
        if optimizer is not None and not (
            hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")
        ):
            hint = f" ({syncs})" if callable(getattr(optimizer, "clear_residuals", None)) else ""
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}{hint}"
            )
        if group is not None and not isinstance(group, dist.ProcessGroup):
            hint = f" ({syncs})" if callable(getattr(group, "clear_residuals", None)) else ""
            raise TypeError(
                "group must be a torch.distributed.ProcessGroup or None (the default group), "
                f"got {type(group).__name__} {group!r:.60}{hint}"
            )
        module = unwrap(model)
        if sync is not None and not callable(getattr(sync, "clear_residuals", None)):
            raise TypeError(
                "sync must be the state sparsetrain.register_ddp_hook returned or a "
                f"sparsetrain.GradientSync, got {type(sync).__name__}"
            )
        if self._model is not None:
            return self._reattach(module, optimizer, group, sync)
        pending = self._pending
        weights: dict[str, Tensor] = {}
        problem: Exception | None = None
        try:
            weights = self._select(module)
            if pending is not None:  # checked before anything changes: a misfit leaves us
                _check_masks(pending["masks"], weights, "the state loaded before prepare()")
        except (TypeError, ValueError) as e:
            problem = e
        # Every rank's refusal, options, parameters and loaded state are compared before the
        # first collective (the masks' broadcast): ranks that differ raise together.
        self._agree_across_ranks(
            group,
            {
                "error": None if problem is None else f"{type(problem).__name__}: {problem}",
                "layout": _layout(weights),
                "state": None
                if pending is None
                else {
                    "step": pending["step"],
                    "num_updates": pending["num_updates"],
                    "masks": _digest(pending["masks"]),
                },
            },
            next(iter(weights.values())).device if weights else None,
        )
        if problem is not None:
            raise problem
        self._model, self._optimizer, self._group = module, optimizer, group
        self._sync = sync
        self._weights = weights
        self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in weights.items()}
        try:
            self.on_prepare()
            if pending is not None:
                self._pending = None
                self._assign_state(pending)
            self._install_hooks()
        except BaseException:
            self._model = self._optimizer = self._group = self._sync = None
            self._weights, self._masks, self._pending = {}, {}, pending
            raise
        if pending is None and self.defers_initial_masks:
            self._defer_initial_masks()
        else:
            self._apply()
        self._agree = True
        return self

    def _select(self, module: nn.Module) -> dict[str, Tensor]:
        """The weights to prune, by name; refuses names the model lacks and integer ones."""
        named = dict(module.named_parameters())
        names = self.params if self.params is not None else default_weights(module)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(not_in_model(module, unknown, named))
        if not names:
            raise ValueError(_nothing_to_prune(module, self.params))
        for n in names:
            if not named[n].is_floating_point():
                raise TypeError(
                    f"parameter {n!r} has dtype {named[n].dtype}; only floating-point prunes"
                )
        if self.needs_gradients:
            self._refuse_frozen({n: named[n] for n in names}, "leave them out of params")
        return {n: named[n] for n in names}

    def _refuse_frozen(
        self, weights: Mapping[str, Tensor], fix: str, everywhere: bool = False
    ) -> None:
        """Raise where a pruner that reads its weights' gradients would prune a frozen one;
        ``everywhere``: under torch.distributed, on every rank of the group where any rank has
        one (one small allreduce), before the collectives that read the gradients."""
        frozen = [n for n, p in weights.items() if not p.requires_grad]
        if everywhere and _distributed() and dist.get_world_size(self._group) > 1:
            w = next(iter(weights.values()))
            flags = torch.zeros(dist.get_world_size(self._group), device=w.device)
            flags[dist.get_rank(self._group)] = float(bool(frozen))
            dist.all_reduce(flags, group=self._group)
            ranks = [r for r, f in enumerate(flags.tolist()) if f]
            if ranks and not frozen:
                raise ValueError(
                    f"rank(s) {ranks} of the group have pruned parameters frozen "
                    f"(requires_grad=False), but the {self.name!r} pruner reads the gradients of "
                    f"the weights it prunes; {fix} on every rank, or prune them by magnitude"
                )
        if frozen:
            raise ValueError(
                f"parameter(s) {frozen} are frozen (requires_grad=False), but the "
                f"{self.name!r} pruner reads the gradients of the weights it prunes; {fix}, "
                "or prune them by magnitude"
            )

    def _agree_across_ranks(self, group: Any, mine: dict[str, Any], device: Any) -> None:
        """Under torch.distributed, gather ``mine`` and this pruner's options from every rank of
        ``group`` and raise the same error on each if any rank refused its input or they
        differ. A no-op in one process."""
        if not _distributed() or dist.get_world_size(group) == 1:
            return
        from ..comm.p2p import backend_for
        from ..sync.config import PRUNER_SETUP, _gather_settings, key_differences

        if (device is None or device.type == "cpu") and backend_for(group, "cpu") is None:
            return  # CPU weights on a group that moves no CPU tensors (NCCL alone): no check

        options = {
            k: v for k, v in self.options().items() if k not in type(self).may_differ_across_ranks
        }
        everyone = _gather_settings(
            {"method": self.name, "options": options, **mine},
            group,
            device if device is not None and device.type == "cuda" else None,
            setup=PRUNER_SETUP,
        )
        refused = [(r, x["error"]) for r, x in enumerate(everyone) if x.get("error")]
        if refused:
            raise ValueError(
                f"{self.name} pruner: rank(s) {[r for r, _ in refused]} refused their input "
                f"(rank {refused[0][0]}: {refused[0][1]}); every rank must prepare the same "
                "model with the same options"
            )
        ref = everyone[0]
        bad = [r for r, x in enumerate(everyone) if x != ref]
        if not bad:
            return
        diffs = key_differences(ref, everyone[bad[0]], bad[0])
        raise ValueError(
            f"{self.name} pruner: the ranks disagree (ranks {bad} differ from rank 0): "
            + "; ".join(diffs)
            + ". Every rank must use the same options, step counter and masks: load on every "
            "rank a state saved at the same step, or on none"
        )

    def _reattach(
        self, module: nn.Module, optimizer: torch.optim.Optimizer | None, group: Any, sync: Any
    ) -> Pruner:
        if module is not self._model:
            raise RuntimeError(
                f"this {self.name!r} pruner is already prepared on another model; a pruner "
                "prunes one model: build a new one for this model (to carry this one's masks "
                "over, call new.load_state_dict(pruner.state_dict()) before new.prepare(model))"
            )
        self._check_params()
        if optimizer is not None:
            self._optimizer = optimizer
        if group is not None:
            self._group = group
        if sync is not None:
            self._sync = sync
            self._clear_sync()
        self._install_hooks()
        if not self._deferred:
            self._apply()
        return self

    def on_prepare(self) -> None:
        """Subclass hook: initial masks (RigL starts sparse)."""

    def step(self, step: int, closure: Closure | None = None) -> bool:
        """Call after ``optimizer.step()``: prune if the schedule says so, then re-apply masks.

        Args:
            step: the index of the optimizer step just taken (0, 1, ...).
            closure: returns a loss on a fresh (micro-)batch; methods that need gradients of
                their own (WoodFisher's Fisher samples) call it.

        Returns:
            True when the masks changed at this step.
        """
        self._require_ready()
        self._refuse_finalized("step()")
        if not is_integer(step, 0):
            raise (ValueError if is_integer(step) else TypeError)(
                f"step must be an integer >= 0 (the optimizer step), got {step!r}"
            )
        step = operator.index(step)  # kept as a plain int, as the state saves it
        if self._agree:
            w = next(iter(self._weights.values()))
            self._agree_across_ranks(
                self._group,
                {
                    "layout": _layout(self._weights),
                    "step": step,
                    "last step": self._step,
                    "num_updates": self._num_updates,
                    "masks": _digest(self._masks),
                },
                w.device,
            )
            self._agree = False
        if step == self._step:  # a repeated index (a loop that kept its counter): no update
            self._apply()
            return False
        changed = self.update(step, closure)
        self._step = step  # (after the update: one that raised can be taken again)
        self._initial_zeroed = None  # training goes on from the masks as they are
        self._apply()
        return changed

    def update(self, step: int, closure: Closure | None) -> bool:
        """Subclass hook: change the masks at this step; return whether they changed."""
        return False

    def finalize(self) -> Masks:
        """Bake the masks into the weights, remove the hooks and return the masks."""
        self._require_ready()
        self._finalized = True
        self._apply()
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], set()
        for h in self._load_handles:
            h.remove()
        self._load_handles = []
        return self.masks

    # ---- masks ---------------------------------------------------------------------------
    @property
    def masks(self) -> Masks:
        """name -> bool mask (True = kept), copies."""
        return {n: m.clone() for n, m in self._masks.items()}

    def apply(self) -> None:
        """Zero the pruned weights and the optimizer state at their positions."""
        self._require_ready()
        self._apply()

    @torch.no_grad()
    def _apply(self, clear: bool = True) -> None:
        deferred = self._deferred
        initial = deferred and self._clear_deferred  # (not a load into the model)
        self._cancel_deferred()
        if initial:
            self._initial_zeroed = {n: ~m for n, m in self._masks.items() if not bool(m.all())}
        for n, p in self._weights.items():
            pruned = ~self._masks[n]
            p.masked_fill_(pruned, 0.0)
            for v in optimizer_state(self._optimizer, p):
                v.masked_fill_(pruned, 0)
        if deferred and clear and self._clear_deferred:  # initial masks take effect now (RigL)
            self._clear_sync()

    def set_masks(self, masks: Masks) -> None:
        """Replace the masks (synchronised from rank 0 under torch.distributed) and apply them.

        Args:
            masks: name -> bool tensor of the parameter's shape (True = kept), for some or all
                of the pruned parameters; all are checked before any is replaced.
        """
        self._require_ready()
        _check_masks(masks, self._weights, "set_masks()", complete=False)
        self._assign_masks(masks)

    def _assign_masks(self, masks: Masks, sync: bool = True, clear: bool = True) -> None:
        """``clear``: clear the sync's residuals at the pruned weights, as a change of the
        masks does; a load does not, as the sync's own saved state already holds what the
        run had there (with ``mask_gradients=False`` they build up between changes)."""
        for n, m in masks.items():
            self._masks[n] = m.detach().to(device=self._weights[n].device, dtype=torch.bool).clone()
        if sync:
            self.sync_masks()
        self._apply(clear)
        if clear:
            self._clear_sync()

    def _clear_sync(self) -> None:
        """Clear the gradient sync's residuals at the pruned weights (``prepare(sync=...)``)."""
        if self._sync is not None:
            self._sync.clear_residuals({self._weights[n]: ~m for n, m in self._masks.items()})

    def sync_masks(self) -> None:
        """Make every rank hold rank 0's masks (a no-op without torch.distributed)."""
        if not _distributed():
            return
        names = list(self._masks)
        bufs = [self._masks[n].to(torch.uint8) for n in names]
        broadcast_tensors(bufs, self._group)
        self._masks = {n: b.bool() for n, b in zip(names, bufs)}

    def _refuse_finalized(self, call: str) -> None:
        if getattr(self, "_finalized", False):
            raise RuntimeError(
                f"{call} after finalize(): its masks are baked into the weights and its hooks, "
                "which keep pruned gradients zero, are removed; prepare() the model again to go "
                "on pruning"
            )

    def _install_hooks(self) -> None:
        self._finalized = False
        for h in self._handles:
            h.remove()
        # A frozen weight (named in params) gets no gradient to mask; its mask holds anyway,
        # as the optimizer never moves it. Unfrozen later, it gets its hook then (_hook_unfrozen).
        self._handles, self._hooked = [], set()
        self._hook_unfrozen()
        for h in self._load_handles:
            h.remove()
        # On the model and on each module that owns a pruned weight: a load into that module
        # alone (model.fc.load_state_dict(...)) runs its hooks, not the model's.
        self._load_handles = [
            m.register_load_state_dict_post_hook(_PrunerHook(self, "_after_model_load"))
            for m in self._owners().values()
        ]
        # Each forward pass of the model first hooks a pruned weight unfrozen since (kept with
        # the load hooks: finalize() removes both).
        assert self._model is not None
        self._load_handles.append(
            self._model.register_forward_pre_hook(_PrunerHook(self, "_before_forward"))
        )

    def _hook_unfrozen(self) -> None:
        """Register the gradient hook of each pruned weight that trains and has none yet (frozen
        at prepare(), unfrozen since, as in gradual unfreezing): its gradient is masked, and
        captured for the methods that read it, like the others'."""
        for n, p in self._weights.items():
            if p.requires_grad and n not in self._hooked:
                self._handles.append(p.register_hook(self._make_hook(n)))
                self._hooked.add(n)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if len(self._hooked) < len(self._weights):  # (all hooked, the usual case: no loop)
            self._hook_unfrozen()

    def _after_model_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        """Weights loaded into the model (dense ones, say) hold values where the masks prune:
        the masks apply again at the next forward pass (or step(), apply(), a pruner load), not
        now, so a pruner state loaded after the model's still sets the masks first."""
        self._initial_zeroed = None  # (the model's weights are as loaded)
        if self._model is not None and not self._deferred:
            self._defer_initial_masks(clear=False)

    def _make_hook(self, name: str) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if self._stash:  # summed over the step's backward passes, as .grad is
                kept = self._dense_grads.get(name)
                self._dense_grads[name] = grad if kept is None else kept + grad
            if not self.mask_gradients:
                return grad
            mask = self._masks[name]
            if mask.device != grad.device:  # the model was moved since the masks were made
                mask = self._masks[name] = mask.to(grad.device)
            if grad.is_sparse:  # nn.Embedding(sparse=True): rows of the weight, masked as rows
                grad = grad.coalesce()
                at = tuple(grad.indices())  # (the mask at each value's sparse position)
                kept = grad.values().masked_fill(~mask[at], 0.0)
                return torch.sparse_coo_tensor(
                    grad.indices(), kept, grad.shape, is_coalesced=True, check_invariants=False
                )
            return grad.masked_fill(~mask, 0.0)

        return hook

    def _defer_initial_masks(self, clear: bool = True) -> None:
        """Apply the masks at the first forward pass of the model (or of a module owning a
        pruned weight) instead of now: prepare() then destroys nothing a load could restore.
        ``clear``: clear the sync's residuals at the pruned weights then, as initial masks do
        (weights loaded into the model leave the residuals to the sync's own state)."""
        self._clear_deferred = clear
        self._deferred = True
        self._forward_handles = [
            m.register_forward_pre_hook(_PrunerHook(self, "_apply_before_forward"))
            for m in self._owners().values()
        ]

    def _owners(self) -> dict[int, nn.Module]:
        """The model and each module that owns a pruned weight, by id: under every name of a
        tied weight (a load into the layer of its second name is one too)."""
        assert self._model is not None
        owners = {id(self._model): self._model}
        pruned = {id(p) for p in self._weights.values()}
        for n, p in self._model.named_parameters(remove_duplicate=False):
            if id(p) in pruned:
                owner = self._model.get_submodule(n.rpartition(".")[0])
                owners.setdefault(id(owner), owner)
        return owners

    def _apply_before_forward(self, module: nn.Module, args: Any) -> None:
        # Under torch.func.functional_call the module holds other tensors for the call: the
        # masks wait for a forward pass of the model's own parameters (a parameter really
        # replaced is refused by the next step() or apply()).
        if self._deferred and not self._stale_params():
            self._follow_weights()
            self._apply()

    def _cancel_deferred(self) -> None:
        for h in self._forward_handles:
            h.remove()
        self._forward_handles, self._deferred = [], False

    def _require_prepared(self) -> None:
        if self._model is None:
            raise RuntimeError(
                f"call prepare(model, optimizer) before using the {self.name!r} pruner"
            )

    def _stale_params(self) -> list[str]:
        """The pruned weights that are no longer the model's parameters of their names."""
        assert self._model is not None
        named = dict(self._model.named_parameters())
        return [n for n, p in self._weights.items() if named.get(n) is not p]

    def _check_params(self) -> None:
        """Refuse to act when the model's parameters are no longer the tensors we prune."""
        stale = self._stale_params()
        if stale:
            raise RuntimeError(
                f"the model's parameter(s) {stale} are no longer the tensors this "
                f"{self.name!r} pruner was prepared with (a layer or parameter was replaced, "
                "or removed, after prepare()); it would prune the old tensors. Build a new "
                "pruner and prepare it on the model as it is now (to keep the masks, call "
                "new.load_state_dict(pruner.state_dict()) before new.prepare(model))"
            )
        self._follow_weights()

    def _follow_weights(self) -> None:
        """Move each mask to its weight's device: ``model.to(device)`` after ``prepare()``
        moves the weights (the same Parameters) but not the masks."""
        for n, w in self._weights.items():
            if self._masks[n].device != w.device:
                self._masks[n] = self._masks[n].to(w.device)

    def _require_ready(self) -> None:
        self._require_prepared()
        self._check_params()

    # ---- state ---------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Return the constructor options."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.options() | {"name": v.name} if isinstance(v, Schedule) else v
        return out

    def state_dict(self) -> dict[str, Any]:
        """Return the masks, counters and settings; round-trips exactly through
        :meth:`load_state_dict`."""
        if self._pending is not None:  # loaded before prepare(): hand back what was loaded
            p = self._pending
            rest = copy.deepcopy({k: v for k, v in p.items() if k != "masks"})
            return rest | {"masks": {n: m.detach().cpu().clone() for n, m in p["masks"].items()}}
        return {
            "method": self.name,
            "masks": {n: m.detach().cpu().clone() for n, m in self._masks.items()},
            "step": self._step,
            "num_updates": self._num_updates,
            "extra": self.extra_state(),
            "options": plain(copy.deepcopy(self.options())),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore masks and counters; before :meth:`prepare` they are kept until it runs.

        Everything is checked before anything changes, so a state that is refused leaves the
        pruner as it was. Refused: what is not a state of this pruner, a state missing entries,
        one saved with other settings (sparsity, scope, schedule, ...: the error names them;
        states from before settings were recorded are not compared) unless ``strict=False``
        (to go on under new settings: a higher target sparsity, another schedule, a longer
        run), and masks that do not match the pruned parameters' names and shapes.
        """
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        self._check_state(state, strict)
        if self._model is None:
            # Copies: the caller's dict and tensors may change before prepare() installs them.
            rest = copy.deepcopy({k: v for k, v in state.items() if k != "masks"})
            self._pending = rest | {
                "masks": {n: m.detach().clone() for n, m in state["masks"].items()}
            }
            self._step = operator.index(state["step"])
            self._num_updates = operator.index(state["num_updates"])
            return
        self._check_params()
        _check_masks(state["masks"], self._weights, "the state")
        self._warn_lost(state["masks"])
        # Local: the next step() checks that every rank loaded alike (a broadcast here would
        # wait for ranks that load nothing).
        self._assign_state(state, sync=False)
        self._agree = True

    def _warn_lost(self, masks: Masks) -> None:
        """Warn where loaded ``masks`` keep weights the initial masks zeroed since the model's
        last load (a forward pass ran between ``prepare`` and this load): their values are
        gone unless the model's state is loaded again."""
        zeroed, self._initial_zeroed = self._initial_zeroed, None
        if not zeroed:
            return
        lost = {}
        for n, z in zeroed.items():
            w = self._weights[n].detach()
            count = int((masks[n].to(w.device) & z.to(w.device) & (w == 0)).sum())
            if count:
                lost[n] = count
        if lost:
            names = ", ".join(f"{n!r} ({c})" for n, c in lost.items())
            warnings.warn(
                f"{self.name}: the masks this state keeps include {sum(lost.values())} weights "
                f"that the initial masks zeroed at the forward pass since prepare(): {names}; "
                "their trained values are lost unless the model's state_dict is loaded after "
                "this (or load the pruner's state before the model's first forward pass)",
                stacklevel=caller_stacklevel(),
            )

    def _check_state(self, state: Any, strict: bool = True) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(
                f"load_state_dict takes the dict that a {self.name!r} pruner's state_dict() "
                f"returned, got {type(state).__name__}"
            )
        if "method" in state and state["method"] != self.name:
            raise ValueError(
                f"state is not a {self.name!r} pruner state (method={state['method']!r})"
            )
        missing = [k for k in _STATE_ENTRIES if k not in state]
        if missing:
            raise ValueError(
                f"load_state_dict takes the dict that a {self.name!r} pruner's state_dict() "
                f"returned, with the entries {', '.join(_STATE_ENTRIES)}; this one lacks "
                f"{', '.join(missing)}"
            )
        if not is_integer(state["step"], -1):
            raise ValueError(f"the state's 'step' must be an integer >= -1, got {state['step']!r}")
        if not is_integer(state["num_updates"], 0):
            raise ValueError(
                f"the state's 'num_updates' must be an integer >= 0, got {state['num_updates']!r}"
            )
        masks = state["masks"]
        if not isinstance(masks, Mapping):
            raise ValueError(
                f"the state's 'masks' must be a dict of name -> bool tensor, got "
                f"{type(masks).__name__}"
            )
        for n, m in masks.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                got = m.dtype if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"the state's mask {n!r} must be a bool tensor, got {got}")
        if not isinstance(state["extra"], Mapping):
            raise ValueError(
                f"the state's 'extra' must be a dict, got {type(state['extra']).__name__}"
            )
        self.check_extra_state(state["extra"])
        saved = state.get("options", {})
        if not isinstance(saved, Mapping):
            raise ValueError(f"the state's 'options' must be a dict, got {type(saved).__name__}")
        diffs = [
            f"{k}: saved {saved[k]!r}, now {v!r}"
            for k, v in self.options().items()
            if k in saved and k not in self.may_differ_on_load and saved[k] != v
        ]
        if diffs and strict:
            raise ValueError(
                f"this state was saved with other {self.name!r} pruner settings "
                f"({'; '.join(diffs)}); build the pruner with the saved settings to load it "
                f"(only {', '.join(self.may_differ_on_load)} may differ), or pass "
                "strict=False to go on from its masks under the new ones"
            )

    def _assign_state(self, state: Mapping[str, Any], sync: bool = True) -> None:
        """Restore a state checked by :meth:`_check_state` and whose masks fit; ``sync``: make
        the masks rank 0's (a collective)."""
        self._step = operator.index(state["step"])
        self._num_updates = operator.index(state["num_updates"])
        self.load_extra_state(state["extra"])
        self._assign_masks(state["masks"], sync=sync, clear=False)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def check_extra_state(self, extra: Mapping[str, Any]) -> None:
        """Subclass hook: refuse an ``extra`` that :meth:`load_extra_state` cannot restore."""

    def load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        """Return global and per-layer sparsity of the masks, the last step taken and
        ``num_updates``: how many mask updates ran (each prune, each RigL update, also one that
        left the masks as they were)."""
        self._require_ready()
        # (a weight of no elements has none pruned, as sparsity_stats has it)
        layers = {
            n: 1.0 - float(m.sum()) / m.numel() if m.numel() else 0.0
            for n, m in self._masks.items()
        }
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return {
            "method": self.name,
            "sparsity": 1.0 - kept / max(total, 1),
            "layers": layers,
            "step": self._step,
            "num_updates": self._num_updates,
        }


def _check_masks(
    masks: Any, weights: Mapping[str, Tensor], what: str, complete: bool = True
) -> None:
    """Refuse masks that are not bool tensors of the pruned parameters' names and shapes."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what}: masks must be a dict of name -> bool tensor, got {masks!r}")
    unknown = sorted(set(masks) - set(weights))
    missing = sorted(set(weights) - set(masks)) if complete else []
    if unknown or missing:
        raise ValueError(
            f"{what} has masks for {sorted(masks)}, but this pruner prunes {sorted(weights)}"
            + (f"; it does not prune {unknown}" if unknown else "")
            + (f"; no mask for {missing}" if missing else "")
        )
    for n, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"{what}: mask {n!r} must be a bool tensor (True = kept), got {got}")
        if m.shape != weights[n].shape:
            raise ValueError(
                f"{what}: mask {n!r} has shape {tuple(m.shape)}, but the parameter has shape "
                f"{tuple(weights[n].shape)}"
            )


@dataclass
class ScheduledPruner(Pruner):
    """A pruner that removes weights along a schedule and never brings them back.

    Args:
        schedule: a :class:`Schedule`, a registered name (``"oneshot"``, ``"gradual"``), or
            a dict of a name and its options (``{"name": "gradual", "end": 1000, ...}``, as a
            state's ``options`` record it, so a pruner can be built again from them).
        scope: ``"global"`` (one ranking over all pruned weights) or ``"layer"``.
    """

    schedule: Schedule | str = field(default_factory=OneShot)
    scope: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.schedule, str):
            self.schedule = get_schedule(self.schedule)
        elif isinstance(self.schedule, Mapping) and isinstance(self.schedule.get("name"), str):
            settings = dict(self.schedule)
            self.schedule = get_schedule(settings.pop("name"), **settings)
        if not isinstance(self.schedule, Schedule):
            raise TypeError(
                "schedule must be a Schedule, a name or a dict with its 'name' and options, got "
                f"{self.schedule!r}"
            )
        initial = getattr(self.schedule, "initial_sparsity", 0.0)
        if initial > self.sparsity:
            raise ValueError(
                f"the schedule starts at initial_sparsity={initial}, above the final "
                f"sparsity={self.sparsity}; pruned weights never come back, so the run would end "
                f"at {initial}: pass an initial_sparsity <= sparsity"
            )
        check_scope(self.scope)
        self._current = 0.0

    def update(self, step: int, closure: Closure | None) -> bool:
        target = self.schedule.target(step, self.sparsity)
        if target is None or target <= self._current + 1e-12:
            return False
        before = self.masks
        self.prune(target, closure)
        # (a higher target can give the same masks: N:M's 2:4 reached before the schedule's end)
        return any(not torch.equal(before[n], m) for n, m in self._masks.items())

    def prune(self, sparsity: float | None = None, closure: Closure | None = None) -> Masks:
        """Prune now to ``sparsity`` (default: the final one); weights pruned before stay pruned.

        Raises:
            ValueError: ``sparsity`` below the one already reached: that would bring pruned
                weights back.

        Returns:
            The new masks.
        """
        self._require_ready()
        self._refuse_finalized("prune()")
        s = self.sparsity if sparsity is None else check_sparsity(sparsity)
        # Below the sparsity reached by less than one weight (0.7 rounded to float32) asks for
        # what is pruned already, and so does the pruned share stats() reports, which whole
        # channels can leave below the target by more than a weight (structured, per layer).
        total = sum(w.numel() for w in self._weights.values())
        one_weight = 1.0 / max(1, total)
        pruned = 1.0 - sum(int(m.sum()) for m in self._masks.values()) / max(1, total)
        if s < min(self._current, pruned) - one_weight:
            reached = (
                f"{self._current:g}"
                if abs(pruned - self._current) <= one_weight
                else f"{self._current:g}, {pruned:.4g} of the weights pruned"
            )
            raise ValueError(
                f"prune({s:g}) asks for less than the sparsity this pruner has already reached "
                f"({reached}); weights pruned once stay pruned, so pass a sparsity >= "
                f"{min(self._current, pruned):.4g}"
            )
        new = self.compute_masks(s, closure)
        # Whatever the method computed, a weight pruned before stays pruned.
        new = {n: m & self._masks[n] for n, m in new.items()}
        self._num_updates += 1
        self._current = max(self._current, s)
        self._assign_masks(new)
        return self.masks

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        """Subclass hook: the masks at ``sparsity``; may also change the weights."""
        raise RuntimeError(f"{type(self).__name__} must define compute_masks()")

    def extra_state(self) -> dict[str, Any]:
        return {"current_sparsity": self._current}

    def check_extra_state(self, extra: Mapping[str, Any]) -> None:
        if "current_sparsity" not in extra:
            raise ValueError("the state's 'extra' lacks 'current_sparsity' (the sparsity reached)")
        check_sparsity(extra["current_sparsity"], "the state's current_sparsity")

    def load_extra_state(self, extra: Mapping[str, Any]) -> None:
        self._current = float(extra["current_sparsity"])

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"target_sparsity": self._current}


def available_pruners() -> list[str]:
    """Return the registered pruner names, sorted."""
    from . import magnitude, rigl, woodfisher_pruner  # noqa: F401  (register themselves)

    return sorted(_PRUNERS)


def pruner_class(name: str) -> type[Pruner]:
    """Return the pruner class registered as ``name``; an unknown name raises a
    ``ValueError`` that lists the valid ones."""
    available_pruners()
    if name not in _PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; valid names are: {', '.join(sorted(_PRUNERS))}")
    return _PRUNERS[name]


def get_pruner(name: str, **options: Any) -> Pruner:
    """Build the pruner registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), an option this pruner does
            not take (the message lists those it does), or a value out of range.

    Example:
        >>> p = get_pruner("magnitude", sparsity=0.8, scope="layer")
    """
    cls = pruner_class(name)
    check_options("pruner", name, options, [f.name for f in dataclasses.fields(cls)])
    return cls(**options)


def optimizer_state(optimizer: Any, p: Tensor) -> list[Tensor]:
    """The tensors of ``optimizer``'s state for ``p`` shaped as ``p`` (momentum, Adam's
    moments): in ``optimizer.state`` and in a wrapped optimizer's (``ZeroRedundancyOptimizer``
    steps with this rank's shard's state in ``.optim.state``; after a load its own ``.state``
    holds copies too). Empty without an optimizer."""
    found: dict[int, Tensor] = {}
    for opt in (optimizer, getattr(optimizer, "optim", None)):
        state = getattr(opt, "state", None)
        if opt is None or not hasattr(state, "get"):
            continue
        for v in (state.get(p) or {}).values():
            if isinstance(v, Tensor) and v.shape == p.shape:
                found.setdefault(id(v), v)
    return list(found.values())


def dense(grad: Tensor) -> Tensor:
    """``grad`` as a strided tensor (an ``nn.Embedding(sparse=True)`` gradient is sparse)."""
    return grad.to_dense() if grad.is_sparse else grad
