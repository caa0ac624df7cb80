"""Threshold sparsification with a threshold re-estimated only now and then (Ok-Topk style)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _native
from .._options import state_int
from . import register_compressor
from .base import (
    Payload,
    SparseCompressor,
    TensorMeta,
    check_density,
    check_floating,
    check_int,
    index_dtype,
    k_for,
    seeded_generator,
)

# Elements per chunk of the CPU selection pass: the chunk's scratch (1 MiB of float32) stays in
# L2 cache, and the per-op overhead (a few microseconds) is paid ~100 times for 25M elements.
_CPU_CHUNK = 1 << 18
# Sampled elements come in runs of this many neighbours (one 64-byte cache line of float32), so a
# sample of m elements costs m/16 random memory accesses instead of m.
_RUN = 16
# Below one hit in this many entries the mask's words are scanned in two levels (see _select),
# in groups of _ROWS words.
_SPARSE = 500
_ROWS = 4
# The estimate bounds its top values from every _SUB-th sampled value (see _estimate).
_SUB = 16
# An over-full selection from a reused threshold is cut to its top-k only while it holds at most
# one entry in this many: a topk costs 12-30 ns per selected entry on CPU, a fresh estimate and
# selection 1-2 ns per entry of the tensor, so beyond that the second pass is the cheaper one.
_CUT_FRACTION = 16


_STATE_ENTRIES = ("threshold", "slope", "step", "last_estimate")


@dataclass
class _KeyState:
    threshold: float
    slope: float  # -d log(count) / d log(threshold) near the threshold (last estimate or cut)
    step: int  # compress() calls so far for this key
    last_estimate: int  # the step the threshold was last estimated at


@register_compressor("threshold")
@dataclass
class Threshold(SparseCompressor):
    """Keep the entries with ``|g| > threshold``, the threshold tracking ``k = density * numel``.

    Exact top-k needs a selection over the whole tensor every step; this compressor estimates the
    k-th largest magnitude only every ``reestimate_every`` steps and reuses it in between, as in
    Ok-Topk (Li and Hoefler, "Near-Optimal Sparse Allreduce for Distributed Deep Learning",
    PPoPP 2022), so the hot path is one comparison pass plus ``nonzero``, no sort.

    Steps, per ``key``:

    1. Estimate (first call, every ``reestimate_every`` steps, or when the count left the band)
       the k-th largest ``|g|``. Small tensors use an exact ``torch.topk``; large ones take a
       random sample of ``m = sample_kept / density`` elements (runs of 16 neighbours at seeded
       random offsets) and its ``sample_kept``-th largest magnitude, whose count error is about
       ``1/sqrt(sample_kept)``. The ratio of the k-th to the 2k-th largest gives the local slope
       of count against threshold.
    2. Select ``|g| > threshold`` (exact zeros are never sent).
    3. If the count is outside ``[k / band, k * band]`` and the threshold was not just
       estimated, estimate again and redo step 2, except when a positive reused threshold
       selected too many but at most 1/16 of the tensor: then keep the k largest of the
       selected, the exact top-k, without a second pass over the tensor. If even a fresh
       threshold keeps more than ``band * k`` (ties), also keep the k largest of the selected.
       So at most ``band * k`` entries are sent.
    4. Correct the threshold for the next step from the count, Newton-style on the log-log
       slope: ``threshold *= (count / k) ** (1 / slope)``, the factor clamped to [1/2, 2];
       after keeping the k largest, start from the k-th largest magnitude instead when it is
       above the threshold used.

    Biased (the residual is exactly the unsent entries), so error feedback is on by default.

    Args:
        density: fraction of entries to keep, in (0, 1]. At 1.0 every entry is sent (lossless).
        reestimate_every: steps between estimates of the threshold, >= 1.
        band: > 1. Re-estimate at once when the count leaves ``[k / band, k * band]``, or keep
            the k largest of the selected (step 3).
        sample_kept: sampled elements above the estimate; the sample has ``sample_kept /
            density`` elements, and tensors not much larger than that are estimated exactly.
        seed: seeds the sample (with the key and step), so runs are reproducible.

    Example:
        >>> c = Threshold(density=0.01)
        >>> (idx, val), ctx = c.compress(torch.randn(100_000), key="layer")
        >>> 500 < idx.numel() < 2000
        True
    """

    sorted_indices: ClassVar[bool] = True  # the selection scans the tensor in order
    density: float = 0.01
    reestimate_every: int = 10
    band: float = 1.25
    sample_kept: int = 1024
    seed: int = 0
    _keys: dict[str, _KeyState] = field(default_factory=dict, init=False, repr=False, compare=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_keys",)  # state by bucket key
    _mask: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _scratch: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _hits: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _hit_values: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_density(self.density)
        check_int(self.reestimate_every, "reestimate_every", 1)
        check_int(self.sample_kept, "sample_kept", 1)
        check_int(self.seed, "seed", 0)
        if not isinstance(self.band, (int, float)) or isinstance(self.band, bool):
            raise TypeError(f"band must be a finite number > 1, got {self.band!r}")
        if not 1.0 < self.band < math.inf:
            raise ValueError(
                "band must be a finite number > 1 (the count may be within k/band..k*band), "
                f"got {self.band}"
            )

    def __getstate__(self) -> dict[str, Any]:
        # The workspaces are scratch (tens of MB for large buckets): rebuild them after unpickling.
        return {**self.__dict__, "_mask": None, "_scratch": None, "_hits": None, "_hit_values": {}}

    # ---- the hot path ------------------------------------------------------------------------
    def reused_threshold(self, key: str, numel: int) -> float | None:
        """The threshold the next :meth:`compress` of ``numel`` elements under ``key`` selects
        with first, when it reuses one; None when it estimates one first (or sends all)."""
        st = self._keys.get(key)
        if k_for(numel, self.density) >= numel or st is None:
            return None
        if st.step - st.last_estimate >= self.reestimate_every:
            return None
        return st.threshold

    def marker(self, numel: int, threshold: float) -> Callable[[int, Tensor], None]:
        """Return ``mark(offset, piece)``, which records ``|piece| > threshold`` for the
        elements ``[offset, offset + len(piece))`` of a CPU tensor of ``numel`` elements.

        A caller that writes the tensor piece by piece (error feedback's compensation) marks
        each piece while it is in cache, then passes ``marked=threshold`` to :meth:`compress`,
        which takes the marks instead of a pass of its own. Every element must be marked once,
        after the last call of :meth:`compress` and before the next; the marks are the same
        values that pass computes.
        """
        words = -(-numel // (8 * _ROWS)) * _ROWS
        if self._mask is None or self._mask.numel() < words * 8:
            self._mask = torch.zeros(words * 8, dtype=torch.bool)
        mask = self._mask
        mask[numel : words * 8] = False

        def mark(offset: int, piece: Tensor) -> None:
            if self._scratch is None or self._scratch.dtype != piece.dtype:
                self._scratch = torch.empty(_CPU_CHUNK, dtype=piece.dtype)
            within = min(threshold, float(torch.finfo(piece.dtype).max))  # (as compress does)
            for a in range(0, piece.numel(), _CPU_CHUNK):
                part = piece[a : a + _CPU_CHUNK]
                scratch = self._scratch[: part.numel()]
                torch.hardshrink(part, within, out=scratch)
                mask[offset + a : offset + a + part.numel()].copy_(scratch)

        return mark

    def hits_buffer(self, numel: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Reused buffers (int64 positions, ``dtype`` values) into which a caller that selects
        while it writes a tensor of ``numel`` elements (sparsetrain's native kernel) records
        the entries ``|x| > threshold`` before it passes them as ``selected`` to
        :meth:`compress`.

        They hold the most entries :meth:`compress` can keep from a reused threshold without a
        fresh estimate (``band * k``, or 1/16 of the tensor for the cut to the top-k), so a
        count beyond their size, of which only the size is recorded, always means a fresh
        estimate and selection.
        """
        cap = self._hits_cap(numel)
        if self._hits is None or self._hits.numel() < cap:
            self._hits = torch.zeros(cap, dtype=torch.int64)
        values = self._hit_values.get(dtype)
        if values is None or values.numel() < cap:
            values = self._hit_values[dtype] = torch.zeros(cap, dtype=dtype)
        # The positions are shared by every dtype, the values kept per dtype: a bucket of
        # another dtype may have left either one longer, so both are cut to this cap.
        return self._hits[:cap], values[:cap]

    def _hits_cap(self, numel: int) -> int:
        k = k_for(numel, self.density)
        # (never more than the tensor: a wide band at a high density would ask for more)
        return min(numel, max(numel // _CUT_FRACTION, math.floor(k * self.band))) + 1

    def compress(
        self,
        t: Tensor,
        *,
        key: str = "",
        layout=None,
        marked: float | None = None,
        selected: tuple[Tensor, Tensor | None, int] | None = None,
    ) -> tuple[Payload, TensorMeta]:
        """Compress ``t`` (see the class). ``marked``: a threshold with which a :meth:`marker`
        has marked all of ``t`` since the last call; used when it is the reused threshold.
        ``selected`` (with ``marked``), instead of marks: ``(positions, values, count)``, the
        ``count`` entries of ``t`` above ``marked`` of which the first ``positions.numel()``
        are recorded, ascending, with their values (or None: read from ``t``); ``positions``
        at least as long as :meth:`hits_buffer`'s."""
        check_floating(t)
        flat = t.reshape(-1)
        n = flat.numel()
        k = k_for(n, self.density)
        st = self._keys.get(key)
        step = st.step if st is not None else 0
        if k >= n:
            idx = torch.arange(n, device=flat.device)
            self._keys[key] = _KeyState(0.0, 1.0, step + 1, step)
            return (idx.to(index_dtype(n)), flat.clone()), TensorMeta.of(t)

        fresh = st is None or step - st.last_estimate >= self.reestimate_every
        if fresh:
            threshold, slope = self._estimate(flat, k, key, step)
        else:
            # At most the dtype's largest value, which keeps what any larger one would: a kept
            # threshold rescaled past float16's range by a growing loss scale (or loaded) could
            # not be compared with the tensor (hardshrink refuses it).
            threshold = min(st.threshold, float(torch.finfo(flat.dtype).max))
            slope = st.slope
        premarked = (
            not fresh and marked is not None and marked == threshold and flat.device.type == "cpu"
        )
        kept = None  # the values of idx, when the caller recorded them
        if premarked and selected is not None:
            positions, recorded, count = selected
            if count > positions.numel() < self._hits_cap(n):
                raise ValueError(
                    f"compress: {count} entries selected but only {positions.numel()} "
                    "recorded; the positions must be at least as long as hits_buffer's"
                )
            # Beyond the buffer (only counted) the count is over-full and too large to cut, so
            # the selection is redone below from a fresh estimate and idx is never read.
            # Copies: the buffers are overwritten next step, and the payload must not change.
            idx = positions[:count].clone() if count <= positions.numel() else None
            if idx is not None and recorded is not None:
                kept = recorded[:count].clone()
        else:
            idx = self._select(flat, threshold, expected=k, premarked=premarked)
            count = idx.numel()
        over = count > k * self.band
        cut = over and threshold > 0 and count * _CUT_FRACTION <= n
        # (Too few under a threshold of 0 are every non-zero entry: a new estimate would find
        # 0 again. Gradients with fewer non-zeros than k/band, an embedding's, had re-estimated
        # at every step.)
        if not fresh and ((count < k / self.band and threshold > 0) or (over and not cut)):
            threshold, slope = self._estimate(flat, k, key, step)
            fresh = True
            idx = self._select(flat, threshold, expected=k)
            count = idx.numel()
            kept = None
        factor = (count / k) ** (1.0 / slope) if count > 0 else 0.5
        next_threshold = threshold * min(2.0, max(0.5, factor))
        if count > k * self.band:
            # Over-full: a reused threshold that the gradient outgrew (cut, above), or ties after
            # a fresh estimate. The selection holds every entry above the threshold, so its k
            # largest are the tensor's exact top-k; the k-th of them is the threshold that would
            # have kept k this step, and the next step starts there.
            top = torch.topk(torch.index_select(flat, 0, idx).abs(), k, sorted=False)
            # Positions sorted, so the kept indices stay in ascending order (sorted_indices).
            idx = torch.index_select(idx, 0, torch.sort(top.indices).values)
            kept = None
            at_k = top.values.min()
            kth = float(torch.nextafter(at_k, torch.zeros_like(at_k)))
            if kth > threshold > 0:
                next_threshold = kth
                slope = min(max(math.log(count / k) / math.log(kth / threshold), 0.5), 50.0)
        # Within the dtype's range: doubled past float16's 65504 (tied top values of 40000),
        # it could not be compared with the next step's tensor (hardshrink refused it).
        next_threshold = min(next_threshold, float(torch.finfo(flat.dtype).max))
        self._keys[key] = _KeyState(
            next_threshold, slope, step + 1, step if fresh else st.last_estimate
        )
        values = kept if kept is not None else torch.index_select(flat, 0, idx)
        return (idx.to(index_dtype(n)), values), TensorMeta.of(t)

    def _select(
        self,
        flat: Tensor,
        threshold: float,
        expected: int | None = None,
        premarked: bool = False,
    ) -> Tensor:
        """Return the sorted int64 indices of ``|flat| > threshold``.

        ``hardshrink`` (x where ``|x| > threshold``, else 0) and a cast to bool are both
        vectorised single passes; a comparison that writes bool directly is several times slower
        on CPU. ``nonzero`` then runs over the bool mask read as 64-bit words (8 flags a word) and
        only looks inside the words that hold a hit. ``nonzero`` costs about the same per element
        whatever the element's width, so when few hits are ``expected`` (at most one in
        ``_SPARSE`` entries) the words are first summed in groups of ``_ROWS`` (one word from
        each of ``_ROWS`` equal slices of the mask: a vectorised pass) and ``nonzero`` runs over
        the sums, then over the words of the groups that hold a hit. The result is the same
        either way. ``premarked``: a :meth:`marker` has written the mask already. Where
        sparsetrain's native kernel is available (:mod:`sparsetrain._native`), an unmarked CPU
        tensor of float32 or float64 is selected by it instead, in one pass that writes the
        positions, unless it holds more hits than :meth:`hits_buffer` holds: on x86-64 (AVX2
        or SSE2) at every density, the faster way there (on 25M elements on this project's
        machine, ``benchmarks/bench_native.py``: AVX2 12.7 ms against 38.6 ms for the PyTorch
        ops at 1% and 11.8 ms against 25.5 ms at 0.1%). The portable version, which other
        processors run, is taken where the kernel's first version was, above one expected hit
        in ``_SPARSE`` entries; its speed there is not measured (built for x86-64's baseline
        instructions it took 42.1 and 31.8 ms).
        """
        n = flat.numel()
        if flat.device.type != "cpu":
            return torch.nonzero(torch.hardshrink(flat, threshold)).squeeze(1)
        sparse = expected is not None and expected * _SPARSE <= n
        if not premarked and _native.supports(flat) and flat.is_contiguous():
            level = _native.vector_level()  # None: no kernel
            if level in ("AVX2", "SSE2") or (level == "portable C" and not sparse):
                buffer = self.hits_buffer(n, flat.dtype)[0]
                count = _native.select(flat, threshold, buffer)
                if count <= buffer.numel():
                    return buffer[:count].clone()
        # Whole groups of _ROWS words, so the mask reshapes to (_ROWS, words // _ROWS).
        words = -(-n // (8 * _ROWS)) * _ROWS
        if not premarked:
            self.marker(n, threshold)(0, flat)
        mask = self._mask[: words * 8]
        words_view = mask.view(torch.int64)
        if sparse:
            # Each word is 8 bytes of 0 or 1, so a sum of _ROWS words neither overflows nor
            # cancels: it is nonzero exactly when one of the words is.
            cols = words // _ROWS
            sums = words_view.view(_ROWS, cols).sum(0)
            hit_cols = torch.nonzero(sums).squeeze(1)
            # Word indices of the hit groups, row by row: ascending, as nonzero's output is.
            rows = torch.arange(0, words, cols, dtype=torch.int64).unsqueeze(1)
            candidates = (rows + hit_cols).reshape(-1)
            cand_words = torch.index_select(words_view, 0, candidates)
            nz = torch.nonzero(cand_words).squeeze(1)
            word_idx = torch.index_select(candidates, 0, nz)
            hit_words = torch.index_select(cand_words, 0, nz)
        else:
            word_idx = torch.nonzero(words_view).squeeze(1)
            hit_words = torch.index_select(words_view, 0, word_idx)
        hits = torch.nonzero(hit_words.view(torch.bool).view(-1, 8))
        return torch.index_select(word_idx, 0, hits[:, 0]) * 8 + hits[:, 1]

    # ---- estimation --------------------------------------------------------------------------
    def _estimate(self, flat: Tensor, k: int, key: str, step: int) -> tuple[float, float]:
        """Return (threshold, slope): the k-th largest ``|flat|`` (exact or from a sample).

        The top values are found by a ``topk`` over the values not below a bound, the
        ``1 / _SUB``-th largest of every ``_SUB``-th value at 4x the rank needed (so the bound
        leaves ~4x as many values as needed); should it leave too few, over all values. The top
        values, hence the result, are the same either way, for a fraction of the cost.
        """
        n = flat.numel()
        sample = math.ceil(self.sample_kept / self.density)
        if 2 * sample >= n or sample < _RUN:  # a sample of whole runs, or every value
            values, kk = flat.abs(), k
        else:
            runs = sample // _RUN
            gen = seeded_generator(self.seed, key, step, flat.device)
            starts = torch.randint(n // _RUN, (runs,), generator=gen, device=flat.device)
            rows = flat[: (n // _RUN) * _RUN].view(-1, _RUN)
            values = torch.index_select(rows, 0, starts).abs_().reshape(-1)
            kk = max(1, round(self.density * values.numel()))
        top_n = min(2 * kk, values.numel())
        candidates = values
        if _SUB * 16 * top_n <= values.numel():
            sub = values[::_SUB]
            bound = torch.topk(sub, max(1, 4 * top_n // _SUB), sorted=False).values.min()
            kept = values[torch.lt(values, bound).logical_not_()]  # NaN kept, as topk ranks it
            if kept.numel() >= top_n:
                candidates = kept
        top = torch.topk(candidates, top_n, sorted=True).values
        at_k = top[kk - 1]
        # Keep the k-th element itself: |g| > threshold is strict, so step just below it. The
        # three numbers are read together: one wait for the device, not three.
        below = torch.nextafter(at_k, torch.zeros_like(at_k))
        threshold, at_k, at_2k = torch.stack([below, at_k, top[-1]]).tolist()
        ratio = at_k / at_2k if at_2k > 0 else math.inf
        slope = math.log(top_n / kk) / math.log(ratio) if ratio > 1 else 1.0
        return max(threshold, 0.0), min(max(slope, 0.5), 50.0)

    # ---- state -------------------------------------------------------------------------------
    def rescale(self, factor: float) -> None:
        """Multiply the kept thresholds by ``factor`` (the gradients' scale changed); the
        slopes are ratios of logarithms' differences and do not change."""
        for st in self._keys.values():
            st.threshold *= factor

    def state_dict(self) -> dict[str, Any]:
        """Return the per-key thresholds, slopes and step counters (plain Python numbers)."""
        return {
            key: {
                "threshold": s.threshold,
                "slope": s.slope,
                "step": s.step,
                "last_estimate": s.last_estimate,
            }
            for key, s in self._keys.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next compress continues exactly. A
        malformed state is refused, naming what is wrong, and nothing is loaded."""
        owner = "compressor 'threshold'"
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{owner}: load_state_dict takes the dict {{key: {{threshold, slope, step, "
                f"last_estimate}}}} that state_dict() returned, got {type(state).__name__}"
            )
        keys = {}
        for key, s in state.items():
            if not isinstance(s, Mapping) or set(s) != set(_STATE_ENTRIES):
                got = (
                    f"the entries {', '.join(sorted(map(repr, s))) or 'none'}"
                    if isinstance(s, Mapping)
                    else f"{s!r:.200}"
                )
                raise ValueError(
                    f"threshold state for key {key!r} must have threshold, slope, step and "
                    f"last_estimate (exactly these entries); got {got}"
                )
            threshold, slope = s["threshold"], s["slope"]
            for name, value in (("threshold", threshold), ("slope", slope)):
                if (
                    not isinstance(value, (int, float))
                    or isinstance(value, bool)
                    or not math.isfinite(value)
                ):
                    raise ValueError(
                        f"threshold state for key {key!r}: {name} must be a finite number, got "
                        f"{value!r}"
                    )
            if threshold < 0:
                raise ValueError(
                    f"threshold state for key {key!r}: threshold must be >= 0, got {threshold}"
                )
            if not slope > 0:
                raise ValueError(f"threshold state for key {key!r}: slope must be > 0, got {slope}")
            step = state_int(s["step"], f"threshold state for key {key!r}: step")
            last = state_int(s["last_estimate"], f"threshold state for key {key!r}: last_estimate")
            if last > step:
                raise ValueError(
                    f"threshold state for key {key!r}: last_estimate ({last}) must not exceed "
                    f"step ({step})"
                )
            keys[str(key)] = _KeyState(float(threshold), float(slope), step, last)
        self._keys = keys
