"""`nas bench ...`: benchmarks that print a table and write JSON into a run folder."""

from __future__ import annotations

import argparse

from nas.cmd.common import add_data_options, now_iso
from nas.table import format_table


def add_parser(sub, parents) -> None:
    p = sub.add_parser("bench", parents=parents, help="run a benchmark",
                       description="Benchmarks: each prints tables and writes JSON.")
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True,
                               parser_class=type(p))
    ptq = benches.add_parser("ptq", parents=parents, help="PTQ accuracy and SQNR on Fashion-MNIST",
                             description="W8A8 vs float, weight-only per-tensor vs per-channel on "
                                         "BN-folded MobileNetV2, W4A8 under every calibration "
                                         "method, for fmnist_resnet8 and fmnist_mobilenetv2.")
    ptq.add_argument("--checkpoint", action="append", default=[], metavar="SPACE=PATH",
                     help="a trained checkpoint per space; spaces without one are trained first")
    ptq.add_argument("--train-budget", help="budget for models trained here "
                                            "(default: each space's train.budget)")
    ptq.add_argument("--calib-batches", type=int, default=8)
    ptq.add_argument("--batch-size", type=int, default=128)
    add_data_options(ptq)
    ptq.set_defaults(run=run_ptq)


def _checkpoints(items: list[str]) -> dict[str, str]:
    from nas.bench.ptq import SPACES
    from nas.errors import ConfigError

    out = {}
    for item in items:
        space, sep, path = item.partition("=")
        if not sep or space not in SPACES:
            raise ConfigError(f"--checkpoint {item!r}: write SPACE=PATH with SPACE one of "
                              f"{', '.join(SPACES)}")
        out[space] = path
    return out


def run_ptq(args: argparse.Namespace) -> int:
    from nas.bench.ptq import SPACES, run_bench, subject_from, tables
    from nas.budget import parse_budget
    from nas.cmd.common import load_space_data
    from nas.cmd.evaluate import load_model
    from nas.cmd.train import CHECKPOINT_FORMAT
    from nas.device import resolve_device
    from nas.runs import RunDir
    from nas.spaces import load_space
    from nas.train import TrainConfig, train

    given = _checkpoints(args.checkpoint)
    device = resolve_device(args.device)
    budget = parse_budget(args.train_budget) if args.train_budget else None
    prepared = []
    for name in SPACES:  # load everything (and fail on bad input) before the run folder exists
        if name in given:
            space, model, _ = load_model(given[name])
            if space.name != name:
                from nas.errors import CheckpointError

                raise CheckpointError(f"--checkpoint {name}={given[name]} holds a model of space "
                                      f"{space.name}")
        else:
            space, model = load_space(name), None
        prepared.append((space, model, load_space_data(space, args)))

    with RunDir(args.runs_dir, "fmnist", "bench-ptq") as run_dir:
        subjects, sources = [], {}
        for space, model, splits in prepared:
            if model is None:
                model = space.build_model()
                b = budget or parse_budget(space.train["budget"])
                print(f"training {space.name} for {b} (no --checkpoint given)", flush=True)
                cfg = TrainConfig(budget=b, batch_size=int(space.train["batch_size"]),
                                  lr=float(space.train["lr"]),
                                  weight_decay=float(space.train["weight_decay"]), seed=args.seed,
                                  progress=False)
                result = train(model, splits, cfg, device)
                path = run_dir.save_checkpoint(f"{space.name}.pt", {
                    "format": CHECKPOINT_FORMAT, "kind": "fp32", "space": space.to_dict(),
                    "state_dict": result.best_state, "seed": args.seed, "created": now_iso(),
                    "metrics": {"test_accuracy": result.test_accuracy}})
                sources[space.name] = f"trained here for {b}: {path.name}"
            else:
                sources[space.name] = given[space.name]
            subjects.append(subject_from(space, model, splits, args.batch_size, args.seed))
        run_dir.write_config({"command": "bench ptq", "checkpoints": sources,
                              "calib_batches": args.calib_batches, "seed": args.seed,
                              "test_subset": args.test_subset, "train_subset": args.train_subset})
        results = run_bench(subjects, args.calib_batches, device,
                            say=lambda line: (print(line, flush=True), run_dir.log(line)))
        results.update({"checkpoints": sources, "calib_batches": args.calib_batches,
                        "seed": args.seed, "device": str(device), "date": now_iso()})
        run_dir.write_json("bench_ptq.json", results)
        final = run_dir.finish({"command": "bench ptq", "json": "bench_ptq.json",
                                "seconds": results["seconds"]})
    for title, headers, rows in tables(results):
        print(f"\n{title}")
        print(format_table(headers, rows))
    print(f"\nrun folder: {final}")
    return 0
