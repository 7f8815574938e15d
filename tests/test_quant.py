import math

import numpy as np
import pytest
import torch

from nas.errors import ConfigError
from nas.quant.fake import fake_quantize, qparams, quant_range, sqnr_db
from nas.quant.observers import METHODS, _kl_threshold, make_observer
from nas.quant.quantizer import FakeQuantizer


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_8bit_equals_torch_fake_quant_exactly(symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 16, 3, 3, generator=gen) * (seed + 1) + 0.3 * seed
    qmin, qmax = quant_range(8, symmetric)
    scale, zp = qparams(x.min(), x.max(), 8, symmetric)
    ours = fake_quantize(x, scale, zp, qmin, qmax)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), qmin, qmax)
    assert torch.equal(ours, theirs)
    scale_c, zp_c = qparams(x.amin((1, 2, 3)), x.amax((1, 2, 3)), 8, symmetric)
    ours_c = fake_quantize(x, scale_c, zp_c, qmin, qmax, axis=0)
    theirs_c = torch.fake_quantize_per_channel_affine(x, scale_c, zp_c, 0, qmin, qmax)
    assert torch.equal(ours_c, theirs_c)


def test_qparams_match_torch_minmax_observers():
    x = torch.randn(1000) * 3 + 1
    for symmetric, scheme, dtype in ((True, torch.per_tensor_symmetric, torch.qint8),
                                     (False, torch.per_tensor_affine, torch.quint8)):
        obs = torch.ao.quantization.MinMaxObserver(dtype=dtype, qscheme=scheme)
        obs(x)
        t_scale, t_zp = obs.calculate_qparams()
        scale, zp = qparams(x.min(), x.max(), 8, symmetric)
        # The same float32 operations as torch's: amax / 127.5, or (max - min) / 255.
        assert scale.item() == t_scale.item()
        # torch stores a symmetric quint8 zero point as 128; signed int8 here keeps 0
        assert int(zp) == (0 if symmetric else int(t_zp))


def test_quant_ranges():
    assert quant_range(8, True) == (-128, 127) and quant_range(8, False) == (0, 255)
    assert quant_range(2, True) == (-2, 1) and quant_range(4, False) == (0, 15)


def test_zero_is_exact_and_levels_count():
    x = torch.linspace(-1, 3, 1001)
    for bits in (2, 3, 4, 8):
        scale, zp = qparams(x.min(), x.max(), bits, False)
        y = fake_quantize(x, scale, zp, *quant_range(bits, False))
        assert torch.unique(y).numel() == 2 ** bits
        assert fake_quantize(torch.zeros(1), scale, zp, *quant_range(bits, False)).item() == 0.0


def test_ste_gradient_inside_and_outside_range():
    x = torch.tensor([-3.0, -0.9, 0.0, 0.4, 0.99, 2.5], requires_grad=True)
    scale, zp = torch.tensor(1 / 127), torch.tensor(0, dtype=torch.int32)
    y = fake_quantize(x, scale, zp, -128, 127)  # range [-128/127, 1]
    y.backward(torch.arange(1.0, 7.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


def test_low_bits_equal_torch_too():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, 3, 3, generator=gen)
    for bits in (2, 3, 4):
        for symmetric in (True, False):
            qmin, qmax = quant_range(bits, symmetric)
            s, z = qparams(x.amin((1, 2, 3)), x.amax((1, 2, 3)), bits, symmetric)
            assert torch.equal(fake_quantize(x, s, z, qmin, qmax, axis=0),
                               torch.fake_quantize_per_channel_affine(x, s, z, 0, qmin, qmax))


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.full((200_000,), 0.3)  # 0.3 steps above zero: nearest rounding always gives 0
    scale, zp = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    assert fake_quantize(x, scale, zp, -8, 7).mean().item() == 0.0
    mean = fake_quantize(x, scale, zp, -8, 7, stochastic=True).mean().item()
    # Bernoulli(0.3) mean over 2e5 draws: standard error 0.001; 5 sigma tolerance.
    assert abs(mean - 0.3) < 0.005


def test_lsq_gradient_matches_the_paper():
    torch.manual_seed(0)
    q = FakeQuantizer(4, True, learn="lsq")
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.randn(500) * 0.8
    upstream = torch.randn(500)
    q(x).backward(upstream)
    s = q.step.detach()
    v = x / s
    qmin, qmax = quant_range(4, True)
    dyds = torch.where(v <= qmin, torch.tensor(float(qmin)),
                       torch.where(v >= qmax, torch.tensor(float(qmax)), torch.round(v) - v))
    g = 1 / math.sqrt(500 * qmax)
    terms = upstream * dyds
    # Both sides are float32 sums of these 500 terms in different orders; the terms partly
    # cancel, so the error is bounded against the sum of their sizes: 4 float32 ulps of it
    # (measured at most 0.63 ulp over 100 seeds).
    ulp = torch.finfo(torch.float32).eps * terms.abs().sum().item() * g
    assert q.step.grad.item() == pytest.approx(terms.sum().item() * g, rel=0, abs=4 * ulp)


def test_pact_learns_the_clip():
    q = FakeQuantizer(4, False, learn="pact")
    q.set_range(torch.tensor(0.0), torch.tensor(2.0))
    assert q.alpha.item() == pytest.approx(2.0)
    x = torch.tensor([0.5, 1.0, 3.0, 5.0], requires_grad=True)
    y = q(x)
    assert y[2].item() == pytest.approx(2.0) and y[3].item() == pytest.approx(2.0)
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(2.0)  # the two clipped values
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_float_bits_pass_through():
    x = torch.randn(10)
    for bits in (16, 32):
        assert torch.equal(FakeQuantizer(bits, True)(x), x)


def _mse(method, x, bits=8, symmetric=True):
    obs = make_observer(method, bits, symmetric)
    obs.update(x)
    q = FakeQuantizer(bits, symmetric, method=method)
    q.set_range(*obs.range())
    return (q(x) - x).pow(2).mean().item()


@pytest.mark.parametrize("dist", [torch.distributions.StudentT(3.0),
                                  torch.distributions.Laplace(0.0, 1.0)], ids=["t3", "laplace"])
def test_mse_and_kl_beat_minmax_on_heavy_tails(dist):
    torch.manual_seed(0)
    x = dist.sample((100_000,))
    # At 4 bits min-max spends its 16 levels on rare outliers; clipping wins by far
    # (measured: about 3-5x lower error). Require at least 2x.
    minmax = _mse("minmax", x, bits=4)
    assert _mse("mse", x, bits=4) < 0.5 * minmax
    assert _mse("kl", x, bits=4) < 0.5 * minmax


def _kl_by_definition(hist, levels, i):
    """KL(P||Q) of clipping `hist` to its first i bins, one candidate at a time."""
    p = hist[:i].copy()
    p[-1] += hist[i:].sum()  # clipped mass piles into the last kept bin
    nonzero = p > 0
    q = np.zeros(i)
    edges = np.linspace(0, i, levels + 1).astype(int)
    for a, b in zip(edges[:-1], edges[1:]):  # each group spreads its kept mass evenly
        filled = nonzero[a:b]
        if filled.any():
            q[a:b][filled] = hist[a:b].sum() / filled.sum()
    if q.sum() == 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    q = np.where(nonzero & (q == 0), 1e-8, q)
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))


@pytest.mark.parametrize("case", range(6))
def test_kl_threshold_is_the_clip_point_of_least_divergence(case):
    # All candidates at once (prefix sums) against one-at-a-time by the definition.
    rng = np.random.default_rng(case)
    hist = [rng.poisson(rng.exponential(30, size=256)),  # dense, ragged
            np.histogram(np.abs(rng.standard_t(3, size=20000)), bins=256, range=(0, 25))[0],
            np.where(rng.random(256) < 0.7, 0, rng.poisson(3, size=256)),  # mostly empty bins
            np.bincount(rng.integers(0, 256, size=4), minlength=256),  # a few spikes
            np.histogram(rng.exponential(1, size=5000), bins=256, range=(0, 4))[0],  # heavy tail cut
            np.r_[np.zeros(255), 7]][case].astype(np.float64)  # all mass in the last bin
    for levels in (2, 8, 128):
        kl = [_kl_by_definition(hist, levels, i) for i in range(levels, 257)]
        assert _kl_threshold(hist, levels) == levels + int(np.argmin(kl)), levels
    assert _kl_threshold(np.zeros(256), 8) == 256  # nothing observed: keep everything


def test_every_method_yields_a_range():
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    ranges = {}
    for method in METHODS:
        obs = make_observer(method, 8, False)
        obs.update(x)
        obs.update(x * 1.5)
        ranges[method] = obs.range()
    lo, hi = x.min(), x.max()
    # min-max: the extremes of both batches (scaling by 1.5 rounds monotonically: exact).
    assert ranges["minmax"] == (lo * 1.5, hi * 1.5)
    # Moving average with torch's constant 0.01, seeded by the first batch: the same float
    # operations as the observer, so exact; 1.005 times the first batch's extremes, to a few
    # float32 ulps (measured <= 3.2e-8 relative over 5 seeds).
    ema = (lo + 0.01 * (lo * 1.5 - lo), hi + 0.01 * (hi * 1.5 - hi))
    assert ranges["ema"] == ema and ema[1].item() == pytest.approx(1.005 * hi.item(), rel=1e-6)
    # Percentile: the mean over batches of each batch's 0.01th / 99.99th percentile.
    q, flat = 99.99 / 100.0, x.flatten()
    pct = ((torch.quantile(flat, 1.0 - q) + torch.quantile(flat * 1.5, 1.0 - q)) / 2,
           (torch.quantile(flat, q) + torch.quantile(flat * 1.5, q)) / 2)
    assert ranges["percentile"] == pct
    # ... which is 1.25 times the linear interpolation between the two largest values of x
    # (torch's float32 arithmetic, against this float64 position 799.92: measured relative
    # difference <= 3e-6 over 5 seeds).
    top = flat.sort().values
    pos = q * (flat.numel() - 1)
    above = top[int(pos)] + (pos - int(pos)) * (top[int(pos) + 1] - top[int(pos)])
    assert top[-2] < above < top[-1]
    assert pct[1].item() == pytest.approx(1.25 * above.item(), rel=1e-5)
    # MSE and KL clip inside the observed extremes (their values are tested below).
    for method in ("mse", "kl"):
        m_lo, m_hi = ranges[method]
        assert 1.5 * lo <= m_lo < 0 < m_hi <= 1.5 * hi, method


def test_per_channel_mse_observer():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, 3, 3, generator=gen) * torch.arange(1, 7).view(-1, 1, 1, 1)
    w[0, 0, 0, 0], w[3, 5, 1, 1], w[3, 2, 0, 0] = 12.0, -40.0, 30.0  # outliers: rows 0 and 3
    obs = make_observer("mse", 4, True, axis=0)
    obs.update(w)
    lo, hi = obs.range()
    assert lo.shape == hi.shape == (6,)
    w_lo, w_hi = w.amin((1, 2, 3)), w.amax((1, 2, 3))
    assert torch.all(w_lo <= lo) and torch.all(hi <= w_hi)
    for c in (0, 3):  # an outlier costs rounding error on every other value: clipped
        assert lo[c] > w_lo[c] and hi[c] < w_hi[c]
    # Every channel is searched on its own: its range is that of a per-tensor MSE observer
    # on that channel alone, and quantizes it no worse than the channel's min-max range.
    for c in range(6):
        alone = make_observer("mse", 4, True)
        alone.update(w[c])
        assert alone.range() == (lo[c], hi[c])
        mse_at = {}
        for name, (a, b) in (("mse", (lo[c], hi[c])), ("minmax", (w_lo[c], w_hi[c]))):
            quantizer = FakeQuantizer(4, True)
            quantizer.set_range(a, b)
            mse_at[name] = (quantizer(w[c]) - w[c]).pow(2).mean().item()
        if c in (0, 3):
            assert mse_at["mse"] < mse_at["minmax"]
        assert mse_at["mse"] <= mse_at["minmax"]


def test_unknown_method_and_bad_learn():
    with pytest.raises(ConfigError, match="calibration 'median' is unknown"):
        make_observer("median", 8, True)
    with pytest.raises(ConfigError, match="PACT learns one clip per tensor"):
        FakeQuantizer(8, True, axis=0, learn="pact")


def test_sqnr():
    x = torch.ones(100)
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)
    assert sqnr_db(x, x) == float("inf")


def test_per_channel_state_dict_loads_into_a_fresh_quantizer():
    q = FakeQuantizer(4, True, axis=0)
    q.observe_tensor(torch.randn(5, 3))
    fresh = FakeQuantizer(4, True, axis=0)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 3)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference's
@pytest.mark.parametrize("kind", ["conv", "conv_s2_groups", "conv_same_even", "conv_reflect",
                                  "conv_valid_dilated", "linear"])
def test_quant_input_layer_matches_autograd_through_fake_quant(kind):
    """The memory-saving op (keeps x, recomputes Q(x) in backward) gives the same output and
    gradients as fake_quantize followed by the layer."""
    from torch.nn import functional as F

    from nas.quant.fake import fake_quantize, qparams, quant_range
    from nas.quant.qinput import quant_input_layer

    torch.manual_seed(0)
    if kind == "linear":
        layer, x = torch.nn.Linear(7, 5), torch.randn(6, 7) * 2
        op = F.linear
    else:
        groups, stride = (3, 2) if kind == "conv_s2_groups" else (1, 1)
        layer = {  # the op pads these itself, before quantizing: an uneven border, copies
            "conv_same_even": lambda: torch.nn.Conv2d(6, 9, 4, padding="same"),
            "conv_reflect": lambda: torch.nn.Conv2d(6, 9, 3, padding=2, padding_mode="reflect"),
            "conv_valid_dilated": lambda: torch.nn.Conv2d(6, 9, 3, padding="valid", dilation=2),
        }.get(kind, lambda: torch.nn.Conv2d(6, 9, 3, stride=stride, padding=1, groups=groups))()
        x = torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last) * 2

        def op(xq, w, b):
            return layer._conv_forward(xq, w, b)
    scale, zp = qparams(x.min() * 0.8, x.max() * 0.8, 4, False)  # some values clip
    upstream = torch.randn_like(op(x, layer.weight, layer.bias))
    results = []
    for fused in (False, True):
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        if fused:
            y = quant_input_layer(layer, xg, (scale, zp, 0, 15), layer.weight, layer.bias)
        else:
            y = op(fake_quantize(xg, scale, zp, *quant_range(4, False)), layer.weight, layer.bias)
        y.backward(upstream)
        results.append((y.detach(), xg.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = results
    assert torch.equal(y0, y1)
    assert (gx1 == 0).any() and torch.equal(gx0 == 0, gx1 == 0)  # the same values clipped
    # The same kernels on the same tensors (linear: matmuls in a different order).
    for a, b in ((gx0, gx1), (gw0, gw1), (gb0, gb1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
