"""Option helpers shared by the commands: adding their options, checking their values
before any work, and the messages around that work."""

from __future__ import annotations

import argparse


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="dataset folder (default: NAS_DATA_DIR, then the "
                                      "dataset's standard place)")
    p.add_argument("--train-subset", type=int, metavar="N", help="use N training images")
    p.add_argument("--test-subset", type=int, metavar="N", help="use N test images")


def add_compile_jobs_option(p: argparse.ArgumentParser) -> None:
    import os

    default = min(os.cpu_count() or 1, 16)
    p.add_argument("--compile-jobs", type=int, default=default, metavar="N",
                   help=f"compile every candidate kernel in N processes before timing "
                        f"(autotuning then loads them from Triton's cache instead of compiling "
                        f"one after another); 0: compile as timing goes (default {default}, the "
                        f"CPU cores, at most 16)")


def add_latency_options(p: argparse.ArgumentParser, batch_flag: str, default_from: str) -> None:
    """The batch and device a latency cost is for (latency tables are per device and batch);
    unset, they come from `default_from`, else batch 1 on the h200."""
    p.add_argument(batch_flag, type=int,
                   help=f"batch the latency is for (default: {default_from}'s, else 1)")
    p.add_argument("--device-spec",
                   help=f"device whose latency tables and roofline are used, a name under "
                        f"cost_models/devices/ or a .yaml path (default: {default_from}'s, "
                        f"else h200)")


def check_compile_jobs(jobs: int) -> None:
    from nas.errors import ConfigError

    if jobs < 0:
        raise ConfigError(f"--compile-jobs {jobs}: give a number of processes, or 0 to compile "
                          f"as timing goes")


def refuse_dilated(space, command: str) -> None:
    """The Triton kernels have no dilation: a command that runs or compiles them for the
    space's layers refuses a dilated one, before any work (costing it needs no kernel)."""
    from nas.errors import ConfigError

    dilated = [x.info for x in space.layers() if x.info.dilated]
    if dilated:
        i = dilated[0]
        more = f" (and {len(dilated) - 1} more)" if len(dilated) > 1 else ""
        raise ConfigError(
            f"{command}: layer {i.name} of space {space.name} is dilated "
            f"({i.dilation[0]}x{i.dilation[1]}){more}, and the Triton kernels have no dilation; "
            f"nas cost gives its latency as a roofline estimate. To run {command} on the other "
            f"layers, leave it out of the space's searchable and fixed globs")


def check_output_file(path, flag: str) -> None:
    """Refuse an output file the command could not write when its work is done, before that
    work starts: not a directory, in an existing folder it may write in."""
    import os
    from pathlib import Path

    from nas.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path, such as "
                          f"{path / 'table.json'}")
    # Its folder is made when the file is written: the nearest one that exists must take it.
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: {folder} is a file, not a folder; give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: folder {folder} is not writable; give another path")


def compile_ahead(space: str | None, batches, jobs: int, device, precisions=None,
                  layers=None, prepadded: bool = False) -> None:
    """Compile the kernels a GPU would try for `space` at each batch (only `precisions` and
    the layers named in `layers`, where given; with `prepadded`, those of each padded layer
    on a bordered input too: `LayerInfo.prepadded`), `jobs` processes at once, into Triton's
    on-disk cache; says how long it took. Nothing with `jobs` 0 (the command has checked
    `jobs` with check_compile_jobs before needing a GPU)."""
    import sys
    import time

    from nas.errors import ConfigError
    from nas.kernels.aot import warm_cache

    if jobs == 0:
        return
    started = time.monotonic()
    try:
        count = sum(warm_cache(space, batch, jobs, device=device.type, precisions=precisions,
                               layers=layers, prepadded=prepadded) for batch in batches)
    except ConfigError as e:  # only a head start was lost: timing compiles what it needs
        print(f"warning: {e}; kernels compile as timing goes", file=sys.stderr, flush=True)
        return
    print(f"compiled {count} candidate kernels in {time.monotonic() - started:.1f} s with "
          f"{jobs} processes (Triton's cache; autotuning loads them)", flush=True)


def recorded_space(plan, source: str) -> str:
    """The shipped space a plan records, for a command given a plan and no --space; a space
    loaded from a file records only its name, which the user must point at again."""
    from nas.errors import ConfigError
    from nas.spaces import list_spaces

    if plan.space not in list_spaces():
        raise ConfigError(f"plan {source} is for space {plan.space}, which is not a shipped "
                          f"space; give its YAML file with --space PATH")
    return plan.space
