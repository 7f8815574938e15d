"""The Ray Tune driver shared by the discrete searchers.

Each evaluation is a Tune trial whose config *is* the plan, {layer: "W4A8"}; the trainable
rebuilds the evaluator from its spec (plain data) once per reused worker and reports the
plan's accuracy. `AskTell` turns any `DiscreteSearcher` into a Tune search algorithm: it
costs each proposed plan before a trial is spent on it (over the target: told back
unevaluated; evaluated before: told its known score), and as each trial completes it tells
the searcher and has `SearchResults` write the row to trials.csv. Resources, retries of a
trial whose worker died, and the time budget are Tune's configuration.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray.tune.search import Searcher

from nas.errors import ConfigError
from nas.search.base import DiscreteSearcher, SearchProblem, Told
from nas.search.encoding import PlanEncoding
from nas.search.evaluate import EvaluatorSpec
from nas.search.results import SearchResults, Trial

# Proposals in a row that are over the target or already evaluated, before the searcher
# counts as having nothing new to offer.
MAX_SKIPS = 2000
RETRIES = 3  # a trial whose worker process dies is run again, at most this often (a retry
# may land on the dead worker once more before Tune replaces it)


def trainable(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial: evaluate the plan in `config` and report its accuracy."""
    import torch
    from ray import tune

    from nas.search.evaluate import evaluator_for

    spec = EvaluatorSpec.from_dict(spec)
    # The trial's CPUs, set in its worker process only: a driver that scores the chosen plan
    # in its own process keeps its own thread count.
    torch.set_num_threads(max(1, spec.threads))
    evaluator = evaluator_for(spec)
    indices = PlanEncoding(evaluator.space).from_config(config["plan"])
    started = time.perf_counter()
    metrics = evaluator.evaluate(indices)
    tune.report({**metrics, "eval_seconds": time.perf_counter() - started,
                 "node": socket.gethostname(), "pid": os.getpid()})


@dataclass
class TuneOutcome:
    interrupted: bool = False
    over_target: int = 0     # proposals over the target, never evaluated
    repeats: int = 0         # proposals of a plan evaluated before, answered from its score
    failed: int = 0          # trials that failed after their retries
    exhausted: bool = False  # the searcher had nothing new to propose


class AskTell(Searcher):
    """A Tune search algorithm around a `DiscreteSearcher`."""

    def __init__(self, searcher: DiscreteSearcher, problem: SearchProblem,
                 results: SearchResults, outcome: TuneOutcome, clock_start: float,
                 on_trial: Callable[[Trial], None], trials: int | None = None):
        super().__init__(metric="accuracy", mode="max")
        # Not `self.searcher`: Tune takes an attribute of that name for a wrapped Searcher.
        self.discrete, self.problem, self.results = searcher, problem, results
        self.outcome, self.clock_start, self.on_trial = outcome, clock_start, on_trial
        self.encoding = PlanEncoding(problem.space)
        self.pending: dict[str, tuple[list[int], float]] = {}
        self.scores = {tuple(t.indices): t.accuracy for t in results.trials}
        # The trial budget is counted here, in completed evaluations, not by Tune's
        # num_samples, which a failed trial would use up.
        self.left = trials
        self.retry: list[list[int]] = []  # plans whose trial failed, run again first
        self.failures: dict[tuple[int, ...], int] = {}

    def __getstate__(self):
        # Tune pickles its search algorithm (tuner.pkl, searcher state) for its own restore;
        # a resumed nas search replays trials.csv instead, so only the metric and mode go in
        # (the searcher's study and the open files would not pickle).
        return {k: v for k, v in self.__dict__.items() if k in ("_metric", "_mode")}

    def get_state(self) -> dict:
        return {}  # see __getstate__

    def set_state(self, state: dict) -> None:
        pass

    def suggest(self, trial_id: str):
        problem, outcome = self.problem, self.outcome
        if self.left is not None and self.left - len(self.pending) <= 0:
            return None if self.pending else Searcher.FINISHED
        if self.retry:
            indices = self.retry.pop(0)
            self.pending[trial_id] = (indices, time.monotonic())
            return {"plan": self.encoding.config(indices)}
        for _ in range(MAX_SKIPS):
            indices = self.discrete.ask()
            if indices is None:
                break
            costs = problem.costs(indices)
            if not problem.feasible(indices):
                outcome.over_target += 1
                self.discrete.tell(Told(indices, costs, feasible=False))
                continue
            key = tuple(indices)
            if key in self.scores:
                outcome.repeats += 1
                self.discrete.tell(Told(indices, costs, {"accuracy": self.scores[key]}))
                continue
            if any(key == tuple(p) for p, _ in self.pending.values()):
                outcome.repeats += 1
                continue  # in flight: its score is told when it completes
            self.pending[trial_id] = (indices, time.monotonic())
            return {"plan": self.encoding.config(indices)}
        outcome.exhausted = True
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        with ctrl_c_held():  # trials.csv, the count in summary.json and the searcher agree
            self._complete(trial_id, result, error)

    def _complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        indices, started = self.pending.pop(trial_id, (None, 0.0))
        if indices is None:
            return
        costs = self.problem.costs(indices)
        if error or not result or "accuracy" not in result:
            key = tuple(indices)
            self.failures[key] = self.failures.get(key, 0) + 1
            if self.failures[key] <= RETRIES:  # a worker that died mid-trial: run it again
                self.retry.append(indices)
                return
            self.outcome.failed += 1
            self.discrete.tell(Told(indices, costs))  # failed: no metrics, not proposed again
            return
        if self.left is not None:
            self.left -= 1
        accuracy = float(result["accuracy"])
        self.scores[tuple(indices)] = accuracy
        self.discrete.tell(Told(indices, costs, {"accuracy": accuracy}))
        trial = Trial(len(self.results.trials) + 1, indices, accuracy, costs,
                      self.problem.feasible(indices), time.monotonic() - started,
                      float(result.get("eval_seconds", float("nan"))),
                      str(result.get("node", "")), time.monotonic() - self.clock_start)
        self.results.add(trial)
        self.on_trial(trial)


@contextlib.contextmanager
def ctrl_c_held():
    """Hold a Ctrl-C that comes inside the block until the block is done, then raise it:
    a trial is recorded whole or not at all. (Signals reach the main thread only.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# ---------------------------------------------------------------- Ray itself

@contextlib.contextmanager
def ray_session(address: str | None, log_path: Callable[[], Path]):
    """Ray for one search: attached to the cluster at `address`, a Ray started inside this
    process (None), or the one this process already runs (tests). What Ray prints while it
    starts and stops goes to the file `log_path()` names (`quiet_output` does the same around
    the trials). A connection that fails leaves no log behind."""
    import ray

    if address in (None, "local"):  # a running cluster's own auth mode stands
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C is ours to handle
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores verbose=0
    started = False
    if not ray.is_initialized():
        try:
            with quiet_output(log_path()):
                ray.init(address=address or "local", include_dashboard=False,
                         log_to_driver=False, logging_level="CRITICAL")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            log_path().unlink(missing_ok=True)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"--ray-address {address}: Ray could not connect ({first}); start "
                              f"a cluster with 'ray start --head' or leave --ray-address "
                              f"out") from None
        started = True
    try:
        yield
    finally:
        if started:
            with quiet_output(log_path()):
                ray.shutdown()


@contextlib.contextmanager
def quiet_output(log_path: Path):
    """Send what is written to this process's stdout and stderr (Ray writes there from C++
    as well as Python) into `log_path`; yield a handle on the terminal's stderr, for a
    progress bar."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a") as log:
        saved = os.dup(1), os.dup(2)
        terminal = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            terminal.close()


def check_resources(workers: int, cpus_per_trial: int, gpus_per_trial: float) -> str | None:
    """Refuse trials the cluster could never place (Tune would wait for them forever); say
    when fewer than `workers` fit at once."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if cpus_per_trial > cpus:
        raise ConfigError(f"--cpus-per-trial {cpus_per_trial}: the Ray cluster has {cpus:g} "
                          f"CPUs; give at most {cpus:g}")
    if gpus_per_trial > gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g}: the Ray cluster has "
                          f"{gpus:g} GPUs; give at most {gpus:g}, or leave it out")
    fit = int(cpus // cpus_per_trial)
    if gpus_per_trial:
        fit = min(fit, int(gpus // gpus_per_trial))
    if fit < workers:
        return (f"note: the Ray cluster fits {fit} trial{'s' if fit != 1 else ''} at once "
                f"({cpus:g} CPUs, {gpus:g} GPUs), not the {workers} --workers asks for")
    return None


def run_trials(problem: SearchProblem, searcher: DiscreteSearcher, spec: EvaluatorSpec,
               results: SearchResults, storage: Path, *, workers: int, cpus_per_trial: int,
               gpus_per_trial: float, trials: int | None, seconds: float | None,
               clock_start: float, on_trial: Callable[[Trial], None]) -> TuneOutcome:
    """Run trials until `trials` more have completed or `seconds` have passed (or the
    searcher has nothing left, or Ctrl-C). Ray must be up (`ray_session`)."""
    from ray import tune

    outcome = TuneOutcome()
    algo = AskTell(searcher, problem, results, outcome, clock_start, on_trial, trials)
    fn = tune.with_resources(tune.with_parameters(trainable, spec=spec.to_dict()),
                             {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=algo, num_samples=-1,
                                    max_concurrent_trials=workers, time_budget_s=seconds,
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name="ray", storage_path=str(storage.absolute()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=RETRIES),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    try:
        tuner.fit()
    except KeyboardInterrupt:
        outcome.interrupted = True
    return outcome
