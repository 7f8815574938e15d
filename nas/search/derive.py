"""From a search's choice probabilities to a plan within the target."""

from __future__ import annotations

from typing import Sequence

import torch

from nas.cost.base import CostTable
from nas.cost.targets import Target, format_cost
from nas.errors import ConfigError


def min_cost(table: CostTable) -> float:
    return sum(min(row) for row in table.values)


def check_feasible(table: CostTable, target: Target) -> None:
    cheapest = min_cost(table)
    if cheapest > target.value:
        raise ConfigError(f"target {target.text} is impossible: the cheapest plan in this space "
                          f"costs {format_cost(target.cost, cheapest)}; raise the target or allow "
                          f"fewer bits in the space")


def _best_move(current: list[int], probs: Sequence[torch.Tensor], table: CostTable,
               step_ok) -> tuple[int, int] | None:
    """The single-layer change (layer, choice) whose cost step passes `step_ok` and that gives
    up the least probability mass per unit of cost changed; None if no step passes."""
    best, best_score = None, float("inf")
    for layer, (row, p) in enumerate(zip(table.values, probs)):
        now = current[layer]
        for choice, cost in enumerate(row):
            if not step_ok(cost - row[now]):
                continue
            score = (float(p[now]) - float(p[choice])) / abs(cost - row[now])
            if score < best_score:
                best, best_score = (layer, choice), score
    return best


def repair(indices: Sequence[int], probs: Sequence[torch.Tensor], table: CostTable,
           target: Target) -> list[int]:
    """Lower precisions greedily until the plan meets the target.

    Each move changes one layer to a cheaper choice; the move taken is the one that gives up
    the least probability mass per unit of cost saved.
    """
    check_feasible(table, target)
    current = list(indices)
    while table.index_cost(current) > target.value:
        # Feasible, so some move always saves cost.
        layer, choice = _best_move(current, probs, table, lambda delta: delta < 0)
        current[layer] = choice
    return current


def fill(indices: Sequence[int], probs: Sequence[torch.Tensor], table: CostTable,
         target: Target, choices: Sequence[Sequence] | None = None) -> list[int]:
    """Raise precisions greedily while the plan stays within the target.

    The constrained loss is flat below the target, so a search may stop well under it; the
    budget it leaves is spent here. Each move changes one layer to a dearer choice that still
    fits, the one that gives up the least probability mass per unit of cost added. With
    `choices` (each layer's Choice list), a choice at no extra cost whose w_bits and a_bits
    are both at least the current ones (4-bit activations cost no size) is taken first.
    """
    current = list(indices)
    if choices is not None:
        for layer, (row, opts) in enumerate(zip(table.values, choices)):
            now = current[layer]
            better = [c for c in range(len(opts)) if row[c] <= row[now]
                      and opts[c].w_bits >= opts[now].w_bits and opts[c].a_bits >= opts[now].a_bits]
            current[layer] = max(better, key=lambda c: (opts[c].w_bits + opts[c].a_bits, -row[c]))
    while True:
        spare = target.value - table.index_cost(current)
        move = _best_move(current, probs, table, lambda delta: 0 < delta <= spare)
        if move is None:
            return current
        current[move[0]] = move[1]


def repair_by_cost(indices: Sequence[int], table: CostTable, target: Target | None) -> list[int]:
    """Lower precisions until the plan meets the target, by cost alone (no probabilities):
    each move takes one layer to its next cheaper choice, in the layer where that step saves
    the most. A searcher whose sampled plan is over the target uses it as a fallback."""
    current = list(indices)
    if target is None:
        return current
    check_feasible(table, target)
    while table.index_cost(current) > target.value:
        best, saving = None, 0.0
        for layer, row in enumerate(table.values):
            now = row[current[layer]]
            cheaper = [c for c in range(len(row)) if row[c] < now]
            if cheaper:
                step = max(cheaper, key=lambda c: row[c])  # the next step down
                if now - row[step] > saving:
                    best, saving = (layer, step), now - row[step]
        current[best[0]] = best[1]  # feasible, so some layer can always step down
    return current
