"""`nas eval`: evaluate a checkpoint on its space's test split."""

from __future__ import annotations

import argparse

from nas.cmd.checks import check_flags
from nas.cmd.common import add_data_options
from nas.table import format_table


def add_parser(sub, parents) -> None:
    p = sub.add_parser("eval", parents=parents, help="evaluate a checkpoint",
                       description="Evaluate a checkpoint written by 'nas train' on the test "
                                   "split of the space it was trained in.")
    p.add_argument("--checkpoint", required=True, help="path to a best.pt")
    p.add_argument("--split", choices=("test", "arch"), default="test")
    p.add_argument("--batch-size", type=int, default=512)
    add_data_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nas.checkpoint import load_model
    from nas.data import make_loader
    from nas.device import resolve_device
    from nas.runs import RunDir
    from nas.space_data import load_space_data
    from nas.train import evaluate

    check_flags(args, batch_size="positive")
    space, model, payload = load_model(args.checkpoint)
    device = resolve_device(args.device)
    splits = load_space_data(space, args)
    split = getattr(splits, args.split)
    with RunDir(args.runs_dir, space.name, "eval") as run_dir:
        run_dir.write_config({"command": "eval", "checkpoint": args.checkpoint,
                              "split": args.split, "space": space.to_dict(), "seed": args.seed})
        metrics = evaluate(model.to(device), make_loader(split, args.batch_size, shuffle=False),
                           device)
        final = run_dir.finish({"command": "eval", "checkpoint": args.checkpoint,
                                "split": args.split, **metrics})
    print(format_table(["space", "model", "split", "images", "accuracy %", "loss"],
                       [[space.name, space.model, args.split, metrics["samples"],
                         round(metrics["accuracy"], 2), round(metrics["loss"], 4)]]))
    print(f"{args.split} accuracy: {metrics['accuracy']:.2f}%")
    print(f"run folder: {final}")
    return 0
