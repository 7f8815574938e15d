"""Evaluators: a plan -> its accuracy, rebuilt from plain data in any process.

An `EvaluatorSpec` is paths and options only, so a Ray worker rebuilds the evaluator from
it; `evaluator_for` keeps one per spec in the process, so that a reused worker loads the
supernet (or checkpoint) and the data once, not once a trial.
- oneshot: the shared weights of a supernet (a DNAS run's, or one a discrete search
  trained), with each plan's branches fixed and BN statistics re-estimated for it on a
  few training batches.
- ptq: a float checkpoint, BN folded once, quantized by each plan and calibrated.
Both score the arch split, which the weights were not trained on; the test split is kept
for the chosen plan, which no searcher sees.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

KINDS = ("oneshot", "ptq")


@dataclass(frozen=True)
class EvaluatorSpec:
    kind: str
    path: str                 # supernet.pt (oneshot) or a float best.pt (ptq), absolute
    space: dict[str, Any]     # the resolved space, data subsets included
    seed: int                 # the data splits' seed: the one the weights were trained with
    data_dir: str | None = None
    device: str = "cpu"
    threads: int = 1          # torch threads: the trial's CPUs
    bn_batches: int = 4       # oneshot: BN re-estimation batches
    eval_batches: int = 20    # arch-split batches of 256 scored per plan
    calibration: str = "minmax"   # ptq
    calib_batches: int = 4        # ptq

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EvaluatorSpec":
        return cls(**raw)

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


class Evaluator(ABC):
    """Scores plans (choice indices) on the arch or test split."""

    def __init__(self, spec: EvaluatorSpec):
        import torch

        from nas.data import load_data
        from nas.spaces import SearchSpace

        self.spec = spec
        self.device = torch.device(spec.device)
        self.space = SearchSpace.from_dict(spec.space, source="evaluator space")
        self.splits = load_data(self.space.data, data_dir=spec.data_dir, seed=spec.seed,
                                **self.space.data_kwargs)

    @abstractmethod
    def evaluate(self, indices: Sequence[int], split: str = "arch") -> dict[str, float]:
        """{"accuracy": percent} of the plan on `split`."""

    def _eval_data(self, split: str):
        import torch

        from nas.data import ArrayDataset

        data = getattr(self.splits, split)
        if split == "arch" and isinstance(data, ArrayDataset):
            data = data.subset(torch.arange(min(len(data), self.spec.eval_batches * 256)))
        return data


class OneShotEvaluator(Evaluator):
    def __init__(self, spec: EvaluatorSpec):
        super().__init__(spec)
        import torch

        from nas.search.supernet_file import load_supernet_file, rebuild_supernet

        _, self.supernet = rebuild_supernet(load_supernet_file(spec.path),
                                            f"supernet {spec.path}")
        self.supernet.to(self.device, memory_format=torch.channels_last)

    def evaluate(self, indices: Sequence[int], split: str = "arch") -> dict[str, float]:
        from nas.search.dnas import one_shot_accuracy

        eval_batches = self.spec.eval_batches if split == "arch" else None
        return {"accuracy": one_shot_accuracy(self.supernet, list(indices), self.splits,
                                              self.device, self.spec.bn_batches, eval_batches,
                                              split=split)}


class PtqEvaluator(Evaluator):
    def __init__(self, spec: EvaluatorSpec):
        super().__init__(spec)
        from nas.checkpoint import load_model
        from nas.quant.bn_fold import fold_bn
        from nas.search.encoding import PlanEncoding

        _, model, _ = load_model(spec.path)
        self.folded = fold_bn(model.eval())
        self.encoding = PlanEncoding(self.space)

    def evaluate(self, indices: Sequence[int], split: str = "arch") -> dict[str, float]:
        from nas.data import make_loader
        from nas.quant.ptq import prepare_ptq
        from nas.train import evaluate

        calib = make_loader(self.splits.train, 128, shuffle=True, seed=self.spec.seed)
        qmodel = prepare_ptq(self.folded, self.encoding.plan(indices), calib,
                             self.spec.calib_batches, self.spec.calibration, fold=False,
                             device=self.device)
        data = make_loader(self._eval_data(split), 256, shuffle=False)
        return {"accuracy": evaluate(qmodel, data, self.device)["accuracy"]}


_CACHE: dict[str, Evaluator] = {}


def evaluator_for(spec: EvaluatorSpec) -> Evaluator:
    """The process's evaluator for `spec`, built on first use."""
    key = spec.key()
    if key not in _CACHE:
        kind = {"oneshot": OneShotEvaluator, "ptq": PtqEvaluator}[spec.kind]
        _CACHE.clear()  # one evaluator's weights and data at a time
        _CACHE[key] = kind(spec)
    return _CACHE[key]
