"""sparsetrain's native CPU kernel, built on first use with the machine's C compiler.

One kernel, :func:`compensate_select`, does in a single pass over memory what the CPU hot path
of a reused threshold (the ``threshold`` compressor between estimates) otherwise does in
PyTorch ops over pieces of the tensor: error feedback's compensation ``gradient + residual``,
the selection of the entries above the threshold (their indices, ascending), the finiteness
check of the gradient and the clearing of the gradient. It computes the same values bit for
bit (tests compare it with the PyTorch path); on the 2-core test machine, four processes doing
it at once over a 9.7M-element gradient took about half the CPU time of the PyTorch ops.

The C source ships with the package (``fused.c``). The first process that needs it compiles it
with ``$CC`` (default ``cc``) into a cache directory, ``$SPARSETRAIN_CACHE_DIR``, else
``$XDG_CACHE_HOME/sparsetrain``, else ``~/.cache/sparsetrain``, named by a hash of the source
and the compiler command, so every later process (and every rank) loads the compiled library
at once; concurrent first uses each compile to a file of their own and rename it into place.
Without a working compiler the kernel is unavailable: the callers keep their PyTorch path (the
same values, more time) and a :class:`RuntimeWarning` says once per process why.
``SPARSETRAIN_NATIVE=0`` (or ``off``, ``false``, ``no``, in any case) turns the kernel off (no
compiling, no warning). The kernel runs in one thread, as training processes do under
torchrun (which sets ``OMP_NUM_THREADS=1``) and in :func:`sparsetrain.train.launch`.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._ccache import compile_cached

_SOURCE = Path(__file__).with_name("fused.c")
_ABI = 4
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason: str | None = None

_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_SYMBOLS = {torch.float32: "st_compensate_select_f32", torch.float64: "st_compensate_select_f64"}
_INDEX = {torch.int32: "i32", torch.int64: "i64"}
_VALUE = {torch.float32: "f32", torch.float64: "f64"}


_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on", "")
_WARNED: set[str] = set()  # values of SPARSETRAIN_NATIVE already warned about


def enabled() -> bool:
    """Whether the kernel may be used (``SPARSETRAIN_NATIVE`` is not ``0``). A value that is
    neither on nor off (a typo) is taken as on, with a warning once."""
    raw = os.environ.get("SPARSETRAIN_NATIVE", "1")
    value = raw.strip().lower()
    if value not in _OFF and value not in _ON and value not in _WARNED:
        _WARNED.add(value)
        warnings.warn(
            f"SPARSETRAIN_NATIVE={raw!r} is neither on ({', '.join(_ON[:-1])}) nor off "
            f"({', '.join(_OFF)}): taken as on",
            RuntimeWarning,
            stacklevel=2,
        )
    return value not in _OFF


def _build() -> ctypes.CDLL:
    """Compile fused.c (unless a library of this source and compiler is cached) and load it."""
    return load(compile_cached(_SOURCE, _FLAGS, ".so"))


def load(path: str | os.PathLike) -> ctypes.CDLL:
    """Load a compiled ``fused.c`` and declare its functions' arguments (the tests load a
    build of the portable version alone so)."""
    lib = ctypes.CDLL(str(path))
    if lib.st_abi_version() != _ABI:
        raise RuntimeError(f"{path} has interface {lib.st_abi_version()}, expected {_ABI}")
    for dtype, name in _SYMBOLS.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        fn.argtypes = [
            ctypes.c_void_p,  # grad
            ctypes.c_void_p,  # res (or None)
            ctypes.c_void_p,  # out
            ctypes.c_int64,  # n
            _CTYPES[dtype],  # thr
            ctypes.c_int64,  # base
            ctypes.c_void_p,  # idx
            ctypes.c_void_p,  # vals (or None)
            ctypes.c_int64,  # cap
            ctypes.c_int64,  # count
            ctypes.c_void_p,  # nonfinite (int32)
            ctypes.c_int32,  # clear
        ]
    lib.st_set_vector_level.restype = ctypes.c_int32
    lib.st_set_vector_level.argtypes = [ctypes.c_int32]
    lib.st_last_vector_level.restype = ctypes.c_int32
    for i in _INDEX.values():
        for v in _VALUE.values():
            fn = getattr(lib, f"st_difference_{i}_{v}")
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it is turned off or
    cannot be built (the reason is in :func:`unavailable_reason`, and warned once)."""
    global _lib, _tried, _reason
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as e:  # no compiler, a read-only cache, a foreign library
                _reason = str(e)
                _tried = True  # first: a warning raised as an error must not retry the build
                warnings.warn(
                    f"sparsetrain: the native CPU kernel is unavailable ({_reason}); the "
                    "threshold compressor's CPU path runs in PyTorch ops instead (same values, "
                    "about twice the time). Set SPARSETRAIN_NATIVE=0 to skip it silently.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _lib


_LEVELS = {0: "portable C", 1: "SSE2", 2: "AVX2"}


def vector_level(level: int | None = None) -> str | None:
    """The vector instructions the selection pass uses: "AVX2" or "SSE2" on x86-64 (the best
    the CPU has), "portable C" elsewhere; None when the kernel is unavailable. ``level`` (0
    portable C, 1 SSE2, 2 AVX2, -1 the best) makes the kernel use that version from now on in
    this process, at most the best the CPU has: the tests compare the versions so."""
    lib = library()
    if lib is None:
        return None
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        raise TypeError(f"level must be an int (-1, 0, 1 or 2), got {level!r}")
    return _LEVELS[lib.st_set_vector_level(-2 if level is None else level)]


def last_vector_level() -> str | None:
    """The version the last kernel call in this process ran (as :func:`vector_level` names
    them); None before the first, or when the kernel is unavailable."""
    lib = library()
    if lib is None:
        return None
    return _LEVELS.get(lib.st_last_vector_level())


def unavailable_reason() -> str | None:
    """Why the last attempt to build the kernel failed (None if it did not fail)."""
    return _reason


def supports(t: Tensor) -> bool:
    """Whether :func:`compensate_select` takes tensors like ``t`` (CPU, float32 or float64)."""
    return t.device.type == "cpu" and t.dtype in _SYMBOLS


def compensate_select(
    grad: Tensor,
    residual: Tensor | None,
    out: Tensor | None,
    threshold: float,
    base: int,
    hits: Tensor,
    count: int,
    clear: bool = True,
    values: Tensor | None = None,
) -> tuple[int, bool]:
    """``out = grad + residual`` (or ``grad``), record ``base + i`` for each ``i`` with
    ``|out[i]| > threshold`` (or NaN) in ``hits[count:]`` in ascending order while it has room
    (and ``out[i]`` in ``values[count:]``, as long as ``hits``, when given), and clear ``grad``;
    all in one pass. Returns ``(count, nonfinite)``: ``count`` plus the
    number selected here (it may exceed ``hits.numel()``: the excess is counted, not
    recorded), and whether ``grad`` held a NaN or an infinity.

    ``grad``, ``residual`` and ``out``: contiguous CPU tensors of one dtype (float32 or
    float64) and one number of elements. ``out`` None (with no residual and ``clear`` False):
    only select from ``grad``. ``hits``: contiguous int64. Raises RuntimeError when the kernel
    is unavailable (:func:`library` returns None).
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernel is unavailable: {_reason or 'turned off'}")
    if out is None and (residual is not None or clear):
        raise ValueError("compensate_select: without out, no residual and no clearing")
    n = grad.numel()
    tensors = [t for t in (grad, residual, out) if t is not None]
    for t in tensors:
        if t.dtype != grad.dtype or t.numel() != n or not t.is_contiguous() or not supports(t):
            got = [(x.dtype, x.numel(), str(x.device), x.is_contiguous()) for x in tensors]
            raise ValueError(
                "compensate_select: grad, residual and out must be contiguous CPU tensors of "
                f"one dtype (float32 or float64) and size; got (dtype, size, device, "
                f"contiguous) {got}"
            )
    _check_hits(hits, values, grad.dtype)
    if not threshold >= 0:  # negative or NaN: hardshrink then keeps what it keeps at 0
        threshold = 0.0
    flag = ctypes.c_int32(0)
    count = getattr(lib, _SYMBOLS[grad.dtype])(
        grad.data_ptr(),
        None if residual is None else residual.data_ptr(),
        None if out is None else out.data_ptr(),
        n,
        threshold,
        base,
        hits.data_ptr(),
        None if values is None else values.data_ptr(),
        hits.numel(),
        count,
        ctypes.byref(flag),
        int(clear),
    )
    return count, bool(flag.value)


def compensate_select_parts(
    grads: Sequence[Tensor],
    residuals: Sequence[Tensor | None],
    out: Tensor,
    threshold: float,
    hits: Tensor,
    values: Tensor | None = None,
) -> tuple[int, list[bool]]:
    """:func:`compensate_select` for a bucket's gradients in one call: ``out`` (contiguous)
    holds their compensations one after the other, ``grads[j]`` is compensated with
    ``residuals[j]`` (or None) into its piece of ``out`` and cleared, and the selected
    positions count from the start of ``out``. The same values as one
    :func:`compensate_select` a gradient, with the checks done once for the bucket and no view
    of ``out`` made per gradient: a model of hundreds of small tensors (a transformer's biases
    and norms) spent most of its step in those per-call checks.

    Returns ``(count, nonfinite)``: as :func:`compensate_select`'s, ``nonfinite[j]`` for
    ``grads[j]``. Raises RuntimeError when the kernel is unavailable, ValueError for tensors
    it does not take.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernel is unavailable: {_reason or 'turned off'}")
    dtype = out.dtype
    if len(grads) != len(residuals):
        raise ValueError(
            f"compensate_select_parts: {len(grads)} gradients but {len(residuals)} residuals"
        )
    total = 0
    for g, r in zip(grads, residuals):
        for t in (g,) if r is None else (g, r):
            if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(
                    "compensate_select_parts: gradients and residuals must be contiguous CPU "
                    f"tensors of out's dtype ({dtype}); got {t.dtype} on {t.device}, "
                    f"contiguous: {t.is_contiguous()}"
                )
        if r is not None and r.numel() != g.numel():
            raise ValueError(
                f"compensate_select_parts: a residual of {r.numel()} elements for a gradient "
                f"of {g.numel()}"
            )
        total += g.numel()
    if not supports(out) or not out.is_contiguous() or out.numel() != total:
        raise ValueError(
            "compensate_select_parts: out must be a contiguous CPU float32 or float64 tensor "
            f"as long as the gradients together ({total}); got {out.dtype} of {out.numel()} "
            f"on {out.device}"
        )
    _check_hits(hits, values, dtype)
    if not threshold >= 0:  # as compensate_select
        threshold = 0.0
    fn = getattr(lib, _SYMBOLS[dtype])
    size, base = out.element_size(), out.data_ptr()
    hits_at, cap = hits.data_ptr(), hits.numel()
    values_at = None if values is None else values.data_ptr()
    flag = ctypes.c_int32(0)
    flag_at = ctypes.byref(flag)
    count, offset, nonfinite = 0, 0, []
    for g, r in zip(grads, residuals):
        n = g.numel()
        flag.value = 0
        count = fn(
            g.data_ptr(),
            None if r is None else r.data_ptr(),
            base + offset * size,
            n,
            threshold,
            offset,
            hits_at,
            values_at,
            cap,
            count,
            flag_at,
            1,
        )
        nonfinite.append(bool(flag.value))
        offset += n
    return count, nonfinite


def _check_hits(hits: Tensor, values: Tensor | None, dtype: torch.dtype) -> None:
    if hits.dtype != torch.int64 or not hits.is_contiguous() or hits.device.type != "cpu":
        raise ValueError("compensate_select: hits must be a contiguous CPU int64 tensor")
    if values is not None and (
        values.dtype != dtype
        or values.numel() != hits.numel()
        or not values.is_contiguous()
        or values.device.type != "cpu"
    ):
        raise ValueError(
            "compensate_select: values must be a contiguous CPU tensor of grad's dtype, as "
            f"long as hits ({hits.numel()}); got {values.dtype} of {values.numel()}"
        )


def select(flat: Tensor, threshold: float, hits: Tensor) -> int:
    """Record the positions of ``|flat| > threshold`` (or NaN) in ``hits``, ascending, as far
    as it holds; return their number (which may exceed ``hits.numel()``). One read of
    ``flat``; see :func:`compensate_select`."""
    return compensate_select(flat, None, None, threshold, 0, hits, 0, clear=False)[0]


def difference(indices: Tensor, values: Tensor, selected: Tensor) -> tuple[Tensor, Tensor] | None:
    """The entries of the sparse vector (``indices``, ``values``) whose index is not in
    ``selected``, in order, in one linear pass; the same as ``indices[~isin(indices,
    selected)]`` and ``values[...]``. Both index tensors must be strictly ascending and of one
    integer dtype (int32 or int64), on the CPU, with float32 or float64 values. None where the
    kernel cannot do it (unavailable, other dtypes or devices, indices not ascending)."""
    lib = library()
    tensors = (indices, values, selected)
    if (
        lib is None
        or any(t.device.type != "cpu" for t in tensors)
        or indices.dtype not in _INDEX
        or selected.dtype != indices.dtype
        or values.dtype not in _VALUE
        or values.numel() != indices.numel()
    ):
        return None
    indices, values, selected = (t.contiguous() for t in tensors)
    out_i, out_v = torch.empty_like(indices), torch.empty_like(values)
    fn = getattr(lib, f"st_difference_{_INDEX[indices.dtype]}_{_VALUE[values.dtype]}")
    n = fn(
        indices.data_ptr(),
        values.data_ptr(),
        indices.numel(),
        selected.data_ptr(),
        selected.numel(),
        out_i.data_ptr(),
        out_v.data_ptr(),
    )
    if n < 0:
        return None
    return out_i[:n], out_v[:n]
