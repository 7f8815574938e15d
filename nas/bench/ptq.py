"""`nas bench ptq`: the whitepaper's PTQ experiments on Fashion-MNIST.

1. W8A8 per-channel PTQ against float accuracy (goal: within 1 point).
2. Weight-only 8-bit asymmetric weights of BN-folded MobileNetV2, per tensor vs per channel:
   accuracy, and each layer's weight SQNR and output SQNR (summed up by layer kind, so the
   depthwise layers' loss under per-tensor ranges shows).
3. W4A8 per channel vs per tensor under every calibration method: accuracy.
4. 4-bit weights against 4-bit activations: W4A8 and W8A4 (per-channel weights) beside W8A8
   and float, each one's drop from float.

Every experiment on a model calibrates on the same batches, so its rows differ only by
what they name.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nas.data import make_loader
from nas.plan import Plan
from nas.quant.bn_fold import fold_bn
from nas.quant.observers import METHODS
from nas.quant.ptq import per_layer_sqnr, prepare_ptq
from nas.train import evaluate

SPACES = ("fmnist_resnet8", "fmnist_mobilenetv2")
KINDS = ("conv", "depthwise", "pointwise", "linear")


@dataclass
class Subject:
    """One trained model under test, with its data loaders."""

    space: Any
    model: torch.nn.Module
    calib: Any
    test: Any
    fp_accuracy: float = 0.0


def layer_kind(module: torch.nn.Module) -> str:
    """depthwise (one filter per input channel), pointwise (1x1), conv (any other) or linear."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if tuple(module.kernel_size) == (1, 1) else "conv"


def _accuracy(subject: Subject, plan: Plan, method: str, batches: int, device) -> float:
    qmodel = prepare_ptq(subject.model, plan, subject.calib, batches, method, device=device)
    return evaluate(qmodel, subject.test, device)["accuracy"]


def weight_only(s: Subject, batches: int, device, say) -> tuple[list[dict], list[dict]]:
    """8-bit asymmetric weights on every layer, float activations, min-max ranges: the
    accuracy per granularity and each layer's SQNR under both."""
    plan = Plan.uniform(s.space, 8, 32, include_fixed=True, w_symmetric=False)
    layers = per_layer_sqnr(s.model, plan, s.calib, batches, "minmax", device=device)
    modules = dict(fold_bn(s.model.eval()).named_modules())
    per_layer = [{"layer": r.name, "kind": layer_kind(modules[r.name]),
                  "out_channels": modules[r.name].weight.shape[0],
                  "weight_per_tensor_db": r.weight_per_tensor,
                  "weight_per_channel_db": r.weight_per_channel,
                  "output_per_tensor_db": r.output_per_tensor,
                  "output_per_channel_db": r.output_per_channel} for r in layers]
    summary = []
    for granularity in ("per_tensor", "per_channel"):
        sqnrs = [r[f"weight_{granularity}_db"] for r in per_layer]
        acc = _accuracy(s, plan.with_overrides(w_granularity=granularity), "minmax", batches,
                        device)
        summary.append({"space": s.space.name, "granularity": granularity,
                        "mean_weight_sqnr_db": statistics.fmean(sqnrs),
                        "min_weight_sqnr_db": min(sqnrs),
                        "accuracy": acc, "fp_accuracy": s.fp_accuracy})
        say(f"{s.space.name}: weight-only 8-bit {granularity} {acc:.2f}%")
    return summary, per_layer


def sqnr_by_kind(per_layer: list[dict]) -> list[dict]:
    """Mean weight and output SQNR of each kind of layer, and its worst layer per tensor."""
    out = []
    for kind in KINDS:
        rows = [r for r in per_layer if r["kind"] == kind]
        if not rows:
            continue
        worst = min(rows, key=lambda r: r["weight_per_tensor_db"])
        out.append({"kind": kind, "layers": len(rows), **{
            key: statistics.fmean(r[key] for r in rows)
            for key in ("weight_per_tensor_db", "weight_per_channel_db",
                        "output_per_tensor_db", "output_per_channel_db")},
            "worst_layer": worst["layer"], "worst_weight_per_tensor_db":
                worst["weight_per_tensor_db"]})
    return out


def bits_at_four(s: Subject, w8a8: float, batches: int, device, say) -> dict:
    """W4A8 against W8A4, per-channel weights, MSE calibration; the space's fixed layers keep
    their precision."""
    row = {"space": s.space.name, "fp_accuracy": s.fp_accuracy, "w8a8": w8a8}
    for w_bits, a_bits in ((4, 8), (8, 4)):
        plan = Plan.uniform(s.space, w_bits, a_bits, w_granularity="per_channel")
        key = f"w{w_bits}a{a_bits}"
        row[key] = _accuracy(s, plan, "mse", batches, device)
        row[f"{key}_drop"] = s.fp_accuracy - row[key]
    gap = row["w8a4_drop"] - row["w4a8_drop"]
    row["hurts_more"] = ("4-bit activations" if gap > 0 else
                         "4-bit weights" if gap < 0 else "neither")
    say(f"{s.space.name}: W4A8 {row['w4a8']:.2f}%, W8A4 {row['w8a4']:.2f}%: "
        f"{row['hurts_more']} hurt more")
    return row


def run_bench(subjects: list[Subject], batches: int, device,
              say: Callable[[str], None] = print,
              methods: Sequence[str] = METHODS) -> dict[str, Any]:
    results: dict[str, Any] = {"fp": {}, "w8a8": [], "weight_only": [], "weight_only_layers": [],
                               "weight_only_by_kind": [], "w4a8": [], "w4_vs_a4": []}
    started = time.monotonic()
    for s in subjects:
        s.calib = list(itertools.islice(s.calib, batches))
        s.fp_accuracy = evaluate(s.model.to(device).eval(), s.test, device)["accuracy"]
        results["fp"][s.space.name] = s.fp_accuracy
        say(f"{s.space.name}: float {s.fp_accuracy:.2f}%")

    w8a8 = {}
    for s in subjects:
        acc = w8a8[s.space.name] = _accuracy(s, Plan.uniform(s.space, 8, 8), "mse", batches,
                                             device)
        results["w8a8"].append({"space": s.space.name, "fp_accuracy": s.fp_accuracy,
                                "w8a8_accuracy": acc, "drop": s.fp_accuracy - acc,
                                "within_1_point": s.fp_accuracy - acc <= 1.0})
        say(f"{s.space.name}: W8A8 per-channel {acc:.2f}%")

    mobilenet = next((s for s in subjects if s.space.model == "mobilenetv2"), None)
    if mobilenet is not None:
        summary, per_layer = weight_only(mobilenet, batches, device, say)
        results["weight_only"] = summary
        results["weight_only_layers"] = per_layer
        results["weight_only_by_kind"] = sqnr_by_kind(per_layer)

    for s in subjects:
        for method in methods:
            row = {"space": s.space.name, "calibration": method, "fp_accuracy": s.fp_accuracy}
            for granularity in ("per_channel", "per_tensor"):
                plan = Plan.uniform(s.space, 4, 8, w_granularity=granularity)
                row[granularity] = _accuracy(s, plan, method, batches, device)
            results["w4a8"].append(row)
            say(f"{s.space.name}: W4A8 {method}: per-channel {row['per_channel']:.2f}%, "
                f"per-tensor {row['per_tensor']:.2f}%")

    for s in subjects:
        results["w4_vs_a4"].append(bits_at_four(s, w8a8[s.space.name], batches, device, say))
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def _db(value: float) -> float:
    return round(value, 1)


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, headers, rows) for each measured table."""
    out = [("W8A8 per-channel PTQ (MSE calibration)",
            ["space", "fp acc %", "W8A8 acc %", "drop", "within 1 pt"],
            [[r["space"], round(r["fp_accuracy"], 2), round(r["w8a8_accuracy"], 2),
              round(r["drop"], 2), "yes" if r["within_1_point"] else "NO"] for r in results["w8a8"]])]
    if results["weight_only"]:
        out.append(("Weight-only 8-bit asymmetric, BN-folded MobileNetV2",
                    ["granularity", "mean weight SQNR dB", "min weight SQNR dB", "acc %", "fp acc %"],
                    [[r["granularity"], round(r["mean_weight_sqnr_db"], 2),
                      round(r["min_weight_sqnr_db"], 2), round(r["accuracy"], 2),
                      round(r["fp_accuracy"], 2)] for r in results["weight_only"]]))
        out.append(("Weight-only 8-bit, BN-folded MobileNetV2: SQNR by layer kind (dB, means)",
                    ["kind", "layers", "weight per-tensor", "weight per-channel",
                     "output per-tensor", "output per-channel", "worst layer per-tensor"],
                    [[r["kind"], r["layers"], _db(r["weight_per_tensor_db"]),
                      _db(r["weight_per_channel_db"]), _db(r["output_per_tensor_db"]),
                      _db(r["output_per_channel_db"]),
                      f"{r['worst_layer']} ({_db(r['worst_weight_per_tensor_db'])})"]
                     for r in results["weight_only_by_kind"]]))
        out.append((("Weight-only 8-bit, BN-folded MobileNetV2: SQNR per layer (dB; output: "
                     "the layer's output in the quantized network against float)"),
                    ["layer", "kind", "channels", "weight per-tensor", "weight per-channel",
                     "gain", "output per-tensor", "output per-channel"],
                    [[r["layer"], r["kind"], r["out_channels"], _db(r["weight_per_tensor_db"]),
                      _db(r["weight_per_channel_db"]),
                      _db(r["weight_per_channel_db"] - r["weight_per_tensor_db"]),
                      _db(r["output_per_tensor_db"]), _db(r["output_per_channel_db"])]
                     for r in results["weight_only_layers"]]))
    out.append(("W4A8 accuracy by calibration method",
                ["space", "calibration", "per-channel acc %", "per-tensor acc %", "fp acc %"],
                [[r["space"], r["calibration"], round(r["per_channel"], 2),
                  round(r["per_tensor"], 2), round(r["fp_accuracy"], 2)] for r in results["w4a8"]]))
    out.append((("4-bit weights vs 4-bit activations: PTQ, per-channel weights, MSE "
                 "calibration, fixed first/last layers W8A8 (acc %, change from float)"),
                ["space", "float", "W8A8", "W4A8", "W8A4", "hurts more"],
                [[r["space"], round(r["fp_accuracy"], 2),
                  f"{r['w8a8']:.2f} ({r['w8a8'] - r['fp_accuracy']:+.2f})",
                  f"{r['w4a8']:.2f} ({r['w4a8'] - r['fp_accuracy']:+.2f})",
                  f"{r['w8a4']:.2f} ({r['w8a4'] - r['fp_accuracy']:+.2f})", r["hurts_more"]]
                 for r in results["w4_vs_a4"]]))
    return out


def subject_from(space, model, splits, batch_size: int, seed: int) -> Subject:
    return Subject(space, model, make_loader(splits.train, batch_size, shuffle=True, seed=seed),
                   make_loader(splits.test, 512, shuffle=False))
