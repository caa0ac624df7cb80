"""The multi-process exchange behind ``aggregator=...``: gather every rank's gradient, let the
Byzantine ranks attack, aggregate the same matrix on every rank.

Rounds of one call (one bucket of one step):

1. ``all_gather`` of every rank's flat gradient into the ``[world, d]`` matrix. A Byzantine rank
   running a non-omniscient attack (sign flip, Gaussian, zero, delayed, label flip) sends its
   forged vector in this round already.
2. Omniscient attacks only (ALIE, IPM, the safeguard attack): the Byzantine ranks read the honest
   rows of round 1, forge their vectors, and each one ``broadcast``s its vector, which replaces
   its row on every rank. This second round is what a real omniscient attacker needs: it must see
   the honest gradients of the step before it answers; its cost is counted.
3. Every rank runs the same aggregator on the same matrix, so all ranks get the same update
   (bit for bit on identical hardware) and stay in sync.

Byzantine ranks are the last ``byzantine`` ranks of the group unless ``byzantine_ranks`` names
them, so rank 0 stays honest for reporting.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import operator
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm.accounting import ring_allgather_bytes
from ..comm.p2p import alone, check_group, text_crc
from ..robust.attacks import Attack
from ..robust.base import Aggregator, check_key


def default_byzantine_ranks(world: int, byzantine: int) -> tuple[int, ...]:
    """Return the ranks that attack: the last ``byzantine`` of ``world``."""
    if isinstance(byzantine, bool) or not isinstance(byzantine, int):
        raise TypeError(f"byzantine must be an integer in [0, world), got {byzantine!r}")
    if not 0 <= byzantine < world:
        raise ValueError(f"byzantine must be in [0, world), got {byzantine} with world={world}")
    return tuple(range(world - byzantine, world))


def robust_exchange(
    grad: Tensor,
    *,
    key: str,
    aggregator: Aggregator,
    attack: Attack | None = None,
    byzantine: int = 0,
    byzantine_ranks: Sequence[int] | None = None,
    group: dist.ProcessGroup | None = None,
    step: int = 0,
    check: bool = True,
) -> tuple[Tensor, int]:
    """Aggregate this rank's gradient with every other rank's under a robust rule.

    Args:
        grad: this rank's gradient for one bucket (already compressed and decompressed when a
            compressor is used); any shape, flattened for the exchange.
        key: the bucket's stable name (stateful rules and attacks keep state per key).
        aggregator: a rule from ``sparsetrain.robust.get_aggregator`` built for n = world.
        attack: the attack the Byzantine ranks run; None: every rank is honest.
        byzantine: number of attacking ranks (the last ones), used when ``byzantine_ranks`` is None.
        byzantine_ranks: the attacking ranks (group ranks), overriding ``byzantine``.
        group: the process group (None: WORLD).
        step: the optimizer step (seeds random attacks).
        check: first compare every rank's call (the gradient's size and dtype, the key, the
            rule's and the attack's settings, the Byzantine ranks) in one ``all_gather`` of 6
            ints, so ranks that differ raise together; without it they read each other's
            bytes as their own dtype, abort in gloo, or wait in an attacker's broadcast that
            never comes. ``GradientSync`` and the DDP hook pass False: they compare all of
            this once, when they are built.

    Returns:
        (the aggregate shaped like ``grad``, the same on every rank; bytes this rank sent, ring
        allgather accounting: (p - 1)/p of what is gathered, plus the broadcasts of round 2 and,
        with ``check``, the 6 ints of every rank).

    Raises:
        TypeError: ``aggregator``, ``attack`` or ``group`` is not of the kind named above; the
            key is not a str, or the Byzantine ranks are not integers (with ``check``, after
            the comparison, as the ValueErrors below).
        ValueError: the aggregator is not built for n = world, or the attack not for n = world
            and f = the number of Byzantine ranks; bad Byzantine ranks. These are checked from
            the arguments and the group's size alone; with ``check``, after the comparison
            of the ranks' calls, so that ranks given other arguments raise together (those
            whose own are refused with that refusal), and also ranks that differ in any of the
            call's settings above, or whose attacker's state refuses the call (a delayed
            attack's key whose size changed: :meth:`Attack.refusal`), on every rank.

    Example:
        >>> rule = get_aggregator("median", n=dist.get_world_size(), f=1)  # doctest: +SKIP
        >>> out, sent = robust_exchange(g, key="b0", aggregator=rule, attack=get_attack(  # doctest: +SKIP
        ...     "sign_flip", n=world, f=1, scale=10.0), byzantine=1)
    """
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            "aggregator must be a rule from sparsetrain.robust.get_aggregator, got "
            f"{type(aggregator).__name__}"
        )
    if attack is not None and not isinstance(attack, Attack):
        raise TypeError(
            "attack must be None or an attack from sparsetrain.robust.get_attack, got "
            f"{type(attack).__name__}"
        )
    check_group(group)
    if alone():  # one process, no process group: a world of one, as the collectives take it
        world, rank = 1, 0
    else:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    # Refusals of this rank's own arguments wait for the comparison below (with ``check``), so
    # that ranks given other arguments, of which only some are refused, all raise.
    try:
        check_key(key)
        type_error = None
    except TypeError as e:
        type_error = str(e)
    if byzantine_ranks is not None:
        ranks = list(byzantine_ranks)
        try:  # numpy's integers too; not bools or floats
            if any(isinstance(r, bool) for r in ranks):
                raise TypeError
            ints = [operator.index(r) for r in ranks]
        except TypeError:
            ints = None
            type_error = (
                type_error or f"byzantine_ranks must be integers (group ranks), got {ranks!r}"
            )
        byz = tuple(sorted(set(ints))) if ints is not None else ("not integers", repr(ranks))
        refusal = _refusal(aggregator, attack, byz, world) if ints is not None else None
    else:
        try:
            byz = default_byzantine_ranks(world, byzantine)
            refusal = _refusal(aggregator, attack, byz, world)
        except ValueError as e:  # a count out of range: compared as the count itself
            byz, refusal = (-1, int(byzantine)), str(e)
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r}")
    flat = grad.detach().reshape(-1).contiguous()
    d, elem = flat.numel(), flat.element_size()
    attacking = attack is not None and rank in byz
    # What only an attacker's own state refuses (a delayed attack's key whose size changed):
    # told in the comparison, so that the honest ranks raise too instead of waiting for it.
    declined = (
        attack.refusal(flat, key) if attacking and type_error is None and refusal is None else None
    )
    own = (  # this rank's own refusal, raised after the comparison
        TypeError(type_error) if type_error is not None
        else ValueError(refusal) if refusal is not None
        else ValueError(declined) if declined is not None
        else None
    )  # fmt: skip
    checked = 0
    if check and world > 1:
        try:
            _agree(flat, key, aggregator, attack, byz, group, world, declined is not None)
        except ValueError:
            if own is not None:
                raise own from None
            raise
        checked = ring_allgather_bytes(world * 6 * 8, world)
    if own is not None:
        raise own

    if attacking and not attack.omniscient:
        mine = attack(flat, key=key, step=step, workers=[rank]).to(flat.dtype).contiguous()
    else:
        mine = flat
    if world == 1:
        rows = mine.unsqueeze(0).clone()
    else:
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        rows = torch.stack(parts)
    sent = checked + ring_allgather_bytes(world * d * elem, world)

    if attack is not None and attack.omniscient and byz:
        honest = rows[[r for r in range(world) if r not in byz]]
        forged = (
            attack(flat, honest=honest, key=key, step=step, workers=[rank]) if attacking else None
        )
        for b in byz:
            buf = forged.to(flat.dtype).contiguous() if rank == b else torch.empty_like(flat)
            src = b if group is None else dist.get_global_rank(group, b)
            dist.broadcast(buf, src=src, group=group)
            rows[b] = buf
        sent += ring_allgather_bytes(len(byz) * d * elem, world)

    out = aggregator(rows, key=key)
    return out.reshape(grad.shape).to(grad.dtype), sent


def _refusal(
    aggregator: Aggregator, attack: Attack | None, byz: tuple[int, ...], world: int
) -> str | None:
    """Why the rule, the attack or the Byzantine ranks do not fit a group of ``world``; None
    where they do."""
    if aggregator.n != world:
        return (
            f"the aggregator was built for n={aggregator.n} workers but the group has {world} ranks"
        )
    if any(not 0 <= r < world for r in byz) or len(byz) >= world:
        return f"byzantine ranks {byz} must be fewer than world={world} and in [0, {world})"
    if attack is not None and (attack.n != world or attack.f != len(byz)):
        return (
            f"the attack {attack.name!r} was built for n={attack.n} workers of which "
            f"f={attack.f} attack, but the group has {world} ranks of which {len(byz)} attack "
            f"(ranks {list(byz)}); build it with get_attack({attack.name!r}, n={world}, "
            f"f={len(byz)}, ...)"
        )
    return None


def _settings(rule: Aggregator | Attack | None) -> str:
    """The rule's name and options as text that equal options give alike on every rank (1 and
    1.0, a dict in any order)."""
    if rule is None:
        return "none"
    options = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule) if f.init}
    return f"{rule.name}: {json.dumps(_plain(options), sort_keys=True)}"


def _plain(value: object) -> object:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # (a whole float as the int it equals: 1.0 as 1)
        f = float(value)
        return int(f) if f.is_integer() else f
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _agree(
    flat: Tensor,
    key: str,
    aggregator: Aggregator,
    attack: Attack | None,
    byz: tuple,
    group: dist.ProcessGroup | None,
    world: int,
    declined: bool = False,
) -> None:
    """Gather 6 ints naming this rank's call from every rank; raise alike on every rank where
    they differ, naming what, or where an attacking rank's attack ``declined`` the call (its
    attack field is then -1)."""
    fields = [
        ("gradient size (number of elements)", flat.numel(), str(flat.numel())),
        ("gradient dtype", text_crc(str(flat.dtype)), str(flat.dtype)),
        ("key", text_crc(repr(key)), repr(key)),  # (repr: a key 0 is not the key '0')
        ("aggregator settings", text_crc(_settings(aggregator)), _settings(aggregator)),
        ("attack settings", -1 if declined else text_crc(_settings(attack)), _settings(attack)),
        ("Byzantine ranks", text_crc(repr(byz)), repr(list(byz))),
    ]
    mine = torch.tensor([v for _, v, _ in fields], dtype=torch.int64, device=flat.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    everyone = torch.stack(parts).tolist()
    refused = [r for r, row in enumerate(everyone) if row[4] == -1]
    if refused:
        raise ValueError(
            f"robust_exchange: the attack of Byzantine rank(s) {refused} refused this call "
            f"(key {key!r}; that rank raises why), so no rank goes on with it"
        )
    differ = [
        (what, shown)
        for j, (what, _, shown) in enumerate(fields)
        if len({r[j] for r in everyone}) > 1
    ]
    if differ:
        bad = sorted({r for r, row in enumerate(everyone) if row != everyone[0]})
        raise ValueError(
            "robust_exchange: the ranks call it with different "
            + ", ".join(what for what, _ in differ)
            + f" (ranks {bad} differ from rank 0; this rank has "
            + "; ".join(f"{what} {shown:.200}" for what, shown in differ)
            + "); every rank must pass the same bucket's gradient under the same key, rule, "
            "attack and Byzantine ranks"
        )


__all__ = ["default_byzantine_ranks", "robust_exchange"]
