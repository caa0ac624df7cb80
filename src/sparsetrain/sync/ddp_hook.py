"""Register sparsetrain as a DDP communication hook.

No postponed annotations here: DDP checks the hook's annotations at run time.
"""

import copy
import gc
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .._options import is_integer
from .config import (
    SyncConfig,
    check_consistent,
    check_dense_gradients,
    check_process_group,
    make_config,
    refuse_everywhere,
    with_grad_scaler,
)
from .devices import cuda_device_of, new_future
from .engine import SyncEngine, check_state, describe
from .executor import complete, shared_executor

# The hook states whose exchanges run on the backward thread; while one lives, every hook in the
# process runs there.
_ON_BACKWARD_THREAD: "weakref.WeakSet[SyncState]" = weakref.WeakSet()
# The modules inside DDP models that carry this hook: GradientSync refuses them (their
# gradients would be exchanged twice a step).
HOOKED_MODULES: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
# The GradientSyncs alive in this process: the hook refuses their models. (Held weakly, and
# their models read from them: a registry that held a model would keep alive a GradientSync
# the model reaches, through a pruner's hooks, say.)
SYNCS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def overlap(module: torch.nn.Module, others: Iterable[torch.nn.Module]) -> str | None:
    """How ``module`` shares parameters' exchange with one of ``others`` ("is", "is inside",
    "holds"), or None where it shares none."""
    for other in others:
        if other is module:
            return "is"
        if any(m is module for m in other.modules()):
            return "is inside"
        if any(m is other for m in module.modules()):
            return "holds"
    return None


def _synced_overlap(
    module: torch.nn.Module, which: Callable[[Any], bool] = lambda sync: True
) -> str | None:
    """How ``module`` shares parameters with the model of a live GradientSync (of those
    ``which`` takes), or None; one dropped but not yet collected (held in a reference cycle)
    is collected first, so that every rank answers alike."""

    def find() -> str | None:
        return overlap(module, [s._model for s in list(SYNCS) if which(s)])

    how = find()
    if how is not None:
        gc.collect()
        how = find()
    return how


class SyncState:
    """The hook's state: the engine (residuals, compressor state, counters) and the parameter
    names of the model, so residuals are kept by name whatever DDP's bucketing.

    Pickling keeps the configuration and the saved state, not the process group or the thread.
    """

    def __init__(
        self,
        config: SyncConfig,
        param_names: dict[int, str],
        group: dist.ProcessGroup | None,
        inline: bool = False,
        ddp_model: DistributedDataParallel | None = None,
        grad_scaler: Any = None,
    ):
        self.config = config
        self.engine = SyncEngine(config, group, grad_scaler)
        self._names = param_names
        self._executor = shared_executor()
        # Exchanges run on the calling (autograd) thread instead of the background one, when
        # something else issues collectives during backward (DDP under
        # find_unused_parameters=True allreduces its map of used parameters, SyncBatchNorm its
        # statistics): two threads would then pair up different collectives across ranks.
        self._inline = inline
        if inline:
            _ON_BACKWARD_THREAD.add(self)
        # Under find_unused_parameters=True, DDP leaves the gradient of a parameter no rank
        # used as it was, and drops what the exchange returns for it (see _set_aside_unused).
        self._find_unused = bool(getattr(ddp_model, "find_unused_parameters", False))
        # Compression works per group of parameters, and DDP's groups (its buckets) change
        # once, when it rebuilds them in the order backward produced the gradients (before its
        # second iteration; its third under static_graph). A model built again to resume starts
        # with DDP's first groups, so the state records the groups each step exchanged, and the
        # steps after a load exchange the saved ones until DDP has rebuilt its buckets.
        self._ddp = weakref.ref(ddp_model) if ddp_model is not None else None
        # The model's parameters' sizes, by name: a loaded state must be of this model.
        self._sizes = (
            None
            if ddp_model is None
            else {n: p.numel() for n, p in ddp_model.module.named_parameters()}
        )
        # What decides DDP's groups, as it was built: the bucket caps, and the parameters DDP
        # buckets (those trainable when it was built; one frozen later stays in its groups).
        self._caps = _bucket_caps(ddp_model)
        ignored = getattr(ddp_model, "parameters_to_ignore", ())
        self._bucketed = (
            None
            if ddp_model is None
            else {n for n, p in ddp_model.module.named_parameters() if p.requires_grad}
            - set(ignored)
        )
        self._groups: list[list[str]] = []  # those of the last complete step
        self._groups_now: list[list[str]] = []
        self._groups_initial = True  # they were DDP's first buckets, which it will rebuild
        self._stepped = False  # a step has run in this process
        self._warned_initial = False  # state_dict() has warned of a save before DDP rebuilt
        self._target: list[list[str]] | None = None  # what a loaded state asks of the next steps
        self._pending: list[tuple[torch.Tensor, list[str], list[torch.Size], Any, list]] = []
        # With on_nonfinite="propagate", the futures of a step's buckets before the last, and
        # where their results (or errors) wait until the last bucket has been exchanged.
        self._held: list[tuple[torch.futures.Future, dict[str, Any]]] = []

    def __repr__(self) -> str:
        engine = self.engine
        return f"SyncState({describe(engine.config, engine.compressor)}, step={engine.step})"

    @property
    def _on_backward_thread(self) -> bool:
        """Whether this step's exchanges run on the backward thread: this hook's own need, or
        another hooked model's in this process (one model on the backward thread and another
        on the background one would issue collectives from two threads at once)."""
        return self._inline or bool(_ON_BACKWARD_THREAD)

    # The public surface -------------------------------------------------------------------
    @property
    def skipped_last_step(self) -> bool:
        """True when the last step was dropped for a NaN/Inf gradient (``on_nonfinite="skip"``:
        do not call optimizer.step(); ``"propagate"``: GradScaler.step skips it by itself)."""
        self._settle()
        return self.engine.skipped_last_step

    def stats(self) -> dict[str, Any]:
        """Bytes sent by this rank so far, dense-equivalent bytes, seconds in compression and
        communication (host wall time: on CUDA, launches and syncs, not kernel time), steps and
        skipped steps; see :meth:`SyncEngine.stats`."""
        self._settle()
        return self.engine.stats()

    def _settle(self) -> None:
        """Wait for the exchanges queued on the background thread: where backward raised (a
        NaN under on_nonfinite="raise", whose bucket DDP re-raises at once), the step's later
        buckets and its end may still be running there, and a state read (or saved) then was
        half a step behind, or a different step on each rank."""
        self._executor.drain()

    def state_dict(self) -> dict[str, Any]:
        """The engine's state, and the groups of parameters the last step exchanged (None when
        those were DDP's first buckets, which it has yet to rebuild into groups not known yet:
        a run resumed from such a state compresses other groups than the uninterrupted one)."""
        self._settle()
        if self._target is not None:
            groups = self._target
        else:
            groups = None if self._groups_initial or not self._groups else self._groups
            if self._groups_initial and self._groups and not self._warned_initial:
                self._warn_initial_groups()
        return {
            **self.engine.state_dict(),
            "ddp_groups": copy.deepcopy(groups),
            "ddp_bucket_caps_bytes": copy.copy(self._caps),
        }

    def _warn_initial_groups(self) -> None:
        """Warn (once) that a state saved with DDP's first buckets does not resume exactly,
        unless those are sure to be the rebuilt ones: one bucket of a model within DDP's first
        bucket cap (1 MiB), which the rebuild keeps whole."""
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is not None and len(self._groups) == 1:
            cap = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 2**20)
            size = sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
            if size <= cap:
                return
        self._warned_initial = True
        warnings.warn(
            "SyncState.state_dict() is called after DDP's first step, before DDP has "
            "rebuilt its buckets (it does so once, after the first step; after the "
            "second under static_graph): the state cannot say which groups of "
            "parameters the next steps compress, so a run resumed from it is not bit "
            "for bit this one. Save after the next step for an exact resume",
            stacklevel=3,
        )

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned; the next step exchanges the saved groups of
        parameters, so a resumed run compresses exactly as the uninterrupted one. A state
        saved under other settings (another compressor, density, collective, ...) is refused,
        naming them; ``on_nonfinite`` may differ. Each rank must load the state it saved, from
        a run of as many ranks, or the one :func:`sparsetrain.reshard_state` built for it from
        a run of another number: the next step raises on every rank if not. ``strict=False``
        takes a state saved under another density, collective and so on (not another
        compressor), or by another rank or number of ranks. With ``strict``, a state saved by
        :class:`GradientSync`, under another ``bucket_cap_mb`` of DDP's, or with other trained
        parameters than this DDP model's is refused too, naming the difference."""
        check_state(state, "SyncState")
        self._settle()
        groups = state.get("ddp_groups")
        if groups is not None and not (
            isinstance(groups, list)
            and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups)
        ):
            raise ValueError(
                f"the hook state's 'ddp_groups' must be None or a list of lists of parameter "
                f"names, got {type(groups).__name__}"
            )
        ddp = self._ddp() if self._ddp is not None else None
        if strict:
            _check_layout(state, self._caps, self._bucketed, self._sizes)
        dtypes = None if ddp is None else {n: p.dtype for n, p in ddp.module.named_parameters()}
        self.engine.load_state_dict(
            state, owner="SyncState", strict=strict, sizes=self._sizes, dtypes=dtypes
        )
        self._target = copy.deepcopy(groups)
        self._held = []

    # Used by the hook ------------------------------------------------------------------------
    def _run_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        params = bucket.parameters()
        try:
            names = [self._names[id(p)] for p in params]
        except KeyError:
            raise RuntimeError(
                "this hook state does not know the parameters of the model it runs on (an "
                "unpickled state, or one registered by hand on another model): register the hook "
                "with sparsetrain.register_ddp_hook(ddp_model, ...) and restore the saved state "
                "with state.load_state_dict(saved.state_dict())"
            ) from None
        shapes = [p.shape for p in params]
        flat = bucket.buffer()
        if flat.layout != torch.strided:  # a layer of the model's own making sparse gradients
            raise TypeError(
                f"the bucket of {', '.join(names)} holds a {flat.layout} gradient; sparsetrain "
                "compresses dense gradients (make the layer produce dense ones, or leave the "
                "parameter out of DDP)"
            )
        slots = _memory_ordered(params)
        if slots:  # exchanged in row-major order, as GradientSync does; handed back in DDP's
            flat = _reordered(flat.clone(), slots, to_rows=True)
        last = bucket.is_last()
        if self._target is not None:
            if self._ddp_state() != (True, True):
                return self._regroup(flat, names, shapes, last, slots)
            self._target = None  # DDP has rebuilt its buckets: they are the saved groups now
        self._groups_now.append(sorted(names))
        if last:
            self._groups, self._groups_now = self._groups_now, []
            state = self._ddp_state()
            provisional = not self._stepped if state is None else state == (False, True)
            self._groups_initial, self._stepped = provisional, True

        def work() -> torch.Tensor:
            held = self._set_aside_unused(names, torch.split(flat, [math.prod(s) for s in shapes]))
            try:
                out = self.engine.exchange(flat, names, shapes)
            finally:
                if held is not None:
                    self.engine.feedback.put_back(held)
                if last:
                    self.engine.end_step()
            return _reordered(out, slots, to_rows=False)  # in place: a later NaN fill reaches it

        if self.config.on_nonfinite == "propagate" and not self._on_backward_thread:
            return self._submit_held(work, flat.device, last)
        return self._submit(work, flat.device)

    def _submit_held(self, work, device: torch.device, last: bool) -> torch.futures.Future:
        """Run ``work`` in turn, but complete the futures of a step's buckets only once its last
        bucket is exchanged: a later bucket that turns out non-finite makes the earlier results
        NaN in place, and DDP copies a bucket's result into the gradients as soon as its
        future is done, while later buckets are still being exchanged. Costs no overlap: DDP
        waits for the futures only when backward ends, and then for the last one anyway."""
        if not last:
            outer = new_future(device)
            slot: dict[str, Any] = {}

            def run() -> None:
                try:
                    slot["value"] = work()
                except BaseException as e:  # noqa: BLE001 - handed to its future below
                    slot["error"] = e
                if device.type == "cuda":  # the last bucket's stream waits for this work
                    slot["event"] = torch.cuda.current_stream(device).record_event()

            self._executor.submit(run, device)
            self._held.append((outer, slot))
            return outer
        held, self._held = self._held, []

        def release(error: BaseException | None = None) -> None:
            """Complete every held future not done yet: with its bucket's result (after the
            current stream has waited for that bucket's work), or with an error. Each one
            whatever happens to the others: DDP waits for all of them."""
            for outer, slot in held:
                if outer.done():
                    continue
                try:
                    if error is None and "value" in slot:
                        if "event" in slot:
                            torch.cuda.current_stream(device).wait_event(slot["event"])
                        outer.set_result(slot["value"])
                    else:
                        outer.set_exception(
                            slot.get("error")
                            or error
                            or RuntimeError("this bucket's exchange did not run")
                        )
                except BaseException as e:  # noqa: BLE001 - handed to the waiting reducer
                    if not outer.done():
                        outer.set_exception(e)

        def run_last() -> torch.Tensor:
            try:
                return work()
            finally:  # on the last bucket's stream, after every earlier bucket's work
                release()

        fut = self._executor.submit(run_last, device)
        # Where the executor could not run run_last at all (it failed to set up the device or
        # stream), the held futures get that error too, instead of leaving DDP waiting.
        fut.add_done_callback(lambda f: release(_error_of(f)))
        return fut

    def _set_aside_unused(self, names: list[str], grads) -> dict | None:
        """Under ``find_unused_parameters=True``: set aside the error-feedback residual (and
        velocity) of each parameter whose gradient in the bucket is all zero, for this step.

        DDP fills an unused parameter's place in the bucket with zeros, and where no rank used
        it, leaves its ``.grad`` untouched and drops what the exchange returns: a residual sent
        in that place would be lost. The exchange sends zero there instead, as plain DDP does,
        and the residual waits for a step in which the parameter is used. (A used parameter's
        gradient that is exactly zero waits too: nothing is lost, its residual is only sent
        later.) Returns what was set aside, or None."""
        if not (self._find_unused and self.engine.feedback.enabled):
            return None
        grads = list(grads)
        # The step's loss scale first: a new one rescales the residuals in place, and one set
        # aside before that would come back in the old units.
        self.engine._begin_step(grads[0].device)
        used = torch.stack([g.any() for g in grads]).tolist()  # one read of the device
        idle = [n for n, u in zip(names, used) if not u]
        return self.engine.feedback.set_aside(idle) if idle else None

    def _ddp_state(self) -> tuple[bool, bool] | None:
        """(whether DDP has rebuilt its buckets, whether it ever will), or None where that is not
        known (no model, or a DDP without the attribute): then only a process's first step is
        taken to run on DDP's first buckets."""
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is None or not isinstance(getattr(ddp, "_has_rebuilt_buckets", None), bool):
            return None
        # DDP rebuilds unless it looks for unused parameters in a graph that is not static.
        will = bool(getattr(ddp, "static_graph", False)) or not bool(
            getattr(ddp, "find_unused_parameters", False)
        )
        return ddp._has_rebuilt_buckets, will

    def _submit(self, work, device: torch.device) -> torch.futures.Future:
        if not self._on_backward_thread:
            return self._executor.submit(work, device)
        fut = new_future(device)
        complete(fut, work)  # on backward's current stream, which ran the work
        return fut

    def _regroup(
        self,
        flat: torch.Tensor,
        names: list[str],
        shapes: list[torch.Size],
        last: bool,
        slots: list | tuple = (),
    ) -> torch.futures.Future:
        """A step after a load, before DDP has rebuilt its buckets: hold them until the last one,
        then exchange the saved groups of parameters (in their order) and write the results into
        the buckets. DDP waits for the buckets' futures only when backward ends, so holding them
        is safe; the step gives up overlapping its communication with backward. A group that
        fails (a NaN under on_nonfinite="raise") does not keep the others from their exchange,
        as separate buckets would not; the first error reaches every bucket's future. ``slots``
        (:func:`_memory_ordered`) are put back in DDP's order in each result."""
        if not last:
            fut = new_future(flat.device)  # completed inside work(), on its stream
            self._pending.append((flat, names, shapes, fut, slots))
            return fut
        pending, self._pending = [*self._pending, (flat, names, shapes, None, slots)], []
        target = self._target
        have = sorted(n for _, ns, _, _, _ in pending for n in ns)
        if sorted(n for g in target for n in g) != have:  # another model: DDP's own buckets
            target = [sorted(ns) for _, ns, _, _, _ in pending]
            self._target = None
        elif self._ddp_state() != (False, True):
            self._target = None  # DDP will not rebuild (or we cannot tell): one step is all
        self._groups, self._groups_now = target, []
        self._groups_initial, self._stepped = False, True

        def work() -> torch.Tensor:
            first: BaseException | None = None
            held = None
            try:
                where: dict[str, tuple[torch.Tensor, torch.Size]] = {}
                for buf, ns, shs, _, _ in pending:
                    for n, piece, shape in zip(
                        ns, torch.split(buf, [math.prod(s) for s in shs]), shs
                    ):
                        where[n] = (piece, shape)
                held = self._set_aside_unused(list(where), [piece for piece, _ in where.values()])
                for group in target:
                    try:
                        self.engine.exchange_into(
                            [where[n][0] for n in group], group, [where[n][1] for n in group]
                        )
                    except Exception as e:  # noqa: BLE001 - raised after the other groups
                        first = first or e
            except BaseException as e:
                first = first or e
            finally:
                if held is not None:
                    self.engine.feedback.put_back(held)
                self.engine.end_step()
            if first is not None:
                for _, _, _, f, _ in pending[:-1]:
                    f.set_exception(first)
                raise first
            for buf, _, _, f, order in pending[:-1]:
                f.set_result(_reordered(buf, order, to_rows=False))
            return _reordered(pending[-1][0], pending[-1][4], to_rows=False)

        fut = self._submit(work, flat.device)

        def release(done: torch.futures.Future) -> None:
            """Where work() never ran (the executor failed to set up the device or stream),
            the held buckets' futures get that error, instead of leaving DDP waiting."""
            error = _error_of(done)
            for _, _, _, f, _ in pending[:-1]:
                if not f.done():
                    f.set_exception(error or RuntimeError("this bucket's exchange did not run"))

        fut.add_done_callback(release)
        return fut

    @property
    def grad_scaler(self) -> Any:
        """The loss scaler the residuals follow (None without one); settable, for a state
        unpickled from one made with a scaler (pickling leaves the scaler out). Set it on every
        rank: the state's first step raises on every rank if some ranks have one and others
        not. A hook registered without a scaler refuses one (register it with
        ``grad_scaler=``)."""
        return self.engine.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        config = self.config
        options = {"on_nonfinite": config.on_nonfinite, "aggregator": config.aggregator,
                   "attack": config.attack}  # fmt: skip
        _, active = with_grad_scaler(scaler, options)  # refuses what the constructor refuses
        if self.engine.grad_scaler is None and not self.engine.agree_scaler:
            # The first step checks that every rank has one; later, no rank could tell.
            raise ValueError(
                "this hook has exchanged steps without a grad_scaler and cannot take one now: "
                "register the hook with grad_scaler=scaler on every rank (state.grad_scaler is "
                "for a state unpickled from one made with a scaler, before its first step)"
            )
        if active is None:
            raise ValueError(
                "state.grad_scaler takes an enabled torch.amp.GradScaler, got "
                f"{scaler!r}: with on_nonfinite={config.on_nonfinite!r} and no scaler to skip "
                "them, one rank's NaN gradients would be applied on every rank; register a new "
                "hook without grad_scaler to train unscaled"
            )
        self.engine.grad_scaler = active
        self.engine.scaler_missing = False

    def clear_residuals(self, where: Mapping[Any, torch.Tensor]) -> None:
        """Zero the error-feedback residual (and momentum-correction velocity) of each
        parameter in ``where`` (parameter tensor -> bool tensor of its shape) where the bool is
        True: for a pruner (``prepare(..., sync=state)``), so that what pruned weights kept is
        not sent after them. Parameters the hook does not exchange are skipped."""
        self._settle()
        for p, pruned in where.items():
            name = self._names.get(id(p))
            if name is not None:
                self.engine.feedback.clear(name, pruned)

    def __getstate__(self) -> dict[str, Any]:
        scaled = self.engine.grad_scaler is not None or self.engine.scaler_missing
        return {"config": self.config, "state": self.state_dict(), "scaled": scaled}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(d["config"], {}, None)
        self.load_state_dict(d["state"])
        caps = d["state"].get("ddp_bucket_caps_bytes")  # kept for the state it hands on
        self._caps = list(caps) if isinstance(caps, list) else None
        # The scaler belongs to the training loop and is not pickled: until one is set, the
        # first step refuses to take the scaled residuals for unscaled ones.
        self.engine.scaler_missing = bool(d.get("scaled", False))


def _bucket_caps(ddp: DistributedDataParallel | None) -> list[int] | None:
    """DDP's bucket size limits in bytes, which decide the groups it rebuilds: its first
    bucket's (1 MiB by default, ``bucket_cap_mb`` where that is given), then ``bucket_cap_mb``
    (or each of ``bucket_cap_mb_list``); None where this DDP does not say."""
    if ddp is None:
        return None
    cap = getattr(ddp, "bucket_bytes_cap", None)
    caps = list(getattr(ddp, "bucket_bytes_cap_list", None) or [cap])
    first = getattr(getattr(ddp, "_bucket_config", None), "first_bucket_bytes_cap", None)
    if first is None:  # torch before the bucket config: a default cap means a 1 MiB first one
        default = getattr(ddp, "bucket_bytes_cap_default", False)
        first = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 2**20) if default else cap
    caps = [first, *caps]
    return [int(c) for c in caps] if all(is_integer(c, 1) for c in caps) else None


def _check_layout(
    state: Mapping[str, Any],
    caps: list[int] | None,
    bucketed: set[str] | None,
    sizes: Mapping[str, int] | None,
) -> None:
    """Refuse (``ValueError``) a state whose groups of parameters this DDP model will not
    exchange: one saved by GradientSync (its buckets are its own), under other DDP bucket caps
    (``caps`` now), or with other parameters in DDP's buckets (``bucketed`` now). The saved
    groups would be exchanged at the first step only, then DDP's own, and what is kept per
    group (a threshold, PowerSGD's Q, Ok-Topk's region bounds) would start afresh."""
    remedy = "or pass strict=False to take its residuals by parameter (what is kept per group "
    remedy += "of parameters then starts afresh)"
    if "buckets" in state and "ddp_groups" not in state:
        raise ValueError(
            "SyncState: this state was saved by GradientSync, whose buckets of parameters are "
            "its own, not DDP's: load it into a GradientSync built as the saved one was, " + remedy
        )
    saved = state.get("ddp_bucket_caps_bytes")
    if (
        isinstance(saved, list)
        and all(is_integer(c, 1) for c in saved)
        and caps is not None
        and saved != caps
    ):

        def mb(caps: list[int]) -> str:
            return ", ".join(f"{c / 2**20:.3g} MB ({c} bytes)" for c in caps)

        raise ValueError(
            f"SyncState: this state was saved under DDP bucket caps of {mb(saved)}, and this "
            f"DDP model's are {mb(caps)} (the first bucket's, then bucket_cap_mb's), so DDP "
            "will exchange other groups of parameters than the saved run did: build the DDP "
            "model with the saved run's bucket_cap_mb, " + remedy
        )
    groups = state.get("ddp_groups")
    if not groups or bucketed is None:
        return
    had = {n for g in groups for n in g}
    if sizes is not None and not had <= set(sizes):
        return  # (parameters this model does not have: the engine's check names them)
    if had != bucketed:
        differ = "; ".join(
            f"{what} {', '.join(sorted(names))}"
            for what, names in (("saved with", had - bucketed), ("now with", bucketed - had))
            if names
        )
        raise ValueError(
            "SyncState: this state was saved with other parameters in DDP's buckets than this "
            f"DDP model's ({differ}): another model, or other parameters trainable when DDP "
            "was built. Load the state saved with this model, " + remedy
        )


def _memory_ordered(params: list[torch.Tensor]) -> list[tuple[int, torch.Size, tuple]]:
    """(offset, shape, strides) of each slot of a DDP bucket that holds its parameter's gradient
    in the parameter's own memory order: DDP lays a slot out with the strides of a parameter
    whose layout is dense (a channels_last convolution's NHWC), while the residuals, the
    compressors' selections and a pruner's masks go by the parameter's row-major order, as in
    GradientSync, which makes each gradient contiguous. Empty where every slot is row-major."""
    slots, offset = [], 0
    for p in params:
        if not p.is_contiguous() and _dense(p):
            slots.append((offset, p.shape, p.stride()))
        offset += p.numel()
    return slots


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides cover its numel elements once each (DDP's test for giving a
    bucket slot the parameter's strides)."""
    expected = 1
    for size, stride in sorted(
        ((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _reordered(flat: torch.Tensor, slots: list, to_rows: bool) -> torch.Tensor:
    """Rewrite ``slots`` of the 1-D ``flat`` in place, from memory order to row-major order
    (``to_rows``) or back; returns ``flat``."""
    for offset, shape, stride in slots:
        rows = flat[offset : offset + math.prod(shape)].view(shape)
        memory = torch.as_strided(flat, shape, stride, flat.storage_offset() + offset)
        if to_rows:
            rows.copy_(memory.clone())
        else:
            memory.copy_(rows.clone())
    return flat


def _error_of(fut: torch.futures.Future) -> BaseException | None:
    """The exception a done Future holds, or None."""
    try:
        fut.value()
    except BaseException as e:  # noqa: BLE001 - returned, not handled
        return e
    return None


def _hook(state: SyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # A Python future completed with set_exception holds the exception as its value, which
    # DDP's reducer reads in C++ as a tensor ("Unable to cast <message> to Tensor"); raised in
    # a then() callback, it marks the chained future failed, and backward raises a
    # RuntimeError that starts with the error's type and message.
    return state._run_bucket(bucket).then(_value)


def _value(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
    return fut.value()


def runs_inline(ddp_model: DistributedDataParallel) -> bool:
    """Whether the hook must run its exchanges on the autograd thread: when DDP
    (``find_unused_parameters=True``) or a layer (``torch.nn.SyncBatchNorm``) issues collectives
    during backward. From a second thread, the exchanges' collectives would interleave with
    those differently on each rank and pair up mismatched collectives (a hang, or mixed data).
    """
    return bool(getattr(ddp_model, "find_unused_parameters", False)) or any(
        isinstance(m, torch.nn.SyncBatchNorm) for m in ddp_model.module.modules()
    )


def _inline(ddp_model: DistributedDataParallel, overlap: bool | None) -> bool:
    """Whether the exchanges run on the backward thread, from ``overlap`` (None: automatic)."""
    if overlap is not None and not isinstance(overlap, bool):
        raise TypeError(f"overlap must be True, False or None (automatic), got {overlap!r}")
    needed = runs_inline(ddp_model)
    if overlap and needed:
        raise ValueError(
            "overlap=True: the model issues collectives of its own during backward "
            "(find_unused_parameters=True or SyncBatchNorm), which the exchanges on a second "
            "thread would pair up with differently on each rank; leave overlap out"
        )
    return needed if overlap is None else not overlap


# register_ddp_hook's own arguments, besides the SyncConfig fields and the compressor's options.
_HOOK_ARGUMENTS = ("compressor", "density", "process_group", "grad_scaler", "overlap")


def _ddp_group(ddp_model: DistributedDataParallel) -> dist.ProcessGroup | None:
    """The DDP model's process group (None for the default group)."""
    group = getattr(ddp_model, "process_group", None)
    return None if group is None or group is dist.group.WORLD else group


def _hook_group(
    ddp_group: dist.ProcessGroup | None, given: dist.ProcessGroup | None
) -> dist.ProcessGroup | None:
    """The group the hook averages over: the DDP model's, or ``given`` if it has the same
    ranks (DDP's own collectives, and the average it expects, are over those)."""
    if given is None or given is ddp_group:
        return ddp_group
    mine = dist.get_process_group_ranks(ddp_group if ddp_group is not None else dist.group.WORLD)
    theirs = dist.get_process_group_ranks(given)
    if mine != theirs:
        raise ValueError(
            f"process_group has the ranks {theirs}, but the DDP model averages over the ranks "
            f"{mine} (its process_group); leave process_group out to use the model's"
        )
    return None if given is dist.group.WORLD else given


def register_ddp_hook(
    ddp_model: DistributedDataParallel,
    compressor: str = "threshold",
    density: float | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    overlap: bool | None = None,
    **options: Any,
) -> SyncState:
    """Compress DDP's gradient communication with ``compressor``.

    Registers a DDP communication hook: each gradient bucket is compensated with its error-feedback
    residual, compressed, exchanged (allreduce for summable payloads, a gather or a sparse
    collective otherwise) and averaged, asynchronously, while backward computes the next buckets.
    Under ``find_unused_parameters=True`` DDP runs collectives of its own during backward, and
    ``torch.nn.SyncBatchNorm`` layers do too, so with either the exchanges run on the backward
    thread, without that overlap. The hooks of all DDP models in a process share one background
    thread, so two hooked models in one backward exchange in autograd's order on every rank;
    while one of them runs on the backward thread, all do. A DDP model *without* this hook in
    the same backward (a GAN's generator left plain) allreduces from the backward thread on
    the same group: pass ``overlap=False``, or give the hook a ``process_group`` of its own
    (``torch.distributed.new_group`` over the same ranks), or gloo aborts on a collective
    mismatch.

    Args:
        ddp_model: a ``DistributedDataParallel`` model (no hook registered yet).
        compressor: a name from ``sparsetrain.available_compressors()``.
        density: fraction of entries kept by the sparse compressors (topk, threshold, randomk);
            None keeps the compressor's default.
        process_group: the group to synchronise over (default: the DDP model's own, which a
            group given must match).
        grad_scaler: with mixed precision (``torch.autocast`` to float16), the
            ``torch.amp.GradScaler`` that scales the loss. A step whose gradient overflows on
            some rank then reaches the scaler as NaN on every rank (``on_nonfinite="propagate"``,
            the default with a scaler), so ``scaler.step`` skips it and lowers the scale; the
            error-feedback residuals and kept thresholds follow the scale from step to step.
        **options: :class:`~sparsetrain.sync.config.SyncConfig` fields (error_feedback,
            collective, dense_warmup_steps, on_nonfinite, aggregator, ...) and the compressor's
            own options (for example ``reestimate_every``, ``levels``, ``rank``).
        overlap: whether the exchanges run on a background thread while backward goes on
            (True), or on the backward thread (False). Default: True, except under
            ``find_unused_parameters=True`` or with ``SyncBatchNorm`` layers, which need False
            (True is then refused). Pass False when anything else issues collectives during
            backward, such as a loss built on ``torch.distributed.nn.functional.all_gather``
            or another DDP model without this hook: from two threads, the collectives would
            pair up differently on each rank (a hang, or gloo's abort on a size mismatch).
            Every rank must pass the same.

    Returns:
        The hook state: ``stats()``, ``state_dict()``, ``load_state_dict()``, ``skipped_last_step``.

    Raises:
        ValueError / TypeError: a bad option (checked now, on every rank), or ranks whose options
            or models differ (an error on every rank, not a hang).

    Example:
        >>> model = DistributedDataParallel(net)  # doctest: +SKIP
        >>> state = sparsetrain.register_ddp_hook(model, "threshold", density=0.01)  # doctest: +SKIP
        >>> ...  # train as usual; state.stats()["bytes_sent"] tells what crossed the wire  # doctest: +SKIP

        With float16 mixed precision:

        >>> scaler = torch.amp.GradScaler("cuda")  # doctest: +SKIP
        >>> state = sparsetrain.register_ddp_hook(model, "threshold", density=0.01,  # doctest: +SKIP
        ...                                      grad_scaler=scaler)
        >>> with torch.autocast("cuda", dtype=torch.float16):  # doctest: +SKIP
        ...     loss = loss_fn(model(x), y)
        >>> scaler.scale(loss).backward()  # doctest: +SKIP
        >>> scaler.step(optimizer)  # skips a step that overflowed on any rank  # doctest: +SKIP
        >>> scaler.update()  # doctest: +SKIP
    """
    # torch.compile(ddp_model) wraps the DDP model; its register_comm_hook reaches the DDP
    # model inside, and so does this.
    inner = getattr(ddp_model, "_orig_mod", None)
    if isinstance(inner, DistributedDataParallel):
        ddp_model = inner
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"register_ddp_hook needs a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(ddp_model).__name__}; for a plain model use sparsetrain.GradientSync"
        )
    if getattr(ddp_model, "_use_python_reducer", False):
        # DDP built under torch._dynamo.config.optimize_ddp = "python_reducer" (for compiled
        # autograd) calls a comm hook per parameter with (grad, param), not per bucket; torch's
        # own hooks cannot take that either. Every rank builds DDP under the same setting.
        raise TypeError(
            "register_ddp_hook: this DDP model was built under torch._dynamo.config."
            "optimize_ddp='python_reducer', whose reducer calls a communication hook per "
            "parameter, not per bucket (torch's own hooks fail there too); build the DDP model "
            "under the default optimize_ddp (True), or use sparsetrain.GradientSync"
        )
    named = list(ddp_model.module.named_parameters())
    layout = [(n, tuple(p.shape), str(p.dtype)) for n, p in named if p.requires_grad]
    device = cuda_device_of(p for _, p in named)
    given, process_group = process_group, _ddp_group(ddp_model)
    try:  # a rank's bad options: every rank gets an error (check_consistent's gather)
        # Refused over the DDP model's group, which holds every rank: a process_group that
        # leaves a rank out raises there, and the others learn it instead of waiting.
        check_process_group(given)
        process_group = _hook_group(process_group, given)
        how = _synced_overlap(ddp_model.module)
        if how is not None:
            raise ValueError(
                f"register_ddp_hook: this DDP model's module {how} the model of a "
                "sparsetrain.GradientSync, which exchanges its gradients after backward; the "
                "hook would exchange them again. Use one of the two (drop the GradientSync)"
            )
        if getattr(ddp_model, "_comm_hooks", None):
            raise ValueError(
                "register_ddp_hook: this DDP model already has a communication hook (from "
                "register_ddp_hook, its register_comm_hook, or DDP's mixed_precision); a DDP "
                "model takes one hook, registered once: build the DDP model again to change it"
            )
        check_dense_gradients(
            ddp_model.module, getattr(ddp_model, "parameters_to_ignore", ()), ddp=True
        )
        options, grad_scaler = with_grad_scaler(grad_scaler, options)  # None if disabled
        config = make_config(
            compressor, density, options, caller="register_ddp_hook", own=_HOOK_ARGUMENTS
        )
        for n, _, dt in layout:
            if dt not in ("torch.float32", "torch.float64", "torch.float16", "torch.bfloat16"):
                raise TypeError(f"parameter {n!r} has dtype {dt}; gradients must be floating point")
        inline = _inline(ddp_model, overlap)
    except (TypeError, ValueError) as e:
        refuse_everywhere(e, process_group, device)
    extra = {"grad_scaler": grad_scaler is not None, "overlap": not inline}
    check_consistent(config, layout, process_group, extra, device=device)
    state = SyncState(
        config,
        {id(p): n for n, p in named},
        process_group,
        inline=inline,
        ddp_model=ddp_model,
        grad_scaler=grad_scaler,
    )
    try:
        ddp_model.register_comm_hook(state, _hook)
    except BaseException:
        # torch lists the hook before it refuses it: a refused state must not stay behind,
        # nor keep every hooked model's exchanges on the backward thread.
        _ON_BACKWARD_THREAD.discard(state)
        hooks = getattr(ddp_model, "_comm_hooks", None)
        if hooks and hooks[-1][1] is state:
            hooks.pop()
        raise
    HOOKED_MODULES.add(ddp_model.module)
    return state
