"""Uniform plans: every precision the searchable layers share, each given to all of them
(fixed layers keep theirs), those within the target, dearest first."""

from __future__ import annotations

from nas.search.base import DiscreteSearcher, Told


def shared_choices(space) -> list:
    """The precisions every searchable layer offers."""
    searchable = [x for x in space.layers() if not x.fixed]
    if not searchable:
        return []
    return [c for c in searchable[0].choices if all(c in x.choices for x in searchable)]


def uniform_indices(space, choice) -> list[int] | None:
    """The plan giving every searchable layer `choice` (None: not a choice of all of them)."""
    if choice not in shared_choices(space):
        return None
    return [0 if x.fixed else x.choices.index(choice) for x in space.layers()]


def uniform_plans(problem) -> list[list[int]]:
    """Choice indices of each uniform plan of the space within the target, dearest first."""
    plans = [uniform_indices(problem.space, c) for c in shared_choices(problem.space)]
    plans = [p for p in plans if problem.feasible(p)]
    return sorted(plans, key=lambda p: -problem.table.index_cost(p))


class UniformSearcher(DiscreteSearcher):
    def __init__(self, problem, options=None):
        super().__init__(problem, options)
        self.todo = uniform_plans(problem)

    def ask(self) -> list[int] | None:
        return self.todo.pop(0) if self.todo else None

    def tell(self, told: Told) -> None:
        if told.indices in self.todo:
            self.todo.remove(told.indices)
