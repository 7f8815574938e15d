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
import socket
import sys
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
RETRIES = 2  # a trial whose worker process dies is run again, at most this often
CONNECT_TIMEOUT_S = 10.0


def trainable(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial: evaluate the plan in `config` and report its accuracy."""
    from ray import tune

    from nas.search.evaluate import evaluator_for

    evaluator = evaluator_for(EvaluatorSpec.from_dict(spec))
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
                 on_trial: Callable[[Trial], None]):
        super().__init__(metric="accuracy", mode="max")
        # Not `self.searcher`: Tune takes an attribute of that name for a wrapped Searcher.
        self.discrete, self.problem, self.results = searcher, problem, results
        self.outcome, self.clock_start, self.on_trial = outcome, clock_start, on_trial
        self.encoding = PlanEncoding(problem.space)
        self.pending: dict[str, tuple[list[int], float]] = {}
        self.scores = {tuple(t.indices): t.accuracy for t in results.trials}

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
        indices, started = self.pending.pop(trial_id, (None, 0.0))
        if indices is None:
            return
        costs = self.problem.costs(indices)
        if error or not result or "accuracy" not in result:
            self.outcome.failed += 1
            self.discrete.tell(Told(indices, costs))  # failed: no metrics, not proposed again
            return
        accuracy = float(result["accuracy"])
        self.scores[tuple(indices)] = accuracy
        self.discrete.tell(Told(indices, costs, {"accuracy": accuracy}))
        trial = Trial(len(self.results.trials) + 1, indices, accuracy, costs,
                      self.problem.feasible(indices), time.monotonic() - started,
                      float(result.get("eval_seconds", float("nan"))),
                      str(result.get("node", "")), time.monotonic() - self.clock_start)
        self.results.add(trial)
        self.on_trial(trial)


# ---------------------------------------------------------------- Ray itself

def check_address(address: str | None) -> None:
    """Refuse, in one line and within seconds, a --ray-address where no cluster answers
    (ray.init would otherwise retry for minutes)."""
    if address in (None, "local"):
        return
    if address == "auto":
        if os.environ.get("RAY_ADDRESS"):
            return check_address(os.environ["RAY_ADDRESS"])
        if not Path("/tmp/ray/ray_current_cluster").exists():
            raise ConfigError("--ray-address auto: no Ray cluster runs on this machine; start one "
                              "with 'ray start --head', give its address, or leave --ray-address "
                              "out to run Ray inside this process")
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not an address; give HOST:PORT of a "
                          f"cluster's head (as 'ray start --head' prints it), or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({reason}); "
                          f"start one with 'ray start --head', or leave --ray-address out to run "
                          f"Ray inside this process") from None


@contextlib.contextmanager
def ray_session(address: str | None, log_path: Path):
    """Ray for one search: attached to the cluster at `address`, a Ray started inside this
    process (None), or the one this process already runs (tests). Ray's console output goes
    to `log_path`; yields the file the user's terminal is (for the progress bar)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C is ours to handle
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    with _quiet(log_path) as terminal:
        started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address or "local", include_dashboard=False,
                         log_to_driver=False, logging_level="ERROR", configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"--ray-address {address}: Ray could not connect "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                                  f"; start a cluster with 'ray start --head' or leave "
                                  f"--ray-address out") from None
            started = True
        try:
            yield terminal
        finally:
            if started:
                ray.shutdown()


@contextlib.contextmanager
def _quiet(log_path: Path):
    """Send what Ray writes to the process's stdout and stderr (it writes there from C++ as
    well as Python) into `log_path`; yield a handle on the terminal's stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    with open(log_path, "a") as log:
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


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


def run_trials(problem: SearchProblem, searcher: DiscreteSearcher, spec: EvaluatorSpec,
               results: SearchResults, storage: Path, *, workers: int, cpus_per_trial: int,
               gpus_per_trial: float, trials: int | None, seconds: float | None,
               clock_start: float, on_trial: Callable[[Trial], None]) -> TuneOutcome:
    """Run trials until `trials` more have completed or `seconds` have passed (or the
    searcher has nothing left, or Ctrl-C). Ray must be up (`ray_session`)."""
    from ray import tune

    outcome = TuneOutcome()
    algo = AskTell(searcher, problem, results, outcome, clock_start, on_trial)
    fn = tune.with_resources(tune.with_parameters(trainable, spec=spec.to_dict()),
                             {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=algo, num_samples=trials or -1,
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
