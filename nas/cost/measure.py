"""`nas measure`: time every (layer, choice) of a space with the Triton integer kernels.

Each case runs on random integer inputs of the layer's geometry: the kernel is called once
outside (Triton autotunes on that call), then captured in a CUDA graph of back-to-back calls
and replayed; the latency is the median replay, timed with CUDA events, over the calls per
graph (so that the graph's own launch, which a whole network pays once, is not charged to
every layer). The same layer in torch
fp16 channels_last (cuDNN) is the baseline column. Float choices (16 / 32 bits) are timed
as torch convolutions in that dtype.

`validate` checks the table against reality: for random plans, every quantized layer of the
network is captured in one CUDA graph and timed end to end, against the sum of the table's
entries; MAPE and Kendall's tau summarise the fit.

Timing is pluggable (`Timer`) so that everything but the clock runs in tests on the CPU.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F

from nas.cost.latency import (TABLE_FORMAT, DeviceSpec, distinct_choices, kernel_fingerprint,
                              packed_operands, roofline_us, table_key)
from nas.errors import ConfigError
from nas.spaces import FLOAT_BITS

Fn = Callable[[], Any]
# Activations are timed with a nonzero zero point: the built-in spaces quantize them
# asymmetrically, and padded layers then pay the kernel's padding correction.
ACTIVATION_ZERO_POINT = 1


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


def _int_values(shape, bits: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8, device=gen.device)


@dataclass
class Case:
    """One layer at one precision, with its inputs ready on the device."""

    key: str
    info: Any
    w_bits: int
    a_bits: int
    run: Fn          # the launch being timed (nothing else: no allocation, no preparation)
    baseline: Fn     # the same layer in torch fp16 channels_last


def make_case(info, batch: int, w_bits: int, a_bits: int, device: torch.device,
              gen: torch.Generator, config=None, launch=None) -> Case:
    """Inputs for one (layer, choice): NHWC int8 activations and OHWI int8 weights, packed two
    per byte where the kernel takes 4-bit operands packed and the packed axis is even.
    Random values are drawn on `gen`'s device (on the GPU: no host work or copies).
    `config` and `launch` pin the GEMM kernel's tile and launch variant (default: autotuned
    and chosen by timing on the GPU)."""
    from nas.kernels.conv import prepare_conv

    key = table_key(info, batch, w_bits, a_bits)
    baseline, xf, wf = fp16_baseline(info, batch, device, gen)
    conv = dict(stride=info.stride, padding=info.padding, groups=info.groups)
    if w_bits in FLOAT_BITS or a_bits in FLOAT_BITS:
        dtype = torch.float16 if max(w_bits, a_bits) <= 16 else torch.float32
        xd, wd = xf.to(dtype), wf.to(dtype)
        return Case(key, info, w_bits, a_bits, lambda: F.conv2d(xd, wd, None, **conv), baseline)
    x, wt, epilogue = int_operands(info, batch, w_bits, a_bits, device, gen)
    run = prepare_conv(*pack_operands(info, w_bits, a_bits, x, wt), config=config,
                       launch=launch, **epilogue, **conv)
    return Case(key, info, w_bits, a_bits, run, baseline)


def fp16_baseline(info, batch: int, device: torch.device, gen: torch.Generator):
    """(the layer in torch fp16 channels_last, its input, its weights)."""
    def randn(*shape):
        return torch.randn(shape, generator=gen, device=gen.device).to(device, torch.float16)

    kh, kw = info.kernel
    xf = randn(batch, info.in_channels, *info.in_hw).contiguous(memory_format=torch.channels_last)
    wf = randn(info.out_channels, info.in_channels // info.groups, kh, kw).contiguous(
        memory_format=torch.channels_last)
    conv = dict(stride=info.stride, padding=info.padding, groups=info.groups)  # Linear: 1x1

    def baseline():
        F.conv2d(xf, wf, None, **conv)
    return baseline, xf, wf


def int_operands(info, batch: int, w_bits: int, a_bits: int, device: torch.device,
                 gen: torch.Generator):
    """(NHWC activation codes, OHWI weight codes, both unpacked int8; the epilogue's
    arguments of a `prepare_conv` call: bits, per-channel scale, bias, ReLU, zero point)."""
    x = _int_values((batch, *info.in_hw, info.in_channels), a_bits, gen).to(device)
    wt = _int_values((info.out_channels, *info.kernel, info.in_channels // info.groups), w_bits,
                     gen).to(device)
    scale = torch.rand(info.out_channels, generator=gen, device=gen.device).to(device) * 1e-3
    bias = torch.randn(info.out_channels, generator=gen, device=gen.device).to(device)
    return x, wt, dict(w_bits=w_bits, a_bits=a_bits, scale=scale, bias=bias, relu=True,
                       x_zero_point=ACTIVATION_ZERO_POINT)


def pack_operands(info, w_bits: int, a_bits: int, x: torch.Tensor, wt: torch.Tensor):
    """x and wt as the kernels take them: packed two per byte where `packed_operands` says."""
    from nas.kernels import pack_int4

    x_packed, w_packed = packed_operands(info, w_bits, a_bits)
    return (pack_int4(x, dim=3) if x_packed else x), (pack_int4(wt, dim=3) if w_packed else wt)


def layer_cases(space, batch: int, device: torch.device, seed: int = 0) -> list[Case]:
    """Every (layer, choice) of the space, each geometry and precision once."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [make_case(info, batch, c.w_bits, c.a_bits, device, gen)
            for _, info, c in distinct_choices(space, batch)]


def ops(info, batch: int) -> float:
    """Multiply-adds x 2 of one layer at `batch`."""
    ho, wo = info.out_hw
    k = (info.in_channels // info.groups) * info.kernel[0] * info.kernel[1]
    return 2.0 * batch * ho * wo * info.out_channels * k


def measure(cases: Sequence[Case], batch: int, timer, spec: DeviceSpec,
            say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every case and its fp16 baseline; entries for the latency table."""
    entries = []
    for i, case in enumerate(cases, 1):
        us, base = timer(case.run), timer(case.baseline)
        achieved = ops(case.info, batch) / (us * 1e-6) / 1e12
        estimate = roofline_us(case.info, case.w_bits, case.a_bits, batch, spec)
        entry = {"key": case.key, "us": round(us, 3), "fp16_cudnn_us": round(base, 3),
                        "speedup_vs_fp16": _sig(base / us),
                        # The cost model's roofline time (compute or memory bound, waves,
                        # launch) over the measured time; and achieved TOPS over INT8 peak.
                        "roofline_fraction": _sig(estimate / us),
                        "int8_peak_fraction": _sig(achieved / spec.int8_tops)}
        if case.w_bits not in FLOAT_BITS and case.a_bits not in FLOAT_BITS:
            from nas.kernels.conv import tuned_config

            config = tuned_config(case.run)
            if config:
                entry["kernel_config"] = config
        entries.append(entry)
        say(f"[{i}/{len(cases)}] {case.key}: {us:.2f} us (fp16 cuDNN {base:.2f} us)"
            + (f" [{entry['kernel_config']}]" if "kernel_config" in entry else ""))
    return entries


def _sig(x: float) -> float:
    """Four significant digits (ratios span orders of magnitude)."""
    return float(f"{x:.4g}")


def provenance(device: torch.device, spec: DeviceSpec, batch: int, method: str) -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {
        "device_spec": spec.name, "batch": batch, "method": method,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "host": platform.node(),
        "activation_zero_point": ACTIVATION_ZERO_POINT, "kernel_source": kernel_fingerprint()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info.update(_nvidia_smi())
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}), not a GPU"
    return info


def _nvidia_smi() -> dict[str, str]:
    """Driver and clocks as nvidia-smi reports them (absent if it cannot be run)."""
    fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "power.limit"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    return {name: value.strip() for name, value in zip(fields, out.split(","))}


def table_document(entries, prov) -> dict[str, Any]:
    return {"format": TABLE_FORMAT, "provenance": prov, "entries": entries}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (ties counted as neither)."""
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else float("nan")


def validate(space, plans: Sequence[dict], table: dict[str, float], batch: int,
             device: torch.device, timer, seed: int = 0,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """End-to-end time of each plan's layers (one graph) against the sum of the table's
    entries. A plan maps each layer name to its Choice (w_bits, a_bits).

    Each plan is timed twice, in two passes over the plans (the second in reverse order, with
    fresh inputs), and its end-to-end time is the mean of the two. How far the passes agree
    with each other (their Kendall tau, their mean difference) is the measurement's own noise:
    where random plans differ in total by little more than that, no table can rank them."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    infos = {layer.name: layer.info for layer in space.layers()}

    def network(plan: dict):
        cases = [make_case(infos[name], batch, p.w_bits, p.a_bits, device, gen)
                 for name, p in plan.items()]
        missing = [c.key for c in cases if c.key not in table]
        if missing:
            raise ConfigError(f"the latency table has no entry for {missing[0]}; measure the "
                              f"space at batch {batch} first")

        def run():
            for case in cases:
                case.run()
        return run, sum(table[c.key] for c in cases)

    first, second, predicted = {}, {}, {}
    for i, plan in enumerate(plans, 1):
        run, predicted[i] = network(plan)
        first[i] = timer(run)
        say(f"plan {i}/{len(plans)}: table {predicted[i]:.1f} us, end to end {first[i]:.1f} us")
    for i in reversed(range(1, len(plans) + 1)):
        run, _ = network(plans[i - 1])
        second[i] = timer(run)
    say(f"second pass (plans in reverse order): end to end {min(second.values()):.1f}-"
        f"{max(second.values()):.1f} us")
    rows = []
    for i in first:
        measured = (first[i] + second[i]) / 2
        rows.append({"plan": i, "predicted_us": round(predicted[i], 3),
                     "measured_us": round(measured, 3),
                     "passes_us": [round(first[i], 3), round(second[i], 3)],
                     "error": round((predicted[i] - measured) / measured, 4)})
    mape = statistics.fmean(abs(r["error"]) for r in rows) * 100
    tau = kendall_tau([r["predicted_us"] for r in rows], [r["measured_us"] for r in rows])
    spread = statistics.fmean(abs(first[i] - second[i]) / ((first[i] + second[i]) / 2)
                              for i in first) * 100
    measured = [r["measured_us"] for r in rows]
    return {"plans": rows, "mape_percent": round(mape, 2), "kendall_tau": round(tau, 4),
            # the noise floor: the two passes against each other, and the plans' own range
            "passes_kendall_tau": round(kendall_tau([first[i] for i in first],
                                                    [second[i] for i in first]), 4),
            "passes_difference_percent": round(spread, 2),
            "plans_range_percent": round((max(measured) - min(measured)) / min(measured) * 100, 2)}


def validations(space, table: dict[str, float], batch: int, device: torch.device, timer,
                counts: dict[str, int], seed: int = 0, say: Callable[[str], None] = print):
    """`validate` on random plans of each mix (`nas.spaces.random_plans`) with a count in
    `counts`; yields (the table document's field, result with its plan mix) as each ends, so
    that a run cut short keeps what it finished."""
    from nas.spaces import PLAN_MIXES, random_plans

    for mix in PLAN_MIXES:
        if counts.get(mix):
            plans = random_plans(space, counts[mix], seed, mix)
            result = validate(space, plans, table, batch, device, timer, seed=seed, say=say)
            yield ("validation" if mix == "uniform" else f"validation_{mix}",
                   {"plan_mix": mix, **result})

