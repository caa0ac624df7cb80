"""The ``sparsetrain`` command: one subcommand a module under ``sparsetrain.commands``.

Each module there defines ``register(subparsers)``, which adds its parser and sets
``func=<callable taking the parsed args and returning an exit code>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Adding a subcommand: write sparsetrain/commands/<name>.py and add its name here.
_COMMANDS = ("train", "demo", "prune", "bench", "simulate", "robust-matrix")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrain",
        description="Cheaper data-parallel training by sparsity: compressed gradients, sparse "
        "collectives, pruning and Byzantine-robust aggregation.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"sparsetrain.commands.{name.replace('-', '_')}").register(sub)
    _plain_descriptions(parser)
    return parser


def _plain_descriptions(parser: argparse.ArgumentParser) -> None:
    """Drop the docstrings' reStructuredText literal marks (``x``) from the help of every
    subcommand, whose descriptions come from module docstrings."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if child.description:
                    child.description = child.description.replace("``", "")
                _plain_descriptions(child)


class _PreParser(argparse.ArgumentParser):
    """Reads ``--task-module`` ahead of the commands' parser and leaves every error to it."""

    def error(self, message: str):  # (an ambiguous prefix called this, past exit_on_error)
        raise argparse.ArgumentError(None, message)


def _load_task_modules(argv: list[str] | None) -> None:
    """Import the modules ``SPARSETRAIN_TASK_MODULES`` and ``--task-module`` name, wherever the
    option stands in ``argv``, before the parser is built: their tasks are then among
    ``--task``'s choices (and ``--help``'s). One that is missing or registers no task is a
    usage error naming it; an error the module raises itself keeps its traceback."""
    from .tasks import TASK_MODULES_ENV, TaskModuleError, add_task_modules, available_tasks

    try:
        available_tasks()  # the environment's modules
    except TaskModuleError as e:
        _usage_error(f"{TASK_MODULES_ENV}: {e}")
    pre = _PreParser(add_help=False, exit_on_error=False)
    pre.add_argument("--task-module", action="append", default=[])
    # The commands' other options it is a prefix of or shares one with: an abbreviation
    # (--task-mod) then resolves as the command's parser resolves it.
    pre.add_argument("--task")
    pre.add_argument("--task-option", action="append")
    try:
        entries = pre.parse_known_args(argv)[0].task_module
    except argparse.ArgumentError:  # (--task without a value): the command's own parser
        return  # says what is wrong, in its words
    if entries:
        try:
            add_task_modules(entries)
        except TaskModuleError as e:
            _usage_error(f"argument --task-module: {e}")


def _usage_error(message: str) -> None:
    """Exit as argparse does on a bad value: the message on stderr, status 2."""
    print(f"sparsetrain: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    try:  # building the parser imports torch (seconds): Ctrl-C then too is a quiet exit
        _load_task_modules(argv)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # on a line of its own, after a progress bar
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): quiet, as for other Unix tools
        from .commands.train import quiet_stdout

        quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that signal stopped


if __name__ == "__main__":
    sys.exit(main())
