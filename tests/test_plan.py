import json

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from nas.cost.size import plan_size_bytes
from nas.errors import ConfigError
from nas.plan import LayerPrecision, Plan, layer_hash, parse_uniform, uniform_plan
from nas.quant.fake import fake_quantize, quant_range
from nas.quant.modules import QuantConv2d, QuantLinear, calibrate, quant_layers, quantize_model
from nas.spaces import load_space


@pytest.fixture(scope="module")
def fmnist_space():
    return load_space("fmnist_resnet8")


def _mixed(space):
    plan = Plan.uniform(space, 4, 8)
    plan.layers["layer2.0.conv2"] = LayerPrecision(2, 4, "per_tensor", False, True)
    plan.costs = {"size": 1234.5, "unit": "bytes"}
    plan.provenance = {"method": "test", "run_id": "r1", "seed": 3, "date": "2026-11-28"}
    return plan


def test_uniform_keeps_fixed_layers(fmnist_space):
    plan = Plan.uniform(fmnist_space, 4, 8)
    assert plan.layers["conv1"] == LayerPrecision(8, 8) and plan.layers["fc"] == LayerPrecision(8, 8)
    assert plan.layers["layer1.0.conv1"] == LayerPrecision(4, 8, "per_channel", True, False)
    assert plan.bits_histogram() == {"W4A8": 8, "W8A8": 2}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_roundtrip_is_lossless(fmnist_space, tmp_path, suffix):
    plan = _mixed(fmnist_space)
    path = plan.save(tmp_path / f"plan{suffix}")
    assert Plan.load(path) == plan
    assert Plan.load(path).resolved(fmnist_space) == plan


def test_yaml_and_json_hold_the_same_content(fmnist_space, tmp_path):
    plan = _mixed(fmnist_space)
    as_yaml = yaml.safe_load(plan.save(tmp_path / "p.yaml").read_text())
    as_json = json.loads(plan.save(tmp_path / "p.json").read_text())
    assert as_yaml == as_json and as_yaml["format_version"] == 2
    assert as_yaml["model"] == {"space": "fmnist_resnet8", "name": "resnet8",
                                "layer_hash": layer_hash(fmnist_space)}


def test_default_fills_unlisted_layers(fmnist_space):
    raw = Plan.uniform(fmnist_space, 8, 8).to_dict()
    raw["layers"] = {"conv1": raw["layers"]["conv1"], "fc": raw["layers"]["fc"],
                     "layer1.0.conv1": {"w_bits": 2, "a_bits": 4}}
    raw["default"] = {"w_bits": 4, "a_bits": 8}
    plan = Plan.from_dict(raw).resolved(fmnist_space)
    assert plan.layers["layer1.0.conv1"].w_bits == 2 and plan.layers["layer3.0.conv2"].w_bits == 4
    assert len(plan.layers) == 10


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["layers"].update({"head": {"w_bits": 8, "a_bits": 8}}),
     "plan layer 'head' is not a quantizable layer of space fmnist_resnet8"),
    (lambda r: r["layers"].pop("layer2.0.conv1"),
     "plan has no precision for layer 'layer2.0.conv1'"),
    (lambda r: r["layers"].update({"layer1.0.conv1": {"w_bits": 3, "a_bits": 8}}),
     "plan layer 'layer1.0.conv1': W3A8 is outside space fmnist_resnet8; allowed: W2A4, W2A8"),
    (lambda r: r["layers"].update({"conv1": {"w_bits": 4, "a_bits": 8}}),
     "plan layer 'conv1': W4A8 is outside space fmnist_resnet8; fixed at W8A8"),
    (lambda r: r["layers"].update({"fc": {"w_bits": 9, "a_bits": 8}}),
     "layers.fc.w_bits: 9 is not an allowed bit width"),
    (lambda r: r["layers"].update({"fc": {"w_bits": 8, "a_bits": 8, "colour": 1}}),
     "layers.fc.colour: unknown key"),
    (lambda r: r.update({"format_version": 7}), "format_version 7 is not supported"),
    (lambda r: r.update({"format_version": 2.0}), "format_version 2.0 is not supported; this nas "
                                                  "reads versions 1, 2"),
    (lambda r: r["model"].update({"layer_hash": "0" * 16}), "plan was made for other layers"),
    (lambda r: r.update({"pickle": 1}), "unknown key 'pickle'"),
])
def test_validation_names_the_problem(fmnist_space, edit, message):
    raw = Plan.uniform(fmnist_space, 4, 8).to_dict()
    edit(raw)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Plan.from_dict(raw).resolved(fmnist_space)


def test_parse_uniform():
    assert parse_uniform("W8A8") == (8, 8) and parse_uniform("w4a32") == (4, 32)
    for bad in ("8/8", "W9A8", "W8"):
        with pytest.raises(ConfigError, match="write W<bits>A<bits>"):
            parse_uniform(bad)


def test_uniform_plan_takes_only_a_choice_of_every_searchable_layer(fmnist_space):
    assert (uniform_plan(fmnist_space, "w4a8")
            == Plan.uniform(fmnist_space, 4, 8).resolved(fmnist_space))
    for text in ("W3A8", "W8A32", "W2A2"):
        with pytest.raises(ConfigError) as err:
            uniform_plan(fmnist_space, text)
        assert str(err.value) == (f"--uniform {text.upper()} is outside space fmnist_resnet8; "
                                  f"allowed: W2A4, W2A8, W4A4, W4A8, W8A4, W8A8")
    # Float throughout is the baseline every space is compared with: always allowed.
    baseline = uniform_plan(fmnist_space, "W32A32")
    assert {str(p) for n, p in baseline.layers.items()
            if not next(x for x in fmnist_space.layers() if x.name == n).fixed} == {"W32A32"}


def test_a_plan_from_a_changed_copy_of_a_space_is_not_taken_for_the_shipped_one(fmnist_space):
    # Same name, same layers and shapes, another input size: every layer's BitOps and latency
    # differ, so costing the plan on the shipped space would be silently wrong.
    raw = fmnist_space.to_dict()
    raw["data"] = {"name": "synthetic", "kwargs": {"image_size": 32}}
    bigger = type(fmnist_space).from_dict(raw)
    assert bigger.name == fmnist_space.name
    plan = Plan.uniform(bigger, 4, 8)
    assert plan.resolved(bigger) == plan
    with pytest.raises(ConfigError) as err:
        plan.resolved(fmnist_space)
    assert str(err.value) == (
        f"plan was made for other layers (layer_hash {layer_hash(bigger)}) than space "
        f"fmnist_resnet8 has ({layer_hash(fmnist_space)}): same names, other shapes, padding or "
        f"input size; if it came from a changed copy of fmnist_resnet8, give that file with "
        f"--space PATH")


def test_format_1_plans_still_load_and_check_their_layers(fmnist_space, tmp_path):
    # Format 1 hashed names, types and shapes only; its plans still resolve on that hash.
    raw = Plan.uniform(fmnist_space, 4, 8).to_dict()
    raw.update({"format_version": 1})
    raw["model"]["layer_hash"] = layer_hash(fmnist_space, 1)
    assert layer_hash(fmnist_space, 1) != layer_hash(fmnist_space)
    plan = Plan.from_dict(raw).resolved(fmnist_space)
    assert plan.format_version == 1 and plan.layers == Plan.uniform(fmnist_space, 4, 8).layers
    raw["model"]["layer_hash"] = layer_hash(fmnist_space)
    with pytest.raises(ConfigError, match="plan was made for other layers"):
        Plan.from_dict(raw).resolved(fmnist_space)


def test_plan_for_another_space_says_which(fmnist_space):
    other = Plan.uniform(load_space("fmnist_mobilenetv2"), 4, 8)
    with pytest.raises(ConfigError) as err:
        other.resolved(fmnist_space)
    assert str(err.value) == ("plan is for space fmnist_mobilenetv2, not fmnist_resnet8; give "
                              "--space fmnist_mobilenetv2, or a plan made for fmnist_resnet8")
    other.space = "my_mobilenet"  # a space of the user's: only its file can be given
    with pytest.raises(ConfigError) as err:
        other.resolved(fmnist_space)
    assert str(err.value) == ("plan is for space my_mobilenet, not fmnist_resnet8; give "
                              "--space PATH (the YAML file of space my_mobilenet), or a plan "
                              "made for fmnist_resnet8")
    # Another space's name over the same layers (a copy of the space's file) still fits.
    renamed = Plan.uniform(fmnist_space, 4, 8)
    renamed.space = "my_resnet8"
    assert renamed.resolved(fmnist_space).layers == Plan.uniform(fmnist_space, 4, 8).layers


@pytest.mark.parametrize("name, content, message", [
    ("p.yaml", b"\xff\xfe", "is not UTF-8 text (byte 0); give a plan file as nas writes it "
                            "(YAML or JSON)"),
    ("p.yaml", b"layers: [1,\n", "is not valid YAML at line 2, column 1: expected the node "
                                 "content, but found '<stream end>'"),
    ("p.json", b'{"layers": }', "is not valid JSON at line 1, column 12: Expecting value"),
])
def test_unreadable_plan_file_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        Plan.load(path)
    assert str(err.value) == f"plan {path} {message}"


def test_plan_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        Plan.load(tmp_path)
    assert str(err.value) == (f"plan {tmp_path} is a directory; give a plan file (.yaml or "
                              f".json), such as a run folder's plan.yaml")


def test_plan_model_names_must_be_names(fmnist_space):
    raw = Plan.uniform(fmnist_space, 4, 8).to_dict()
    raw["model"]["space"] = ["fmnist_resnet8"]
    with pytest.raises(ConfigError) as err:
        Plan.from_dict(raw)
    assert str(err.value) == "plan: model.space ['fmnist_resnet8'] must be a name"


def test_size_in_bytes(fmnist_space):
    # conv1: 144 weights at 8 bits + 16 scales (symmetric: no zero point) + 16 biases
    infos = {x.name: x.info for x in fmnist_space.layers()}
    from nas.cost.size import layer_size_bytes

    assert layer_size_bytes(infos["conv1"], LayerPrecision(8, 8)) == 144 + 16 * 4 + 16 * 4
    assert layer_size_bytes(infos["conv1"], LayerPrecision(4, 8, "per_tensor", False)) == (
        72 + 4 + 1 + 16 * 4)
    assert layer_size_bytes(infos["conv1"], LayerPrecision(32, 32)) == 144 * 4 + 16 * 4
    w8, w4 = (plan_size_bytes(Plan.uniform(fmnist_space, w, 8), fmnist_space) for w in (8, 4))
    assert w4 < w8
    fp32 = plan_size_bytes(Plan.uniform(fmnist_space, 32, 32, include_fixed=True), fmnist_space)
    assert fp32 == sum(4 * (i.params + i.out_channels) for i in infos.values() if i.type == "Conv2d") + (
        4 * (64 * 10) + 4 * 10)  # fc: weights plus its one bias (params already counts it once)


def test_quantize_model_swaps_by_name(fmnist_space):
    model = fmnist_space.build_model().eval()
    plan = Plan.uniform(fmnist_space, 4, 8)
    plan.layers["layer1.0.conv1"] = LayerPrecision(32, 32)
    q = quantize_model(model, plan)
    layers = quant_layers(q)
    assert "layer1.0.conv1" not in layers and isinstance(q.layer1[0].conv1, nn.Conv2d)
    assert isinstance(layers["layer2.0.conv1"], QuantConv2d) and isinstance(layers["fc"], QuantLinear)
    assert layers["layer2.0.conv1"].weight_quantizer.bits == 4
    assert layers["layer2.0.conv1"].weight_quantizer.scale.shape == (32,)  # per channel
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())  # original untouched
    x = torch.randn(8, 1, 28, 28)
    calibrate(q, [(x, None)], batches=1)
    seen = {}
    hooks = [layers[n].register_forward_hook(
        lambda m, args, out, n=n: seen.update({n: (args[0].clone(), out.clone())}))
        for n in ("layer2.0.conv1", "fc")]
    with torch.no_grad():
        assert q(x).shape == (8, 10)
    for h in hooks:
        h.remove()
    # Each swapped layer computes the float op on its fake-quantized input (8-bit, unsigned)
    # and fake-quantized weight (4-bit, per output channel): the same kernels on the same
    # tensors, so bit for bit; and not the float op on the raw tensors.
    for name, op in (("layer2.0.conv1", lambda m, xq, wq: F.conv2d(
            xq, wq, m.bias, m.stride, m.padding, m.dilation, m.groups)),
                     ("fc", lambda m, xq, wq: F.linear(xq, wq, m.bias))):
        layer, (inp, out) = layers[name], seen[name]
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        assert (iq.bits, iq.symmetric, wq.bits, wq.axis) == (8, False, 4 if name != "fc" else 8, 0)
        with torch.no_grad():
            x_q = fake_quantize(inp, iq.scale, iq.zero_point, 0, 255)
            w_q = fake_quantize(layer.weight, wq.scale, wq.zero_point,
                                *quant_range(wq.bits, True), axis=0)
            assert torch.equal(out, op(layer, x_q, w_q))
            assert not torch.equal(out, op(layer, inp, layer.weight))
    bad = Plan.uniform(fmnist_space, 4, 8)
    bad.layers["layer1.0.bn1"] = LayerPrecision(8, 8)
    with pytest.raises(ConfigError, match="plan layer 'layer1.0.bn1': BatchNorm2d, expected Conv2d"):
        quantize_model(model, bad)


def test_grouped_and_depthwise_convs_quantize():
    torch.manual_seed(0)
    # 5x5 depthwise: 25 weights per channel, more than the 16 levels of 4 bits.
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    q = QuantConv2d.from_float(conv, LayerPrecision(4, 8)).eval()
    q.weight_quantizer.observe_tensor(q.weight.detach())
    x = torch.relu(torch.randn(2, 8, 6, 6))
    q.input_quantizer.observe_tensor(x)
    wq, iq = q.weight_quantizer, q.input_quantizer
    assert wq.scale.shape == (8,) and (wq.qmin, wq.qmax, iq.qmin, iq.qmax) == (-8, 7, 0, 255)
    with torch.no_grad():
        out = q(x)
        w_q = fake_quantize(conv.weight, wq.scale, wq.zero_point, -8, 7, axis=0)
        x_q = fake_quantize(x, iq.scale, iq.zero_point, 0, 255)
        assert torch.equal(out, F.conv2d(x_q, w_q, conv.bias, padding=2, groups=8))
        assert not torch.equal(out, conv(x))
    assert all(torch.unique(w_q[c]).numel() <= 16 < torch.unique(conv.weight[c]).numel()
               for c in range(8))
