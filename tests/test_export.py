"""`nas export`: ONNX (QDQ) checked in onnxruntime, the plan as JSON / YAML, and bad input."""

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, numpy_helper

from nas.checkpoint import load_model
from nas.cli import main
from nas.data import load_data, make_loader
from nas.plan import Plan
from nas.quant.ptq import prepare_ptq
from nas.spaces import load_space
from tests.conftest import nas_in_process

# Every searchable layer of the synthetic ResNet-8 (conv1 and fc are fixed at W8A8): 2, 4 and
# 8-bit weights, 4 and 8-bit inputs, asymmetric weights (per channel and per tensor) and one
# symmetric (signed) input.
MIXED = {
    "layer1.0.conv1": {"w_bits": 4, "a_bits": 8},
    "layer1.0.conv2": {"w_bits": 2, "a_bits": 4},
    "layer2.0.conv1": {"w_bits": 8, "a_bits": 4},
    "layer2.0.conv2": {"w_bits": 2, "a_bits": 8, "a_symmetric": True},
    "layer2.0.downsample.0": {"w_bits": 4, "a_bits": 4, "a_symmetric": True},
    "layer3.0.conv1": {"w_bits": 4, "a_bits": 8, "w_symmetric": False},
    "layer3.0.conv2": {"w_bits": 8, "a_bits": 8, "w_symmetric": False},
    "layer3.0.downsample.0": {"w_bits": 4, "a_bits": 8, "w_granularity": "per_tensor"},
}
# The integer type of each layer's weight and input zero points, and whether a Clip narrows
# the input's range (below 8 bits).
EXPECTED = {
    "conv1": ("INT8", "UINT8", False),
    "layer1.0.conv1": ("INT4", "UINT8", False),
    "layer1.0.conv2": ("INT4", "UINT8", True),
    "layer2.0.conv1": ("INT8", "UINT8", True),
    "layer2.0.conv2": ("INT4", "INT8", False),
    "layer2.0.downsample.0": ("INT4", "INT8", True),
    "layer3.0.conv1": ("UINT4", "UINT8", False),
    "layer3.0.conv2": ("UINT8", "UINT8", False),
    "layer3.0.downsample.0": ("INT4", "UINT8", False),
    "fc": ("INT8", "UINT8", False),
}
CALIB = ["--calibration", "minmax", "--calib-batches", "2"]


@pytest.fixture(scope="module")
def mixed_plan(trained, tmp_path_factory):
    space_path, _ = trained
    plan = Plan.uniform(load_space(space_path), 4, 8).to_dict()
    for name, prec in MIXED.items():
        plan["layers"][name].update(prec)
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture(scope="module")
def onnx_run(trained, mixed_plan, tmp_path_factory):
    """One `nas export --format onnx` of the trained checkpoint under the mixed plan."""
    _, checkpoint = trained
    runs = tmp_path_factory.mktemp("onnx") / "runs"
    result = nas_in_process("--runs-dir", str(runs), "export", "--checkpoint", str(checkpoint),
                            "--plan", str(mixed_plan), *CALIB)
    assert result.returncode == 0, result.stderr
    (folder,) = runs.iterdir()
    return folder, result


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def test_onnx_has_qdq_pairs_with_each_layers_types(onnx_run):
    folder, _ = onnx_run
    model = onnx.load(folder / "model.onnx")
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    inits = _initializers(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    for layer, (w_type, a_type, clipped) in EXPECTED.items():
        # Weights: stored as integers of the layer's type, read through a DequantizeLinear.
        (w_dq,) = [n for n in model.graph.node if n.input[0] == f"{layer}.weight_int"]
        assert w_dq.op_type == "DequantizeLinear", layer
        assert TensorProto.DataType.Name(inits[w_dq.input[0]].data_type) == w_type, layer
        assert TensorProto.DataType.Name(inits[w_dq.input[2]].data_type) == w_type, layer
        assert w_dq.input[1] == f"{layer}.weight_scale"
        # Inputs: QuantizeLinear, a Clip below 8 bits, DequantizeLinear; one zero point.
        (a_dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[1] == f"{layer}.input_scale"]
        zp = inits[f"{layer}.input_zero_point"]
        assert TensorProto.DataType.Name(zp.data_type) == a_type, layer
        feed = producer[a_dq.input[0]]
        assert (feed.op_type == "Clip") == clipped, layer
        q = producer[feed.input[0]] if clipped else feed
        assert q.op_type == "QuantizeLinear" and q.input[1:] == [f"{layer}.input_scale",
                                                                 f"{layer}.input_zero_point"]
    # The Clip holds the plan's range: 4-bit unsigned [0, 15], 4-bit signed [-8, 7].
    clips = {}
    for node in model.graph.node:
        if node.op_type == "Clip":
            layer = producer[node.input[0]].input[1].removesuffix(".input_scale")
            clips[layer] = [int(numpy_helper.to_array(inits[i])) for i in node.input[1:]]
    assert clips == {"layer1.0.conv2": [0, 15], "layer2.0.conv1": [0, 15],
                     "layer2.0.downsample.0": [-8, 7]}
    # The integers stay inside the plan's range: 2-bit signed weights in int4 are -2..1.
    w2 = numpy_helper.to_array(inits["layer1.0.conv2.weight_int"]).astype(int)
    assert w2.min() >= -2 and w2.max() <= 1 and {-2, 1} <= set(np.unique(w2).tolist())
    # Nothing left to cast at run time: the integers are stored in their own types.
    assert not [n for n in model.graph.node if n.op_type == "Cast"]


def test_onnx_metadata_says_how_to_feed_it(onnx_run, trained, mixed_plan):
    folder, _ = onnx_run
    model = onnx.load(folder / "model.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    assert props["input_name"] == "input" == model.graph.input[0].name
    assert props["input_layout"] == "NCHW" and json.loads(props["input_shape"]) == ["N", 1, 12, 12]
    assert json.loads(props["input_mean"]) == [0.0] and json.loads(props["input_std"]) == [1.0]
    assert props["input_pixel_scale"] == "1.0" and props["output_name"] == "logits"
    assert props["space"] == "synthetic_resnet8" and props["num_classes"] == "10"
    assert json.loads(props["plan"])["layer1.0.conv2"] == "W2A4"
    assert json.loads(props["source"]) == {
        "plan": str(mixed_plan), "checkpoint": str(trained[1]), "run": None,
        "calibration": "minmax", "calib_batches": 2, "seed": 0}
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 12, 12] and isinstance(dims[0], str)  # any batch


def test_onnxruntime_matches_the_fake_quantized_model(onnx_run):
    folder, result = onnx_run
    check = json.loads((folder / "summary.json").read_text())["check"]
    assert check["passed"] and check["images"] == 256
    assert check["top1_agreement"] >= 99.5 and abs(check["accuracy_gap"]) <= 0.1
    # They differ where an activation lands within float rounding of a half step: torch
    # multiplies by 1 / scale, onnxruntime divides, and the two may round it to neighbouring
    # integers (test_onnxruntime_quantizes_as_torch_does: single steps, a few per million).
    # Measured: 100 % agreement; no flip, 4e-7; one flip (of 2.4M activations), 0.3 % of the
    # largest logit. Allow 2 %: a few such flips, not a wrong scale or type (tens of %).
    assert check["max_logit_diff"] <= 0.02 * check["max_abs_logit"]
    assert "top-1 agreement %" in result.stdout and "passed" in result.stdout
    assert f"wrote {folder / 'model.onnx'}" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "log.txt", "model.onnx",
                                                        "summary.json"]


@pytest.fixture(scope="module")
def quantized(trained, mixed_plan):
    """The checkpoint quantized by the mixed plan, in this process: (plan, model, images)."""
    space, model, _ = load_model(str(trained[1]))
    plan = Plan.load(mixed_plan).resolved(space)
    splits = load_data(space.data, **space.data_kwargs)
    qmodel = prepare_ptq(model, plan, make_loader(splits.train, 128, shuffle=True, seed=0), 2, "minmax")
    x, _ = next(iter(make_loader(splits.test, 128, shuffle=False)))
    return space, plan, qmodel, x


def test_export_layers_compute_what_the_model_does(quantized):
    """The export-only model (custom ops) equals nas's fake-quantized model bit for bit."""
    from nas.export.to_onnx import export_model

    _, plan, qmodel, x = quantized
    with torch.no_grad():
        assert torch.equal(export_model(qmodel, plan)(x), qmodel(x))


def _run_nodes(proto: onnx.ModelProto, nodes: list, feeds: dict) -> np.ndarray:
    """Run some of the exported model's nodes (with the initializers they read) alone."""
    import onnxruntime as ort

    inits = _initializers(proto)
    names = {i for n in nodes for i in n.input if i in inits}
    graph = onnx.helper.make_graph(
        nodes, "part", [onnx.helper.make_tensor_value_info(k, TensorProto.FLOAT, None)
                        for k in feeds],
        [onnx.helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [inits[k] for k in sorted(names)])
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_onnxruntime_quantizes_as_torch_does(quantized):
    """Each layer's exported nodes in onnxruntime against torch, on the same inputs: the
    weights exactly, the activations but where a value sits within float rounding of a half
    step (torch multiplies by 1 / scale, onnxruntime divides), and those one step apart."""
    from nas.export.to_onnx import metadata, to_onnx
    from nas.quant.modules import quant_layers

    space, plan, qmodel, x = quantized
    proto = to_onnx(qmodel, plan, space, metadata(space, plan, {}))
    layers, seen = quant_layers(qmodel), {}
    hooks = [m.input_quantizer.register_forward_hook(
        lambda mod, i, out, name=name: seen.__setitem__(name, (i[0], out)))
        for name, m in layers.items()]
    with torch.no_grad():
        qmodel(x)
    for hook in hooks:
        hook.remove()
    producer = {out: node for node in proto.graph.node for out in node.output}
    flips = total = 0
    for name, layer in layers.items():
        (w_dq,) = [n for n in proto.graph.node if n.input[0] == f"{name}.weight_int"]
        with torch.no_grad():
            weight = layer.weight_quantizer(layer.weight).numpy()
        assert np.array_equal(_run_nodes(proto, [w_dq], {}), weight), name
        (a_dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[1] == f"{name}.input_scale"]
        nodes = [a_dq]
        while nodes[0].op_type != "QuantizeLinear":
            nodes.insert(0, producer[nodes[0].input[0]])
        given, want = (t.numpy() for t in seen[name])
        got = _run_nodes(proto, [onnx.helper.make_node(
            n.op_type, ["x" if i == 0 and n is nodes[0] else v for i, v in enumerate(n.input)],
            n.output, domain=n.domain) for n in nodes], {"x": given})
        steps = np.abs(got - want) / float(layer.input_quantizer.scale)
        assert np.all((steps < 1e-3) | (np.abs(steps - 1) < 1e-3)), name
        flips += int((steps > 0.5).sum())
        total += steps.size
    assert flips <= 1e-4 * total, (flips, total)  # measured: 0 to a few per million


LAYER_KEYS = ["type", "w_bits", "a_bits", "weight", "input"]
QUANT_KEYS = ["bits", "float", "symmetric", "granularity", "axis", "qmin", "qmax", "dtype"]


def test_json_and_yaml_plan_export(trained, mixed_plan, onnx_run, tmp_path):
    _, checkpoint = trained
    docs = {}
    for fmt in ("json", "yaml"):
        out = tmp_path / f"quant.{fmt}"
        assert main(["--runs-dir", str(tmp_path / "runs"), "export", "--format", fmt,
                     "--checkpoint", str(checkpoint), "--plan", str(mixed_plan), *CALIB,
                     "--output", str(out)]) == 0
        docs[fmt] = json.loads(out.read_text()) if fmt == "json" else yaml.safe_load(out.read_text())
    doc = docs["json"]
    assert docs["yaml"] == doc
    assert list(doc) == ["format", "format_version", "model", "input", "ranges", "source",
                         "layers"]
    assert (doc["format"], doc["format_version"], doc["ranges"]) == ("nas-quant-export", 1, True)
    assert doc["model"] == {"space": "synthetic_resnet8", "name": "resnet8",
                            "layer_hash": Plan.load(mixed_plan).layer_hash}
    assert doc["input"] == {"name": "input", "layout": "NCHW", "shape": [None, 1, 12, 12],
                            "dtype": "float32", "pixel_scale": 1.0, "mean": [0.0], "std": [1.0],
                            "preprocessing": "float32 images as the synthetic dataset makes "
                                             "them; no normalisation"}
    assert doc["source"] == {"plan": str(mixed_plan), "checkpoint": str(checkpoint), "run": None,
                             "calibration": "minmax", "calib_batches": 2, "seed": 0}
    assert list(doc["layers"]) == list(EXPECTED)
    conv = doc["layers"]["layer1.0.conv2"]
    assert list(conv) == LAYER_KEYS and (conv["type"], conv["w_bits"], conv["a_bits"]) == (
        "Conv2d", 2, 4)
    assert list(conv["weight"]) == QUANT_KEYS + ["scale", "zero_point"]
    assert {k: conv["weight"][k] for k in QUANT_KEYS} == {
        "bits": 2, "float": False, "symmetric": True, "granularity": "per_channel", "axis": 0,
        "qmin": -2, "qmax": 1, "dtype": "int4"}
    assert len(conv["weight"]["scale"]) == 8 and conv["weight"]["zero_point"] == [0] * 8
    assert {k: conv["input"][k] for k in QUANT_KEYS} == {
        "bits": 4, "float": False, "symmetric": False, "granularity": "per_tensor",
        "axis": None, "qmin": 0, "qmax": 15, "dtype": "uint8"}
    assert isinstance(conv["input"]["scale"], float) and 0 <= conv["input"]["zero_point"] <= 15
    tensor = doc["layers"]["layer3.0.downsample.0"]["weight"]
    assert tensor["granularity"] == "per_tensor" and isinstance(tensor["scale"], float)
    assert doc["layers"]["fc"]["type"] == "Linear"
    # The same checkpoint, plan and calibration (same seed) as the ONNX export, in another
    # process: the same weight scales as its file, and input ranges to float rounding.
    inits = _initializers(onnx.load(onnx_run[0] / "model.onnx"))
    for name, layer in doc["layers"].items():
        weight = numpy_helper.to_array(inits[f"{name}.weight_scale"])
        assert np.array_equal(np.float32(layer["weight"]["scale"]), weight), name
        assert np.allclose(layer["input"]["scale"],
                           numpy_helper.to_array(inits[f"{name}.input_scale"]), rtol=1e-6), name


def test_plan_alone_exports_settings_without_ranges(trained, mixed_plan, tmp_path, capsys):
    space_path, _ = trained
    runs = tmp_path / "runs"
    assert main(["--runs-dir", str(runs), "export", "--plan", str(mixed_plan), "--space",
                 str(space_path), "--format", "yaml"]) == 0
    (folder,) = runs.iterdir()
    doc = yaml.safe_load((folder / "quant_plan.yaml").read_text())
    assert doc["ranges"] is False and doc["source"]["checkpoint"] is None
    layer = doc["layers"]["layer2.0.downsample.0"]
    assert list(layer["weight"]) == QUANT_KEYS and list(layer["input"]) == QUANT_KEYS
    assert layer["input"] == {"bits": 4, "float": False, "symmetric": True,
                                   "granularity": "per_tensor", "axis": None, "qmin": -8,
                                   "qmax": 7, "dtype": "int8"}
    assert f"run folder: {folder}" in capsys.readouterr().out


def test_qat_run_exports(trained, mixed_plan, tmp_path, capsys):
    """`--run`: a QAT run's converted model (qat.pt as `nas qat` writes it: LSQ ranges after
    a few training steps, converted), checked the same way."""
    qat = pytest.importorskip("nas.quant.qat")
    if not hasattr(qat, "load_qat"):
        pytest.skip("nas.quant.qat has no load_qat")
    from nas.runs import save_checkpoint

    space, model, _ = load_model(str(trained[1]))
    plan = Plan.load(mixed_plan).resolved(space)
    loader = make_loader(load_data(space.data, **space.data_kwargs).train, 64, shuffle=True, seed=0)
    prepared = qat.prepare_qat(model, plan, calib_loader=loader, calib_batches=2,
                               calibration="minmax")
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _, (x, y) in zip(range(3), loader):
        loss = torch.nn.functional.cross_entropy(prepared(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path / "qat-run"
    run.mkdir()
    save_checkpoint(run / "qat.pt", qat.qat_payload(
        space, plan, qat.convert(prepared), learn="lsq", seed=0, created="now", metrics={}))
    out, runs = tmp_path / "qat.onnx", tmp_path / "runs"
    assert main(["--runs-dir", str(runs), "export", "--run", str(run), "--output",
                 str(out)]) == 0
    (export_run,) = runs.iterdir()
    check = json.loads((export_run / "summary.json").read_text())["check"]
    assert check["passed"], check
    assert check["max_logit_diff"] <= 0.02 * check["max_abs_logit"]  # as for --checkpoint
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props["source"])["run"] == str(run)
    assert f"wrote {out}" in capsys.readouterr().out


def _bad(tmp_path, capsys, *args) -> str:
    runs = tmp_path / "runs"
    try:
        code = main(["--runs-dir", str(runs), "export", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("nas: error: ") and len(err.splitlines()) == 1, err
    assert not runs.exists()
    return err.strip()


def test_bad_input_is_one_line_and_leaves_nothing(trained, mixed_plan, tmp_path, capsys):
    space_path, checkpoint = trained
    other = Plan.uniform(load_space("fmnist_resnet8"), 8, 8).save(tmp_path / "other.yaml")
    (tmp_path / "dir").mkdir()
    (tmp_path / "norun").mkdir()
    ck, plan = ["--checkpoint", str(checkpoint)], ["--plan", str(mixed_plan)]
    assert _bad(tmp_path, capsys, *ck, "--plan", str(other)) == (
        "nas: error: plan is for space fmnist_resnet8, not synthetic_resnet8; give --space "
        "fmnist_resnet8, or a plan made for synthetic_resnet8")
    assert _bad(tmp_path, capsys, *ck, "--plan", str(other), "--space", "fmnist_resnet8") == (
        f"nas: error: checkpoint {checkpoint} was trained for space synthetic_resnet8 (resnet8 "
        f"{{'width': 8}}), but space fmnist_resnet8 uses resnet8; leave --space out to use "
        f"synthetic_resnet8, or give a space of the same model")
    assert "argument --format: invalid choice: 'tflite'" in _bad(
        tmp_path, capsys, *ck, *plan, "--format", "tflite")
    assert _bad(tmp_path, capsys, *ck, *plan, "--output", str(tmp_path / "dir")) == (
        f"nas: error: --output {tmp_path / 'dir'} is a directory; give a file path, such as "
        f"{tmp_path / 'dir' / 'model.onnx'}")
    assert _bad(tmp_path, capsys, "--run", str(tmp_path / "norun")) == (
        f"nas: error: --run {tmp_path / 'norun'} has no qat.pt; give the folder of a 'nas qat' "
        f"run, which holds qat.pt")
    assert _bad(tmp_path, capsys, "--run", str(tmp_path / "none")) == (
        f"nas: error: --run {tmp_path / 'none'} is not a folder; give the folder of a 'nas "
        f"qat' run, which holds qat.pt")
    assert _bad(tmp_path, capsys, "--run", str(tmp_path / "norun"), *plan) == (
        "nas: error: --run takes the plan and space of its QAT run; leave --plan out")
    assert "argument --run: not allowed with argument --checkpoint" in _bad(
        tmp_path, capsys, *ck, "--run", str(tmp_path / "norun"))
    assert _bad(tmp_path, capsys, *ck) == (
        "nas: error: --checkpoint needs --plan, the plan to quantize it by")
    assert _bad(tmp_path, capsys, *plan) == (
        "nas: error: --format onnx needs a model: give --checkpoint (with --plan) or --run; a "
        "plan alone exports as --format json or yaml")
    assert _bad(tmp_path, capsys, *plan, "--format", "json") == (
        f"nas: error: plan {mixed_plan} is for space synthetic_resnet8, which is not a shipped "
        f"space; give its YAML file with --space PATH")
    assert _bad(tmp_path, capsys) == (
        "nas: error: give --checkpoint and --plan, or --run, or (for --format json or yaml) "
        "--plan alone")
    assert _bad(tmp_path, capsys, *ck, *plan, "--calib-batches", "0") == (
        "nas: error: --calib-batches 0: must be a positive whole number")
