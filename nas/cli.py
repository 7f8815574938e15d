"""The `nas` command line: parses, calls the library, maps user errors to one line and exit 2."""

from __future__ import annotations

import argparse
import errno
import os
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
    from nas.cmd import (bench, cost, evaluate, export, measure, ptq, qat, report, search,
                         spaces, train)

    parser = _Parser(prog="nas", parents=[_global_options(False)],
                     description="Mixed-precision architecture search for quantized convnets.")
    parser.add_argument("--version", action="version", version=f"nas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parents = [_global_options(True)]
    for module in (train, evaluate, search, ptq, qat, export, cost, measure, spaces, bench,
                   report):
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
    except BrokenPipeError:
        # The reader of the output left (`nas cost | head -1`): stop quietly, as a command
        # killed by SIGPIPE would, with stdout pointed at nothing so the final flush cannot
        # fail again.
        _silence_stdout()
        return 141
    except OSError as exc:
        message = os_error_message(exc)
        if message is None:  # not the machine's or the user's files: a bug, keep the traceback
            raise
        if args.debug:
            traceback.print_exc()
        print(f"nas: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("nas: interrupted" + _notes(exc), file=sys.stderr)
        return 130


# Failures of the disk or of a path the user gave: what to do about each.
_OS_FIXES = {
    errno.ENOSPC: "free some space, or give --runs-dir on another disk, and run it again",
    errno.EDQUOT: "free some space, or give --runs-dir on another disk, and run it again",
    errno.EROFS: "give --runs-dir (or the output path) on a writable file system",
    errno.EACCES: "check the permissions of the file or folder",
    errno.EPERM: "check the permissions of the file or folder",
    errno.ENAMETOOLONG: "give a shorter path",
    errno.ELOOP: "a symbolic link on the path points back to itself; fix the link",
    errno.EIO: "the disk reported an input/output error; check it and run again",
}


def os_error_message(exc: OSError) -> str | None:
    """One line for an OSError of the file system (disk full, read-only, permissions, a name
    too long); None for any other."""
    fix = _OS_FIXES.get(exc.errno)
    if fix is None:
        return None
    name = "" if exc.filename is None else f"{_shown(str(exc.filename))}: "
    return f"{name}{exc.strerror}; {fix}{_notes(exc)}"


def _notes(exc: BaseException) -> str:
    """What the code the error passed through added (where the run so far is kept)."""
    return "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))


def _shown(path: str) -> str:
    """A path for a one-line message, its middle elided when it is very long."""
    return path if len(path) <= 240 else f"{path[:100]}...{path[-40:]}"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
