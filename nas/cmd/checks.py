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


def checkpoint_space(space_flag: str | None, checkpoint: str, ck_space):
    """The space a command runs a checkpoint's model in: --space where given, so long as its
    model is the checkpoint's (the weights must fit), else the space it was trained for."""
    from nas.errors import CheckpointError
    from nas.spaces import load_space

    if space_flag is None:
        return ck_space
    space = load_space(space_flag)
    if (space.model, space.model_kwargs) != (ck_space.model, ck_space.model_kwargs):
        raise CheckpointError(f"checkpoint {checkpoint} was trained for space {ck_space.name} "
                              f"({_model(ck_space)}), but space {space.name} uses "
                              f"{_model(space)}; leave --space out to use {ck_space.name}, or "
                              f"give a space of the same model")
    # The same model for other data can still differ in its first and last layers.
    have, want = space.data_info(), ck_space.data_info()
    if (have.num_classes, have.in_channels) != (want.num_classes, want.in_channels):
        raise CheckpointError(f"checkpoint {checkpoint} was trained for {_data(want)} (space "
                              f"{ck_space.name}), but space {space.name} has {_data(have)}; "
                              f"leave --space out to use {ck_space.name}, or give a space with "
                              f"the checkpoint's data")
    return space


def _data(info) -> str:
    return (f"{info.num_classes} classes and {info.in_channels} input "
            f"channel{'s' if info.in_channels != 1 else ''}")


def _model(space) -> str:
    return f"{space.model} {space.model_kwargs}" if space.model_kwargs else space.model
