"""``sparsetrain robust-matrix``: final test accuracy of every aggregator under every attack.

Each cell trains the task with ``--workers`` workers of which the last ``--byzantine`` attack.
``--simulate`` runs the workers in one process (fast, for wide sweeps); without it every cell is
a real multi-process gloo run (one process a worker) through ``sparsetrain.sync.robust_exchange``.
Writes the table to stdout and ``robust_matrix.json``, and a heatmap ``robust_matrix.png``, into
``--out-dir``, with the worst case over attacks for every aggregator.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import queue
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from typing import Any

import torch

from .._options import plain
from .._procs import (
    launcher_state,
    stop_with_parent,
    too_many_processes,
    worker_start_method,
)
from ..robust import (
    aggregator_class,
    available_aggregators,
    available_attacks,
    build,
    get_aggregator,
    get_attack,
)
from ..robust.attacks import attack_option_names, check_attack
from ..robust.base import option_names
from ..robust.simulate import (
    RobustRunConfig,
    batch_generator,
    draw,
    evaluate,
    shards,
    simulate,
    write_grads,
)
from .train import add_task_arguments, positive_float, seed_value, task_option_values

DEFAULT_AGGREGATORS = "mean,median,trimmed_mean,krum,geometric_median,centered_clipping,safeguard"
DEFAULT_ATTACKS = "none,sign_flip,label_flip,gaussian,zero,delayed,alie,ipm,safeguard"


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``NAME.KEY=VALUE`` items into {name: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(
                f"--option takes NAME.KEY=VALUE (for example safeguard.window1=100), got {item!r}"
            )
        lhs, rhs = item.split("=", 1)
        name, key = lhs.split(".", 1)
        out.setdefault(name, {})[key] = _value(rhs)
    return out


def kind_options(kind: str, name: str, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``--option`` values of ``name`` as an ``"aggregator"`` or an ``"attack"``. A name
    that is both (``safeguard``) gives each kind the keys it takes: the rule's window1 and the
    attack's scale were each refused by the other."""
    given = dict(options.get(name, {}))
    if name not in available_aggregators() or name not in available_attacks():
        return given
    takes = (
        option_names(aggregator_class(name))
        if kind == "aggregator"
        else attack_option_names(check_attack(name, {}))
    )
    return {k: v for k, v in given.items() if k in takes}


def largest_f(name: str, n: int, f: int, options: dict | None = None) -> int:
    """Return the largest f' <= f the rule, built with ``options``, accepts with n workers
    (Krum: n > 2f' + 2; bucketing: its base rule's condition on the buckets). Should it accept
    no f, 0 (building it then names what is wrong)."""
    while f > 0:
        try:
            build(name, n, f, dict(options or {}))
            return f
        except ValueError:
            f -= 1
    return f


# ---- real ranks ----------------------------------------------------------------------------
def _rank_main(
    rank: int,
    store_path: str,
    task_name: str,
    task_options: dict,
    cfg: dict,
    results,
    launcher: object = None,
) -> None:
    """One rank of a cell; ``launcher``: a :class:`~sparsetrain._procs.LauncherState` for a
    rank forked from the fork server, put in place when it was unpickled."""
    import torch.distributed as dist

    from ..sync.robust_exchange import robust_exchange
    from ..tasks import get_task
    from ..train import rank_seed

    torch.set_num_threads(1)
    stop_with_parent()
    try:
        config = RobustRunConfig(**cfg)
        n = config.workers
        dist.init_process_group(
            "gloo", store=dist.FileStore(store_path, n), rank=rank, world_size=n
        )
        task = get_task(task_name, config.seed, **task_options)
        rule, attack = config.build()
        torch.manual_seed(config.seed)
        model = task.build_model()  # the same on every rank
        # From here each rank draws its own random numbers (a task's Dropout masks), as
        # sparsetrain train's ranks do: with one stream every worker drew the same masks.
        torch.manual_seed(rank_seed(config.seed, rank))
        opt = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        x, y = task.train.tensors
        mine = shards(len(y), n, config.seed, config.split)[rank]
        gen = batch_generator(config.seed, rank)
        byzantine = rank >= n - config.byzantine
        diverged = False
        for step in range(config.steps):
            idx = draw(mine, config.batch_size, gen)
            yb = y[idx]
            if byzantine and attack is not None and attack.flips_labels:
                yb = attack.flip_labels(yb, task.num_classes)
            opt.zero_grad()
            task.loss_fn(model(x[idx]), yb).backward()
            flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            update, _ = robust_exchange(
                flat,
                key="model",
                aggregator=rule,
                attack=attack,
                byzantine=config.byzantine,
                step=step,
            )
            rule.end_step()
            if not bool(torch.isfinite(update).all()):
                diverged = True  # scored 0, as the one-process simulation scores it
                break
            write_grads(model, update)
            opt.step()
        accuracy = 0.0 if diverged else evaluate(model, task.test)
        results.put((rank, "ok", {"accuracy": accuracy, "diverged": diverged}, rule.stats()))
        dist.destroy_process_group()
    except Exception:
        results.put((rank, "error", traceback.format_exc(), None))
        if dist.is_initialized():  # before the interpreter's end, where gloo's threads abort
            dist.destroy_process_group()


def _answers(procs: list, results: Any, timeout_s: float) -> dict[int, tuple]:
    """Every rank's (accuracy, stats) from the ``results`` queue, or a RuntimeError naming the
    cause: a rank's Python error, or a rank that died without putting anything (a nonzero exit
    code: killed, by the out-of-memory killer say, or crashed in native code), which its peers
    see first as a lost connection and report as their own error."""
    answers: dict[int, tuple] = {}  # rank: (status, value, stats), in the order they came
    deadline = time.monotonic() + timeout_s
    first_error = None  # when the first error came

    def take(wait: float) -> None:
        try:
            rank, status, value, stats = results.get(timeout=wait)
            answers[rank] = (status, value, stats)
            while True:  # and whatever else is there already
                rank, status, value, stats = results.get_nowait()
                answers[rank] = (status, value, stats)
        except queue.Empty:
            pass

    while True:
        take(0.5)
        dead = [r for r, p in enumerate(procs) if p.exitcode and r not in answers]
        if dead:
            take(0.1)  # a message put just before the exit (the interpreter's end can abort)
            dead = [r for r, p in enumerate(procs) if p.exitcode and r not in answers]
        errors = [r for r, a in answers.items() if a[0] != "ok"]
        if dead:
            then = ""
            if errors:
                lines = str(answers[errors[0]][1]).strip().splitlines() or [""]
                then = f"; rank {errors[0]} then failed too ({lines[-1]})"
            raise RuntimeError(
                f"rank {dead[0]} of {len(procs)} died without a result (exit code "
                f"{procs[dead[0]].exitcode}): killed (out of memory, or from outside) or crashed "
                f"in native code{then}"
            )
        if errors:
            # Wait a moment for a death that caused it, unless every rank has answered.
            first_error = time.monotonic() if first_error is None else first_error
            if len(answers) == len(procs) or time.monotonic() - first_error > 2.0:
                raise RuntimeError(f"rank {errors[0]} failed:\n{answers[errors[0]][1]}")
        elif len(answers) == len(procs):
            return {r: (value, stats) for r, (_, value, stats) in answers.items()}
        elif time.monotonic() > deadline:
            raise RuntimeError(
                f"the ranks gave no result within {timeout_s:g} s ({len(answers)} of "
                f"{len(procs)} finished)"
            )


def run_ranks(
    task_name: str,
    config: RobustRunConfig,
    timeout_s: float = 600.0,
    task_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train with one gloo process a worker; return rank 0's final accuracy and rule stats.
    ``task_options``: keyword options of the task's factory."""
    import torch.multiprocessing as mp

    from ..train import _exit_on_sigterm

    method = worker_start_method()  # (forked from the fork server, as launch()'s workers are)
    ctx = mp.get_context(method)
    results = ctx.Queue()
    # SIGTERM (`timeout`, a scheduler, kill) and SIGHUP end this process through its clean-up:
    # they left the workers training their cell, and the temporary folder behind.
    restore = _exit_on_sigterm()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            procs = [
                ctx.Process(
                    target=_rank_main,
                    args=(
                        r,
                        store,
                        task_name,
                        dict(task_options or {}),
                        asdict(config),
                        results,
                        launcher_state(method),
                    ),  # fmt: skip
                )
                for r in range(config.workers)
            ]
            try:
                for p in procs:
                    p.start()
                out = _answers(procs, results, timeout_s)
            except BaseException:  # leaving early (a signal, Ctrl-C, a failed cell): at once
                for p in procs:
                    if p.is_alive():
                        p.kill()
                raise
            finally:
                for p in procs:
                    if p.pid is not None:
                        p.join(timeout=10)
                        if p.is_alive():
                            p.kill()
    finally:
        restore()
    return {**out[0][0], "aggregator_stats": out[0][1]}


# ---- the matrix ----------------------------------------------------------------------------
def run_matrix(
    task_name: str,
    base: RobustRunConfig,
    aggregators: list[str],
    attacks: list[str],
    options: dict[str, dict[str, Any]],
    simulate_mode: bool = True,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
    partial: str | None = None,
) -> dict[str, Any]:
    """Return {"cells": [...], "worst": {aggregator: {"accuracy": lowest accuracy over the
    attacks, "attack": the attack that gave it}}, "config": ...}. ``options``: {name: {key:
    value}} of the aggregators and attacks (:func:`kind_options`); ``task_options``: keyword
    options of the task's factory; ``timeout_s``: the most one cell on real ranks may take.
    Where a cell fails or is stopped, the cells finished before it are written to the JSON
    file ``partial`` (if given) before the error goes on."""
    from tqdm import tqdm

    from ..tasks import check_model_output, check_task_options, get_task, require_tensor_data

    for a in aggregators:
        aggregator_class(a)
    bad = [a for a in attacks if a != "none" and a not in available_attacks()]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; valid: none, {', '.join(available_attacks())}")
    task_options = dict(task_options or {})
    check_task_options(task_name, task_options)
    task = get_task(task_name, base.seed, **task_options)
    require_tensor_data(task, task_name, "robust-matrix")  # (its ranks read it so too)
    check_model_output(task)
    task = task if simulate_mode else None
    cells = []
    bar = tqdm(
        [(g, a) for g in aggregators for a in attacks], disable=not progress, desc="robust-matrix"
    )
    for agg, att in bar:
        bar.set_postfix_str(f"{agg} x {att}")
        byz = 0 if att == "none" else base.byzantine
        rule_options = kind_options("aggregator", agg, options)
        rule_f = largest_f(agg, base.workers, base.byzantine, rule_options)
        cfg = replace(
            base,
            byzantine=byz,
            aggregator=agg,
            aggregator_options=rule_options,
            aggregator_f=rule_f,
            attack=None if att == "none" else att,
            attack_options={} if att == "none" else kind_options("attack", att, options),
        )
        t0 = time.perf_counter()
        try:
            out = (
                simulate(task, cfg)
                if simulate_mode
                else run_ranks(task_name, cfg, timeout_s=timeout_s, task_options=task_options)
            )
        except BaseException:  # a failed, timed-out or stopped cell: keep the finished ones
            if partial is not None and cells:
                _write_partial(partial, task_name, task_options, simulate_mode, cells, agg, att)
            raise
        stats = out["aggregator_stats"]
        cells.append(
            {
                "aggregator": agg,
                "attack": att,
                "accuracy": out["accuracy"],
                "rule_f": rule_f,
                "byzantine": byz,  # 0 in the no-attack column
                "aggregator_options": plain(cfg.aggregator_options),
                "attack_options": plain(cfg.attack_options),
                "diverged": bool(out.get("diverged", False)),
                "removed": stats.get("removed") if isinstance(stats, dict) else None,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    worst = {}
    for agg in aggregators:
        attacked = [c for c in cells if c["aggregator"] == agg and c["attack"] != "none"]
        if attacked:
            w = min(attacked, key=lambda c: c["accuracy"])
            worst[agg] = {"accuracy": w["accuracy"], "attack": w["attack"]}
    # What every cell shares; each cell records its own rule, attack and their options (the
    # base's placeholders for them described no cell, and the options went unrecorded).
    per_cell = ("aggregator", "aggregator_options", "aggregator_f", "attack", "attack_options")
    return {
        "config": {k: v for k, v in asdict(base).items() if k not in per_cell},
        "options": plain(options),
        "task": task_name,
        "task_options": plain(task_options),
        "simulate": simulate_mode,
        "cells": cells,
        "worst": worst,
    }


def _write_partial(
    path: str, task_name: str, task_options, simulate_mode: bool, cells: list, agg: str, att: str
) -> None:
    """Write the cells finished so far to ``path`` and say so on stderr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(
            {"task": task_name, "task_options": plain(task_options), "simulate": simulate_mode,
             "stopped_at": {"aggregator": agg, "attack": att}, "cells": cells},
            fh, indent=1, default=str,
        )  # fmt: skip
    print(
        f"\nrobust-matrix: stopped at {agg} x {att}; the {len(cells)} cell(s) finished before "
        f"it are in {path}",
        file=sys.stderr,
        flush=True,
    )


def _row_labels(result: dict[str, Any]) -> dict[str, str]:
    """Each aggregator's row label: its name, with the f it was built for where that is below
    the run's Byzantine count (``krum(f=3)``)."""
    rule_f = {c["aggregator"]: c["rule_f"] for c in result["cells"]}
    byzantine = result["config"]["byzantine"]
    return {g: g if f == byzantine else f"{g}(f={f})" for g, f in rule_f.items()}


def format_table(result: dict[str, Any]) -> str:
    cells = result["cells"]
    aggs = list(dict.fromkeys(c["aggregator"] for c in cells))
    atts = list(dict.fromkeys(c["attack"] for c in cells))
    acc = {(c["aggregator"], c["attack"]): c["accuracy"] for c in cells}
    labels = _row_labels(result)
    width = max(len(v) for v in labels.values()) + 2
    head = "aggregator".ljust(width) + "".join(f"{a[:11]:>12}" for a in atts) + f"{'worst':>12}"
    lines = [head, "-" * len(head)]
    for g in aggs:
        row = labels[g].ljust(width) + "".join(f"{100 * acc[(g, a)]:12.1f}" for a in atts)
        worst = result["worst"].get(g)
        row += f"{100 * worst['accuracy']:12.1f}" if worst else f"{'':>12}"
        lines.append(row)
    return "\n".join(lines)


def plot_heatmap(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import fitted_title

    cells = result["cells"]
    aggs = list(dict.fromkeys(c["aggregator"] for c in cells))
    atts = list(dict.fromkeys(c["attack"] for c in cells)) + ["worst"]
    acc = {(c["aggregator"], c["attack"]): 100 * c["accuracy"] for c in cells}
    for g in aggs:
        w = result["worst"].get(g)
        acc[(g, "worst")] = 100 * w["accuracy"] if w else float("nan")
    grid = torch.tensor([[acc[(g, a)] for a in atts] for g in aggs]).numpy()
    fig, ax = plt.subplots(figsize=(1.1 * len(atts) + 2, 0.55 * len(aggs) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(atts)), atts, rotation=35, ha="right")
    labels = _row_labels(result)  # (as the table's)
    ax.set_yticks(range(len(aggs)), [labels[g] for g in aggs])
    for i in range(len(aggs)):
        for j in range(len(atts)):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    c = result["config"]
    mode = "simulated" if result["simulate"] else "real ranks"
    title = (
        f"{result['task']}: test accuracy (%), {c['byzantine']} of {c['workers']} Byzantine "
        f"({c.get('split', 'iid')} split), {mode}"
    )
    ax.set_title(fitted_title(fig, title))  # a small matrix cut it off
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _names(text: str, valid: list[str], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no {what} given ({text!r}); valid: {', '.join(valid)}")
    bad = [t for t in names if t not in valid]
    if bad:
        raise ValueError(f"unknown {what} {bad}; valid: {', '.join(valid)}")
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise ValueError(f"{what} given more than once: {', '.join(twice)}")
    return names


def run(args: argparse.Namespace) -> int:
    from .train import check_outputs

    check_outputs(args._parser, out_dir=args.out_dir)
    try:
        result = _run(args)
    except (ValueError, TypeError) as e:  # bad names, options or counts: a usage error
        args._parser.error(str(e))
    print(format_table(result))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "robust_matrix.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    plot_heatmap(result, os.path.join(args.out_dir, "robust_matrix.png"))
    print(f"wrote {args.out_dir}/robust_matrix.json and {args.out_dir}/robust_matrix.png")
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    base = RobustRunConfig(
        workers=args.workers,
        byzantine=args.byzantine,
        attack="zero" if args.byzantine else None,  # placeholder, replaced per cell
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        seed=args.seed,
        split=args.split,
    )
    aggregators = _names(args.aggregators, available_aggregators(), "aggregator(s)")
    attacks = _names(args.attacks, ["none", *available_attacks()], "attack(s)")
    if not args.byzantine and attacks != ["none"]:
        if args.attacks != DEFAULT_ATTACKS:  # asked for by name: each column would be "none"
            raise ValueError(
                f"--attacks {args.attacks} needs --byzantine >= 1: with no Byzantine worker no "
                "one attacks (give --attacks none, or the number of attackers)"
            )
        attacks = ["none"]  # the default list: only the column that means something
    if not args.simulate:  # one process a worker, every cell
        problem = too_many_processes(
            args.workers, f"--workers {args.workers}",
            remedy="or run the workers in one process with --simulate",
        )  # fmt: skip
        if problem:
            raise ValueError(problem)
    options = parse_options(args.option)
    unused = sorted(set(options) - set(aggregators) - set(attacks))
    if unused:
        raise ValueError(
            f"--option {', '.join(f'{n}.…' for n in unused)}: no selected aggregator or attack "
            f"is named {', '.join(map(repr, unused))} (selected: {', '.join(aggregators)}; "
            f"{', '.join(attacks)})"
        )
    if "none" in options:
        raise ValueError(
            f"--option {', '.join(f'none.{k}' for k in options['none'])}: the 'none' column "
            "(no attack) takes no options"
        )
    for name in set(options) & set(available_aggregators()) & set(available_attacks()):
        taken = (
            kind_options("aggregator", name, options).keys()
            | kind_options("attack", name, options).keys()
        )
        left = sorted(k for k in options[name] if k not in taken and k not in ("n", "f"))
        if left:
            raise ValueError(
                f"--option {', '.join(f'{name}.{k}' for k in left)}: {name!r} is an aggregator "
                f"and an attack, and neither takes {', '.join(map(repr, left))}; the "
                f"aggregator takes: {', '.join(option_names(aggregator_class(name)))}; the "
                f"attack: {', '.join(attack_option_names(check_attack(name, {})))}"
            )
        # An option of the kind not selected would be recorded and used by no cell.
        for kind, selected, where in (
            ("aggregator", aggregators, "--aggregators"),
            ("attack", attacks, "--attacks"),
        ):
            unused_keys = sorted(kind_options(kind, name, options)) if name not in selected else []
            if unused_keys:
                raise ValueError(
                    f"--option {', '.join(f'{name}.{k}' for k in unused_keys)}: "
                    f"{'an option' if len(unused_keys) == 1 else 'options'} of the {name} "
                    f"{kind}, which is not among {where}"
                )
    fixed = sorted(f"{name}.{k}" for name, opts in options.items() for k in opts if k in ("n", "f"))
    if fixed:
        raise ValueError(
            f"--option {', '.join(fixed)}: n and f are set for every rule and attack by "
            "--workers and --byzantine (each rule tolerates the most Byzantine workers it can, "
            "up to --byzantine)"
        )
    # Build every rule and attack once here, so a bad option is a usage error now, not a
    # traceback from the worker processes of the first cell that uses it.
    for name in aggregators:
        rule_options = kind_options("aggregator", name, options)
        f = largest_f(name, args.workers, args.byzantine, rule_options)
        get_aggregator(name, n=args.workers, f=f, **rule_options)
    for name in attacks:
        if name != "none" and args.byzantine:
            get_attack(
                name, n=args.workers, f=args.byzantine, **kind_options("attack", name, options)
            )
    return run_matrix(
        args.task,
        base,
        aggregators,
        attacks,
        options,
        simulate_mode=args.simulate,
        task_options=task_option_values(args.task, args.task_option),
        timeout_s=args.timeout,
        partial=os.path.join(args.out_dir, "robust_matrix.partial.json"),
    )


class _JoinNames(argparse.Action):
    """Names given comma-separated, space-separated or both, kept as one comma-separated
    string (``--aggregators mean median`` had failed as an unrecognized argument)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, ",".join(values))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "robust-matrix",
        help="final test accuracy of aggregators x Byzantine attacks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument("--workers", type=int, default=10, help="workers in every cell (default 10)")
    p.add_argument(
        "--byzantine",
        type=int,
        default=4,
        help="attacking workers, the last ones (default 4; 0: only the no-attack column)",
    )
    for flag, default, what in (
        ("--aggregators", DEFAULT_AGGREGATORS, "rules"),
        ("--attacks", DEFAULT_ATTACKS, "attacks ('none' = no attack)"),
    ):
        p.add_argument(
            flag,
            nargs="+",
            action=_JoinNames,
            default=default,
            metavar="NAMES",
            help=f"{what}, comma- or space-separated (default: {default})",
        )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="an option of an aggregator or attack, e.g. safeguard.window1=100 or sign_flip.scale=10",
    )
    p.add_argument("--steps", type=int, default=300, help="SGD steps a cell (default 300)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="examples a worker a step (default 32)"
    )
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of every cell (default 0)")
    p.add_argument(
        "--split",
        choices=("iid", "shard"),
        default="iid",
        help="iid: every worker samples the whole training set; shard: disjoint shards "
        "(default iid)",
    )
    p.add_argument("--simulate", action="store_true", help="run the workers in one process")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="the most one cell may take on real ranks (default 600); where a cell fails or "
        "is stopped, the cells finished before it are kept in <out-dir>/robust_matrix.partial.json",
    )
    p.add_argument(
        "--out-dir",
        default="robust-matrix",
        help="folder of robust_matrix.json and robust_matrix.png (default ./robust-matrix)",
    )
    p.set_defaults(func=run, _parser=p)
