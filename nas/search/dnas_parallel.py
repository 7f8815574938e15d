"""One worker's part of a data-parallel DNAS step (torch DistributedDataParallel).

Every worker draws the same global batch (batch order is a function of seed and step) and
keeps its share; it draws the same Gumbel noise, since every supernet starts from the same
generator state and samples at the same calls. The weight step and the theta step each go
through a DDP wrapper of its own: DDP all-reduces the gradients of the parameters that
required a gradient when it was built, so one wrapper is built with theta frozen (the
weights) and one with the weights frozen (theta). The theta step's backward accumulates
into theta only (`inputs=`), so the weights' wrapper never sees it.

BatchNorm: on a GPU it becomes SyncBatchNorm (the statistics of the global batch, as one
worker computes them). On the CPU, where torch has no SyncBatchNorm, each worker normalises
with the statistics of its own share; so do the quantizers' running input ranges; DDP
broadcasts rank 0's buffers (running statistics, ranges) before every forward, so all
workers quantize and fold with the same ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class DataParallel:
    def __init__(self, supernet, device: torch.device):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_writer = self.rank == 0
        self.device = device
        if device.type == "cuda":
            _sync_batchnorm(supernet)
        ids = [device.index] if device.type == "cuda" else None
        weights, theta = supernet.weight_parameters(), supernet.arch_parameters()
        wanted = [p.requires_grad for p in weights]
        try:
            supernet.train_theta(False)
            self.weight_model = DDP(supernet, device_ids=ids)
            if theta:
                for p in weights:
                    p.requires_grad_(False)
                supernet.train_theta(True)
                self.theta_model = DDP(supernet, device_ids=ids)
            else:
                self.theta_model = supernet  # nothing to search: no theta step is taken
        finally:
            for p, want in zip(weights, wanted):
                p.requires_grad_(want)
            supernet.train_theta(True)

    def shard(self, x: torch.Tensor, y: torch.Tensor):
        """This worker's share of a global batch (the batch size divides by the workers)."""
        n = len(x) // self.world
        part = slice(self.rank * n, (self.rank + 1) * n)
        return x[part], y[part]

    def agree(self, fraction: float) -> float:
        t = torch.tensor([fraction], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t.item())

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()


def _sync_batchnorm(supernet) -> None:
    """Swap the BatchNorms for SyncBatchNorm, keeping each MixedLayer's `folded_bn` (a plain
    reference, not a submodule) on the module that replaced its BN."""
    names = {id(m): name for name, m in supernet.net.named_modules()}
    folded = {i: names[id(m.folded_bn)] for i, m in enumerate(supernet.mixed())
              if m.folded_bn is not None}
    supernet.net = nn.SyncBatchNorm.convert_sync_batchnorm(supernet.net)
    for i, m in enumerate(supernet.mixed()):
        if i in folded:
            object.__setattr__(m, "folded_bn", supernet.net.get_submodule(folded[i]))
