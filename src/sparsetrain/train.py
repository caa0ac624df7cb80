"""The reference trainer: data-parallel training of a registered task with compressed gradients.

One run is one :class:`TrainConfig`. :func:`launch` runs one or several of them, one after the
other, in the same group of worker processes, and returns a report (a plain dict that
:func:`write_report` stores as JSON and :func:`sparsetrain.plotting.plot_report` draws).

How the workers come to be:

* embedded (the default): :func:`launch` spawns ``workers`` processes on this machine with
  ``torch.multiprocessing``; they meet through a ``FileStore`` in a fresh temporary folder, so
  no port is ever fixed and two launches never collide;
* under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set in the environment): every process calls
  :func:`launch`, which joins that job through ``env://`` (``MASTER_ADDR``/``MASTER_PORT``)
  and runs this process's rank only. ``workers`` is then taken from ``WORLD_SIZE``.

What one rank does (:func:`train_worker`):

1. build the task with the run's seed (the train/test split is fixed by it), seed torch, build
   the model (identical on every rank) and wrap it in ``DistributedDataParallel``;
2. register the compression hook (:func:`sparsetrain.register_ddp_hook`) with the run's
   compressor, density, error feedback, collective, aggregator and attack options (with
   ``ddp=False``: no DDP, and a :class:`~sparsetrain.GradientSync` with the same options);
3. every epoch, shuffle the training indices with a generator seeded from ``(seed, epoch)``,
   pad them to a multiple of the world size and take every ``world``-th one from ``rank`` (as
   ``DistributedSampler`` does): the shards are disjoint, every rank runs the same number of
   steps, and a resumed run sees exactly the order the interrupted one would have seen (on
   another number of ranks, the rest of the interrupted epoch is dealt over the new ranks:
   :class:`_Plan`);
4. forward (under ``torch.autocast`` with ``amp``), backward (the hook averages the compressed
   gradients across ranks; without DDP, ``GradientSync.synchronize()`` after backward), and
   ``optimizer.step()`` unless the hook dropped the step for a non-finite gradient (with
   ``amp="fp16"``: the loss scaler's ``step`` and ``update``, which skip such steps);
5. every ``eval_every`` steps (and at the start and the end) average the training loss over the
   ranks and measure test loss and accuracy, each rank on every ``world``-th test example
   (summed over the ranks in the same allreduce);
6. at the end, average the hook's byte and time counters over the ranks.

Example:
    >>> from sparsetrain.train import TrainConfig, launch
    >>> report = launch([TrainConfig(compressor=c, density=0.01, workers=2, epochs=2)  # doctest: +SKIP
    ...                  for c in ("none", "topk")])
    >>> [run["final_test_accuracy"] for run in report["runs"]]  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import json
import logging
import math
import operator
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset, default_collate

from ._options import is_integer, plain
from ._procs import (
    chosen_start_method,
    exit_finished_worker,
    launcher_state,
    stop_with_parent,
    too_many_processes,
    worker_start_method,
)
from .compressors import check_density, get_compressor, option_names
from .hostmem import reserve, reuse_freed_memory, reusing_freed_memory
from .sync import GradientSync, SyncConfig, register_ddp_hook
from .sync.config import ON_NONFINITE, make_config, refuse_misplaced_collective_options
from .tasks import Task, available_tasks, check_logits, check_task_options, get_task

BACKENDS = ("gloo", "nccl")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_MAX_BUCKET_MB = 2.0**40  # 2**60 bytes: within DDP's int64 bucket size
AMP = ("fp16", "bf16")
SCHEDULES = ("constant", "cosine")
REPORT_FORMAT = 1
_CHECKPOINT_FORMAT = 1


class WorkerError(RuntimeError):
    """A worker process failed; the message names the rank and the original error.

    Attributes:
        rank: the rank whose error came first.
        error_type: the class name of the original exception (for example ``"ValueError"``).
        worker_traceback: the worker's formatted traceback.
    """

    def __init__(self, rank: int, error_type: str, message: str, worker_traceback: str = ""):
        super().__init__(
            f"worker rank {rank} failed: {error_type}: {without_native_stack(message)}"
        )
        self.rank = rank
        self.error_type = error_type
        self.worker_traceback = worker_traceback


_MAX_TIMEOUT_S = 1e9  # gloo took 1e11 s and refused 1e13 s as a negative count (torch 2.13)


class CheckpointConflict(ValueError):
    """The run as configured conflicts with the checkpoints in its folder: resumed with another
    configuration than the one that saved them, started without ``resume`` over an earlier
    run's, or given the folder and label of a run that is still running. Nothing was trained or
    written; ``sparsetrain train`` exits with status 2 (a usage error) for it, where other
    worker failures exit with 1."""


class _Conflict(str):
    """A checkpoint problem that is a :class:`CheckpointConflict` (the others are ValueErrors)."""


class PeerError(ValueError):
    """An error a rank raises because another rank failed (it points to that rank's error):
    the launcher reports the other rank's own error before it, whichever came first."""


_CALLBACK_PREFIX = "Got the following error when running the callback: "


def worker_error(e: BaseException) -> tuple[str, str]:
    """The class name and message of a worker's error, as a user should read them: an error
    raised in a DDP communication hook reaches backward() wrapped by torch's Future, as a
    RuntimeError whose text is "Got the following error when running the callback: " then the
    hook's "Type: message" and, after an "At:" line, the Python stack; that wrapping is taken
    off (the stack is in the worker's traceback)."""
    name, text = type(e).__name__, str(e)
    if text.startswith(_CALLBACK_PREFIX):
        inner = text[len(_CALLBACK_PREFIX) :]
        head, sep, rest = inner.partition(": ")
        if sep and head.isidentifier():
            name, text = head, rest
        lines = text.splitlines()
        if "At:" in lines:
            text = "\n".join(lines[: lines.index("At:")]).rstrip()
    return name, without_native_stack(text)


def without_native_stack(message: str) -> str:
    """``message`` without the C++ stack a torch error may carry after its text (from its
    "Exception raised from ..." line on: gloo's lost connections bring a dozen frames)."""
    lines = message.splitlines()
    cut = next(
        (i for i, line in enumerate(lines) if line.startswith("Exception raised from")), None
    )
    return message if cut is None or cut == 0 else "\n".join(lines[:cut]).rstrip()


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")


def _check_dict(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{name} must be a dict with string keys, got {value!r}")


@dataclass
class TrainConfig:
    """One training run: the task, the gradient compression and the optimisation.

    Attributes:
        task: registered task name (``sparsetrain.tasks.available_tasks()``).
        compressor: registered compressor name (``sparsetrain.available_compressors()``);
            default "none", the uncompressed baseline a comparison starts from (the hook,
            ``GradientSync`` and ``sparsetrain train`` default to "threshold").
        density: fraction of gradient entries sent, in (0, 1]; given to compressors that take
            a ``density`` option and ignored (recorded as None) by the others, so one value
            serves a comparison of ``none``, ``topk`` and ``threshold``. None: their default.
        compressor_options: further options of the compressor (``option_names(compressor)``).
        error_feedback: keep what was not sent for the next step; None: on for biased
            compressors (top-k, threshold, ...) but signsgd with ``majority_vote``, off for
            unbiased ones (``Compressor.feedback_by_default``).
        collective: how sparse payloads are reduced (``"allgather"``, a sparse allreduce, or
            ``"auto"``).
        collective_options, auto_candidates, auto_network: the collective's options and what
            ``"auto"`` chooses from and with (``SyncConfig``'s fields of these names).
        dense_warmup_steps: steps of plain dense allreduce before compression starts.
        on_nonfinite: ``"raise"`` on a NaN/Inf gradient, or ``"skip"`` the step on every rank
            (``"propagate"`` skips it too, leaving the gradients NaN: what a loss scaler needs).
            None (the default): ``"raise"``, or with ``amp="fp16"``, whose loss scaler handles
            overflows, ``"propagate"`` (``SyncConfig.on_nonfinite``); with ``amp="fp16"``
            ``"raise"`` and ``"skip"`` are refused, as the hook refuses them with a scaler.
        amp: mixed precision: forward and loss under ``torch.autocast`` to ``"fp16"`` (with a
            ``torch.amp.GradScaler`` that skips steps whose gradients overflow on any rank and
            lowers its scale; the hook gets it as ``grad_scaler``) or ``"bf16"`` (no scaler);
            None: full precision. Parameters, gradients and evaluation stay in float32.
            ``"fp16"`` is not combined with robust aggregation or attacks.
        init_loss_scale: the loss scaler's first scale with ``amp="fp16"`` (GradScaler's
            ``init_scale``); too large a scale costs a few skipped steps at the start.
        aggregator, aggregator_options: robust aggregation rule (None: the plain average).
        attack, attack_options, byzantine: the last ``byzantine`` ranks send the named attack.
        workers: number of processes (ignored under torchrun, which sets ``WORLD_SIZE``).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one CUDA device a rank).
        epochs: passes over the training set.
        batch_size: examples a rank takes in one step (the global batch is ``workers`` times it).
        lr, momentum, weight_decay, nesterov: SGD hyper-parameters.
        momentum_correction: apply ``momentum`` on each rank before compression (Deep Gradient
            Compression's momentum correction, ``SyncConfig.momentum_correction``) instead of
            in the optimizer, which then runs without momentum. Needs a sparse compressor with
            error feedback and ``momentum > 0``; not with ``nesterov``.
        schedule: ``"cosine"`` decays the learning rate from ``lr`` to 0 over ``epochs``
            (steady final accuracy, also for compressed runs); ``"constant"`` keeps ``lr``.
        seed: fixes the data split, the initial model and the shuffling.
        eval_every: steps between evaluations; 0: once an epoch.
        max_steps: stop after this many steps in all (0: no limit), for example to test resuming.
        checkpoint_dir: folder for checkpoints (one file a rank); None: no checkpoints.
        checkpoint_every: steps between checkpoints; 0: at each epoch's end. Either way, also
            at the end of the run (``max_steps`` included).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one; one
            written by another number of workers is resharded (:func:`_resharded_checkpoint`).
        label: the run's name in reports and plots; None: the compressor's name.
        task_options: keyword options of the task factory (for example ``hidden``).
        progress: show a progress bar on rank 0.
        timeout_s: seconds a collective may wait before the process group gives up.
        bucket_cap_mb: DDP's bucket size in MB (its ``bucket_cap_mb``, 25 by default). The hook
            runs once a bucket, so larger buckets mean fewer exchanges a step (and fewer rounds
            of small messages for the sparse collectives) but less overlap with backward.
        native_ddp: no hook at all, PyTorch's own allreduce: the plain-DDP baseline of a
            comparison. Needs ``compressor="none"`` and no robust aggregation or attack; bytes
            are counted by the ring formula, and a NaN/Inf gradient is not checked.
        ddp: wrap the model in DDP and exchange through its comm hook (the default). False:
            no DDP; :class:`~sparsetrain.GradientSync` exchanges the gradients after backward,
            in ``bucket_cap_mb`` groups, with the same engine, and the same values where the
            model fits one bucket (past it, DDP's groups differ: its first step takes one
            bucket and later ones close a bucket once it reaches the cap, where GradientSync
            starts a new one before it would pass it); rank 0's parameters and buffers are
            broadcast, as DDP does. A sparse compressor and
            collective then read and write the gradients where backward left them, without
            DDP's copy of each into its bucket: on the end-to-end benchmark's model (39 MB of
            gradients, 4 ranks on 2 cores) a step 10-12% shorter; no overlap of the
            exchange with backward. Not with ``native_ddp``.
        find_unused_parameters: DDP's ``find_unused_parameters``: for a model whose forward
            leaves some parameters without a gradient (an auxiliary head not used in the
            loss), which DDP otherwise stops at with an error; it costs a pass over the
            autograd graph each step. Needs ``ddp=True``.
        reuse_host_memory: have glibc keep freed memory for reuse in each worker
            (:func:`sparsetrain.hostmem.reuse_freed_memory`), so a large CPU tensor made anew
            every step (a big layer's weight gradient) stops costing page faults; unchanged
            where the environment already tunes the allocator. On CPU each worker also
            reserves ten times its parameters' bytes of heap before the first step
            (:func:`sparsetrain.hostmem.reserve`). Only speed changes, no value.

    Raises:
        ValueError, TypeError: a field out of range or of the wrong type; the message names the
            field and what is allowed.

    Example:
        >>> cfg = TrainConfig(compressor="topk", density=0.01, workers=2, epochs=5)
        >>> cfg.effective_compressor_options()
        {'density': 0.01}
    """

    task: str = "digits-mlp"
    compressor: str = "none"
    density: float | None = None
    compressor_options: dict[str, Any] = field(default_factory=dict)
    error_feedback: bool | None = None
    collective: str = "allgather"
    collective_options: dict[str, Any] = field(default_factory=dict)
    auto_candidates: list[str] | None = None
    auto_network: dict[str, float] | None = None
    dense_warmup_steps: int = 0
    on_nonfinite: str | None = None
    amp: str | None = None
    init_loss_scale: float = 2.0**16
    aggregator: str | None = None
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    attack: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    byzantine: int = 0
    workers: int = 4
    backend: str = "gloo"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    momentum_correction: bool = False
    schedule: str = "cosine"
    seed: int = 0
    eval_every: int = 0
    max_steps: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    label: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    timeout_s: float = 300.0
    bucket_cap_mb: float = 25.0
    native_ddp: bool = False
    reuse_host_memory: bool = True
    ddp: bool = True
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        tasks = available_tasks()
        if self.task not in tasks:
            raise ValueError(f"unknown task {self.task!r}; valid names are: {', '.join(tasks)}")
        if self.density is not None:
            self.density = plain(self.density)  # a NumPy number as Python's (np.float32 too)
            check_density(self.density)
            options = self.compressor_options if isinstance(self.compressor_options, dict) else {}
            given = options.get("density")
            if given is not None and given != self.density:
                raise ValueError(
                    f"density is given twice, {self.density:g} and in the compressor's options "
                    f"{given!r}: give it once (--density)"
                )
        for name in ("compressor_options", "collective_options", "aggregator_options",
                     "attack_options", "task_options"):  # fmt: skip
            _check_dict(name, getattr(self, name))
        check_task_options(self.task, self.task_options)
        # Unknown compressor names and options are refused here, before any process starts.
        refuse_misplaced_collective_options(
            self.compressor, self.collective, self.compressor_options
        )
        get_compressor(self.compressor, **self.effective_compressor_options())
        if self.error_feedback is not None and not isinstance(self.error_feedback, bool):
            raise TypeError(
                f"error_feedback must be True, False or None, got {self.error_feedback!r}"
            )
        if self.on_nonfinite is not None and self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE} or None, got {self.on_nonfinite!r}"
            )
        if self.amp is not None and self.amp not in AMP:
            raise ValueError(f"amp must be one of {AMP} or None, got {self.amp!r}")
        if self.amp == "fp16":
            if self.on_nonfinite in ("skip", "raise"):
                raise ValueError(
                    "amp='fp16' lets its loss scaler skip the steps that overflow "
                    f"(on_nonfinite='propagate', its default); on_nonfinite={self.on_nonfinite!r} "
                    "would "
                    + ("hide them from it" if self.on_nonfinite == "skip" else "stop the run")
                )
            self.on_nonfinite = "propagate"
            if self.aggregator is not None or self.attack is not None:
                raise ValueError(
                    "amp='fp16' (--amp fp16) scales the gradients by a changing loss scale, but "
                    "robust aggregation and attacks work in their own units: use amp='bf16' "
                    f"(--amp bf16, no scaler) with aggregator={self.aggregator!r}, "
                    f"attack={self.attack!r}, or float32"
                )
        elif self.on_nonfinite is None:
            self.on_nonfinite = "raise"
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _check_int("workers", self.workers, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**63:  # as every command's --seed
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        _check_int("eval_every", self.eval_every, 0)
        _check_int("max_steps", self.max_steps, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("dense_warmup_steps", self.dense_warmup_steps, 0)
        _check_int("byzantine", self.byzantine, 0)
        for name in (
            "native_ddp", "reuse_host_memory", "momentum_correction", "ddp", "nesterov", "resume",
            "progress", "find_unused_parameters",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                hint = (
                    " (True applies TrainConfig.momentum before compression; the hook's "
                    "momentum_correction takes the momentum itself)"
                    if name == "momentum_correction"
                    else ""
                )
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}{hint}")
        if self.native_ddp and (
            self.compressor != "none" or self.aggregator is not None or self.attack is not None
        ):
            raise ValueError(
                "native_ddp=True runs plain DDP without the hook: it needs compressor='none' "
                f"and no aggregator or attack, got compressor={self.compressor!r}, "
                f"aggregator={self.aggregator!r}, attack={self.attack!r}"
            )
        if self.native_ddp and not self.ddp:
            raise ValueError("native_ddp=True is DDP's own allreduce: it needs ddp=True")
        if self.find_unused_parameters and not self.ddp:
            raise ValueError(
                "find_unused_parameters=True is DDP's option: it needs ddp=True (without DDP, "
                "GradientSync takes parameters a step leaves without a gradient as they are)"
            )
        # Under torchrun the job's size is WORLD_SIZE, whatever workers says (launch() sets it).
        world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else self.workers
        if self.byzantine >= world:
            raise ValueError(
                f"byzantine must be smaller than workers (some ranks must be honest), got "
                f"byzantine={self.byzantine} with workers={world}"
            )
        if self.byzantine and self.attack is None:
            raise ValueError("byzantine > 0 needs an attack name (attack=...)")
        if self.attack is not None and not self.byzantine:
            raise ValueError(
                f"attack={self.attack!r} needs byzantine >= 1, the number of ranks that attack "
                "(the last ones): with byzantine=0 no rank would attack"
            )
        for name in (
            "lr", "momentum", "weight_decay", "timeout_s", "bucket_cap_mb", "init_loss_scale"
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if self.momentum_correction and (self.momentum == 0 or self.nesterov or self.native_ddp):
            unmet = [
                what
                for what, bad in (
                    (f"momentum > 0 (got {self.momentum})", self.momentum == 0),
                    ("no nesterov (got nesterov=True)", self.nesterov),
                    ("the hook (got native_ddp=True, plain DDP)", self.native_ddp),
                )
                if bad
            ]
            raise ValueError(
                "momentum_correction=True (--momentum-correction) moves the momentum into the "
                f"hook: it needs {' and '.join(unmet)}"
            )
        # (GradScaler keeps the scale in float32: above its largest, the first step failed in
        # a worker with "value cannot be converted to type float without overflow")
        if not 0 < self.init_loss_scale <= _FLOAT32_MAX:
            raise ValueError(
                f"init_loss_scale must be a number in (0, {_FLOAT32_MAX:.4g}] (float32's "
                f"largest, the scaler's dtype), got {self.init_loss_scale}"
            )
        if not 0 < self.timeout_s <= _MAX_TIMEOUT_S:  # gloo refuses a longer one
            raise ValueError(
                f"timeout_s (--timeout) must be a number of seconds in (0, {_MAX_TIMEOUT_S:.0e}] "
                f"(about 31 years), got {self.timeout_s}"
            )
        # (DDP takes the bucket's bytes as an int64: 1e13 MB failed in a worker with a 7 KB
        # TypeError listing the model's tensors)
        if not 0 < self.bucket_cap_mb <= _MAX_BUCKET_MB:
            raise ValueError(
                f"bucket_cap_mb must be a number of MB in (0, {_MAX_BUCKET_MB:.4g}], got "
                f"{self.bucket_cap_mb}"
            )
        if self.label is not None:
            if not isinstance(self.label, str):
                raise TypeError(f"label must be a string or None, got {self.label!r}")
            if (
                not self.label.strip()
                or self.label in (".", "..")
                or any(sep in self.label for sep in ("/", "\\", os.sep))
            ):
                raise ValueError(
                    "label must be a name without a path separator (it names the run's "
                    f"checkpoint folder inside checkpoint_dir), got {self.label!r}"
                )
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise TypeError(
                    f"checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}"
                )
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)  # (kept in the report's JSON)
            if not str(self.checkpoint_dir).strip():
                raise ValueError(
                    "checkpoint_dir must be a folder path, or None for no checkpoints; got an "
                    "empty one, which wrote none without a word"
                )
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError(
                "checkpoint_every and resume (--checkpoint-every, --resume) need checkpoint_dir "
                "(--checkpoint-dir, where checkpoints live)"
            )
        if not self.native_ddp:  # the hook's own checks, here rather than in every worker
            sync = self.sync_config()
            # As the hook holds them, so a resumed run compares equal (a tuple of candidates
            # or a NetworkParams is saved as a list or a dict).
            if self.auto_candidates is not None:
                self.auto_candidates = list(sync.auto_candidates)
            if self.auto_network is not None:
                self.auto_network = sync.auto_network.as_dict()
        if self.aggregator is not None or self.attack is not None:
            # Names, options and what the rule needs of n and f (Krum: n > 2f + 2, ...), checked
            # as every worker's hook will build them.
            from .robust import get_aggregator, get_attack

            options = dict(self.aggregator_options)
            f = options.pop("f", self.byzantine)  # the ranks it tolerates, as the hook takes it
            get_aggregator(self.aggregator or "mean", n=world, f=f, **options)
            if self.attack is not None:
                get_attack(self.attack, n=world, f=self.byzantine, **self.attack_options)

    def hook_arguments(self) -> tuple[float | None, dict[str, Any]]:
        """(density, options) for :func:`sparsetrain.register_ddp_hook` with this run's
        compressor: the sync fields and the compressor's own options."""
        options = self.effective_compressor_options()
        density = options.pop("density", None)
        return density, {
            "error_feedback": self.error_feedback, "collective": self.collective,
            "collective_options": self.collective_options,
            "auto_candidates": self.auto_candidates, "auto_network": self.auto_network,
            "dense_warmup_steps": self.dense_warmup_steps, "on_nonfinite": self.on_nonfinite,
            "aggregator": self.aggregator, "aggregator_options": self.aggregator_options,
            "attack": self.attack, "attack_options": self.attack_options,
            "byzantine": self.byzantine,
            "momentum_correction": self.momentum if self.momentum_correction else 0.0,
            **options,
        }  # fmt: skip

    def sync_config(self) -> SyncConfig:
        """The gradient-sync configuration the DDP hook of this run gets."""
        return make_config(self.compressor, *self.hook_arguments())

    @property
    def name(self) -> str:
        """The run's label in reports and plots."""
        return self.label or self.compressor

    def effective_compressor_options(self) -> dict[str, Any]:
        """Return the compressor's options with ``density`` added where the compressor takes it."""
        options = dict(self.compressor_options)
        if self.density is not None and "density" in option_names(self.compressor):
            options.setdefault("density", self.density)
        return options

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as JSON-ready values, density as actually used: the
        compressor's default where none was given, None where the compressor takes none."""
        out = plain(asdict(self))
        out["density"] = None
        if "density" in option_names(self.compressor):
            options = self.effective_compressor_options()
            out["density"] = plain(get_compressor(self.compressor, **options).density)
        return out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- data -------------------------------------------------------------------------------------


def shard_indices(
    num_examples: int, rank: int, world: int, seed: int, epoch: int, start: int = 0
) -> torch.Tensor:
    """Return this rank's training indices for ``epoch``: disjoint shards of equal length.

    The order is a permutation drawn from a generator seeded by ``(seed, epoch)``, padded by
    wrapping around to a multiple of ``world`` (as many times as it takes, where there are
    fewer examples than ranks, as DistributedSampler does); rank ``r`` takes positions
    ``r, r + world, ...``. With ``start``, the permutation's first ``start`` examples are left
    out before it is padded and dealt (the rest of an epoch that a run of another number of
    ranks began: see :class:`_Plan`).
    """
    # Modulo 2**64, what manual_seed takes: the same for any seed below 2**64 / 1_000_003,
    # where a larger one (TrainConfig takes seeds up to 2**63) overflowed in every worker.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    perm = torch.randperm(num_examples, generator=gen)[start:]
    total = _ceil_div(len(perm), world) * world
    if total > len(perm):
        perm = perm.repeat(_ceil_div(total, len(perm)))[:total]
    return perm[rank::world]


class _Plan:
    """A run's steps: which examples each step trains on, and how far through its epochs and
    its learning-rate schedule a step is.

    Without a ``layout`` (a run that started at step 0 on its number of ranks): every epoch
    takes ``ceil(ceil(examples / world) / batch_size)`` steps over :func:`shard_indices`.

    A run resumed on another number of ranks starts from a ``layout``: at step ``step`` of the
    run it continues, in ``epoch``, the permutation's first ``offset`` examples were trained on
    by the old ranks, the schedule was ``progress`` (0 to 1) of the way through and the curves
    had counted ``epochs`` (:meth:`resumed_on` makes one). It deals
    the rest of that epoch over its own ranks (``shard_indices(..., start=offset)``), so every
    example is still trained on once an epoch; later epochs are whole. Its step counter goes on
    from ``step``, and its schedule goes from ``progress`` to 1 over the steps it has left.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        epochs: int,
        world: int,
        layout: dict[str, Any] | None = None,
    ):
        self.num_examples, self.batch_size, self.world = num_examples, batch_size, world
        self.layout = layout
        self.steps_per_epoch = _ceil_div(_ceil_div(num_examples, world), batch_size)
        if layout is None:
            self.planned = self.steps_per_epoch * epochs
            return
        self.base, self.epoch0 = int(layout["step"]), int(layout["epoch"])
        self.offset, self.progress0 = int(layout["offset"]), float(layout["progress"])
        # The steps that finish the epoch the layout starts in.
        self.first = _ceil_div(_ceil_div(num_examples - self.offset, world), batch_size)
        self.planned = self.base
        if epochs > self.epoch0:
            self.planned += self.first + self.steps_per_epoch * (epochs - self.epoch0 - 1)

    def where(self, step: int) -> tuple[int, int, int]:
        """(epoch, examples of its permutation left out, steps of it already taken) at
        ``step``: the batches of ``step`` on are ``shard_indices(..., epoch, start)`` from
        ``taken * batch_size`` on."""
        if self.layout is None:
            epoch, taken = divmod(step, self.steps_per_epoch)
            return epoch, 0, taken
        if step < self.base + self.first:
            return self.epoch0, self.offset, step - self.base
        epoch, taken = divmod(step - self.base - self.first, self.steps_per_epoch)
        return self.epoch0 + 1 + epoch, 0, taken

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, how many of its permutation's examples the ranks have trained on) after
        ``step`` steps: a prefix of the permutation, whatever the number of ranks."""
        epoch, start, taken = self.where(step)
        return epoch, start + taken * self.batch_size * self.world

    def epochs_done(self, step: int) -> float:
        """Epochs trained after ``step`` steps (the curves' and the report's ``epoch``): steps
        over steps per epoch, and in the epoch a layout starts in, from where the run it
        continues had counted to the epoch's end, so the curves go on without a jump."""
        if self.layout is None:
            return step / self.steps_per_epoch
        if step < self.base + self.first:
            done = float(self.layout.get("epochs", self.epoch0 + self.offset / self.num_examples))
            return done + (step - self.base) / self.first * (self.epoch0 + 1 - done)
        epoch, taken = divmod(step - self.base - self.first, self.steps_per_epoch)
        return self.epoch0 + 1 + epoch + taken / self.steps_per_epoch

    def progress(self, step: int) -> float:
        """How far through the learning-rate schedule ``step`` is, 0 to 1."""
        if self.layout is None:
            return step / self.planned
        if self.planned <= self.base:
            return 1.0
        return self.progress0 + (1.0 - self.progress0) * (step - self.base) / (
            self.planned - self.base
        )

    def resumed_on(self, step: int) -> dict[str, Any]:
        """The layout of a run of another number of ranks that resumes this one at ``step``."""
        epoch, done = self.position(step)
        return {
            "step": step,
            "epoch": epoch,
            "offset": done,
            "progress": self.progress(step),
            "epochs": self.epochs_done(step),
            "from_world": self.world,  # (what the new run's first save replaces)
        }


def _batches(data: Dataset, indices: torch.Tensor, batch_size: int) -> Iterator[tuple]:
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        if isinstance(data, TensorDataset):
            yield tuple(t[idx] for t in data.tensors)
        else:
            yield tuple(default_collate([data[int(i)] for i in idx]))


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, loss_fn, device: torch.device, batch_size: int = 1024
):
    """Return (mean loss, accuracy) of ``model`` on ``data``, in eval mode, without gradients.

    Args:
        model: a classifier returning one row of logits an example.
        data: (input, integer label) pairs; a ``TensorDataset`` is sliced, others collated.
        loss_fn: mean loss of a batch, ``loss_fn(logits, labels)``.
        device: where the model lives; batches are moved there.
        batch_size: examples a forward pass.

    Example:
        >>> loss, acc = evaluate(model, task.test, task.loss_fn, torch.device("cpu"))  # doctest: +SKIP
    """
    n = len(data)
    loss_sum, correct = _evaluate_sums(model, data, loss_fn, device, torch.arange(n), batch_size)
    return loss_sum / n, correct / n


@torch.no_grad()
def _evaluate_sums(
    model: nn.Module,
    data: Dataset,
    loss_fn,
    device: torch.device,
    indices: torch.Tensor,
    batch_size: int = 1024,
    task: Task | None = None,
) -> tuple[float, int]:
    """Return (sum of the losses, number correct) over the examples ``indices`` of ``data``;
    with ``task``, the first batch's logits are checked against its ``num_classes``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in _batches(data, indices, batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        if task is not None:
            check_logits(out, len(y), task)
            task = None
        loss_sum += loss_fn(out, y).double() * len(y)
        correct += (out.argmax(dim=1) == y).sum()
    model.train(was_training)
    return float(loss_sum), int(correct)


# ---- one rank ---------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own random stream, drawn from after the model is built alike on
    every rank (Dropout's masks then differ between ranks, as their data does)."""
    return (seed * 1_000_003 + rank + 1) % 2**63


def _check_gpus(backend: str, ranks_here: int) -> None:
    """NCCL puts one rank on each GPU (two ranks on one GPU fail at its first collective):
    raise, naming what is missing, unless this machine has ``ranks_here`` CUDA devices."""
    if backend != "nccl":
        return
    if not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA devices; use backend 'gloo' on CPU")
    count = torch.cuda.device_count()
    if ranks_here > count:
        raise ValueError(
            f"backend 'nccl' puts one rank on each GPU: {ranks_here} ranks on this machine "
            f"need {ranks_here} CUDA devices, but it has {count}; start at most {count} "
            "workers a machine, or use backend 'gloo'"
        )


def _device_for(backend: str, rank: int) -> torch.device:
    if backend == "nccl":
        # Under torchrun LOCAL_RANK numbers the ranks on this machine (a launcher that sets
        # only RANK and WORLD_SIZE: the rank modulo the GPUs); spawned, the rank does.
        _check_gpus(backend, 1)
        if not under_torchrun():
            local = rank
        elif "LOCAL_RANK" in os.environ:
            local = int(os.environ["LOCAL_RANK"])
        else:
            local = rank % torch.cuda.device_count()
        _check_gpus(backend, local + 1)
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _checkpoint_path(config: TrainConfig, rank: int) -> Path:
    return Path(config.checkpoint_dir or ".") / config.name / f"rank{rank}.pt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (in the main thread): files written through mkstemp (0600) get the mode
# a plain open() would have given them.
_FILE_MODE = 0o666 & ~_umask()


def _previous_path(path: Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept (``rank<r>.prev.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


_NO_LOCKS = {
    getattr(errno, name)
    for name in ("ENOSYS", "ENOLCK", "EOPNOTSUPP", "ENOTSUP")
    if hasattr(errno, name)
}


@contextmanager
def _checkpoints_locked(config: TrainConfig, rank: int) -> Iterator[None]:
    """Hold a lock on this rank's checkpoint for the run: a second run given the same
    checkpoint folder and label is refused instead of replacing the first one's files."""
    if not config.checkpoint_dir:
        yield
        return
    try:
        import fcntl
    except ImportError:  # no advisory locks here (Windows): run unlocked
        yield
        return
    path = _checkpoint_path(config, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:  # a usage error as the other conflicts are (exit status 2)
            raise CheckpointConflict(
                f"another run is using the checkpoints in {path.parent} (rank {rank}'s lock "
                f"{path.with_suffix('.lock').name} is held): give this run another "
                "--checkpoint-dir (or TrainConfig label)"
            ) from None
        except OSError as e:  # a file system without locks (Lustre without -o flock, some NFS)
            if e.errno not in _NO_LOCKS:
                raise
            locked = False
            if rank == 0:
                warnings.warn(
                    f"cannot lock the checkpoints in {path.parent} ({e.strerror}): two runs "
                    "given this folder and label would overwrite each other's",
                    stacklevel=2,
                )
        if locked:  # what a save killed half way left (no other run is writing here)
            for stale in path.parent.glob(f"{path.stem}.*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _no_checkpoint_note(folder: Path) -> str:
    """What a run asked to resume says when it finds no checkpoint and starts at step 0 (as
    a job restarted with --resume before its first save should): where it looked, and the
    runs that do have checkpoints there (the folder is named after the run's label)."""
    others = sorted(
        p.parent.name for p in folder.parent.glob("*/rank0.pt") if p.parent.name != folder.name
    )
    note = f"{folder.name}: no checkpoint in {folder} to resume from; starting at step 0"
    if others:
        note += (
            f" (checkpoints of other runs are there: {', '.join(others)};"
            " a run's folder is its label, which the command line takes from --compressor)"
        )
    return note


def _past_the_end_note(config: TrainConfig, step: int, total_steps: int) -> str:
    """What a run resumed from a checkpoint past its own end (a lower max_steps, or fewer
    epochs) says: it trains nothing, and its report is the checkpoint's steps and numbers."""
    limit = (
        f"max_steps {config.max_steps} (--max-steps)"
        if config.max_steps and total_steps == config.max_steps
        else f"{config.epochs} epochs ({total_steps} steps)"
    )
    return (
        f"{config.name}: the checkpoint is at step {step}, past this run's end at {limit}; "
        "nothing is trained, and the report is the checkpoint's (raise the limit to train on)"
    )


def _replace_whole(path: Path, write: Callable[[Any], Any], keep: Path | None = None) -> None:
    """Write a file with ``write(binary file)`` under a temporary name of its own in ``path``'s
    folder (``<stem>.*.tmp``), flushed to disk, with the mode ``open()`` would give it, then
    rename it to ``path``, first renaming the file there to ``keep`` when given: ``path`` is
    never half-written, and a failure leaves it as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` whole, keeping the checkpoint it replaces as
    ``rank<r>.prev.pt``: the ranks replace their files one after the other, and a run killed in
    between resumes from the step every rank still has (:func:`_agreed_checkpoint`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_whole(path, lambda fh: torch.save(payload, fh), keep=_previous_path(path))


def _broadcast_from_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's, in one broadcast a dtype (DDP coalesces the same
    way), not one a tensor."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, 0)
        for t, part in zip(group, torch.split(flat, [t.numel() for t in group])):
            t.copy_(part.view_as(t))


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), by rank."""
    rows = [
        torch.zeros(len(values), dtype=torch.int64, device=device)
        for _ in range(dist.get_world_size())
    ]
    dist.all_gather(rows, torch.tensor(values, dtype=torch.int64, device=device))
    return [r.tolist() for r in rows]


_CHECKPOINT_NAME = re.compile(r"rank\d+(\.prev)?\.pt")


def _refuse_overwriting(ckpt: Path, rank: int, device: torch.device) -> None:
    """Raise on every rank if the checkpoint folder of a run started without ``resume`` holds
    an earlier run's checkpoints (on any rank): its saves would replace them."""
    folder = ckpt.parent
    if rank == 0:  # every rank's, where the folder is shared (and an old larger run's)
        found = sorted(
            p.name for p in folder.glob("rank*.pt") if _CHECKPOINT_NAME.fullmatch(p.name)
        )
    else:
        found = [p.name for p in (ckpt, _previous_path(ckpt)) if p.exists()]
    counts = [row[0] for row in _gather_ints([len(found)], device)]
    if not any(counts):
        return
    holders = [r for r, n in enumerate(counts) if n]
    who = f"rank {holders[0]}" if len(holders) == 1 else f"ranks {holders}"
    raise CheckpointConflict(
        f"{folder} holds the checkpoints of an earlier run (rank<r>.pt or rank<r>.prev.pt, seen "
        f"by {who}), which this run would overwrite: pass --resume (TrainConfig(resume=True)) "
        "to continue it, or move them away or give this run another --checkpoint-dir (or "
        "TrainConfig label) to start over"
    )


def _checkpoint_problem(
    config: TrainConfig, state: dict[str, Any] | None, path: Path | None, world: int | None
) -> str | None:
    """What makes ``state`` (loaded from ``path``) unfit for this run to resume, or None;
    ``world``: the number of ranks that must have written it (None: any, checked apart)."""
    if state is None:
        return None
    # Checkpoints written before bucket_cap_mb existed ran DDP's default buckets (25 MB,
    # whatever TrainConfig's default becomes).
    # Nor momentum correction.
    # Nor runs without DDP, nor collective options.
    saved = {
        "amp": None,  # nor mixed precision
        "init_loss_scale": 2.0**16,
        "bucket_cap_mb": 25.0,
        "momentum_correction": False,
        "ddp": True,
        "collective_options": {},
        "auto_candidates": None,
        "auto_network": None,
        **state.get("config", {}),
    }
    if config.schedule == "cosine":  # checkpoints from before epochs was checked
        saved.setdefault("epochs", config.epochs)
    now = _resumable(config)
    for fields in (saved, now):  # the first loss scale matters only to an fp16 run
        if fields.get("amp") != "fp16":
            fields.pop("init_loss_scale", None)
        fields.pop("workers", None)  # the ranks that wrote it are checked on their own
        _density_used(fields)
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if state.get("format") != _CHECKPOINT_FORMAT:
        return (
            f"checkpoint {path} has format {state.get('format')!r}; this sparsetrain reads "
            f"format {_CHECKPOINT_FORMAT}"
        )
    if _saved_world(state) < 0:
        return f"checkpoint {path} does not say how many ranks wrote it"
    if world is not None and state["world"] != world:
        return f"checkpoint {path} was written by {state['world']} ranks, not {world}"
    if differ:
        hint = ""
        if differ == ["epochs"] and config.schedule == "cosine":
            hint = (
                " (the cosine schedule's learning rate follows the number of epochs; with "
                "--schedule constant they may change on resuming)"
            )
        return _Conflict(
            f"checkpoint {path} was written by a different configuration: "
            + ", ".join(f"{k} {saved.get(k)!r} there, {now.get(k)!r} here" for k in differ)
            + hint
        )
    return None


def _density_used(fields: dict[str, Any]) -> None:
    """Put in ``fields`` (a checkpoint's recorded configuration) the density its compressor
    uses where none was given, its default: ``--density 0.01`` spelled out is the same run as
    topk's default 0.01, and a checkpoint of one resumes the other."""
    name, options = fields.get("compressor"), fields.get("compressor_options") or {}
    if fields.get("density") is not None or not isinstance(name, str):
        return
    try:
        if "density" in option_names(name) and isinstance(options, dict):
            fields["density"] = plain(get_compressor(name, **options).density)
    except (TypeError, ValueError):  # another sparsetrain's compressor: compared as recorded
        pass


def _gather_checked(
    values: list[int], problem: str | None, device: torch.device
) -> list[list[int]]:
    """Every rank's ``values``, after raising on every rank if some rank's checkpoint has a
    ``problem`` (its own message there, a pointer to it elsewhere)."""
    table = _gather_ints([*values, int(problem is not None)], device)
    if problem is not None:
        raise (CheckpointConflict if isinstance(problem, _Conflict) else ValueError)(str(problem))
    bad = [r for r, row in enumerate(table) if row[-1]]
    if bad:
        raise PeerError(f"rank(s) {bad} cannot resume from their checkpoints (see their errors)")
    return [row[:-1] for row in table]


def _saved_world(state: dict[str, Any] | None) -> int:
    """How many ranks wrote a checkpoint; -1 for none, or where it does not say."""
    world = None if state is None else state.get("world")
    return operator.index(world) if is_integer(world, 1) else -1


_UNREADABLE = -2  # a step _slot_info gives a file that is there but cannot be read


def _read_checkpoint(path: Path, device: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the checkpoint at ``path``, None), or (None, why it cannot be resumed from): any failure
    to read it is named, so that every rank can learn of it instead of waiting."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to read it: named, on every rank
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None, f"checkpoint {path} cannot be read ({cause.rstrip(': ')})"
    if not isinstance(state, dict) or not is_integer(state.get("step"), 0):
        return None, f"{path} is not a sparsetrain checkpoint (no step in it)"
    return state, None


def _slot_info(path: Path) -> list[int]:
    """What a rank's checkpoint files say, read without their tensors (mapped): [step, ranks
    that wrote it, the same two for the file kept before it, and for a run resumed on another
    number of ranks the ranks and the step of the run it carried over (its layout)]. -1 for
    none; a step of -2 for a file that cannot be read (the load that follows names it)."""
    out: list[int] = []
    carried = [-1, -1]
    for file in (path, _previous_path(path)):
        if not file.exists():
            out += [-1, -1]
            continue
        state = None
        for mmap in (True, False):  # (a file not in torch's zip format cannot be mapped)
            try:
                state = torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
                break
            except Exception:  # noqa: BLE001 - unreadable: marked, and named later
                continue
        ok = isinstance(state, dict) and is_integer(state.get("step"), 0)
        out += [int(state["step"]), _saved_world(state)] if ok else [_UNREADABLE, -1]  # type: ignore[index]
        if file == path:
            layout = state.get("layout") if ok else None  # type: ignore[union-attr]
            source = layout.get("from_world") if isinstance(layout, dict) else None
            carried = [source, layout["step"]] if is_integer(source, 1) else [-1, -1]  # type: ignore[index]
    return out + carried


def _repair_actions(slots: dict[int, list[int]]) -> dict[int, str]:
    """What to do with the ranks' checkpoint files so that they are one run's, from
    ``slots``: {rank: :func:`_slot_info` of its files}.

    A run resumed on another number of ranks records in its checkpoints the ranks and the step
    of the run it carried over. Its first save writes its files over that run's, each rank its
    own, at the same time (keeping each old file as ``rank<r>.prev.pt``). Stopped before every
    rank had, the new files are set aside (``rank<r>.unfinished.pt``) and the old ones put back
    ("restore"; "drop" for a rank the old run did not have), so the run resumes from the old
    run's files again. Once every rank has saved, the old run's files that are left go (right
    after that save, and at a resume where the run was stopped before): "stale", the files of a
    rank past the new run's last, and "drop_prev", a kept file of the old run.

    Only files that are exactly the old run's (its ranks and step) are touched, and only when
    undoing leaves that run whole. Nothing to do (empty) where the files are one run's (also
    one stopped between its ranks' saves, which :func:`_agreed_checkpoint` resolves), where
    some file cannot be read, or where the newest files do not say what they carried over
    (another run's, say)."""
    if any(_UNREADABLE in (v[0], v[2]) for v in slots.values()):
        return {}
    latest = {q: (v[1], v[0]) for q, v in slots.items() if v[0] >= 0 and v[1] > 0}
    if not latest:
        return {}
    newest = max(step for _, step in latest.values())
    saved = {q for q, (_, step) in latest.items() if step == newest}
    keys = {(latest[q], tuple(slots[q][4:6])) for q in saved}
    if len(keys) != 1:
        return {}
    (new_world, _), old = keys.pop()
    if old[0] <= 0 or old[0] == new_world:  # not the first run on these ranks after a reshard
        return {}

    def kept(q: int) -> tuple[int, int]:
        return slots[q][3], slots[q][2]

    def old_runs(q: int) -> bool:  # the old run's file is this rank's (or kept, mid-rename)
        v = slots.get(q, [-1] * 6)
        return (v[1], v[0]) == old or (v[0] == -1 and (v[3], v[2]) == old)

    if saved == set(range(new_world)):  # every rank of the newest run saved
        actions = {}
        for q in slots:
            if q in saved and kept(q) == old:
                actions[q] = "drop_prev"
            elif q >= new_world and old_runs(q):
                actions[q] = "stale"
        return actions
    if any(kept(q) not in (old, (-1, -1)) or (kept(q) != old and q < old[0]) for q in saved):
        return {}
    if not all(q in saved or old_runs(q) for q in range(old[0])):
        return {}  # undone, it would not leave the old run whole
    return {q: "restore" if kept(q) == old else "drop" for q in sorted(saved)}


def _set_aside(path: Path) -> Path:
    """Rename ``path`` (rank<r>.pt) to rank<r>.unfinished.pt, out of the checkpoints' way; to
    rank<r>.unfinished.1.pt and on where that is taken (by a file set aside before)."""
    aside = path.with_name(f"{path.stem}.unfinished{path.suffix}")
    number = 0
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.stem}.unfinished.{number}{path.suffix}")
    os.replace(path, aside)
    return aside


def _repair_checkpoints(ckpt: Path, rank: int, world: int, device: torch.device) -> None:
    """Carry out :func:`_repair_actions` on the ranks' checkpoint files (at a resume, before any
    rank reads them; and after the first save of a resharded run): rank ``r`` on its own files,
    rank 0 on those of ranks past this run's last (which only a folder every rank sees holds,
    as resuming on another number of ranks needs)."""
    width = 6
    extra: list[list[int]] = []
    if rank == 0:
        found = set()
        for path in ckpt.parent.glob("rank*.pt"):
            match = re.fullmatch(r"rank(\d+)(?:\.prev)?\.pt", path.name)
            if match and int(match[1]) >= world:
                found.add(int(match[1]))
        extra = [[q, *_slot_info(ckpt.with_name(f"rank{q}.pt"))] for q in sorted(found)]
    rows = _gather_ints([*_slot_info(ckpt), len(extra)], device)
    slots = {q: row[:width] for q, row in enumerate(rows)}
    if rows[0][width]:
        shape = (rows[0][width], width + 1)
        table = torch.tensor(extra, dtype=torch.int64, device=device) if extra else None
        if table is None:
            table = torch.zeros(shape, dtype=torch.int64, device=device)
        if world > 1:
            dist.broadcast(table, 0)
        slots.update({row[0]: row[1:] for row in table.tolist()})
    actions = _repair_actions(slots)
    if not actions:
        return
    for q, action in actions.items():
        if q != rank and not (rank == 0 and q >= world):
            continue
        path = ckpt.with_name(f"rank{q}.pt")
        if action in ("restore", "drop"):
            _set_aside(path)
            if action == "restore":
                os.replace(_previous_path(path), path)
        elif action == "stale":
            path.unlink(missing_ok=True)
            _previous_path(path).unlink(missing_ok=True)
            if q >= world:  # an old rank past the new last one: its lock file too
                path.with_suffix(".lock").unlink(missing_ok=True)
        else:  # "drop_prev"
            _previous_path(path).unlink(missing_ok=True)
    dist.barrier()
    if rank == 0:
        undone = [q for q, a in actions.items() if a in ("restore", "drop")]
        if undone:
            step, ranks = slots[undone[0]][:2]
            lacking = [q for q in range(ranks) if slots.get(q, [-1])[:2] != [step, ranks]]
            why = (
                f"the first save of a run resumed on another number of ranks did not finish on "
                f"every rank (ranks {lacking} have no file of its step {step}: stopped before "
                f"they saved, or lost): ranks {undone}'s files of it were set aside "
                "(rank<r>.unfinished.pt), to resume from the run before it"
            )
        else:
            why = (
                "removed the files of the run before the last one, which it replaced: ranks "
                f"{sorted(actions)}"
            )
        print(f"{ckpt.parent.name}: {why}", file=sys.stderr, flush=True)


def _agreed_checkpoint(
    config: TrainConfig, ckpt: Path, rank: int, world: int, device: torch.device
) -> dict[str, Any] | None:
    """Load this rank's checkpoint if it can be resumed, after every rank agrees that all of them
    resume from the same step (or all start over): otherwise an error on every rank, where ranks
    resuming from different steps would deadlock.

    A run stopped between two ranks' saves leaves some ranks a save ahead: every rank then
    resumes from the latest step all of them still have, the last checkpoint or the one kept
    before it (``rank<r>.prev.pt``), and drops the step the others lack, so that a second stop
    resumes alike. One stopped during its very first save (one step on some ranks, nothing on
    the others, nothing kept before it) starts over."""
    _repair_checkpoints(ckpt, rank, world, device)
    previous = _previous_path(ckpt)
    unreadable: list[str] = []

    def load(path: Path) -> dict[str, Any] | None:
        """The checkpoint at ``path``; None, its problem noted, where it cannot be read (the
        others learn of it in the gather that follows instead of waiting there)."""
        state, problem = _read_checkpoint(path, device)
        if problem is not None:
            unreadable.append(problem)
        return state

    def problem(
        state: dict[str, Any] | None, where: Path | None, world: int | None = world
    ) -> str | None:
        if not unreadable:
            return _checkpoint_problem(config, state, where, world)
        if where == ckpt and previous.exists():
            remedy = f"move it away to resume from the one kept before it, {previous.name}"
        else:
            remedy = f"remove the checkpoints in {ckpt.parent} to start over"
        return f"{unreadable.pop()}; restore it, or {remedy}"

    state, where = None, None
    if ckpt.exists():
        state, where = load(ckpt), ckpt
    elif previous.exists():  # stopped between its save's two renames
        state, where = load(previous), previous
    step = -1 if state is None else int(state["step"])
    rows = _gather_checked([step, _saved_world(state)], problem(state, where, None), device)
    steps = [row[0] for row in rows]
    worlds = {row[1] for row in rows if row[1] > 0}
    if len(worlds) > 1:
        _refuse_mixed_worlds(ckpt, where, [row[1] for row in rows], rank, world)
    if worlds and worlds != {world}:  # written by another number of ranks
        return _resharded_checkpoint(config, ckpt, rank, world, worlds.pop(), device)
    if set(steps) == {-1}:
        if rank == 0:
            print(_no_checkpoint_note(ckpt.parent), file=sys.stderr, flush=True)
        return None
    if len(set(steps)) == 1:
        if rank == 0:  # (a job restarted by a scheduler says where it picked up)
            print(
                f"{ckpt.parent.name}: resuming from step {steps[0]} of the checkpoint in "
                f"{ckpt.parent}",
                file=sys.stderr,
                flush=True,
            )
        return state
    # A save some ranks finished and others did not: the checkpoint each kept before it.
    earlier = load(previous) if where == ckpt and previous.exists() else None
    kept = _gather_checked(
        [-1 if earlier is None else int(earlier["step"])], problem(earlier, previous), device
    )
    kept = [row[0] for row in kept]
    common = set.intersection(*({s for s in pair if s >= 0} for pair in zip(steps, kept)))
    if common:
        target = max(common)
        note = f"resuming from step {target}, which every rank has"
    elif -1 in steps and len(set(steps) - {-1}) == 1 and all(s < 0 for s in kept):
        target = -1
        note = "the first was not written on every rank; starting at step 0"
    else:
        where_text = ", ".join(
            f"rank {r}: {'no checkpoint' if s < 0 else f'step {s}'}" for r, s in enumerate(steps)
        )
        raise ValueError(
            f"the ranks' checkpoints disagree ({where_text}); every rank must resume from the "
            f"same step: remove the checkpoints in {ckpt.parent} to start over"
        )
    if rank == 0:
        print(
            f"{ckpt.parent.name}: the ranks' last checkpoints are from different steps (a run "
            f"stopped between their saves); {note}",
            file=sys.stderr,
            flush=True,
        )
    # Every rank has agreed: drop what no other rank has, so the next save keeps the target.
    if earlier is not None and int(earlier["step"]) == target:
        os.replace(previous, ckpt)
        return earlier
    if step != target:  # (only in a start-over: a first save the others never finished)
        if where is not None:  # set aside, not removed: a file lost elsewhere looks the same
            print(
                f"{ckpt.parent.name}: rank {rank}'s {where.name} moved to {_set_aside(where).name}",
                file=sys.stderr,
                flush=True,
            )
        return None
    return state


def _refuse_mixed_worlds(
    ckpt: Path, where: Path | None, saved: list[int], rank: int, world: int
) -> None:
    """Raise on every rank: the ranks' checkpoints were written by runs of different numbers
    of ranks (``saved``: by rank, -1 for none). Where some were written by as many ranks as
    this run has, the others are named as the cause on their own ranks."""
    by_world: dict[int, list[int]] = {}
    for r, w in enumerate(saved):
        if w > 0:
            by_world.setdefault(w, []).append(r)
    listed = "; ".join(f"ranks {ranks} by {w} ranks" for w, ranks in sorted(by_world.items()))
    if world in by_world and saved[rank] in (-1, world):
        bad = sorted(r for r, w in enumerate(saved) if w not in (-1, world))
        raise PeerError(f"rank(s) {bad} cannot resume from their checkpoints (see their errors)")
    head = (
        f"checkpoint {where} was written by {saved[rank]} ranks, and the ranks' checkpoints "
        f"in {ckpt.parent} by runs of different sizes ({listed})"
    )
    raise ValueError(
        f"{head}. A run resumed on another number of ranks that stopped during its first "
        "save leaves this: move each rank<r>.prev.pt of the ranks that saved over its "
        f"rank<r>.pt to resume from the run before it, or remove the checkpoints to start over"
    )


def _resharded_checkpoint(
    config: TrainConfig, ckpt: Path, rank: int, world: int, old_world: int, device: torch.device
) -> dict[str, Any]:
    """The checkpoint of a run of ``old_world`` ranks, for rank ``rank`` of ``world``.

    Each rank reads the old ranks' files that :func:`sparsetrain.reshard_sources` names, and
    old rank 0's: the model, the optimizer, the loss scaler, the curves and the step are old
    rank 0's (every rank holds the same), the hook's state is
    :func:`sparsetrain.reshard_state` of the old ranks' states (error feedback keeps the update
    the model has yet to receive), and the training-loss sums since the last record are spread
    over the new ranks with the same weights, so their sum is kept. Every old rank's file must
    be at the same step; where a run stopped between two ranks' saves, the latest step every
    old rank still has is taken, as on as many ranks. Any problem is an error on every rank.

    The result says ``world``: ``old_world``; the caller plans the rest of the data order from
    it (:class:`_Plan`)."""
    from .sync.reshard import _weights, reshard_state

    weights = {q: float(w) * old_world / world for q, w in _weights(old_world, rank, world)}
    sources = sorted(weights.keys() | {0})
    folder = ckpt.parent
    needs = (
        f"resuming a run of {_ranks(old_world)} on {world} needs the old ranks' files in "
        f"{folder} (rank {rank} reads those of old ranks {sources})"
    )
    problems: list[str] = []

    def load(path: Path) -> dict[str, Any] | None:
        state, problem = _read_checkpoint(path, "cpu")
        if problem is not None and "cannot be read" in problem:
            problem += f"; {needs}"
        problem = problem or _checkpoint_problem(config, state, path, old_world)
        if problem is not None:
            problems.append(problem)
            return None
        return state

    loaded: dict[int, tuple[Path, dict[str, Any]]] = {}
    for q in sources:
        path = ckpt.with_name(f"rank{q}.pt")
        if not path.exists() and _previous_path(path).exists():  # between its save's renames
            path = _previous_path(path)
        if not path.exists():
            problems.append(f"checkpoint {path} is missing: {needs}")
            continue
        state = load(path)
        if state is not None:
            loaded[q] = (path, state)
    steps = [int(state["step"]) for _, state in loaded.values()] or [0]
    rows = _gather_checked([min(steps), max(steps)], problems[0] if problems else None, device)
    target = min(row[0] for row in rows)
    behind = any(row[1] != target for row in rows)
    if behind:
        # A save some old ranks finished and others did not: the one each kept before it.
        for q, (path, state) in list(loaded.items()):
            if int(state["step"]) == target:
                continue
            earlier = _previous_path(path)
            kept = None
            if not path.stem.endswith(".prev") and earlier.exists():
                kept = load(earlier)
            if kept is not None and int(kept["step"]) == target:
                loaded[q] = (earlier, kept)
            elif not problems:
                problems.append(
                    f"the old ranks' checkpoints in {folder} have no step in common (old rank "
                    f"{q}: step {state['step']}, and step {target} on another); remove them "
                    "to start over"
                )
        _gather_checked([], problems[0] if problems else None, device)
        if rank == 0:
            print(
                f"{folder.name}: the old ranks' last checkpoints are from different steps (a "
                f"run stopped between their saves); resuming from step {target}, which every "
                "rank has",
                file=sys.stderr,
                flush=True,
            )
    base = loaded[0][1]
    out = {k: base[k] for k in ("step", "elapsed", "eval_seconds", "curves", "end_record",
                                "model", "optimizer", "scaler", "layout") if k in base}  # fmt: skip
    out["world"] = old_world
    for key in ("loss_sum", "loss_count"):
        out[key] = sum(w * float(loaded[q][1].get(key, 0.0)) for q, w in weights.items())
    problem = None
    if config.native_ddp:  # plain DDP's counters, the same on every rank
        out["hook"] = base["hook"]
    else:
        try:
            with warnings.catch_warnings():
                if rank != 0:  # momentum correction's, once
                    warnings.simplefilter("ignore")
                out["hook"] = reshard_state(
                    {q: state["hook"] for q, (_, state) in loaded.items()}, rank, world
                )
        except (TypeError, ValueError) as e:
            problem = f"the hook's state in {folder} cannot be carried to {world} ranks: {e}"
            if "reset_robust" in str(e):  # an option of reshard_state, not of the trainer
                problem = (
                    f"the hook's state in {folder} holds the robust aggregator's (or attack's) "
                    f"state, which is about the {old_world} workers that saved it: resume on "
                    f"{old_world} workers, or remove the checkpoints to start over"
                )
    _gather_checked([], problem, device)
    if behind:
        # As on as many ranks, the step some old ranks are ahead at goes, so that the old run's
        # files are all at the step carried over when this run's first save keeps them as
        # rank<r>.prev.pt (undone, that save puts back this step's files). By rank 0, which
        # sees every old rank's file (resharding reads them), once every rank has loaded them.
        if rank == 0:
            for q in range(old_world):
                path = ckpt.with_name(f"rank{q}.pt")
                info = _slot_info(path)
                if info[0] != target and info[2] == target:
                    os.replace(_previous_path(path), path)
        dist.barrier()
    if rank == 0:
        print(
            f"{folder.name}: resuming a run of {_ranks(old_world)} at step {target} on "
            f"{_ranks(world)} (the rest of its epoch is dealt over these ranks; error "
            "feedback's residuals are carried over by sparsetrain.reshard_state)",
            file=sys.stderr,
            flush=True,
        )
    return out


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def sgd(params: Any, fused: bool = True, **options: Any) -> torch.optim.SGD:
    """Return ``torch.optim.SGD(params, **options)``, fused where this torch and the parameters'
    device have a fused SGD: one pass over each parameter, its gradient and its momentum instead
    of three. It computes the same update, rounded differently in the last bit now and then (a
    fused multiply-add). Without a fused kernel, or with ``fused=False``, the default
    implementation.

    Not fused with a ``torch.amp.GradScaler``: the scaler hands a fused SGD its overflow check
    instead of skipping the step itself, and torch 2.13's fused SGD allocates its momentum
    buffers uninitialised on its first call and leaves them so when that step is skipped, as a
    scaler's first steps often are; the first step it applies then adds leftover memory to the
    weights."""
    params = list(params)
    if not fused:
        return torch.optim.SGD(params, **options)
    try:
        return torch.optim.SGD(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.SGD(params, **options)


def train_worker(rank: int, world: int, config: TrainConfig) -> dict[str, Any]:
    """Run one training run on this rank; the default process group must be initialised.

    Args:
        rank: this process's rank.
        world: the number of ranks.
        config: the run.

    Returns:
        The run's entry of the report (see :func:`launch`). Counters are averaged over the
        ranks and so are the same on every rank, and so are the test metrics (each rank
        evaluates every ``world``-th test example and the sums are all-reduced).
    """
    if config.reuse_host_memory:  # done already where launch() started this process
        reuse_freed_memory()
    device = _device_for(config.backend, rank)
    task: Task = get_task(config.task, seed=config.seed, **config.task_options)
    torch.manual_seed(config.seed)
    module = task.build_model().to(device)
    # From here each rank draws its own random numbers (Dropout's masks): the model is the same
    # on every rank (built after the same seed, and rank 0's is broadcast), but with one stream
    # every rank drew the same masks, and their noise was not averaged over the ranks.
    torch.manual_seed(rank_seed(config.seed, rank))
    if config.reuse_host_memory and device.type == "cpu":
        # Memory for the first steps' new tensors, faulted in now rather than in those steps
        # (sparsetrain.hostmem.reserve): ten times the parameters' bytes, which on the
        # end-to-end benchmark's model left no page to fault in after the first step, where
        # three times did not. Before the DDP wrap, because DDP allocates its buckets there
        # without writing them: reserved after it, each rank's first step faulted in the
        # 39 MB bucket (9,700 pages, 0.86 s against 0.22 s).
        reserve(10 * sum(p.numel() * p.element_size() for p in module.parameters()))
    sync: GradientSync | None = None
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.amp)
    # float16 needs its loss scaled so that small gradients do not flush to zero; bfloat16
    # has float32's range and needs no scaler.
    scaler = None
    if config.amp == "fp16":
        scaler = torch.amp.GradScaler(device.type, init_scale=config.init_loss_scale)
    if config.ddp:
        # The gradients are views into DDP's buckets, so the exchanged bucket is the gradient:
        # no copy back into .grad after each exchange (the same values).
        model: nn.Module = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=config.bucket_cap_mb,
            gradient_as_bucket_view=True,
            find_unused_parameters=config.find_unused_parameters,
        )
        if config.native_ddp:
            hook: Any = _NativeDDP(model, world)
        else:
            density, options = config.hook_arguments()
            hook = register_ddp_hook(
                model, config.compressor, density, grad_scaler=scaler, **options
            )
    else:
        model = module
        if world > 1:  # as DDP does when it wraps the model: every rank starts from rank 0's
            _broadcast_from_rank0([p.data for p in module.parameters()] + list(module.buffers()))
        density, options = config.hook_arguments()
        hook = sync = GradientSync(
            module,
            config.compressor,
            density,
            bucket_cap_mb=config.bucket_cap_mb,
            grad_scaler=scaler,
            **options,
        )
    buffers = list(module.buffers())
    # A data attack (label flip) acts in the loss of the Byzantine ranks, the last `byzantine`.
    attack = hook.engine.attack
    flips = attack is not None and attack.flips_labels and rank >= world - config.byzantine
    optimizer = sgd(
        module.parameters(),
        fused=scaler is None,
        lr=config.lr,
        momentum=0.0 if config.momentum_correction else config.momentum,  # then in the hook
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )

    n_train = len(task.train)
    if rank == 0 and config.batch_size > _ceil_div(n_train, world):
        print(
            f"{config.name}: warning: batch_size {config.batch_size} is more than the "
            f"{_ceil_div(n_train, world)} training examples a rank holds ({n_train} over "
            f"{world} ranks): every step takes a rank's whole shard, one step an epoch",
            file=sys.stderr,
            flush=True,
        )
    curves: dict[str, list] = {
        k: [] for k in ("step", "epoch", "wall_seconds", "train_loss", "test_loss", "test_accuracy")
    }
    step, elapsed, eval_seconds = 0, 0.0, 0.0
    ckpt = _checkpoint_path(config, rank)
    state = _agreed_checkpoint(config, ckpt, rank, world, device) if config.resume else None
    layout = None if state is None else state.get("layout")
    # Resumed on another number of ranks: its first save replaces the old run's files.
    resharded = state is not None and state["world"] != world
    if resharded:
        old = _Plan(n_train, config.batch_size, config.epochs, int(state["world"]), layout)
        layout = old.resumed_on(int(state["step"]))
    plan = _Plan(n_train, config.batch_size, config.epochs, world, layout)
    planned_steps = plan.planned
    total_steps = planned_steps
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    def on_grid(step: int) -> bool:
        """Whether ``step`` is one the run evaluates at: every ``eval_every`` steps, or at
        each epoch's end (where a run resumed on another number of ranks ends its epochs)."""
        if config.eval_every:
            return step % config.eval_every == 0
        return plan.where(step)[1:] == (0, 0)

    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        hook.load_state_dict(state["hook"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        if "rng" in state and not resharded:  # (another rank's stream does not follow on)
            # (.cpu(): the checkpoint was loaded onto the rank's device; states are CPU bytes)
            torch.set_rng_state(state["rng"]["cpu"].cpu())
            if device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        step, elapsed, eval_seconds, curves = (
            state["step"],
            state["elapsed"],
            state["eval_seconds"],
            state["curves"],
        )
        if step > total_steps and rank == 0:  # the report is then the checkpoint's, unchanged
            print(_past_the_end_note(config, step, total_steps), file=sys.stderr, flush=True)

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = torch.zeros((), dtype=torch.float64, device=device)
    if state is not None and "loss_sum" in state:  # the training loss since the last record
        loss_sum.fill_(state["loss_sum"])
        loss_count.fill_(state["loss_count"])

    # A record made only because this run stops here (max_steps), not on the eval_every grid:
    # (loss sum, loss count, number of points) just before it. A checkpoint leaves it out, so a
    # resumed run's curves and training-loss averages are those of an uninterrupted run.
    end_only: tuple[float, float, int] | None = None

    def record(epoch_float: float) -> tuple[float, float, int]:
        nonlocal loss_sum, loss_count, eval_seconds
        before = (float(loss_sum), float(loss_count), len(curves["step"]))
        t0 = time.perf_counter()
        # Every rank evaluates every world-th test example, and one allreduce sums the test
        # sums with the training loss: rank 0 alone would take world times as long while the
        # others wait. Buffers (batch-norm statistics) are rank 0's, as DDP's next forward
        # makes them anyway, so the numbers are those of rank 0's model.
        if world > 1:
            _broadcast_from_rank0(buffers)
        shard = torch.arange(rank, len(task.test), world)
        # (With the task: its first batch's logits are checked, at step 0 before any training;
        # a resumed run's model passed when it began.)
        test_sum, test_correct = _evaluate_sums(
            module, task.test, task.loss_fn, device, shard, task=task
        )
        total, count, test_sum, test_correct = _sum_over_ranks(
            [float(loss_sum), float(loss_count), test_sum, float(test_correct)], device
        )
        loss_sum.zero_()
        loss_count.zero_()
        test_loss, test_acc = test_sum / len(task.test), int(test_correct) / len(task.test)
        curves["step"].append(step)
        curves["epoch"].append(round(epoch_float, 4))
        curves["wall_seconds"].append(elapsed + time.perf_counter() - start)
        curves["train_loss"].append(total / count if count else None)
        curves["test_loss"].append(test_loss)
        curves["test_accuracy"].append(test_acc)
        eval_seconds += time.perf_counter() - t0
        return before

    def save() -> None:
        sums, kept, end = (float(loss_sum), float(loss_count)), curves, None
        if end_only is not None:
            sums, kept = end_only[:2], {k: v[: end_only[2]] for k, v in curves.items()}
            end = {k: v[end_only[2] :] for k, v in curves.items()}
        _save_checkpoint(
            ckpt,
            {
                "format": _CHECKPOINT_FORMAT,
                "world": world,
                **({"layout": layout} if layout is not None else {}),
                "config": _resumable(config),
                "step": step,
                "elapsed": elapsed + time.perf_counter() - start,
                "eval_seconds": eval_seconds,
                "curves": kept,
                # The end-only record, for a resume with nothing left to train to report as is.
                **({"end_record": end} if end is not None else {}),
                "loss_sum": sums[0],
                "loss_count": sums[1],
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "hook": hook.state_dict(),
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                # This rank's random stream (Dropout's masks), for a resume to go on with it.
                "rng": {
                    "cpu": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                },
            },
        )

    bar = None
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        # A thread lock for the bar, not tqdm's default multiprocessing one: a semaphore that a
        # worker stopped by Ctrl-C could not release ("leaked semaphore objects" at exit).
        tqdm.set_lock(threading.RLock())
        bar = tqdm(total=total_steps, initial=step, desc=config.name, unit="step", leave=True)

    if device.type == "cpu" and (
        config.compressor == "threshold" or config.collective in ("oktopk", "gtopk", "auto")
    ):  # (the runs that call the native kernel: its compensation, the dropped entries)
        from . import _native

        _native.library()  # built (once a machine) before the clock starts, not in a step
    dist.barrier()
    start = time.perf_counter()
    if step == 0:
        record(0.0)
    model.train()
    while step < total_steps:
        epoch, left_out, taken = plan.where(step)
        order = shard_indices(n_train, rank, world, config.seed, epoch, start=left_out)
        for x, y in _batches(task.train, order[taken * config.batch_size :], config.batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if config.schedule == "cosine":
                # From the planned length, not max_steps: an interrupted run keeps its schedule.
                if layout is None:
                    angle = math.pi * step / planned_steps
                else:
                    angle = math.pi * plan.progress(step)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * 0.5 * (1.0 + math.cos(angle))
            optimizer.zero_grad(set_to_none=True)
            target = attack.flip_labels(y, task.num_classes) if flips else y
            if sync is not None and world > 1:
                _broadcast_from_rank0(buffers)  # as DDP broadcasts them before a forward
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = task.loss_fn(model(x), target)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if sync is not None:
                sync.synchronize()
            if scaler is not None:  # skips a step whose gradients overflowed on any rank
                before = scaler.get_scale() if config.native_ddp else None  # a device sync
                scaler.step(optimizer)
                scaler.update()
                if before is not None and scaler.get_scale() < before:  # lowered: skipped
                    hook.skipped += 1  # plain DDP has no hook to count them
            elif not hook.skipped_last_step:
                optimizer.step()
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach().double(), 0.0)
            loss_count += finite.double()
            step += 1
            if bar is not None:
                bar.update(1)
            if on_grid(step) or step == total_steps:
                before = record(plan.epochs_done(step))
                end_only = None if on_grid(step) else before
                if bar is not None and curves["test_accuracy"][-1] is not None:
                    bar.set_postfix(
                        loss=f"{curves['train_loss'][-1] or float('nan'):.3f}",
                        acc=f"{curves['test_accuracy'][-1]:.3f}",
                    )
            on_checkpoint_grid = (
                step % config.checkpoint_every == 0
                if config.checkpoint_every
                else plan.where(step)[1:] == (0, 0)  # each epoch's end
            )
            if config.checkpoint_dir and (on_checkpoint_grid or step == total_steps):
                save()
                dist.barrier()
                if resharded:  # every rank has saved: what is left of the old run goes
                    _repair_checkpoints(ckpt, rank, world, device)
                    resharded = False
            if step == total_steps:
                break
    if not curves["step"] or curves["step"][-1] != step:
        # Resumed from the end: the point its checkpoint left out, as that run recorded it
        # (evaluated again, on another number of ranks it could differ in the last digits).
        end_record = None if state is None else state.get("end_record")
        if end_record is not None and end_record["step"] == [step]:
            for key, values in end_record.items():
                curves[key].extend(values)
        else:
            record(plan.epochs_done(step))
    wall = elapsed + time.perf_counter() - start
    if bar is not None:
        bar.close()

    stats = hook.stats()
    keys = ("bytes_sent", "dense_bytes", "compress_seconds", "comm_seconds")
    sums = _sum_over_ranks([float(stats.get(k, 0.0)) for k in keys], device)
    mean = {k: v / world for k, v in zip(keys, sums)}
    return {
        "label": config.name,
        "task": config.task,
        "compressor": config.compressor,
        "world_size": world,
        "backend": config.backend,
        "device": str(device.type),
        "final_test_accuracy": curves["test_accuracy"][-1],
        "final_test_loss": curves["test_loss"][-1],
        "final_train_loss": curves["train_loss"][-1],
        "bytes_sent_per_rank": mean["bytes_sent"],
        "dense_bytes_per_rank": mean["dense_bytes"],
        "compression_ratio": mean["dense_bytes"] / mean["bytes_sent"]
        if mean["bytes_sent"]
        else None,
        "steps": step,
        "skipped_steps": int(stats.get("skipped_steps", 0)),
        **({"loss_scale": scaler.get_scale()} if scaler is not None else {}),
        **({"auto_choices": stats["auto_choices"]} if "auto_choices" in stats else {}),
        "epochs": plan.epochs_done(step),
        "wall_seconds": wall,
        "eval_seconds": eval_seconds,
        "compress_seconds_per_rank": mean["compress_seconds"],
        "comm_seconds_per_rank": mean["comm_seconds"],
        "host_memory_reused": reusing_freed_memory(),
        "config": {**config.to_dict(), "workers": world},
        "curves": curves,
    }


class _NativeDDP:
    """What the training loop needs from the hook's state, for plain DDP without a hook: the
    steps (counted at each training forward of the DDP model) and the bytes a ring allreduce of
    the gradients sends."""

    engine = types.SimpleNamespace(attack=None)  # no attack without the hook
    skipped_last_step = False

    def __init__(self, ddp: DistributedDataParallel, world: int):
        from .comm import ring_allreduce_bytes

        self._per_step = sum(
            ring_allreduce_bytes(p.numel(), p.element_size(), world)
            for p in ddp.module.parameters()
            if p.requires_grad
        )
        self._steps = 0
        # Summed a step at a time: a run resumed on another number of ranks sends another
        # number of bytes a step from then on.
        self._sent = 0
        self.skipped = 0  # steps a loss scaler skipped (the loop counts them)
        ddp.register_forward_pre_hook(lambda *_: self._count())

    def _count(self) -> None:
        self._steps += 1
        self._sent += self._per_step

    def stats(self) -> dict[str, Any]:
        sent = float(self._sent)
        return {"bytes_sent": sent, "dense_bytes": sent, "compress_seconds": 0.0,
                "comm_seconds": 0.0, "skipped_steps": self.skipped}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps, "skipped": self.skipped, "bytes": self._sent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state["steps"])
        self._sent = int(state.get("bytes", self._per_step * self._steps))  # (saved before it)
        self.skipped = int(state.get("skipped", 0))


def _resumable(config: TrainConfig) -> dict[str, Any]:
    """The fields that must agree between a checkpoint and the run that resumes from it."""
    # epochs may change (train on from a checkpoint) unless the learning rate follows them.
    free = {"epochs"} if config.schedule == "constant" else set()
    keep = (
        {f.name for f in dataclasses.fields(config)}
        - free
        - {
            "max_steps",
            "resume",
            "progress",
            "checkpoint_every",
            "checkpoint_dir",
            "eval_every",
            "timeout_s",
            "reuse_host_memory",
            "find_unused_parameters",  # (how DDP finds them, not what is trained)
        }
    )
    out = {k: v for k, v in config.to_dict().items() if k in keep}
    # As given, not as used: checkpoints recorded it so before the report resolved defaults.
    out["density"] = plain(config.effective_compressor_options().get("density"))
    return out


# ---- launching ---------------------------------------------------------------------------------


def _run_all(rank: int, world: int, configs: Sequence[TrainConfig]) -> list[dict[str, Any]]:
    # Every run's folder before any run trains: a later run refused after the earlier ones had
    # trained and saved left their checkpoints and no report, and the same command refused then.
    device = _device_for(configs[0].backend, rank)
    for config in configs:
        if config.checkpoint_dir and not config.resume:
            _refuse_overwriting(_checkpoint_path(config, rank), rank, device)
    runs = []
    for config in configs:
        with _checkpoints_locked(config, rank):
            runs.append(train_worker(rank, world, config))
        torch.manual_seed(config.seed)  # the next run starts from the same global state
    return runs


def _name_rank_in_warnings(rank: int) -> None:
    """Show this worker's warnings as "sparsetrain: rank R: Category: message": the file and
    line a library warning points at is the user's call, and a worker has none (it pointed
    into torch's process spawning)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        try:
            print(f"sparsetrain: rank {rank}: {category.__name__}: {message}", file=sys.stderr)
        except OSError:  # (a closed stderr, as warnings.showwarning itself allows)
            pass

    warnings.showwarning = show


def _spawned(
    rank: int,
    world: int,
    configs: Sequence[TrainConfig],
    folder: str,
    launcher: object = None,
) -> None:
    """Entry point of an embedded worker: join the group, train, hand results back as files.
    ``launcher``: a :class:`~sparsetrain._procs.LauncherState` for a worker forked from the fork
    server, which put the launcher's environment and output in place when it was unpickled."""
    torch.set_num_threads(1)  # processes share the machine's cores; oversubscription is slower
    if configs[0].reuse_host_memory:  # before any thread of ours or the process group's starts
        reuse_freed_memory()
    stop_with_parent()
    _name_rank_in_warnings(rank)
    Path(folder, f"started-rank{rank}").touch()  # tells a crash in training from one before it
    failed_at = None
    try:
        store = dist.FileStore(os.path.join(folder, "store"), world)
        dist.init_process_group(
            configs[0].backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=configs[0].timeout_s),
        )
        try:
            runs = _run_all(rank, world, configs)
        except BaseException:
            # The time of the failure, before the process group's teardown: that closes this
            # rank's connections, so a peer's "connection closed" can be caught (and timed)
            # before this error was, and the report named the peer's.
            failed_at = time.time()
            raise
        finally:
            dist.destroy_process_group()
        if rank == 0:
            tmp = os.path.join(folder, "result.json.tmp")
            with open(tmp, "w") as f:
                json.dump(runs, f)
            os.replace(tmp, os.path.join(folder, "result.json"))
    except BaseException as e:
        name, message = worker_error(e)
        error = {
            "rank": rank,
            "type": name,
            "message": message,
            "traceback": traceback.format_exc(),
            "time": time.time() if failed_at is None else failed_at,
            "points_to_another": isinstance(e, PeerError),
        }
        with open(os.path.join(folder, f"error-rank{rank}.json"), "w") as f:
            json.dump(error, f)
        if not isinstance(e, Exception):  # Ctrl-C, a signal's exit: as Python ends them
            raise
        # The error is on disk: skip the interpreter's teardown, where gloo's threads can
        # abort the process ("terminate called without an active exception" on the console).
        exit_finished_worker(1)
    exit_finished_worker(0)  # results are on disk; see exit_finished_worker for why


def _killed_worker(procs: Any, e: BaseException, folder: str) -> WorkerError | None:
    """The worker that ran, then died by a signal without a Python error (killed from outside,
    by the out-of-memory killer, or crashed in native code), or None. It is the cause even where
    its peers' errors are on disk (they lost their connection to it): those used to be reported
    instead. Workers that torch.multiprocessing stopped with SIGTERM itself, after another one
    failed, are not; the one it reports first is, whatever the signal."""
    first = getattr(e, "error_index", -1)
    processes = list(getattr(procs, "processes", None) or ())
    order = ([first] if 0 <= first < len(processes) else []) + [
        i for i in range(len(processes)) if i != first
    ]
    for i in order:
        code = getattr(processes[i], "exitcode", None)
        if not isinstance(code, int) or code >= 0 or (i != first and code == -signal.SIGTERM):
            continue
        if Path(folder, f"error-rank{i}.json").exists():
            continue  # it had a Python error, on disk
        if not Path(folder, f"started-rank{i}").exists():
            continue  # it died before training started: see launch()
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = "killed (out of memory, or from outside) or crashed in native code"
        if code == -signal.SIGKILL and i != first and _peers_timed_out(folder):
            # torch.multiprocessing kills what its SIGTERM did not stop: a rank that hung.
            why = (
                "the other ranks timed out waiting for it, so it hung, was stopped (SIGSTOP) or "
                "ran far slower than they did (then raise --timeout), or was killed"
            )
        return WorkerError(
            i,
            "ProcessExitedException",
            f"process {i} terminated with signal {name} during training, without a Python "
            f"error: {why}",
        )
    return None


def _peers_timed_out(folder: str) -> bool:
    """Whether some worker's error on disk is a collective that timed out."""
    for path in Path(folder).glob("error-rank*.json"):
        try:
            message = str(json.loads(path.read_text()).get("message", ""))
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if _is_timeout(message):
            return True
    return False


def _is_timeout(message: str) -> bool:
    """Whether a worker's error message is a collective that timed out."""
    return "timed out" in message.lower() or "timeout" in message.lower()


def _first_error(folder: str, procs: Any = None) -> WorkerError | None:
    """The first worker error on disk. Where it is a collective that timed out, the ranks that
    were still running without an error when the run stopped (torch.multiprocessing then ends
    them with SIGTERM) are named: the one that hung is among them."""
    errors = []
    for path in Path(folder).glob("error-rank*.json"):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if not errors:
        return None
    # The earliest error is the cause; later ones are usually peers losing their connection.
    # An error that points to another rank's comes after that rank's, whatever the times.
    first = min(errors, key=lambda e: (e.get("points_to_another", False), e["time"], e["rank"]))
    message = str(first["message"])
    if _is_timeout(message):
        stopped = [
            i
            for i, p in enumerate(getattr(procs, "processes", None) or ())
            if getattr(p, "exitcode", None) == -signal.SIGTERM
            and not Path(folder, f"error-rank{i}.json").exists()
        ]
        if stopped:
            message += (
                f" (rank(s) {', '.join(map(str, stopped))} were still running without an "
                "error when the run stopped: a rank that hangs, or runs far slower than the "
                "others, is among them; raise --timeout for a slow one)"
            )
    return WorkerError(first["rank"], first["type"], message, first["traceback"])


def _check_together(configs: Sequence[TrainConfig]) -> None:
    if not configs:
        raise ValueError("launch needs at least one TrainConfig")
    for c in configs:
        if not isinstance(c, TrainConfig):
            raise TypeError(f"launch takes TrainConfig objects, got {type(c).__name__}")
    # reuse_host_memory is set once a process, before its process group starts.
    for attr in ("workers", "backend", "timeout_s", "reuse_host_memory"):
        values = {getattr(c, attr) for c in configs}
        if len(values) > 1:
            raise ValueError(
                f"runs launched together must share {attr}; got {sorted(map(str, values))}"
            )
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"runs launched together need distinct labels; repeated: {dupes} (set label=...)"
        )


def _exit_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (what schedulers and ``timeout`` send) raise SystemExit in the launcher, so
    its clean-up runs (workers stopped, temporary folder removed); return what undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    # SIGHUP too (the terminal the launcher ran in was closed), unless it is ignored, as under
    # nohup, which is there to keep the run going.
    signals = [signal.SIGTERM]
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signals.append(signal.SIGHUP)
    previous = {s: signal.signal(s, handler) for s in signals}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


_LAUNCHER_LOCK = "launcher.lock"


def _launch_folder() -> tuple[str, IO[str] | None]:
    """Make the temporary folder of one launch (its workers' store, markers, errors and result)
    and lock it for as long as this launcher lives; return it with the open lock file.

    A launcher killed outright (SIGKILL, the out-of-memory killer) cannot remove its folder, so
    each launch first removes the folders whose lock no live launcher holds. The lock file is
    locked under a temporary name and then renamed, so no launch sweeps a folder being made.
    """
    _remove_dead_launch_folders()
    folder = tempfile.mkdtemp(prefix="sparsetrain-")
    try:
        import fcntl
    except ImportError:  # no advisory locks here (Windows): such folders are not swept
        return folder, None
    part = os.path.join(folder, f".{_LAUNCHER_LOCK}.part")
    held = open(part, "w")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: leave this folder out of the sweep
        held.close()
        return folder, None
    os.replace(part, os.path.join(folder, _LAUNCHER_LOCK))
    return folder, held


def _remove_dead_launch_folders() -> None:
    """Remove the launch folders (see :func:`_launch_folder`) of launchers that have died."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        locks = list(Path(tempfile.gettempdir()).glob(f"sparsetrain-*/{_LAUNCHER_LOCK}"))
    except OSError:
        return
    for lock in locks:
        try:
            with open(lock, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its launcher is alive
                shutil.rmtree(lock.parent, ignore_errors=True)
        except OSError:  # held, another user's, or gone meanwhile
            continue


def _stop_workers(procs: Any) -> None:
    """Stop the workers still running (the launcher is leaving early: SIGTERM, Ctrl-C)."""
    if procs is None:
        return
    alive = [p for p in procs.processes if p.is_alive()]
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def under_torchrun() -> bool:
    """Return True when this process was started by torchrun (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _main_file() -> str | None:
    """The file ``__main__`` runs, if a real one (None under ``python -c``, from stdin, in a
    notebook or the interactive interpreter): what spawned workers import as their main."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path if path and os.path.isfile(path) else None


def _unimportable_task(name: str) -> str | None:
    """Why the spawned workers cannot find task ``name``, registered in ``__main__`` where that
    is no file they could import (a notebook, ``python -c``, stdin), or None. They failed with
    "unknown task", and a hint to register it at the script's top level, which it was."""
    from . import tasks

    factory = tasks._TASKS.get(name)
    if getattr(factory, "__module__", None) != "__main__" or _main_file() is not None:
        return None
    return (
        f"task {name!r} is registered in code that is not in a file (a notebook, `python -c` "
        "or stdin), which the spawned workers cannot import: put it in a module, a .py file, "
        "and load that with sparsetrain.tasks.add_task_modules(['my_tasks.py']) before "
        "launch(), which passes it to the workers"
    )


@contextlib.contextmanager
def _main_not_a_path():
    """Hide ``__main__.__file__`` while the workers are spawned where it names no file (``<stdin>``
    for a script piped to ``python -``): spawn's workers tried to run that path and died at
    once, as under ``python -c`` (which has no ``__file__``) they do not."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def check_launch(configs: Sequence[TrainConfig]) -> None:
    """Raise ValueError if :func:`launch` cannot start these runs together: they differ in
    what they must share, or (started here, not under torchrun) the backend needs GPUs this
    machine lacks or the workers cannot fit in its free memory (each holds at least
    :data:`~sparsetrain._procs.WORKER_FLOOR_BYTES`, 128 MiB, for Python and PyTorch alone).
    ``launch`` checks this first; commands call it to refuse a run as a usage error."""
    _check_together(configs)
    if not under_torchrun():  # before any worker starts
        for task in dict.fromkeys(c.task for c in configs):
            problem = _unimportable_task(task)
            if problem:
                raise ValueError(problem)
        _check_gpus(configs[0].backend, configs[0].workers)
        chosen_start_method()  # (a value of SPARSETRAIN_START_METHOD it does not know)
        workers = configs[0].workers
        problem = too_many_processes(workers, f"workers={workers}")
        if problem:
            raise ValueError(problem)


def launch(configs: TrainConfig | Sequence[TrainConfig]) -> dict[str, Any]:
    """Train one or several runs data-parallel and return the report.

    Steps: check the runs; under torchrun join its process group (``env://``) and run this rank,
    otherwise spawn ``workers`` processes meeting through a ``FileStore`` in a temporary folder;
    every process runs the runs one after the other (:func:`train_worker`); rank 0's results
    form the report. A failing worker stops all of them and raises :class:`WorkerError`.

    Args:
        configs: one :class:`TrainConfig` or a sequence of them sharing ``workers``,
            ``timeout_s``, ``backend`` and ``reuse_host_memory``, with distinct labels.

    Returns:
        ``{"format", "sparsetrain_version", "created", "world_size", "runs": [...]}`` where every
        run has ``label``, ``compressor``, ``final_test_accuracy``, ``final_test_loss``,
        ``bytes_sent_per_rank``, ``dense_bytes_per_rank``, ``compression_ratio``, ``steps``,
        ``skipped_steps``, ``wall_seconds``, ``config`` and ``curves`` (lists ``step``,
        ``epoch``, ``wall_seconds``, ``train_loss``, ``test_loss``, ``test_accuracy``). Under
        torchrun every rank gets the same report, test metrics included.

    Raises:
        WorkerError: a worker failed; the message names its rank and error.

    Example:
        >>> report = launch(TrainConfig(compressor="topk", density=0.01, workers=2, epochs=1))  # doctest: +SKIP
    """
    configs = [configs] if isinstance(configs, TrainConfig) else list(configs)
    check_launch(configs)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        configs = [dataclasses.replace(c, workers=world) for c in configs]
        if configs[0].reuse_host_memory:  # before the process group's threads start
            reuse_freed_memory()
        created = not dist.is_initialized()
        if created:
            dist.init_process_group(
                configs[0].backend,
                init_method="env://",
                timeout=timedelta(seconds=configs[0].timeout_s),
            )
        try:
            runs = _run_all(rank, world, configs)
        finally:
            if created:
                dist.destroy_process_group()
    else:
        world = configs[0].workers
        folder, held = _launch_folder()
        restore = _exit_on_sigterm()
        procs = None
        # When one worker fails, torch.multiprocessing stops the others and logs a warning for
        # each ahead of the one line that names the failure; that line says it all.
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        spawn_level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        try:
            import torch.multiprocessing as mp

            try:
                with _main_not_a_path():
                    method = worker_start_method()
                    procs = mp.start_processes(
                        _spawned, args=(world, configs, folder, launcher_state(method)),
                        nprocs=world, join=False, start_method=method,
                    )  # fmt: skip
                while not procs.join():
                    pass
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                error = _killed_worker(procs, e, folder) or _first_error(folder, procs)
                if error is not None:
                    raise error from None
                index = getattr(e, "error_index", -1)
                if Path(folder, f"started-rank{index}").exists():
                    # It ran, then exited without a Python error (os._exit, a native exit).
                    raise WorkerError(
                        index,
                        type(e).__name__,
                        f"{e} during training, without a Python error: killed (out of memory, "
                        "or from outside) or crashed in native code",
                    ) from None
                # No error file: the process died before our entry point ran (a script that
                # calls launch() without an `if __name__ == "__main__":` guard is the usual cause).
                raise WorkerError(
                    getattr(e, "error_index", -1),
                    type(e).__name__,
                    f"{e}; it exited before training started (a script that calls launch() must "
                    'guard it with `if __name__ == "__main__":`, because workers re-import it)',
                ) from None
            runs = json.loads(Path(folder, "result.json").read_text())
        finally:
            restore()
            spawn_log.setLevel(spawn_level)
            _stop_workers(procs)
            shutil.rmtree(folder, ignore_errors=True)
            if held is not None:
                held.close()
            for name in getattr(procs, "error_files", None) or ():
                # torch.multiprocessing leaves a failed worker's traceback file in $TMPDIR
                Path(name).unlink(missing_ok=True)
    from . import __version__

    return {
        "format": REPORT_FORMAT,
        "sparsetrain_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": world,
        "runs": runs,
    }


def finite_json(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite replaced by None (JSON's null), in
    nested dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON to ``path`` (parent folders are created).

    A regular file is replaced only once the new one is whole, so a full disk leaves an older
    report as it was; anything else (``/dev/stdout``) is written in place. A number that is
    NaN or infinite (a diverged run's loss) is written as ``null``: the file is standard JSON,
    which other languages' parsers read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_json(report), indent=2, allow_nan=False) + "\n"
    target = Path(os.path.realpath(path))  # through a link, the file it names is replaced
    if target.exists() and not target.is_file():
        path.write_text(text)
        return path
    try:
        _replace_whole(target, lambda fh: fh.write(text.encode()))
    except OSError as e:  # no temporary file beside it (a writable file in a folder that is
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):  # not): in place, as before
            raise
        path.write_text(text)
    return path


def parse_value(text: str) -> Any:
    """Parse a command-line option value: a Python literal (``0.5``, ``True``, ``None``,
    ``[1, 2]``) when it is one, ``true``/``false`` in any case as the booleans (what a shell
    user types), else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def summary_table(report: dict[str, Any]) -> str:
    """Return a plain-text table of the runs: accuracy, bytes a rank sent, ratio and time, and
    the steps dropped for a NaN/Inf gradient where any run dropped some (a loss scaler's
    overflows, ``on_nonfinite="skip"``)."""
    skips = any(run.get("skipped_steps") for run in report["runs"])
    header = ("run", "test acc", "MB sent/rank", "vs dense", "seconds")
    header += ("skipped steps",) if skips else ()
    rows = []
    for run in report["runs"]:
        sent, dense = run["bytes_sent_per_rank"], run["dense_bytes_per_rank"]
        acc = run["final_test_accuracy"]
        rows.append(
            (
                run["label"],
                "-" if acc is None else f"{100 * acc:.1f}%",
                f"{sent / 1e6:.3f}",
                f"{100 * sent / dense:.2f}%" if dense else "-",
                f"{run['wall_seconds']:.1f}",
            )
            + ((str(run.get("skipped_steps", 0)),) if skips else ())
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = [
    "CheckpointConflict",
    "TrainConfig",
    "WorkerError",
    "evaluate",
    "launch",
    "parse_value",
    "shard_indices",
    "summary_table",
    "train_worker",
    "under_torchrun",
    "write_report",
]
