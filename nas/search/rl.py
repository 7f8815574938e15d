"""The HAQ-style RL searcher (Wang et al., CVPR 2019): a DDPG agent walks the searchable
layers in order and picks each one's precision from a continuous action; one walk is one
plan, one episode.

State of a layer: HAQ's features (its index, kind, channels, kernel, stride, feature-map
size, parameters, MACs), each scaled to [0, 1] over the layers, and the previous layer's
action. Action: a number in [0, 1], cut into equal bins over the layer's choices ordered
from cheapest to dearest in the searched cost. Budget: a plan over the target is brought
under it before it is evaluated by HAQ's rule, lowering the most costly layer one step at a
time; the agent learns from the plan actually evaluated (each layer's action is its
choice's bin centre). Reward: scale * (accuracy - reference), HAQ's lambda * (acc -
acc_original), the same for every layer of the episode. The first `warmup` episodes draw
actions uniformly; after them the actor's action is perturbed by truncated-normal noise
whose sigma decays per episode.

The agent's state is a function of the evaluated plans in the order they were told: each
proposal's noise is seeded by (seed, episodes told, proposals since), each update's batch
by (seed, episode). So `--resume` replays trials.csv into a new agent and gets the
buffer, weights, noise and learning curve the run had; a run killed outright loses nothing
trials.csv kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.errors import ConfigError
from nas.search.base import DiscreteSearcher, SearchProblem, Told
from nas.search.rl_agent import DDPG, truncated_normal

CURVE = "rl_curve.csv"
FEATURES = ("index", "depthwise", "linear", "in_channels", "out_channels", "kernel", "stride",
            "feature_map", "params", "macs")  # then the previous action
FIRST_PREVIOUS = 1.0   # HAQ's previous action for the first layer
HAQ_WARMUP = 20        # random episodes (of HAQ's 600)
HAQ_DECAY = 0.99       # noise decay per episode, when the episode count is not known
FINAL_NOISE = 0.02     # sigma reached by the last episode of a trial budget
MEMORY_EPISODES = 128  # episodes the replay buffer holds (HAQ's rmsize)
MAX_RESAMPLES = 50     # proposals per ask before giving up on finding a plan not yet seen
SEED_MASK = 2**32 - 1
ACCURACY_DIGITS = 4    # trials.csv's


def layer_kind(info) -> str:
    if info.type == "Linear":
        return "linear"
    return "depthwise" if info.groups > 1 and info.groups == info.in_channels else "conv"


def raw_features(info, index: int) -> list[float]:
    kind = layer_kind(info)
    return [index, kind == "depthwise", kind == "linear", info.in_channels, info.out_channels,
            info.kernel[0], info.stride[0], info.in_hw[0] * info.in_hw[1], info.params,
            info.macs]


def min_max(rows: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] over the rows; a constant column becomes 0."""
    low, high = rows.min(axis=0), rows.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return (rows - low) / span


def choice_order(row: Sequence[float], choices) -> list[int]:
    """A layer's choice indices from cheapest to dearest; equal costs by weight bits, then
    activation bits."""
    return sorted(range(len(row)), key=lambda c: (row[c], choices[c].w_bits, choices[c].a_bits))


def enforce(indices: Sequence[int], table, target) -> tuple[list[int], list[int]]:
    """HAQ's budget rule: while the plan is over the target, the layer that costs the most
    now (the later one on a tie) and has a cheaper choice steps down to its next cheaper
    one. The plan within the target, and the layers lowered in order."""
    current, steps = list(indices), []
    if target is None:
        return current, steps
    orders = [choice_order(row, choices) for row, choices in zip(table.values, table.choices)]
    while table.index_cost(current) > target.value:
        best = None
        for layer, row in enumerate(table.values):
            now = row[current[layer]]
            if min(row) < now and (best is None or now >= table.values[best][current[best]]):
                best = layer
        row, order = table.values[best], orders[best]
        rank = order.index(current[best])
        current[best] = next(order[r] for r in range(rank - 1, -1, -1)
                             if row[order[r]] < row[current[best]])
        steps.append(best)
    return current, steps


class RLSearcher(DiscreteSearcher):
    """DDPG over the searchable layers; plans brought within the target before evaluation."""

    OPTIONS = {"warmup": None, "noise": 0.5, "noise_decay": None, "scale": 0.1,
               "reference": 0.0}

    def __init__(self, problem: SearchProblem, options: dict[str, Any] | None = None):
        super().__init__(problem, options)
        if problem.multi_objective:
            raise ConfigError(f"--objectives {','.join(problem.objectives)}: rl maximises "
                              f"accuracy within a target; drop --objectives, or use --method "
                              f"bayes for several objectives")
        if problem.target is not None:
            from nas.search.derive import check_feasible

            check_feasible(problem.table, problem.target)
        table = problem.table
        self.positions = [i for i, n in enumerate(problem.choices) if n > 1]
        self.orders = [choice_order(table.values[p], table.choices[p]) for p in self.positions]
        layers = problem.space.layers()
        rows = np.array([raw_features(layers[p].info, p) for p in self.positions] or
                        np.zeros((0, len(FEATURES))), dtype=np.float64)
        self.features = torch.tensor(min_max(rows) if len(rows) else rows, dtype=torch.float32)
        self.seed = int(problem.seed) & SEED_MASK
        self.warmup, self.noise, self.decay = self._schedule()
        self.scale, self.reference = float(self.options["scale"]), float(self.options["reference"])
        self.agent = DDPG(len(FEATURES) + 1, MEMORY_EPISODES * max(1, len(self.positions)),
                          self.seed)
        self.episodes = 0  # evaluated plans told
        self.asks = 0      # proposals since the last episode was told
        self.known: dict[tuple[int, ...], float | None] = {}  # told: accuracy, None if failed
        # asked, not yet told: phase, and sigma before any doubling (None: uniform actions)
        self.pending: dict[tuple[int, ...], tuple[str, float | None]] = {}
        self.curve: list[dict[str, Any]] = []
        self.folder: Path | None = None

    def _schedule(self) -> tuple[int, float, float]:
        opts, budget = self.options, self.problem.budget
        trials = int(budget.value) if budget.kind == "trials" else None
        warmup = opts["warmup"]
        if warmup is None:
            warmup = min(HAQ_WARMUP, max(1, trials // 4)) if trials else HAQ_WARMUP
        noise = opts["noise"]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"rl option warmup={warmup!r}: give a whole number of episodes, "
                              f"0 or more")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
            raise ConfigError(f"rl option noise={noise!r}: give the starting sigma, 0 to 1")
        decay = opts["noise_decay"]
        if decay is None:
            decay = ((FINAL_NOISE / noise) ** (1 / max(1, trials - warmup))
                     if trials and noise > FINAL_NOISE else HAQ_DECAY)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ConfigError(f"rl option noise_decay={decay!r}: give a factor per episode, "
                              f"above 0 and at most 1")
        return warmup, float(noise), float(decay)

    # ------------------------------------------------------------------ ask / tell

    def sigma(self) -> float:
        """The exploration noise of the next proposal."""
        return self.noise * self.decay ** max(0, self.episodes - self.warmup)

    def ask(self) -> list[int] | None:
        rng = np.random.default_rng([self.seed, 0, self.episodes, self.asks])
        self.asks += 1
        warm = self.episodes < self.warmup
        base = self.sigma()
        for k in range(MAX_RESAMPLES):
            # A plan seen before is proposed again only when the noise is too small to leave
            # it: each retry doubles sigma.
            sigma = base if k == 0 else min(1.0, max(base, FINAL_NOISE) * 2 ** k)
            indices = self.walk(rng, None if warm else sigma)
            key = tuple(indices)
            if key not in self.known and key not in self.pending:
                self.pending[key] = ("warmup" if warm else "policy", None if warm else base)
                return indices
        return None

    def walk(self, rng: np.random.Generator, sigma: float | None) -> list[int]:
        """One episode's plan, within the target: actions drawn uniformly (sigma None) or
        the actor's, perturbed by truncated-normal noise."""
        indices = [0] * len(self.problem.choices)
        previous = FIRST_PREVIOUS
        for t, position in enumerate(self.positions):
            if sigma is None:
                action = float(rng.uniform())
            else:
                mean = self.agent.act(self.state(t, previous)[None])
                action = float(truncated_normal(rng, mean, sigma)[0])
            indices[position] = self.choice(t, action)
            previous = self.action(t, indices[position])
        return enforce(indices, self.problem.table, self.problem.target)[0]

    def tell(self, told: Told) -> None:
        key = tuple(told.indices)
        phase, sigma = self.pending.pop(key, (None, None))
        if key in self.known:
            return  # answered from a score told before: nothing new to learn
        if not told.feasible or "accuracy" not in told.metrics:
            self.known[key] = None  # failed (or never evaluated): not an episode
            return
        # As trials.csv keeps it, so that a resumed run learns from the same numbers.
        accuracy = round(float(told.metrics["accuracy"]), ACCURACY_DIGITS)
        self.known[key] = accuracy
        if phase is None:  # a replayed trial: its phase as a one-worker run had it
            phase = "warmup" if self.episodes < self.warmup else "policy"
            sigma = None if phase == "warmup" else self.sigma()
        self.episodes += 1
        self.asks = 0
        reward = self.scale * (accuracy - self.reference)
        previous = FIRST_PREVIOUS
        for t, position in enumerate(self.positions):
            action = self.action(t, told.indices[position])
            self.agent.buffer.add(self.state(t, previous), action, reward)
            previous = action
        if self.episodes >= self.warmup:
            rng = np.random.default_rng([self.seed, 1, self.episodes])
            for _ in self.positions:  # HAQ: one update per step of the episode
                self.agent.update(rng)
        costs = told.costs or self.problem.costs(told.indices)
        self._record({"episode": self.episodes, "phase": phase,
                      "noise": "" if sigma is None else round(sigma, 6),
                      "accuracy": round(accuracy, 4), "reward": round(reward, 6),
                      self.problem.cost: round(costs[self.problem.cost], 3)})

    # ------------------------------------------------------------------ state and actions

    def state(self, t: int, previous: float) -> torch.Tensor:
        return torch.cat([self.features[t], torch.tensor([previous], dtype=torch.float32)])

    def choice(self, t: int, action: float) -> int:
        """The choice index a continuous action picks at searchable layer t."""
        order = self.orders[t]
        return order[min(int(action * len(order)), len(order) - 1)]

    def action(self, t: int, choice: int) -> float:
        """The action a choice stands for: its bin's centre."""
        order = self.orders[t]
        return (order.index(choice) + 0.5) / len(order)

    # ------------------------------------------------------------------ outputs and state

    def use_folder(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _record(self, row: dict[str, Any]) -> None:
        """One episode of the learning curve, on disk at once (as trials.csv)."""
        self.curve.append(row)
        if self.folder is None:
            return
        from nas.runs import append_csv_row

        append_csv_row(self.folder / CURVE, list(row), list(row.values()))

    def state_dict(self) -> dict[str, Any]:
        """Everything the next proposals depend on (the agent, its buffer, the counters)."""
        return {"agent": self.agent.state_dict(), "episodes": self.episodes, "asks": self.asks,
                "known": list(self.known.items()), "pending": list(self.pending.items()),
                "curve": [dict(r) for r in self.curve]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.episodes, self.asks = int(state["episodes"]), int(state["asks"])
        self.known = {tuple(k): v for k, v in state["known"]}
        self.pending = {tuple(k): tuple(v) for k, v in state["pending"]}
        self.curve = [dict(r) for r in state["curve"]]

