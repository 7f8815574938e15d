"""Pieces shared by the commands: data options and loading a space's data."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="dataset folder (default: NAS_DATA_DIR, then the "
                                      "dataset's standard place)")
    p.add_argument("--train-subset", type=int, metavar="N", help="use N training images")
    p.add_argument("--test-subset", type=int, metavar="N", help="use N test images")


def load_space_data(space, args: argparse.Namespace):
    """Load the space's data, with the command line's subset sizes applied on top."""
    from nas.data import load_data

    kwargs = dict(space.data_kwargs)
    for key in ("train_subset", "test_subset"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    space.data_kwargs = kwargs
    # Validate the merged options before touching any file.
    space.data_info()
    return load_data(space.data, data_dir=args.data_dir, seed=args.seed, **kwargs)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
