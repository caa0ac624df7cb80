"""Centered clipping around the previous aggregate (Karimireddy, He, Jaggi, ICML 2021)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._options import check_saved_settings, check_state, plain
from .base import (
    Aggregator,
    check_int,
    check_positive,
    register_aggregator,
    state_tensors,
    work_dtype,
)


@register_aggregator("centered_clipping")
@dataclass
class CenteredClipping(Aggregator):
    """Clip every worker's difference to the previous aggregate to radius ``tau``; average.

    Steps, for each key: (optionally) update the workers' momenta m_i <- beta m_i + (1 - beta) x_i
    and use them as the inputs x_i; start from the anchor v (the previous output for this key,
    zero at first); repeat ``iterations`` times
    v <- v + mean_i (x_i - v) * min(1, tau / ||x_i - v||); store v as the next anchor and return
    it. Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021: the momentum anchor is what makes the rule hold against time-coupled attacks.
    With ``momentum > 0`` the output is an averaged momentum: pair it with plain SGD. A worker
    whose input holds NaN or Inf moves the anchor by nothing, and its momentum stays as it was.

    Args:
        tau: clipping radius (same units as the gradients).
        iterations: clipping iterations a step (the paper uses 1 with the anchor).
        momentum: worker momentum beta in [0, 1); 0 uses the gradients as they are.

    Example:
        >>> cc = CenteredClipping(n=3, f=1, tau=1.0)
        >>> cc(torch.tensor([[0.5], [0.5], [100.0]]))
        tensor([0.6667])
    """

    tau: float = 1.0
    iterations: int = 1
    momentum: float = 0.0
    requirement = "n > 2f"
    _anchor: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    _momenta: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_anchor", "_momenta")  # state by bucket key

    stateless = False

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 1

    def validate(self) -> None:
        check_positive(self.tau, "tau")
        check_int(self.iterations, "iterations", 1)
        check_positive(self.momentum, "momentum", allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        # In float32 for half gradients: a float16 difference of norm past 65504 had norm Inf,
        # hence scale 0, and an honest worker was silently left out.
        x = work_dtype(grads)
        if self.momentum > 0:
            m = self._momenta.get(key)
            # (a loaded state, say on CPU, follows the gradients' device)
            m = torch.zeros_like(x) if m is None else m.to(x.device)
            new = self.momentum * m + (1 - self.momentum) * x
            # A worker's NaN or Inf stays out of its momentum, which it would hold for good (and
            # so be left out at every later step); this step, its row moves the anchor by nothing.
            finite = torch.isfinite(x).all(dim=1, keepdim=True)
            self._momenta[key] = torch.where(finite, new, m)
            x = torch.where(finite, new, x)
        v = self._anchor.get(key)
        v = torch.zeros_like(x[0]) if v is None else v.to(device=x.device, dtype=x.dtype)
        for _ in range(self.iterations):
            diff = x - v
            norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
            scale = torch.clamp(self.tau / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
            # A row holding NaN or Inf has norm NaN or Inf (scale 0 or NaN), so its clipped
            # difference is NaN; it then moves the anchor by nothing, like a zero difference.
            clipped = diff * scale
            # A finite difference whose squares overflow (norm past about 1.8e19 in float32)
            # has norm Inf, scale 0: clipped to tau along its direction, as its entries over
            # their largest magnitude give it (it had been dropped, not clipped). Computed for
            # every row: picking the rows would read the norms on the host, a device sync.
            top = diff.abs().amax(dim=1, keepdim=True)
            unit = diff / top
            along = unit * (self.tau / torch.linalg.vector_norm(unit, dim=1, keepdim=True))
            clipped = torch.where(torch.isinf(norm) & torch.isfinite(top), along, clipped)
            clipped = torch.where(torch.isfinite(clipped), clipped, torch.zeros_like(clipped))
            v = v + clipped.mean(dim=0)
        self._anchor[key] = v.detach().clone()
        return v.to(grads.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": {k: v.clone() for k, v in self._anchor.items()},
            "momenta": {k: v.clone() for k, v in self._momenta.items()},
            "options": plain(self.options()),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned; a bad state is refused, nothing loaded,
        and so is one saved with other settings (``tau``, ``momentum``, ...: the error names
        them) unless ``strict=False``."""
        owner = "aggregator 'centered_clipping'"
        check_state(state, owner, ("anchor", "momenta"), optional=("options",))
        anchor = state_tensors(state["anchor"], f"{owner}: the state's 'anchor'")
        momenta = state_tensors(state["momenta"], f"{owner}: the state's 'momenta'")
        for key, v in anchor.items():
            if v.dim() != 1:
                raise ValueError(
                    f"{owner}: the state's anchor of key {key!r} must be 1-D [d], got shape "
                    f"{tuple(v.shape)}"
                )
        for key, m in momenta.items():
            if m.dim() != 2 or m.shape[0] != self.n:
                raise ValueError(
                    f"{owner}: the state's momenta of key {key!r} must have shape "
                    f"[n={self.n}, d], got {tuple(m.shape)}"
                )
        for key in anchor.keys() & momenta.keys():
            if momenta[key].shape[1] != anchor[key].shape[0]:
                raise ValueError(
                    f"{owner}: the state's anchor of key {key!r} has {anchor[key].shape[0]} "
                    f"entries but its momenta have {momenta[key].shape[1]}; they must be as wide"
                )
        check_saved_settings(state, owner, self.options(), strict)
        self._anchor = anchor
        self._momenta = momenta
