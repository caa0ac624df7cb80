"""One gradient exchange, written once: compensate -> compress -> update -> communicate.

The DDP hook hands its buckets (flat tensors) to :meth:`SyncEngine.exchange`;
:class:`~sparsetrain.sync.GradientSync` hands the parameters' own gradients to
:meth:`SyncEngine.exchange_into`, which averages them where they are. Both call
:meth:`SyncEngine.end_step` once per optimizer step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _native
from .._options import caller_stacklevel, is_integer, state_mapping
from ..comm import CollectiveResult, all_gather_variable, get_collective, ring_allreduce_bytes
from ..comm.gather import _allreduce, world_of
from ..compressors.base import SparseCompressor, work_dtype
from ..feedback import ErrorFeedback
from .config import SyncConfig, check_process_group, config_differences
from .devices import agreement_device, device_code, on_device, without_autocast


# The engine's allreduces, without the public functions' agreement check: the ranks' buckets,
# compressors and payload sizes agree by construction (check_consistent, the step's agreement).
def allreduce_sum(tensors: Sequence[Tensor], group: dist.ProcessGroup | None):
    return _allreduce(tensors, group, "sum")


def allreduce_max(tensors: Sequence[Tensor], group: dist.ProcessGroup | None):
    return _allreduce(tensors, group, "max")


# Totals since construction (or the loaded state). The *_seconds are host wall-clock time
# (time.perf_counter around the calls): on CUDA, where kernels and NCCL run asynchronously, they
# measure kernel launches plus whatever host syncs fall inside, not the time the GPU spent.
_COUNTERS = (
    "bytes_sent",
    "bytes_recv",
    "dense_bytes",
    "compress_seconds",
    "comm_seconds",
    "steps",
    "skipped_steps",
)


# What every state that SyncEngine.state_dict returns holds, and the entries it may hold besides
# (the hook adds its DDP groups and caps, GradientSync its buckets).
_STATE_ENTRIES = ("step", "counters", "feedback", "compressor")
_OPTIONAL_ENTRIES = (
    "config", "rank", "world", "loss_scale", "collectives", "aggregator", "attack",
    "ddp_groups", "ddp_bucket_caps_bytes", "buckets",
)  # fmt: skip


def check_state(state: Any, owner: str) -> None:
    """Refuse a ``state`` for ``owner.load_state_dict`` that is not a dict of the kind
    ``owner.state_dict()`` returns, naming what is wrong."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{owner}.load_state_dict takes the dict that {owner}.state_dict() returned, got "
            f"{type(state).__name__}"
        )
    missing = [k for k in _STATE_ENTRIES if k not in state]
    if missing:
        raise ValueError(
            f"{owner}.load_state_dict takes the dict that {owner}.state_dict() returned, with "
            f"the entries {', '.join(_STATE_ENTRIES)}; this one lacks {', '.join(missing)}"
        )
    if not is_integer(state["step"], 0):
        raise ValueError(f"the state's 'step' must be an integer >= 0, got {state['step']!r}")
    for key in ("counters", "feedback", "compressor", "config"):
        if key in state and not isinstance(state[key], Mapping):
            raise ValueError(
                f"the state's {key!r} must be a dict (as state_dict() returns it), got "
                f"{type(state[key]).__name__}"
            )


# Elements per piece of the compensation that the threshold compressor marks as it is written:
# the piece, its gradient and its residual (768 KiB of float32) stay in L2 cache between the
# writing and the marking. On the 2-core test machine, 9.7M elements compensated, marked and
# summed this way took 14 ms against 18 ms in separate passes (1M-element pieces: 16 ms).
_FUSED_CHUNK = 1 << 16
# The selection buffer of a fused pass that selects nothing (above +inf): it records no entry.
_NO_HITS = torch.empty(0, dtype=torch.int64)


def describe(config: SyncConfig, compressor: Any) -> str:
    """The compressor (with its options), the collective and every other setting of ``config``
    that is not its default, as ``name=value`` pairs for a repr."""
    parts = [f"compressor={compressor!r}", f"collective={config.collective!r}"]
    for f in dataclasses.fields(config):
        if f.name in ("compressor", "compressor_options", "collective"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(config, f.name)
        if value != default:
            parts.append(f"{f.name}={value!r}")
    return ", ".join(parts)


class SyncEngine:
    """Compress, exchange and average gradients; keep residuals, counters and state.

    Args:
        config: a validated :class:`SyncConfig`.
        group: the process group (None: the default group, WORLD).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any. The gradients
            then arrive multiplied by its scale, and so the error-feedback residuals and the
            thresholds kept across steps are in those units: when the scale changes between
            steps, they are multiplied by the ratio before the next exchange (exactly, for the
            scaler's powers of two), so a run with a scaler sends what one without it would,
            times the scale. ``loss_scale`` is the scale they are in (1 without a scaler).
    """

    def __init__(
        self,
        config: SyncConfig,
        group: dist.ProcessGroup | None = None,
        grad_scaler: Any = None,
    ):
        check_process_group(group, "group")
        self.config = config
        self.group = group
        self.grad_scaler = grad_scaler
        self.loss_scale = 1.0  # the units of the residuals and of the kept thresholds
        self._scale_read = False  # this step has compared loss_scale with the scaler's
        self.scaler_missing = False  # a state unpickled from a scaled hook, no scaler set yet
        # The first step checks that the ranks agree on having a scaler: each rank may set
        # state.grad_scaler on its own (after unpickling a state, say), and a rank whose
        # state was unpickled must not run a collective the others do not.
        self.agree_scaler = True
        # ... and, at the first step after a load too, that the ranks are at the same step: a
        # state loaded on some ranks only, or states saved at different steps, would put them
        # in different exchanges (a dense warm-up here, a sparse gather there) or draw
        # different random-k indices.
        self.agree_step = True
        # With on_nonfinite="propagate": the step's results so far, made NaN if a later bucket
        # turns out non-finite (DDP copies them into the gradients only when backward ends).
        self._outputs: list[Tensor] = []
        self.compressor = self._new_compressor()
        self.feedback = ErrorFeedback(bool(config.use_error_feedback), config.momentum_correction)
        self._collectives: dict[str, Any] = {}
        self.auto_choices: dict[int, str] = {}  # bucket size -> what "auto" picked for it
        self.aggregator, self.attack = self._new_robust()
        self.step = 0
        self.counters: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        self.skipped_last_step = False
        self._skipping = False
        self._staging: Tensor | None = None  # reused by the dense in-place path
        self._marks: Tensor | None = None  # all False between calls of _not_selected
        self._keys_seen: dict[str, frozenset[str]] = {}  # bucket keys exchanged: parameters
        self._frozen_now: Sequence[bool] | None = None  # exchange_into's frozen, during it
        # Ranks whose gradient is not finite in the bucket being exchanged, when a robust rule
        # takes them as Byzantine rows (:meth:`_tolerates`); and whether this rank is one.
        self._tolerated = 0
        self._tolerated_here = False
        self._refusal: str | None = None  # refuse_step's message, until the step's first check
        # (rank, world) a loaded state was saved by, until the next step: checked there after a
        # strict load, and what state_dict() records meanwhile (the state is still theirs).
        self._loaded_from: tuple[int, int] | None = None
        self._check_loaded = False

    def __repr__(self) -> str:
        return f"SyncEngine({describe(self.config, self.compressor)}, step={self.step})"

    # Parts of the state, built as the config says (load_state_dict checks a state on new ones).
    def _new_compressor(self) -> Any:
        comp = self.config.build_compressor()
        if comp.rank_seeded and dist.is_initialized():
            comp.seed += dist.get_rank(self.group)
        comp.bind(dist.get_world_size(self.group) if dist.is_initialized() else 1)
        return comp

    def _new_robust(self, warn: bool = True) -> tuple[Any, Any]:
        config = self.config
        if config.aggregator is None and config.attack is None:
            return None, None
        from ..robust import get_aggregator, get_attack

        world = world_of(self.group)
        options = dict(config.aggregator_options)
        given = "f" in options
        f = options.pop("f", config.byzantine)  # the ranks it tolerates: by default the attackers
        name = config.aggregator or "mean"
        try:
            aggregator = get_aggregator(name, n=world, f=f, **options)
        except ValueError as e:  # the rule's words, and where n and f came from
            given_as = [f"aggregator_options={config.aggregator_options}"] * bool(options or given)
            given_as += [] if given else [f"f=byzantine={f}"]
            raise ValueError(
                f"aggregator {name!r} with {', '.join(given_as)} on a world of {world} ranks: {e}"
            ) from e
        if (
            warn
            and aggregator.tolerates_none()
            and (not dist.is_initialized() or dist.get_rank(self.group) == 0)
        ):
            warnings.warn(
                f"aggregator {name!r} is built for f=0 Byzantine ranks, so it tolerates none "
                "(it protects by f): give the number of ranks it must tolerate with "
                "aggregator_options={'f': F} (sparsetrain train: --aggregator-option f=F)",
                stacklevel=caller_stacklevel(),
            )
        attack = None
        if config.attack is not None:
            try:
                attack = get_attack(
                    config.attack, n=world, f=config.byzantine, **config.attack_options
                )
            except ValueError as e:
                raise ValueError(
                    f"attack {config.attack!r} with attack_options {config.attack_options}, "
                    f"byzantine={config.byzantine}, on a world of {world} ranks: {e}"
                ) from e
        return aggregator, attack

    def _collective_for(self, numel: int, dtype: torch.dtype) -> Any:
        """Return the sparse collective for a bucket of ``numel`` elements of ``dtype`` ("dense"
        for a dense allreduce of the densified payload, which "auto" picks when the cost model
        says so, pricing the values at ``dtype``'s size and the indices at theirs).

        "auto" decides from k = density * numel, not from this rank's count, so that every rank
        makes the same choice even when thresholding keeps different counts on different ranks.
        """
        name = self.config.collective
        if name == "auto":
            from ..compressors import k_for
            from ..compressors.base import index_dtype
            from ..perfmodel import EXACT, best_collective

            density = float(getattr(self.compressor, "density", 1.0))
            name = best_collective(
                numel=numel,
                nnz=k_for(numel, density),
                world=world_of(self.group),
                params=self.config.auto_network,
                value_bytes=dtype.itemsize,
                index_bytes=index_dtype(numel).itemsize,
                candidates=self.config.auto_candidates or EXACT,
                sorted_input=bool(getattr(self.compressor, "sorted_indices", False)),
            )
            self.auto_choices[numel] = name
        if name == "dense":
            return name
        if name not in self._collectives:
            self._collectives[name] = get_collective(
                name, **self.config.collective_options_for(name)
            )
        return self._collectives[name]

    # ---- the exchange --------------------------------------------------------------------
    def exchange(self, flat: Tensor, names: Sequence[str], shapes: Sequence[torch.Size]) -> Tensor:
        """Return the average over ranks of ``flat`` (a 1-D tensor packing ``names``), as sent.

        The compressor always sees the parameters in one canonical order (sorted by name), so its
        per-key state, random draws and selection do not depend on how DDP happened to order a
        bucket: the first iteration after a restart (before DDP rebuilds its buckets) compresses
        exactly as the uninterrupted run does.

        On CUDA, ``flat``'s device is the current device meanwhile: NCCL's point-to-point
        batches run on the current device, which a caller of :class:`GradientSync` may have
        left at ``cuda:0``.

        Raises:
            FloatingPointError: a rank's gradient has NaN or Inf and ``on_nonfinite="raise"``
                (raised on every rank, naming the ranks and parameters).
        """
        with without_autocast(flat.device):
            self._begin_step(flat.device)
            with on_device(flat.device):
                out = self._exchange_flat(flat, names, shapes)
        if self._propagating:
            self._outputs.append(out)
        if self._skipping:  # dropped during this bucket: _drop filled only the earlier ones
            out.fill_(self._dropped)
        else:
            self._check_result([out])
        return out

    def exchange_into(
        self,
        parts: Sequence[Tensor],
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        *,
        frozen: Sequence[bool] | None = None,
    ) -> None:
        """Average over ranks the gradients ``parts`` (one 1-D tensor for each of ``names``, of
        the same dtype and device, each anywhere in memory), writing the average into them.

        The same values as :meth:`exchange` of their concatenation. The sparse path works on
        the parts where they are: no copy of the gradients into one tensor and none back (two
        passes over memory fewer than packing them); other compressors and collectives pack
        them, exchange, and copy the result back.

        ``frozen``: which of ``names`` this rank has frozen (their parts are zeros). The ranks
        then check, in the message that agrees on finiteness, that they froze the same ones.

        Raises:
            ValueError: ``parts`` do not match ``names`` and ``shapes`` (count, length, 1-D),
                or differ in dtype or device.
            FloatingPointError: as :meth:`exchange`.
            RuntimeError: ``frozen`` differs between ranks (raised on every rank, naming the
                parameters and the ranks).
        """
        parts = list(parts)
        if not (len(parts) == len(names) == len(shapes)) or not parts:
            raise ValueError(
                f"exchange_into needs one part for each name and shape; got {len(parts)} parts, "
                f"{len(names)} names and {len(shapes)} shapes"
            )
        if frozen is not None and len(frozen) != len(names):
            raise ValueError(
                f"exchange_into's frozen needs one flag for each name; got {len(frozen)} flags "
                f"for {len(names)} names"
            )
        self._frozen_now = frozen
        try:
            with without_autocast(parts[0].device):
                self._exchange_into(parts, names, shapes)
        finally:
            self._frozen_now = None

    def _exchange_into(
        self, parts: list[Tensor], names: Sequence[str], shapes: Sequence[torch.Size]
    ) -> None:
        numels = [math.prod(s) for s in shapes]
        for name, part, k in zip(names, parts, numels):
            if part.dim() != 1 or part.numel() != k:
                raise ValueError(
                    f"the part for {name!r} must be 1-D with {k} elements (its shape's size), "
                    f"got shape {tuple(part.shape)}"
                )
            if part.dtype != parts[0].dtype or part.device != parts[0].device:
                raise ValueError(
                    f"parts must share one dtype and device: {name!r} is {part.dtype} on "
                    f"{part.device}, {names[0]!r} is {parts[0].dtype} on {parts[0].device}"
                )
        self._begin_step(parts[0].device)
        if self._propagating:
            self._outputs.extend(parts)
        if self._skipping or not self._sparse_fast_path():
            flat = torch.cat(parts)
            with on_device(flat.device):
                out = self._exchange_flat(flat, names, shapes)
            for part, res in zip(parts, torch.split(out, numels)):
                part.copy_(res)
        else:
            with on_device(parts[0].device):
                world = self._count_dense(sum(numels), parts[0].element_size())
                order = _canonical_order(names)
                self._exchange_sparse(parts, list(names), list(shapes), numels, order, world)
        if self._skipping:  # dropped in this bucket's sparse exchange, which may not have
            for part in parts:  # cleared the parts (float16, CUDA, no native kernel)
                part.fill_(self._dropped)
        else:
            self._check_result(parts)

    def _check_result(self, results: Sequence[Tensor]) -> None:
        """A result that is not finite although every rank's gradient was (an overflow in the
        exchange itself, such as the fp16 compressor's cast of a large gradient, or a sum past
        the dtype's range) is treated as a non-finite gradient is: "raise" raises, "skip" and
        "propagate" drop the step, so that what it committed to the residuals is rolled back
        and the step is counted as skipped (its results zero or NaN). Every exchange leaves
        every rank the same result, so the ranks agree without a message (were they to differ,
        a rank that drops the step would stop issuing its collectives while the others go on).
        A finite sum proves its tensor finite, without a boolean copy of the bucket; only a sum
        that is not is looked into."""
        if self._skipping:
            return
        sums = torch.stack([t.sum() for t in results])
        if bool(torch.isfinite(sums).all()) or all(bool(torch.isfinite(t).all()) for t in results):
            return
        self._drop()
        if self.config.on_nonfinite == "raise" and self._tolerated:
            raise FloatingPointError(
                f"the robust rule {self.config.aggregator!r} returned a non-finite gradient "
                f"from {self._tolerated} rank(s)' NaN or Inf (it was built for f="
                f"{self.aggregator.f}); lower the learning rate, use gradient clipping, or pass "
                "on_nonfinite='skip' to drop such steps on every rank"
            )
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(
                "the ranks' average gradient is not finite although every rank's gradient was: "
                "the exchange overflowed (the fp16 compressor's cast of a rank's share of the "
                "average, its gradient divided by the number of ranks, past 65504, or a sum "
                f"past {results[0].dtype}'s range); lower the learning "
                "rate or the loss scale, use gradient clipping, or pass on_nonfinite='skip' to "
                "drop such steps on every rank"
            )
        for t in results:  # "propagate": _drop has filled them with the others
            t.fill_(self._dropped)

    @property
    def world(self) -> int:
        """The number of ranks in the group (1 without a process group)."""
        return world_of(self.group)

    def refuse_step(self, message: str) -> None:
        """Make this step's first exchange raise ``ValueError(message)`` here and a pointer to
        it on every other rank: the refusal rides in the message that agrees the step is
        finite, so a rank that cannot go on does not leave the others waiting for it."""
        self._refusal = message

    def _drop(self) -> None:
        """Drop this step on this rank (every rank does so at the same point): later buckets
        return what :attr:`_dropped` says, and with "propagate" the step's results so far
        become NaN; :meth:`end_step` rolls the residuals back."""
        self._skipping = True
        if self._propagating:
            for out in self._outputs:
                out.fill_(math.nan)

    def _sparse_collective(self, coll, indices: Tensor, values: Tensor, numel: int, key: str):
        """Call a sparse collective, counting its time and bytes. With "propagate", a sum the
        collective refuses as non-finite (Ok-Topk and gTop-k cannot select from Inf; every rank
        learns it in the same message, or the same selection, and raises together) drops the
        step instead: returns None."""
        try:
            res: CollectiveResult = self._timed_comm(
                coll, indices, values, numel, group=self.group, key=key
            )
        except FloatingPointError:
            self._drop()  # "raise" too: end_step rolls back what earlier buckets kept
            if self.config.on_nonfinite == "raise":
                raise
            return None
        self._count(res.bytes_sent, res.bytes_recv)
        return res

    @property
    def _propagating(self) -> bool:
        return self.config.on_nonfinite == "propagate"

    @property
    def _dropped(self) -> float:
        """What a dropped step's gradients are filled with: NaN for "propagate", else zero."""
        return math.nan if self._propagating else 0.0

    def _begin_step(self, device: torch.device) -> None:
        """At a step's first exchange: bring the residuals and kept thresholds to the loss scale
        of this step's gradients (the scaler's, read once a step; 1 without one)."""
        if self._scale_read:
            return
        self._scale_read = True
        if self.agree_scaler or self.agree_step:
            try:
                self._agree_on_scaler(device)
            except BaseException:
                self._scale_read = False
                raise
        scale = 1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale())
        if scale == self.loss_scale:
            return
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the grad_scaler's scale must be finite and > 0, got {scale}")
        self.rescale(scale / self.loss_scale)
        self.loss_scale = scale

    def _agree_on_scaler(self, device: torch.device) -> None:
        """The first step: raise on every rank if a rank's state was pickled with a scaler and
        has none set again, if the ranks differ in having one (a scaled and an unscaled
        gradient would be summed), or if their gradients are on different device types. One
        small allreduce, once.

        The allreduce runs where the group moves CPU tensors if it can ("cpu:gloo,cuda:nccl",
        the default of ``init_process_group()``, does): on a rank's own device, a CPU rank's
        header would go to gloo and a CUDA rank's to NCCL, and both would wait for ever."""
        world = world_of(self.group)
        rank = dist.get_rank(self.group) if world > 1 else 0
        meeting = agreement_device(self.group, device)
        flags = torch.zeros(6 * world, dtype=torch.int64, device=meeting)
        flags[rank] = int(self.scaler_missing and self.grad_scaler is None)
        flags[world + rank] = int(self.grad_scaler is not None)
        flags[2 * world + rank] = device_code(device)
        flags[3 * world + rank] = self.step
        saved_rank, saved_world = (self._check_loaded and self._loaded_from) or (-1, -1)
        flags[4 * world + rank] = saved_rank
        flags[5 * world + rank] = saved_world
        if world > 1:
            with on_device(meeting):
                dist.all_reduce(flags, group=self.group)
        seen = flags.tolist()  # one device sync, not one per rank
        missing = [r for r in range(world) if seen[r]]
        scaled = [r for r in range(world) if seen[world + r]]
        codes = seen[2 * world : 3 * world]
        steps = seen[3 * world : 4 * world]
        _check_saved_by(seen[4 * world : 5 * world], seen[5 * world :])
        self._loaded_from, self._check_loaded = None, False
        if len(set(steps)) > 1:
            at = ", ".join(f"rank {r} at step {s}" for r, s in enumerate(steps))
            raise RuntimeError(
                f"the ranks' gradient sync states are at different steps ({at}): load on every "
                "rank the state it saved at the same step (each rank its own; a state loaded on "
                "some ranks only leaves the others at their own step), or on none"
            )
        if len(set(codes)) > 1:
            mine = [r for r in range(world) if codes[r] == codes[rank]]
            others = [r for r in range(world) if codes[r] != codes[rank]]
            raise RuntimeError(
                f"the ranks' gradients are on different device types: rank(s) {mine} on "
                f"{device.type}, rank(s) {others} on another; put every rank's model on the "
                "same device type (each rank's own GPU, or the CPU everywhere) before training"
            )
        if missing:
            raise RuntimeError(
                f"rank(s) {missing} have no grad_scaler, but their hook state was pickled from "
                "one with a grad_scaler, which pickling leaves out: set state.grad_scaler = "
                "scaler (the training loop's) on every rank before the next step, or the "
                f"residuals, kept at loss scale {self.loss_scale}, would be taken for unscaled "
                "ones"
            )
        if scaled and len(scaled) != world:
            raise RuntimeError(
                f"rank(s) {scaled} have a grad_scaler and the others none: set "
                "state.grad_scaler on every rank or on none (a scaled and an unscaled gradient "
                "would be summed)"
            )
        self.agree_scaler = self.agree_step = False

    def rescale(self, factor: float) -> None:
        """Multiply everything kept in the gradients' units by ``factor``: the error-feedback
        residuals and velocities, the compressor's and the collectives' thresholds."""
        self.feedback.rescale(factor)
        self.compressor.rescale(factor)
        for coll in self._collectives.values():
            coll.rescale(factor)

    def _count_dense(self, numel: int, element_size: int) -> int:
        """Count what a ring allreduce of ``numel`` elements would send; return the world size."""
        world = world_of(self.group)
        self.counters["dense_bytes"] += ring_allreduce_bytes(numel, element_size, world)
        return world

    def _exchange_flat(
        self, flat: Tensor, names: Sequence[str], shapes: Sequence[torch.Size]
    ) -> Tensor:
        numels = [math.prod(s) for s in shapes]
        if sum(numels) != flat.numel():
            raise ValueError(
                f"layout covers {sum(numels)} elements but the flat tensor has {flat.numel()}"
            )
        world = self._count_dense(flat.numel(), flat.element_size())
        if self._skipping:
            return torch.full_like(flat, self._dropped)
        order = _canonical_order(names)
        if self._sparse_fast_path():
            # Checks finiteness itself, in the pass that compensates the gradient.
            parts = list(torch.split(flat, numels))
            self._exchange_sparse(parts, list(names), list(shapes), numels, order, world, flat)
            return flat
        if self._nonfinite(torch.split(flat, numels), names, world, flat=flat):
            return torch.full_like(flat, self._dropped)
        if self._dense_fast_path():
            return self._exchange_dense_inplace(flat, numels, order, world)
        if order == list(range(len(names))):
            return self._exchange(flat, list(names), list(shapes), numels, world)
        parts = torch.split(flat, numels)
        canon = [numels[i] for i in order]
        out = self._exchange(
            torch.cat([parts[i] for i in order]),
            [names[i] for i in order],
            [shapes[i] for i in order],
            canon,
            world,
        )
        return _to_bucket_order(out, flat, order, numels)

    def _dense_fast_path(self) -> bool:
        """Whether this step can take :meth:`_exchange_dense_inplace`: an element-wise summable
        compressor (none, fp16, bf16) without error feedback or robust aggregation."""
        return (
            self.compressor.elementwise
            and not self.feedback.enabled
            and self.aggregator is None
            # The warm-up sends no cast (with no cast to skip, "none" is the warm-up itself).
            and (self.step >= self.config.dense_warmup_steps or self.config.compressor == "none")
        )

    def _exchange_dense_inplace(
        self, flat: Tensor, numels: list[int], order: list[int], world: int
    ) -> Tensor:
        """Average the bucket in place: divide it by the number of ranks, then allreduce it
        (through the compressor's cast, if any), as torch's own hooks do.

        The values are those of :meth:`_exchange`, bit for bit: a ring allreduce sums each chunk
        of the vector in a different order of ranks, so the vector is still summed in canonical
        order (through one staging buffer, reused by every bucket, when DDP's order differs) and
        a restarted run, whose first buckets are ordered differently, sums exactly as the
        uninterrupted one. For "none" the dense warm-up is this same allreduce; the casts warm
        up in :meth:`_exchange`, uncast.
        """
        t0 = time.perf_counter()
        identity = order == list(range(len(order)))
        if identity:
            buf = flat
        else:
            if (
                self._staging is None
                or self._staging.numel() < flat.numel()
                or self._staging.dtype != flat.dtype
                or self._staging.device != flat.device
            ):
                self._staging = torch.empty_like(flat)
            buf = self._staging[: flat.numel()]
            parts = torch.split(flat, numels)
            torch.cat([parts[i] for i in order], out=buf)
        if world > 1:  # before the sum, as torch's hooks do: then it cannot overflow float16
            buf.div_(world)  # where the average fits
        (wire,), _ = self.compressor.compress(buf)
        self.counters["compress_seconds"] += time.perf_counter() - t0
        if world > 1:
            self._timed_comm(dist.all_reduce, wire, group=self.group)
        sent = ring_allreduce_bytes(wire.numel(), wire.element_size(), world)
        self._count(sent, sent)
        t0 = time.perf_counter()
        if wire.data_ptr() != buf.data_ptr():
            buf.copy_(wire.view(buf.shape))
        out = buf if identity else _to_bucket_order(buf, flat, order, numels)
        self.counters["compress_seconds"] += time.perf_counter() - t0
        return out

    def _sparse_fast_path(self) -> bool:
        """Whether this step can take :meth:`_exchange_sparse`: a sparse compressor whose payload
        decodes as its values at its indices, a sparse collective, no robust aggregation, past
        the dense warm-up."""
        return self._sparse_capable() and self.step >= self.config.dense_warmup_steps

    def _sparse_capable(self) -> bool:
        comp = self.compressor
        return (
            comp.wire == "sparse"
            and comp.rounds == 1
            and type(comp).decompress is SparseCompressor.decompress
            and self.aggregator is None
        )

    def reserve(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Take the memory the sparse path keeps for a group of parameters (error feedback's
        two buffers, the selection's marks) now, filled with zeros, instead of in the first
        steps, as DDP takes its buckets when it is built. Changes no value; does nothing for
        compressors that do not take the sparse path."""
        if not self._sparse_capable():
            return
        order = _canonical_order(names)
        cnames = [names[i] for i in order]
        numels = [math.prod(shapes[i]) for i in order]
        total = sum(numels)
        self.feedback.reserve("|".join(cnames), cnames, total, dtype, device)
        if torch.device(device).type == "cpu" and not self.feedback.momentum:
            marker = getattr(self.compressor, "marker", None)
            if marker is not None:
                marker(total, 0.0)  # makes the marks' buffer; marks nothing
            buffer = getattr(self.compressor, "hits_buffer", None)
            if buffer is not None:
                buffer(total, dtype)  # the native kernel's selection buffers
        if self._marks is None or self._marks.numel() < total:
            self._marks = torch.zeros(total, dtype=torch.bool, device=device)

    def _exchange_sparse(
        self,
        parts: list[Tensor],
        names: list[str],
        shapes: list[torch.Size],
        numels: list[int],
        order: list[int],
        world: int,
        flat: Tensor | None = None,
    ) -> None:
        """The exchange for sparse payloads, with work in the sent entries, not the length.

        Computes what :meth:`_exchange` computes, bit for bit, without a dense temporary, and
        writes it into ``parts`` (the gradients of ``names``, 1-D, in the bucket's order): the
        parts are compensated straight into canonical order in a reused buffer, the residual is
        that buffer with the sent entries subtracted, and a global selection is written into
        the parts, segment by segment. Leaves zeros when some rank's gradient is not finite and
        the step is skipped (:meth:`_nonfinite`). ``flat``: the parts in one tensor, where they
        are (a DDP bucket), for the finiteness check to read in one call.

        A compressor that selects by a reused threshold on CPU (``threshold``) marks the
        entries it will select while the compensation writes them, piece by piece, and on the
        way each piece is summed and its gradient cleared in ``parts`` (which only receive the
        result afterwards): finite sums prove the gradient finite, so neither the finiteness
        check nor the clearing costs a pass over memory of its own (only a non-finite sum
        looks at the gradient itself, before it is cleared). Where sparsetrain's native kernel
        is available (:mod:`sparsetrain._native`), it does all of that, the selection's indices
        included, in one pass instead, with the same values. Nothing is committed before every
        rank has agreed the step is finite; a step that is not leaves the gradient zero.
        """
        cnames = [names[i] for i in order]
        cnumels = [numels[i] for i in order]
        numel = sum(numels)
        key = "|".join(cnames)
        self._first_use(key, cnames)
        cparts = [parts[i] for i in order]
        comp = self.compressor
        marked, hits, fused = None, None, None
        t0 = time.perf_counter()
        if parts[0].device.type == "cpu" and not self.feedback.momentum:
            reused = getattr(comp, "reused_threshold", None)
            marked = reused(key, numel) if reused is not None else None
            # The native kernel compensates, checks and clears the gradient in one pass, and
            # selects above a reused threshold on the way (with none, above +inf: nothing).
            buffer = getattr(comp, "hits_buffer", None) if marked is not None else None
            positions, recorded = (
                (_NO_HITS, None) if buffer is None else buffer(numel, parts[0].dtype)
            )
            fused = self.feedback.compensate_select_into(
                key,
                cnames,
                cnumels,
                cparts,
                math.inf if marked is None else marked,
                positions,
                recorded,
            )
        if fused is None and marked is None:
            if self._nonfinite(parts, names, world, flat=flat):
                for part in parts:
                    part.fill_(self._dropped)
                return
            t0 = time.perf_counter()
            compensated = self.feedback.compensate_into(key, cnames, cnumels, cparts)
            cleared = False
        else:
            bad = torch.zeros(len(names), dtype=torch.uint8)  # per parameter, bucket order
            if fused is not None:
                compensated, count, nonfinite = fused
                if marked is not None:
                    hits = (positions, recorded, count)
                if any(nonfinite):  # (a tensor's item set a parameter costs a bucket's step)
                    for j, b in enumerate(nonfinite):
                        bad[order[j]] = int(b)
            else:
                mark = comp.marker(numel, marked)

                def each_chunk(j: int, offset: int, piece: Tensor, source: Tensor) -> None:
                    mark(offset, piece)
                    # A NaN or Inf in the gradient makes its compensated value, hence the sum,
                    # non-finite, so a finite sum proves the gradient piece finite; only a sum
                    # that is not (NaN, Inf, an overflow or a non-finite residual) checks the
                    # piece.
                    if not math.isfinite(float(piece.sum())) and not bool(
                        torch.isfinite(source).all()
                    ):
                        bad[order[j]] = 1
                    source.zero_()

                compensated = self.feedback.compensate_into(
                    key, cnames, cnumels, cparts, each_chunk=each_chunk, chunk=_FUSED_CHUNK
                )
            cleared = True
            self.counters["compress_seconds"] += time.perf_counter() - t0
            if self._nonfinite(parts, names, world, per_param=bad):
                return  # cleared above; with "propagate" the caller makes them NaN
            t0 = time.perf_counter()
        payload, ctx = comp.compress(
            compensated,
            key=key,
            layout=[shapes[i] for i in order],
            **({} if marked is None else {"marked": marked}),
            **({} if hits is None else {"selected": hits}),
        )
        indices, values = payload
        # Float16 values go out divided by the ranks, as torch's hooks divide before the sum:
        # no partial sum then passes the largest value a rank sent, where the ranks' sum at one
        # index could pass 65504 and their average not.
        divisor = 1 if _divides_first(parts[0].dtype, world) else world
        if values.dtype != parts[0].dtype:
            # Selected from the float32 compensation of half gradients: the wire carries the
            # gradient's dtype, and the residual keeps what rounding to it leaves out. A
            # float16 value is divided before that rounding, so a gradient plus residual past
            # 65504 whose share fits goes out finite; the rank has then sent `world` times
            # its share.
            if divisor == 1:
                wire = (values / world).to(parts[0].dtype)
                values = wire.to(values.dtype) * world
            else:
                values = wire = values.to(parts[0].dtype)
        else:
            wire = values if divisor == world else values / world
        sent_idx = indices.long()
        self.feedback.commit_sparse(key, cnames, cnumels, compensated, sent_idx, values)
        self.counters["compress_seconds"] += time.perf_counter() - t0

        coll = self._collective_for(numel, parts[0].dtype)
        if coll == "dense":
            mine = comp.decompress((indices, wire), ctx).reshape(-1).to(parts[0].dtype)
            reduced, sent = self._timed_comm(allreduce_sum, [mine], self.group)
            self._count(sent, sent)
            total = reduced[0]
            self.feedback.mask_velocity(sent_idx)
        else:
            res = self._sparse_collective(coll, indices, wire, numel, key)
            if res is None:  # dropped (the sum was not finite): the caller makes the parts NaN
                return
            if res.dense is None:
                # A global selection: what this rank sent but the selection dropped goes back
                # into its residual (with its momentum); the result is zero outside the
                # selection.
                selected = res.indices.long()
                # Both ascending (a threshold's selection, the collective's result): the native
                # kernel finds the dropped entries in one pass over both.
                gone = (
                    None
                    if self.feedback.momentum or res.dropped is not None
                    else _native.difference(sent_idx, values, selected)
                )
                if res.dropped is not None:
                    # The partial sums this rank's merges dropped (gTop-k), in the wire's
                    # units: shares of the average where the values went out divided.
                    d_idx, d_val = res.dropped
                    d_val = d_val.to(compensated.dtype)
                    self.feedback.add_back_sparse(
                        compensated, d_idx.long(), d_val * world if divisor == 1 else d_val
                    )
                    if self.feedback.momentum:
                        kept = ~self._not_selected(selected, sent_idx, numel)
                        self.feedback.mask_velocity(sent_idx[kept])
                elif gone is not None:
                    self.feedback.add_back_sparse(compensated, *gone)
                else:
                    dropped = self._not_selected(selected, sent_idx, numel)
                    self.feedback.add_back_sparse(compensated, sent_idx[dropped], values[dropped])
                    if self.feedback.momentum:
                        self.feedback.mask_velocity(sent_idx[~dropped])
                if not cleared:
                    for part in parts:
                        part.zero_()
                out = (res.values / divisor).to(parts[0].dtype)
                if flat is not None and len(parts) > 1:
                    _put_bucket(flat, order, cnumels, selected, out)
                else:
                    _put_canonical(cparts, selected, out)
                return
            total = res.dense
            self.feedback.mask_velocity(sent_idx)
        canonical = (total / divisor).to(parts[0].dtype).reshape(-1)
        for part, res_part in zip(cparts, torch.split(canonical, cnumels)):
            part.copy_(res_part)

    def _exchange(
        self,
        flat: Tensor,
        names: list[str],
        shapes: list[torch.Size],
        numels: list[int],
        world: int,
    ) -> Tensor:
        if self.step < self.config.dense_warmup_steps and self.aggregator is not None:
            # Uncompressed, but through the robust rule and the attack: a plain mean had let
            # the Byzantine ranks' gradients through (and left the attack out of experiments)
            # during the warm-up, and had fed SafeguardSGD's warm-up nothing.
            self._tolerated_here = False
            key = "|".join(names)
            self._first_use(key, names)
            return self._robust(flat, flat, key)
        if self.step < self.config.dense_warmup_steps:  # divided first, as in the fast path
            (out,), sent = self._timed_comm(allreduce_sum, [flat / world], self.group)
            self.counters["bytes_sent"] += sent
            self.counters["bytes_recv"] += sent
            return out

        key = "|".join(names)
        self._first_use(key, names)
        if self._tolerated_here:  # its row as it is; compensated, it would poison the residual
            self._tolerated_here = False
            if self.compressor.counts_steps:  # draws every rank shares (random-k's indices)
                self.compressor.compress(torch.zeros_like(flat), key=key, layout=list(shapes))
            return self._robust(flat, flat, key)
        t0 = time.perf_counter()
        comp = self.compressor
        compensated = self.feedback.compensate(names, numels, flat)
        # An element-wise cast (fp16, bf16, none) sends its share of the average, divided
        # before the cast and the sum as in the dense fast path (and torch's own hooks), so a
        # float16 sum of gradients whose average fits cannot overflow; it has sent `world`
        # times what it decodes to, which is what its residual leaves out.
        # Random-k and PowerSGD, whose payload is linear in the gradient, do the same for
        # float16 gradients (other dtypes have float32's range; their bits stay as they were).
        # A sparse payload of float16 values is divided first too (as in the sparse fast
        # path), before the cast: a gradient plus residual past 65504 whose share fits goes
        # out finite.
        divisor = world
        if (
            (
                comp.summable
                and (comp.elementwise or (comp.linear and flat.dtype == torch.float16))
                or (comp.wire == "sparse" and _divides_first(flat.dtype, world))
            )
            and world > 1
            and self.aggregator is None
        ):
            divisor = 1  # (a robust rule takes every rank's whole gradient instead)
        shared = compensated / world if divisor == 1 else compensated
        # Error feedback compensates half gradients in float32 (feedback.py); the compressor
        # gets the gradient's dtype, and the residual keeps what that rounding leaves out.
        shared = shared.to(flat.dtype)
        payload, ctx = comp.compress(shared, key=key, layout=list(shapes))
        self.counters["compress_seconds"] += time.perf_counter() - t0
        try:
            for i in range(comp.rounds - 1):
                op = comp.round_ops[i] if i < len(comp.round_ops) else "sum"
                reduce = allreduce_max if op == "max" else allreduce_sum
                reduced, sent = self._timed_comm(reduce, payload, self.group)
                self._count(sent, sent)
                t0 = time.perf_counter()
                payload, ctx = comp.next_round(tuple(reduced), ctx)
                self.counters["compress_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            # The own decode is in the wider dtype too (PowerSGD's P_hat Q^T, QSGD's levels
            # times the norm, can pass float16's range where the gradient does not); the
            # residual update casts back to the gradient's dtype.
            decode = comp.decompress_sum if comp.summable else comp.decompress_wide
            mine = share = decode(payload, ctx).reshape(-1)
            if divisor == 1:  # (world > 1) in float32 for half gradients: the share fits,
                mine = mine.to(work_dtype(mine.dtype)) * world  # world times it may not
        except FloatingPointError:
            # A summed round payload overflowed its wire dtype (PowerSGD's P in float16): the
            # same sum on every rank, so every rank gets here together.
            self._drop()  # "raise" too: end_step rolls back what earlier buckets kept
            if self.config.on_nonfinite == "raise":
                raise
            return torch.full_like(flat, self._dropped)
        self.feedback.update(names, numels, compensated, mine)
        self.counters["compress_seconds"] += time.perf_counter() - t0

        if self.aggregator is not None:
            return self._robust(mine, flat, key)

        if comp.summable:
            reduced, sent = self._timed_comm(allreduce_sum, payload, self.group)
            self._count(sent, sent)
            try:
                total = comp.decompress_sum(tuple(reduced), ctx)
            except FloatingPointError:  # as above: the same summed payload on every rank
                self._drop()  # "raise" too: end_step rolls back what earlier buckets kept
                if self.config.on_nonfinite == "raise":
                    raise
                return torch.full_like(flat, self._dropped)
        elif comp.wire == "sparse":
            coll = self._collective_for(flat.numel(), flat.dtype)
            if coll == "dense":
                reduced, sent = self._timed_comm(allreduce_sum, [share], self.group)
                self._count(sent, sent)
                total = reduced[0]
                self.feedback.mask_velocity(payload[0])
            else:
                res = self._sparse_collective(coll, payload[0], payload[1], flat.numel(), key)
                if res is None:  # dropped: the sum was not finite
                    return torch.full_like(flat, self._dropped)
                if res.dense is not None:
                    total = res.dense
                    self.feedback.mask_velocity(payload[0])
                else:
                    scale = world if divisor == 1 else 1  # the values are shares then
                    total = self._selected(res, payload, compensated, names, numels, scale)
        else:
            gathered, sent, recv = self._timed_comm(all_gather_variable, payload, self.group)
            self._count(sent, recv)
            total = comp.aggregate([tuple(g) for g in gathered], ctx)
        return (total.reshape(flat.shape) / divisor).to(flat.dtype)

    def _robust(self, mine: Tensor, flat: Tensor, key: str) -> Tensor:
        """This rank's (decompressed) gradient ``mine`` through the robust exchange."""
        from .robust_exchange import robust_exchange

        t0 = time.perf_counter()
        out, sent = robust_exchange(
            # in the decode's dtype: float32 for half gradients where the compressor decodes
            # wider (QSGD's levels times the norm can pass float16's range, as can a sum)
            mine,
            key=key,
            aggregator=self.aggregator,
            attack=self.attack,
            byzantine=self.config.byzantine,
            group=self.group,
            step=self.step,
            check=False,  # (check_consistent compared every rank's settings when built)
        )
        self.counters["comm_seconds"] += time.perf_counter() - t0
        self._count(sent, sent)
        return out.reshape(flat.shape).to(flat.dtype)

    def _selected(
        self, res: CollectiveResult, payload, compensated: Tensor, names, numels, scale: int = 1
    ) -> Tensor:
        """Densify a global selection; put what it dropped back into this rank's residual: its
        values outside the selection, or the partial sums its merges dropped (``res.dropped``),
        ``scale`` times the wire's values (the ranks when they are shares)."""
        indices, values = payload
        dropped = ~torch.isin(indices.long(), res.indices.long())
        if self.feedback.momentum:
            self.feedback.mask_velocity(indices[~dropped])
        unsent = torch.zeros_like(compensated)
        if res.dropped is not None:
            at, back = res.dropped[0].long(), res.dropped[1].to(unsent.dtype)
        else:
            at, back = indices.long()[dropped], values[dropped].to(unsent.dtype)
        unsent.index_put_((at,), back * scale if scale != 1 else back, accumulate=True)
        self.feedback.add_back(names, numels, unsent)
        total = torch.zeros(compensated.numel(), dtype=res.values.dtype, device=res.values.device)
        total.index_put_((res.indices.long(),), res.values)
        return total

    def _not_selected(self, selected: Tensor, sent: Tensor, numel: int) -> Tensor:
        """``~torch.isin(sent, selected)`` for positions in ``[0, numel)``: the selected
        positions are marked in a reused bool vector, looked up, and unmarked again, so the cost
        is in the entries (isin sorts both inputs; a binary search costs log k per entry)."""
        marks = self._marks
        if marks is None or marks.numel() < numel or marks.device != sent.device:
            marks = self._marks = torch.zeros(numel, dtype=torch.bool, device=sent.device)
        try:
            marks.index_fill_(0, selected, True)
            return ~torch.index_select(marks, 0, sent)
        finally:
            marks.index_fill_(0, selected, False)

    def _timed_comm(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.counters["comm_seconds"] += time.perf_counter() - t0
        return out

    def _count(self, sent: int, recv: int) -> None:
        self.counters["bytes_sent"] += sent
        self.counters["bytes_recv"] += recv

    def _nonfinite(
        self,
        parts: Sequence[Tensor],
        names: Sequence[str],
        world: int,
        per_param: Tensor | None = None,
        flat: Tensor | None = None,
    ) -> bool:
        """Agree across ranks whether any rank's gradient has NaN/Inf; raise or mark the step
        skipped.

        One small allreduce a bucket (one element; GradientSync adds a flag a parameter, below);
        only when some rank is bad, a second gather finds out which ranks and parameters.
        ``parts``: the gradients of ``names``; ``flat``: all of them in one tensor, where they
        are (read instead, in one pass). ``per_param``: which of this
        rank's parameters hold NaN/Inf (uint8, in ``names``' order), when the caller has found
        out already (the gradients are then not read).

        With :meth:`exchange_into`'s ``frozen``, the allreduce also counts, for each parameter,
        the ranks that froze it; a count other than none or all raises on every rank
        (:meth:`_check_frozen`).
        """
        device = parts[0].device
        if per_param is not None:
            bad_here = bool(per_param.any())
        else:
            # A sum is finite only if every term is (one pass, no temporary); only when it is
            # not, a second pass tells NaN/Inf from a sum that merely overflowed.
            # The sums are read together: one wait for the device, not one a parameter.
            whole = [flat] if flat is not None else parts
            sums = torch.stack([t.sum().double() for t in whole])
            bad_here = not bool(torch.isfinite(sums).all()) and any(
                not bool(torch.isfinite(whole[i]).all())
                for i in torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
            )
        frozen = self._frozen_now if world > 1 else None
        # A refusal (refuse_step) counts world + 1 in the first flag, more than all the ranks'
        # non-finite ones (exact in float32 up to 4095 ranks): no element is added for it.
        refusing, self._refusal = self._refusal, None
        first = float(bad_here) + (world + 1) * (refusing is not None)
        flags = [first] + ([] if frozen is None else [float(f) for f in frozen])
        bad = torch.tensor(flags, device=device)
        if world > 1:
            bad, sent = self._timed_comm(allreduce_sum, [bad], self.group)
            bad = bad[0]
            self._count(sent, sent)
        refusals, nonfinite = divmod(int(bad[0]), world + 1)
        if refusals:
            self._drop()
            raise ValueError(
                refusing
                or f"{refusals} other rank(s) refused this step; see their error (GradientSync: "
                "a model changed after GradientSync was built, say)"
            )
        if frozen is not None:
            self._check_frozen(bad[1:], names, world, device)
        self._tolerated, self._tolerated_here = 0, False
        if nonfinite == 0:
            return False
        if self._tolerates(nonfinite):
            self._tolerated, self._tolerated_here = nonfinite, bad_here
            if bad_here:
                warnings.warn(
                    f"this rank's gradient in {names[0]!r}... holds NaN or Inf: it goes to the "
                    f"robust rule {self.config.aggregator!r} as a Byzantine row (f="
                    f"{self.aggregator.f}; {nonfinite} rank(s) sent one), and this rank's "
                    "residuals stay as they were",
                    RuntimeWarning,
                    stacklevel=caller_stacklevel(),
                )
            return False
        if per_param is None:
            per_param = torch.stack([~torch.isfinite(p).all() for p in parts]).to(torch.uint8)
        per_param = per_param.to(device)
        if world > 1:
            rows = [torch.empty_like(per_param) for _ in range(world)]
            dist.all_gather(rows, per_param, group=self.group)
            table = torch.stack(rows)
        else:
            table = per_param.unsqueeze(0)
        where = [f"{names[i]} on rank {r}" for r, i in table.nonzero().tolist()]
        self._drop()  # with "propagate", the step's earlier results too: a scaler skips it
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(
                "non-finite gradient (NaN or Inf) in "
                + ", ".join(where)
                + "; lower the learning rate, use gradient clipping, or pass on_nonfinite='skip' "
                "to drop such steps on every rank (with torch.amp.GradScaler, pass "
                "grad_scaler=scaler: overflows are then its to handle)"
            )
        return True

    def _tolerates(self, nonfinite: int) -> bool:
        """Whether ``nonfinite`` ranks whose gradient holds NaN or Inf go on to the robust
        rule instead of dropping the step: a rule other than the mean, built for at least that
        many Byzantine ranks, past the dense warm-up, with a compressor of one round and no
        grad scaler (``on_nonfinite="propagate"``: an overflow must lower its scale). A faulty
        rank is one a Byzantine-robust rule is there to outvote; stopping every rank for it (or
        skipping every step) would let one rank do what the rule exists to prevent."""
        return (
            self.aggregator is not None
            and self.config.aggregator not in (None, "mean")
            and 0 < nonfinite <= self.aggregator.f
            and self.step >= self.config.dense_warmup_steps
            # (rounds summed before the gather, PowerSGD's, would carry the NaN to every rank)
            and self.compressor.rounds == 1
            # With a grad scaler an overflow is the scaler's to see, to lower its scale.
            and self.config.on_nonfinite != "propagate"
        )

    def _check_frozen(
        self, counts: Tensor, names: Sequence[str], world: int, device: torch.device
    ) -> None:
        """Raise on every rank if some parameter is frozen on some ranks and not on others
        (``counts``: the ranks that froze each of ``names``, summed over ranks). A frozen
        parameter goes into the exchange as zeros: the ranks that still train it would average
        their gradients with those zeros, and the copies would drift apart without an error.
        Only then does a gather find out which ranks froze which."""
        split = [i for i, c in enumerate(counts.tolist()) if 0 < c < world]
        if not split:
            return
        mine = torch.tensor([float(self._frozen_now[i]) for i in split], device=device)
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine, group=self.group)
        table = torch.stack(rows).cpu()
        which = []
        for j, i in enumerate(split[:5]):
            froze = [r for r in range(world) if table[r, j] > 0]
            train = [r for r in range(world) if table[r, j] == 0]
            which.append(f"{names[i]!r} frozen on rank(s) {froze}, trainable on {train}")
        more = f" (and {len(split) - 5} more)" if len(split) > 5 else ""
        self._drop()
        raise RuntimeError(
            "the ranks have frozen different parameters (requires_grad=False): "
            + "; ".join(which)
            + more
            + ". A frozen parameter goes into the exchange as zeros, so the ranks that train it "
            "would average their gradients with those zeros and the ranks' copies would drift "
            "apart. Freeze the same parameters on every rank, at the same step"
        )

    def _first_use(self, key: str, names: list[str]) -> None:
        """Before a bucket key's first exchange: drop the per-key state of keys that share
        some of its parameters (but not all). DDP rebuilds its buckets after the first step;
        the first layout's state (a threshold, PowerSGD's Q, Ok-Topk's edges, Safeguard's
        accumulations, ...) was kept for the whole run and saved in every checkpoint, and
        Safeguard counted its frozen accumulations in every distance. The same parameters in
        another order keep their state.

        A key's parameters are known exactly for the keys this engine has exchanged. A key
        only a loaded state holds is read by splitting it at the separator, and only where
        every piece is a parameter this engine has exchanged: a name may itself hold the
        separator (a ``ModuleDict`` key), and such a key is kept rather than guessed at."""
        if key in self._keys_seen:
            return
        mine = frozenset(names)
        self._keys_seen[key] = mine
        known = frozenset().union(*self._keys_seen.values())

        def retired(other: str) -> bool:
            theirs = self._keys_seen.get(other)
            if theirs is None:
                pieces = frozenset(other.split("|"))
                theirs = pieces if pieces <= known else frozenset()
            return theirs != mine and not theirs.isdisjoint(mine)

        parts = [self.compressor, *self._collectives.values(), self.aggregator, self.attack]
        for part in parts:
            while part is not None:  # bucketing keeps its base rule's state in _inner
                for attr in getattr(part, "_per_key", ()):
                    store = getattr(part, attr)
                    for old in [k for k in store if retired(k)]:
                        del store[old]
                part = getattr(part, "_inner", None)
        for old in [k for k in self._keys_seen if retired(k)]:
            del self._keys_seen[old]

    # ---- step bookkeeping and state ------------------------------------------------------
    def end_step(self) -> None:
        """Close an optimizer step: count it, advance the warm-up, let stateful rules update."""
        self.skipped_last_step = self._skipping
        if self._skipping:
            self.counters["skipped_steps"] += 1
            self.feedback.rollback()  # buckets exchanged before the bad one had committed
        self.feedback.mark()
        self._skipping = False
        self._refusal = None
        self._tolerated, self._tolerated_here = 0, False
        self._scale_read = False
        self._outputs = []
        self.step += 1
        self.counters["steps"] += 1
        if self.aggregator is not None and hasattr(self.aggregator, "end_step"):
            self.aggregator.end_step()

    def stats(self) -> dict[str, Any]:
        """Return the counters since construction (or the loaded state).

        Keys: ``bytes_sent``, ``bytes_recv`` (by this rank: the exchanges of the steps, but
        not the one-time check of the first step after construction or a load, an allreduce
        of 6 integers a rank, left out so that a resumed run counts what one that never
        stopped does, nor the gathers that find out which ranks and parameters a step that
        is refused or not finite concerns), ``dense_bytes`` (what a ring
        allreduce of the uncompressed gradients would have sent), ``bytes_ratio`` (sent / dense),
        ``compress_seconds`` and ``comm_seconds``, ``steps``, ``skipped_steps``,
        ``aggregator`` with a robust rule's own stats, and with ``collective="auto"``
        ``auto_choices``: what it picked for each bucket size so far (size as a string: name).

        ``compress_seconds`` and ``comm_seconds`` are host wall-clock time spent in the calls.
        On CPU that is the work itself; on CUDA, kernels and NCCL collectives run asynchronously,
        so they count kernel launches and the host syncs that happen to fall inside, not the time
        the GPU spent compressing or communicating (profile with CUDA events or a profiler).
        """
        out: dict[str, Any] = {
            k: (int(v) if k not in ("compress_seconds", "comm_seconds") else float(v))
            for k, v in self.counters.items()
        }
        out["bytes_ratio"] = (
            out["bytes_sent"] / out["dense_bytes"] if out["dense_bytes"] else float("nan")
        )
        if self.aggregator is not None and hasattr(self.aggregator, "stats"):
            out["aggregator"] = self.aggregator.stats()
        if self.config.collective == "auto":
            out["auto_choices"] = {str(n): c for n, c in sorted(self.auto_choices.items())}
        return out

    def state_dict(self) -> dict[str, Any]:
        world = world_of(self.group)
        # Whose it is: the residuals are this rank's own share of the gradient not yet sent. A
        # state loaded and not yet stepped with is still the saver's (a pickled hook state is
        # rebuilt on the default group, or in a process without one).
        rank, world = self._loaded_from or (dist.get_rank(self.group) if world > 1 else 0, world)
        sd: dict[str, Any] = {
            "config": self.config.to_dict(),
            "step": self.step,
            "rank": rank,
            "world": world,
            "counters": dict(self.counters),
            "feedback": self.feedback.state_dict(),
            "compressor": self.compressor.state_dict(),
            "loss_scale": self.loss_scale,
        }
        if self._collectives:
            sd["collectives"] = {n: c.state_dict() for n, c in self._collectives.items()}
        if self.aggregator is not None and hasattr(self.aggregator, "state_dict"):
            sd["aggregator"] = self.aggregator.state_dict()
        if self.attack is not None and hasattr(self.attack, "state_dict"):
            sd["attack"] = self.attack.state_dict()
        return sd

    def load_state_dict(
        self,
        state: dict[str, Any],
        *,
        owner: str = "SyncEngine",
        strict: bool = True,
        sizes: Mapping[str, int] | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        """Restore what :meth:`state_dict` returned. With ``strict``, a state saved under other
        settings in effect (the ``config`` it records) is refused, naming them; ``on_nonfinite``
        may differ, and states from before a setting existed load as they did. With
        ``strict=False`` only another compressor is refused (its state is another kind): a
        state taken on under a new density or collective, say, to change them mid-run. With
        ``strict``, the next step also checks that each rank loaded the state it saved, from a
        run of as many ranks (:func:`_check_saved_by`), raising on every rank if not.
        ``owner`` names the caller in errors. ``sizes``: the model's parameters (name: number
        of elements); with ``strict``, a state holding residuals of other parameters, or of
        other sizes (another model's), is refused, naming them; and with ``dtypes`` (name:
        the parameter's dtype now), residuals kept in another dtype than its gradient's (a
        float64 model's state in a float32 one, whose residuals would be rounded)."""
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        check_state(state, owner)
        unknown = sorted(repr(k) for k in state if k not in _STATE_ENTRIES + _OPTIONAL_ENTRIES)
        if unknown:  # (not refused: a state may carry what a wrapper of the user's added)
            warnings.warn(
                f"{owner}.load_state_dict: the state's entries {', '.join(unknown)} are not "
                "ones this sparsetrain saves, and are ignored (a state of a newer version, or "
                "one edited?)",
                stacklevel=3,  # the user's call of GradientSync's or the hook state's load
            )
        if strict and sizes is not None:
            check_state_fits(state, sizes, owner, dtypes)
        elif sizes is not None:  # take what fits: the residuals of this model's parameters
            state = _fitting(state, sizes)
        counters = state["counters"]
        bad = {
            k: v
            for k, v in (counters.items() if isinstance(counters, Mapping) else ())
            if k in _COUNTERS
            and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf)
        }
        if not isinstance(counters, Mapping) or bad:
            raise ValueError(
                f"{owner}: the state's 'counters' must map {', '.join(_COUNTERS)} to finite "
                f"numbers >= 0, got {bad or counters!r:.200}"
            )
        diffs = config_differences(state.get("config", {}), self.config)
        if diffs and (strict or diffs[0].startswith("compressor:")):
            # strict=False cannot take another compressor, nor residuals or velocities kept
            # (or not) otherwise than this sync keeps them: no hint of it then.
            binding = ("compressor", "error_feedback", "momentum_correction")
            loose = not any(d.split(":")[0] in binding for d in diffs)
            raise ValueError(
                f"this state was saved with other gradient-sync settings ({'; '.join(diffs)}); "
                f"{owner} must be built with the saved settings to load it (only on_nonfinite "
                "may differ)" + (", or pass strict=False" if loose else "")
            )
        saved_by = _saved_by(state)
        scale = state.get("loss_scale", 1.0)  # states from before loss scaling: unscaled
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(f"the state's 'loss_scale' must be a number > 0, got {scale!r}")
        # Every part is checked first (the small ones by loading into a new object; the
        # residuals, as large as the model, without a copy); only then does this engine's own
        # load, which cannot fail: a state refused half way (a residual saved with error
        # feedback off, a malformed compressor state) leaves the engine as it was, not half
        # loaded. The engine's own objects keep what they hold beyond the state (the buffers
        # reserved when the caller was built).
        self.feedback.check_state(state["feedback"])
        self._new_compressor().load_state_dict(state["compressor"])
        collectives = state_mapping(
            state.get("collectives", {}), f"{owner}: the state's 'collectives'", "{name: state}"
        )
        for name, cstate in collectives.items():
            get_collective(name, **self.config.collective_options_for(name)).load_state_dict(cstate)
        aggregator, attack = self._new_robust(warn=False)  # a check: the built one warned
        robust = {k: state[k] if strict else _unrecorded(state[k]) for k in _ROBUST if k in state}
        if aggregator is not None and "aggregator" in robust:
            aggregator.load_state_dict(robust["aggregator"])
        if attack is not None and "attack" in robust:
            attack.load_state_dict(robust["attack"])
        del aggregator, attack
        self.step = int(state["step"])
        self.counters = {k: counters.get(k, 0) for k in _COUNTERS}
        self.feedback.load_state_dict(state["feedback"])
        self.compressor.load_state_dict(state["compressor"])
        for name, cstate in collectives.items():
            coll = self._collectives.get(name) or get_collective(
                name, **self.config.collective_options_for(name)
            )
            coll.load_state_dict(cstate)
            self._collectives[name] = coll
        if self.aggregator is not None and "aggregator" in robust:
            self.aggregator.load_state_dict(robust["aggregator"])
        if self.attack is not None and "attack" in robust:
            self.attack.load_state_dict(robust["attack"])
        # The residuals and thresholds are in these units; the next step brings them to its
        # own scale (the scaler's, or 1 without one).
        self.loss_scale = float(scale)
        self._scale_read = False
        self._skipping = False
        self._outputs = []
        self.agree_step = True  # the next step checks that every rank is at this step
        # ... and, with strict, that each rank loaded its own state from a run of this size.
        self._loaded_from, self._check_loaded = saved_by, strict


def _check_saved_by(saved_ranks: list[int], saved_worlds: list[int]) -> None:
    """Raise (on every rank: each holds the same lists) if a rank loaded, with strict, a state
    saved by a run of another size or by another rank (-1: it loaded none, or an old one).
    Error feedback's residuals are each rank's own share of the gradient not yet sent: on
    fewer ranks the others' shares are lost, and a state loaded on every rank from one rank's
    file counts that rank's share on every rank and loses the others' (a large wrong step,
    with no error, on the first step after the resume)."""
    world = len(saved_ranks)
    other = {r: w for r, w in enumerate(saved_worlds) if w >= 1 and w != world}
    if other:
        sizes = "; ".join(
            f"ranks {[r for r in other if other[r] == w]} loaded states saved by a run of {w}"
            for w in sorted(set(other.values()))
        )
        raise RuntimeError(
            f"the gradient sync states loaded were saved by a run of another number of ranks "
            f"({sizes}); this run has {world}. Each rank's error-feedback residuals are its own "
            "share of the gradient not yet sent, which a run of another size would lose or "
            "count twice: carry the saved states over to this number of ranks with "
            "sparsetrain.reshard_state (each rank loading the one built for it), or resume "
            "with as many ranks as saved them, each loading its own; or load with strict=False "
            "to take them anyway (the first steps then apply another update than the "
            "uninterrupted run would)"
        )
    swapped = [(r, s) for r, s in enumerate(saved_ranks) if s >= 0 and s != r]
    if swapped:
        which = ", ".join(f"rank {r} the state of rank {s}" for r, s in swapped[:8])
        more = f" and {len(swapped) - 8} more" if len(swapped) > 8 else ""
        raise RuntimeError(
            f"ranks loaded gradient sync states saved by other ranks ({which}{more}): each "
            "rank must load the state it saved itself, since its error-feedback residuals are "
            "its own share of the gradient not yet sent (one rank's state loaded on every rank "
            "counts its share on every rank and loses the others'). Save state_dict() on every "
            "rank, not only on rank 0, one file a rank; or load with strict=False to take them "
            "anyway"
        )


def _saved_by(state: Mapping[str, Any]) -> tuple[int, int] | None:
    """The (rank, world size) a state records it was saved by; None for a state from before
    states recorded them."""
    if "rank" not in state and "world" not in state:
        return None
    rank, world = state.get("rank"), state.get("world")
    if not (is_integer(world, 1) and is_integer(rank, 0) and rank < world):
        raise ValueError(
            "the state's 'rank' and 'world' must be integers with 0 <= rank < world (the rank "
            f"that saved it and the number of ranks), got rank={rank!r}, world={world!r}"
        )
    return int(rank), int(world)


def check_state_fits(
    state: Mapping[str, Any],
    sizes: Mapping[str, int],
    owner: str,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Raise ``ValueError`` unless every residual and velocity in ``state`` (and every name in
    its ``ddp_groups``) is of a parameter in ``sizes`` (name: number of elements), of that size,
    and, where ``dtypes`` gives the parameter's dtype, kept in its gradient's working dtype
    (float32 for half ones): another model's state would otherwise be taken where names and
    sizes happen to match, and kept for ever where they do not, or fail inside a later
    backward, or be rounded to a narrower dtype without a word."""
    feedback = state.get("feedback")
    stored: dict[str, Any] = {}
    if isinstance(feedback, Mapping):
        for entry in ("residuals", "velocity"):
            if isinstance(feedback.get(entry), Mapping):
                stored.update(feedback[entry])
    groups = state.get("ddp_groups")
    grouped = [n for g in groups for n in g] if isinstance(groups, list) else []
    unknown = sorted({n for n in [*stored, *grouped] if n not in sizes})
    resized = sorted(
        f"{n} ({t.numel()} elements saved, {sizes[n]} now)"
        for n, t in stored.items()
        if n in sizes and isinstance(t, torch.Tensor) and t.numel() != sizes[n]
    )
    retyped = sorted(
        f"{n} ({t.dtype} saved, for a {dtypes[n]} parameter now)"
        for n, t in stored.items()
        if dtypes is not None
        and n in dtypes
        and isinstance(t, torch.Tensor)
        and work_dtype(t.dtype) != work_dtype(dtypes[n])
    )
    if not unknown and not resized and not retyped:
        return

    def first_five(items: list[str]) -> str:
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return ", ".join(items[:5]) + more

    parts = [
        f"{what}: {first_five(items)}"
        for what, items in (
            ("parameters this model does not have", unknown),
            ("parameters of other sizes", resized),
            ("residuals of another dtype", retyped),
        )
        if items
    ]
    raise ValueError(
        f"{owner}: this state is another model's; it holds {'; '.join(parts)}. Load the state "
        "saved with this model (or pass strict=False to take what fits)"
    )


_ROBUST = ("aggregator", "attack")


def _unrecorded(state: Any) -> Any:
    """A robust rule's or attack's state without the settings it recorded (nor its base
    rule's, for bucketing): what a ``strict=False`` load gives it, whose settings the engine
    has already let differ. A rule of the user's own then needs no ``strict`` argument."""
    if not isinstance(state, Mapping):
        return state
    out = {k: v for k, v in state.items() if k != "options"}
    if "base" in out:
        out["base"] = _unrecorded(out["base"])
    return out


def _fitting(state: dict[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    """``state`` (shallow) without the residuals and velocities of parameters not in ``sizes``
    (name: number of elements), or of another size: what a ``strict=False`` load takes. (What
    is not a tensor stays, for the state's checks to refuse.)"""
    feedback = state.get("feedback")
    if not isinstance(feedback, Mapping):
        return state
    kept = dict(feedback)
    for entry in ("residuals", "velocity"):
        value = feedback.get(entry)
        if isinstance(value, Mapping):
            kept[entry] = {
                n: t
                for n, t in value.items()
                if not isinstance(t, torch.Tensor) or sizes.get(n) == t.numel()
            }
    return {**state, "feedback": kept}


def _canonical_order(names: Sequence[str]) -> list[int]:
    """The positions of ``names`` sorted by name: the order the compressor sees parameters in,
    whatever order a bucket packs them in."""
    return sorted(range(len(names)), key=names.__getitem__)


def _divides_first(dtype: torch.dtype, world: int) -> bool:
    """Whether a sparse exchange sends its values divided by the ranks: float16 ones, whose sum
    can pass the largest finite value where the average does not (other dtypes have float32's
    range, and their bits stay those of a sum divided afterwards)."""
    return dtype == torch.float16 and world > 1


def _put_canonical(cparts: list[Tensor], indices: Tensor, values: Tensor) -> None:
    """Write ``values`` at ``indices`` of the canonical packing of ``cparts`` (the parts in
    canonical order, one after another) into the parts themselves, segment by segment."""
    if len(cparts) == 1:
        cparts[0].index_put_((indices,), values)
        return
    if indices.numel() > 1 and not bool((indices[1:] >= indices[:-1]).all()):
        indices, perm = torch.sort(indices)
        values = values[perm]
    starts = [0]
    for part in cparts:
        starts.append(starts[-1] + part.numel())
    edges = torch.searchsorted(indices, torch.tensor(starts, device=indices.device)).tolist()
    for part, start, a, b in zip(cparts, starts, edges, edges[1:]):
        if b > a:
            part.index_put_((indices[a:b] - start,), values[a:b])


def _put_bucket(
    flat: Tensor, order: list[int], cnumels: list[int], indices: Tensor, values: Tensor
) -> None:
    """As :func:`_put_canonical` where the parts are the pieces of ``flat`` in the bucket's
    order (canonical part ``j`` is the bucket's part ``order[j]``, of ``cnumels[j]`` elements):
    each canonical index is moved to its place in ``flat`` and all are written in one call, not
    one a part (hundreds of small parameters made that loop much of a step)."""
    bucket_numels = [0] * len(order)
    for j, i in enumerate(order):
        bucket_numels[i] = cnumels[j]
    bucket_starts = [0, *itertools.accumulate(bucket_numels)]
    canonical_starts = [0, *itertools.accumulate(cnumels)][:-1]
    device = indices.device
    shift = torch.tensor(
        [bucket_starts[i] - start for i, start in zip(order, canonical_starts)], device=device
    )
    # The canonical part each index falls in: the number of later parts' starts at or below it.
    segment = torch.searchsorted(
        torch.tensor(canonical_starts[1:], device=device, dtype=indices.dtype), indices, right=True
    )
    flat.index_put_((indices + shift[segment],), values)


def _to_bucket_order(
    canonical: Tensor, flat: Tensor, order: list[int], numels: list[int]
) -> Tensor:
    """Return the canonical-order result in the bucket's order, written into ``flat``."""
    if order == list(range(len(order))):
        return canonical
    dst = torch.split(flat, numels)
    for j, src in enumerate(torch.split(canonical.reshape(-1), [numels[i] for i in order])):
        dst[order[j]].copy_(src)
    return flat
