"""Timing a kernel launch (any callable of GPU work): on a GPU, replays of CUDA graphs of
back-to-back calls; on the CPU, wall-clock time (tests; not a device measurement).

The kernels' autotuner ranks tiles and launch variants with the same graph timer that
`nas measure` times the table with, so that what autotuning chooses is what the table holds.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch

from nas.errors import ConfigError

Fn = Callable[[], Any]


def require_cuda(device: str, command: str = "nas measure") -> torch.device:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ConfigError(f"{command} times kernels on a CUDA GPU and none is available here "
                          f"(torch.cuda.is_available() is False); run it on a machine with one")
    return torch.device(device)


class CudaGraphTimer:
    """Microseconds per call of fn, from CUDA graphs of back-to-back calls.

    A graph holding one short kernel pays the graph launch (several microseconds) on every
    replay, which a network captured whole does not; so each graph holds enough calls for at
    least `min_replay_us` (at most `max_calls`), and the median replay is divided by them.
    What launch time remains is spread over those calls; `marginal` times a graph of twice
    as many calls as well and takes the difference per call, which leaves it out (where
    noise makes the difference no larger than zero, the plain per-call time stands)."""

    def __init__(self, reps: int = 100, warmup: int = 10, min_replay_us: float = 100.0,
                 max_calls: int = 20, marginal: bool = False):
        if reps < 1:
            raise ConfigError(f"--reps {reps}: must be at least 1")
        self.reps, self.warmup = reps, warmup
        self.min_replay_us, self.max_calls, self.marginal = min_replay_us, max_calls, marginal
        per_call = ("(median replay of 2N calls - median replay of N calls) / N, N the calls "
                    "per graph" if marginal else "divided by the calls per graph")
        self.method = (f"one call outside the graph (autotuning, cuDNN algorithm search); a "
                       f"CUDA graph of back-to-back calls (enough for {min_replay_us:g} us per "
                       f"replay, at most {max_calls}); {warmup} warm-up replays; median of {reps} "
                       f"replays timed with CUDA events, {per_call}")

    def __call__(self, fn: Fn) -> float:
        fn()  # autotunes and compiles outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        return self._per_call_us(fn)

    def _per_call_us(self, fn: Fn) -> float:
        """Microseconds per call from graph replays (`_replay_us`), as `method` says."""
        calls = calls_per_graph(self._replay_us(fn, 1, reps=5), self.min_replay_us, self.max_calls)
        once = self._replay_us(fn, calls, self.reps)
        if self.marginal:
            twice = self._replay_us(fn, 2 * calls, self.reps)
            if twice > once:
                return (twice - once) / calls
        return once / calls

    def _replay_us(self, fn: Fn, calls: int, reps: int) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        for _ in range(self.warmup):
            graph.replay()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # ms -> us
        return statistics.median(times)


def calls_per_graph(single_us: float, min_replay_us: float, max_calls: int) -> int:
    """Calls to capture in one graph so that a replay lasts at least `min_replay_us`, given one
    call's time (which includes the graph launch, so this errs towards fewer calls)."""
    return max(1, min(max_calls, math.ceil(min_replay_us / max(single_us, 1e-3))))


class WallTimer:
    """Median wall-clock microseconds of `reps` calls (CPU tests; not a device measurement)."""

    def __init__(self, reps: int = 3):
        self.reps = reps
        self.method = f"median wall-clock time of {reps} calls (CPU, Triton interpreter)"

    def __call__(self, fn: Fn) -> float:
        fn()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)
