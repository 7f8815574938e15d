import json
import subprocess
import sys

import pytest
import torch
import yaml

from nas.cost import make_cost_model, parse_target
from nas.cost import device_spec, tables
from nas.cost.device_spec import COST_MODELS_DIR, DeviceSpec
from nas.cost.latency import LatencyCost
from nas.cost.roofline import roofline_us
from nas.cost.tables import LatencyTable, kernel_fingerprint, table_key
from nas.errors import ConfigError
from nas.plan import LayerPrecision, Plan
from nas.spaces import LayerInfo, SearchSpace, load_space

SPEC = DeviceSpec(name="toy", sms=2, int8_tops=4e-6, fp16_tflops=2e-6, tf32_tflops=1e-6,
                  cuda_core_tops=1e-6, hbm_tb_s=1e-6, launch_overhead_us=1.0, tile_m=4, tile_n=4)


def conv(cin=4, cout=8, k=3, hw=4, groups=1, stride=1):
    out = hw // stride
    macs = out * out * cout * (cin // groups) * k * k
    return LayerInfo("c", "Conv2d", cin, cout, (k, k), (stride, stride), (k // 2, k // 2), groups,
                     (hw, hw), (out, out), cout * (cin // groups) * k * k, macs)


def test_bitops_is_macs_times_bits():
    info = conv()
    model = make_cost_model("bitops")
    assert model.layer_cost(info, LayerPrecision(4, 8)) == info.macs * 32
    assert model.layer_cost(info, LayerPrecision(32, 32)) == info.macs * 1024


def test_roofline_compute_bound_with_waves():
    # M = 16 outputs, N = 8, K = 36: 4 x 2 = 8 tiles of 4x4 over 2 SMs = 4 waves.
    # Each tile: 2*4*4*36 = 1152 ops at 2e6 ops/s per SM (int8: 4e6 over 2 SMs) = 576 us.
    info = conv()
    us = roofline_us(info, 8, 8, 1, SPEC)
    assert us == pytest.approx(4 * 576 + 1.0)
    # No int4 MMA: 4-bit operands run at the int8 rate, so compute time is the same...
    assert roofline_us(info, 4, 4, 1, SPEC) == pytest.approx(us)
    # ...and float16 runs at half the rate.
    assert roofline_us(info, 16, 16, 1, SPEC) == pytest.approx(4 * 1152 + 1.0)


def test_roofline_memory_bound_counts_bytes():
    fast = DeviceSpec(**{**SPEC.__dict__, "int8_tops": 1e6, "fp16_tflops": 1e6, "tf32_tflops": 1e6})
    info = conv()
    # bytes: input 4*4*4 * a/8, weights 8*36 * w/8, fp16 output 8*4*4*2 = 256; at 1 byte/us.
    assert roofline_us(info, 8, 8, 1, fast) == pytest.approx(64 + 288 + 256 + 1.0)
    assert roofline_us(info, 4, 8, 1, fast) == pytest.approx(64 + 144 + 256 + 1.0)
    assert roofline_us(info, 4, 4, 1, fast) == pytest.approx(32 + 144 + 256 + 1.0)


def test_roofline_splits_the_reduction_of_a_small_layer_as_the_kernels_do():
    # 8 SMs at 1 int8 op/us each, 64x64 tiles; a 3x3 64->64 layer on 7x7 at batch 1 is one
    # tile, which the kernels' rule splits in 2 (9 reduction steps, 4 per split at least).
    spec = DeviceSpec(**{**SPEC.__dict__, "sms": 8, "int8_tops": 8e-6, "fp16_tflops": 8e-6,
                         "tile_m": 64, "tile_n": 64})
    info = conv(cin=64, cout=64, hw=7)
    tile_ops = 2 * 64 * 64 * 576
    # no split: one wave of the whole tile; split: half of it, plus a second launch
    assert roofline_us(info, 8, 8, 1, spec) == pytest.approx(tile_ops / 2 + 2 * 1.0)
    # a float layer runs cuDNN: no split
    assert roofline_us(info, 16, 16, 1, spec) == pytest.approx(tile_ops + 1.0)
    # bytes at 1 per us: input, weights, fp16 output; the split also writes and reads back
    # both splits' int32 partial sums (2 * 2 * 49 * 64 * 4 bytes)
    hbm, partials = 7 * 7 * 64 + 64 * 576 + 7 * 7 * 64 * 2, 2 * 2 * 49 * 64 * 4
    # 32 ops/us per SM: the split's half tile (73728 us) now waits on memory, and still wins
    # against the whole tile (147456 us)
    faster = DeviceSpec(**{**spec.__dict__, "int8_tops": 32 * 8e-6})
    assert roofline_us(info, 8, 8, 1, faster) == pytest.approx(hbm + partials + 2.0)
    # memory-bound (fast tensor cores): the split's bytes and second launch lose
    fast = DeviceSpec(**{**spec.__dict__, "int8_tops": 1e6})
    assert roofline_us(info, 8, 8, 1, fast) == pytest.approx(hbm + 1.0)


def test_measured_entries_override_the_estimate(tmp_path):
    info = conv()
    key = table_key(info, 1, 4, 8)
    (tmp_path / "toy.json").write_text(json.dumps({
        "format": "nas-latency/1", "provenance": {"device_spec": "toy"},
        "entries": [{"key": key, "us": 12.5}]}))
    (tmp_path / "other.json").write_text(json.dumps({
        "format": "nas-latency/1", "provenance": {"device_spec": "h200"},
        "entries": [{"key": key, "us": 99.0}]}))
    table = LatencyTable.load_dir("toy", tmp_path)
    model = LatencyCost(SPEC, 1, table)
    assert model.layer_cost(info, LayerPrecision(4, 8)) == 12.5
    assert not model.is_estimated(info, LayerPrecision(4, 8))
    assert model.is_estimated(info, LayerPrecision(8, 8))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json is not a nas-latency/1 file"):
        LatencyTable.load_dir("toy", tmp_path)


def test_tables_measured_with_other_kernels_are_stale(tmp_path, monkeypatch):
    source = tmp_path / "conv.py"
    source.write_text("kernel v1\n")
    monkeypatch.setattr(tables, "KERNEL_SOURCES", [source])
    v1 = tables.kernel_fingerprint()
    for name, kernel in (("now.json", v1), ("old.json", "0123456789ab"), ("none.json", None)):
        prov = {"device_spec": "toy"} | ({"kernel_source": kernel} if kernel else {})
        (tmp_path / name).write_text(json.dumps({"format": "nas-latency/1", "provenance": prov,
                                                 "entries": []}))
    table = LatencyTable.load_dir("toy", tmp_path)
    assert table.stale(["now.json", "old.json", "none.json"]) == ["none.json", "old.json"]
    source.write_text("kernel v2\n")  # any change to the kernel source
    assert tables.kernel_fingerprint() != v1
    assert table.stale(["now.json"]) == ["now.json"]


def test_latency_cost_names_the_stale_tables_a_space_uses(tmp_path, monkeypatch):
    from tests.conftest import SYNTHETIC_SPACE

    space = SearchSpace.from_dict(SYNTHETIC_SPACE)
    first, second = space.layers()[:2]
    for name, layer, kernel in (("old.json", first, "0123456789ab"),
                                ("fresh.json", second, kernel_fingerprint()),
                                ("unused.json", None, "0123456789ab")):
        keys = [table_key(layer.info, 1, c.w_bits, c.a_bits) for c in layer.choices] if layer else []
        (tmp_path / name).write_text(json.dumps({
            "format": "nas-latency/1", "provenance": {"device_spec": "toy", "kernel_source": kernel},
            "entries": [{"key": k, "us": 1.0} for k in keys]}))
    model = LatencyCost(SPEC, 1, LatencyTable.load_dir("toy", tmp_path))
    assert model.sources(space) == {"old.json", "fresh.json"}
    assert model.table_.stale_note(model.sources(space), "nas measure --space s") == (
        f"note: measured with other kernel code than this checkout's (kernel_source "
        f"{kernel_fingerprint()}): old.json (kernel_source 0123456789ab); re-measure on a GPU "
        f"with `nas measure --space s`")


def test_the_remeasure_command_names_a_space_file_by_its_path(tmp_path):
    from nas.cost.notes import remeasure_command

    path = tmp_path / "my space.yaml"
    path.write_text(yaml.safe_dump(load_space("fmnist_resnet8").to_dict()))
    assert remeasure_command(load_space(path), 64) == f"nas measure --space '{path}' --batch 64"
    assert remeasure_command(load_space("fmnist_resnet8"), 1) == (
        "nas measure --space fmnist_resnet8 --batch 1")


def test_cost_table_and_differentiable_expectation():
    space = load_space("fmnist_resnet8")
    table = make_cost_model("size").table(space)
    assert table.layers[0] == "conv1" and len(table.values[0]) == 1 and len(table.values[1]) == 6
    logits = [torch.zeros(len(row), requires_grad=True) for row in table.values]
    probs = [torch.softmax(x, 0) for x in logits]
    expected = table.expected(probs)
    uniform_mean = sum(sum(row) / len(row) for row in table.values)
    assert expected.item() == pytest.approx(uniform_mean)
    expected.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in logits[1:-1])
    # The plan that picks the cheapest choice everywhere costs the sum of row minima.
    cheapest = [min(range(len(r)), key=r.__getitem__) for r in table.values]
    # Sizes are whole bytes plus weights * bits / 8: multiples of 1/8 far below 2**53, so
    # every sum of them is exact in floating point, in any order.
    assert all((8 * v).is_integer() for row in table.values for v in row)
    assert table.index_cost(cheapest) == sum(min(r) for r in table.values)
    w8a8 = [[(c.w_bits, c.a_bits) for c in choices].index((8, 8)) for choices in table.choices]
    plan = Plan.uniform(space, 8, 8)
    assert make_cost_model("size").plan_cost(plan, space) == table.index_cost(w8a8)


@pytest.mark.parametrize("text, cost, value", [
    ("size=60KB", "size", 60_000), ("size=1.5MiB", "size", 1.5 * 1024 ** 2), ("size=900", "size", 900),
    ("bitops=2.1G", "bitops", 2.1e9), ("latency=1.2ms", "latency", 1200),
    ("latency=250us", "latency", 250), (" LATENCY = 2 s ", "latency", 2e6),
])
def test_targets(text, cost, value):
    t = parse_target(text)
    assert (t.cost, t.value) == (cost, pytest.approx(value))


TARGET_FORMS = ("use size=60KB (B, KB, MB, KiB, MiB), bitops=2.1G (K, M, G, T) or "
                "latency=1.2ms (us, ms, s)")


@pytest.mark.parametrize("text, message", [
    ("size 60KB", "target 'size 60KB' is not understood"),
    ("speed=3ms", "target 'speed=3ms' is not understood"),
    ("latency=3KB", "target 'latency=3KB' is not understood"),
    ("size=-1KB", "target 'size=-1KB' is not understood"),
    ("bitops=2.1Gb", "target 'bitops=2.1Gb' is not understood"),
    ("latency=5", "target 'latency=5' is not understood"),
    ("size=0KB", "target 'size=0KB' must be positive"),
    ("bitops=0", "target 'bitops=0' must be positive"),
    ("latency=0.0ms", "target 'latency=0.0ms' must be positive"),
])
def test_bad_targets(text, message):
    with pytest.raises(ConfigError) as err:
        parse_target(text)
    assert str(err.value) == f"{message}; {TARGET_FORMS}"


def test_nas_cost_cli_is_light_and_labelled(cli):
    # Batch 8 has no measured table under cost_models/: every latency is estimated (the
    # roofline calibrated on the H200 tables).
    result = cli("cost", "--space", "imagenet_resnet18", "--uniform", "W4A8", "--batch", "8")
    assert result.returncode == 0, result.stderr
    assert "layer4.1.conv2" in result.stdout and "estimated" in result.stdout
    assert "latency" in result.stdout.splitlines()[-1] and "roofline" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("; no measured table for batch 8)")
    # Batch 64 was measured on the H200 (cost_models/h200-imagenet_resnet18-b64.json).
    result = cli("cost", "--space", "imagenet_resnet18", "--uniform", "W4A8", "--batch", "64")
    assert result.returncode == 0, result.stderr
    assert "estimated" not in result.stdout
    footer = [line for line in result.stdout.splitlines() if line.startswith("size ")]
    assert footer[-1].endswith("(measured; measured table: h200-imagenet_resnet18-b64.json)")
    # The table names the kernel code it timed; when that is not this checkout's, say so.
    kernel = json.loads((COST_MODELS_DIR / "h200-imagenet_resnet18-b64.json").read_text())[
        "provenance"]["kernel_source"]
    note = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    if kernel == kernel_fingerprint():
        assert note == []
    else:
        assert note == [f"note: measured with other kernel code than this checkout's "
                        f"(kernel_source {kernel_fingerprint()}): "
                        f"h200-imagenet_resnet18-b64.json (kernel_source {kernel}); re-measure "
                        f"on a GPU with `nas measure --space imagenet_resnet18 --batch 64`"]
    code = ("import sys, nas.cli; nas.cli.main(['cost', '--uniform', 'W8A8']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"  # costing needs no torch (cached geometry)


def test_nas_cost_bad_input(cli):
    for args, message in [(["--uniform", "W4A8", "--batch", "0"], "--batch 0: must be a positive"),
                          (["--uniform", "W4A8", "--device-spec", "tpu9"], "device spec 'tpu9' not found"),
                          (["--uniform", "W1A8"], "--uniform 'W1A8': write W<bits>A<bits>"),
                          (["--uniform", "W8A8", "--space", "nope"], "unknown search space 'nope'")]:
        result = cli("cost", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr


H200_YAML = (COST_MODELS_DIR / "devices" / "h200.yaml").read_text()


def _edited_h200(field: str, value: str | None) -> str:
    """The h200 spec with one field's line replaced (None: removed)."""
    lines = [line for line in H200_YAML.splitlines() if not line.startswith(f"{field}:")]
    return "\n".join(lines + ([f"{field}: {value}"] if value is not None else [])) + "\n"


def test_device_spec_fields_are_all_checked():
    from dataclasses import fields

    assert list(device_spec._SPEC_FIELDS) == [f.name for f in fields(DeviceSpec)]
    assert DeviceSpec.load("h200").hbm_tb_s == 4.8


@pytest.mark.parametrize("content, message", [
    ("a: [1,\n", " is not valid YAML at line 2, column 1: expected the node content, but found "
                 "'<stream end>'"),
    (_edited_h200("hbm_tb_s", "0"), ": hbm_tb_s 0 must be a positive number"),
    (_edited_h200("int8_tops", "-5"), ": int8_tops -5 must be a positive number"),
    (_edited_h200("hbm_tb_s", ".inf"), ": hbm_tb_s inf must be a positive number"),
    (_edited_h200("fp16_tflops", "fast"), ": fp16_tflops 'fast' must be a positive number"),
    (_edited_h200("sms", "0"), ": sms 0 must be a positive whole number"),
    (_edited_h200("sms", "132.5"), ": sms 132.5 must be a positive whole number"),
    (_edited_h200("tile_m", "true"), ": tile_m True must be a positive whole number"),
    (_edited_h200("launch_overhead_us", "-1"),
     ": launch_overhead_us -1 must be a number of microseconds, 0 or more"),
    (_edited_h200("int4_mma", "maybe"), ": int4_mma 'maybe' must be true or false"),
    (_edited_h200("name", "''"), ": name '' must be a non-empty string"),
    (_edited_h200("description", "[1]"), ": description [1] must be a string"),
    (_edited_h200("bogus", "1"), ": unknown field 'bogus'; known fields: name, sms, int8_tops, "
                                 "fp16_tflops, tf32_tflops, cuda_core_tops, hbm_tb_s, "
                                 "launch_overhead_us, tile_m, tile_n, int4_mma, description"),
    (_edited_h200("sms", None).replace("hbm_tb_s:", "#"),
     ": missing sms, hbm_tb_s; see cost_models/devices/h200.yaml"),
    ("", " must be a YAML mapping of the fields name, sms, int8_tops, fp16_tflops, tf32_tflops, "
         "cuda_core_tops, hbm_tb_s, launch_overhead_us, tile_m, tile_n, int4_mma, description; "
         "see cost_models/devices/h200.yaml"),
    ("- 1\n", " must be a YAML mapping of the fields name, sms, int8_tops, fp16_tflops, "
               "tf32_tflops, cuda_core_tops, hbm_tb_s, launch_overhead_us, tile_m, tile_n, "
               "int4_mma, description; see cost_models/devices/h200.yaml"),
])
def test_device_spec_file_is_checked_field_by_field(tmp_path, content, message):
    path = tmp_path / "spec.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        DeviceSpec.load(str(path))
    assert str(err.value) == f"device spec {path}{message}"


def test_device_spec_that_is_not_utf8_or_a_directory(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError) as err:
        DeviceSpec.load(str(path))
    assert str(err.value) == (f"device spec {path} is not UTF-8 text (byte 6); save it as UTF-8 "
                              f"YAML")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError) as err:
        DeviceSpec.load(str(tmp_path / "dir.yaml"))
    assert str(err.value) == (f"device spec {tmp_path / 'dir.yaml'} is a directory; give a "
                              f".yaml file")


def test_nas_cost_refuses_a_bad_device_spec_in_one_line(tmp_path, capsys):
    from nas.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(_edited_h200("hbm_tb_s", "0"))  # was a ZeroDivisionError deep in the roofline
    assert main(["cost", "--uniform", "W4A8", "--device-spec", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"nas: error: device spec {path}: hbm_tb_s 0 must be a positive number\n")


def _cost_error(capsys, *args) -> str:
    from nas.cli import main

    assert main(["cost", *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    return out.err.strip()


def test_nas_cost_uniform_must_be_a_choice_of_the_space(capsys):
    # A plan with W3A8 is refused as outside the space; --uniform W3A8 is refused alike.
    assert _cost_error(capsys, "--uniform", "W3A8") == (
        "nas: error: --uniform W3A8 is outside space fmnist_resnet8; allowed: W2A4, W2A8, W4A4, "
        "W4A8, W8A4, W8A8")
    assert _cost_error(capsys, "--uniform", "w8a32", "--space", "imagenet_resnet18") == (
        "nas: error: --uniform W8A32 is outside space imagenet_resnet18; allowed: W2A4, W2A8, "
        "W4A4, W4A8, W8A4, W8A8")


def test_nas_cost_of_a_plan_uses_the_plan_s_space(tmp_path, capsys):
    from nas.cli import main

    path = Plan.uniform(load_space("fmnist_mobilenetv2"), 4, 8).save(tmp_path / "mb_plan.yaml")
    assert main(["cost", "--plan", str(path)]) == 0  # not the default space, fmnist_resnet8
    assert capsys.readouterr().out.startswith(f"space fmnist_mobilenetv2, plan {path}, batch 1")
    assert _cost_error(capsys, "--plan", str(path), "--space", "fmnist_resnet8") == (
        "nas: error: plan is for space fmnist_mobilenetv2, not fmnist_resnet8; give --space "
        "fmnist_mobilenetv2, or a plan made for fmnist_resnet8")
    # A space loaded from a file records only its name: the user must give the file again.
    raw = yaml.safe_load(path.read_text())
    raw["model"]["space"] = "my_space"
    path.write_text(yaml.safe_dump(raw))
    assert _cost_error(capsys, "--plan", str(path)) == (
        f"nas: error: plan {path} is for space my_space, which is not a shipped space; give its "
        f"YAML file with --space PATH")
