"""Checks of command-line values shared by the commands.

Each bad value gets a line of its own naming the flag, and the checks run before any data is
loaded, any model trained or any run folder made.
"""

from __future__ import annotations

import argparse
import math

from nas.errors import ConfigError

# Derived seeds reach seed * 104729 + step (nas.search.dnas), which must stay inside the
# 64-bit range torch.Generator.manual_seed takes; numpy's seeds end at 2**32 - 1 too.
SEED_MAX = 2**32 - 1

_KINDS = {
    "positive": (lambda v: v > 0, "must be a positive whole number"),
    "count": (lambda v: v >= 0, "must be 0 or a positive whole number"),
    "rate": (lambda v: math.isfinite(v) and v > 0, "must be a positive, finite number"),
    "fraction": (lambda v: math.isfinite(v) and 0 <= v < 1, "must be at least 0 and below 1"),
}


def check_flags(args: argparse.Namespace, **kinds: str) -> None:
    """Refuse each given flag unless its value is of its kind (a key of _KINDS):
    `batch_size="positive"` checks --batch-size."""
    for dest, kind in kinds.items():
        value = getattr(args, dest, None)
        ok, needs = _KINDS[kind]
        if value is not None and not ok(value):
            raise ConfigError(f"--{dest.replace('_', '-')} {value}: {needs}")


def seed(text: str) -> int:
    """argparse type of --seed: a whole number every seeded generator accepts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give a whole number from 0 "
                                         f"to {SEED_MAX}")
    return value


def check_no_empty_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option given as '' (`--space ""`): the commands would read it as unset and
    silently run their default."""
    names = _option_names(parser)
    for dest, value in vars(args).items():
        if value == "" or (isinstance(value, list) and "" in value):
            name = names.get(dest, dest)
            raise ConfigError(f"{name} is empty; give a value, or leave {name} out")


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the option's name as typed (--batch-size; a positional's metavar), for every
    option of the parser and its subcommands."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names.update(_option_names(sub))
        else:
            names.setdefault(action.dest, action.option_strings[-1] if action.option_strings
                             else action.metavar or action.dest)
    return names
