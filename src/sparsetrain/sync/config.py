"""Options of a gradient synchronisation, validated once, and checked to agree across ranks."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .._options import check_options, plain
from ..comm.p2p import alone
from ..comm.registry import collective_option_names
from ..compressors import Compressor, compressor_class, get_compressor
from .devices import on_device

ON_NONFINITE = ("raise", "skip", "propagate")
# Settings a saved state may be loaded under with another value: what a step with NaN/Inf does
# (a grad_scaler selects "propagate") changes nothing the state holds.
MAY_DIFFER_ON_LOAD = frozenset({"on_nonfinite"})


@dataclass
class SyncConfig:
    """What a DDP hook or a GradientSync does with gradients.

    Attributes:
        compressor: registered compressor name (``sparsetrain.available_compressors()``).
        compressor_options: options for it (``density`` among them for the sparse ones).
        error_feedback: keep what was not sent; None means on for biased compressors.
        collective: how sparse payloads are reduced: "allgather" or a sparse allreduce
            (``sparsetrain.comm.available_collectives()``), or "auto" to let the cost model pick
            one for each bucket.
        collective_options: options of the collective, for example
            ``{"repartition_every": 16}`` for "oktopk"; with "auto", a dict of such options by
            collective name, used when the choice falls on that collective.
        auto_candidates: with "auto", the names it picks from: "dense" (a dense allreduce of
            the densified payload) and collective names; default
            ``sparsetrain.perfmodel.EXACT``, the exact ones. Add "oktopk" or "gtopk" to let it
            pick a global selection (what that drops goes back into error feedback).
        auto_network: with "auto", the cost model's parameters for this cluster: a
            ``sparsetrain.perfmodel.NetworkParams`` or a dict of its fields (for example
            ``NetworkParams.from_link(bandwidth_bps=25e9, latency_s=10e-6)``, or the
            ``model_fit.params`` of a ``sparsetrain bench cluster`` file); default
            ``DEFAULT_PARAMS`` (10 Gbit/s, 5 us).
        dense_warmup_steps: steps of plain dense allreduce before compression starts (with an
            ``aggregator``, the robust rule and any attack on the uncompressed gradients).
        on_nonfinite: what happens when some rank's gradient holds NaN or Inf: "raise" (an
            error naming the ranks and parameters, on every rank: ``FloatingPointError``, which
            DDP's reducer turns into a ``RuntimeError`` with its message in ``backward()``),
            "skip" (every rank drops the
            step; the caller checks ``skipped_last_step``; the gradients are zero) or
            "propagate" (every rank drops the step and every gradient of the step is NaN, also
            in buckets exchanged before the bad one, so that ``torch.amp.GradScaler.step``
            skips the optimizer and lowers its scale: the mode a ``grad_scaler`` selects).
            An exchange whose result overflows although every rank's gradient was finite (the
            fp16 compressor's cast of a rank's share of the average, gradient / ranks, past
            65504; a sum past the dtype's range) counts as a non-finite gradient in each mode
            ("raise" raises, naming the overflow).
            The error-feedback residuals are then those from before the step, also for the
            buckets exchanged before the one that held NaN/Inf (compressor state, such as
            thresholds, moves on), and the step counts in ``skipped_steps``, in each mode.
            With "raise" the gradients may be zero (the sparse in-place path clears the
            bucket while it compensates, before the ranks agree on finiteness).
        aggregator, aggregator_options: a robust aggregation rule over all ranks' gradients
            (``sparsetrain.robust``); None means the plain average. ``aggregator_options["f"]``
            is the number of Byzantine ranks the rule tolerates (default: ``byzantine``, so 0
            without an attack; rules that protect by f, such as trimmed_mean and krum, warn
            when built for f=0). Under a rule other than ``mean`` and a compressor of one
            round (not PowerSGD, nor TernGrad sharing its scaler), up to f ranks whose
            gradient holds NaN or Inf are not a non-finite step: their rows go to the rule as
            Byzantine ones (each such rank warns and keeps its residuals as they were; step
            counters that seed draws every rank shares, random-k's, move on with the others'
            as ``counts_steps`` compressors declare); more than f are, as below. Not with a
            ``grad_scaler`` (``on_nonfinite="propagate"``): an overflow is the scaler's to see.
        attack, attack_options, byzantine: for experiments, the last ``byzantine`` ranks replace
            their gradient by the named attack.
        momentum_correction: 0 (off), or a momentum in (0, 1) that each rank applies to its own
            gradient before compression, as in Deep Gradient Compression (Lin et al., ICLR
            2018): the rank keeps a velocity ``u = momentum * u + grad`` and sends (from the
            error-feedback residual plus ``u``) what its sparse compressor selects; entries
            applied everywhere are cleared from ``u`` (momentum factor masking). Entries that
            wait in the residual thus carry their momentum with them. The optimizer must then
            run without momentum. Needs a sparse compressor with error feedback, and no robust
            aggregation, attack or dense warm-up.
    """

    compressor: str = "threshold"
    compressor_options: dict[str, Any] = field(default_factory=dict)
    error_feedback: bool | None = None
    collective: str = "allgather"
    collective_options: dict[str, Any] = field(default_factory=dict)
    auto_candidates: list[str] | None = None
    auto_network: Any = None  # a perfmodel.NetworkParams once validated
    dense_warmup_steps: int = 0
    on_nonfinite: str = "raise"
    aggregator: str | None = None
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    attack: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    byzantine: int = 0
    momentum_correction: float = 0.0

    def __post_init__(self) -> None:
        cls = compressor_class(self.compressor)  # unknown name: lists the valid ones
        for kind in ("compressor", "aggregator", "attack"):
            given = getattr(self, f"{kind}_options")
            if not isinstance(given, Mapping):
                raise TypeError(
                    f"{kind}_options must be a dict of option names to values, got {given!r}"
                )
        if self.error_feedback is not None and not isinstance(self.error_feedback, bool):
            raise TypeError(
                f"error_feedback must be True, False or None, got {self.error_feedback!r}"
            )
        for name in ("dense_warmup_steps", "byzantine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}"
            )
        if self.byzantine and self.attack is None:
            raise ValueError("byzantine > 0 needs an attack name (attack=...)")
        if self.attack is not None and not self.byzantine:
            raise ValueError(
                f"attack={self.attack!r} needs byzantine >= 1, the number of ranks that attack "
                "(the last ones): with byzantine=0 no rank would attack"
            )
        for kind in ("aggregator", "attack"):
            if getattr(self, f"{kind}_options") and getattr(self, kind) is None:
                raise ValueError(f"{kind}_options given without an {kind} ({kind}=...)")
        if (
            self.compressor == "randomk"
            and self.use_error_feedback
            and self.compressor_options.get("scale", True)
        ):
            raise ValueError(
                "random-k scales what it sends by numel/k to be unbiased; error feedback would "
                "then keep (1 - numel/k) times every sent value and diverge. With "
                "error_feedback=True pass scale=False (random-k with memory, Stich et al. 2018)"
            )
        if self.aggregator is not None or self.attack is not None:
            given = self.compressor_options
            options = given if isinstance(given, Mapping) else {}
            conflict = cls.robust_conflict(options)
            if conflict is not None:
                raise ValueError(conflict)
        if self.collective != "allgather" and (
            self.aggregator is not None or self.attack is not None
        ):
            robust = (
                f"aggregator={self.aggregator!r}"
                if self.aggregator is not None
                else f"attack={self.attack!r}"
            )
            raise ValueError(
                f"collective={self.collective!r} would not run with {robust}: robust "
                "aggregation gathers every rank's whole decompressed gradient, so no sparse "
                "collective takes part; leave collective at 'allgather'"
            )
        if self.collective != "allgather":
            from ..comm import available_collectives

            valid = [*available_collectives(), "auto"]
            if self.collective not in valid:
                raise ValueError(
                    f"unknown collective {self.collective!r}; valid names are: {', '.join(valid)}"
                )
            if cls.wire != "sparse":
                how = (
                    " (random-k: the same indices on every rank, so its values are summed in "
                    "one allreduce)"
                    if self.compressor == "randomk"
                    else ""
                )
                raise ValueError(
                    f"collective {self.collective!r} reduces sparse payloads, but compressor "
                    f"{self.compressor!r} sends {cls.wire} payloads{how}; use a sparse "
                    "compressor (topk, threshold) or collective='allgather'"
                )
        self._check_collective_options()
        self._check_momentum_correction(cls)
        self._check_named_options()

    def _check_named_options(self) -> None:
        """Build the compressor and check the aggregator's and the attack's names and option
        names (their values need the number of ranks), so that a bad one is refused here
        rather than where the engine is built."""
        from ..robust.attacks import check_attack
        from ..robust.base import aggregator_class
        from ..robust.base import option_names as aggregator_options

        self.build_compressor()
        if self.aggregator is not None:
            cls = aggregator_class(self.aggregator)
            check_options(
                "aggregator",
                self.aggregator,
                self.aggregator_options,
                ["f", *aggregator_options(cls)],
            )
            f = plain(self.aggregator_options.get("f"))  # (np.int64(1) as 1, as elsewhere)
            if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
                raise ValueError(
                    "aggregator_options['f'], the number of Byzantine ranks the rule tolerates, "
                    f"must be an integer >= 0, got {f!r}"
                )
        if self.attack is not None:
            check_attack(self.attack, self.attack_options)

    def _check_collective_options(self) -> None:
        """Validate collective_options, auto_candidates and auto_network (normalising the last
        to a NetworkParams and the candidates to a list)."""
        from ..comm import available_collectives, get_collective
        from ..perfmodel import EXACT, NetworkParams, available_models

        opts = self.collective_options
        if not isinstance(opts, dict):
            raise TypeError(f"collective_options must be a dict, got {type(opts).__name__}")
        auto = self.collective == "auto"
        if not auto:
            for name in ("auto_candidates", "auto_network"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is for collective='auto' (it tells the cost model what to "
                        f"choose from and how fast the links are), got collective="
                        f"{self.collective!r}"
                    )
            get_collective(self.collective, **opts)  # names the options it takes
            return
        cands = self.auto_candidates
        if cands is None:
            cands = list(EXACT)
        elif isinstance(cands, str) or not isinstance(cands, (list, tuple)) or not cands:
            raise TypeError(
                f"auto_candidates must be a non-empty list of names, got {self.auto_candidates!r}"
            )
        valid = ["dense", *available_collectives()]
        bad = [c for c in cands if c not in valid or c not in available_models()]
        if bad:
            raise ValueError(f"auto_candidates: unknown {bad}; valid names are: {', '.join(valid)}")
        if self.auto_candidates is not None:
            self.auto_candidates = list(dict.fromkeys(cands))
        for name, value in opts.items():
            if name == "dense":
                raise ValueError(
                    "collective_options['dense']: the dense allreduce takes no options"
                )
            if name not in cands:
                # An option of a candidate given without its name (repartition_every=32):
                # say where it goes, not to add it to the candidates.
                owners = [c for c in cands if c != "dense" and name in collective_option_names(c)]
                if owners:
                    raise ValueError(
                        f"collective_options with collective='auto' maps a candidate's name to "
                        f"its options; {name!r} is an option of {', '.join(owners)}: give it "
                        f"as {{{owners[0]!r}: {{{name!r}: {value!r}}}}}"
                    )
                raise ValueError(
                    f"collective_options with collective='auto' maps a candidate's name to its "
                    f"options; {name!r} is not among the candidates ({', '.join(cands)}): add "
                    "it to auto_candidates"
                )
            if not isinstance(value, dict):
                raise TypeError(
                    f"collective_options[{name!r}] must be a dict of {name}'s options, got "
                    f"{value!r}"
                )
            get_collective(name, **value)
        net = self.auto_network
        if isinstance(net, dict):
            unknown = sorted(set(net) - {f for f in NetworkParams.__dataclass_fields__})
            if unknown:
                raise ValueError(
                    f"auto_network: unknown {unknown}; fields are "
                    f"{', '.join(NetworkParams.__dataclass_fields__)}"
                )
            missing = [f for f in ("alpha", "beta") if f not in net]
            if missing:
                raise ValueError(
                    f"auto_network needs alpha (seconds a message) and beta (seconds a byte); "
                    f"missing: {', '.join(missing)}"
                )
            try:
                net = NetworkParams(**net)
            except ValueError as e:
                raise ValueError(f"auto_network: {e}") from None
        if net is not None and not isinstance(net, NetworkParams):
            raise TypeError(
                f"auto_network must be a perfmodel.NetworkParams or a dict of its fields, got "
                f"{type(net).__name__}"
            )
        self.auto_network = net

    def collective_options_for(self, name: str) -> dict[str, Any]:
        """The options the collective ``name`` is built with."""
        if self.collective == "auto":
            return dict(self.collective_options.get(name, {}))
        return dict(self.collective_options) if name == self.collective else {}

    def _check_momentum_correction(self, cls: type) -> None:
        m = self.momentum_correction
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise TypeError(
                f"momentum_correction must be a number in [0, 1), the momentum itself (the "
                f"optimizer's, such as 0.9, which then runs without it), got {m!r}"
            )
        if not 0.0 <= m < 1.0:
            raise ValueError(f"momentum_correction must be in [0, 1) (0: off), got {m}")
        if not m:
            return
        if cls.wire != "sparse" or not self.use_error_feedback:
            raise ValueError(
                "momentum_correction sparsifies each rank's momentum and keeps what waits in "
                "the error-feedback residual: it needs a compressor that sends chosen indices "
                "(topk or threshold; not randomk, whose values go through a dense allreduce) "
                f"with error feedback, got compressor "
                f"{self.compressor!r} with error feedback {'on' if self.use_error_feedback else 'off'}"
            )
        if self.aggregator is not None or self.attack is not None:
            raise ValueError(
                "momentum_correction does not combine with robust aggregation or attacks (they "
                "act on the ranks' gradients, not on momenta)"
            )
        if self.dense_warmup_steps:
            raise ValueError(
                "momentum_correction does not combine with dense_warmup_steps (a dense step "
                "sends gradients, which an optimizer without momentum would apply as they are)"
            )

    @property
    def use_error_feedback(self) -> bool:
        return error_feedback_on(self.compressor, self.compressor_options, self.error_feedback)

    def build_compressor(self) -> Compressor:
        return get_compressor(self.compressor, **self.compressor_options)

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))

    def fingerprint(self) -> str:
        return hashlib.sha256(
            json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        ).hexdigest()


def collective_option_owners(key: str) -> list[str]:
    """The collectives that take an option named ``key``."""
    import dataclasses

    from ..comm.registry import _COLLECTIVES

    return [
        name
        for name, cls in sorted(_COLLECTIVES.items())
        if dataclasses.is_dataclass(cls)
        and key in {f.name for f in dataclasses.fields(cls) if f.init}
    ]


def misplaced_collective_option(key: str, collective: str, cli: bool = False) -> str | None:
    """Where a collective's option ``key``, given as a compressor's, belongs (None where no
    collective takes it): in collective_options (``--collective-option`` when ``cli``), keyed
    by the candidate's name under "auto"."""
    owners = collective_option_owners(key)
    if not owners:
        return None
    if cli:
        where = (
            f"--collective-option {owners[0]}.{key}=..."
            if collective == "auto"
            else f"--collective-option {key}=..."
            if collective in owners
            else f"--collective-option {key}=... with --collective {owners[0]}"
        )
    else:
        where = (
            f"collective_options={{{owners[0]!r}: {{{key!r}: ...}}}}"
            if collective == "auto"
            else f"collective_options={{{key!r}: ...}}"
            if collective in owners
            else f"collective_options with collective={owners[0]!r}"
        )
    return f"it is an option of the collective {' and '.join(owners)}; pass it as {where}"


def refuse_misplaced_collective_options(
    compressor: str, collective: str, comp: dict[str, Any]
) -> None:
    """A collective's option given among the compressor's (``repartition_every=8`` next to
    ``collective="oktopk"``) is an error that says where it goes."""
    from ..compressors import option_names

    takes = set(option_names(compressor))
    for key in comp:
        hint = None if key in takes else misplaced_collective_option(key, collective)
        if hint:
            raise ValueError(
                f"compressor {compressor!r} does not take {key!r} (it takes: "
                f"{', '.join(sorted(takes)) or 'no options'}); {hint}"
            )


def sync_option_names() -> list[str]:
    """The SyncConfig fields a hook or GradientSync takes as keyword options."""
    return [
        f for f in SyncConfig.__dataclass_fields__ if f not in ("compressor", "compressor_options")
    ]


def refuse_unknown_options(
    compressor: str, comp: Mapping[str, Any], caller: str | None, own: Sequence[str]
) -> None:
    """Refuse keyword options that neither ``caller`` (its own arguments ``own`` and the sync
    options) nor the compressor takes, naming both lists and the closest name where one is near
    (a misspelt ``colective``: did you mean 'collective'?)."""
    from ..compressors import available_compressors, option_names

    takes = option_names(compressor)
    unknown = sorted(k for k in comp if k not in takes)
    if not unknown:
        return
    where = caller or "the gradient sync"
    mine = [*own, *sync_option_names()]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, [*mine, *takes], n=1)
        others = [c for c in available_compressors() if c != compressor and key in option_names(c)]
        if key == "bucket_cap_mb" and key not in mine:
            hints.append(
                "bucket_cap_mb is an argument of GradientSync; the DDP hook exchanges DDP's own "
                "buckets, whose size is set on DDP: DistributedDataParallel(model, "
                "bucket_cap_mb=...)"
            )
        elif close:
            hints.append(f"{key!r}: did you mean {close[0]!r}?")
        elif others:
            hints.append(f"{key!r} is an option of compressor(s) {', '.join(others)}")
    neither = "it is not an option" if len(unknown) == 1 else "they are not options"
    raise ValueError(
        f"compressor {compressor!r} does not take option(s) {unknown}, and {neither} of "
        f"{where} either"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f". {where} takes: {', '.join(mine)}; compressor {compressor!r} takes: "
        f"{', '.join(takes) or 'no options'}"
    )


def make_config(
    compressor: str,
    density: float | None,
    options: dict[str, Any],
    *,
    caller: str | None = None,
    own: Sequence[str] = (),
) -> SyncConfig:
    """Split keyword options into the sync fields and the compressor's own options.

    ``caller`` names what took the options (``register_ddp_hook``, ``GradientSync``) and
    ``own`` its own arguments besides them, for the error that refuses an option none of them
    takes.
    """
    options, density = plain(options), plain(density)  # NumPy numbers as Python's
    sync_fields = set(sync_option_names())
    sync = {k: v for k, v in options.items() if k in sync_fields}
    comp = {k: v for k, v in options.items() if k not in sync_fields}
    refuse_misplaced_collective_options(compressor, sync.get("collective", "allgather"), comp)
    refuse_unknown_options(compressor, comp, caller, own)
    if density is not None:
        comp["density"] = density
    cfg = SyncConfig(compressor=compressor, compressor_options=comp, **sync)
    cfg.build_compressor()  # validate the compressor options now, not at the first step
    return cfg


def check_process_group(group: Any, name: str = "process_group") -> None:
    """Refuse a ``group`` argument (called ``name``) that is neither a ProcessGroup nor None,
    or that leaves this rank out."""
    if type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:
        me = dist.get_rank() if dist.is_initialized() else "?"
        raise ValueError(
            f"{name} does not include this rank ({me} in the default group): "
            "torch.distributed.new_group returns a placeholder on the ranks it leaves out; call "
            "this only on the group's ranks, or make a group that holds every rank calling it"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup (for example from "
            f"torch.distributed.new_group) or None for the default group (WORLD), got "
            f"{type(group).__name__} {group!r}"
        )


def check_dense_gradients(
    model: torch.nn.Module, ignored: Collection[str] = (), ddp: bool = False
) -> None:
    """Refuse a model with layers that make sparse gradients (``nn.Embedding`` or
    ``nn.EmbeddingBag`` built with ``sparse=True``), which the exchange cannot compress. Not
    their weights named in ``ignored`` (parameters DDP leaves out of its buckets), nor weights
    a module of another kind holds too (tied to a dense layer, whose gradient is added to
    theirs: dense, on the steps that use that layer; GradientSync makes the others' dense).

    ``ddp``: the model is a DDP model's module. DDP expects a sparse gradient for a weight whose
    first holder in ``named_modules()`` is such a layer, and its reducer raises at the first
    backward that gives it a dense one (tied to a dense layer): such a weight is refused here,
    by name, before any exchange has started."""

    def sparse(module: torch.nn.Module) -> bool:
        return isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse

    dense_holders: dict[int, int] = {}
    first_holder: dict[int, torch.nn.Module] = {}  # as DDP finds it: in named_modules() order
    for module in model.modules():  # each module once, each of its own parameters once
        for p in module.parameters(recurse=False):
            dense_holders[id(p)] = dense_holders.get(id(p), 0) + (not sparse(module))
            first_holder.setdefault(id(p), module)
    for name, module in model.named_modules():
        if sparse(module):
            where = f"{name}.weight" if name else "weight"
            if not module.weight.requires_grad or where in ignored:
                continue
            if ddp and dense_holders.get(id(module.weight), 0):
                if first_holder[id(module.weight)] is module:
                    raise TypeError(
                        f"parameter {where!r} is tied to a dense layer, but DDP takes its "
                        f"gradient for sparse: {type(module).__name__} {name!r} (sparse=True) "
                        "is its first holder in the model's named_modules(), and DDP's reducer "
                        "raises at the first backward that makes it dense. Build the layer "
                        "with sparse=False (the tied gradient is dense anyway), or register "
                        "the dense layer first"
                    )
                continue
            if not dense_holders.get(id(module.weight), 0):
                raise TypeError(
                    f"parameter {where!r} gets sparse gradients ({type(module).__name__} with "
                    "sparse=True); sparsetrain compresses dense gradients: build the layer with "
                    "sparse=False (its gradient is then dense, and compressed like the others)"
                )


def _plain(value: Any) -> Any:
    """``value`` as JSON would hold it (tuples as lists, objects as strings), for comparing."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _effective_compressor_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the compressor's defaults filled in for those not given."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(compressor_class(name)):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {**out, **options}


def _effective_collective_options(collective: str, options: Any) -> Any:
    """``options`` of ``collective`` with the collective's defaults filled in (for "auto", of
    each candidate named); as given where they do not build one."""
    from ..comm import get_collective

    def filled(name: str, opts: Any) -> Any:
        try:
            coll = get_collective(name, **opts)
        except Exception:  # noqa: BLE001 - not a valid set: compared as it is
            return opts
        if not dataclasses.is_dataclass(coll):
            return opts
        return {f.name: getattr(coll, f.name) for f in dataclasses.fields(coll) if f.init}

    if not isinstance(options, Mapping):
        return options
    if collective != "auto":
        return filled(collective, options)
    return {n: filled(n, o) if isinstance(o, Mapping) else o for n, o in options.items()}


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON would hold them, floats within rounding (5e-6 and "5us" parse apart)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and (math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_differences(saved: Mapping[str, Any], config: SyncConfig) -> list[str]:
    """The settings in which ``saved`` (a ``SyncConfig.to_dict()`` kept in a state) differs from
    ``config`` in effect, as "name: saved X, now Y". Settings the saved dict lacks (a state from
    before they existed) and those of ``MAY_DIFFER_ON_LOAD`` are not compared. Defaults count
    as given: error_feedback None is on for biased compressors, the compressor's and the
    collective's options are compared with their defaults filled in, and auto_candidates and
    auto_network (compared only with collective="auto") None are the cost model's defaults."""
    from ..perfmodel import DEFAULT_PARAMS, EXACT

    now = config.to_dict()
    if "compressor" in saved and saved["compressor"] != config.compressor:
        return [f"compressor: saved {saved['compressor']!r}, now {config.compressor!r}"]
    auto = config.collective == "auto" and saved.get("collective", "auto") == "auto"
    defaults = {"auto_candidates": list(EXACT), "auto_network": DEFAULT_PARAMS.as_dict()}
    diffs = []
    for key, value in now.items():
        if key == "compressor" or key in MAY_DIFFER_ON_LOAD or key not in saved:
            continue
        old = saved[key]
        if key == "compressor_options" and isinstance(old, Mapping):
            old = _effective_compressor_options(config.compressor, old)
            value = _effective_compressor_options(config.compressor, value)
            diffs += [
                f"compressor option {k}: saved {old.get(k)!r}, now {value.get(k)!r}"
                for k in sorted({*old, *value})
                if not _same(old.get(k), value.get(k))
            ]
            continue
        if key == "collective_options":
            old = _effective_collective_options(saved.get("collective", config.collective), old)
            value = _effective_collective_options(config.collective, value)
        if key in defaults:
            if not auto:
                continue  # what "auto" would pick from: no matter to another collective
            old = defaults[key] if old is None else old
            value = defaults[key] if value is None else value
        if key == "error_feedback":
            if old is None:  # the default of the saved compressor options
                saved_options = saved.get("compressor_options")
                old = compressor_class(config.compressor).feedback_by_default(
                    saved_options if isinstance(saved_options, Mapping) else {}
                )
            value = config.use_error_feedback
        if not _same(old, value):
            diffs.append(f"{key}: saved {old!r}, now {value!r}")
    return diffs


def error_feedback_on(
    compressor: str, options: Mapping[str, Any], error_feedback: bool | None
) -> bool:
    """Whether ``compressor`` with ``options`` keeps error feedback: as ``error_feedback``
    says, or, left None, as the compressor's default (on for the biased ones)."""
    if error_feedback is not None:
        return bool(error_feedback)
    return compressor_class(compressor).feedback_by_default(options)


def with_grad_scaler(grad_scaler: Any, options: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Check a ``grad_scaler`` argument; return ``options`` with the mode it needs
    (``on_nonfinite="propagate"``, which is also its default), and the scaler the engine
    follows: None for a disabled one (``GradScaler(enabled=False)``, or one for CUDA on a machine
    without), whose ``step`` steps whatever the gradients hold, as if there were no scaler."""
    if grad_scaler is None:
        return options, None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            "grad_scaler must be a torch.amp.GradScaler (the one that scales this loss) or None, "
            f"got {type(grad_scaler).__name__}"
        )
    if not grad_scaler.is_enabled():
        return options, None
    mode = options.get("on_nonfinite", "propagate")
    if mode != "propagate":
        raise ValueError(
            f"a grad_scaler needs on_nonfinite='propagate' (the default with one), got {mode!r}: "
            "the scaler must see a step's Inf/NaN to skip the step and lower its scale "
            "('skip' would hide them, so the scale that overflows would stay; 'raise' would "
            "stop training at the first overflow, which loss scaling expects)"
        )
    for kind in ("aggregator", "attack"):
        if options.get(kind) is not None:
            raise ValueError(
                f"a grad_scaler cannot be combined with {kind}={options[kind]!r}: robust "
                "aggregation's radii, thresholds and state are in the gradients' own units, "
                "which the loss scale changes; use bf16 autocast (no scaler) or leave out the "
                f"{kind}"
            )
    return {**options, "on_nonfinite": "propagate"}, grad_scaler


# Seconds a rank waits at a gradient sync's set-up for the others before it says which ranks
# have not come; it goes on waiting until the process group's store times out.
ARRIVAL_WARN_S = 60.0
_ARRIVALS: dict[str, int] = {}  # set-ups met so far, by group: the n-th on every rank


_SYNC_SETUP = (
    "set up the gradient sync (every rank of the group must call register_ddp_hook, or build "
    "GradientSync, with the same options)"
)
PRUNER_SETUP = (
    "prepared their pruner (every rank of the group must call prepare() with the same model "
    "and options)"
)


def _await_ranks(group: dist.ProcessGroup | None, setup: str = _SYNC_SETUP) -> None:
    """Wait until every rank of ``group`` has come to a gradient sync's set-up, through the
    process group's store (not a collective): a rank that never registers the hook (plain DDP
    there, or a registration under ``if rank == 0``) had left the others waiting in the
    settings' gather, silently, until the process group's timeout (30 minutes under gloo).
    After :data:`ARRIVAL_WARN_S` seconds the missing ranks are named on stderr; at the store's
    timeout a ``RuntimeError`` names them. ``setup`` says what they have not done (and is
    the meeting's name: a pruner's set-up and a hook's are counted apart; it holds nothing the
    ranks may disagree on, or they would wait at different meetings instead of reaching the
    gather that names their differences). Where the store cannot be reached, no wait."""
    import datetime
    import sys
    import time

    try:
        store = dist.distributed_c10d._get_default_store()
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        limit = store.timeout.total_seconds()
    except Exception:  # noqa: BLE001 - a private API that may move: the gather alone, as before
        return
    tag = hashlib.sha1(f"{setup}|{ranks}".encode()).hexdigest()[:12]
    n = _ARRIVALS[tag] = _ARRIVALS.get(tag, 0) + 1
    prefix = f"sparsetrain/arrive/{tag}/{n}/"
    store.set(prefix + str(dist.get_rank()), b"1")
    keys = [prefix + str(r) for r in ranks]
    start, warned = time.monotonic(), False
    while True:
        waited = time.monotonic() - start
        step = min(ARRIVAL_WARN_S if not warned else limit, max(limit - waited, 0.0))
        try:
            store.wait(keys, datetime.timedelta(seconds=max(step, 0.001)))
            return
        except RuntimeError:  # (DistStoreError on a timeout)
            pass
        missing = [r for r, k in zip(ranks, keys) if not store.check([k])]
        if not missing:
            return
        waited = time.monotonic() - start
        what = f"rank(s) {missing} of {len(ranks)} have not {setup}"
        if waited >= limit - 1e-3:
            raise RuntimeError(
                f"sparsetrain: rank {dist.get_rank()} waited {waited:.0f} s, the process "
                f"group's timeout: {what}"
            )
        if not warned:
            print(
                f"sparsetrain: rank {dist.get_rank()} has waited {waited:.0f} s: {what}; "
                f"waiting up to the process group's timeout ({limit:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            warned = True


def _gather_settings(
    mine: dict[str, Any],
    group: dist.ProcessGroup | None,
    device: torch.device | None,
    setup: str = _SYNC_SETUP,
) -> list[Any]:
    _await_ranks(group, setup)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    with on_device(device):
        dist.all_gather_object(
            everyone, json.loads(json.dumps(mine, sort_keys=True, default=str)), group=group
        )
    return everyone


def key_differences(ref: Mapping[str, Any], other: Mapping[str, Any], rank: int) -> list[str]:
    """Each key where rank ``rank``'s settings ``other`` differ from rank 0's ``ref``, as
    "key: rank 0 has X, rank R has Y" (values cut at 200 characters)."""
    return [
        f"{k}: rank 0 has {ref.get(k)!r:.200}, rank {rank} has {other.get(k)!r:.200}"
        for k in sorted({*ref, *other})
        if ref.get(k) != other.get(k)
    ]


def refuse_everywhere(
    error: Exception, group: dist.ProcessGroup | None, device: torch.device | None = None
) -> None:
    """Raise ``error``, a rank's own refusal of its options, after telling the other ranks,
    which wait in :func:`check_consistent`'s gather: they raise an error naming this rank, so
    no rank is left waiting for it."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        _gather_settings({"error": f"{type(error).__name__}: {error}"}, group, device)
    raise error


def check_consistent(
    config: SyncConfig,
    layout: list[tuple[str, tuple[int, ...], str]],
    group: dist.ProcessGroup | None,
    extra: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise on every rank if the ranks' configurations or models differ.

    Every rank contributes its configuration and parameter layout (name, shape, dtype); all ranks
    see all of them, so all raise the same error instead of hanging in mismatched collectives.
    ``extra`` holds other settings that must agree (GradientSync's ``bucket_cap_mb``). ``device``
    is the model's CUDA device, if any: under NCCL the object gather runs on the current CUDA
    device, which is made ``device`` for it (not ``cuda:0`` on every rank when the caller never
    called ``torch.cuda.set_device``).
    """
    if alone() or dist.get_world_size(group) == 1:
        return
    settings = {**config.to_dict(), **(extra or {})}
    # Defaults count as given, as when a state is loaded: majority_vote=False and left out are
    # the same setting, and so are error_feedback=None and what it means for the compressor.
    settings["compressor_options"] = _effective_compressor_options(
        config.compressor, config.compressor_options
    )
    settings["collective_options"] = _effective_collective_options(
        config.collective, config.collective_options
    )
    settings["error_feedback"] = config.use_error_feedback
    if config.collective == "auto":  # the cost model's defaults, and candidates at theirs
        from ..perfmodel import DEFAULT_PARAMS, EXACT

        if settings["auto_candidates"] is None:
            settings["auto_candidates"] = list(EXACT)
        if settings["auto_network"] is None:
            settings["auto_network"] = DEFAULT_PARAMS.as_dict()
        options = settings["collective_options"]
        if isinstance(options, Mapping):
            settings["collective_options"] = {
                n: o for n, o in options.items() if o != _effective_collective_options(n, {})
            }
    mine = {"config": settings, "layout": [list(map(str, x)) for x in layout]}
    everyone = _gather_settings(mine, group, device)
    refused = [(r, x["error"]) for r, x in enumerate(everyone) if "error" in x]
    if refused:
        ranks = [r for r, _ in refused]
        raise ValueError(
            f"sparsetrain: rank(s) {ranks} refused their gradient-sync options (rank "
            f"{ranks[0]}: {refused[0][1]}); every rank must pass the same, valid options"
        )
    ref = everyone[0]
    bad = [r for r, other in enumerate(everyone) if other != ref]
    if not bad:
        return
    other = everyone[bad[0]]
    diffs = key_differences(ref["config"], other["config"], bad[0])
    if ref["layout"] != other["layout"]:
        diffs.append("the models' parameters (names, shapes or dtypes) differ")
    raise ValueError(
        f"sparsetrain: ranks disagree on the gradient-sync configuration (ranks {bad} differ "
        f"from rank 0): " + "; ".join(diffs)
    )
