"""``sparsetrain train``: data-parallel training of a task with compressed gradients.

Several ``--compressor`` names run one after the other and share one report and one picture.
Started plainly it spawns ``--workers`` processes on this machine; started by ``torchrun`` it
joins that job.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .._procs import exit_finished_worker
from ..compressors import available_compressors, option_names
from ..sync.config import misplaced_collective_option
from ..tasks import available_tasks
from ..train import (
    AMP,
    BACKENDS,
    ON_NONFINITE,
    SCHEDULES,
    CheckpointConflict,
    TrainConfig,
    WorkerError,
    check_launch,
    launch,
    parse_value,
    summary_table,
    under_torchrun,
    worker_error,
    write_report,
)

EF_CHOICES = {"auto": None, "on": True, "off": False}


# ---- argument types: each names the problem in argparse's own error message ------------------


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def seed_value(text: str) -> int:
    """A seed: an integer in [0, 2**63), what torch.manual_seed takes."""
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def density_value(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1] (the fraction of entries sent), got {text}"
        )
    return value


def compressor_name(text: str) -> str:
    names = available_compressors()
    if text not in names:
        listed = [t for t in text.split(",") if t.strip()]
        hint = (
            f" (several are separated by spaces: --compressor {' '.join(listed)})"
            if len(listed) > 1 and all(t.strip() in names for t in listed)
            else ""
        )
        raise argparse.ArgumentTypeError(
            f"unknown compressor {text!r}; valid names are: {', '.join(names)}{hint}"
        )
    return text


def raw_key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def key_value(text: str) -> tuple[str, Any]:
    key, value = raw_key_value(text)
    return key, parse_value(value)


def task_option_values(task: str, items: list[tuple[str, str]]) -> dict[str, Any]:
    """``--task-option`` values: parsed as literals (``0.5``, ``True``), except for an option
    the task's factory annotates as ``str``, which takes the text as typed (``act=1`` is the
    string "1", not the number)."""
    from ..tasks import string_options

    text = string_options(task)
    return {k: v if k in text else parse_value(v) for k, v in items}


def add_sync_arguments(p: argparse.ArgumentParser, compressor_default: str = "threshold") -> None:
    """Add the options that choose how gradients are compressed and combined
    (``compressor_default``: what the command runs without ``--compressor``, for its help)."""
    g = p.add_argument_group("gradient compression")
    g.add_argument(
        "--compressor",
        nargs="+",
        action="extend",
        type=compressor_name,
        metavar="NAME",
        help="compressor(s); several run one after the other into one report "
        f"(default: {compressor_default}"
        + ("; none with --aggregator" if compressor_default == "threshold" else "")
        + f"; valid: {', '.join(available_compressors())})",
    )
    g.add_argument(
        "--density",
        type=density_value,
        help="fraction of gradient entries sent, in (0, 1]; used by compressors that take it",
    )
    g.add_argument(
        "--error-feedback",
        choices=sorted(EF_CHOICES),
        default="auto",
        help="keep what was not sent for the next step (auto: on for biased compressors, but "
        "not for signsgd with majority_vote)",
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="[COMPRESSOR:]KEY=VALUE",
        help="extra compressor option, repeatable; without a COMPRESSOR prefix (COMPRESSOR: or "
        "COMPRESSOR.) it goes to every selected compressor that takes KEY",
    )
    from ..comm import available_collectives

    g.add_argument(
        "--collective",
        default="allgather",
        help="how sparse payloads are reduced: "
        f"{', '.join(available_collectives())}, or auto (the cost model picks one a bucket; "
        "default allgather)",
    )
    g.add_argument(
        "--collective-option",
        action="append",
        default=[],
        metavar="[NAME.]KEY=VALUE",
        help="option of the collective, repeatable (oktopk: repartition_every, threshold_every, "
        "k, residuals=local|owner; gtopk: k); with --collective auto, prefix the candidate's "
        "NAME (oktopk.k=1000 or oktopk:k=1000)",
    )
    g.add_argument(
        "--auto-candidates",
        metavar="NAMES",
        help="with --collective auto: comma-separated names it picks from (dense and "
        "collectives; default the exact ones: dense, allgather, ssar_rd, ssar_split, dsar)",
    )
    g.add_argument(
        "--auto-bandwidth",
        metavar="RATE",
        help="with --collective auto: the links' rate for the cost model, tc notation (10gbit; "
        "default 10gbit)",
    )
    g.add_argument(
        "--auto-latency",
        metavar="DURATION",
        help="with --collective auto: the links' one-way latency for the cost model (5us; "
        "default 5us)",
    )
    g.add_argument(
        "--dense-warmup-steps",
        type=non_negative_int,
        default=0,
        help="steps of dense allreduce before compression",
    )
    g.add_argument(
        "--on-nonfinite",
        choices=ON_NONFINITE,
        help="NaN/Inf gradients (default: raise; propagate with --amp fp16, whose loss scaler "
        "skips the steps that overflow)",
    )
    from ..robust import available_aggregators, available_attacks

    for kind, names, what, example in (
        ("aggregator", available_aggregators(), "robust aggregation rule (default: plain "
         "average; ", "f=1: the Byzantine ranks it tolerates"),
        ("attack", available_attacks(), "Byzantine attack sent by the last --byzantine ranks (",
         "scale=10 for sign_flip, say"),
    ):  # fmt: skip
        g.add_argument(f"--{kind}", help=f"{what}valid: {', '.join(names)})")
        g.add_argument(
            f"--{kind}-option", type=key_value, action="append", default=[],
            metavar="KEY=VALUE", help=f"an option of the {kind} ({example}); repeatable",
        )  # fmt: skip
    g.add_argument(
        "--byzantine", type=non_negative_int, default=0, help="number of attacking ranks"
    )


def _in_user_code(worker_traceback: str) -> bool:
    """Whether a worker's traceback passes through a file of the user's (a task module, a
    model), not only through sparsetrain, torch and Python's own: the one line of the error
    then does not say where to look, and the traceback is shown."""
    import sysconfig

    import torch

    own = [
        str(Path(__file__).resolve().parents[1]),  # sparsetrain
        str(Path(torch.__file__).resolve().parent),
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    ]
    files = re.findall(r'^\s*File "([^"]+)"', worker_traceback, flags=re.MULTILINE)
    return any(
        not f.startswith("<") and not any(str(Path(f).resolve()).startswith(o) for o in own)
        for f in files
    )


def add_task_arguments(p: Any) -> None:
    """Add ``--task``, ``--task-module`` and ``--task-option`` to a parser or argument group.
    ``sparsetrain.cli`` imports the ``--task-module`` modules before the parser is built, so
    their tasks are among the choices."""
    p.add_argument(
        "--task", choices=available_tasks(), default="digits-mlp", help="model and data set"
    )
    p.add_argument(
        "--task-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module registering tasks (sparsetrain.tasks.register_task): a dotted name "
        "importable from the current folder or PYTHONPATH, or a .py file's path; repeatable. "
        "The workers load it too (through SPARSETRAIN_TASK_MODULES)",
    )
    p.add_argument(
        "--task-option",
        type=raw_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task's factory (hidden=1024, say); repeatable",
    )


def add_training_arguments(p: argparse.ArgumentParser, *, workers: int, epochs: int) -> None:
    """Add the task, process and optimiser options."""
    g = p.add_argument_group("training")
    add_task_arguments(g)
    g.add_argument(
        "--workers",
        type=positive_int,
        default=workers,
        help=f"processes on this machine (default {workers}; under torchrun: its WORLD_SIZE)",
    )
    g.add_argument(
        "--backend", choices=BACKENDS, default="gloo", help="nccl: one CUDA device a rank"
    )
    g.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    g.add_argument("--batch-size", type=positive_int, default=32, help="examples a rank per step")
    g.add_argument("--lr", type=positive_float, default=0.1)
    g.add_argument("--momentum", type=_float, default=0.9)
    g.add_argument("--weight-decay", type=_float, default=0.0)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument(
        "--momentum-correction",
        action="store_true",
        help="apply the momentum on each rank before compression (Deep Gradient Compression) "
        "instead of in the optimizer; sparse compressors with error feedback",
    )
    g.add_argument(
        "--amp",
        choices=AMP,
        help="mixed precision: autocast forward and loss to fp16 (with a loss scaler that skips "
        "steps that overflow) or bf16 (default: float32)",
    )
    g.add_argument(
        "--init-loss-scale",
        type=positive_float,
        default=None,
        help="with --amp fp16: the loss scaler's first scale (default 65536)",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule over the epochs",
    )
    g.add_argument("--seed", type=seed_value, default=0)
    g.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="steps between evaluations (0: each epoch)",
    )
    g.add_argument(
        "--max-steps", type=non_negative_int, default=0, help="stop after N steps (0: no limit)"
    )
    g.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds a collective may wait"
    )
    g.add_argument(
        "--bucket-cap-mb",
        "--bucket-mb",
        dest="bucket_mb",
        type=positive_float,
        default=TrainConfig.bucket_cap_mb,
        help="DDP's bucket size in MB: larger buckets, fewer exchanges a step (25: DDP's default)",
    )
    g.add_argument(
        "--find-unused-parameters",
        action="store_true",
        help="DDP's find_unused_parameters: for a model whose forward leaves some parameters "
        "without a gradient (DDP stops at them with an error otherwise)",
    )
    g.add_argument(
        "--no-ddp",
        action="store_true",
        help="no DistributedDataParallel: GradientSync exchanges the gradients after backward, "
        "with the same values where the model fits one bucket (DDP groups several buckets "
        "otherwise, so the compressor sees other groups); a sparse compressor then works on the "
        "gradients where they are, without DDP's copy of each into its bucket, but nothing "
        "overlaps with backward",
    )
    g.add_argument(
        "--no-reuse-host-memory",
        action="store_true",
        help="leave glibc's malloc as it is (by default workers keep freed memory for reuse, "
        "which spares a CPU run the page faults of large tensors made anew each step)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _collective_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig's collective_options, auto_candidates and auto_network from the command
    line (those not given are left out, so TrainConfig's defaults and checks apply)."""
    out: dict[str, Any] = {}
    auto = args.collective == "auto"
    opts: dict[str, Any] = {}
    for text in args.collective_option:
        key, value = key_value(text)
        key = key.replace(":", ".", 1) if ":" in key else key  # NAME:KEY as --option writes it
        if auto:
            name, dot, key = key.partition(".")
            if not dot or not key:
                raise ValueError(
                    f"--collective-option {text!r}: with --collective auto, name the candidate "
                    "the option is for (oktopk.repartition_every=16)"
                )
            opts.setdefault(name, {})[key] = value
        else:
            name, dot, rest = key.partition(".")
            if dot and name == args.collective:
                raise ValueError(
                    f"--collective-option {text!r}: with --collective {args.collective}, give "
                    f"the option without the name ({rest}=...)"
                )
            opts[key] = value
    if opts:
        out["collective_options"] = opts
    if args.auto_candidates is not None:
        names = [c.strip() for c in args.auto_candidates.split(",") if c.strip()]
        if not names:
            raise ValueError(f"--auto-candidates lists nothing: {args.auto_candidates!r}")
        out["auto_candidates"] = names
    if args.collective != "auto":
        given = [flag for flag, v in (("--auto-candidates", args.auto_candidates),
                                      ("--auto-bandwidth", args.auto_bandwidth),
                                      ("--auto-latency", args.auto_latency)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{', '.join(given)} go with --collective auto, got --collective {args.collective}"
            )
    if args.auto_bandwidth is not None or args.auto_latency is not None:
        from ..cluster.units import parse_duration, parse_rate
        from ..perfmodel import DEFAULT_PARAMS, NetworkParams

        try:  # the one not given keeps the model's default
            rate = (
                parse_rate(args.auto_bandwidth) if args.auto_bandwidth else 8 / DEFAULT_PARAMS.beta
            )
            latency = (
                parse_duration(args.auto_latency) if args.auto_latency else DEFAULT_PARAMS.alpha
            )
        except ValueError as e:
            raise ValueError(f"--auto-bandwidth/--auto-latency: {e}") from None
        out["auto_network"] = NetworkParams.from_link(rate, latency).as_dict()
    return out


def _compressor_options(
    args: argparse.Namespace, compressors: list[str]
) -> dict[str, dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {c: {} for c in compressors}
    for text in args.option:
        target, colon, rest = text.partition(":")
        if colon and "=" not in target:
            if target not in per:
                raise ValueError(
                    f"--option {text!r} names compressor {target!r}, which is not selected"
                )
            targets = [target]
        else:
            targets, rest = [], text
        try:
            key, value = key_value(rest)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--option: {e}") from None
        name, dot, bare = key.partition(".")  # NAME.KEY, as --collective-option writes it
        if not targets and dot and bare and name in available_compressors():
            if name not in per:
                raise ValueError(
                    f"--option {text!r} names compressor {name!r}, which is not selected"
                )
            targets, key = [name], bare
        if not targets:
            targets = [c for c in compressors if key in option_names(c)]
            hint = misplaced_collective_option(key, args.collective, cli=True)
            if not targets and hint:
                raise ValueError(f"--option {key!r}: no selected compressor takes it; {hint}")
            if not targets:
                raise ValueError(
                    f"--option {key!r}: none of the selected compressors ({', '.join(compressors)}) "
                    "takes it; options are: "
                    + "; ".join(f"{c}: {', '.join(option_names(c)) or 'none'}" for c in compressors)
                )
        for c in targets:
            per[c][key] = value
    return per


def _per_compressor(
    args: argparse.Namespace, compressors: list[str], per: dict[str, dict[str, Any]]
) -> tuple[dict[str, str], dict[str, bool]]:
    """Each compressor's collective and momentum correction. Where several compressors are
    compared (the dense baseline among them, as in ``demo``), a sparse ``--collective`` and
    ``--momentum-correction`` go to the compressors that take them, and the others run as
    they can (their own exchange, no correction), with a note: before, one dense baseline
    refused the whole comparison. A single compressor that cannot take them is refused."""
    from ..compressors import compressor_class
    from ..sync.config import error_feedback_on

    def split(what: str, users: list[str], how: str) -> str:
        others = [c for c in compressors if c not in users]
        return (
            f"{what}: {', '.join(users)} use it; {', '.join(others)} "
            f"{'runs' if len(others) == 1 else 'run'} {how}"
        )

    collective = {c: args.collective for c in compressors}
    correction = {c: args.momentum_correction for c in compressors}
    if len(compressors) < 2:
        return collective, correction
    notes = []
    if args.collective != "allgather":
        dense = [c for c in compressors if compressor_class(c).wire != "sparse"]
        if dense and len(dense) < len(compressors):
            for c in dense:
                collective[c] = "allgather"
            own = "its" if len(dense) == 1 else "their"
            notes.append(
                split(
                    f"--collective {args.collective} reduces sparse payloads",
                    [c for c in compressors if c not in dense],
                    f"with {own} own exchange",
                )
            )
    if args.momentum_correction:
        forced = EF_CHOICES[args.error_feedback]
        without = [c for c in compressors if not error_feedback_on(c, per[c], forced)]
        if without and len(without) < len(compressors):
            for c in without:
                correction[c] = False
            notes.append(
                split(
                    "--momentum-correction needs error feedback",
                    [c for c in compressors if c not in without],
                    "without it",
                )
            )
    for n in notes:
        _note(n)
    return collective, correction


def _note(text: str) -> None:
    """Print ``note: text`` on stderr, once for the job (on rank 0 under torchrun)."""
    if not under_torchrun() or os.environ.get("RANK") == "0":
        print(f"note: {text}", file=sys.stderr)


_FLAGS = {"timeout_s": "--timeout", "bucket_cap_mb": "--bucket-cap-mb", "ddp": "--no-ddp",
          "aggregator_options": "--aggregator-option", "attack_options": "--attack-option",
          "collective_options": "--collective-option", "compressor_options": "--option"}  # fmt: skip


def with_flag(parser: argparse.ArgumentParser, message: str, config: type = TrainConfig) -> str:
    """``message``, an error of the ``config`` dataclass naming a field first (``momentum must
    be in [0, 1)``), led by the command-line flag that sets it (``--momentum: ...``): a user of
    the command was shown Python's names. A task option's error (``task option hidden ...``,
    ``task 'digits-mlp' does not take option(s) ...``) is led by ``--task-option``, not ``--task``. Unchanged
    where it names no field of a flag."""
    m = re.match(r"([a-z][a-z0-9_]*)\b", message)
    if m is None:
        return message
    field = m.group(1)
    if re.match(r"task (option|'[^']*' (option|does not take option))\b", message):
        field, flag = "task_options", "--task-option"
    else:
        flag = _FLAGS.get(field, "--" + field.replace("_", "-"))
    if flag not in parser._option_string_actions or field not in config.__dataclass_fields__:
        return message
    return f"{flag}: {message}"


def configs_from_args(args: argparse.Namespace) -> list[TrainConfig]:
    """Turn parsed arguments into one :class:`TrainConfig` a compressor.

    Raises:
        ValueError, TypeError: an invalid combination, or runs this machine cannot start
            (:func:`~sparsetrain.train.check_launch`); the message says which and why.
    """
    compressors = args.compressor or ["threshold"]
    if not args.compressor and args.aggregator and args.density is None and not args.option:
        # A robust rule gathers every rank's whole (decompressed) gradient: compression saves
        # no byte there and costs accuracy (`train --workers 3 --epochs 5 --aggregator median
        # --compressor threshold none`: 52% against 91.5%).
        compressors = ["none"]
        _note(
            f"--aggregator {args.aggregator} gathers every rank's whole gradient, so "
            "compression would save no bytes: running --compressor none (give --compressor "
            "to choose one)"
        )
    dupes = sorted({c for c in compressors if compressors.count(c) > 1})
    if dupes:
        raise ValueError(f"--compressor lists {dupes} more than once")
    per = _compressor_options(args, compressors)
    if args.init_loss_scale is not None and args.amp != "fp16":
        raise ValueError(
            "--init-loss-scale sets the float16 loss scaler's first scale: it needs --amp fp16 "
            f"(got {'no --amp' if args.amp is None else f'--amp {args.amp}'}, which scales no loss)"
        )
    collective, correction = _per_compressor(args, compressors, per)
    configs = [
        TrainConfig(
            task=args.task,
            compressor=c,
            density=args.density,
            compressor_options=per[c],
            error_feedback=EF_CHOICES[args.error_feedback],
            collective=collective[c],
            **(_collective_arguments(args) if collective[c] == args.collective else {}),
            dense_warmup_steps=args.dense_warmup_steps,
            on_nonfinite=args.on_nonfinite,
            aggregator=args.aggregator,
            aggregator_options=dict(args.aggregator_option),
            attack=args.attack,
            attack_options=dict(args.attack_option),
            byzantine=args.byzantine,
            # Under torchrun the job's size is WORLD_SIZE (checks such as byzantine < workers
            # need it before launch() would set it).
            workers=int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.workers,
            backend=args.backend,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            nesterov=args.nesterov,
            momentum_correction=correction[c],
            schedule=args.schedule,
            amp=args.amp,
            init_loss_scale=2.0**16 if args.init_loss_scale is None else args.init_loss_scale,
            seed=args.seed,
            eval_every=args.eval_every,
            max_steps=args.max_steps,
            checkpoint_dir=getattr(args, "checkpoint_dir", None),
            checkpoint_every=getattr(args, "checkpoint_every", 0),
            resume=getattr(args, "resume", False),
            task_options=task_option_values(args.task, args.task_option),
            progress=not args.no_progress,
            timeout_s=args.timeout,
            bucket_cap_mb=args.bucket_mb,
            reuse_host_memory=not args.no_reuse_host_memory,
            ddp=not args.no_ddp,
            find_unused_parameters=args.find_unused_parameters,
        )
        for c in compressors
    ]
    check_launch(configs)  # before any output: shared settings, GPUs, memory for the workers
    return configs


def check_outputs(parser: argparse.ArgumentParser, **paths: str | None) -> None:
    """Exit with a usage error (status 2) before any training if a result could not be
    written where its option says (``report=``, ``plot=`` and ``out=`` a folder), rather
    than with a traceback after the run."""
    from ..plotting import file_path_problem, folder_path_problem, plot_path_problem

    if under_torchrun() and os.environ.get("RANK") != "0":
        return  # only rank 0 writes them (its node's paths; torchrun stops the job if it exits)
    checks = {"plot": plot_path_problem, "out": folder_path_problem, "out_dir": folder_path_problem,
              "checkpoint_dir": folder_path_problem}  # fmt: skip
    for option, path in paths.items():
        if path is not None and not str(path).strip():  # (`--report ""`, an unset variable)
            parser.error(f"--{option.replace('_', '-')} needs a path, got an empty one")
        problem = path and checks.get(option, file_path_problem)(path)
        if problem:
            parser.error(f"--{option.replace('_', '-')} {problem}")
    clash = same_file(**paths)
    if clash:
        parser.error(clash)


def same_file(**paths: str | None) -> str | None:
    """Why two of the files a command writes (``report=``, ``plot=``, ``json=``; not folders)
    would be one file, the second replacing the first, or None where they differ."""
    seen: dict[Path, str] = {}
    folders = {
        Path(p).expanduser().resolve(): o
        for o, p in paths.items()
        if p and o in ("out", "out_dir", "checkpoint_dir")
    }
    for option, path in paths.items():
        if not path or option in ("out", "out_dir", "checkpoint_dir"):
            continue
        key = Path(path).expanduser().resolve()
        if key in folders:
            folder = folders[key].replace("_", "-")
            return f"--{option} {path} is the folder --{folder} names: give the file another path"
        if key in seen:
            first = seen[key]
            how = (
                " (the plot goes to the report's path with .png unless --plot names another)"
                if {first, option} == {"report", "plot"}
                else ""
            )
            return (
                f"--{first} and --{option} would both write {path}, the second replacing the "
                f"first{how}: give them different paths"
            )
        seen[key] = option
    return None


def replaces_input(reads: dict[str, str | None], writes: dict[str, str | None]) -> str | None:
    """Why a file a command writes (``writes``: option -> path) is one it reads (``reads``),
    which the output would replace (a measurement read to fit, say), or None."""
    inputs = {Path(p).expanduser().resolve(): o for o, p in reads.items() if p}
    for option, path in writes.items():
        source = inputs.get(Path(path).expanduser().resolve()) if path else None
        if source is not None:
            return (
                f"--{option} {path} is the file {source} reads: writing it would replace that "
                "input; give the output another path"
            )
    return None


def _say_stopped(e: BaseException, configs: list[TrainConfig], prog: str) -> int | None:
    """Say on a line of its own (after the progress bar's) what stopped the run and where it
    can go on from: Ctrl-C, or SIGTERM or SIGHUP, which left without a word before. Return the
    exit status (128 + the signal), or None where nothing was said (another exit, whose
    message is on its way; or torchrun's workers, which torchrun reports on)."""
    code = e.code if isinstance(e, SystemExit) else 128 + signal.SIGINT
    try:
        name = signal.Signals(code - 128).name if isinstance(code, int) and code > 128 else None
    except ValueError:
        name = None
    if name is None or under_torchrun():
        return None
    folder = configs[0].checkpoint_dir
    if not folder:
        then = "no --checkpoint-dir was given, so nothing was saved"
    elif not any(Path(folder).glob("*/rank*.pt")):
        then = (
            f"no checkpoint was written in {folder} yet (the first comes at the end of the "
            "first epoch, or after --checkpoint-every steps), so a --resume starts over"
        )
    else:
        then = (
            f"`{prog} --resume` with the same options goes on from the last checkpoint in {folder}"
        )
    print(f"\n{prog}: stopped by {name}; the workers are stopped; {then}", file=sys.stderr)
    return code


def run_and_report(
    configs: list[TrainConfig], report_path: str | None, plot_path: str | None, prog: str
) -> tuple[int, dict[str, Any] | None]:
    """Launch the runs; on the reporting rank print the table and write report and picture.

    Returns (exit code, report or None where this process does not report).
    """
    try:
        check_launch(configs)
    except ValueError as e:  # runs that cannot start: a usage error, before any worker
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None
    # A command line that conflicts with the checkpoints it names is a usage error, as above.
    try:
        report = launch(configs)
    except WorkerError as e:
        hint = ""
        if "find_unused_parameters=True" in str(e) and not configs[0].find_unused_parameters:
            hint = " (sparsetrain: pass --find-unused-parameters, or --no-ddp)"
        # On a line of its own: rank 0's progress bar, on this terminal, ends without one.
        bar = "\n" if any(c.progress for c in configs) else ""
        print(f"{bar}{prog}: error: {e}{hint}", file=sys.stderr)
        if _in_user_code(e.worker_traceback):  # the user's task or model: where it failed
            print(e.worker_traceback.rstrip(), file=sys.stderr)
        return 2 if e.error_type == CheckpointConflict.__name__ else 1, None
    except (KeyboardInterrupt, SystemExit) as e:
        code = _say_stopped(e, configs, prog)
        if code is None:
            raise
        return code, None
    except Exception as e:
        if not under_torchrun():
            raise
        # Under torchrun this process is a worker: one line, as launch() gives for embedded ones.
        rank = os.environ["RANK"]
        name, message = worker_error(e)
        print(
            f"{prog}: error: worker rank {rank} failed: {name}: {message}",
            file=sys.stderr,
        )
        return 2 if isinstance(e, CheckpointConflict) else 1, None
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        return 0, None
    say(summary_table(report))
    code = 0
    # (Each file is written before its line is printed, and the lines go through say(): a
    # closed stdout, `| head -1`, must neither read as a failed write nor skip one.)
    if report_path:
        try:
            written = write_report(report, report_path)
        except OSError as e:  # a full disk, a folder made read-only during the run
            code = 1
            print(f"{prog}: error: cannot write the report to {report_path}: {e}", file=sys.stderr)
            fd, spare = tempfile.mkstemp(prefix="sparsetrain-report-", suffix=".json")
            os.close(fd)
            try:
                print(f"report: {write_report(report, spare)} (instead)", file=sys.stderr)
            except OSError:
                os.unlink(spare)
        else:
            say(f"report: {written}")
    if plot_path:
        from ..plotting import plot_report

        try:
            drawn = plot_report(report, plot_path)
        except OSError as e:
            code = 1
            print(f"{prog}: error: cannot write the plot to {plot_path}: {e}", file=sys.stderr)
        else:
            say(f"plot:   {drawn}")
    return code, report


def say(text: str) -> None:
    """Print ``text``; once stdout is closed (`sparsetrain train ... | head -1`), send the rest
    of the output nowhere, so that the files still to be written are."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        quiet_stdout()


def quiet_stdout() -> None:
    """Point stdout at os.devnull: its reader has gone, and what is still printed (or flushed
    at exit) would raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    try:
        configs = configs_from_args(args)
    except (ValueError, TypeError) as e:
        args._parser.error(with_flag(args._parser, str(e)))
    plot = args.plot or (str(Path(args.report).with_suffix(".png")) if args.report else None)
    check_outputs(args._parser, report=args.report, plot=plot, checkpoint_dir=args.checkpoint_dir)
    code, _ = run_and_report(configs, args.report, plot, args._parser.prog)
    return finish(code)


def finish(code: int) -> int:
    """Return ``code``; a torchrun worker, whose process group launch() made and destroyed,
    exits with it at once instead: the interpreter's teardown can abort it while gloo's
    threads release finished work (SIGABRT, "terminate called without an active exception",
    and torchrun then fails the job whose report is written), as embedded workers would."""
    if under_torchrun():
        exit_finished_worker(code)
    return code


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a task data-parallel with compressed gradients",
        description="Train a registered task with DDP and gradient compression. Several "
        "--compressor names run one after the other into one JSON report and one PNG. Without "
        "torchrun, --workers processes are spawned on this machine (gloo); under torchrun, this "
        "process joins the job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).",
    )
    add_sync_arguments(p)
    add_training_arguments(p, workers=4, epochs=20)
    out = p.add_argument_group("output")
    out.add_argument(
        "--report", metavar="PATH", help="write the JSON report here (and a PNG beside it)"
    )
    out.add_argument(
        "--plot", metavar="PATH", help="write the PNG here (default: the report's path, .png)"
    )
    out.add_argument(
        "--checkpoint-dir", metavar="DIR", help="save checkpoints here (one file a rank)"
    )
    out.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=0,
        help="steps between checkpoints (default: 0, at each epoch's end; also at the end)",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint-dir (on as many workers exactly; on another number "
        "the checkpoints are resharded: docs/training.md)",
    )
    show_defaults(p)
    p.set_defaults(func=_run, _parser=p)
    return p


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Add "(default: X)" to the help of every option that has a value by default and does not
    say it already (flags and options without a default are left as they are)."""
    for action in parser._actions:
        default = action.default
        if (
            action.option_strings
            and action.nargs != 0  # flags: store_true and the like
            and default not in (None, argparse.SUPPRESS)
            and not isinstance(default, (list, dict))
            and "default" not in (action.help or "")
            and action.help != argparse.SUPPRESS
        ):
            action.help = f"{action.help or ''} (default: {default})".lstrip()
