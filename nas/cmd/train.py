"""`nas train`: float training of a space's model, keeping the best checkpoint."""

from __future__ import annotations

import argparse

from nas.cmd.checks import check_flags
from nas.cmd.common import add_data_options
from nas.table import format_table


def add_parser(sub, parents) -> None:
    p = sub.add_parser("train", parents=parents, help="train the float baseline of a space",
                       description="Train a space's model in fp32 and keep the checkpoint with "
                                   "the best accuracy on the held-out arch split.")
    p.add_argument("--space", help="search space name or .yaml path (default: the embedded "
                                   "default space)")
    p.add_argument("--budget", help="time or epochs: 90s, 5m, 2h, 3ep, '3 epochs' "
                                    "(default: the space's train.budget)")
    p.add_argument("--batch-size", type=int, help="default: the space's train.batch_size")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the space's train.lr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nas.budget import parse_budget
    from nas.checkpoint import float_checkpoint
    from nas.device import resolve_device
    from nas.runs import RunDir
    from nas.space_data import load_space_data
    from nas.spaces import load_space
    from nas.train import TrainConfig, train

    # Cheap checks first; the space's own train values are checked when it loads.
    check_flags(args, batch_size="positive", lr="rate")
    budget = parse_budget(args.budget) if args.budget else None
    space = load_space(args.space)
    budget = budget or parse_budget(space.train["budget"])
    batch_size = args.batch_size or int(space.train["batch_size"])
    lr = args.lr or float(space.train["lr"])
    device = resolve_device(args.device)
    splits = load_space_data(space, args)
    model = space.build_model(seed=args.seed)
    space.layers(model)  # a glob naming no layer fails now, as in the other commands
    params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(budget=budget, batch_size=batch_size, lr=lr,
                      weight_decay=float(space.train["weight_decay"]), seed=args.seed,
                      progress=not args.no_progress)
    print(f"training {space.model} ({params:,} parameters) on {space.data}: "
          f"{len(splits.train)} train / {len(splits.arch)} val / {len(splits.test)} test images, "
          f"budget {budget}, device {device}")

    with RunDir(args.runs_dir, space.name, "train") as run_dir:
        run_dir.write_config({"command": "train", "space": space.to_dict(),
                              "budget": str(budget), "batch_size": batch_size, "lr": lr,
                              "seed": args.seed, "device": str(device),
                              "data_dir": args.data_dir})
        print(f"run folder: {run_dir.path}")

        def on_epoch(record, improved):
            run_dir.log_metrics(record)
            run_dir.log("epoch %(epoch)d: %(val_accuracy).2f%% val", record)
            print(f"epoch {record['epoch']:>3}  {record['seconds']:>7.1f}s  "
                  f"loss {record['train_loss']:.4f}  train {record['train_accuracy']:5.2f}%  "
                  f"val {record['val_accuracy']:5.2f}%" + ("  *" if improved else ""), flush=True)
            if improved:
                run_dir.save_checkpoint("best.pt", float_checkpoint(
                    space, model.state_dict(), {"val_accuracy": record["val_accuracy"]},
                    args.seed))

        result = train(model, splits, cfg, device, on_epoch=on_epoch)
        metrics = {"val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
                   "test_loss": result.test_loss}
        run_dir.save_checkpoint("best.pt", float_checkpoint(space, result.best_state,
                                                           metrics, args.seed))
        summary = {"command": "train", "space": space.name, "model": space.model,
                   "parameters": params, "budget": str(budget), "epochs": result.epochs,
                   "steps": result.steps, "train_seconds": round(result.seconds, 2), **metrics,
                   "checkpoint": "best.pt"}
        final = run_dir.finish(summary)

    print(format_table(["space", "model", "params", "budget", "epochs", "seconds", "val acc %",
                        "test acc %"],
                       [[space.name, space.model, params, str(budget), result.epochs,
                         round(result.seconds, 1), round(result.best_val_accuracy, 2),
                         round(result.test_accuracy, 2)]]))
    print(f"test accuracy: {result.test_accuracy:.2f}%")
    print(f"run folder: {final}")
    print(f"checkpoint: {final / 'best.pt'}")
    return 0
