"""Random search: plans drawn layer by layer with equal odds, those over the target
repaired down to it. The baseline every searcher must beat."""

from __future__ import annotations

import random

from nas.search.base import DiscreteSearcher, Told


class RandomSearcher(DiscreteSearcher):
    MAX_DRAWS = 1000  # draws per plan before a new plan counts as unlikely to exist

    def __init__(self, problem, options=None):
        super().__init__(problem, options)
        self.rng = random.Random(problem.seed)
        self.seen: set[tuple[int, ...]] = set()

    def ask(self) -> list[int] | None:
        for _ in range(self.MAX_DRAWS):
            plan = [self.rng.randrange(n) for n in self.problem.choices]
            if not self.problem.feasible(plan):
                plan = self.repair(plan)
            if tuple(plan) not in self.seen:
                self.seen.add(tuple(plan))
                return plan
        return None

    def tell(self, told: Told) -> None:
        self.seen.add(tuple(told.indices))
