"""`nas report`: figures, their data and a summary of search, ptq and qat runs of one space."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub, parents) -> None:
    p = sub.add_parser("report", parents=parents,
                       help="figures and a summary of search, ptq and qat runs",
                       description="Accuracy against size, BitOps and latency for every plan "
                                   "the runs scored (each run's Pareto front as a step line, "
                                   "the space's uniform plans marked), each run's plan layer "
                                   "by layer, the data behind every figure as CSV, and "
                                   "report.md showing them. The runs must share a space and a "
                                   "latency cost model.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders of nas search, ptq or qat")
    p.add_argument("--output", help="write the report to this new folder instead of a run "
                                    "folder under --runs-dir")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nas.report.build import SUMMARY_HEADERS, build, summary_table
    from nas.report.collect import check_comparable, read_run
    from nas.report.costs import ReportCosts
    from nas.report.data import summary_rows
    from nas.table import format_table

    runs = [read_run(folder) for folder in args.runs]
    check_comparable(runs)
    output = Path(args.output) if args.output else None
    _check_output(output, args.runs_dir)
    costs = ReportCosts(runs[0].space, *runs[0].latency)
    config = {"command": "report", "runs": [str(r.folder) for r in runs],
              "space": runs[0].space.to_dict(), "latency_device": costs.device,
              "latency_batch": costs.batch}
    summary = summary_rows(runs, costs)
    if output is None:
        from nas.runs import RunDir

        with RunDir(args.runs_dir, runs[0].space.name, "report") as run_dir:
            run_dir.write_config(config)
            build(runs, costs, run_dir.path)
            folder = run_dir.finish({"command": "report", "runs": config["runs"],
                                     "plans": summary})
    else:
        folder = _write_output(output, runs, costs, config, summary)
    print(format_table(SUMMARY_HEADERS, summary_table(summary)))
    for path in sorted(folder.glob("*.png")):
        print(f"figure: {path}")
    print(f"report: {folder / 'report.md'}")
    return 0


def _check_output(output: Path | None, runs_dir: str) -> None:
    from nas.errors import ConfigError
    from nas.runs import check_runs_dir

    if output is None:
        check_runs_dir(Path(runs_dir))
    elif output.exists():
        raise ConfigError(f"--output {output} already exists; give a new folder, or leave "
                          f"--output out to write a run folder under --runs-dir")


def _write_output(output: Path, runs, costs, config: dict, summary: list[dict]) -> Path:
    """The report in --output, written as `<output>.partial` and renamed when whole."""
    import json
    import os
    import shutil

    import yaml

    from nas.report.build import build
    from nas.runs import PARTIAL, _plain, atomic_write_text

    partial = output.with_name(output.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # an earlier report stopped mid-way
    partial.mkdir(parents=True)
    try:
        atomic_write_text(partial / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False))
        build(runs, costs, partial)
        atomic_write_text(partial / "summary.json", json.dumps(_plain(
            {"command": "report", "runs": config["runs"], "plans": summary}), indent=2) + "\n")
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output
