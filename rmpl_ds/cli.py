"""The `rmpl-ds` command line: a thin front over the library.

Each subcommand lives in ``rmpl_ds/commands/<name>.py`` and exposes three names:

* ``HELP``: one line for ``rmpl-ds --help``;
* ``add_arguments(parser)``: its arguments (the parser's description is the module docstring);
* ``run(args) -> int``: the work; heavy imports (torch, deepspeed) happen inside it, so ``--help`` is fast.

A :class:`~rmpl_ds.errors.UserError` is printed as one line-block without a traceback and exits 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from rmpl_ds import __version__
from rmpl_ds.errors import USER_ERROR_EXIT, UserError
from rmpl_ds.log import setup_logging

# Subcommand name -> module. Registered explicitly (no discovery), in the order `--help` lists them.
SUBCOMMANDS: dict[str, str] = {
    "check": "rmpl_ds.commands.check",
    "mix": "rmpl_ds.commands.mix",
    "plan": "rmpl_ds.commands.plan",
    "shards": "rmpl_ds.commands.shards",
    "demo-data": "rmpl_ds.commands.demo_data",
    "score": "rmpl_ds.commands.score",
    "train": "rmpl_ds.commands.train",
    "pipeline": "rmpl_ds.commands.pipeline",
    "smoke": "rmpl_ds.commands.smoke",
    "eval": "rmpl_ds.commands.eval",
    "pseudo-label": "rmpl_ds.commands.pseudo_label",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmpl-ds",
        description="Distributed fine-tuning of vision-language models for multimedia event extraction (RMPL).",
    )
    parser.add_argument("--version", action="version", version=f"rmpl-ds {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rmpl-ds` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides (key.path=value) may follow options, which a `nargs="*"` positional cannot take; collect them.
    overrides = [token for token in extra if "=" in token and not token.startswith("-")]
    if extra != overrides or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    setup_logging("DEBUG" if args.debug else "INFO")
    try:
        return int(args._run(args) or 0)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"rmpl-ds {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"rmpl-ds {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `rmpl-ds mix ... | head`): stop quietly, as Unix tools do.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (keeps Python's exit-time flush from failing again)
        return 0


if __name__ == "__main__":
    sys.exit(main())
