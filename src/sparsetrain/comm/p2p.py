"""Shared machinery of the sparse collectives: input agreement, batched point-to-point
exchanges with counted bytes, and vectorised sparse merges.

Everything here works on any backend torch.distributed has (gloo, NCCL) and on any device:
buffers are created on the device of the values, sizes travel as int64 tensors on that device,
and exchanges of variable size first exchange their sizes. gloo's own collectives take CUDA
tensors (they copy them through host memory), but its point-to-point send and receive hand the
tensor's memory to the socket as it is, so on a gloo group the point-to-point messages of CUDA
tensors are staged here: copied to host memory before they are sent, and received into host
memory and copied to the device (:attr:`Wire.staged`). NCCL moves CUDA memory directly. The
backend that moves a device's tensors is looked up per device (:func:`backend_for`), so a group
made by ``init_process_group()`` without a backend ("cpu:gloo,cuda:nccl") sends CUDA tensors by
NCCL. Point-to-point exchanges are posted as one ``dist.batch_isend_irecv`` batch, in rotating
order (at step ``s`` rank ``r`` sends to ``r + s`` and receives from ``r - s``), so no exchange
can deadlock and no rank is everybody's first peer.

A sparse message is one ``uint8`` buffer: the indices' bytes followed by the values' bytes, so it
costs one message, not two. Every byte that crosses the wire is counted in :class:`Wire`.

Exchanges of a few ints (the input agreement, gathers of counts and sizes) go straight to every
peer in one round of p - 1 messages below ``TREE_FROM`` ranks, and from there on in
ceil(log2 p) rounds of one message each (dissemination for the agreement's checks, Bruck's
index algorithm for its per-peer ints and for gathers), so that their message count grows with
log p rather than p; so do small allreduces (Ok-Topk's threshold histograms and region votes),
by recursive doubling instead of the library's ring.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .accounting import ring_allreduce_bytes

INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Traffic:
    """What this rank put on and took off the wire during one collective call.

    ``elems_sent`` counts tensor elements (an index and a value are two elements; a size header
    is one), the unit in which sparse-allreduce volume bounds such as Ok-Topk's 6k are stated.
    """

    bytes_sent: int = 0
    bytes_recv: int = 0
    elems_sent: int = 0


# From this many ranks on, few-int exchanges take ceil(log2 p) rounds of one message instead
# of one round of p - 1 messages: a round waits two one-way trips, a message costs its
# software. On the emulated cluster (1 Gbit/s, 100 us links; benchmarks/bench_few_ints.py)
# the direct form is faster on 4 and 8 ranks, the two are within 15% either way on 16, and
# the tree is 19-31% faster on 32. The same on every rank (a module constant, not an option
# of the collectives), since the two forms exchange different messages; benchmarks force one
# form with few_int_form, or bench cluster's --few-ints.
TREE_FROM = 32

# The ints of every collective's input agreement (Wire.agree), the same for all of them: numel,
# the count (or k), a refusal flag, the dtypes with the collective's name, the key, and a code
# of the collective's options.
AGREE_HEAD = 6


# The longest vector Wire.allreduce reduces by recursive doubling rather than by the library
# (a histogram or a few counts; a long vector's ring moves far fewer bytes a rank).
TREE_MAX_ELEMENTS = 4096
_TREE_OPS = (dist.ReduceOp.SUM, dist.ReduceOp.MAX)


def uses_tree(world: int) -> bool:
    """Whether a world of this many ranks exchanges few ints in log2 p rounds."""
    return world >= TREE_FROM


FEW_INT_FORMS = ("auto", "direct", "tree")


@contextmanager
def tree_threshold(value: int | None) -> Iterator[None]:
    """Within the block, ``TREE_FROM`` is ``value`` (None: unchanged); restored afterwards."""
    global TREE_FROM
    saved = TREE_FROM
    if value is not None:
        TREE_FROM = value
    try:
        yield
    finally:
        TREE_FROM = saved


def few_int_form(form: str) -> AbstractContextManager[None]:
    """Within the block, exchange few ints in ``form``: "auto" (keep the current
    ``TREE_FROM``), "direct" or "tree" at any world size. For benchmarks
    that compare the forms and the cost model's predictions of their runs; every rank must use
    the same form."""
    return tree_threshold(tree_from(form))


def tree_from(form: str) -> int:
    """The ``TREE_FROM`` that gives few-int exchanges ``form`` ("auto": the current one)."""
    if form not in FEW_INT_FORMS:
        raise ValueError(f"few-int form must be one of {', '.join(FEW_INT_FORMS)}, got {form!r}")
    return {"auto": TREE_FROM, "direct": 2**62, "tree": 2}[form]


_DTYPES = (
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _local_error(indices: Tensor, values: Tensor, numel: int) -> str | None:
    """Return what is wrong with this rank's input, or None."""
    if indices.layout != torch.strided or values.layout != torch.strided:
        return (
            "indices and values must be dense (strided) tensors, got layouts "
            f"{indices.layout} and {values.layout}"
        )
    if indices.dim() != 1 or values.dim() != 1:
        return (
            f"indices and values must be 1-D, got shapes {tuple(indices.shape)} and "
            f"{tuple(values.shape)}"
        )
    if indices.dtype not in INDEX_DTYPES:
        return f"indices have dtype {indices.dtype}; allowed are torch.int32 and torch.int64"
    if values.dtype not in VALUE_DTYPES:
        return (
            f"values have dtype {values.dtype}; allowed are floating-point dtypes "
            "(float16, bfloat16, float32, float64)"
        )
    if indices.numel() != values.numel():
        return f"indices has {indices.numel()} entries but values has {values.numel()}"
    if indices.device != values.device:
        return f"indices are on {indices.device} but values on {values.device}"
    if indices.numel():
        # Compared as Python ints: int32 indices of a vector longer than 2**31 must not wrap.
        lo, hi = (int(x) for x in torch.aminmax(indices))
        if lo < 0 or hi >= numel:
            return f"indices must lie in [0, numel={numel}), got values in [{lo}, {hi}]"
    return None


def detached(values: object) -> object:
    """``values`` without autograd history, where it is a tensor: a collective's results are
    values (that require grad, they came back attached to the graph on some ranks only, and
    Ok-Topk warned at its threshold's conversion to a number)."""
    return values.detach() if isinstance(values, Tensor) else values


def input_error(
    indices: object, values: object, numel: object, device: torch.device | None = None
) -> str | None:
    """Return what is wrong with one rank's (indices, values, numel), or None if nothing.

    ``device`` is where the collective runs (:func:`device_of`); values elsewhere are an error.
    """
    if not isinstance(indices, Tensor) or not isinstance(values, Tensor):
        return (
            f"indices and values must be tensors, got {type(indices).__name__} and "
            f"{type(values).__name__}"
        )
    if isinstance(numel, bool) or not isinstance(numel, int) or not 1 <= numel < 2**63:
        return f"numel must be a positive int below 2**63, got {numel!r}"
    # The device first: the other checks read the indices, which a device no backend of the
    # group moves (a meta tensor, say) may not even allow on the host.
    if device is not None and values.device != device:
        return (
            f"indices and values are on {values.device}, but the collective runs on {device}: "
            f"no backend of the process group moves {values.device.type} memory (NCCL moves "
            "CUDA memory only, gloo CPU and CUDA memory)"
        )
    try:
        return _local_error(indices, values, numel)
    except Exception as e:  # (an input torch cannot read: still an error on every rank)
        return f"reading this rank's indices and values failed: {type(e).__name__}: {e}"


def error_type(error: str) -> type[Exception]:
    """The exception class for an :func:`input_error` message."""
    return TypeError if ("dtype" in error or "tensors" in error) else ValueError


def text_crc(text: str) -> int:
    """A CRC-32 of ``text``: an int naming a string, compared across ranks."""
    return zlib.crc32(str(text).encode())


def call_codes(indices: Tensor, values: Tensor, name: str, key: str) -> tuple[int, int]:
    """Two ints naming a collective call, compared across ranks: the dtypes with the
    collective's name (dtype codes below 16, a CRC-32 of the name above them), and a CRC-32 of
    the key. Ranks whose calls differ get an error on every rank instead of a sum of
    different tensors (a loop over a ``set`` of names runs in another order on each rank)."""
    kinds = _dtype_code(indices.dtype) + 16 * _dtype_code(values.dtype)
    return kinds + 256 * text_crc(name), text_crc(key)


def raise_disagreement(
    error: str | None,
    rank: int,
    any_bad: bool,
    numel_range: tuple[int, int],
    codes_range: tuple[Sequence[int], Sequence[int]],
    indices: Tensor,
    values: Tensor,
    name: str,
    key: str,
) -> None:
    """Raise what a collective's input agreement found, alike on every rank: this rank's own
    ``error``, another rank's bad input, or ranks that disagree on the collective, the key,
    numel or dtypes (``codes_range``: the smallest and the largest :func:`call_codes` over
    the ranks)."""
    if error is not None:
        raise error_type(error)(f"rank {rank}: {error}")
    if any_bad:
        raise ValueError("another rank's indices or values are invalid (see its error)")
    (lo_kinds, lo_key), (hi_kinds, hi_key) = codes_range
    if lo_kinds >> 8 != hi_kinds >> 8:
        raise ValueError(
            f"the ranks call different collectives here (this rank: {name!r}); every rank "
            "must call the same collective, on the same tensors in the same order"
        )
    if lo_key != hi_key:
        raise ValueError(
            f"the ranks call {name!r} with different keys (this rank: {key!r}); every rank must "
            "reduce the same tensors in the same order, under the same key"
        )
    lo, hi = numel_range
    if lo != hi:
        raise ValueError(
            f"numel differs across ranks (between {lo} and {hi}); every rank must pass the "
            "same numel"
        )
    if lo_kinds != hi_kinds:
        raise ValueError(
            "indices or values dtypes differ across ranks; every rank must pass the same "
            f"dtypes (this rank: {indices.dtype}, {values.dtype})"
        )


def alone() -> bool:
    """Whether this process has no process group (``torch.distributed`` not initialized): it is
    then a world of one, where a collective's result is its own input's and nothing is sent.

    Raises:
        RuntimeError: there is no process group, but the launcher says this process is one of
            several (``WORLD_SIZE`` above 1, as torchrun sets it): run as a world of one, each
            process would train alone without a word.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    size = os.environ.get("WORLD_SIZE", "").strip()
    if size.isdigit() and int(size) > 1:
        raise RuntimeError(
            f"torch.distributed is not initialized, but WORLD_SIZE={size} says this process is "
            "one of several (torchrun sets it): call torch.distributed.init_process_group() "
            "before building the hook or GradientSync, or calling a collective; without it "
            "each process would train alone"
        )
    return True


def check_group(group: object) -> None:
    """Refuse a ``group`` argument that is neither a ProcessGroup nor None, naming what is
    allowed: a local check of the argument, made alike on every rank before any message."""
    if group is not None and dist.is_available() and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "this rank is not a member of the group (torch.distributed.new_group returns "
            "GroupMember.NON_GROUP_MEMBER on the ranks it leaves out); call the collective on "
            "the group's ranks only"
        )
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            "group must be a torch.distributed.ProcessGroup (for example from "
            "torch.distributed.new_group) or None for the default group, got "
            f"{type(group).__name__} {group!r:.100}"
        )


def device_of(values: object, group: dist.ProcessGroup | None = None) -> torch.device:
    """The device for a collective's size headers and buffers: the values' device (CPU for a
    non-tensor, whose error :meth:`Wire.agree` reports on every rank).

    Values on a device that no backend of the group moves (bad input: CPU tensors under NCCL,
    which moves only CUDA memory; a ``meta`` or other accelerator's tensor under gloo) get a
    device that one does instead, CPU where the group has a CPU backend, else the current CUDA
    device: the header must still cross the wire, so that the error is raised on every rank
    rather than on this one alone while the others wait.

    Raises:
        TypeError: ``group`` is neither a ProcessGroup nor None (:func:`check_group`).
    """
    check_group(group)
    return moved_device(values.device if isinstance(values, Tensor) else torch.device("cpu"), group)


def moved_device(device: torch.device, group: dist.ProcessGroup | None = None) -> torch.device:
    """``device`` if a backend of ``group`` (None: the default group) moves its tensors, else
    one that a backend does: CPU where the group has a CPU backend, else the current CUDA
    device (see :func:`device_of`). ``device`` itself without a process group."""
    backends = _backends(group)
    if backends is None or device.type in backends:
        return device
    if "cpu" in backends:
        return torch.device("cpu")
    if "cuda" in backends:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# The devices a backend moves when a group names it alone ("nccl", not "cuda:nccl"); another
# bare name (mpi, ucc) is taken to move CPU and CUDA memory, and nothing else.
_BACKEND_DEVICES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",)}


def _backends(group: dist.ProcessGroup | None) -> dict[str, str] | None:
    """The backend that moves each device type's tensors in ``group`` (None: the default
    group), by device type, from its backend config ("cpu:gloo,cuda:nccl"; a bare name from
    older PyTorch); None without a process group.

    A group can have one backend for each device type: ``init_process_group()`` without a
    backend makes "cpu:gloo,cuda:nccl", whose ``dist.get_backend`` is "undefined".
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        config = str(dist.get_backend_config(group))
    except (AttributeError, RuntimeError, ValueError):
        config = str(dist.get_backend(group))
    table: dict[str, str] = {}
    for entry in config.split(","):
        kind, sep, name = (part.strip() for part in entry.partition(":"))
        if sep:
            table[kind] = name.lower()
        elif kind:
            name = kind.lower()
            for dev in _BACKEND_DEVICES.get(name, ("cpu", "cuda")):
                table.setdefault(dev, name)
    return table


def backend_for(group: dist.ProcessGroup | None, device_type: str) -> str | None:
    """The name of the backend that moves ``device_type`` tensors in ``group`` (None: the
    default group), or None where none does or no process group is initialized."""
    return (_backends(group) or {}).get(device_type)


class Wire:
    """This rank's view of a process group for one collective call, with its traffic counted.

    Args:
        group: the process group (None: the default group).
        device: where size headers and receive buffers are created (the values' device).
    """

    def __init__(
        self, group: dist.ProcessGroup | None, device: torch.device, name: str = "", key: str = ""
    ) -> None:
        check_group(group)
        self.device = device
        self.name, self.key = name, key
        self.traffic = Traffic()
        if alone():
            # One process without a process group (a script tried out before it is launched
            # on several): a world of one, as the allgather and the dense allreduce take it,
            # where nothing is sent and the collective's result is its own input's.
            self.group, self.world, self.rank, self.global_ranks = None, 1, 0, [0]
            self.staged = False
            return
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.global_ranks = dist.get_process_group_ranks(self.group)
        # gloo's send and receive read and write host memory only: stage other devices' bytes.
        self.staged = device.type != "cpu" and backend_for(self.group, device.type) == "gloo"

    # ---- agreement ----------------------------------------------------------------------
    def agree(
        self,
        indices: Tensor,
        values: Tensor,
        numel: int,
        k: int | None = None,
        options: Mapping[str, int] | None = None,
        tell: Mapping[int, int] | None = None,
    ) -> tuple[int, dict[int, int]]:
        """Check every rank's input in one exchange of a few ints; raise on every rank if any
        is bad. Each rank sends its header straight to every peer (one round of p - 1 small
        messages; a ring allreduce of the same ints takes 2(p - 1) steps one after another);
        from ``TREE_FROM`` ranks on, in ceil(log2 p) rounds of one message
        (:meth:`_disseminate`).

        Args:
            indices, values, numel: this rank's input.
            k: the selecting collectives' fixed k, if any.
            options: integers that must be equal on every rank (a collective's options and
                per-key state, such as its step counter), by name for the error message.
            tell: one int for each peer (for example how much this rank will send it), carried
                by the same messages; peers missing from it are told 0 (and all of them
                without ``tell``: the messages have the same size in every call).

        Returns the largest entry count over ranks (or ``k`` when given): the k that selecting
        collectives keep, identical on all ranks; and, by peer, the int each peer told this
        rank (empty without ``tell``).

        Every call sends ``AGREE_HEAD`` ints and one for each peer, so ranks that call
        different collectives here are told so on every rank rather than meeting messages of
        another size; ``options`` travel as one code, and their values in a second exchange
        only where the codes differ, to name them.

        Raises:
            TypeError, ValueError: on every rank, when any rank's input is bad or the ranks
                disagree on numel, dtypes or ``options``; never only on some ranks, which would
                leave the others waiting.
        """
        error = input_error(indices, values, numel, self.device)
        ok = error is None
        n = numel if ok else 0
        count = (indices.numel() if ok else 0) if k is None else k
        kinds = call_codes(indices, values, self.name, self.key) if ok else (0, 0)
        opts = [int(v) for v in (options or {}).values()]
        # The same AGREE_HEAD ints and an int for every peer from every collective, whatever
        # its options and whether it tells: ranks that call different collectives then meet
        # in messages of one size (of others, gloo aborts the receiving process) and are told
        # so on every rank. The options go as one code; their values only where codes differ.
        head = [n, count, int(not ok), *kinds, text_crc(repr(list(zip(options or {}, opts))))]
        told = {q: int((tell or {}).get(q, 0)) for q in range(self.world) if q != self.rank}
        if uses_tree(self.world):
            lows, highs, heard = self._disseminate(head, told)
        else:
            rows = self.allgather_ints(head, extra=told)
            columns = list(zip(*(row[:AGREE_HEAD] for row in rows)))
            lows, highs = [min(c) for c in columns], [max(c) for c in columns]
            heard = {q: rows[q][AGREE_HEAD] for q in told}
        kmax, bad = highs[1], highs[2] > 0
        raise_disagreement(error, self.rank, bad, (lows[0], highs[0]), (lows[3:5], highs[3:5]),
                           indices, values, self.name, self.key)  # fmt: skip
        if lows[5] == highs[5]:
            return int(kmax), heard if tell is not None else {}
        # The same collective (its code agreed) with other options: their values, to name them.
        rows = self.allgather_ints(opts)
        differ = [
            f"{name} (between {min(column)} and {max(column)})"
            for name, column in zip(options or {}, zip(*rows))
            if min(column) != max(column)
        ]
        if differ:
            raise ValueError(
                f"the ranks' collectives differ in {', '.join(differ)}; build the collective "
                "with the same options on every rank, load the same state on every rank (or on "
                "none), and give each group of ranks keys of its own"
            )
        raise AssertionError("the options' codes differ where their values agree")

    def _disseminate(
        self, head: Sequence[int], told: Mapping[int, int]
    ) -> tuple[list[int], list[int], dict[int, int]]:
        """The agreement in ceil(log2 p) rounds: return the smallest and the largest value of
        each ``head`` entry over all ranks, and the int each peer told this rank.

        In the round of distance d (1, 2, 4, ...) this rank sends to rank + d and receives from
        rank - d, in one message: the smallest and largest heads it has seen, which then cover
        2d consecutive ranks (dissemination; overlaps do not matter to a minimum or maximum),
        and the per-peer ints of Bruck's index algorithm. Slot j starts with this rank's int
        for rank + j; the contents of slot j move to rank + d in every round whose d is a bit
        of j, so after the last round slot j holds what rank - j had for this rank.
        """
        p, r = self.world, self.rank
        width = len(head)
        lows = torch.tensor(head, dtype=torch.int64, device=self.device)
        highs = lows.clone()
        slots = torch.tensor(
            [told.get((r + j) % p, 0) if j else 0 for j in range(p)],
            dtype=torch.int64,
            device=self.device,
        )
        positions = torch.arange(slots.numel(), device=self.device)
        d = 1
        while d < p:
            moving = positions[(positions & d) != 0]
            message = torch.cat([lows, highs, slots[moving]])
            src = (r - d) % p
            got = self.exchange({(r + d) % p: message}, {src: message.numel()}, {}, torch.int64)
            lows = torch.minimum(lows, got[src][:width])
            highs = torch.maximum(highs, got[src][width : 2 * width])
            slots[moving] = got[src][2 * width :]
            d *= 2
        slots_list = slots.tolist()
        return lows.tolist(), highs.tolist(), {(r - j) % p: slots_list[j] for j in range(1, p)}

    # ---- collectives with counted bytes -------------------------------------------------
    def allreduce(self, t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
        """All-reduce ``t`` in place with ``op``; counted as a ring allreduce. From
        ``TREE_FROM`` ranks on, a 1-D vector of at most ``TREE_MAX_ELEMENTS`` elements reduced
        by SUM or MAX goes by recursive doubling instead (:meth:`_doubling_allreduce`, whose
        messages are counted as sent): floor(log2 p) rounds of one message, two more where p is
        not a power of two, where gloo's ring takes 2(p - 1) steps."""
        if (
            uses_tree(self.world)
            and t.dim() == 1
            and t.numel() <= TREE_MAX_ELEMENTS
            and op in _TREE_OPS
        ):
            return self._doubling_allreduce(t, op)
        if self.world > 1:
            dist.all_reduce(t, op=op, group=self.group)
        nbytes = ring_allreduce_bytes(t.numel(), t.element_size(), self.world)
        self.traffic.bytes_sent += nbytes
        self.traffic.bytes_recv += nbytes
        self.traffic.elems_sent += nbytes // t.element_size()
        return t

    def _doubling_allreduce(self, t: Tensor, op: dist.ReduceOp) -> Tensor:
        """Reduce ``t`` in place by recursive doubling, with SparCML's fold and unfold where p
        is not a power of two: of the first 2r ranks (r = p - p', p' the largest power of two
        not above p), each even rank hands its vector to the odd rank above it and gets the
        result back at the end; the p' others exchange and combine their partial results with
        the rank whose number differs in one bit, bit by bit. Both of a pair combine the same
        two operands in the same order (the lower-numbered one's first: ``torch.maximum`` of
        -0.0 and +0.0, or a sum of two NaNs, depends on the order), so every rank ends with
        the same bits."""
        p, r, n = self.world, self.rank, t.numel()
        core = 1 << (p.bit_length() - 1)
        extra = p - core

        def combine(a: Tensor, b: Tensor) -> Tensor:
            return a + b if op == dist.ReduceOp.SUM else torch.maximum(a, b)

        if r < 2 * extra and r % 2 == 0:  # folded: hand over, wait for the result
            self.exchange({r + 1: t}, {}, {}, t.dtype)
            t.copy_(self.exchange({}, {r + 1: n}, {}, t.dtype)[r + 1])
            return t
        if r < 2 * extra:
            acc, me = combine(self.exchange({}, {r - 1: n}, {}, t.dtype)[r - 1], t), r // 2
        else:
            acc, me = t.clone(), r - extra
        bit = 1
        while bit < core:
            other = me ^ bit
            partner = 2 * other + 1 if other < extra else other + extra
            got = self.exchange({partner: acc}, {partner: n}, {}, t.dtype)[partner]
            acc = combine(acc, got) if me < other else combine(got, acc)
            bit *= 2
        if r < 2 * extra:  # unfold
            self.exchange({r - 1: acc}, {}, {}, t.dtype)
        t.copy_(acc)
        return t

    def allgather_ints(
        self, values: Sequence[int], extra: Mapping[int, int] | None = None
    ) -> list[list[int]]:
        """Gather a few ints from every rank; return them per rank.

        Every rank passes as many ints and sends them straight to every peer, in one round
        (:meth:`exchange`): for a few ints, p - 1 messages at once cost far less waiting than
        a ring's p - 1 steps one after another (on gloo, 4 ranks on 2 cores: 2.2 ms against
        3.3 ms for ``all_gather`` and 5 ms for a ring allreduce of 16 ints). With ``extra``
        (an int for every peer), the message to peer q ends with ``extra[q]``, and the row
        from q with what q sent this rank; this rank's own row is ``values`` alone then.
        From ``TREE_FROM`` ranks on, a gather without ``extra`` runs Bruck's algorithm
        instead: ceil(log2 p) rounds, in the round of distance d the rows this rank holds
        (at most d) go to rank - d.
        """
        mine = [int(v) for v in values]
        if self.world == 1:
            return [mine]
        if extra is None and uses_tree(self.world):
            return self._bruck_gather(mine)
        peers = [q for q in range(self.world) if q != self.rank]
        width = len(mine) + (1 if extra is not None else 0)
        # Every peer's message in one tensor, copied to the device once (a copy a peer would be
        # a blocking copy and a stream sync each on CUDA); the rows are the messages.
        table = (
            torch.tensor(
                [mine + ([int(extra[q])] if extra is not None else []) for q in peers],
                dtype=torch.int64,
            )
            .reshape(len(peers), width)
            .to(self.device)
        )
        sends = {q: table[i] for i, q in enumerate(peers)}
        got = self.exchange(sends, dict.fromkeys(peers, width), {}, torch.int64)
        rows = torch.stack([got[q] for q in peers]).tolist() if width else [[] for _ in peers]
        out = dict(zip(peers, rows))
        out[self.rank] = mine
        return [out[r] for r in range(self.world)]

    def _bruck_gather(self, mine: list[int]) -> list[list[int]]:
        """Gather ``mine`` from every rank in ceil(log2 p) rounds (Bruck et al., 1997): this
        rank holds the rows of ranks rank, rank + 1, ...; in the round of distance d it sends
        the first min(d, p - d) of them to rank - d and appends as many from rank + d."""
        p, r, width = self.world, self.rank, len(mine)
        held = torch.tensor(mine, dtype=torch.int64, device=self.device)
        d = 1
        while d < p:
            count = min(d, p - d)
            src = (r + d) % p
            got = self.exchange(
                {(r - d) % p: held[: count * width]}, {src: count * width}, {}, torch.int64
            )
            held = torch.cat([held, got[src]])
            d *= 2
        rows = held.view(p, width).tolist() if width else [[] for _ in range(p)]
        return [rows[(q - r) % p] for q in range(p)]

    # ---- point-to-point -----------------------------------------------------------------
    def rotation(self) -> list[int]:
        """Peers in rotating order: at step s this rank sends to rank + s."""
        return [(self.rank + s) % self.world for s in range(1, self.world)]

    def exchange(
        self,
        sends: dict[int, Tensor],
        recv_sizes: dict[int, int],
        elems: dict[int, int],
        dtype: torch.dtype = torch.uint8,
    ) -> dict[int, Tensor]:
        """Send ``sends[peer]`` (1-D, of ``dtype``) to each peer and receive
        ``recv_sizes[peer]`` elements of ``dtype`` from each peer, in one batch. Empty messages are not posted (both sides
        know the sizes). ``elems[peer]`` is what the message counts toward ``elems_sent``.

        Returns the received tensors by peer (empty tensors for empty messages), on
        ``self.device``. Where the wire is :attr:`staged`, the messages cross it from and into
        host memory.
        """
        on_wire = torch.device("cpu") if self.staged else self.device
        ops, received, copies = [], {}, {}
        for s in range(1, self.world):
            dst, src = (self.rank + s) % self.world, (self.rank - s) % self.world
            buf = sends.get(dst)
            if buf is not None and buf.numel():
                if self.staged:  # one copy a tensor, also when it goes to every peer
                    if id(buf) not in copies:
                        copies[id(buf)] = (buf, self._to_host(buf))
                    buf = copies[id(buf)][1]
                buf = buf.contiguous()
                ops.append(dist.P2POp(dist.isend, buf, self.global_ranks[dst], self.group))
                self.traffic.bytes_sent += buf.numel() * buf.element_size()
                self.traffic.elems_sent += elems.get(dst, buf.numel())
            if src in recv_sizes:
                out = torch.empty(recv_sizes[src], dtype=dtype, device=on_wire)
                received[src] = out
                if out.numel():
                    ops.append(dist.P2POp(dist.irecv, out, self.global_ranks[src], self.group))
                    self.traffic.bytes_recv += out.numel() * out.element_size()
        if ops:
            # NCCL's batched point-to-point runs on the current CUDA device: make it the
            # tensors' (a caller need not have called torch.cuda.set_device).
            with torch.cuda.device(on_wire) if on_wire.type == "cuda" else nullcontext():
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
        if self.staged:
            received = {q: self._to_device(t, self.device) for q, t in received.items()}
        return received

    @staticmethod
    def _to_host(t: Tensor) -> Tensor:
        """A staged message's bytes in host memory: a blocking copy, complete before the send."""
        return t.contiguous().to("cpu")

    @staticmethod
    def _to_device(t: Tensor, device: torch.device) -> Tensor:
        """A staged message received in host memory, on the collective's device."""
        return t.to(device)

    def exchange_sizes(
        self, send_sizes: dict[int, int], recv_from: Sequence[int]
    ) -> dict[int, int]:
        """Tell each peer in ``send_sizes`` how much it will get; learn it from ``recv_from``."""
        sends = {
            p: torch.tensor([n], dtype=torch.int64, device=self.device)
            for p, n in send_sizes.items()
        }
        got = self.exchange(sends, dict.fromkeys(recv_from, 1), {}, torch.int64)
        if not got:
            return {}
        peers = list(got)
        sizes = torch.cat([got[p] for p in peers]).tolist()
        return dict(zip(peers, sizes))

    def alltoallv(self, sends: dict[int, Tensor], elems: dict[int, int]) -> dict[int, Tensor]:
        """Exchange variable-size byte buffers with every peer: sizes first, then payloads."""
        peers = [p for p in range(self.world) if p != self.rank]
        sizes = self.exchange_sizes({p: sends[p].numel() for p in peers}, peers)
        return self.exchange(sends, sizes, elems)

    def allgatherv(self, mine: Tensor, sizes: Sequence[int], elems: int) -> list[Tensor]:
        """Gather a variable-size 1-D tensor from every rank, whose sizes all ranks already
        know, by direct sends to every peer (one batch; each rank sends (p-1) times its block,
        as in a ring allgather, with one message latency instead of p-1)."""
        peers = [p for p in range(self.world) if p != self.rank]
        got = self.exchange(
            {p: mine for p in peers}, {p: int(sizes[p]) for p in peers}, dict.fromkeys(peers, elems)
        )
        got[self.rank] = mine
        return [got[r] for r in range(self.world)]


# ---- sparse messages and merges ------------------------------------------------------------
def as_bytes(t: Tensor) -> Tensor:
    """Return a 1-D tensor's elements as ``uint8`` bytes, copying them first unless they are
    adjacent in memory (a strided slice, even of one element or none, which torch calls
    contiguous, cannot be viewed as bytes)."""
    if t.stride(-1) != 1:
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(torch.uint8)


def pack(indices: Tensor, values: Tensor) -> Tensor:
    """Return one ``uint8`` buffer holding the indices' bytes, then the values' bytes."""
    return torch.cat([as_bytes(indices), as_bytes(values)])


def unpack(
    buf: Tensor, index_dtype: torch.dtype, value_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Split a buffer made by :func:`pack` back into (indices, values)."""
    ib = torch.empty((), dtype=index_dtype).element_size()
    vb = torch.empty((), dtype=value_dtype).element_size()
    n = buf.numel() // (ib + vb)
    return as_dtype(buf[: n * ib], index_dtype), as_dtype(buf[n * ib :], value_dtype)


def as_dtype(seg: Tensor, dtype: torch.dtype) -> Tensor:
    """Reinterpret a ``uint8`` segment as ``dtype``, copying it first if it is misaligned."""
    if seg.storage_offset() % torch.empty((), dtype=dtype).element_size():
        seg = seg.clone()
    return seg.view(dtype)


def is_sorted(indices: Tensor, strict: bool = False) -> bool:
    """Whether ``indices`` are in ascending order (``strict``: and unique). One linear pass."""
    if indices.numel() < 2:
        return True
    step = indices[1:] > indices[:-1] if strict else indices[1:] >= indices[:-1]
    return bool(step.all())


def coalesce(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the values of equal indices; return (sorted unique indices, sums). Vectorised.

    Input that is already sorted and unique (as the threshold compressor produces it) is
    returned as it is after one linear check, without a sort.
    """
    if is_sorted(indices, strict=True):
        return indices, values
    uniq, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=values.dtype, device=values.device)
    sums.index_add_(0, inverse, values)
    return uniq, sums


def merge(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate sparse vectors and sum duplicate indices."""
    idx = torch.cat([p[0] for p in parts])
    val = torch.cat([p[1] for p in parts])
    return coalesce(idx, val)


def split_by_bounds(
    indices: Tensor, values: Tensor, bounds: Sequence[int]
) -> list[tuple[Tensor, Tensor]]:
    """Split a sparse vector into the regions ``[bounds[j], bounds[j+1])``, sorted by index.

    ``bounds`` holds the p+1 region edges (first 0, last numel) as Python ints, which every
    caller has already (no copy back from the device). Sorted input is split as it is, without
    a sort.
    """
    if is_sorted(indices):
        idx, val = indices, values
    else:
        order = torch.argsort(indices)
        idx, val = indices[order], values[order]
    # Edges past the index dtype's range (int32 indices of a vector over 2**31 elements) lie
    # past every index; clamp them rather than let them wrap around.
    limit = torch.iinfo(idx.dtype).max
    edges = torch.tensor([min(int(b), limit) for b in bounds], dtype=idx.dtype, device=idx.device)
    offsets = torch.searchsorted(idx, edges).tolist()
    offsets = [idx.numel() if b > limit else o for b, o in zip(bounds, offsets)]
    counts = [offsets[j + 1] - offsets[j] for j in range(len(offsets) - 1)]
    return list(zip(torch.split(idx, counts), torch.split(val, counts)))


def even_bounds(numel: int, parts: int) -> list[int]:
    """Return the edges of ``parts`` contiguous ranges of (almost) equal length over numel."""
    return [j * numel // parts for j in range(parts + 1)]


def to_dense(indices: Tensor, values: Tensor, numel: int) -> Tensor:
    """Scatter a sparse vector with unique indices into a dense one."""
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    out[indices.long()] = values
    return out
