"""Quantization-aware training: prepare a model, fine-tune it, convert it to fixed ranges.

The prepare / convert pattern (torchao's): `prepare_qat(model, plan)` folds each conv->BN
pair into a `ConvBn2d` (Jacob et al. 2018: the folded weight is quantized, batch statistics
until they are frozen) and gives every planned layer learned quantizers (LSQ by default,
PACT for activations, or fixed calibrated ranges). Any training loop can train the result;
`convert(model)` then returns the deployable form, the same as `prepare_ptq`'s output:
QuantConv2d / QuantLinear on BN-folded weights, every quantizer a fixed scale and zero
point. `finetune` is the loop `nas qat` runs; `load_qat` reads the `qat.pt` it writes.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from nas.budget import BudgetClock
from nas.errors import ConfigError
from nas.plan import LayerPrecision, Plan
from nas.quant.bn_fold import ConvBn2d, conv_bn_pairs
from nas.quant.fake import is_float
from nas.quant.modules import (QUANT_TYPES, QuantConv2d, calibrate, input_quantized_layers,
                               plan_layers)
from nas.quant.modules import quantize_model as _quantize_model
from nas.quant.observers import weight_method
from nas.quant.quantizer import FakeQuantizer
from nas.train import TrainConfig

QAT_FORMAT = "nas-qat/1"
DISTILL_WEIGHT = 0.5  # loss = (1 - w) * CE + w * T^2 * KL(float || quantized) at temperature T


# ---------------------------------------------------------------- plans given as dicts

def as_plan(plan: Any) -> Plan:
    """A Plan, or a dict {layer: (w_bits, a_bits) | "W4A8" | LayerPrecision | {w_bits: ..}}
    made into one (space defaults: per-channel symmetric weights, asymmetric activations)."""
    if isinstance(plan, Plan):
        return plan
    if not isinstance(plan, Mapping):
        raise ConfigError(f"plan must be a nas.Plan or a dict {{layer name: (w_bits, a_bits) "
                          f"or 'W4A8'}}, not {type(plan).__name__}")
    layers = {str(name): _precision(str(name), value) for name, value in plan.items()}
    return Plan(space="", model="", layer_hash="", layers=layers,
                provenance={"method": "dict"})


def _precision(name: str, value: Any) -> LayerPrecision:
    from nas.spaces import ALLOWED_BITS

    if isinstance(value, LayerPrecision):
        return value
    if isinstance(value, Mapping):
        return LayerPrecision.from_dict(dict(value), f"plan layer {name!r}")
    bits = None
    if isinstance(value, str):
        match = re.fullmatch(r"[wW](\d+)[aA](\d+)", value.strip())
        bits = tuple(int(b) for b in match.groups()) if match else None
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) for b in value):
        bits = tuple(value)
    if bits is None or any(b not in ALLOWED_BITS for b in bits):
        raise ConfigError(f"plan layer {name!r}: {value!r} is not a precision; give "
                          f"(w_bits, a_bits) or 'W<bits>A<bits>' with bits 2-8, 16 or 32, "
                          f"such as (4, 8) or 'W4A8'")
    return LayerPrecision(*bits)


def quantize_model(model: nn.Module, plan: Any, *, calibration: str = "minmax",
                   learn: str | None = None, stochastic: bool = False,
                   inplace: bool = False) -> nn.Module:
    """`nas.quant.modules.quantize_model` taking a Plan or a dict ({layer: (4, 8)} or
    {layer: "W4A8"}): the plan's layers swapped for fake-quantized ones."""
    return _quantize_model(model, as_plan(plan), calibration=calibration, learn=learn,
                           stochastic=stochastic, inplace=inplace)


# ---------------------------------------------------------------- prepare

def _learn(learn: str | None) -> str | None:
    if learn in (None, "none"):
        return None
    if learn not in ("lsq", "pact"):
        raise ConfigError(f"learn={learn!r} is unknown; use 'lsq', 'pact' or None (fixed "
                          f"calibrated ranges)")
    return learn


def _quantized(prec: LayerPrecision | None) -> bool:
    return prec is not None and not (is_float(prec.w_bits) and is_float(prec.a_bits))


def prepare_qat(model: nn.Module, plan: Any, *, calib_loader=None, calib_batches: int = 8,
                calibration: str = "mse", learn: str | None = "lsq", fold_bn: bool = True,
                freeze_bn_after: int | None = None,
                ranges: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> nn.Module:
    """A copy of `model` (train mode) with fake quantizers to train in any loop.

    Every Conv2d whose output feeds only a BatchNorm2d becomes a `ConvBn2d` (the BN module
    becomes Identity): the folded weight is what gets quantized, as it will be deployed;
    batch statistics are used until `freeze_bn_after` training steps (None: never frozen).
    Weight ranges start from the (folded) weights; activation ranges from `calib_batches`
    batches of `calib_loader` (or, without one, from the first batch the model sees), with
    the observer `calibration`, or given as `ranges` {layer: (lo, hi)}. `learn`: "lsq" learns
    every step size; "pact" learns the clip of each activation whose range starts at 0 (PACT
    clips to [0, alpha]; a signed input such as the image keeps LSQ) and LSQ steps for the
    weights; None keeps the activation ranges fixed (weights follow their min-max on every
    training step). `convert()` turns the result into fixed ranges.
    """
    learn = _learn(learn)
    plan = as_plan(plan)
    for name, prec, _ in plan_layers(model, plan):
        if learn == "pact" and prec.a_symmetric and not is_float(prec.a_bits):
            raise ConfigError(f"plan layer {name!r}: PACT clips to [-alpha, alpha], which "
                              f"leaves one level of a signed range unused and has no exact "
                              f"fixed-range form; use learn='lsq' for symmetric activations")
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model) if fold_bn else []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        prec = plan.layers.get(conv_name)
        wq = iq = None
        if _quantized(prec):
            axis = 0 if prec.w_granularity == "per_channel" else None
            wq = FakeQuantizer(prec.w_bits, prec.w_symmetric, axis=axis,
                               method=weight_method(calibration),
                               learn="lsq" if learn else None, dynamic=True)
            iq = FakeQuantizer(prec.a_bits, prec.a_symmetric, method=calibration, learn=learn)
        fused = ConvBn2d(conv, bn, wq, iq, freeze_bn_after)
        if wq is not None:
            fused.precision = prec
            with torch.no_grad():
                wq.observe_tensor(fused.to_folded().weight)
        model.set_submodule(conv_name, fused)
        model.set_submodule(bn_name, nn.Identity())
    fused_names = {c for c, _ in pairs}
    rest = {n: p for n, p in plan.layers.items() if n not in fused_names}
    _quantize_model(model, Plan(plan.space, plan.model, plan.layer_hash, rest),
                    calibration=calibration, learn=learn, inplace=True)
    if ranges is not None:
        for name, (lo, hi) in ranges.items():
            q = getattr(model.get_submodule(name), "input_quantizer", None)
            if isinstance(q, FakeQuantizer) and q.enabled:
                q.set_range(lo, hi)
    elif calib_loader is not None:
        calibrate(model, calib_loader, calib_batches)
    if learn == "pact":
        _pact_where_unsigned(model)
    return model.train()


def _pact_where_unsigned(model: nn.Module) -> None:
    """PACT's clip [0, alpha] would cut off the negative part of a range that has one (zero
    point above 0): those quantizers learn an LSQ step instead."""
    for name, layer in input_quantized_layers(model).items():
        q = layer.input_quantizer
        if q.learn != "pact" or not q.enabled:
            continue
        if not bool(q.initialized):
            raise ConfigError(f"learn='pact' needs the activation ranges first (layer "
                              f"{name!r} has none): give calib_loader or ranges")
        if bool((q.zero_point != 0).any()):
            q.learn, q.alpha = "lsq", None
            q.step = nn.Parameter(q.scale.detach().clone())


def freeze_bn(model: nn.Module) -> None:
    """Freeze the BN statistics of every ConvBn2d now (running statistics from here on)."""
    for m in model.modules():
        if isinstance(m, ConvBn2d):
            m.freeze_bn_after = 0


# ---------------------------------------------------------------- convert

def _fixed_range(dst: FakeQuantizer, src: nn.Module, where: str) -> None:
    """dst (learn=None) gets the scale and zero point that compute what src computes."""
    if not isinstance(src, FakeQuantizer) or not src.enabled:
        return
    if not bool(src.initialized):
        raise ConfigError(f"{where} has no range yet: calibrate the model or run a batch "
                          f"through it before convert()")
    scale, zero_point = src.fixed_qparams()
    dst.scale = scale.detach().clone().to(dst.scale.device)
    dst.zero_point = zero_point.detach().clone().to(dst.zero_point.device)
    dst.initialized.fill_(True)


def _converted(layer: nn.Module, name: str) -> nn.Module:
    if isinstance(layer, ConvBn2d):
        folded = layer.to_folded()
        prec = getattr(layer, "precision", None)
        if prec is None:
            return folded
        q = QuantConv2d.from_float(folded, prec, layer.input_quantizer.method)
    else:  # rebuilt from its weight and bias alone: the learned quantizers are not copied
        plain = type(layer)._empty_like(layer)
        plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "." not in k})
        q = type(layer).from_float(plain, layer.precision, layer.input_quantizer.method)
    _fixed_range(q.weight_quantizer, layer.weight_quantizer,
                 f"the weight quantizer of layer {name!r}")
    _fixed_range(q.input_quantizer, layer.input_quantizer, f"the input quantizer of layer {name!r}")
    return q


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """The eval-mode deployable form of a prepared (and trained) model, as `prepare_ptq`
    makes it: QuantConv2d / QuantLinear with BN-folded weight and bias, each quantizer a
    fixed scale and zero point (LSQ's step or PACT's clip made into one), BN as Identity.
    Its outputs are the prepared model's eval-mode outputs. The model given is unchanged."""
    model = copy.deepcopy(model).eval()
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, ConvBn2d) or isinstance(m, QUANT_TYPES)]
    for name, layer in targets:
        model.set_submodule(name, _converted(layer, name).eval())
    return model.eval()


# ---------------------------------------------------------------- fine-tuning

@dataclass
class QatConfig(TrainConfig):
    """TrainConfig's schedule for fine-tuning, with QAT's own settings."""

    lr: float = 0.005
    freeze_bn: float = 0.5    # fraction of the budget after which BN statistics are frozen
    temperature: float = 2.0  # distillation temperature (with a teacher)
    eval_every: int | None = None  # steps between arch-split evaluations (None: each epoch)


@dataclass
class QatResult:
    start_val_accuracy: float
    best_val_accuracy: float
    best_step: int
    steps: int
    epochs: float
    seconds: float
    best_state: dict[str, torch.Tensor]


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """(1 - w) CE + w T^2 KL(softmax(teacher / T) || softmax(student / T)), w = DISTILL_WEIGHT;
    T^2 keeps the soft term's gradient on the scale of CE's (Hinton et al. 2015)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                  log_target=True, reduction="batchmean")
    return (1 - DISTILL_WEIGHT) * F.cross_entropy(logits, y) + DISTILL_WEIGHT * t * t * kl


def finetune(model: nn.Module, splits, cfg: QatConfig, device: torch.device,
             teacher: nn.Module | None = None,
             on_eval: Callable[[dict[str, Any], bool], None] | None = None) -> QatResult:
    """SGD (Nesterov, warm-up + cosine over the budget) on a prepared model, evaluated on
    the arch split before the first step and then each epoch (or `eval_every` steps); BN
    statistics freeze at `cfg.freeze_bn` of the budget. The model ends holding its best
    state, the starting one included."""
    from tqdm import tqdm

    from nas.data import make_loader
    from nas.train import evaluate, lr_at, to_device

    torch.manual_seed(cfg.seed)
    model.to(device, memory_format=torch.channels_last).train()
    if teacher is not None:
        teacher.to(device, memory_format=torch.channels_last).eval()
    train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                               drop_last=len(splits.train) > cfg.batch_size)
    val_loader = make_loader(splits.arch, 512, shuffle=False)
    decay, no_decay = [], []
    for p in model.parameters():  # no weight decay on BN, biases, step sizes and clips
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    clock = BudgetClock(cfg.budget, len(train_loader))
    frozen = cfg.freeze_bn <= 0
    if frozen:
        freeze_bn(model)
    stats = {"seen": 0, "correct": 0, "loss": 0.0}
    best = {"acc": -1.0, "step": 0, "state": None}
    epoch = 0

    def check(lr: float) -> float:
        val = evaluate(model, val_loader, device)
        improved = val["accuracy"] > best["acc"]
        if improved:
            best.update(acc=val["accuracy"], step=clock.steps,
                        state=copy.deepcopy(model.state_dict()))
        seen = max(1, stats["seen"])
        record = {"epoch": epoch, "step": clock.steps, "epochs_done": round(clock.epochs_done, 4),
                  "seconds": round(clock.elapsed, 2), "lr": lr, "bn_frozen": frozen,
                  "train_loss": stats["loss"] / seen if stats["seen"] else None,
                  "train_accuracy": 100 * stats["correct"] / seen if stats["seen"] else None,
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        stats.update(seen=0, correct=0, loss=0.0)
        if on_eval:
            on_eval(record, improved)
        return val["accuracy"]

    start = check(0.0)
    lr = 0.0
    while not clock.exhausted():
        epoch += 1
        bar = tqdm(total=len(train_loader), desc=f"qat {epoch}", leave=False,
                   disable=not cfg.progress or None, file=sys.stderr)
        for x, y in train_loader:
            if not frozen and clock.fraction() >= cfg.freeze_bn:
                freeze_bn(model)
                frozen = True
            lr = lr_at(clock.fraction(), cfg.lr, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = to_device(x, device), y.to(device)
            logits = model(x)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = distill_loss(logits, teacher_logits, y, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clock.step()
            stats["seen"] += len(y)
            stats["loss"] += loss.item() * len(y)
            stats["correct"] += (logits.argmax(1) == y).sum().item()
            bar.update()
            if cfg.eval_every and clock.steps % cfg.eval_every == 0:
                check(lr)
            if clock.exhausted():
                break
        bar.close()
        if not cfg.eval_every or clock.steps % cfg.eval_every:
            check(lr)
    seconds = clock.elapsed
    model.load_state_dict(best["state"])
    return QatResult(start, best["acc"], best["step"], clock.steps, round(clock.epochs_done, 4),
                     seconds, best["state"])


# ---------------------------------------------------------------- qat.pt

def qat_payload(space, plan: Plan, converted: nn.Module, *, learn: str | None, seed: int,
                created: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """What `qat.pt` holds: the converted model's state dict and what rebuilds it."""
    state = {k: v.detach().cpu() for k, v in converted.state_dict().items()}
    return {"format": QAT_FORMAT, "kind": "qat", "space": space.to_dict(),
            "plan": plan.to_dict(), "state_dict": state, "learn": learn or "none",
            "seed": seed, "created": created, "metrics": metrics}


def converted_structure(model: nn.Module, plan: Any) -> nn.Module:
    """The structure `convert()` gives for `model` (float, any weights) and `plan`: BN
    folded, the plan's layers QuantConv2d / QuantLinear with fixed-range quantizers."""
    from nas.quant.bn_fold import fold_bn

    return _quantize_model(fold_bn(model.eval()), as_plan(plan)).eval()


def load_qat(path: str | Path):
    """(space, plan, model) from a `nas qat` run's qat.pt: the converted model (eval mode,
    CPU), as `convert()` returned it."""
    from nas.runs import load_checkpoint, load_state
    from nas.spaces import SearchSpace

    fix = "pass the qat.pt of a 'nas qat' run folder"
    payload = load_checkpoint(path, ("state_dict", "space", "plan"), fix,
                              expect={"format": QAT_FORMAT, "kind": "qat"})
    space = SearchSpace.from_dict(payload["space"], source=f"checkpoint {path}")
    plan = Plan.from_dict(payload["plan"], source=f"checkpoint {path}").resolved(space)
    model = converted_structure(space.build_model(), plan)
    load_state(model, payload["state_dict"], f"checkpoint {path}",
               f"the quantized {space.model} of its plan")
    return space, plan, model.eval()
