"""The `nas` command line: parses, calls the library, maps user errors to one line and exit 2."""

from __future__ import annotations

import argparse
import sys
import traceback

from nas.cmd.checks import seed
from nas.errors import NasError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`nas: error: ...`) and exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"nas: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """--debug, --seed, --runs-dir, --device: accepted before or after the command.

    The copy attached to each command uses SUPPRESS defaults so it never overwrites a value
    given before the command.
    """
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--debug", action="store_true", default=d(False),
                   help="show tracebacks for errors")
    p.add_argument("--seed", type=seed, default=d(0), help="random seed (default 0)")
    p.add_argument("--runs-dir", default=d("runs"), help="where run folders go (default runs/)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d("auto"),
                   help="compute device (default auto: cuda if available)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from nas import __version__
    from nas.cmd import bench, cost, evaluate, export, measure, ptq, qat, search, spaces, train

    parser = _Parser(prog="nas", parents=[_global_options(False)],
                     description="Mixed-precision architecture search for quantized convnets.")
    parser.add_argument("--version", action="version", version=f"nas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parents = [_global_options(True)]
    for module in (train, evaluate, search, ptq, qat, export, cost, measure, spaces, bench):
        module.add_parser(sub, parents)
    return parser


# The commands that write run folders (`cost`, `measure` and `spaces` write none).
_WRITES_RUNS = {"train", "eval", "search", "ptq", "qat", "export", "bench"}


def _check_globals(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks every command needs, before it loads anything."""
    from pathlib import Path

    from nas.cmd.checks import check_no_empty_values
    from nas.runs import check_runs_dir

    check_no_empty_values(parser, args)
    if args.command in _WRITES_RUNS:
        check_runs_dir(Path(args.runs_dir))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _check_globals(parser, args)
        return int(args.run(args) or 0)
    except NasError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"nas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
