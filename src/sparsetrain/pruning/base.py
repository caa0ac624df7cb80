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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._options import check_options
from .masks import Masks, check_scope, check_sparsity
from .schedules import OneShot, Schedule, get_schedule

Closure = Callable[[], Tensor]

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
    """Return the module inside a DDP (or similar ``.module``) wrapper, so names match."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def default_weights(model: nn.Module) -> list[str]:
    """Return the names of the parameters pruned by default: every weight with 2 or more dims."""
    return [
        n for n, p in unwrap(model).named_parameters() if p.dim() >= 2 and p.is_floating_point()
    ]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_tensors(tensors: Sequence[Tensor], group: Any = None, src: int = 0) -> None:
    """Broadcast tensors of one dtype from ``src`` in place, as one flat message."""
    if not tensors or not _distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


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

    sparsity: float = 0.5
    params: Sequence[str] | None = None
    mask_gradients: bool = True

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.params is not None:
            if isinstance(self.params, str) or not all(isinstance(p, str) for p in self.params):
                raise TypeError(f"params must be a list of parameter names, got {self.params!r}")
            self.params = list(self.params)
        self._masks: Masks = {}
        self._pending: dict[str, Any] | None = None
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._group: Any = None
        self._handles: list[Any] = []
        self._step = -1
        self._num_updates = 0
        self._stash = False
        self._dense_grads: dict[str, Tensor] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, group: Any = None
    ) -> Pruner:
        """Select the weights, create the masks (all kept) and install gradient hooks.

        Args:
            model: the model, plain or wrapped in DDP.
            optimizer: its optimizer, whose per-weight state is zeroed at pruned positions.
            group: the process group masks are synchronised over (default: WORLD).

        Returns:
            self.
        """
        module = unwrap(model)
        named = dict(module.named_parameters())
        names = self.params if self.params is not None else default_weights(module)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(
                f"parameter(s) {unknown} are not in the model; its parameters are: {sorted(named)}"
            )
        if not names:
            raise ValueError("no parameters to prune: the model has no weight with 2 or more dims")
        for n in names:
            if not named[n].is_floating_point():
                raise TypeError(
                    f"parameter {n!r} has dtype {named[n].dtype}; only floating-point prunes"
                )
        self._model, self._optimizer, self._group = module, optimizer, group
        self._weights = {n: named[n] for n in names}
        self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self._weights.items()}
        self.on_prepare()
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        self._install_hooks()
        self.apply()
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
        self._require_prepared()
        self._step = step
        changed = self.update(step, closure)
        self.apply()
        return changed

    def update(self, step: int, closure: Closure | None) -> bool:
        """Subclass hook: change the masks at this step; return whether they changed."""
        return False

    def finalize(self) -> Masks:
        """Bake the masks into the weights, remove the hooks and return the masks."""
        self._require_prepared()
        self.apply()
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.masks

    # ---- masks ---------------------------------------------------------------------------
    @property
    def masks(self) -> Masks:
        """name -> bool mask (True = kept), copies."""
        return {n: m.clone() for n, m in self._masks.items()}

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights and the optimizer state at their positions."""
        for n, p in self._weights.items():
            pruned = ~self._masks[n]
            p.masked_fill_(pruned, 0.0)
            if self._optimizer is not None:
                for v in self._optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        v.masked_fill_(pruned, 0)

    def set_masks(self, masks: Masks) -> None:
        """Replace the masks (synchronised from rank 0 under torch.distributed) and apply them."""
        for n, m in masks.items():
            if n not in self._masks:
                raise ValueError(
                    f"mask {n!r} names no pruned parameter; pruned: {sorted(self._masks)}"
                )
            if m.shape != self._masks[n].shape:
                raise ValueError(
                    f"mask {n!r} has shape {tuple(m.shape)}, expected {tuple(self._masks[n].shape)}"
                )
            self._masks[n] = m.to(device=self._masks[n].device, dtype=torch.bool).clone()
        self.sync_masks()
        self.apply()

    def sync_masks(self) -> None:
        """Make every rank hold rank 0's masks (a no-op without torch.distributed)."""
        if not _distributed():
            return
        names = list(self._masks)
        bufs = [self._masks[n].to(torch.uint8) for n in names]
        broadcast_tensors(bufs, self._group)
        self._masks = {n: b.bool() for n, b in zip(names, bufs)}

    def _install_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = [p.register_hook(self._make_hook(n)) for n, p in self._weights.items()]

    def _make_hook(self, name: str) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if self._stash:
                self._dense_grads[name] = grad
            return grad.masked_fill(~self._masks[name], 0.0) if self.mask_gradients else grad

        return hook

    def _require_prepared(self) -> None:
        if self._model is None:
            raise RuntimeError(
                f"call prepare(model, optimizer) before using the {self.name!r} pruner"
            )

    # ---- state ---------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Return the constructor options."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.options() | {"name": v.name} if isinstance(v, Schedule) else v
        return out

    def state_dict(self) -> dict[str, Any]:
        """Return the masks and counters; round-trips exactly through :meth:`load_state_dict`."""
        if self._pending is not None:  # loaded before prepare(): hand back what was loaded
            p = self._pending
            return p | {"masks": {n: m.detach().cpu().clone() for n, m in p["masks"].items()}}
        return {
            "method": self.name,
            "masks": {n: m.detach().cpu().clone() for n, m in self._masks.items()},
            "step": self._step,
            "num_updates": self._num_updates,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks and counters; before :meth:`prepare` they are kept until it runs."""
        if not isinstance(state, dict) or state.get("method") != self.name:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state is not a {self.name!r} pruner state (method={got!r})")
        if self._model is None:
            self._pending = state
            self._step, self._num_updates = int(state["step"]), int(state["num_updates"])
            return
        masks = state["masks"]
        if set(masks) != set(self._masks):
            raise ValueError(
                f"saved masks are for {sorted(masks)}, but this pruner prunes {sorted(self._masks)}"
            )
        self._step, self._num_updates = int(state["step"]), int(state["num_updates"])
        self.load_extra_state(state["extra"])
        self.set_masks(masks)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        """Return global and per-layer sparsity of the masks and how many times they changed."""
        layers = {n: 1.0 - float(m.sum()) / m.numel() for n, m in self._masks.items()}
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return {
            "method": self.name,
            "sparsity": 1.0 - kept / max(total, 1),
            "layers": layers,
            "step": self._step,
            "num_updates": self._num_updates,
        }


@dataclass
class ScheduledPruner(Pruner):
    """A pruner that removes weights along a schedule and never brings them back.

    Args:
        schedule: a :class:`Schedule` or a registered name (``"oneshot"``, ``"gradual"``).
        scope: ``"global"`` (one ranking over all pruned weights) or ``"layer"``.
    """

    schedule: Schedule | str = field(default_factory=OneShot)
    scope: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.schedule, str):
            self.schedule = get_schedule(self.schedule)
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule or a name, got {self.schedule!r}")
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
        self.prune(target, closure)
        return True

    def prune(self, sparsity: float | None = None, closure: Closure | None = None) -> Masks:
        """Prune now to ``sparsity`` (default: the final one); weights pruned before stay pruned.

        Returns:
            The new masks.
        """
        self._require_prepared()
        s = self.sparsity if sparsity is None else check_sparsity(sparsity)
        new = self.compute_masks(s, closure)
        self._num_updates += 1
        self._current = max(self._current, s)
        self.set_masks(new)
        return self.masks

    def compute_masks(self, sparsity: float, closure: Closure | None) -> Masks:
        """Subclass hook: the masks at ``sparsity``; may also change the weights."""
        raise RuntimeError(f"{type(self).__name__} must define compute_masks()")

    def extra_state(self) -> dict[str, Any]:
        return {"current_sparsity": self._current}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self._current = float(extra["current_sparsity"])

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"target_sparsity": self._current}


def available_pruners() -> list[str]:
    """Return the registered pruner names, sorted."""
    from . import magnitude, rigl, woodfisher_pruner  # noqa: F401  (register themselves)

    return sorted(_PRUNERS)


def pruner_class(name: str) -> type[Pruner]:
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
