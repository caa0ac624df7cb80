"""SafeguardSGD: remove, for good, workers whose accumulated gradients stray from a majority's.

Allen-Zhu, Ebrahimian, Li, Alistarh, "Byzantine-Resilient Non-Convex Stochastic Gradient
Descent", ICLR 2021, Algorithm 1 ("perturbed SGD with double safe guard").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._options import (
    caller_stacklevel,
    check_saved_settings,
    check_state,
    plain,
    state_int,
    state_mapping,
)
from .base import (
    Aggregator,
    check_int,
    check_positive,
    generator_for,
    key_seed,
    pairwise_sq_dists,
    register_aggregator,
)

_WINDOWS = ("short", "long")
_STATE = ("step", "good", "removed", "acc", "spread", "calibrated_good", "no_majority")


@register_aggregator("safeguard")
@dataclass
class Safeguard(Aggregator):
    """Average the gradients of the workers still labelled good; drop for good the ones that drift.

    Steps (Algorithm 1 of the paper; the paper's B is the short window, A the long one):

    1. ``good`` starts as all n workers. For every worker i keep two accumulations of what it
       sent, each gradient divided by |good| at its step: ``short_i`` over the steps since the last
       multiple of ``window0`` (T0) and ``long_i`` since the last multiple of ``window1`` (T1).
       With DDP the gradient arrives in buckets: accumulations are kept per ``key`` and distances
       are whole-model, sqrt(sum over keys of squared distances), so every bucket agrees.
    2. Output of a step: the mean of the good workers' gradients (plus N(0, noise_std^2 I)
       when ``noise_std > 0``, identical on all ranks: seeded by (seed, step, key)).
    3. In :meth:`end_step`: for each window pick a reference worker among the good ones that has
       more than n/2 good workers within the threshold of it (the one with the most such
       neighbours; then the smallest sum of distances; then the lowest index), and remove every
       good worker whose accumulation is more than twice the threshold from the reference's in
       either window. Removal is permanent. Windows restart at multiples of T0 and T1.
    4. Not in the paper: a good worker that sends Inf or NaN (infinitely far from every other)
       is left out of that step's output and accumulations, from the first key in which it
       sends them onward (the step's keys aggregated before keep its share), and removed when
       the step ends, also during a warm-up, unless the finite ones are not a majority (a
       float16 overflow on every rank, say; workers left out at the step's earlier keys count
       as lost): then the output is not finite, for the sync layer to drop the step, and
       nothing is accumulated or removed.
    5. Not in the paper either: removals that would leave no majority good are not made (see
       :meth:`end_step`); the paper's honest majority makes them impossible.

    Thresholds (the paper's 𝔗0 for the short window and 𝔗1 for the long one) are either fixed
    (``threshold0``, ``threshold1``) or, when both are None, set automatically from a warm-up of
    ``warmup_steps`` steps (default: T0). The paper sets 𝔗 proportional to sqrt(T): honest
    workers' sums are martingales whose spread grows as the square root of the steps summed. At
    each warm-up step and window, every worker's *majority radius* (the distance within which it
    has more than n/2 workers, itself included) is computed; the median over workers is robust to
    f < n/2 Byzantine workers; divided by sqrt(steps summed in the window) it estimates the
    honest spread of one step, sigma. Then 𝔗_w = ``threshold_multiplier`` * max(sigma) *
    sqrt(T_w). No worker is removed during the warm-up (but for step 4) and its steps use the
    coordinate-wise median (so a warm-up under attack still descends); its last step is checked
    as in step 3 with the thresholds it has just set, so the first step after it averages no
    worker that already strays. Should every warm-up step find no spread
    (all workers sent the same gradients, e.g. zeros at the start), the warm-up goes on until
    one does. Accumulations are divided by |good|, so
    auto thresholds are rescaled by n / |good| after removals to keep the honest spread inside.
    The sqrt(T) model assumes the paper's Assumption 2.1 (every worker's gradient is an unbiased
    estimate of the same full gradient); with heterogeneous data per worker honest sums drift
    apart linearly and fixed thresholds tuned to the data are needed.

    Args:
        window0: T0, the short window in steps.
        window1: T1, the long window in steps (T0 <= T1).
        threshold0, threshold1: fixed thresholds 𝔗0, 𝔗1 (0 < 𝔗0 <= 𝔗1), or both None (auto).
        warmup_steps: length of the auto-threshold warm-up; None means ``window0``.
        threshold_multiplier: auto thresholds are this times the largest honest-looking spread.
        noise_std: standard deviation nu of the Gaussian perturbation added to the output.
        seed: seed of the perturbation.

    Example:
        >>> sg = Safeguard(n=4, f=1, window0=2, window1=4, threshold0=1.0, threshold1=2.0)
        >>> for _ in range(3):
        ...     out = sg(torch.tensor([[1.0], [1.1], [0.9], [-20.0]]))
        ...     sg.end_step()
        >>> sg.stats()["removed"]
        {3: 0}
    """

    window0: int = 10
    window1: int = 100
    threshold0: float | None = None
    threshold1: float | None = None
    warmup_steps: int | None = None
    threshold_multiplier: float = 2.0
    noise_std: float = 0.0
    seed: int = 0

    requirement = "n > 2f"
    stateless = False

    _good: Tensor = field(default=None, init=False, repr=False)
    _acc: dict[str, dict[str, Tensor]] = field(default_factory=dict, init=False, repr=False)
    _per_key: ClassVar[tuple[str, ...]] = ("_acc",)  # state by bucket key
    _step: int = field(default=0, init=False, repr=False)
    _removed: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    _spread: list[float] = field(default_factory=lambda: [0.0, 0.0], init=False, repr=False)
    _calibrated_good: int = field(default=0, init=False, repr=False)
    _no_majority: int = field(default=0, init=False, repr=False)
    _stray: Tensor = field(default=None, init=False, repr=False)  # sent Inf/NaN this step

    @classmethod
    def min_workers(cls, f: int) -> int:
        return 2 * f + 1

    def validate(self) -> None:
        check_int(self.window0, "window0 (T0)", 1)
        check_int(self.window1, "window1 (T1)", 1)
        if self.window0 > self.window1:
            raise ValueError(
                f"window0 (T0={self.window0}) must not exceed window1 (T1={self.window1}): "
                "T0 is the short window"
            )
        if (self.threshold0 is None) != (self.threshold1 is None):
            raise ValueError(
                "give both threshold0 and threshold1 (fixed) or neither (auto from a warm-up)"
            )
        if self.threshold0 is not None:
            check_positive(self.threshold0, "threshold0")
            check_positive(self.threshold1, "threshold1")
            if self.threshold0 > self.threshold1:
                raise ValueError(
                    f"threshold0 ({self.threshold0}) must not exceed threshold1 ({self.threshold1}): "
                    "the long window accumulates more"
                )
            if self.warmup_steps not in (None, 0):
                raise ValueError(
                    "warmup_steps sets automatic thresholds; it cannot be used with fixed ones"
                )
        elif self.warmup_steps is not None:
            check_int(self.warmup_steps, "warmup_steps", 1)
        check_positive(self.threshold_multiplier, "threshold_multiplier")
        check_positive(self.noise_std, "noise_std", allow_zero=True)
        check_int(self.seed, "seed", 0)
        self._good = torch.ones(self.n, dtype=torch.bool)
        self._stray = torch.zeros(self.n, dtype=torch.bool)

    # ---- properties ------------------------------------------------------------------------
    @property
    def auto(self) -> bool:
        return self.threshold0 is None

    @property
    def warmup(self) -> int:
        if not self.auto:
            return 0
        return self.window0 if self.warmup_steps is None else self.warmup_steps

    @property
    def in_warmup(self) -> bool:
        return self._warming_up(self._step)

    def _warming_up(self, step: int) -> bool:
        # Past its length, the warm-up lasts until it has seen the workers spread at all:
        # thresholds made from a zero spread would leave no majority within them and so
        # remove nobody, whatever the workers send.
        return step < self.warmup or (self.auto and max(self._spread) <= 0.0)

    def thresholds(self) -> tuple[float, float]:
        """Return (𝔗0, 𝔗1) in effect now (auto ones: nan until the warm-up ends)."""
        if self.auto and self.in_warmup:
            return float("nan"), float("nan")
        return self._thresholds()

    def _thresholds(self) -> tuple[float, float]:
        if not self.auto:
            return float(self.threshold0), float(self.threshold1)
        scale = self.threshold_multiplier * self._calibrated_good / max(int(self._good.sum()), 1)
        tiny = torch.finfo(torch.float32).tiny
        spread = max(max(self._spread), tiny)
        return spread * scale * self.window0**0.5, spread * scale * self.window1**0.5

    @property
    def good(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self._good).flatten()]

    # ---- the rule --------------------------------------------------------------------------
    def aggregate(self, grads: Tensor, key: str) -> Tensor:
        # A good worker that sends Inf or NaN is infinitely far from every other: it is left
        # out of this step (and of its accumulations) and removed when the step ends. Unless
        # the finite ones are not a majority (a float16 overflow on every rank, say): then no
        # one is kept, so nothing is accumulated or removed and the output is 0/0, NaN, for the
        # sync layer to drop the step. Decided on the gradients' device, without a sync.
        dev = grads.device
        good = self._good.to(dev)
        finite = torch.isfinite(grads).all(dim=1)
        self._stray = self._stray.to(dev)
        # (a worker left out at an earlier key of this step counts as lost here too)
        majority = 2 * (good & ~self._stray & finite).sum() > self.n
        self._stray = self._stray | (good & ~finite & majority)
        kept = good & ~self._stray & majority
        n_kept = kept.sum()
        masked = torch.where(kept[:, None], grads, torch.zeros((), dtype=grads.dtype, device=dev))
        acc = self._acc.get(key)
        if acc is None:
            zeros = torch.zeros_like(grads, dtype=torch.promote_types(grads.dtype, torch.float32))
            acc = {"short": zeros, "long": zeros.clone()}
            self._acc[key] = acc
        elif acc["short"].device != dev:  # a loaded state follows the gradients
            acc = {w: t.to(dev) for w, t in acc.items()}
            self._acc[key] = acc
        wide = masked.to(acc["short"].dtype)
        share = wide / n_kept.clamp_min(1)  # each gradient over |good| at its step
        for w in _WINDOWS:
            acc[w].add_(share)

        if self.in_warmup:
            from .rules import coordinate_median

            rows = grads[kept]
            return coordinate_median(rows) if len(rows) else torch.full_like(grads[0], math.nan)
        # (in float32 at least: float16 sums of finite gradients overflow; and divided before
        # the sum, which two rows of 3e38 took past float32's range, their mean within it)
        out = (wide / n_kept).sum(dim=0).to(grads.dtype)
        if self.noise_std > 0:
            # Drawn on CPU: every rank must add the same noise, and a CUDA draw's values
            # depend on the GPU's number of multiprocessors.
            g = generator_for(torch.device("cpu"), key_seed(self.seed, self._step, key))
            noise = torch.randn(out.shape, generator=g, dtype=out.dtype)
            out = out + self.noise_std * noise.to(out.device)
        return out

    def _distances(self, window: str) -> Tensor:
        total = None
        for acc in self._acc.values():
            d2 = pairwise_sq_dists(acc[window]).cpu()
            total = d2 if total is None else total + d2
        return total.sqrt().nan_to_num(nan=float("inf"))

    def _majority_radius_median(self, dist: Tensor) -> float:
        good = self._good
        need = self.n // 2 + 1  # "more than n/2" workers, itself included
        masked = torch.where(good[None, :], dist, torch.full_like(dist, float("inf")))
        radius = torch.sort(masked, dim=1).values[:, need - 1][good]
        return float(torch.median(radius))

    def _reference(self, dist: Tensor, threshold: float) -> int | None:
        good = self._good
        close = (dist <= threshold) & good[None, :]
        counts = close.sum(dim=1)
        cand = good & (2 * counts > self.n)
        if not bool(cand.any()):
            return None
        best = torch.nonzero(cand & (counts == counts[cand].max())).flatten()
        spread = torch.where(good[None, :], dist, torch.zeros_like(dist)).sum(dim=1)
        # Among the best candidates only (argmin over all workers picked worker 0, a candidate
        # or not, when every spread was infinite); the first on a tie, the lowest index.
        return int(best[torch.argmin(spread[best])])

    def end_step(self) -> None:
        """Update the good set from the accumulations, advance the step, restart windows.

        Removals that would leave no majority of the n workers good (the two windows, or the
        Inf/NaN senders and a window, each keeping another majority; more than f Byzantine
        workers) are not made: the step counts as one without a majority and warns, as every
        later output would be the mean of a minority.
        """
        before, removed_before = self._good.clone(), dict(self._removed)
        stray = self._stray.cpu()
        for i in torch.nonzero(stray).flatten().tolist():  # sent Inf or NaN this step
            self._removed[int(i)] = self._step
        self._good &= ~stray
        self._stray = torch.zeros(self.n, dtype=torch.bool)
        if self._acc:
            dists = {w: self._distances(w) for w in _WINDOWS}
            if self.in_warmup:
                for i, (w, length) in enumerate(zip(_WINDOWS, (self.window0, self.window1))):
                    # spread a sqrt(step): honest sums are martingales, their spread grows as sqrt(t)
                    steps_in = self._step % length + 1
                    radius = self._majority_radius_median(dists[w]) / steps_in**0.5
                    self._spread[i] = max(self._spread[i], radius)
                self._calibrated_good = int(self._good.sum())
            # Every step whose next one is past the warm-up is checked: so is the warm-up's last,
            # with the thresholds it has just set, and the first step after it averages no
            # worker that already strays.
            if not self._warming_up(self._step + 1):
                keep = self._good.clone()
                for w, thr in zip(_WINDOWS, self._thresholds()):
                    ref = self._reference(dists[w], thr)
                    if ref is None:  # no majority within the threshold: a threshold too small
                        self._no_majority += 1
                        continue
                    keep &= dists[w][ref] <= 2 * thr
                for i in torch.nonzero(self._good & ~keep).flatten().tolist():
                    self._removed[int(i)] = self._step
                self._good &= keep
        if 2 * int(self._good.sum()) <= self.n:
            lost = [int(i) for i in torch.nonzero(before & ~self._good).flatten()]
            warnings.warn(
                f"safeguard: removing workers {lost} at step {self._step} would leave "
                f"{int(self._good.sum())} of the n={self.n} workers good, not a majority, so "
                "none is removed: more than f workers stray (or send Inf/NaN), or the thresholds "
                "are too small for their honest spread (non-i.i.d. data?)",
                stacklevel=caller_stacklevel(),
            )
            self._good, self._removed = before, removed_before
            if self._acc and self.in_warmup:  # (as the warm-up above counted them)
                self._calibrated_good = int(before.sum())
            self._no_majority += 1
        self._step += 1
        for w, length in (("short", self.window0), ("long", self.window1)):
            if self._step % length == 0:
                for acc in self._acc.values():
                    acc[w].zero_()

    # ---- reporting and state ---------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        t0, t1 = self.thresholds()
        return {
            "step": self._step,
            "good": self.good,
            "removed": dict(self._removed),
            "threshold0": t0,
            "threshold1": t1,
            "warming_up": self.in_warmup,
            "no_majority_steps": self._no_majority,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "good": self._good.clone(),
            "removed": dict(self._removed),
            "acc": {k: {w: v.clone() for w, v in a.items()} for k, a in self._acc.items()},
            "spread": list(self._spread),
            "calibrated_good": self._calibrated_good,
            "no_majority": self._no_majority,
            "auto_thresholds": self.auto,
            "options": plain(self.options()),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned; the next step continues exactly.

        A malformed state, one for another number of workers, or one saved by a rule with the
        other kind of thresholds (fixed or automatic) is refused, and nothing is loaded; so is
        one saved with other settings (windows, thresholds, ...: the error names them) unless
        ``strict=False``.
        """
        owner = "aggregator 'safeguard'"
        check_state(state, owner, _STATE, optional=("auto_thresholds", "options"))
        good = state["good"]
        if not isinstance(good, Tensor) or good.dim() != 1:
            raise ValueError(
                f"{owner}: the state's 'good' must be a 1-D tensor of n bools, got {good!r:.200}"
            )
        if good.shape != (self.n,):
            raise ValueError(
                f"safeguard state is for {good.shape[0]} workers, this rule has n={self.n}: "
                "resume with as many workers as saved it (which workers Safeguard trusts, and "
                "their accumulated gradients, are by worker)"
            )
        good = good.clone().bool().cpu()
        if not bool(good.any()):
            raise ValueError(f"{owner}: the state's 'good' marks no worker good")
        step = state_int(state["step"], f"{owner}: the state's 'step'")
        calibrated = state_int(
            state["calibrated_good"], f"{owner}: the state's 'calibrated_good'", 0, self.n
        )
        no_majority = state_int(state["no_majority"], f"{owner}: the state's 'no_majority'")
        removed = state_mapping(
            state["removed"], f"{owner}: the state's 'removed'", "{worker: step removed}"
        )
        removed = {
            state_int(k, f"{owner}: a worker in the state's 'removed'", 0, self.n - 1): state_int(
                v, f"{owner}: a step in the state's 'removed'"
            )
            for k, v in removed.items()
        }
        spread = state["spread"]
        if (
            not isinstance(spread, (list, tuple))
            or len(spread) != 2
            or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in spread
            )
        ):
            raise ValueError(
                f"{owner}: the state's 'spread' must be a list of 2 numbers >= 0, got "
                f"{spread!r:.200}"
            )
        acc = self._loaded_acc(state["acc"], owner)
        saved_auto = state.get("auto_thresholds")
        if saved_auto is None:
            # States from before the entry: only automatic thresholds measure a spread.
            saved_auto = True if (max(spread) > 0 or calibrated > 0) else None
        elif not isinstance(saved_auto, bool):
            raise ValueError(
                f"{owner}: the state's 'auto_thresholds' must be True or False, got {saved_auto!r}"
            )
        if saved_auto is not None and saved_auto != self.auto:
            kinds = {
                True: "automatic thresholds (threshold0=threshold1=None, set by a warm-up)",
                False: "fixed thresholds (threshold0 and threshold1 given)",
            }
            now = (
                kinds[True]
                if self.auto
                else f"fixed thresholds ({self.threshold0}, {self.threshold1})"
            )
            raise ValueError(
                f"{owner}: this state was saved by a rule with {kinds[saved_auto]}, but this "
                f"rule has {now}; build the rule with the kind of thresholds the state was "
                "saved with"
            )
        check_saved_settings(state, owner, self.options(), strict)
        self._step = step
        self._good = good
        self._removed = removed
        self._acc = acc
        self._spread = [float(x) for x in spread]
        self._calibrated_good = calibrated
        self._no_majority = no_majority
        self._stray = torch.zeros(self.n, dtype=torch.bool)

    def _loaded_acc(self, acc: Any, owner: str) -> dict[str, dict[str, Tensor]]:
        """Check and copy the accumulations of a loaded state."""
        what = f"{owner}: the state's 'acc'"
        state_mapping(acc, what, "{key: {'short': tensor, 'long': tensor}}")
        out = {}
        for key, a in acc.items():
            if not isinstance(a, Mapping) or set(a) != set(_WINDOWS):
                got = sorted(map(repr, a)) if isinstance(a, Mapping) else type(a).__name__
                raise ValueError(
                    f"{what} for key {key!r} must have the entries 'short' and 'long', got {got}"
                )
            ts = [a[w] for w in _WINDOWS]
            if (
                not all(isinstance(t, Tensor) and t.dim() == 2 for t in ts)
                or ts[0].shape != ts[1].shape
                or ts[0].shape[0] != self.n
                or not all(t.is_floating_point() for t in ts)
            ):
                shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in ts]
                raise ValueError(
                    f"{what} for key {key!r} must hold two floating-point tensors of the same "
                    f"shape [n={self.n}, d], got {shapes}"
                )
            out[str(key)] = {w: t.clone() for w, t in zip(_WINDOWS, ts)}
        return out
