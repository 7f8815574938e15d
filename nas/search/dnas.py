"""DNAS: train the supernet's shared weights and its architecture logits theta in turn.

After a weight-only warm-up (theta frozen: every branch is sampled uniformly), each step
takes one SGD step on the weights (train split, in the supernet's mode; theta frozen, so in
hard mode each layer computes one plain sampled branch) and one Adam step on theta (arch
split, in `arch_mode`). The theta step defaults to soft mode, the exact gradient of the
relaxed mixture (FBNet, EdMIPS): hard mode's one-branch estimate (`MixedLayer.hard`) is
first order, blind to the loss that quantization noise adds through curvature, and in
`nas bench dnas` it drifted to 4-bit activations that cost no size (docs/DESIGN.md).
The theta loss is either the constrained additive form CE + lambda * max(0, E[cost] /
target - 1) or DNAS's multiplicative form CE * beta * (log E[cost])^gamma; E[cost] is the
cost table's expectation under softmax(theta), so it is differentiable in theta.

Determinism: batch order is a function of (seed, epoch, step), and the Gumbel noise comes
from the supernet's own generator, so a run interrupted and resumed from its checkpoint
reaches the same theta as one that ran straight through (epoch budgets, on the CPU).

On several workers (nas.search.dnas_parallel) the loop is the same: every worker draws the
same global batch and Gumbel noise, steps on its share of the batch, and DDP averages the
gradients.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from nas.budget import Budget
from nas.cost.base import CostTable
from nas.cost.targets import Target
from nas.data import ArrayDataset, make_loader
from nas.supernet import Supernet, recalibrate_bn, tau_at
from nas.train import to_device, evaluate, lr_at

LOSSES = ("additive", "multiplicative")

# The search hands its resumable state to `on_save` this often (wall time) or after this
# many steps, whichever comes first: a killed search loses at most one interval. A save of
# the synthetic/ResNet-8 state takes milliseconds, under 0.1 % of a minute.
SAVE_SECONDS = 60.0
SAVE_STEPS = 1000
# Plans sampled for one-shot evaluation: each takes a BN re-estimate and 20 batches, so more
# would take days (a time budget skips those past its deadline; an epoch budget evaluates all).
MAX_SAMPLES = 10_000


@dataclass
class DnasConfig:
    budget: Budget
    target: Target | None
    loss: str = "additive"
    lam: float = 2.0          # additive penalty weight
    beta: float = 0.2         # multiplicative form (FBNet: 0.2, 0.6)
    gamma: float = 0.6
    arch_mode: str = "soft"   # the theta step's forward mode (the weight step uses the supernet's)
    tau0: float = 5.0
    tau_min: float = 0.2
    warmup: float = 0.2       # fraction of the budget that trains weights only
    w_lr: float = 0.05
    theta_lr: float = 0.01
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    log_every: int = 20
    progress: bool = True


@dataclass
class SearchState:
    """Everything a resumed run needs besides the supernet's own tensors."""

    step: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class _SaveClock:
    """Says when the next periodic save is due: SAVE_SECONDS or SAVE_STEPS since the last."""

    def __init__(self, step: int, seconds: float, steps: int):
        self.seconds, self.steps = seconds, steps
        self.mark(step)

    def mark(self, step: int) -> None:
        self.last_step, self.last_time = step, time.monotonic()

    def due(self, step: int) -> bool:
        return (step - self.last_step >= self.steps
                or time.monotonic() - self.last_time >= self.seconds)


class _Batches:
    """Endless batches whose order is a function of (seed, epoch, step): resumable."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.per_epoch = max(1, len(dataset) // batch_size)

    def at(self, step: int):
        epoch, b = divmod(step, self.per_epoch)
        if isinstance(self.dataset, ArrayDataset):
            order = torch.randperm(len(self.dataset),
                                   generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            gen = torch.Generator().manual_seed(self.seed * 104729 + step)
            return self.dataset.batch(idx, generator=gen)
        if b == 0 or not hasattr(self, "_iter"):
            self._iter = iter(make_loader(self.dataset, self.batch_size, shuffle=True,
                                          seed=self.seed + epoch, drop_last=True))
        return next(self._iter)


class _Clock:
    """Budget progress that survives a resume (elapsed time and steps are restored)."""

    def __init__(self, budget: Budget, steps_per_epoch: int, state: SearchState):
        self.budget, self.per_epoch, self.state = budget, steps_per_epoch, state
        self.started = time.monotonic() - state.elapsed

    def fraction(self) -> float:
        if self.budget.kind == "epochs":
            return min(1.0, self.state.step / (self.per_epoch * self.budget.value))
        return min(1.0, (time.monotonic() - self.started) / self.budget.value)

    def sync(self) -> None:
        self.state.elapsed = time.monotonic() - self.started


class _Alone:
    """One process: the whole batch, the supernet itself, nothing to agree on."""

    is_writer = True

    def __init__(self, supernet: Supernet):
        self.weight_model = self.theta_model = supernet

    @staticmethod
    def shard(x, y):
        return x, y

    @staticmethod
    def agree(fraction: float) -> float:
        return fraction

    @staticmethod
    def mean(values: list[float]) -> list[float]:
        return values


def cost_penalty(ce: torch.Tensor, expected: torch.Tensor, cfg: DnasConfig) -> torch.Tensor:
    if cfg.loss == "multiplicative":
        return ce * cfg.beta * torch.log(expected).clamp(min=1e-6) ** cfg.gamma
    return ce + cfg.lam * torch.relu(expected / cfg.target.value - 1.0)


def search(supernet: Supernet, splits, table: CostTable, cfg: DnasConfig, device,
           state: SearchState | None = None, optim_state: dict | None = None,
           on_log: Callable[[dict[str, Any]], None] | None = None,
           on_save: Callable[[SearchState, dict], None] | None = None,
           parallel=None) -> tuple[SearchState, dict, bool]:
    """Run (or continue) the search until the budget is spent or Ctrl-C.

    Returns the state, the optimizers' state (for a checkpoint) and whether the run was
    interrupted. `on_save(state, optimizers)` is called every SAVE_SECONDS or SAVE_STEPS
    (whichever comes first) with what a resumed search needs besides the supernet.
    `parallel` (a nas.search.dnas_parallel.DataParallel, built around this supernet on
    `device`) runs the steps on one worker of several; None: this process alone.
    """
    from tqdm import tqdm

    state = state or SearchState()
    weight_mode = supernet.mode
    supernet.to(device, memory_format=torch.channels_last).train()  # faster CPU convs
    par = parallel or _Alone(supernet)
    train = _Batches(splits.train, cfg.batch_size, cfg.seed)
    arch = _Batches(splits.arch, cfg.batch_size, cfg.seed + 1)
    clock = _Clock(cfg.budget, train.per_epoch, state)
    w_opt = torch.optim.SGD(supernet.weight_parameters(), lr=cfg.w_lr, momentum=0.9,
                            nesterov=True, weight_decay=cfg.weight_decay)
    a_opt = torch.optim.Adam(supernet.arch_parameters(), lr=cfg.theta_lr, betas=(0.5, 0.999))
    if optim_state:
        w_opt.load_state_dict(optim_state["weights"])
        a_opt.load_state_dict(optim_state["theta"])
    total = (int(cfg.budget.value * train.per_epoch) if cfg.budget.kind == "epochs" else None)
    bar = tqdm(total=total, initial=state.step, desc="dnas", leave=False,
               disable=not (cfg.progress and par.is_writer) or None)
    interrupted = False
    ce_sum, n_sum = 0.0, 0
    saves = _SaveClock(state.step, SAVE_SECONDS, SAVE_STEPS)
    # A time budget's fraction is rank 0's on every worker: the schedule, the last step and
    # the log steps are then the same everywhere (a step budget's fraction is by construction).
    agree = par.agree if cfg.budget.kind == "seconds" else (lambda f: f)
    try:
        fraction = agree(clock.fraction())
        while fraction < 1.0:
            searching = fraction >= cfg.warmup and supernet.arch_parameters()
            supernet.tau = tau_at((fraction - cfg.warmup) / max(1e-9, 1 - cfg.warmup),
                                  cfg.tau0, cfg.tau_min) if searching else cfg.tau0
            for group in w_opt.param_groups:
                group["lr"] = lr_at(fraction, cfg.w_lr, 0.03)
            x, y = par.shard(*train.at(state.step))
            supernet.train_theta(False)  # hard mode: one plain branch per layer
            supernet.set_mode(weight_mode)
            ce = nn.functional.cross_entropy(par.weight_model(to_device(x, device)),
                                             y.to(device))
            w_opt.zero_grad(set_to_none=True)
            ce.backward()
            w_opt.step()
            ce_sum, n_sum = ce_sum + ce.item(), n_sum + 1
            arch_ce = expected = None
            if searching:
                supernet.train_theta(True)
                supernet.set_mode(cfg.arch_mode)
                xa, ya = par.shard(*arch.at(state.step))
                arch_ce = nn.functional.cross_entropy(par.theta_model(to_device(xa, device)),
                                                      ya.to(device))
                expected = table.expected(supernet.probs())
                loss = cost_penalty(arch_ce, expected, cfg)
                a_opt.zero_grad(set_to_none=True)
                # Gradients for theta only: the weights' .grad stays the weight step's.
                torch.autograd.backward(loss, inputs=supernet.arch_parameters())
                a_opt.step()
            state.step += 1
            bar.update()
            fraction = agree(clock.fraction())
            if state.step % cfg.log_every == 0 or fraction >= 1.0:
                clock.sync()
                # Every worker's share of the batch, averaged: the one-worker numbers.
                means = par.mean([ce_sum / max(1, n_sum)]
                                 + ([arch_ce.item()] if searching else []))
                record = ({"arch_ce": means[1], "expected_cost": expected.item()}
                          if searching else {})
                entry = {"step": state.step, "seconds": round(state.elapsed, 2),
                         "tau": round(supernet.tau, 4), "train_ce": means[0],
                         **record, "phase": "search" if searching else "warmup",
                         "probs": [[round(v, 5) for v in p.tolist()] for p in supernet.probs()]}
                ce_sum, n_sum = 0.0, 0
                state.history.append(entry)
                if on_log:
                    on_log(entry)
            if on_save and saves.due(state.step) and fraction < 1.0:
                clock.sync()  # the budget a resumed search has left
                on_save(state, {"weights": w_opt.state_dict(), "theta": a_opt.state_dict()})
                saves.mark(state.step)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        clock.sync()
        supernet.train_theta(True)
        supernet.set_mode(weight_mode)
    return state, {"weights": w_opt.state_dict(), "theta": a_opt.state_dict()}, interrupted


@dataclass
class Candidate:
    name: str
    indices: list[int]
    cost: float
    meets_target: bool
    accuracy: float = math.nan


def one_shot_accuracy(supernet: Supernet, indices, splits, device, bn_batches: int = 4,
                      eval_batches: int | None = None, split: str = "arch",
                      batch_size: int = 256) -> float:
    """Accuracy of one plan on the supernet's shared weights, with BN statistics re-estimated
    for that plan. The supernet's state is restored afterwards."""
    saved = copy.deepcopy(supernet.state_dict())
    try:
        supernet.fix(indices)
        recalibrate_bn(supernet, make_loader(splits.train, batch_size, shuffle=True, seed=0),
                       bn_batches, device)
        data = getattr(splits, split)
        if eval_batches is not None and isinstance(data, ArrayDataset):
            data = data.subset(torch.arange(min(len(data), eval_batches * batch_size)))
        return evaluate(supernet, make_loader(data, batch_size, shuffle=False), device)["accuracy"]
    finally:
        supernet.fix(None)
        supernet.load_state_dict(saved)


def candidates(supernet: Supernet, table: CostTable, target: Target | None, samples: int,
               seed: int) -> list[Candidate]:
    """The argmax plan, its repair to the target, that plan filled up to the target, and
    `samples` plans drawn from softmax(theta)."""
    from nas.search.derive import fill, repair

    probs = [p.detach() for p in supernet.probs()]
    limit = target.value if target else math.inf

    def make(name, idx):
        cost = table.index_cost(idx)
        return Candidate(name, list(idx), cost, cost <= limit * (1 + 1e-9))

    argmax = supernet.argmax_indices()
    out = [make("argmax", argmax)]
    if target and not out[0].meets_target:
        out.append(make("argmax-repaired", repair(argmax, probs, table, target)))
    if target:
        base = out[-1].indices
        filled = fill(base, probs, table, target, [m.choices for m in supernet.mixed()])
        if filled != base:
            out.append(make(out[-1].name + "-filled", filled))
    gen = torch.Generator().manual_seed(seed + 12345)
    seen = {tuple(c.indices) for c in out}
    for k in range(samples):
        idx = supernet.sample_indices(gen)
        if tuple(idx) not in seen:
            seen.add(tuple(idx))
            out.append(make(f"sample-{k + 1}", idx))
    return out


def derive(supernet: Supernet, table: CostTable, target: Target | None, splits, device,
           samples: int, seed: int, deadline: float | None = None,
           eval_batches: int = 20) -> tuple[list[Candidate], Candidate]:
    """Evaluate the candidates one-shot and pick the best one that meets the target.

    Past `deadline` (time.monotonic()), sampled candidates are skipped; the argmax plan and
    its repair are always evaluated.
    """
    cands = candidates(supernet, table, target, samples, seed)
    for c in cands:
        if deadline is not None and time.monotonic() > deadline and c.name.startswith("sample"):
            break
        c.accuracy = one_shot_accuracy(supernet, c.indices, splits, device,
                                       eval_batches=eval_batches)
    evaluated = [c for c in cands if not math.isnan(c.accuracy)]
    eligible = [c for c in evaluated if c.meets_target] or evaluated
    return cands, max(eligible, key=lambda c: c.accuracy)
