"""The compressor contract: pure tensor code that turns a gradient into what crosses the wire.

A compressor is a small dataclass whose fields are its options (validated in ``__post_init__``)
and which implements two methods:

* ``compress(t, key=..., layout=...) -> (payload, ctx)``: ``payload`` is a tuple of tensors that
  cross the wire, ``ctx`` stays on this rank.
* ``decompress(payload, ctx) -> Tensor``: a tensor of ``t``'s shape, dtype and device.

How payloads of all ranks are combined is declared as data, not discovered at run time:

* ``wire = "dense"`` and ``summable = True``: payloads of all ranks can be summed elementwise
  before decompression (``decompress(sum of payloads) == sum of decompress(payload)``). They go
  through one allreduce. Payload tensors may have any shape; all ranks produce the same shapes.
* ``wire = "sparse"``: the payload is ``(indices, values)``, 1-D each, with ``indices`` into the
  flattened tensor (int32 when ``numel < 2**31``, else int64). Ranks' indices differ, so payloads
  are gathered, or reduced by a sparse collective (``collective=`` of the sync layer).
* ``wire = "packed"``: any tuple of 1-D tensors (bit-packed levels, norms); gathered as bytes and
  decompressed per peer. ``ctx`` must therefore hold nothing peer-specific: this rank's ``ctx``
  decodes any rank's payload.

``biased = True`` means error feedback is on by default for this compressor. A compressor that
needs more than one round of communication (PowerSGD) sets ``rounds`` and implements
``next_round(reduced_payload, ctx)``; each round before the last is summed over the ranks, or
reduced by the op that ``round_ops`` names for it ("sum" or "max"). Compressors whose way of
combining depends on an option (TernGrad's scaler sharing) set these in ``__post_init__``.
The sync layer calls ``bind(world)`` with the number of ranks before the first step.

Compressors that keep state across steps (a threshold estimate, a warm-start matrix, a step
counter) keep it keyed by ``key`` (a stable name for the tensor, for example the names of the
parameters in a DDP bucket) and expose it through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .._options import check_state, state_int, state_mapping

Payload = tuple[Tensor, ...]
Wire = Literal["dense", "sparse", "packed"]


@dataclass(frozen=True)
class TensorMeta:
    """What every context needs to rebuild a tensor: shape, dtype and device."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: Tensor) -> TensorMeta:
        return cls(t.shape, t.dtype, t.device)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def index_dtype(numel: int) -> torch.dtype:
    """Return the narrowest index dtype for a tensor of ``numel`` elements (int32 or int64)."""
    return torch.int32 if numel < 2**31 else torch.int64


def check_floating(t: Tensor, what: str = "gradient") -> None:
    """Raise a ``TypeError`` naming ``what`` unless ``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{what} has dtype {t.dtype}; sparsetrain compresses floating-point tensors only "
            "(float16, bfloat16, float32, float64)"
        )


def check_density(density: float) -> None:
    """Raise unless ``density`` is a number in (0, 1]: ``TypeError`` for another type (bools
    included), ``ValueError`` outside the interval."""
    if not isinstance(density, (int, float)) or isinstance(density, bool):
        raise TypeError(f"density must be a number in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def k_for(numel: int, density: float) -> int:
    """Return how many elements a density keeps: at least 1, at most ``numel`` (0 of nothing)."""
    return min(numel, max(1, int(round(density * numel))))


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    """Raise a TypeError/ValueError naming ``name`` unless ``minimum <= value <= maximum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def step_counter_state(name: str, steps: Mapping[str, int]) -> dict[str, Any]:
    """The state of a compressor that keeps only per-key step counters (random-k, QSGD,
    TernGrad): the counters and the compressor's name, so that one's state is not taken for
    another's (their states have the same form)."""
    return {"compressor": name, "steps": dict(steps)}


def load_step_counters(state: Any, name: str) -> dict[str, int]:
    """Return the per-key step counters of compressor ``name``'s state (from
    :func:`step_counter_state`), checked. A state without the ``"compressor"`` entry (saved
    before it was written) is taken as this compressor's."""
    owner = f"compressor {name!r}"
    check_state(state, owner, ("steps",), ("compressor",))
    saved = state.get("compressor", name)
    if saved != name:
        raise ValueError(
            f"{owner}: the state was saved by compressor {saved!r:.100}; load it into a "
            f"{saved!r:.100} compressor, or start this one afresh"
        )
    steps = state_mapping(state["steps"], f"{owner}: the state's 'steps'", "{key: step counter}")
    return {
        str(k): state_int(v, f"{owner}: the state's step counter of key {k!r}")
        for k, v in steps.items()
    }


def check_bucket_size(value: Any) -> None:
    """Validate a ``bucket_size`` option: None (whole tensor) or a positive integer."""
    if value is not None:
        check_int(value, "bucket_size (or None for one bucket per tensor)", 1)


def seeded_generator(seed: int, key: str, step: int, device: torch.device) -> torch.Generator:
    """Return a generator on ``device`` seeded by ``(seed, key, step)``.

    The seed is a stable hash (BLAKE2b, not Python's per-process ``hash``), so every rank and
    every resumed run draws the same numbers for the same tensor at the same step.
    """
    digest = hashlib.blake2b(f"{seed}|{key}|{step}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return gen


# Multiplying a 64-bit word of eight 0/1 bytes by this gathers byte j's bit into bit 56 + j
# (the partial products never overlap, so nothing carries): eight flags packed in one multiply.
_GATHER_FLAGS = sum(1 << (56 - 7 * j) for j in range(8))
# Byte j of this has only bit j set: AND-ed with a byte repeated eight times it isolates flag j.
_FLAG_BITS = sum(1 << (9 * j) for j in range(8))
_REPEAT_BYTE = sum(1 << (8 * j) for j in range(8))


def _pack_flags(flags: Tensor) -> Tensor:
    """Pack a uint8 tensor of 0/1 values, length a multiple of 8, into bytes (flag j -> bit j)."""
    # In place after the first op: every fresh large temporary costs page faults on CPU.
    return (flags.view(torch.int64) * _GATHER_FLAGS).bitwise_right_shift_(56).to(torch.uint8)


def _unpack_flags(packed: Tensor) -> Tensor:
    """Invert :func:`_pack_flags`: one uint8 0/1 per bit, eight per byte."""
    spread = packed.to(torch.int64).mul_(_REPEAT_BYTE).bitwise_and_(_FLAG_BITS)
    return spread.view(torch.uint8).clamp_(max=1)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer ``codes`` (each < 2**bits, 1 <= bits <= 8) into a uint8 tensor.

    The result has ``ceil(n / 8) * bits`` bytes. For 2 and 4 bits the codes of one byte are
    shifted and OR-ed together; for 8 bits the codes are the bytes; other widths are stored as
    ``bits`` bit planes (plane i holds bit i of every code), each packed eight flags to a byte
    by one 64-bit multiply. All are a few vectorised ops over the data (a loop over bit
    positions, never over elements).
    """
    n = codes.numel()
    pad = (-n) % 8
    c = codes.reshape(-1).to(torch.uint8)
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    if bits == 8:  # the codes are the bytes; copy unless conversion or padding already did
        return c.clone() if c.data_ptr() == codes.data_ptr() else c
    if bits in (2, 4):
        c = c.view(-1, 8 // bits)
        out = c[:, 0].clone()
        for j in range(1, 8 // bits):
            out |= c[:, j] << (j * bits)
        return out
    if bits == 1:
        return _pack_flags(c)
    return torch.cat([_pack_flags((c >> i).bitwise_and_(1)) for i in range(bits)])


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Invert :func:`pack_bits`: return the first ``count`` codes as a uint8 tensor."""
    if bits == 8:
        return packed[:count]
    if bits in (2, 4):
        mask = (1 << bits) - 1
        out = torch.stack([(packed >> (j * bits)) & mask for j in range(8 // bits)], dim=1)
        return out.view(-1)[:count]
    planes = packed.view(bits, -1)
    out = _unpack_flags(planes[0])
    for i in range(1, bits):
        out |= _unpack_flags(planes[i]).bitwise_left_shift_(i)
    return out[:count]


def unpack_rows(
    packed: Tensor, bits: int, numel: int, bucket_size: int | None, fill: int
) -> Tensor:
    """The ``numel`` codes :func:`pack_bits` packed, as :func:`bucketed`'s rows: the last row's
    padding (never sent) is ``fill``, the code that decodes to zero."""
    buckets, size = bucket_shape(numel, bucket_size)
    codes = unpack_bits(packed, bits, numel)
    pad = buckets * size - numel
    if pad:
        codes = torch.cat([codes, codes.new_full((pad,), fill)])
    return codes.view(buckets, size)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype to compute in: float32 for half types (norms, QR), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def bucket_shape(numel: int, bucket_size: int | None) -> tuple[int, int]:
    """Return ``(buckets, size)``: how :func:`bucketed` lays out ``numel`` entries."""
    size = max(1, numel if bucket_size is None else min(bucket_size, numel))
    return -(-numel // size), size


def bucketed(flat: Tensor, bucket_size: int | None) -> tuple[Tensor, Tensor]:
    """View a 1-D tensor as rows of ``bucket_size`` entries, zero-padding the last row.

    Returns:
        ``(rows, counts)``: a ``(buckets, size)`` tensor (a view when no padding is needed) and
        the number of real entries in each row, as a tensor of ``flat``'s dtype (for means).
    """
    n = flat.numel()
    buckets, size = bucket_shape(n, bucket_size)
    pad = buckets * size - n
    rows = (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(buckets, size)
    counts = torch.full((buckets,), float(size), dtype=flat.dtype, device=flat.device)
    if pad:
        counts[-1] = size - pad
    return rows, counts


class Compressor(abc.ABC):
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    wire: ClassVar[Wire] = "dense"
    summable: ClassVar[bool] = True
    biased: ClassVar[bool] = False
    rounds: ClassVar[int] = 1
    # The reduction of each round before the last, in order ("sum" where none is named).
    round_ops: ClassVar[tuple[str, ...]] = ()
    # True: the sync layer adds the rank to ``seed`` (independent noise per rank); False: every
    # rank must draw the same numbers (random-k indices, PowerSGD's first Q).
    rank_seeded: ClassVar[bool] = False
    # True: its state is a step counter a key that seeds its draws (random-k, QSGD, TernGrad),
    # so compressing zeros moves it on as a step does and changes nothing else.
    counts_steps: ClassVar[bool] = False
    # True: stateless, entry by entry, one summable payload tensor (a cast or nothing), so the
    # exchange may run on the bucket in place, in any order (the sync layer's dense fast path).
    elementwise: ClassVar[bool] = False
    # True: a summable payload that is linear in the input (compressing x / c sends the
    # payload of x divided by c, decoded to its decode divided by c), so the sync layer may
    # divide a float16 gradient by the ranks before compressing it, as it does a cast's, and
    # the sum of those shares cannot pass float16's range where their average fits.
    linear: ClassVar[bool] = False

    @abc.abstractmethod
    def compress(
        self, t: Tensor, *, key: str = "", layout: Sequence[torch.Size] | None = None
    ) -> tuple[Payload, Any]:
        """Compress ``t``. ``layout`` lists the shapes of the parameters packed in ``t``, in
        order, for compressors that work per matrix (PowerSGD); the others ignore it."""

    @abc.abstractmethod
    def decompress(self, payload: Payload, ctx: Any) -> Tensor:
        """Return the tensor ``payload`` stands for, with the shape, dtype and device in ``ctx``."""

    def bind(self, world: int) -> None:  # noqa: B027 - most do not depend on it
        """Learn the number of ranks whose payloads will be combined (the sync layer calls it
        before the first step; alike on every rank)."""

    def decompress_wide(self, payload: Payload, ctx: Any) -> Tensor:
        """Decode this rank's payload (as :meth:`decompress`) in a dtype that holds what it
        decodes to, where that can pass the gradient's range while the gradient does not
        (QSGD's norm * level / s in float16): the sync layer's own decode and
        :meth:`aggregate`'s terms, which the average brings back into range. By default
        :meth:`decompress`."""
        return self.decompress(payload, ctx)

    def decompress_sum(self, payload: Payload, ctx: Any) -> Tensor:
        """Decode the sum over ranks of the last round's payloads (summable wires), which the
        sync layer divides by the number of ranks next: in a wider dtype than the gradient's
        where the sum could pass its range and the average not (float32 for half gradients).
        By default :meth:`decompress`."""
        return self.decompress(payload, ctx)

    def next_round(self, reduced: Payload, ctx: Any) -> tuple[Payload, Any]:
        """Multi-round compressors: take the summed payload of the previous round and return
        this rank's payload for the next one."""
        raise RuntimeError(f"compressor {self.name!r} has a single round")

    def aggregate(self, payloads: Sequence[Payload], ctx: Any) -> Tensor:
        """Return the sum over ranks of the decompressed payloads (gathered wires), in the work
        dtype (float32 for float16 and bfloat16, whose sum could overflow or round where the
        average, which the sync layer takes next, would not)."""
        first = self.decompress_wide(payloads[0], ctx)
        out = first.to(work_dtype(first.dtype), copy=True)
        for p in payloads[1:]:
            out += self.decompress_wide(p, ctx)
        return out

    # ---- options and state -------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Return the constructor options (what must agree across ranks)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def state_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def biased_with(cls, options: Mapping[str, Any]) -> bool:
        """Whether this compressor, built with ``options``, sends something that is not the
        gradient on average (the sync layer turns error feedback on for those by default):
        :attr:`biased`, unless an option changes it."""
        return cls.biased

    # Options with which the compressor cannot run under a robust aggregator or an attack,
    # each with why (:meth:`robust_conflict`).
    robust_refused: ClassVar[dict[str, str]] = {}

    @classmethod
    def robust_conflict(cls, options: Mapping[str, Any]) -> str | None:
        """Why this compressor, built with ``options``, cannot run under a robust aggregator or
        an attack (which average the ranks' decompressed gradients instead of calling
        :meth:`aggregate`), or None where it can: the first of :attr:`robust_refused` whose
        option is on."""
        return next((why for key, why in cls.robust_refused.items() if options.get(key)), None)

    @classmethod
    def feedback_by_default(cls, options: Mapping[str, Any]) -> bool:
        """Whether the sync layer turns error feedback on for this compressor, built with
        ``options``, when the user leaves it unset: for biased ones (:meth:`biased_with`),
        unless the compressor says otherwise."""
        return cls.biased_with(options)

    def rescale(self, factor: float) -> None:  # noqa: B027 - most keep nothing in those units
        """Multiply whatever this compressor keeps in the gradients' units (a threshold) by
        ``factor``: the gradients are about to arrive scaled by it (a new loss scale)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, f"compressor {self.name!r}", ())


class SparseCompressor(Compressor):
    """Shared decoding for ``wire = "sparse"`` payloads ``(indices, values)``."""

    wire: ClassVar[Wire] = "sparse"
    summable: ClassVar[bool] = False
    biased: ClassVar[bool] = True
    # True: the indices come out sorted by position, so the sparse collectives need not sort
    # them (and the cost model of collective="auto" counts no sort).
    sorted_indices: ClassVar[bool] = False

    def decompress(self, payload: Payload, ctx: TensorMeta) -> Tensor:
        indices, values = payload
        out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=ctx.device)
        out.index_add_(0, indices.long(), values.to(ctx.dtype))
        return out.view(ctx.shape)

    def aggregate(self, payloads: Sequence[Payload], ctx: TensorMeta) -> Tensor:
        """Sum the ranks' payloads one rank at a time, in rank order: each payload's indices are
        unique, so every call is free of collisions and the sum has the same bits on every rank,
        also with CUDA's atomic adds (one call over all payloads would add shared entries in a
        different order on each rank)."""
        dtype = work_dtype(ctx.dtype)  # as the base class sums: float16 sums overflow
        out = torch.zeros(ctx.numel, dtype=dtype, device=ctx.device)
        for indices, values in payloads:
            out.index_add_(0, indices.long(), values.to(dtype))
        return out.view(ctx.shape)
