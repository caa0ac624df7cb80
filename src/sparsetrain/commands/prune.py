"""``sparsetrain prune``: train a task, prune it with one or more methods, fine-tune, report.

Example::

    sparsetrain prune --task digits-mlp --method woodfisher --method magnitude \\
        --sparsity 0.9 --schedule gradual --report out.json

writes ``out.json`` (per method: accuracy against sparsity, final accuracy, per-layer sparsity,
parameters, FLOPs, compact checkpoint size, pruned-parameter efficiency) and ``out.png``
(accuracy against sparsity, one line per method).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sparsetrain.commands.train import add_task_arguments, seed_value, task_option_values
from sparsetrain.pruning import (
    Gradual,
    OneShot,
    Pruner,
    available_pruners,
    compact_size_report,
    count_flops,
    get_pruner,
    pruned_parameter_efficiency,
    sparsity_stats,
)
from sparsetrain.pruning.base import default_weights
from sparsetrain.pruning.masks import check_sparsity, nm_shape_problem
from sparsetrain.tasks import (
    Task,
    available_tasks,
    check_model_output,
    check_task_options,
    get_task,
    require_tensor_data,
)
from sparsetrain.train import finite_json

SCHEDULES = ("oneshot", "gradual")


@dataclass
class PruneConfig:
    """Options of a pruning experiment (the CLI flags).

    Args:
        task: a registered task; task_options the keyword options of its factory (for
            example ``hidden``).
        methods: pruners to compare (``"magnitude"``, ``"woodfisher"``, ``"rigl"``, ...).
        sparsity: the final sparsity of the pruned weights, in [0, 1).
        schedule: ``"oneshot"`` (prune the trained model at once, then fine-tune) or
            ``"gradual"`` (cubic schedule over ``prune_epochs``, then fine-tune). RigL always
            trains sparse from scratch for ``epochs + prune_epochs + finetune_epochs``.
        scope: ``"global"`` or ``"layer"``.
        epochs: dense training epochs before pruning.
        prune_epochs: epochs of the gradual schedule.
        finetune_epochs: epochs at the final sparsity with masks held.
        levels: one-shot: the sparsities of the accuracy curve (before fine-tuning); the final
            sparsity is always added.
        pruning_steps: gradual: how many times the sparsity is raised.
        fisher_samples, block_size, damping, obs_update: WoodFisher options (one example per
            sample; ``obs_update=False`` gives the diagonal OBD-like variant).
    """

    task: str = "digits-mlp"
    task_options: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["magnitude"])
    sparsity: float = 0.9
    schedule: str = "gradual"
    scope: str = "global"
    epochs: int = 30
    prune_epochs: int = 15
    finetune_epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    levels: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8])
    pruning_steps: int = 10
    fisher_samples: int = 256
    block_size: int = 256
    damping: float = 1e-5
    obs_update: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.task not in available_tasks():
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(available_tasks())}")
        check_task_options(self.task, self.task_options)
        if not self.methods:
            raise ValueError("give at least one pruning method")
        for m in self.methods:
            if m not in available_pruners():
                raise ValueError(f"unknown method {m!r}; valid: {', '.join(available_pruners())}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "prune_epochs", "finetune_epochs", "batch_size", "pruning_steps"):
            v, least = getattr(self, name), 1 if name in ("batch_size", "pruning_steps") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
        for s in self.levels:
            check_sparsity(s, "each of levels")
        for name in ("fisher_samples", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("lr", "damping"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def evaluate(model: nn.Module, data: torch.utils.data.TensorDataset) -> float:
    """Return the accuracy of ``model`` on a data set of (input, label)."""
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def train(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    batch_size: int,
    generator: torch.Generator,
    pruner: Pruner | None = None,
    closure: Callable[[], torch.Tensor] | None = None,
    start_step: int = 0,
    on_prune: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> int:
    """Train for ``epochs``, calling ``pruner.step`` after every optimizer step.

    Returns:
        The next step index.
    """
    x, y = task.train.tensors
    steps_per_epoch = math.ceil(len(y) / batch_size)
    step = start_step
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=generator)
            for i in range(0, len(y), batch_size):
                idx = perm[i : i + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss_fn(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                if pruner is not None and pruner.step(step, closure) and on_prune is not None:
                    on_prune(step)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return step


def fisher_closure(
    model: nn.Module, task: Task, generator: torch.Generator, batch: int = 1
) -> Callable[[], torch.Tensor]:
    """Return a closure giving the loss on ``batch`` random training examples per call, with
    the model in eval mode (a task's BatchNorm keeps its statistics and Dropout is off: the
    Fisher of the model as it predicts)."""
    x, y = task.train.tensors

    def closure() -> torch.Tensor:
        idx = torch.randint(len(y), (batch,), generator=generator)
        was = model.training
        model.eval()
        try:
            return task.loss_fn(model(x[idx]), y[idx])
        finally:
            model.train(was)

    return closure


def _make_optimizer(model: nn.Module, cfg: PruneConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _method_options(method: str, cfg: PruneConfig) -> dict[str, Any]:
    if method == "woodfisher":
        return {
            "fisher_samples": cfg.fisher_samples,
            "block_size": cfg.block_size,
            "damping": cfg.damping,
            "obs_update": cfg.obs_update,
        }
    return {}


NM_GROUP = 4  # the CLI's N:M pruning keeps N of every 4 weights


def _nm_kept(sparsity: float) -> int:
    """The N of the N:4 pattern for a requested sparsity: the most weights of 4 kept at which
    the sparsity is at least the one asked for (at least 1)."""
    return max(1, int(math.floor((1 - sparsity) * NM_GROUP + 1e-9)))


def nm_weights(model: nn.Module) -> tuple[list[str], list[str]]:
    """The default weights N:4 pruning can group (their input dimension, or a convolution's
    input channels, a multiple of 4), and the others, which it leaves dense (as NVIDIA's ASP
    does: a first convolution over 1 or 3 channels has no groups of 4)."""
    shapes = dict(model.named_parameters())
    names = default_weights(model)
    can = [n for n in names if nm_shape_problem(n, shapes[n].shape, NM_GROUP) is None]
    return can, [n for n in names if n not in can]


def _build_pruner(
    method: str, cfg: PruneConfig, sparsity: float, schedule: Any, model: nn.Module
) -> Pruner:
    opts = _method_options(method, cfg)
    if method == "nm":
        return get_pruner(
            "nm", n=_nm_kept(sparsity), m=NM_GROUP, schedule=schedule, params=nm_weights(model)[0]
        )
    return get_pruner(method, sparsity=sparsity, schedule=schedule, scope=cfg.scope, **opts)


def summarise(model: nn.Module, task: Task, dense_acc: float) -> dict[str, Any]:
    """Return accuracy, sparsity, parameters, FLOPs, checkpoint sizes and PPE of a model."""
    acc = evaluate(model, task.test)
    stats = sparsity_stats(model)
    flops = count_flops(model, task.test.tensors[0][:1])
    return {
        "test_accuracy": acc,
        "sparsity": stats["global_sparsity"],
        "layers": stats["layers"],
        "params": stats["params"],
        "nonzero_params": stats["nonzero_params"],
        "kept_fraction": stats["kept_fraction"],
        "flops_dense": flops["dense"],
        "flops_sparse": flops["sparse"],
        "checkpoint": compact_size_report(model),
        "pruned_parameter_efficiency": pruned_parameter_efficiency(
            acc, dense_acc, stats["kept_fraction"]
        ),
    }


def train_dense(cfg: PruneConfig) -> tuple[Task, nn.Module, float]:
    """Train the dense model of ``cfg.task``; return the task, the model and its test accuracy."""
    task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    require_tensor_data(task, cfg.task, "sparsetrain prune")
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    gen = torch.Generator().manual_seed(cfg.seed)
    train(
        model,
        task,
        _make_optimizer(model, cfg),
        cfg.epochs,
        batch_size=cfg.batch_size,
        generator=gen,
        desc="dense",
        progress=cfg.progress,
    )
    return task, model, evaluate(model, task.test)


def oneshot_accuracy(
    dense: nn.Module, task: Task, method: str, sparsity: float, cfg: PruneConfig, seed: int = 0
) -> tuple[nn.Module, Pruner, float]:
    """Prune a copy of ``dense`` to ``sparsity`` at once; return it, its pruner and its accuracy."""
    model = copy.deepcopy(dense)
    pruner = _build_pruner(method, cfg, sparsity, OneShot(), model)
    pruner.prepare(model)
    gen = torch.Generator().manual_seed(seed)
    pruner.prune(closure=fisher_closure(model, task, gen))
    return model, pruner, evaluate(model, task.test)


def run_method(
    method: str, cfg: PruneConfig, task: Task, dense: nn.Module, dense_acc: float
) -> dict[str, Any]:
    """Prune (and fine-tune) with one method; return its curve and final summary."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
    curve: list[dict[str, float]] = []
    if method == "rigl":
        torch.manual_seed(cfg.seed)
        model = task.build_model()
        opt = _make_optimizer(model, cfg)
        epochs = cfg.epochs + cfg.prune_epochs + cfg.finetune_epochs
        end = max(2, int(0.75 * epochs * steps_per_epoch))
        pruner = get_pruner(
            "rigl",
            sparsity=cfg.sparsity,
            # An update an epoch; more often where the updates end within the first epoch.
            delta_t=steps_per_epoch if steps_per_epoch < end else max(1, end // 2),
            end=end,
        )
        pruner.prepare(model, opt)
        train(
            model,
            task,
            opt,
            epochs,
            batch_size=cfg.batch_size,
            generator=gen,
            pruner=pruner,
            desc="rigl",
            progress=cfg.progress,
        )
        curve.append(
            {"sparsity": pruner.stats()["sparsity"], "test_accuracy": evaluate(model, task.test)}
        )
    elif cfg.schedule == "oneshot":
        target = None
        for s in sorted({*cfg.levels, cfg.sparsity}):
            model, pruner, acc = oneshot_accuracy(dense, task, method, s, cfg, seed=cfg.seed)
            curve.append({"sparsity": pruner.stats()["sparsity"], "test_accuracy": acc})
            if s == cfg.sparsity:  # the one fine-tuned; the other levels only draw the curve
                target = (model, pruner)
        assert target is not None
        model, pruner = target
        opt = _make_optimizer(model, cfg)
        state = pruner.state_dict()  # re-attached with an optimizer, for the fine-tuning
        pruner.prepare(model, opt)
        pruner.load_state_dict(state)
        train(
            model,
            task,
            opt,
            cfg.finetune_epochs,
            batch_size=cfg.batch_size,
            generator=gen,
            pruner=pruner,
            desc=f"{method} fine-tune",
            progress=cfg.progress,
        )
    else:
        model = copy.deepcopy(dense)
        opt = _make_optimizer(model, cfg)
        end = max(1, cfg.prune_epochs * steps_per_epoch - 1)
        freq = max(1, end // cfg.pruning_steps)
        pruner = _build_pruner(
            method, cfg, cfg.sparsity, Gradual(start=0, end=end, frequency=freq), model
        )
        pruner.prepare(model, opt)
        closure = fisher_closure(model, task, torch.Generator().manual_seed(cfg.seed + 2))

        def record(_step: int) -> None:
            curve.append(
                {
                    "sparsity": pruner.stats()["sparsity"],
                    "test_accuracy": evaluate(model, task.test),
                }
            )

        step = train(
            model,
            task,
            opt,
            cfg.prune_epochs,
            batch_size=cfg.batch_size,
            generator=gen,
            pruner=pruner,
            closure=closure,
            on_prune=record,
            desc=f"{method} gradual",
            progress=cfg.progress,
        )
        train(
            model,
            task,
            opt,
            cfg.finetune_epochs,
            batch_size=cfg.batch_size,
            generator=gen,
            pruner=pruner,
            start_step=step,
            desc=f"{method} fine-tune",
            progress=cfg.progress,
        )
    pruner.finalize()
    final = summarise(model, task, dense_acc)
    curve.append(
        {"sparsity": final["sparsity"], "test_accuracy": final["test_accuracy"], "finetuned": True}
    )
    return {
        "method": method,
        "curve": curve,
        "final": final,
        "pruner": pruner.stats(),
        "seconds": time.perf_counter() - start,
    }


def run(cfg: PruneConfig) -> dict[str, Any]:
    """Run the experiment of ``cfg`` and return the report (what ``--report`` writes)."""
    task, dense, dense_acc = train_dense(cfg)
    dense_summary = summarise(dense, task, dense_acc)
    runs = [run_method(m, cfg, task, dense, dense_acc) for m in cfg.methods]
    return {"config": asdict(cfg), "dense": dense_summary, "runs": runs}


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Draw test accuracy against sparsity, one line per method, and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run_ in report["runs"]:
        pts = [p for p in run_["curve"] if not p.get("finetuned")]
        if pts:
            ax.plot(
                [p["sparsity"] for p in pts],
                [p["test_accuracy"] for p in pts],
                marker="o",
                label=f"{run_['method']} ({report['config']['schedule'] if run_['method'] != 'rigl' else 'sparse training'})",
            )
        f = run_["final"]
        ax.scatter(
            [f["sparsity"]],
            [f["test_accuracy"]],
            marker="*",
            s=120,
            zorder=3,
            label=f"{run_['method']} final",
        )
    ax.axhline(report["dense"]["test_accuracy"], color="gray", linestyle="--", label="dense")
    ax.set(
        xlabel="sparsity of pruned weights",
        ylabel="test accuracy",
        title=f"{report['config']['task']}: accuracy against sparsity",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except (ValueError, TypeError) as e:
        from .train import with_flag

        args._parser.error(with_flag(args._parser, str(e), PruneConfig))
    problem = _unused_options(args, cfg)
    if problem:
        args._parser.error(problem)
    task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    try:  # before any training, as the options
        require_tensor_data(task, cfg.task, "sparsetrain prune")
        check_model_output(task)
    except ValueError as e:
        args._parser.error(str(e))
    if "woodfisher" in cfg.methods:  # its block size against its memory budget, before training
        model = task.build_model()
        try:
            _build_pruner("woodfisher", cfg, cfg.sparsity, "oneshot", model).prepare(model)
        except ValueError as e:  # max_memory_bytes has no flag: --block-size is the remedy
            text = (
                str(e)
                .replace("use block_size", "give --block-size")
                .replace(", or raise max_memory_bytes", "; the command's budget is fixed")
                .replace("no block_size fits: raise max_memory_bytes", "no --block-size fits")
            )
            args._parser.error(f"--method woodfisher: {text}")
    from .train import check_outputs

    if "nm" in cfg.methods:
        n = _nm_kept(cfg.sparsity)
        if n >= NM_GROUP:
            args._parser.error(
                f"--method nm needs --sparsity > 0: it keeps n < {NM_GROUP} of every "
                f"{NM_GROUP} weights (got --sparsity {cfg.sparsity:g})"
            )
        can, cannot = nm_weights(task.build_model())
        if not can:
            args._parser.error(
                f"--method nm: no weight of task {cfg.task!r} can be pruned {n}:{NM_GROUP} (each "
                f"needs an input dimension, or input channels, divisible by {NM_GROUP})"
            )
        if cannot:
            print(
                f"note: nm leaves {', '.join(cannot)} dense (input dimension or channels not "
                f"divisible by {NM_GROUP})",
                file=sys.stderr,
            )
        if abs(1 - n / NM_GROUP - cfg.sparsity) > 1e-9:
            print(
                f"note: nm keeps {n} of every {NM_GROUP} weights, a sparsity of "
                f"{1 - n / NM_GROUP:.3f}, not the {cfg.sparsity:g} asked for (the other methods "
                "prune to that)",
                file=sys.stderr,
            )

    check_outputs(
        args._parser,
        report=args.report,
        plot=args.plot or (str(Path(args.report).with_suffix(".png")) if args.report else None),
    )
    report = run(cfg)
    return _write(args, report)


def _unused_options(args: argparse.Namespace, cfg: PruneConfig) -> str | None:
    """What on the command line no selected method would use (it was silently ignored), or a
    method given twice (trained twice, two identical rows), or None."""
    twice = sorted({m for m in cfg.methods if cfg.methods.count(m) > 1})
    if twice:
        return f"--method {', '.join(twice)} given more than once"
    woodfisher = [
        flag
        for flag, value in (
            ("--fisher-samples", args.fisher_samples),
            ("--block-size", args.block_size),
            ("--damping", args.damping),
            ("--no-obs-update", args.no_obs_update or None),
        )
        if value is not None
    ]
    if woodfisher and "woodfisher" not in cfg.methods:
        return f"{', '.join(woodfisher)}: WoodFisher's options, but no --method woodfisher"
    if args.scope is not None and all(m in ("rigl", "nm") for m in cfg.methods):
        return (
            "--scope ranks weights over the model or layer by layer for magnitude, structured "
            "and woodfisher pruning; rigl and nm set each layer's sparsity themselves"
        )
    scheduled = [m for m in cfg.methods if m != "rigl"]  # RigL trains sparse from the start
    if args.schedule is not None and not scheduled:
        return "--schedule: rigl trains sparse from the start and follows no schedule"
    if cfg.schedule == "gradual" and args.levels is not None:
        return "--levels sets the sparsities of the one-shot curve; add --schedule oneshot"
    if cfg.schedule == "oneshot" and args.prune_epochs is not None and "rigl" not in cfg.methods:
        return "--prune-epochs sets the gradual schedule's length; a one-shot run has none"
    if cfg.schedule == "gradual" and scheduled and cfg.prune_epochs == 0:
        return (
            "--prune-epochs 0 leaves the gradual schedule no step to prune at; give 1 or more "
            "(or --schedule oneshot)"
        )
    return None


def _config(args: argparse.Namespace) -> PruneConfig:
    # Options left out (None; so that _unused_options sees what was given) take PruneConfig's
    # defaults.
    given = {
        "schedule": args.schedule,
        "prune_epochs": args.prune_epochs,
        "levels": args.levels,
        "fisher_samples": args.fisher_samples,
        "block_size": args.block_size,
        "damping": args.damping,
    }
    return PruneConfig(
        task=args.task,
        task_options=task_option_values(args.task, args.task_option),
        methods=args.method or ["magnitude"],
        sparsity=args.sparsity,
        scope=args.scope or "global",
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        lr=args.lr,
        seed=args.seed,
        obs_update=not args.no_obs_update,
        progress=not args.no_progress,
        **{k: v for k, v in given.items() if v is not None},
    )


def _write(args: argparse.Namespace, report: dict[str, Any]) -> int:
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite_json(report), indent=2, allow_nan=False))  # (standard JSON)
    png = plot(report, args.plot or out.with_suffix(".png"))
    print(f"dense accuracy {report['dense']['test_accuracy']:.4f}")
    for r in report["runs"]:
        f = r["final"]
        print(
            f"{r['method']:>11}: sparsity {f['sparsity']:.3f}  accuracy {f['test_accuracy']:.4f}  "
            f"PPE {f['pruned_parameter_efficiency']:.2f}  checkpoint {f['checkpoint']['compact_over_dense']:.2f}x dense"
        )
    print(f"wrote {out} and {png}")
    return 0


def _sparsity(text: str) -> float:
    try:
        return check_sparsity(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand."""
    p = subparsers.add_parser(
        "prune",
        help="train, prune, fine-tune and report accuracy against sparsity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument(
        "--method",
        nargs="+",
        action="extend",
        choices=available_pruners(),
        metavar="METHOD",
        help="pruning method(s); several, or the flag repeated, compare them (default: "
        f"magnitude; valid: {', '.join(available_pruners())})",
    )
    p.add_argument("--sparsity", type=_sparsity, default=0.9, help="final sparsity in [0, 1)")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"default: {PruneConfig.schedule}")
    p.add_argument(
        "--scope",
        choices=("global", "layer"),
        help="rank the weights over the whole model (default: global) or layer by layer",
    )
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    p.add_argument(
        "--prune-epochs",
        type=int,
        help=f"epochs of the gradual schedule (default {PruneConfig.prune_epochs})",
    )
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--levels", type=_sparsity, nargs="+", help="one-shot: sparsities of the curve")
    for flag, name, kind in (
        ("--fisher-samples", "fisher_samples", int),
        ("--block-size", "block_size", int),
        ("--damping", "damping", float),
    ):
        p.add_argument(flag, type=kind, help=f"WoodFisher (default {getattr(PruneConfig, name):g})")  # fmt: skip
    p.add_argument(
        "--no-obs-update", action="store_true", help="WoodFisher without the OBS update (OBD-like)"
    )
    p.add_argument("--report", required=True, help="JSON report path (the PNG goes next to it)")
    p.add_argument("--plot", help="PNG path (default: the report's path with .png)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_main, _parser=p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sparsetrain prune`` with ``argv`` (default: this process's command-line flags)."""
    parser = argparse.ArgumentParser(prog="sparsetrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prune", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
