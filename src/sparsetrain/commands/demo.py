"""``sparsetrain demo``: dense against top-k against threshold, side by side, in about a minute.

Trains digits-mlp three times on this machine (``none``, ``topk`` and ``threshold`` at density
0.01, error feedback on for the sparse ones) and prints test accuracy, bytes a rank sent, the
ratio to dense allreduce and the time; the report and the picture go to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compressors import option_names
from .train import (
    _compressor_options,
    add_sync_arguments,
    add_training_arguments,
    check_outputs,
    configs_from_args,
    finish,
    run_and_report,
    show_defaults,
    with_flag,
)

DEMO_COMPRESSORS = ["none", "topk", "threshold"]
# Tuned so all three reach dense accuracy on 2 cores within the time the demo promises.
DEMO_DEFAULTS = {"workers": 4, "epochs": 20, "density": 0.01}


def _run(args: argparse.Namespace) -> int:
    if not args.compressor:
        args.compressor = list(DEMO_COMPRESSORS)
    try:
        given = _compressor_options(args, args.compressor)
        if args.density is None and not any("density" in o for o in given.values()):
            args.density = DEMO_DEFAULTS["density"]  # (an --option density=... stands alone)
        configs = configs_from_args(args)
    except (ValueError, TypeError) as e:
        args._parser.error(with_flag(args._parser, str(e)))
    if not args.out.strip():
        args._parser.error("--out needs a folder, got an empty path")
    out = Path(args.out)
    check_outputs(args._parser, out=args.out)
    sparse = [c.name for c in configs if "density" in option_names(c.compressor)]
    at = f" ({', '.join(sparse)} at density {args.density})" if sparse and args.density else ""
    print(
        f"sparsetrain demo: {configs[0].task} on {configs[0].workers} workers (gloo), "
        f"{', '.join(c.name for c in configs)}{at}; results in {out}/"
    )
    code, _ = run_and_report(
        configs, str(out / "report.json"), str(out / "report.png"), args._parser.prog
    )
    return finish(code)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="compare none, topk and threshold at density 0.01 on digits-mlp",
        description="Train digits-mlp with dense allreduce, top-k and threshold sparsification "
        "(density 0.01, error feedback) and print accuracy, bytes a rank sent and time. Every "
        "option of `sparsetrain train` can change the comparison.",
    )
    p.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="folder for report.json and report.png"
    )
    add_sync_arguments(p, compressor_default=" ".join(DEMO_COMPRESSORS))
    add_training_arguments(p, workers=DEMO_DEFAULTS["workers"], epochs=DEMO_DEFAULTS["epochs"])
    show_defaults(p)
    p.set_defaults(func=_run, _parser=p)
    return p
