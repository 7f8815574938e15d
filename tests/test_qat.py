"""QAT: prepare_qat / convert on a small model, plans as dicts, and `nas qat` end to end."""

import json

import pytest
import torch
from torch import nn

import nas
from nas.cli import main
from nas.data import load_data, make_loader
from nas.errors import ConfigError
from nas.plan import Plan
from nas.quant.bn_fold import ConvBn2d
from nas.quant.fake import qparams
from nas.quant.modules import QuantConv2d, QuantLinear
from nas.quant.ptq import prepare_ptq
from nas.quant.qat import as_plan, converted_structure, load_qat
from nas.spaces import load_space
from nas.train import evaluate


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


def _small(seed=0):
    torch.manual_seed(seed)
    model = Small()
    with torch.no_grad():  # BN statistics and affine terms far from the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _batches(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen))
            for _ in range(n)]


def _train(model, batches, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in batches[:steps]:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


PLAN = {"conv": (4, 4), "fc": "W4A8"}


def test_prepare_qat_folds_bn_calibrates_and_learns_steps():
    model, batches = _small(), _batches()
    q = nas.prepare_qat(model, PLAN, calib_loader=batches, calib_batches=2, calibration="minmax")
    assert isinstance(q.conv, ConvBn2d) and isinstance(q.bn, nn.Identity)
    assert isinstance(q.fc, QuantLinear) and q.training
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.conv, nn.Conv2d)  # untouched
    # The conv's input is the image: its calibrated range is min-max over the two batches.
    x = torch.cat([b[0] for b in batches[:2]])
    scale, zp = qparams(x.min(), x.max(), 4, symmetric=False)
    iq = q.conv.input_quantizer
    assert iq.learn == "lsq" and torch.equal(iq.scale, scale) and torch.equal(iq.zero_point, zp)
    assert torch.equal(iq.step.detach(), scale)  # LSQ's step starts at the calibrated scale
    wq = q.conv.weight_quantizer
    assert wq.step.shape == (6,) and wq.bits == 4  # per channel, of the folded weight
    folded = q.conv.to_folded().weight
    amax = folded.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(wq.step.detach(), amax / 7.5, rtol=1e-6, atol=0)
    before = {n: p.detach().clone() for n, p in q.named_parameters() if n.endswith(".step")}
    assert len(before) == 4
    _train(q, batches)
    for name, value in before.items():
        assert not torch.equal(q.get_parameter(name).detach(), value), name


@pytest.mark.parametrize("learn", ["lsq", "pact", None])
def test_convert_equals_prepared_eval_and_has_the_ptq_form(learn):
    model, batches = _small(), _batches()
    q = nas.prepare_qat(model, PLAN, calib_loader=batches, calib_batches=2, learn=learn)
    if learn == "pact":  # PACT clips to [0, alpha]: the signed image keeps an LSQ step
        assert (q.conv.input_quantizer.learn, q.fc.input_quantizer.learn) == ("lsq", "pact")
    _train(q, batches)  # BN statistics live: running statistics move, steps / clips learn
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = q.eval()(x)
    c = nas.convert(q)
    assert q.training is False and isinstance(q.conv, ConvBn2d)  # the prepared model is kept
    with torch.no_grad():
        out = c(x)
    # In eval a learned range computes with the fixed scale convert() gives it, and the folded
    # bias is added inside the conv: the converted model is the prepared one bit for bit.
    assert torch.equal(out, ref)
    assert not c.training
    assert not any(isinstance(m, (nn.BatchNorm2d, ConvBn2d)) for m in c.modules())
    assert type(c.conv) is QuantConv2d and type(c.fc) is QuantLinear
    for layer in (c.conv, c.fc):
        for fq in (layer.weight_quantizer, layer.input_quantizer):
            assert fq.learn is None and fq.step is None and fq.alpha is None
            assert bool(fq.initialized)
    assert c.conv.weight_quantizer.scale.shape == (6,)
    assert torch.equal(c.conv.weight, q.conv.to_folded().weight)
    assert torch.equal(c.conv.bias, q.conv.to_folded().bias)
    # prepare_ptq's structure (what load_qat rebuilds and export reads): same modules, keys
    ptq = prepare_ptq(model, as_plan(PLAN), batches, 1, "minmax")
    assert [(n, type(m)) for n, m in c.named_modules()] == \
           [(n, type(m)) for n, m in ptq.named_modules()]
    assert c.state_dict().keys() == ptq.state_dict().keys()
    rebuilt = converted_structure(_small(seed=3), PLAN)
    rebuilt.load_state_dict(c.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


@pytest.mark.parametrize("learn", ["lsq", "pact", None])
def test_prepared_model_starts_as_the_ptq_model(learn):
    """Before any training step the prepared model (eval) is prepare_ptq's, bit for bit: the
    same folded weights, the same calibrated ranges, the same arithmetic."""
    model, batches = _small(3), _batches(seed=4)
    plan = {"conv": (4, 4), "fc": "W4A4"} if learn == "pact" else PLAN
    q = nas.prepare_qat(model, plan, calib_loader=batches, calib_batches=3, learn=learn,
                        calibration="mse").eval()
    ptq = prepare_ptq(model, as_plan(plan), batches, 3, "mse")
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(q(x), ptq(x))


def test_convert_needs_ranges():
    q = nas.prepare_qat(_small(), PLAN)  # no calibration, no batch seen
    with pytest.raises(ConfigError, match="the input quantizer of layer 'conv' has no range yet"):
        nas.convert(q)


def test_quantize_model_takes_dicts_and_plans():
    model = _small()
    for plan in ({"conv": (4, 8)}, {"conv": "W4A8"}, {"conv": "w4a8"},
                 {"conv": {"w_bits": 4, "a_bits": 8}}):
        q = nas.quantize_model(model, plan)
        assert isinstance(q.conv, QuantConv2d) and isinstance(q.fc, nn.Linear)
        assert (q.conv.weight_quantizer.bits, q.conv.input_quantizer.bits) == (4, 8)
        assert q.conv.weight_quantizer.axis == 0 and q.conv.input_quantizer.symmetric is False
    space = load_space("fmnist_resnet8")
    q = nas.quantize_model(space.build_model(), Plan.uniform(space, 4, 8).resolved(space))
    assert isinstance(q.layer1[0].conv1, QuantConv2d)
    assert nas.fold_bn is nas.quant.bn_fold.fold_bn and nas.calibrate is nas.quant.qat.calibrate
    with pytest.raises(ConfigError) as err:
        nas.quantize_model(model, {"conv": (4, 9)})
    assert str(err.value) == ("plan layer 'conv': (4, 9) is not a precision; give (w_bits, "
                              "a_bits) or 'W<bits>A<bits>' with bits 2-8, 16 or 32, such as "
                              "(4, 8) or 'W4A8'")
    with pytest.raises(ConfigError, match=r"plan must be a nas.Plan or a dict"):
        nas.prepare_qat(model, [("conv", 4, 8)])
    with pytest.raises(ConfigError, match=r"plan layer 'bn': BatchNorm2d, expected Conv2d"):
        nas.prepare_qat(model, {"bn": (4, 8)})


# ---------------------------------------------------------------- nas qat


def _nas(capsys, *args):
    code = main(["--device", "cpu", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_qat_from_a_checkpoint_end_to_end(trained, tmp_path, capsys):
    space_path, checkpoint = trained
    space = load_space(space_path)
    plan_path = Plan.uniform(space, 4, 4).resolved(space).save(tmp_path / "plan.yaml")
    runs = tmp_path / "runs"
    code, out, err = _nas(capsys, "--runs-dir", str(runs), "qat", "--plan", str(plan_path),
                          "--checkpoint", str(checkpoint), "--budget", "1ep", "--no-progress")
    assert code == 0, err
    (folder,) = runs.iterdir()
    assert {"config.yaml", "log.txt", "metrics.jsonl", "summary.json", "qat.pt",
            "plan.yaml"} <= {p.name for p in folder.iterdir()}
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("float_accuracy", "ptq_accuracy", "qat_start_accuracy", "qat_accuracy",
                "size_bytes", "bitops", "latency_us", "latency", "latency_device"):
        assert summary[key] is not None, key
    assert summary["source"] == "checkpoint" and summary["latency"] in ("measured", "estimated")
    assert summary["size_bytes"] < summary["fp32_size_bytes"] / 6
    # The start is the PTQ model: the same calibration on the same batches, and in eval a
    # learned range computes with its fixed scale, the folded bias inside the conv.
    assert summary["qat_start_accuracy"] == summary["ptq_accuracy"]
    assert Plan.load(folder / "plan.yaml").costs["qat_test_accuracy"] == summary["qat_accuracy"]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[-1]["step"] == summary["steps"] > 0
    # qat.pt rebuilds the converted model, with the summary's test accuracy.
    loaded_space, plan, model = load_qat(folder / "qat.pt")
    assert loaded_space.name == space.name and plan.layers == Plan.load(plan_path).layers
    assert isinstance(model.layer1[0].conv1, QuantConv2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    splits = load_data(loaded_space.data, seed=0, **loaded_space.data_kwargs)
    acc = evaluate(model, make_loader(splits.test, 512, shuffle=False), torch.device("cpu"))
    assert acc["accuracy"] == summary["qat_accuracy"]
    payload = torch.load(folder / "qat.pt", weights_only=True)
    assert payload["format"] == "nas-qat/1" and payload["kind"] == "qat"
    assert payload["learn"] == "lsq"
    assert payload["metrics"]["qat_accuracy"] == summary["qat_accuracy"]
    assert "QAT test accuracy" in out and f"run folder: {folder}" in out


def test_qat_without_weights_trains_the_float_model_first(trained, tmp_path, capsys):
    space_path, _ = trained
    space = load_space(space_path)
    plan_path = Plan.uniform(space, 8, 8).resolved(space).save(tmp_path / "plan.yaml")
    runs = tmp_path / "runs"
    code, _, err = _nas(capsys, "--runs-dir", str(runs), "qat", "--plan", str(plan_path),
                        "--space", str(space_path), "--budget", "2ep", "--learn", "none",
                        "--eval-every", "3", "--no-progress")
    assert code == 0, err
    (folder,) = runs.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["source"] == "trained"
    assert (summary["float_budget"], summary["budget"]) == ("1 epoch", "1 epoch")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records]
    assert phases[0] == "float" and phases[-1] == "qat" and phases.count("float") == 1
    steps = [r["step"] for r in records if r["phase"] == "qat"]
    assert steps[0] == 0 and all(s % 3 == 0 for s in steps[1:-1])
    _, _, model = load_qat(folder / "qat.pt")
    assert model.conv1.input_quantizer.bits == 8


def test_qat_from_a_search_run_starts_at_its_one_shot_accuracy(supernet_run, tmp_path, capsys):
    _, run = supernet_run
    one_shot = Plan.load(run / "plan.yaml").costs["one_shot_test_accuracy"]
    runs = tmp_path / "runs"
    code, out, err = _nas(capsys, "--runs-dir", str(runs), "qat", "--run", str(run),
                          "--budget", "1ep", "--learn", "pact", "--distill", "--no-progress")
    assert code == 0, err
    (folder,) = runs.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["source"] == "run" and summary["one_shot_test_accuracy"] == one_shot
    # The same quantized network as the one-shot evaluation (BN statistics re-estimated on
    # the same 4 batches, the supernet's input ranges); only the folded weight's float
    # rounding differs.
    assert abs(summary["qat_start_accuracy"] - one_shot) <= 0.3
    _, _, model = load_qat(folder / "qat.pt")
    assert isinstance(model.conv1, QuantConv2d)


@pytest.mark.parametrize("case, message", [
    ("other space", "plan is for space fmnist_resnet8, not synthetic_resnet8; give --space "
                    "fmnist_resnet8, or a plan made for synthetic_resnet8"),
    ("checkpoint misfit", "was trained for space synthetic_resnet8 (resnet8 {'width': 8}), but "
                          "space fmnist_resnet8 uses resnet8"),
    ("no supernet", "holds no supernet.pt; pass the run folder of an earlier 'nas search'"),
    ("no plan", "holds no plan.yaml; pass the folder of a finished 'nas search' run, or give "
                "the plan with --plan"),
    ("run and checkpoint", "--checkpoint does not apply to --run"),
    ("neither", "give --plan PLAN (with --checkpoint FP, or alone to train the float model "
                "first) or --run SEARCH_RUN"),
    ("bad budget", "budget '0m' must be positive"),
    ("bad freeze", "--freeze-bn 1.0: must be at least 0 and below 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, supernet_run, tmp_path, capsys,
                                                   case, message):
    _, checkpoint = trained
    _, run = supernet_run
    fmnist = load_space("fmnist_resnet8")
    other = Plan.uniform(fmnist, 4, 8).save(tmp_path / "other.yaml")
    mine = run / "plan.yaml"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_plan = tmp_path / "no_plan"
    no_plan.mkdir()
    (no_plan / "supernet.pt").write_bytes((run / "supernet.pt").read_bytes())
    args = {
        "other space": ["--plan", str(other), "--checkpoint", str(checkpoint)],
        "checkpoint misfit": ["--plan", str(other), "--checkpoint", str(checkpoint),
                              "--space", "fmnist_resnet8"],
        "no supernet": ["--run", str(empty)],
        "no plan": ["--run", str(no_plan)],
        "run and checkpoint": ["--run", str(run), "--checkpoint", str(checkpoint)],
        "neither": ["--checkpoint", str(checkpoint)],
        "bad budget": ["--plan", str(mine), "--checkpoint", str(checkpoint), "--budget", "0m"],
        "bad freeze": ["--run", str(run), "--freeze-bn", "1.0"],
    }[case]
    runs = tmp_path / "runs"
    code, _, err = _nas(capsys, "--runs-dir", str(runs), "qat", *args)
    assert code == 2 and err.startswith("nas: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not runs.exists()
