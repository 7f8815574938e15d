"""The latency estimate calibrated on measured tables (`nas.cost.calibration`) and
`nas bench estimate`."""

import itertools
import json
import math

import pytest

from nas.bench.estimate import run_bench, table_spaces
from nas.cost.calibration import (MIN_GEOMETRIES, Calibration, Fit, float_features,
                                  integer_features)
from nas.cost.device_spec import COST_MODELS_DIR, DeviceSpec
from nas.cost.latency import LatencyCost
from nas.cost.roofline import roofline_us
from nas.cost.tables import LatencyTable, layer_from_key, table_key
from nas.errors import ConfigError
from nas.plan import LayerPrecision
from nas.spaces import LayerInfo, load_space

SPEC = DeviceSpec(name="toy", sms=8, int8_tops=1e-3, fp16_tflops=5e-4, tf32_tflops=2.5e-4,
                  cuda_core_tops=1e-4, hbm_tb_s=1e-3, launch_overhead_us=2.0, tile_m=16,
                  tile_n=16)
# The kernels' time over the W8A8 roofline, for the synthetic tables: a made-up law of the
# form the calibration fits (coefficients in integer_features order).
TRUE_INT = (0.4, 0.15, -0.3, 0.25, 0.1, 0.05, 0.02)
TRUE_FLOAT = (0.2, 0.1, 0.5)
PRECISIONS = ((8, 8), (4, 8), (8, 4), (4, 4), (2, 4), (6, 8))


def conv(cin, cout, k, hw, groups=1, stride=1):
    out = (hw + 2 * (k // 2) - k) // stride + 1
    params = cout * (cin // groups) * k * k
    return LayerInfo("c", "Conv2d", cin, cout, (k, k), (stride, stride), (k // 2, k // 2),
                     groups, (hw, hw), (out, out), params, params * out * out)


def law(info, w_bits, a_bits, batch, coef=TRUE_INT):
    base = roofline_us(info, 8, 8, batch, SPEC)
    feats = integer_features(info, w_bits, a_bits, base)
    return base * math.exp(sum(c * f for c, f in zip(coef, feats)))


def float_law(info, batch):
    base = roofline_us(info, 16, 16, batch, SPEC)
    return base * math.exp(sum(c * f for c, f in zip(TRUE_FLOAT, float_features(info, base))))


def synthetic_table(layers, batches=(1, 4), precisions=PRECISIONS, baselines=True):
    entries, bases = {}, {}
    for info, batch, (w, a) in itertools.product(layers, batches, precisions):
        key = table_key(info, batch, w, a)
        entries[key] = law(info, w, a, batch)
        if baselines:
            bases[key] = float_law(info, batch)
    return LatencyTable("toy", entries, ["synthetic.json"], {k: "synthetic.json" for k in entries},
                        {"synthetic.json": None}, bases)


LAYERS = [conv(cin, cout, k, hw) for cin, cout, k, hw in
          itertools.product((3, 8, 32, 64), (16, 48), (1, 3), (8, 16))]
LAYERS += [conv(c, c, 3, hw, groups=c) for c in (8, 32) for hw in (8, 16)]


def test_keys_name_their_layers():
    for name in ("fmnist_resnet8", "imagenet_mobilenetv2"):
        for layer in load_space(name).layers():
            info, batch, w, a = layer_from_key(table_key(layer.info, 16, 4, 8))
            assert (batch, w, a) == (16, 4, 8)
            for field in ("type", "in_channels", "out_channels", "kernel", "stride", "padding",
                          "groups", "in_hw", "out_hw"):
                assert getattr(info, field) == getattr(layer.info, field), (layer.name, field)
    for key in ("nonsense", "Conv2d:3x64:k7x7:s2x2:p3x3:g1:224x224:b64:w8",
                "Conv2d:0x64:k7x7:s2x2:p3x3:g1:224x224:b64:w8a8",   # no channels
                "Conv2d:6x64:k3x3:s1x1:p0x0:g4:8x8:b1:w8a8",        # 4 groups do not divide 6
                "Conv2d:8x8:k9x9:s1x1:p0x0:g1:4x4:b1:w8a8"):        # kernel larger than the image
        assert layer_from_key(key) is None, key


def test_features_of_a_layer():
    info = conv(16, 16, 3, 12)
    base = roofline_us(info, 8, 8, 2, SPEC)
    log_k = math.log(16 * 9)  # the reduction: input channels x taps
    assert integer_features(info, 4, 4, base) == [1.0, math.log(base), 0.0, 1.0, 1.0, log_k, log_k]
    assert integer_features(info, 8, 4, base) == [1.0, math.log(base), 0.0, 1.0, 0.0, log_k, 0.0]
    assert integer_features(info, 6, 8, base) == [1.0, math.log(base), 0.0, 0.0, 0.0, 0.0, 0.0]
    depthwise = conv(16, 16, 3, 12, groups=16)
    assert integer_features(depthwise, 4, 4, base) == [1.0, math.log(base), 1.0, 0, 0, 0, 0]
    assert float_features(depthwise, base) == [1.0, math.log(base), 1.0]


def test_a_fit_clips_its_features_and_its_factor():
    fit = Fit(coef=(0.5, 1.0, 2.0), lows=(1.0, 2.0, 3.0), highs=(1.0, 4.0, 5.0), low=-1.0,
              high=12.0, entries=30)
    assert fit.factor([1.0, 3.0, 0.0]) == pytest.approx(math.exp(0.5 + 3.0))
    assert fit.factor([1.0, 10.0, 0.0]) == pytest.approx(math.exp(0.5 + 4.0))  # x1 past 4
    assert fit.factor([1.0, 0.5, 0.0]) == pytest.approx(math.exp(0.5 + 2.0))   # x1 below 2
    assert fit.factor([1.0, 3.0, 1.0]) == pytest.approx(math.exp(0.5 + 3.0 + 6.0))  # on: >= 3
    assert fit.factor([1.0, 4.0, 5.0]) == pytest.approx(math.exp(12.0))  # 14.5 clipped to high
    low = Fit(coef=(-5.0,), lows=(1.0,), highs=(1.0,), low=-1.0, high=1.0, entries=30)
    assert low.factor([1.0]) == pytest.approx(math.exp(-1.0))


def test_the_fit_recovers_the_law_of_the_tables():
    calibration = Calibration.fit(synthetic_table(LAYERS), SPEC)
    assert calibration.integer.entries == len(LAYERS) * 2 * len(PRECISIONS)
    assert calibration.floating.entries == len(LAYERS) * 2  # one baseline per geometry, batch
    # Unmeasured geometries and a batch between the measured ones. The fit is exact least
    # squares but for the ridge (1e-2), which biases the factors slightly: against 432
    # integer rows by at most 7.2e-5 here, against the 72 float baselines by at most 6.2e-4
    # (the fit is deterministic); a few times that.
    for info, batch, (w, a) in itertools.product(
            [conv(16, 24, 3, 12), conv(48, 16, 1, 8), conv(16, 16, 3, 12, groups=16)], (2,),
            PRECISIONS):
        assert calibration.estimate_us(info, w, a, batch, SPEC) == pytest.approx(
            law(info, w, a, batch), rel=3e-4)
        assert calibration.estimate_us(info, 16, 16, batch, SPEC) == pytest.approx(
            float_law(info, batch), rel=2e-3)


def test_depthwise_and_odd_channels_run_unpacked_whatever_the_bits():
    calibration = Calibration.fit(synthetic_table(LAYERS), SPEC)
    for info in (conv(16, 16, 3, 12, groups=16), conv(5, 16, 3, 12)):
        times = {calibration.estimate_us(info, w, a, 2, SPEC) for w, a in PRECISIONS}
        assert len(times) == 1, info  # exactly one value: the packing features are all 0
    packed = conv(16, 16, 3, 12)
    assert (calibration.estimate_us(packed, 4, 4, 2, SPEC)
            > calibration.estimate_us(packed, 8, 8, 2, SPEC))  # TRUE_INT: packing costs time


def test_layers_beyond_the_tables_keep_the_factor_of_the_nearest():
    calibration = Calibration.fit(synthetic_table(LAYERS), SPEC)
    info = conv(32, 48, 3, 16)

    def factor(batch):
        return calibration.estimate_us(info, 4, 8, batch, SPEC) / roofline_us(info, 8, 8, batch, SPEC)

    # Batches far past the largest measured (4) are clipped to the same features: the same
    # factor exactly, while the roofline keeps growing.
    assert factor(4096) == factor(65536)
    assert roofline_us(info, 8, 8, 65536, SPEC) > roofline_us(info, 8, 8, 4096, SPEC)
    # A packed operand's log K is clipped to the packed entries' range: a packed layer of a
    # shorter reduction (K = 2) than any measured one (8) is estimated as if K were 8.
    short = conv(2, 16, 1, 16)

    def packing(log_k):  # TRUE_INT's W4A4 / W8A8 ratio of one layer
        return math.exp(TRUE_INT[3] + TRUE_INT[4] + (TRUE_INT[5] + TRUE_INT[6]) * log_k)

    ratio = (calibration.estimate_us(short, 4, 4, 2, SPEC)
             / calibration.estimate_us(short, 8, 8, 2, SPEC))
    assert ratio == pytest.approx(packing(math.log(8)), rel=0.01)
    assert packing(math.log(8)) / packing(math.log(2)) > 1.09  # what the clip changes


def test_too_few_geometries_leave_the_bare_roofline():
    # Many entries, but the precisions of too few layer geometries (each at one batch).
    few = synthetic_table(LAYERS[:MIN_GEOMETRIES - 1], batches=(1,))
    assert len(few.entries) > 5 * MIN_GEOMETRIES and Calibration.fit(few, SPEC) is None
    enough = Calibration.fit(synthetic_table(LAYERS[:MIN_GEOMETRIES], batches=(1,)), SPEC)
    assert enough.integer.entries == MIN_GEOMETRIES * len(PRECISIONS)
    model = LatencyCost(SPEC, 2, few)
    info = conv(16, 24, 3, 12)
    assert model.calibration is None
    assert model.layer_cost(info, LayerPrecision(4, 4)) == roofline_us(info, 4, 4, 2, SPEC)
    assert model.estimate_method == "roofline from the device spec"
    # Integer entries without the baseline column: integers calibrated, floats on the roofline.
    no_floats = Calibration.fit(synthetic_table(LAYERS, baselines=False), SPEC)
    assert no_floats.floating is None and no_floats.integer is not None
    assert no_floats.estimate_us(info, 16, 16, 2, SPEC) is None
    model = LatencyCost(SPEC, 2, synthetic_table(LAYERS, baselines=False))
    assert model.layer_cost(info, LayerPrecision(16, 16)) == roofline_us(info, 16, 16, 2, SPEC)
    assert model.estimate_method.endswith(" of 1 measured table (float choices: the bare "
                                          "roofline) (1 measured with other kernel code)")


def test_float_choices_take_the_baseline_columns_fit():
    calibration = Calibration.fit(synthetic_table(LAYERS), SPEC)
    info = conv(16, 24, 3, 12)
    for bits in (16, 32):  # 32 bits: the fp16 fit on the TF32 roofline
        base = roofline_us(info, bits, bits, 2, SPEC)
        expected = base * math.exp(sum(c * f for c, f in zip(TRUE_FLOAT, float_features(info, base))))
        assert calibration.estimate_us(info, bits, bits, 2, SPEC) == pytest.approx(expected, rel=0.01)
    assert roofline_us(info, 32, 32, 2, SPEC) > 1.5 * roofline_us(info, 16, 16, 2, SPEC)
    # A geometry's baseline is timed once per precision: the fit takes their median.
    table = synthetic_table(LAYERS)
    for key in list(table.baselines)[::6]:  # one precision of each geometry off by 10x
        table.baselines[key] *= 10
    skewed = Calibration.fit(table, SPEC)
    assert skewed.estimate_us(info, 16, 16, 2, SPEC) == pytest.approx(
        calibration.estimate_us(info, 16, 16, 2, SPEC), rel=1e-9)


@pytest.mark.parametrize("entry, message", [
    ({"key": "k", "us": 0}, "entry 'k' has us 0, not a positive number of microseconds"),
    ({"key": "k", "us": -1.5}, "entry 'k' has us -1.5, not a positive number"),
    ({"key": "k", "us": float("nan")}, "entry 'k' has us nan, not a positive number"),
    ({"key": "k", "us": "fast"}, "entry 'k' has us 'fast', not a positive number"),
    ({"key": "k", "us": 2.0, "fp16_cudnn_us": None}, "entry 'k' has fp16_cudnn_us None"),
    ({"key": "k", "us": 2.0, "fp16_cudnn_us": 0}, "entry 'k' has fp16_cudnn_us 0"),
    ({"key": 5, "us": 2.0}, 'entry 0 has no "key" string'),
    ({"us": 2.0}, 'entry 0 has no "key" string'),
])
def test_tables_with_impossible_entries_are_refused(tmp_path, entry, message):
    (tmp_path / "t.json").write_text(json.dumps({
        "format": "nas-latency/1", "provenance": {"device_spec": "toy"}, "entries": [entry]}))
    with pytest.raises(ConfigError, match=f"latency table {tmp_path / 't.json'}: "):
        LatencyTable.load_dir("toy", tmp_path)
    with pytest.raises(ConfigError) as err:
        LatencyTable.load_dir("toy", tmp_path)
    assert message in str(err.value) and "re-measure the table" in str(err.value)


def test_a_table_with_an_impossible_batch_is_refused(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({
        "format": "nas-latency/1", "provenance": {"device_spec": "toy", "batch": "one"},
        "entries": []}))
    with pytest.raises(ConfigError, match="provenance batch 'one' is not a positive whole number"):
        LatencyTable.load_dir("toy", tmp_path)


def test_measured_entries_stand_and_estimates_say_how_they_were_made():
    table = synthetic_table(LAYERS)
    key = next(iter(table.entries))
    table.entries[key] = 123.0  # a measurement off the law is still what the cost model says
    info, batch, w, a = layer_from_key(key)
    model = LatencyCost(SPEC, batch, table)
    assert model.layer_cost(info, LayerPrecision(w, a)) == 123.0
    assert not model.is_estimated(info, LayerPrecision(w, a))
    other = conv(16, 24, 3, 12)
    assert model.is_estimated(other, LayerPrecision(8, 8))
    assert model.layer_cost(other, LayerPrecision(8, 8)) == model.calibration.estimate_us(
        other, 8, 8, batch, SPEC)
    n = len(LAYERS) * 2
    assert model.estimate_method == (
        f"roofline from the device spec, calibrated on {n * len(PRECISIONS)} integer entries "
        f"and {n} fp16 cuDNN entries of 1 measured table (1 measured with other kernel code)")
    bare = LatencyCost(SPEC, batch, table, calibrate=False)
    assert bare.layer_cost(other, LayerPrecision(8, 8)) == roofline_us(other, 8, 8, batch, SPEC)


# A law without the size term: CIFAR-10's layers are larger than any of Fashion-MNIST's, and
# a held-out space's layers past the other's range take the factor of the largest measured.
FLAT_INT = (0.4, 0.0, -0.3, 0.25, 0.1, 0.05, 0.02)


def _write_law_tables(folder, spaces, batches=(1, 8)):
    for space, batch in itertools.product(spaces, batches):
        entries = {}
        for layer in space.layers():
            for c in layer.choices:
                key = table_key(layer.info, batch, c.w_bits, c.a_bits)
                entries[key] = {"key": key,
                                "us": law(layer.info, c.w_bits, c.a_bits, batch, FLAT_INT),
                                "fp16_cudnn_us": float_law(layer.info, batch)}
        (folder / f"toy-{space.name}-b{batch}.json").write_text(json.dumps({
            "format": "nas-latency/1", "provenance": {"device_spec": "toy", "batch": batch},
            "entries": list(entries.values())}))


def test_bench_holds_each_space_out_and_scores_both_estimates(tmp_path):
    spaces = [load_space("fmnist_resnet8"), load_space("cifar10_resnet20")]
    _write_law_tables(tmp_path, spaces)
    (tmp_path / "other-device.json").write_text(json.dumps({
        "format": "nas-latency/1", "provenance": {"device_spec": "h200", "batch": 1},
        "entries": []}))
    found = table_spaces(SPEC, tmp_path, say=lambda line: None)
    assert sorted((s.name, b, p.name) for s, b, p in found) == sorted(
        (s.name, b, f"toy-{s.name}-b{b}.json") for s in spaces for b in (1, 8))
    results = run_bench(SPEC, found, n_plans=30, seed=0, say=lambda line: None)
    assert len(results["rows"]) == 4
    for row in results["rows"]:
        # Calibrated on the other space's tables alone, which follow the same law: the
        # estimates match the held-out tables up to the ridge (a factor within 1 %).
        assert row["calibrated_on"].endswith("of 2 measured tables")
        calibrated, roofline = row["calibrated"], row["roofline"]
        assert calibrated["entry_median_error"] < 0.01 and calibrated["plan_mape"] < 0.01
        assert calibrated["layer_choice_tau"] > 0.9
        assert calibrated["plan_tau"] > 0.9 and calibrated["mixed_plan_tau"] > 0.9
        assert calibrated["mixed_plan_mape"] < 0.01
        assert roofline["plan_mape"] > 0.1  # FLAT_INT's intercept alone is a factor of 1.5


def test_bench_estimate_cli(cli, tmp_path):
    result = cli("bench", "estimate", "--plans", "20", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "layer choice tau" in result.stdout
    (run,) = tmp_path.iterdir()
    results = json.loads((run / "bench_estimate.json").read_text())
    # Every committed H200 table holds a built-in space, and each is scored once.
    assert sorted(r["table"] for r in results["rows"]) == sorted(
        p.name for p in COST_MODELS_DIR.glob("h200-*.json"))
    for r in results["rows"]:
        others = sum(o["space"] != r["space"] for o in results["rows"])  # held out of the fit
        assert r["calibrated_on"].endswith(f" of {others} measured tables")
        assert r["space"] in r["table"] and f"-b{r['batch']}.json" in r["table"]
        assert set(r["calibrated"]) == set(r["roofline"]) == {
            "entry_median_error", "layer_choice_tau", "plan_mape", "plan_tau", "mixed_plan_mape",
            "mixed_plan_tau"}


def test_bench_estimate_bad_input(cli, tmp_path):
    result = cli("bench", "estimate", "--plans", "1", "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "nas: error: --plans 1: give 2 or more (Kendall's tau ranks pairs)"
    spec = tmp_path / "toy.yaml"
    spec.write_text("name: toy\nsms: 4\nint8_tops: 1\nfp16_tflops: 1\ntf32_tflops: 1\n"
                    "cuda_core_tops: 1\nhbm_tb_s: 1\nlaunch_overhead_us: 1\n")
    result = cli("bench", "estimate", "--device-spec", str(spec), "--runs-dir",
                 str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "no latency table under cost_models/ for device toy" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_nas_cost_names_its_estimate(cli):
    result = cli("cost", "--space", "fmnist_resnet8", "--uniform", "W4A8", "--batch", "8",
                 "--estimate", "roofline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith(
        "(estimated: roofline from the device spec; no measured table for batch 8)")
    result = cli("cost", "--space", "fmnist_resnet8", "--uniform", "W4A8", "--batch", "8")
    assert result.returncode == 0, result.stderr
    assert "(estimated: roofline from the device spec, calibrated on " in result.stdout
    result = cli("cost", "--uniform", "W4A8", "--estimate", "guess")
    assert result.returncode == 2 and "invalid choice: 'guess'" in result.stderr


def test_nas_cost_of_a_plan_takes_its_recorded_batch_and_device(cli, tmp_path):
    from nas.plan import Plan

    spec = tmp_path / "toy.yaml"  # another device: the label names it
    spec.write_text("name: toy\nsms: 4\nint8_tops: 1\nfp16_tflops: 1\ntf32_tflops: 1\n"
                    "cuda_core_tops: 1\nhbm_tb_s: 1\nlaunch_overhead_us: 1\n")
    space = load_space("fmnist_resnet8")
    path = tmp_path / "plan.yaml"

    def cost_of(costs, *args):
        plan = Plan.uniform(space, 8, 8)
        plan.costs = costs
        plan.save(path)
        return cli("cost", "--space", "fmnist_resnet8", "--plan", str(path), *args)

    result = cost_of({"latency_batch": 8, "device_spec": str(spec)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"space fmnist_resnet8, plan {path}, batch 8, device toy")
    result = cost_of({"latency_batch": 8, "device_spec": str(spec)}, "--batch", "3",
                     "--device-spec", "h200")
    assert result.stdout.startswith(f"space fmnist_resnet8, plan {path}, batch 3, device h200")
    for costs, message in [
            ({"latency_batch": "abc"}, "costs.latency_batch 'abc' is not a positive whole number; "
                                       "correct it or give --batch"),
            ({"latency_batch": 0}, "costs.latency_batch 0 is not a positive whole number"),
            ({"latency_batch": True}, "costs.latency_batch True is not a positive whole number"),
            ({"latency_batch": 2.5}, "costs.latency_batch 2.5 is not a positive whole number"),
            ({"device_spec": 7}, "costs.device_spec 7 is not a device spec name or .yaml path; "
                                 "correct it or give --device-spec")]:
        result = cost_of(costs)
        assert result.returncode == 2
        assert result.stderr.strip().startswith(f"nas: error: {path}: {message}")
        assert "Traceback" not in result.stderr
    assert cost_of({"latency_batch": "abc"}, "--batch", "2").returncode == 0  # the flag wins

