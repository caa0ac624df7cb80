"""Carry gradient-sync states over to a run with another number of ranks.

Error feedback's residuals are each rank's own share of the gradient not yet sent. With ``W``
ranks averaging, what the model has yet to receive is ``(1/W) * sum_r e_r`` (in the gradients'
units; the optimizer applies it as the residuals are sent). A run resumed on ``W'`` ranks keeps
exactly that if its residuals satisfy ``(1/W') * sum_r' e'_r' = (1/W) * sum_r e_r``.

The old ranks are laid side by side on [0, 1), rank ``r`` covering ``[r/W, (r+1)/W)``, and so
are the new ones. New rank ``r'`` takes the mean of the old residuals weighted by how much of
its interval each covers: ``e'_r' = sum_r W' * |I_r ∩ J_r'| * e_r``. The weights of a new rank
add up to 1, and each old rank's weights over the new ranks add up to ``W'/W``, which is the
condition above. On as many ranks each rank keeps its own residual (the identity); on half as
many each new rank holds the mean of two old ones; on twice as many each old residual is
taken by two new ranks.

That is exact wherever the exchange averages the ranks' compressed gradients: every
compressor and collective under the default ``aggregator="mean"``, except signSGD's majority
vote. It is not:

* with momentum correction: the velocities are combined the same way, keeping the ranks' mean,
  but each rank clears its own velocity where its own selection sent, so how much a velocity
  adds before it is sent depends on how that rank ranks it; the resumed run applies about as
  much, spread differently over the weights (:func:`reshard_state` warns);
* under a robust aggregator, or signSGD's majority vote, whose update is not the ranks' mean
  to begin with.

Nothing else in a state depends on the number of ranks, except:

* the counters (bytes sent and received, seconds): combined with the same weights, so they
  read as an average rank's;
* the per-rank compressor state (the threshold estimator's thresholds): taken from the first
  old rank the new one covers;
* Ok-Topk's region edges: kept as saved; Ok-Topk sees they are for another number of ranks and
  starts that vector afresh (new edges and threshold) at its first step;
* a robust aggregator's or an attack's state holding tensors, which are about the ``W``
  workers (SafeguardSGD's accumulators, centered clipping's per-worker momenta): refused, or
  dropped with ``reset_robust=True`` (the rule then starts over, as at the start of a run).
  One holding numbers only (bucketing's step) is carried as it is.

Give the states ``state_dict()`` returned, saved on every rank: a pickled hook (``SyncState``)
loads its state when unpickled, into a process of another size, where a robust rule's state
is refused before it can be resharded.

Example (on every rank of the new run, each old rank having saved ``state_dict()`` to
``sync{r}.pt``)::

    old = torch.load("sync0.pt", map_location="cpu")["world"]  # ranks that saved
    need = reshard_sources(old, rank, world)
    states = {r: torch.load(f"sync{r}.pt", map_location="cpu") for r in need}
    sync.load_state_dict(reshard_state(states, rank, world))
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from .._options import is_integer
from .engine import _saved_by, check_state

_OWNER = "reshard_state"
# Entries that every rank of one run holds alike (checked: states from different runs or steps
# cannot be combined).
_SHARED = (
    "config",
    "step",
    "loss_scale",
    "ddp_groups",
    "ddp_bucket_caps_bytes",
    "buckets",
    "collectives",
)
_ROBUST = ("aggregator", "attack")


def reshard_sources(old_world: int, rank: int, world: int) -> list[int]:
    """Return the old ranks whose states :func:`reshard_state` needs to build the state of
    ``rank`` of ``world`` from a run of ``old_world`` ranks: at most ``ceil(old_world / world)
    + 1`` of them, so no rank has to load every file.

    Example:
        >>> reshard_sources(4, 1, 2)
        [2, 3]
        >>> reshard_sources(2, 3, 4)
        [1]
    """
    return [r for r, _ in _weights(old_world, rank, world)]


def reshard_state(
    states: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
    rank: int,
    world: int,
    *,
    reset_robust: bool = False,
) -> dict[str, Any]:
    """Build rank ``rank``'s gradient-sync state for a run of ``world`` ranks from the states
    a run of another number of ranks saved (``state_dict()`` of :class:`GradientSync`, of
    :class:`SyncState` or of :class:`SyncEngine`, one a rank), keeping the update the model has
    yet to receive from error feedback (see the module's docstring for how).

    The result loads with ``strict=True`` on rank ``rank`` of ``world``: it records that rank
    and world, so the check at the first step after a load passes.

    Args:
        states: every old rank's state, in rank order; or a dict ``{old rank: state}`` holding
            at least those :func:`reshard_sources` names. Each must record the rank and number
            of ranks that saved it (states do since sparsetrain recorded them), and the states
            must come from one run at one step (same settings, step and loss scale).
        rank: the new rank, ``0 <= rank < world``.
        world: the new number of ranks, ``>= 1``.
        reset_robust: drop a robust aggregator's and an attack's state, which are about the old
            workers, instead of refusing it; the rule starts over.

    Returns:
        A new state; the inputs are not changed. Residuals and velocities are combined in
        float64 and stored in their saved dtype, on the device of the first old rank's tensor
        (the sync moves them to the gradient's device at their first use).
    """
    rank, world = _check_rank(rank, world)
    if not isinstance(reset_robust, bool):
        raise TypeError(f"{_OWNER}: reset_robust must be True or False, got {reset_robust!r}")
    given = _by_rank(states)
    old_world = _old_world(given)
    weights = _weights(old_world, rank, world)
    missing = [r for r, _ in weights if r not in given]
    if missing:
        raise ValueError(
            f"{_OWNER}: rank {rank} of {world} needs the states of old rank(s) {missing} "
            f"(reshard_sources({old_world}, {rank}, {world}) = "
            f"{[r for r, _ in weights]}); they were not given"
        )
    _check_alike(given)
    first = given[weights[0][0]]
    robust = [k for k in _ROBUST if any(_holds_tensors(s.get(k)) for s in given.values())]
    if robust and not reset_robust:
        raise ValueError(
            f"{_OWNER}: the states hold a robust {' and an '.join(robust)} state, which is "
            f"about the {old_world} workers that saved it and cannot be carried to {world}; "
            "pass reset_robust=True to drop it (the rule then starts over)"
        )
    if first["feedback"].get("velocity"):
        warnings.warn(
            f"{_OWNER}: momentum correction's velocities are carried as the ranks' mean, but "
            "how much of a velocity is applied before it is sent depends on each rank's own "
            "selection: the resumed run applies about as much as the saved one would have, "
            "spread differently over the weights (not exactly, as without momentum correction)",
            stacklevel=2,
        )
    out: dict[str, Any] = {
        k: copy.deepcopy(v)
        for k, v in first.items()
        if k != "feedback" and not (reset_robust and k in _ROBUST)
    }
    out["rank"], out["world"] = rank, world
    out["counters"] = _combine_counters([(given[r]["counters"], w) for r, w in weights])
    feedback = {k: v for k, v in first["feedback"].items() if k not in ("residuals", "velocity")}
    for entry in ("residuals", "velocity"):
        if entry in first["feedback"]:
            feedback[entry] = _combine_tensors(
                [(given[r]["feedback"].get(entry, {}), w) for r, w in weights], entry
            )
    out["feedback"] = feedback
    return out


def _check_rank(rank: int, world: int) -> tuple[int, int]:
    if not is_integer(world, 1):
        raise ValueError(f"{_OWNER}: world must be an integer >= 1, got {world!r}")
    if not (is_integer(rank, 0) and rank < world):
        raise ValueError(
            f"{_OWNER}: rank must be an integer with 0 <= rank < {world}, got {rank!r}"
        )
    return operator.index(rank), operator.index(world)


def _weights(old_world: int, rank: int, world: int) -> list[tuple[int, Fraction]]:
    """(old rank, weight) for new ``rank``: ``world * |I_r ∩ J_rank|``, nonzero ones only.

    In units of 1 / (old_world * world), old rank r covers [r * world, (r + 1) * world) and
    the new rank [rank * old_world, (rank + 1) * old_world): the weight is the overlap over
    old_world."""
    if not is_integer(old_world, 1):
        raise ValueError(f"{_OWNER}: old_world must be an integer >= 1, got {old_world!r}")
    old_world = operator.index(old_world)
    rank, world = _check_rank(rank, world)
    lo, hi = rank * old_world, (rank + 1) * old_world
    out = []
    for r in range(lo // world, min(old_world, -(-hi // world))):
        overlap = min(hi, (r + 1) * world) - max(lo, r * world)
        if overlap > 0:
            out.append((r, Fraction(overlap, old_world)))
    return out


def _by_rank(
    states: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
) -> dict[int, Mapping[str, Any]]:
    """The states by the rank that saved them, checked against where they were given."""
    if isinstance(states, Mapping) and all(is_integer(k, 0) for k in states):
        items = [(operator.index(k), v) for k, v in states.items()]
    elif isinstance(states, Sequence) and not isinstance(states, (str, bytes, Mapping)):
        items = list(enumerate(states))
    else:
        why = ""
        if isinstance(states, Mapping):
            why = (
                " (one state? give every old rank's)"
                if "feedback" in states
                else f" with keys {sorted(states, key=str)[:4]}; the keys must be int ranks"
            )
        raise TypeError(
            f"{_OWNER}: states must be a list of the old ranks' states in rank order, or a dict "
            f"{{old rank: state}}, got {type(states).__name__}{why}"
        )
    if not items:
        raise ValueError(f"{_OWNER}: no states given")
    out = {}
    for where, state in items:
        try:
            owner = "SyncState" if isinstance(state, Mapping) and "ddp_groups" in state else None
            check_state(state, owner or "GradientSync")
            saved = _saved_by(state)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{_OWNER}: the state given for old rank {where!r}: {e}") from e
        if saved is None:
            raise ValueError(
                f"{_OWNER}: the state given for rank {where!r} does not record the rank and "
                "number of ranks that saved it (it is from before sparsetrain recorded them); "
                "it cannot be resharded"
            )
        if saved[0] != where:
            raise ValueError(
                f"{_OWNER}: the state given for old rank {where!r} was saved by rank "
                f"{saved[0]}; give each old rank's own state (in rank order, or keyed by rank)"
            )
        out[saved[0]] = state
    return out


def _holds_tensors(value: Any) -> bool:
    """Whether a robust rule's state holds tensors (per-worker accumulators, momenta, a
    delayed attack's history): numbers alone (a step) are not about the workers."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return False


def _old_world(given: Mapping[int, Mapping[str, Any]]) -> int:
    worlds = {int(s["world"]) for s in given.values()}
    if len(worlds) > 1:
        raise ValueError(
            f"{_OWNER}: the states were saved by runs of different numbers of ranks "
            f"({sorted(worlds)}); give the states of one run"
        )
    return worlds.pop()


def _check_alike(given: Mapping[int, Mapping[str, Any]]) -> None:
    """Refuse states that are not of one run at one step: the entries every rank holds alike
    must be equal (compared by value, tensors included)."""
    ranks = sorted(given)
    base = given[ranks[0]]
    for r in ranks[1:]:
        for key in _SHARED:
            if not _equal(base.get(key), given[r].get(key)):
                raise ValueError(
                    f"{_OWNER}: the states of old ranks {ranks[0]} and {r} differ in {key!r}; "
                    "they must come from one run at one step (each rank's state_dict() saved "
                    "at the same step)"
                )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _combine_counters(parts: list[tuple[Mapping[str, Any], Fraction]]) -> dict[str, Any]:
    names = dict.fromkeys(k for c, _ in parts for k in c)
    out: dict[str, Any] = {}
    for k in names:
        total = sum(float(c.get(k, 0)) * float(w) for c, w in parts)
        ints = all(isinstance(c.get(k, 0), int) for c, _ in parts)
        out[k] = round(total) if ints else total
    return out


def _combine_tensors(
    parts: list[tuple[Mapping[str, Tensor], Fraction]], entry: str
) -> dict[str, Tensor]:
    """Each name's weighted sum over the old ranks (a rank without it counts zeros)."""
    names = dict.fromkeys(n for store, _ in parts for n in store)
    out = {}
    for n in names:
        held = [(store[n], w) for store, w in parts if n in store]
        t0 = held[0][0]
        for t, _ in held[1:]:
            if t.shape != t0.shape or t.dtype != t0.dtype:
                raise ValueError(
                    f"{_OWNER}: the old ranks' {entry} of {n!r} differ in shape or dtype "
                    f"({tuple(t0.shape)} {t0.dtype} and {tuple(t.shape)} {t.dtype}); the states "
                    "must be of one model"
                )
        if len(parts) == 1 and held[0][1] == 1:
            out[n] = t0.clone()  # as many ranks (or a world of one from one): exactly as saved
            continue
        acc = torch.zeros(t0.shape, dtype=torch.float64, device=t0.device)
        for t, w in held:
            acc.add_(t.to(device=t0.device, dtype=torch.float64), alpha=float(w))
        out[n] = acc.to(t0.dtype)
    return out
