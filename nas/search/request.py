"""What a user asked a search for, as plain values (the command line parsed and checked)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SearchRequest:
    method: str
    budget: str
    space: str | None = None
    target: str | None = None
    cost: str | None = None
    latency_batch: int | None = None
    device_spec: str | None = None
    checkpoint: str | None = None
    resume: str | None = None
    seed: int = 0
    runs_dir: str = "runs"
    device: str = "auto"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # the method's own flags

    @property
    def data_args(self):
        """The data options as `load_space_data` reads them."""
        from types import SimpleNamespace

        return SimpleNamespace(data_dir=self.data_dir, train_subset=self.train_subset,
                               test_subset=self.test_subset, seed=self.seed)
