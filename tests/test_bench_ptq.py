"""`nas bench ptq`'s per-layer SQNR tables and its 4-bit weights vs 4-bit activations table,
on the shared synthetic ResNet-8, each number checked against a computation made here."""

import statistics

import pytest
import torch
from torch import nn

from nas.bench.ptq import (
    Subject,
    layer_kind,
    run_bench,
    sqnr_by_kind,
    tables,
    weight_only,
)
from nas.checkpoint import load_model
from nas.data import load_data, make_loader
from nas.plan import Plan
from nas.quant.bn_fold import fold_bn
from nas.quant.fake import sqnr_db
from nas.quant.ptq import prepare_ptq
from nas.train import evaluate

CPU = torch.device("cpu")
BATCHES = 2


@pytest.fixture(scope="module")
def subject(trained):
    """The trained synthetic ResNet-8 with a fixed list of calibration batches, so the bench
    and the checks here calibrate on the same images."""
    space, model, _ = load_model(trained[1])
    splits = load_data("synthetic", seed=0, **space.data_kwargs)
    loader = iter(make_loader(splits.train, 64, shuffle=True, seed=0))
    calib = [next(loader) for _ in range(BATCHES)]
    s = Subject(space, model.eval(), calib, make_loader(splits.test, 128, shuffle=False))
    s.fp_accuracy = evaluate(model, s.test, CPU)["accuracy"]
    return s


def _accuracy(s: Subject, plan: Plan, method: str) -> float:
    return evaluate(prepare_ptq(s.model, plan, s.calib, BATCHES, method), s.test, CPU)["accuracy"]


def _asymmetric_8bit_sqnr(w: torch.Tensor, per_channel: bool) -> float:
    """The whitepaper's asymmetric min-max quantizer written out: range widened to hold 0,
    scale (max - min) / 255, integer zero point, round to nearest."""
    dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
    lo = w.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = w.amax(dim=dims, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale)
    w_hat = (torch.clamp(torch.round(w / scale) + zero, 0, 255) - zero) * scale
    return float(10 * torch.log10(w.double().pow(2).sum() / (w - w_hat).double().pow(2).sum()))


def test_layer_kind():
    assert layer_kind(nn.Conv2d(8, 8, 3, groups=8)) == "depthwise"
    assert layer_kind(nn.Conv2d(8, 16, 1)) == "pointwise"
    assert layer_kind(nn.Conv2d(3, 8, 3)) == "conv"
    assert layer_kind(nn.Conv2d(8, 16, 3, groups=2)) == "conv"  # grouped, not depthwise
    assert layer_kind(nn.Conv2d(1, 4, 3, groups=1)) == "conv"  # one input channel, one group
    assert layer_kind(nn.Linear(4, 2)) == "linear"


def test_weight_only_per_layer_sqnr(subject):
    summary, layers = weight_only(subject, BATCHES, CPU, say=lambda line: None)
    folded = fold_bn(subject.model)
    modules = {n: m for n, m in folded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert [r["layer"] for r in layers] == list(modules)
    for r in layers:
        w = modules[r["layer"]].weight.detach()
        assert r["kind"] == layer_kind(modules[r["layer"]])
        assert r["out_channels"] == w.shape[0]
        # float32 rounding of w / scale may differ from the quantizer's in the last ulp
        assert r["weight_per_tensor_db"] == pytest.approx(_asymmetric_8bit_sqnr(w, False),
                                                          abs=1e-3)
        assert r["weight_per_channel_db"] == pytest.approx(_asymmetric_8bit_sqnr(w, True),
                                                           abs=1e-3)
    assert {r["kind"] for r in layers} == {"conv", "pointwise", "linear"}  # 1x1 shortcuts

    # The last layer's output SQNR: the whole per-tensor network against the folded float one.
    plan = Plan.uniform(subject.space, 8, 32, include_fixed=True, w_symmetric=False)
    x = subject.calib[0][0]
    per_tensor = prepare_ptq(subject.model, plan.with_overrides(w_granularity="per_tensor"),
                             subject.calib, BATCHES, "minmax")
    with torch.no_grad():
        expected = sqnr_db(folded(x), per_tensor(x))  # fc is the output
    assert layers[-1]["layer"] == "fc"
    assert layers[-1]["output_per_tensor_db"] == pytest.approx(expected, rel=1e-9)

    assert [s["granularity"] for s in summary] == ["per_tensor", "per_channel"]
    for s in summary:
        key = f"weight_{s['granularity']}_db"
        assert s["mean_weight_sqnr_db"] == statistics.fmean(r[key] for r in layers)
        assert s["min_weight_sqnr_db"] == min(r[key] for r in layers)
        assert s["accuracy"] == _accuracy(
            subject, plan.with_overrides(w_granularity=s["granularity"]), "minmax")


def test_sqnr_by_kind():
    rows = [{"layer": name, "kind": kind, "weight_per_tensor_db": wt,
             "weight_per_channel_db": wc, "output_per_tensor_db": ot, "output_per_channel_db": oc}
            for name, kind, wt, wc, ot, oc in [
                ("a", "pointwise", 40.0, 45.0, 30.0, 35.0),
                ("b", "depthwise", 20.0, 44.0, 15.0, 33.0),
                ("c", "depthwise", 30.0, 46.0, 25.0, 37.0),
                ("d", "conv", 41.0, 42.0, 39.0, 40.0)]]
    assert sqnr_by_kind(rows) == [
        {"kind": "conv", "layers": 1, "weight_per_tensor_db": 41.0, "weight_per_channel_db": 42.0,
         "output_per_tensor_db": 39.0, "output_per_channel_db": 40.0, "worst_layer": "d",
         "worst_weight_per_tensor_db": 41.0},
        {"kind": "depthwise", "layers": 2, "weight_per_tensor_db": 25.0,
         "weight_per_channel_db": 45.0, "output_per_tensor_db": 20.0,
         "output_per_channel_db": 35.0, "worst_layer": "b", "worst_weight_per_tensor_db": 20.0},
        {"kind": "pointwise", "layers": 1, "weight_per_tensor_db": 40.0,
         "weight_per_channel_db": 45.0, "output_per_tensor_db": 30.0,
         "output_per_channel_db": 35.0, "worst_layer": "a", "worst_weight_per_tensor_db": 40.0}]


def test_bits_at_four_against_direct_ptq(subject):
    results = run_bench([subject], BATCHES, CPU, say=lambda line: None, methods=("mse",))
    (row,) = results["w4_vs_a4"]
    w4a8 = _accuracy(subject, Plan.uniform(subject.space, 4, 8, w_granularity="per_channel"), "mse")
    w8a4 = _accuracy(subject, Plan.uniform(subject.space, 8, 4, w_granularity="per_channel"), "mse")
    w8a8 = results["w8a8"][0]["w8a8_accuracy"]  # computed as in the W8A8 table
    fp = subject.fp_accuracy
    assert row == {"space": "synthetic_resnet8", "fp_accuracy": fp, "w8a8": w8a8,
                   "w4a8": w4a8, "w4a8_drop": fp - w4a8, "w8a4": w8a4, "w8a4_drop": fp - w8a4,
                   "hurts_more": "4-bit activations" if w8a4 < w4a8 else
                   "4-bit weights" if w4a8 < w8a4 else "neither"}
    # Every experiment calibrated on the same batches: the calibration table's W4A8 agrees.
    assert results["w4a8"][0]["per_channel"] == w4a8
    assert results["weight_only"] == []  # no MobileNetV2 among the subjects

    (_title, headers, cells), = [t for t in tables(results) if t[0].startswith("4-bit weights")]
    assert headers == ["space", "float", "W8A8", "W4A8", "W8A4", "hurts more"]
    assert cells == [["synthetic_resnet8", round(fp, 2), f"{w8a8:.2f} ({w8a8 - fp:+.2f})",
                      f"{w4a8:.2f} ({w4a8 - fp:+.2f})", f"{w8a4:.2f} ({w8a4 - fp:+.2f})",
                      row["hurts_more"]]]



def test_unknown_calibration_is_one_line(cli, tmp_path):
    result = cli("--runs-dir", str(tmp_path / "runs"), "bench", "ptq", "--calibration", "mean")
    assert result.returncode == 2
    assert result.stderr == ("nas: error: argument --calibration: invalid choice: 'mean' (choose "
                             "from 'minmax', 'ema', 'percentile', 'mse', 'kl') (see 'nas bench "
                             "ptq --help')\n")
    assert not (tmp_path / "runs").exists()
