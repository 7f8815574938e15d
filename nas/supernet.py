"""Mixed-precision supernet for DNAS (Wu et al. 2019; FBNet).

Every searchable Conv2d / Linear becomes a `MixedLayer` that keeps the layer's one float
weight and offers each candidate (w_bits, a_bits) as a branch: conv(Q_a(x), Q_w(W)).
Weights are shared by all branches; only the quantizers differ. Architecture parameters
theta (one logit per candidate, optionally factored into weight and activation logits)
are sampled with Gumbel-softmax at temperature tau:
- soft mode: the output is the probability-weighted sum of every branch;
- hard mode (default): one branch is computed per step; theta's gradient comes from
  ProxylessNAS's estimate dL/dg_j = <dL/dy, y_j> for every branch j, obtained from the input
  and weight gradients of the chosen branch (see `MixedLayer.hard`), through the
  straight-through one-hot sample. Without theta gradients (the weight step) it is one
  plain quantized branch.
Fixed layers keep their single precision and have no theta.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nas.quant.fake import fake_quantize, is_float, qparams, quant_range, tensor_minmax
from nas.quant.qinput import padded_input, quant_input_layer, quant_input_op
from nas.spaces import Choice

MODES = ("hard", "soft")


class MixedLayer(nn.Module):
    """One layer with a branch per candidate precision, all sharing `layer`'s weight."""

    def __init__(self, layer: nn.Module, choices: Sequence[Choice], w_granularity: str = "per_channel",
                 w_symmetric: bool = True, a_symmetric: bool = False, factored: bool = False,
                 ema: float = 0.1):
        super().__init__()
        self.layer = layer
        self.choices = tuple(choices)
        self.per_channel = w_granularity == "per_channel"
        self.w_symmetric, self.a_symmetric = w_symmetric, a_symmetric
        self.ema = ema
        self.searchable = len(self.choices) > 1
        self.factored = factored and self.searchable
        if self.factored:
            self.w_values = sorted({c.w_bits for c in self.choices})
            self.a_values = sorted({c.a_bits for c in self.choices})
            self.theta_w = nn.Parameter(torch.zeros(len(self.w_values)))
            self.theta_a = nn.Parameter(torch.zeros(len(self.a_values)))
        elif self.searchable:
            self.theta = nn.Parameter(torch.zeros(len(self.choices)))
        # One running input range serves every a_bits: it is the same tensor.
        self.register_buffer("act_lo", torch.zeros(()))
        self.register_buffer("act_hi", torch.zeros(()))
        self.register_buffer("act_seen", torch.zeros((), dtype=torch.bool))
        self.fixed_index: int | None = None
        # Candidate indices grouped by input precision and by weight precision.
        self.a_groups: dict[int, list[int]] = {}
        self.w_groups: dict[int, list[int]] = {}
        for j, c in enumerate(self.choices):
            self.a_groups.setdefault(c.a_bits, []).append(j)
            self.w_groups.setdefault(c.w_bits, []).append(j)

    # ------------------------------------------------------------ architecture

    def logits(self) -> torch.Tensor:
        if not self.searchable:
            return torch.zeros(1)
        if self.factored:
            w = {b: i for i, b in enumerate(self.w_values)}
            a = {b: i for i, b in enumerate(self.a_values)}
            return torch.stack([self.theta_w[w[c.w_bits]] + self.theta_a[a[c.a_bits]]
                                for c in self.choices])
        return self.theta

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits(), dim=0)

    def arch_parameters(self) -> list[nn.Parameter]:
        if self.factored:
            return [self.theta_w, self.theta_a]
        return [self.theta] if self.searchable else []

    # ------------------------------------------------------------ branches

    def _input_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running input range, updated once per forward pass in training."""
        if self.training:
            with torch.no_grad():
                lo, hi = (t.float() for t in tensor_minmax(x))
                if not bool(self.act_seen):
                    self.act_lo.copy_(lo)
                    self.act_hi.copy_(hi)
                    self.act_seen.fill_(True)
                else:
                    self.act_lo.lerp_(lo, self.ema)
                    self.act_hi.lerp_(hi, self.ema)
        return self.act_lo, self.act_hi

    # The BatchNorm this layer's output feeds, if any (set by Supernet; not a submodule).
    folded_bn: nn.Module | None = None

    def _bn_factor(self) -> torch.Tensor | None:
        """gamma / sigma (running statistics) per output channel, shaped to the weight: what
        BN folding multiplies the weight by; None when no BN follows."""
        bn = self.folded_bn
        if bn is None:
            return None
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            factor = bn.weight / std if bn.affine else 1.0 / std
            # A channel that BN zeroes (gamma 0) folds to a zero weight either way.
            factor = torch.where(factor.abs() < 1e-12, torch.full_like(factor, 1e-12), factor)
            return factor.reshape(-1, *([1] * (self.layer.weight.ndim - 1)))

    def _quant_weight(self, bits: int) -> torch.Tensor:
        """Q_w(W), quantized as it will be deployed: a layer followed by BN is quantized as
        its folded weight W * f (f = gamma / sigma) and divided by f again for the BN that
        follows, so a plan is scored with the weight codes its folded model gets."""
        w = self.layer.weight
        if is_float(bits):
            return w
        factor = self._bn_factor()
        target = w if factor is None else w * factor
        with torch.no_grad():
            if self.per_channel:
                dims = tuple(range(1, w.ndim))
                lo, hi = target.amin(dim=dims), target.amax(dim=dims)
            else:
                lo, hi = target.min(), target.max()
            scale, zp = qparams(lo, hi, bits, self.w_symmetric)
        q = fake_quantize(target, scale, zp, *quant_range(bits, self.w_symmetric),
                          axis=0 if self.per_channel else None)
        return q if factor is None else q / factor

    def _input_qparams(self, bits: int, lo, hi) -> tuple | None:
        if is_float(bits):
            return None
        return (*qparams(lo, hi, bits, self.a_symmetric), *quant_range(bits, self.a_symmetric))

    def branch(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """conv(Q_a(x), Q_w(W)) + b for one candidate, keeping x rather than Q_a(x) for the
        backward pass (the float model's activation memory; see nas.quant.qinput)."""
        choice = self.choices[index]
        lo, hi = self._input_range(x)
        return quant_input_layer(self.layer, x, self._input_qparams(choice.a_bits, lo, hi),
                                 self._quant_weight(choice.w_bits), self.layer.bias)

    def soft(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_j g_j conv(Q_a_j(x), Q_w_j(W)) + b, with one convolution per a_bits: the layer
        is linear in its weight, so branches sharing an input quantizer share one conv of
        their gate-weighted quantized weights."""
        lo, hi = self._input_range(x)
        xp, conv = padded_input(self.layer, x)  # once: a padded copy is shared by the groups
        out = None
        for a_bits, js in self.a_groups.items():
            w = sum(gates[j] * self._quant_weight(self.choices[j].w_bits) for j in js)
            bias = self.layer.bias * gates[js].sum() if self.layer.bias is not None else None
            y = quant_input_op(xp, conv, self._input_qparams(a_bits, lo, hi), w, bias)
            out = y if out is None else out + y
        return out

    def hard(self, x: torch.Tensor, index: int, gates: torch.Tensor) -> torch.Tensor:
        """Branch `index` only, with a gradient for every gate (ProxylessNAS's estimate
        dL/dg_j = <dL/dy, y_j>).

        Gating the chosen branch's own output gives no signal: a conv feeding BatchNorm is
        scale-invariant, so <dL/dy, y_k> is zero. Instead, by bilinearity of the conv,
            <dL/dy, conv(Q_a(x), Q_w(W))> = <dL/dQ_a(x), Q_a(x)>   (weight fixed at branch k)
                                          = <dL/dQ_w(W), Q_w(W)>   (input fixed at branch k),
        so the input and weight gradients of the chosen branch give every branch's
        <dL/dy, y_j>: exactly where j shares w_bits or a_bits with k, and up to the second-
        order term <dL/dy, conv(dQ_a, dQ_w)> otherwise; softmax ignores the offset this
        leaves common to all j. Each gate's value is zero (gates = sample - sample.detach()).
        """
        choice = self.choices[index]
        lo, hi = self._input_range(x)
        a_bits, w_bits = list(self.a_groups), list(self.w_groups)
        a_candidates = [self._input_qparams(a, lo, hi) for a in a_bits]
        with torch.no_grad():
            w_candidates = [self._quant_weight(w) for w in w_bits]
        a_gates = torch.stack([gates[js].sum() for js in self.a_groups.values()])
        w_gates = torch.stack([gates[js].sum() for js in self.w_groups.values()])
        return quant_input_layer(self.layer, x, a_candidates[a_bits.index(choice.a_bits)],
                                 self._quant_weight(choice.w_bits), self.layer.bias,
                                 (a_gates, a_candidates, w_gates, w_candidates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_index is not None or not self.searchable:
            return self.branch(x, self.fixed_index if self.fixed_index is not None else 0)
        sample = self.sampler(self.logits())
        if self.mode == "soft":
            return self.soft(x, sample)
        index = int(sample.argmax())
        if not (torch.is_grad_enabled() and sample.requires_grad):
            return self.branch(x, index)  # weight step or evaluation: theta needs no gradient
        return self.hard(x, index, sample - sample.detach())

    # Set by Supernet: the Gumbel sampler and the mode.
    sampler = None
    mode = "hard"


class Supernet(nn.Module):
    """A model whose space layers are MixedLayers; the float model's weights are shared."""

    def __init__(self, model: nn.Module, space, factored: bool = False, mode: str = "hard",
                 tau: float = 5.0, seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.net = copy.deepcopy(model)
        self.space = space
        q = space.quantizer
        self.names: list[str] = []
        bns = dict(_conv_bn_pairs(self.net))
        for layer in space.layers(model):
            module = self.net.get_submodule(layer.name)
            mixed = MixedLayer(module, layer.choices, q["w_granularity"], q["w_symmetric"],
                               q["a_symmetric"], factored)
            if layer.name in bns:
                # A plain attribute, not a submodule: the BN stays where the model has it.
                object.__setattr__(mixed, "folded_bn", self.net.get_submodule(bns[layer.name]))
            self.net.set_submodule(layer.name, mixed)
            self.names.append(layer.name)
        self.mode, self.tau = mode, tau
        self.generator = torch.Generator().manual_seed(seed)
        for m in self.mixed():
            m.sampler = self._sample
            m.mode = mode

    def mixed(self) -> list[MixedLayer]:
        return [self.net.get_submodule(n) for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ------------------------------------------------------------ sampling

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Gumbel-softmax sample at temperature tau; one-hot straight-through in hard mode."""
        u = torch.rand(logits.shape, generator=self.generator).clamp_(1e-10, 1 - 1e-10)
        gumbel = -torch.log(-torch.log(u)).to(logits.device)
        soft = torch.softmax((logits + gumbel) / self.tau, dim=0)
        if self.mode == "soft":
            return soft
        hard = F.one_hot(soft.argmax(), len(soft)).to(soft.dtype)
        return hard - soft.detach() + soft

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        for m in self.mixed():
            m.mode = mode

    # ------------------------------------------------------------ parameters and plans

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.mixed() for p in m.arch_parameters()]

    def train_theta(self, on: bool) -> None:
        """Whether theta takes gradients. Frozen, a hard-mode layer is one plain branch."""
        for p in self.arch_parameters():
            p.requires_grad_(on)

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def probs(self) -> list[torch.Tensor]:
        return [m.probs() for m in self.mixed()]

    def argmax_indices(self) -> list[int]:
        return [int(p.argmax()) for p in self.probs()]

    def sample_indices(self, generator: torch.Generator) -> list[int]:
        return [int(torch.multinomial(p.detach(), 1, generator=generator)) for p in self.probs()]

    def fix(self, indices: Sequence[int] | None) -> None:
        """Compute one given branch per layer (one-shot evaluation); None releases them."""
        for m, i in zip(self.mixed(), indices if indices is not None else [None] * len(self.names)):
            m.fixed_index = i

    def plan_for(self, indices: Sequence[int]):
        """The Plan that picks choice `indices[l]` for each layer."""
        from nas.search.encoding import PlanEncoding

        return PlanEncoding(self.space).plan(indices)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The conv -> BN pairs BN folding will fold; none for a model torch.fx cannot trace
    (such a model cannot be folded for deployment either)."""
    from nas.errors import ModelError
    from nas.quant.bn_fold import conv_bn_pairs

    try:
        return conv_bn_pairs(model)
    except ModelError:
        return []


def tau_at(fraction: float, tau0: float = 5.0, tau_min: float = 0.2) -> float:
    """Exponential annealing from tau0 to tau_min over the search (fraction in [0, 1])."""
    fraction = min(1.0, max(0.0, fraction))
    return tau0 * math.exp(fraction * math.log(tau_min / tau0))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int, device) -> None:
    """Re-estimate BatchNorm statistics for the branches now fixed (one-shot evaluation):
    shared weights were trained under a mix of precisions, so the running statistics belong
    to no single plan."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # Each module's own mode (a model may hold a BatchNorm in eval inside one in train), and
    # momentum, come back even if a batch raises (Ctrl-C): the statistics are then the partial
    # estimate, which the caller's saved state replaces.
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
