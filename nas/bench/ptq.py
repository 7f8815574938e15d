"""`nas bench ptq`: the whitepaper's PTQ experiments on Fashion-MNIST.

1. W8A8 per-channel PTQ against float accuracy (goal: within 1 point).
2. Weight-only 8-bit asymmetric weights of BN-folded MobileNetV2, per tensor vs per channel:
   weight SQNR and accuracy.
3. W4A8 per channel vs per tensor under every calibration method: accuracy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from nas.data import make_loader
from nas.plan import Plan
from nas.quant.bn_fold import fold_bn
from nas.quant.observers import METHODS
from nas.quant.ptq import prepare_ptq, weight_sqnr
from nas.train import evaluate

SPACES = ("fmnist_resnet8", "fmnist_mobilenetv2")


@dataclass
class Subject:
    """One trained model under test, with its data loaders."""

    space: Any
    model: torch.nn.Module
    calib: Any
    test: Any
    fp_accuracy: float = 0.0


def _accuracy(subject: Subject, plan: Plan, method: str, batches: int, device) -> float:
    qmodel = prepare_ptq(subject.model, plan, subject.calib, batches, method, device=device)
    return evaluate(qmodel, subject.test, device)["accuracy"]


def run_bench(subjects: list[Subject], batches: int, device,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {"fp": {}, "w8a8": [], "weight_only": [], "w4a8": []}
    started = time.monotonic()
    for s in subjects:
        s.fp_accuracy = evaluate(s.model.to(device).eval(), s.test, device)["accuracy"]
        results["fp"][s.space.name] = s.fp_accuracy
        say(f"{s.space.name}: float {s.fp_accuracy:.2f}%")

    for s in subjects:
        acc = _accuracy(s, Plan.uniform(s.space, 8, 8), "mse", batches, device)
        results["w8a8"].append({"space": s.space.name, "fp_accuracy": s.fp_accuracy,
                                "w8a8_accuracy": acc, "drop": s.fp_accuracy - acc,
                                "within_1_point": s.fp_accuracy - acc <= 1.0})
        say(f"{s.space.name}: W8A8 per-channel {acc:.2f}%")

    mobilenet = next((s for s in subjects if s.space.model == "mobilenetv2"), None)
    if mobilenet is not None:
        folded = fold_bn(mobilenet.model.eval())
        weights = [m.weight.detach() for m in folded.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        for granularity in ("per_tensor", "per_channel"):
            sqnrs = [weight_sqnr(w, 8, False, granularity == "per_channel") for w in weights]
            plan = Plan.uniform(mobilenet.space, 8, 32, include_fixed=True,
                                w_granularity=granularity, w_symmetric=False)
            acc = _accuracy(mobilenet, plan, "minmax", batches, device)
            results["weight_only"].append({
                "space": mobilenet.space.name, "granularity": granularity,
                "mean_weight_sqnr_db": statistics.fmean(sqnrs), "min_weight_sqnr_db": min(sqnrs),
                "accuracy": acc, "fp_accuracy": mobilenet.fp_accuracy})
            say(f"{mobilenet.space.name}: weight-only 8-bit {granularity} {acc:.2f}%")

    for s in subjects:
        for method in METHODS:
            row = {"space": s.space.name, "calibration": method, "fp_accuracy": s.fp_accuracy}
            for granularity in ("per_channel", "per_tensor"):
                plan = Plan.uniform(s.space, 4, 8, w_granularity=granularity)
                row[granularity] = _accuracy(s, plan, method, batches, device)
            results["w4a8"].append(row)
            say(f"{s.space.name}: W4A8 {method}: per-channel {row['per_channel']:.2f}%, "
                f"per-tensor {row['per_tensor']:.2f}%")
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


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
    out.append(("W4A8 accuracy by calibration method",
                ["space", "calibration", "per-channel acc %", "per-tensor acc %", "fp acc %"],
                [[r["space"], r["calibration"], round(r["per_channel"], 2),
                  round(r["per_tensor"], 2), round(r["fp_accuracy"], 2)] for r in results["w4a8"]]))
    return out


def subject_from(space, model, splits, batch_size: int, seed: int) -> Subject:
    return Subject(space, model, make_loader(splits.train, batch_size, shuffle=True, seed=seed),
                   make_loader(splits.test, 512, shuffle=False))
