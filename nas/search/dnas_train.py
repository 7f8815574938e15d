"""`nas search --method dnas --workers N`: the supernet search on N data-parallel workers,
run by Ray Train's TorchTrainer (a process group of gloo on CPUs, nccl on GPUs; the steps
themselves are nas.search.dnas.search with nas.search.dnas_parallel.DataParallel).

The driver (this process) hands every worker the same starting point: the supernet's
tensors, its Gumbel generator state, the optimizers' state and the search state (a resumed
run's, saved by any number of workers). Rank 0 writes the log entries and supernet.pt into
the run folder as one worker does (nas.search.dnas_output), last of all the final state,
which the driver then loads to derive the plan. Ray's own output goes to the run's ray.log;
the progress bar follows theta.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.errors import ConfigError, NasError

# A worker group Ray cannot place within this long fails (Ray Train's default is 60 s, which
# with Ray's own start would leave the user waiting longer than a minute for one line). The
# variable Ray Train reads, when set, stands.
START_TIMEOUT_S = 20
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass
class DnasJob:
    """Everything a worker needs, plain data and tensors (pickled to every worker)."""

    space: Any                 # nas.spaces.SearchSpace
    data_args: Any             # SearchRequest.data_args, data_dir absolute
    supernet: dict             # the supernet's state_dict
    gumbel_state: Any
    rng: Any                   # torch's global RNG state
    factored: bool
    mode: str
    cfg: Any                   # nas.search.dnas.DnasConfig
    table: Any                 # the cost table
    state: Any                 # nas.search.dnas.SearchState
    optimizers: dict | None
    output: Any                # nas.search.dnas_output.DnasOutput
    cpus: int
    gpu: bool


def worker_loop(config: dict) -> None:
    """One Ray Train worker: rebuild the supernet, take the steps, rank 0 writes."""
    import torch
    from ray import train

    from nas.search import dnas
    from nas.search.dnas_parallel import DataParallel
    from nas.space_data import load_space_data
    from nas.supernet import Supernet

    job: DnasJob = config["job"]
    torch.set_num_threads(job.cpus)
    if job.gpu:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
    splits = load_space_data(job.space, job.data_args)
    supernet = Supernet(job.space.build_model(), job.space, factored=job.factored,
                        mode=job.mode, tau=job.cfg.tau0, seed=job.cfg.seed)
    supernet.load_state_dict(job.supernet)
    supernet.generator.set_state(job.gumbel_state)
    torch.set_rng_state(job.rng)
    supernet.to(device, memory_format=torch.channels_last)
    parallel = DataParallel(supernet, device)
    out = job.output if train.get_context().get_world_rank() == 0 else None
    state, optimizers, _ = dnas.search(
        supernet, splits, job.table, job.cfg, device, job.state, job.optimizers,
        on_log=out.log if out else None,
        on_save=(lambda s, o: out.save(supernet, s, o)) if out else None, parallel=parallel)
    if out:
        out.save(supernet, state, optimizers)


def run_workers(job: DnasJob, *, workers: int, cpus_per_worker: int, gpus_per_worker: float,
                address: str | None, folder: Path, progress: bool,
                total_steps: int | None, loop=worker_loop) -> None:
    """Run the search on `workers` Ray Train workers until its budget is spent; rank 0
    leaves the final state in folder/supernet.pt. Ray must not be imported before
    `nas.search.ray_address.check_address(address)` has run. `loop` is what each worker runs
    (`worker_loop`, or a benchmark's around it)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from nas.search.tune import quiet_output, ray_session

    log = folder / "ray.log"
    with ray_session(address, lambda: log):
        check_placement(workers, cpus_per_worker, gpus_per_worker)
        timeout = float(os.environ.setdefault(START_TIMEOUT_ENV, str(START_TIMEOUT_S)))
        trainer = TorchTrainer(
            loop, train_loop_config={"job": job},
            torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker, "GPU": gpus_per_worker}),
            run_config=RunConfig(name="ray", storage_path=str(folder.absolute()),
                                 failure_config=FailureConfig(max_failures=0,
                                                              controller_failure_limit=0)))
        with (quiet_output(log) as terminal,
              _Progress(folder, terminal, progress, job.state.step, total_steps)):
            try:
                trainer.fit()
            except Exception as exc:
                reason = _reason(exc, workers, cpus_per_worker, gpus_per_worker, timeout)
                if isinstance(reason, NasError) and not (folder / "theta.jsonl").exists():
                    shutil.rmtree(folder / "ray", ignore_errors=True)  # Ray Train's, no search
                raise reason from None


def check_placement(workers: int, cpus: int, gpus: float) -> None:
    """Refuse workers that the cluster's nodes could never hold (Ray would wait for them)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    if gpus > most_gpus:
        total = sum(n.get("GPU", 0) for n in nodes)
        if not total:
            raise ConfigError(f"--gpus-per-worker {gpus:g}: the Ray cluster has no GPU; leave "
                              f"--gpus-per-worker out to run on CPUs")
        raise ConfigError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {total:g} GPUs"
                          + (f", at most {most_gpus:g} on one node" if total > most_gpus else "")
                          + f"; give at most {most_gpus:g}, or leave it out to run on CPUs")
    fit = sum(min(int(n.get("CPU", 0) // cpus),
                  int(n.get("GPU", 0) // gpus) if gpus else math.inf) for n in nodes)
    if fit < workers:
        cpus_have = sum(n.get("CPU", 0) for n in nodes)
        raise ConfigError(f"--workers {workers}: the Ray cluster ({len(nodes)} node"
                          f"{'s' if len(nodes) != 1 else ''}, {cpus_have:g} CPUs) can place "
                          f"only {fit} worker{'s' if fit != 1 else ''} of {cpus} CPU"
                          f"{'s' if cpus != 1 else ''}" + (f" and {gpus:g} GPU" if gpus else "")
                          + f"; give --workers {fit} or fewer, or smaller --cpus-per-worker")


def _reason(exc: Exception, workers: int, cpus: int, gpus: float,
            timeout: float) -> Exception:
    """What fit() raised, as the error it stands for: a worker's own exception (a data error
    is then the one line it is on one worker), or workers that could not be placed in time."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        failure = exc.worker_failures[min(exc.worker_failures)]
        cause = getattr(failure, "cause", None)  # a RayTaskError wraps the worker's own
        return cause if isinstance(cause, Exception) else failure
    if (isinstance(exc, ControllerError)
            and type(exc.controller_failure).__name__ == "WorkerGroupStartupTimeoutError"):
        return ConfigError(f"--workers {workers}: Ray could not start {workers} workers of "
                           f"{cpus} CPU{'s' if cpus != 1 else ''}"
                           + (f" and {gpus:g} GPU" if gpus else "")
                           + f" within {timeout:g} s: the cluster's resources are taken "
                           f"by other work; try again later or give fewer --workers")
    return exc


class _Progress:
    """A progress bar on the terminal that follows the steps rank 0 logs to theta.jsonl."""

    def __init__(self, folder: Path, terminal, on: bool, start: int, total: int | None):
        self.path, self.terminal, self.on = folder / "theta.jsonl", terminal, on
        self.start, self.total = start, total
        self.stop = threading.Event()

    def __enter__(self):
        if self.on:
            self.thread = threading.Thread(target=self._follow, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.on:
            self.thread.join()

    def _follow(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=self.start, desc="dnas", file=self.terminal,
                   leave=False, disable=None)  # on a terminal only, as one worker's
        seen = 0
        while not self.stop.wait(0.5):
            try:
                with open(self.path) as f:
                    f.seek(seen)
                    text = f.read()
            except OSError:
                continue  # not written yet
            *lines, _partial = text.split("\n")  # a line being written waits for its newline
            for line in lines:
                seen += len(line) + 1
                step = json.loads(line).get("step", bar.n)
                bar.update(step - bar.n)
        bar.close()
