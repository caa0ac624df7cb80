"""Sparse collectives registered by name, selected with ``collective=`` in the sync layer.

A sparse collective takes this rank's ``(indices, values)`` of a vector of ``numel`` elements and
returns a :class:`CollectiveResult`. Exact algorithms (``exact = True``) return the dense sum over
ranks; selecting ones (Ok-Topk, gTop-k) return a sparse global selection of that sum, and the
sync layer puts what was not selected back into error feedback: this rank's values at indices
outside the selection (Ok-Topk's default), or the sums its ``dropped`` names (gTop-k: the partial
sums this rank's merges dropped; Ok-Topk with ``residuals="owner"``: the sums of this rank's
region below the threshold).

Collectives may keep state between calls (region boundaries, threshold estimates), keyed by the
``key`` they are called with, and expose it through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.distributed as dist
from torch import Tensor

from .._options import check_options, check_state


@dataclass
class CollectiveResult:
    """What a sparse collective returns on every rank.

    Attributes:
        dense: the sum over ranks as a dense 1-D tensor (exact algorithms), else None.
        indices, values: the sparse result (selecting algorithms), else None. Same on all ranks.
        bytes_sent, bytes_recv: what this rank put on and took off the wire.
        dropped: for a selecting algorithm that leaves sums with this rank, the
            ``(indices, values)`` it left (sorted, unique), for this rank's error feedback to
            keep in place of the values it sent: gTop-k's partial sums that this rank's own
            merges dropped, Ok-Topk's (``residuals="owner"``) sums of this rank's region
            below the threshold. Over all ranks they and the result add up to the sum of the
            inputs. None: what this rank sent at indices outside the result is what was
            dropped (Ok-Topk's default ``residuals="local"``), or nothing was (exact ones).
    """

    dense: Tensor | None = None
    indices: Tensor | None = None
    values: Tensor | None = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    dropped: tuple[Tensor, Tensor] | None = None


class SparseCollective(ABC):
    """Base class of the sparse collectives."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    @abstractmethod
    def __call__(
        self,
        indices: Tensor,
        values: Tensor,
        numel: int,
        *,
        group: dist.ProcessGroup | None = None,
        key: str = "",
    ) -> CollectiveResult:
        """Reduce this rank's ``(indices, values)`` with every other rank's."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (stateless collectives keep nothing)."""
        check_state(state, f"collective {self.name!r}", ())

    def rescale(self, factor: float) -> None:  # noqa: B027 - most keep nothing in those units
        """Multiply whatever this collective keeps in the values' units (a threshold) by
        ``factor``: the values are about to arrive scaled by it (a new loss scale)."""


_COLLECTIVES: dict[str, type[SparseCollective]] = {}


def register_collective(name: str):
    """Class decorator: register a sparse collective under ``name``."""

    def wrap(cls: type[SparseCollective]) -> type[SparseCollective]:
        if name in _COLLECTIVES and _COLLECTIVES[name] is not cls:
            raise ValueError(
                f"collective name {name!r} is already registered by {_COLLECTIVES[name]}"
            )
        cls.name = name
        _COLLECTIVES[name] = cls
        return cls

    return wrap


def available_collectives() -> list[str]:
    """Return the registered collective names, sorted (the values ``collective=`` takes,
    besides ``"auto"``)."""
    return sorted(_COLLECTIVES)


def collective_option_names(name: str) -> list[str]:
    """The options collective ``name`` takes (none for an unknown name)."""
    cls = _COLLECTIVES.get(name)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls) if f.init]


def get_collective(name: str, **options: Any) -> SparseCollective:
    """Build the sparse collective registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones), or a bad option
            value.
    """
    if not isinstance(name, str) or name not in _COLLECTIVES:
        raise ValueError(
            f"unknown collective {name!r}; valid names are: {', '.join(available_collectives())}"
        )
    check_options("collective", name, options, collective_option_names(name))
    return _COLLECTIVES[name](**options)
