"""`nas measure`: time every (layer, choice) of a space with the Triton integer kernels.

Each case runs on random integer inputs of the layer's geometry (`nas.kernels.inputs`): the
kernel is called once outside (Triton autotunes on that call), then captured in a CUDA graph
of back-to-back calls and replayed; the latency is the median replay, timed with CUDA events,
over the calls per graph (`nas.kernels.timing.CudaGraphTimer`: the graph's own launch, which
a whole network pays once, is not charged to every layer). The same layer in torch fp16
channels_last (cuDNN) is the baseline column. Float choices (16 / 32 bits) are timed as torch
convolutions in that dtype.

`validate` checks the table against reality: for random plans, every quantized layer of the
network is captured in one CUDA graph and timed end to end, against the sum of the table's
entries; MAPE and Kendall's tau summarise the fit.

The timer is any callable from a launch to microseconds, so that everything but the clock
runs in tests on the CPU (`nas.kernels.timing.WallTimer`).
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F

from nas.cost.device_spec import DeviceSpec
from nas.cost.roofline import roofline_us
from nas.cost.tables import TABLE_FORMAT, distinct_choices, kernel_fingerprint, table_key
from nas.errors import ConfigError
from nas.kernels.inputs import ACTIVATION_ZERO_POINT, fp16_baseline, int_launch
from nas.kernels.timing import Fn
from nas.spaces import FLOAT_BITS
from nas.stats import kendall_tau


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
    """One (layer, choice) ready to time, keyed as the table keys it: the integer kernel's
    launch on random inputs (`nas.kernels.inputs.int_launch`, with `config` and `launch`
    pinning its tile and launch variant), or a float choice as a torch convolution in that
    dtype; and the fp16 cuDNN baseline."""
    key = table_key(info, batch, w_bits, a_bits)
    baseline, xf, wf = fp16_baseline(info, batch, device, gen)
    if w_bits in FLOAT_BITS or a_bits in FLOAT_BITS:
        dtype = torch.float16 if max(w_bits, a_bits) <= 16 else torch.float32
        xd, wd = xf.to(dtype), wf.to(dtype)
        conv = dict(stride=info.stride, padding=info.padding, groups=info.groups)
        return Case(key, info, w_bits, a_bits, lambda: F.conv2d(xd, wd, None, **conv), baseline)
    run = int_launch(info, batch, w_bits, a_bits, device, gen, config=config, launch=launch)
    return Case(key, info, w_bits, a_bits, run, baseline)


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

