import copy
import fnmatch

import pytest
import yaml

from nas.errors import ConfigError
from nas.spaces import DEFAULT_SPACE, Choice, SearchSpace, list_spaces, load_space
from tests.conftest import SYNTHETIC_SPACE

SHIPPED = ["cifar10_resnet20", "fmnist_mobilenetv2", "fmnist_resnet8", "imagenet_mobilenetv2",
           "imagenet_resnet18"]


def test_shipped_spaces():
    assert list_spaces() == SHIPPED and DEFAULT_SPACE in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_resolves_with_fixed_ends(name):
    space = load_space(name)
    layers = space.layers()
    assert layers[0].fixed and layers[-1].fixed
    assert layers[0].choices == (Choice(8, 8),)
    assert all(len(layer.choices) == 6 for layer in layers[1:-1])
    assert space == SearchSpace.from_dict(space.to_dict())


def test_default_space_geometry_is_exact():
    layers = {layer.name: layer.info for layer in load_space(DEFAULT_SPACE).layers()}
    conv = layers["layer2.0.conv1"]
    assert (conv.in_channels, conv.out_channels, conv.kernel, conv.stride) == (16, 32, (3, 3), (2, 2))
    assert conv.in_hw == (28, 28) and conv.out_hw == (14, 14)
    assert conv.params == 16 * 32 * 9 and conv.macs == 14 * 14 * 32 * 16 * 9
    assert layers["fc"].macs == 64 * 10 and layers["fc"].params == 650


def test_depthwise_geometry():
    layers = {layer.name: layer.info for layer in load_space("fmnist_mobilenetv2").layers()}
    dw = layers["features.1.conv.0.0"]
    assert dw.groups == dw.in_channels == dw.out_channels == 16
    assert dw.macs == 14 * 14 * 16 * 9  # after the stride-2 stem


def test_resnet18_first_layer_at_224():
    conv1 = load_space("imagenet_resnet18").layers()[0].info
    assert conv1.kernel == (7, 7) and conv1.out_hw == (112, 112)
    assert conv1.macs == 112 * 112 * 64 * 3 * 49


def _space(changes):
    raw = yaml.safe_load(open("search_spaces/fmnist_resnet8.yaml"))
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"model": {"name": "resnet9"}}, "model.name: unknown model 'resnet9'"),
    ({"choices": {"w_bits": [4, 9]}}, "choices.w_bits: 9 is not an allowed bit width"),
    ({"choices": {"a_bits": []}}, "choices.a_bits: \\[\\] must be a non-empty list"),
    ({"choices": {"x_bits": [4]}}, "choices.x_bits: unknown key"),
    ({"fixed": {"conv1": {"w_bits": 1, "a_bits": 8}}}, "fixed.conv1.w_bits: 1 is not an allowed"),
    ({"fixed": {"conv1": {"w_bits": 8}}}, "fixed.conv1: .* must be"),
    ({"quantizer": {"w_granularity": "per_row"}}, "quantizer.w_granularity: 'per_row'"),
    ({"data": {"name": "mnist"}}, "data.name: unknown dataset 'mnist'"),
    ({"train": {"epochs": 3}}, "train.epochs: unknown key"),
])
def test_schema_errors_name_key_and_value(changes, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(_space(changes))


def test_glob_matching_no_layer():
    space = SearchSpace.from_dict(_space({"searchable": ["layer1.*", "layer9.*"]}))
    with pytest.raises(ConfigError, match=r"searchable\[1\] 'layer9.\*' matches no Conv2d"):
        space.layers()
    space = SearchSpace.from_dict(_space({"fixed": {"head": {"w_bits": 8, "a_bits": 8}}}))
    with pytest.raises(ConfigError, match="fixed.head matches no Conv2d"):
        space.layers()


def test_searchable_globs_select_layers():
    space = SearchSpace.from_dict(_space({"searchable": ["layer3.*"], "fixed": {}}))
    assert [layer.name for layer in space.layers()] == [
        "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0"]
    # The layers no glob names stay float, outside the space (tests/test_unquantized_layers.py).
    assert len(space.unnamed_layers()) == 7


def test_shipped_spaces_name_every_layer():
    """No shipped space leaves a layer to the implicit float default: their costs are as
    their globs say."""
    for name in SHIPPED:
        space = load_space(name)
        assert space.unnamed_layers() == [], name
        for layer in space.layers():
            assert layer.fixed == any(fnmatch.fnmatchcase(layer.name, g)
                                      for g in space.fixed), layer.name


def test_bad_yaml_and_unknown_space(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_space(bad)
    with pytest.raises(ConfigError, match="unknown search space 'nope'; choose one of"):
        load_space("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_geometry_cache_roundtrip(tmp_path, monkeypatch):
    import json

    import nas.spaces

    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    computed = load_space("cifar10_resnet20").layers()
    (cached_file,) = (tmp_path / "geometry").iterdir()
    assert cached_file.name.startswith("resnet20-")
    written = json.loads(cached_file.read_text())
    assert [row["name"] for row in written] == list(load_space("cifar10_resnet20").geometry())

    # A second load reads the file: with the geometry computation broken it still works.
    def no_computing(*args, **kwargs):
        raise AssertionError("geometry recomputed instead of read from the cache")

    with monkeypatch.context() as m:
        m.setattr(nas.spaces, "layer_geometry", no_computing)
        m.setattr(SearchSpace, "build_model", no_computing)
        assert load_space("cifar10_resnet20").layers() == computed
        cached_file.write_text("{broken")
        with pytest.raises(AssertionError, match="recomputed"):  # damaged: not trusted
            load_space("cifar10_resnet20").layers()
    # A damaged entry is recomputed and rewritten as valid JSON, equal to the first.
    assert load_space("cifar10_resnet20").layers() == computed
    assert json.loads(cached_file.read_text()) == written


def test_user_models_are_not_cached(tmp_path, monkeypatch):
    (tmp_path / "usermodel.py").write_text(
        "from torch import nn\n"
        "def net(num_classes=10, in_channels=1):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(),\n"
        "                         nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))
    space = SearchSpace.from_dict(_space({"model": {"name": "usermodel:net"}, "fixed": {}}))
    assert [layer.name for layer in space.layers()] == ["0", "2"]
    assert not (tmp_path / "cache").exists()


def test_random_plans_uniform_and_mixed():
    import random
    import statistics

    from nas.cost import make_cost_model
    from nas.plan import LayerPrecision
    from nas.spaces import random_plans

    space = load_space("imagenet_resnet18")
    layers = space.layers()
    # uniform: each layer with equal odds, the draw `nas measure --validate` always made
    rng = random.Random(7)
    assert random_plans(space, 5, 7) == [{layer.name: rng.choice(layer.choices)
                                          for layer in layers} for _ in range(5)]
    mixed = random_plans(space, 200, 7, "mixed")
    assert mixed == random_plans(space, 200, 7, "mixed")  # reproducible from the seed
    for plan in mixed:
        assert list(plan) == [layer.name for layer in layers]
        assert all(plan[layer.name] in layer.choices for layer in layers)
    # Mixed plans lean on a few precisions each, so their totals spread far more widely: the
    # size of 200 plans (exact arithmetic; the seed fixes the draws).
    size = make_cost_model("size")
    infos = {layer.name: layer.info for layer in layers}

    def spread(plans):
        totals = [sum(size.layer_cost(infos[n], LayerPrecision(c.w_bits, c.a_bits))
                      for n, c in plan.items()) for plan in plans]
        return statistics.pstdev(totals) / statistics.fmean(totals)

    assert spread(mixed) > 2 * spread(random_plans(space, 200, 7))
    with pytest.raises(ConfigError, match="plan mix 'wild': choose one of uniform, mixed"):
        random_plans(space, 1, 0, "wild")


def _synthetic(data=None, model=None, train=None, dataset="synthetic"):
    raw = copy.deepcopy(SYNTHETIC_SPACE)
    if dataset != "synthetic":
        raw["data"] = {"name": dataset, "kwargs": {}}
    raw["data"]["kwargs"].update(data or {})
    raw["model"]["kwargs"].update(model or {})
    raw["train"].update(train or {})
    return raw


_HOLD_OUT = (" (arch_fraction 0.2 holds out at least one image for the arch split and one must "
             "be left to train on)")


@pytest.mark.parametrize("changes, message", [
    ({"data": {"train_size": 0}}, "data.kwargs.train_size: 0 must be a whole number of at least 2"
                                  + _HOLD_OUT),
    ({"data": {"train_size": 1}}, "data.kwargs.train_size: 1 must be a whole number of at least 2"
                                  + _HOLD_OUT),
    ({"data": {"train_size": -5}}, "data.kwargs.train_size: -5 must be a whole number of at "
                                   "least 2" + _HOLD_OUT),
    ({"data": {"train_size": 1.5}}, "data.kwargs.train_size: 1.5 must be a whole number of at "
                                    "least 2" + _HOLD_OUT),
    # At arch_fraction 0.9 four images would all go to the arch split.
    ({"data": {"train_size": 4, "arch_fraction": 0.9}},
     "data.kwargs.train_size: 4 must be a whole number of at least 5 (arch_fraction 0.9 holds "
     "out at least one image for the arch split and one must be left to train on)"),
    ({"data": {"test_size": 0}}, "data.kwargs.test_size: 0 must be a whole number of at least 1 "
                                 "(accuracy on no test images means nothing)"),
    ({"data": {"num_classes": 0}}, "data.kwargs.num_classes: 0 must be a whole number of at "
                                   "least 2 (a classifier needs two classes)"),
    ({"data": {"in_channels": 0}}, "data.kwargs.in_channels: 0 must be a whole number of at "
                                   "least 1"),
    ({"data": {"image_size": 0}}, "data.kwargs.image_size: 0 must be a whole number of at least 1"),
    ({"data": {"image_size": -5}}, "data.kwargs.image_size: -5 must be a whole number of at "
                                   "least 1"),
    ({"data": {"image_size": "abc"}}, "data.kwargs.image_size: 'abc' must be a whole number of "
                                      "at least 1"),
    ({"data": {"noise": -1}}, "data.kwargs.noise: -1 must be a number of at least 0"),
    ({"data": {"image_size": 0}, "dataset": "imagefolder"},
     "data.kwargs.image_size: 0 must be a whole number of at least 1"),
    ({"data": {"image_size": "abc"}, "dataset": "imagefolder"},
     "data.kwargs.image_size: 'abc' must be a whole number of at least 1"),
    ({"data": {"augment": "maybe"}, "dataset": "cifar10"},
     "data.kwargs.augment: 'maybe' must be true or false"),
    ({"model": {"width": 0}}, "model.kwargs.width: 0 must be a whole number of at least 1"),
    ({"model": {"width": -1}}, "model.kwargs.width: -1 must be a whole number of at least 1"),
    ({"model": {"depth": 9}}, "model.kwargs.depth: unknown option for resnet8; allowed: "
                              "in_channels, num_classes, width"),
    ({"train": {"batch_size": "x"}}, "train.batch_size: 'x' must be a positive whole number"),
    ({"train": {"batch_size": 0}}, "train.batch_size: 0 must be a positive whole number"),
    ({"train": {"lr": "fast"}}, "train.lr: 'fast' must be a number above 0"),
    ({"train": {"lr": 0}}, "train.lr: 0 must be a number above 0"),
    ({"train": {"weight_decay": -1}}, "train.weight_decay: -1 must be a number of at least 0"),
    ({"train": {"budget": "soon"}}, "train.budget: budget 'soon' is not understood; use '90s', "
                                    "'5m', '2h' (time) or '3ep' / '3 epochs' (epochs)"),
])
def test_out_of_range_options_are_refused_at_load(changes, message):
    with pytest.raises(ConfigError) as err:
        SearchSpace.from_dict(_synthetic(**changes), source="search space s.yaml")
    assert str(err.value) == f"search space s.yaml: {message}"


def test_train_numbers_written_without_a_dot_are_numbers():
    # PyYAML reads 1e-3 as a string; the space keeps it as the number it means.
    space = SearchSpace.from_dict(yaml.safe_load(
        yaml.safe_dump(_synthetic()).replace("lr: 0.05", "lr: 1e-3")))
    assert space.train["lr"] == 0.001 and space.train["weight_decay"] == 5e-4


def test_unreadable_space_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as err:
        load_space(bad)
    assert str(err.value) == (f"search space {bad} is not UTF-8 text (byte 0); save it as a "
                              f"UTF-8 YAML file")
    folder = tmp_path / "x.yaml"
    folder.mkdir()
    for given in (folder, tmp_path):  # named like a file, or not
        with pytest.raises(ConfigError) as err:
            load_space(given)
        assert str(err.value) == (f"search space {given} is a directory; give a search space "
                                  f".yaml file or a shipped space's name (see 'nas spaces')")


def test_a_glob_that_matches_no_layer_is_refused_with_the_layers(space_file):
    # The layers are in the message: the space cannot be shown to list them while it fails.
    path = space_file({"searchable": ["head.*"]}, name="my space.yaml")
    with pytest.raises(ConfigError) as err:
        load_space(path).layers()
    assert str(err.value) == (
        "space synthetic_resnet8: searchable[0] 'head.*' matches no Conv2d or Linear layer of "
        "resnet8; its 10 layers: conv1, layer1.0.conv1, layer1.0.conv2, layer2.0.conv1, "
        "layer2.0.conv2, layer2.0.downsample.0, layer3.0.conv1, layer3.0.conv2, "
        "layer3.0.downsample.0, fc")
    with pytest.raises(ConfigError, match="fixed.head matches no Conv2d or Linear layer of "
                                          "resnet8; its 10 layers: conv1, "):
        SearchSpace.from_dict(_space({"fixed": {"head": {"w_bits": 8, "a_bits": 8}}})).layers()


def test_cli_refuses_bad_space_in_one_line(cli, space_file, tmp_path):
    """`spaces show` and `train` refuse at load: exit 2, one line, no run folder (an empty
    train split used to spin through epochs forever)."""
    path = space_file({"data": {"name": "synthetic", "kwargs": {"train_size": 1}}})
    runs = tmp_path / "runs"
    for args in (["spaces", "show", str(path)],
                 ["train", "--space", str(path), "--budget", "1ep", "--no-progress"]):
        result = cli("--runs-dir", str(runs), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr == (f"nas: error: search space {path}: data.kwargs.train_size: 1 "
                                 f"must be a whole number of at least 2{_HOLD_OUT}\n")
    assert not runs.exists() or not any(runs.iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    result = cli("--runs-dir", str(runs), "train", "--space", str(bad))
    assert (result.returncode, result.stderr) == (2, f"nas: error: search space {bad} is not "
                                                     f"UTF-8 text (byte 0); save it as a UTF-8 "
                                                     f"YAML file\n")
    assert not runs.exists() or not any(runs.iterdir())


def test_every_command_refuses_a_glob_that_matches_no_layer(cli, space_file, tmp_path):
    """Before any output or training: `train` used to train on such a space for its whole
    budget, and `spaces show` printed its header first."""
    path = space_file({"fixed": {"nolayer": {"w_bits": 8, "a_bits": 8}}})
    runs = tmp_path / "runs"
    for args in (["spaces", "show", str(path)], ["cost", "--space", str(path), "--uniform", "W8A8"],
                 ["train", "--space", str(path), "--budget", "1ep", "--no-progress"]):
        result = cli("--runs-dir", str(runs), *args)
        assert (result.returncode, result.stdout) == (2, ""), args
        assert result.stderr.startswith("nas: error: space synthetic_resnet8: fixed.nolayer "
                                        "matches no Conv2d or Linear layer of resnet8; its 10 "
                                        "layers: conv1, "), args
        assert len(result.stderr.splitlines()) == 1
    assert not runs.exists() or not any(runs.iterdir())


def test_layer_geometry_leaves_each_module_in_its_mode():
    import torch

    from nas.spaces import layer_geometry

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).train()
    net[1].eval()  # a frozen BatchNorm inside a model in training
    layer_geometry(net, (1, 1, 5, 5))
    assert [m.training for m in net.modules()] == [True, True, False]


def _pairs_space(choices):
    return SearchSpace.from_dict({**copy.deepcopy(SYNTHETIC_SPACE), "choices": choices},
                                 source="search space s.yaml")


def test_choices_as_a_list_of_pairs():
    # Only the pairs listed (HAQ, DNAS), in the cross product's order; case is free on input.
    space = _pairs_space(["W8A8", "w4a8", "W4a4", " W2A8 "])
    assert space.choices == (Choice(2, 8), Choice(4, 4), Choice(4, 8), Choice(8, 8))
    assert (space.w_bits, space.a_bits) == ((2, 4, 8), (4, 8))
    assert all(layer.choices == space.choices for layer in space.layers() if not layer.fixed)
    mappings = _pairs_space([{"w_bits": 8, "a_bits": 8}, {"w_bits": 4, "a_bits": 8}, "W4A4"])
    assert mappings.choices == (Choice(4, 4), Choice(4, 8), Choice(8, 8))
    assert mappings == _pairs_space(["W4A4", "W4A8", "W8A8"])
    # The mapping form stays the cross product, and unequal to the same pairs listed.
    product = _pairs_space({"w_bits": [4, 8], "a_bits": [4, 8]})
    assert product.pairs is None and product != _pairs_space(["W4A4", "W4A8", "W8A4", "W8A8"])
    assert product.choices == _pairs_space(["W4A4", "W4A8", "W8A4", "W8A8"]).choices


def test_pairs_round_trip_through_to_dict(tmp_path):
    space = _pairs_space(["W8A8", "w4a8", "W4A4"])
    assert space.to_dict()["choices"] == ["W4A4", "W4A8", "W8A8"]
    assert SearchSpace.from_dict(space.to_dict()) == space
    # As a run folder saves it: through YAML and back.
    assert SearchSpace.from_dict(yaml.safe_load(yaml.safe_dump(space.to_dict()))) == space
    product = _pairs_space({"w_bits": [4, 8], "a_bits": [8]})
    assert product.to_dict()["choices"] == {"w_bits": [4, 8], "a_bits": [8]}
    assert SearchSpace.from_dict(product.to_dict()) == product


_PRECISION = "write W<bits>A<bits> with bits 2-8, 16 or 32, for example W4A8"


@pytest.mark.parametrize("choices, message", [
    (["W8A8", "W8-A4"], f"choices[1]: 'W8-A4' is not a precision; {_PRECISION}"),
    (["W8A8", "W9A8"], f"choices[1]: 'W9A8' is not a precision; {_PRECISION}"),
    (["W1A8"], f"choices[0]: 'W1A8' is not a precision; {_PRECISION}"),
    (["W8A8", 8], f"choices[1]: 8 is not a precision; {_PRECISION}"),
    (["W8A8", ["W4", "A8"]], f"choices[1]: ['W4', 'A8'] is not a precision; {_PRECISION}"),
    ([{"w_bits": 9, "a_bits": 8}], "choices[0].w_bits: 9 is not an allowed bit width; allowed: "
                                   "2-8, or 16 / 32 for float"),
    ([{"w_bits": 4}], f"choices[0]: {{'w_bits': 4}} must be {{w_bits: N, a_bits: N}}; or "
                      f"{_PRECISION}"),
    (["W4A8", "W8A8", "w4a8"], "choices[2]: 'w4a8' repeats W4A8 (choices[0]); list each "
                               "precision once"),
    (["W4A8", {"w_bits": 4, "a_bits": 8}], "choices[1]: {'w_bits': 4, 'a_bits': 8} repeats W4A8 "
                                           "(choices[0]); list each precision once"),
    ([], "choices: [] lists no precision; give at least one, for example [W8A8, W4A8], or "
         "{w_bits: [...], a_bits: [...]}"),
    ("W8A8", "choices: 'W8A8' must be a list of precisions such as [W8A8, W4A8] or a mapping "
             "{w_bits: [...], a_bits: [...]}"),
])
def test_bad_choice_lists_are_refused_in_one_line(choices, message):
    with pytest.raises(ConfigError) as err:
        _pairs_space(choices)
    assert str(err.value) == f"search space s.yaml: {message}"


def test_a_pairs_space_costs_and_plans_only_its_pairs():
    from nas.cost import make_cost_model
    from nas.plan import Plan

    space = _pairs_space(["W8A8", "W4A8", "W2A8", "W4A4"])
    pairs = (Choice(2, 8), Choice(4, 4), Choice(4, 8), Choice(8, 8))
    table = make_cost_model("size").table(space)
    assert dict(zip(table.layers, table.choices)) == {
        name: (Choice(8, 8),) if name in ("conv1", "fc") else pairs for name in table.layers}
    assert [len(row) for row in table.values] == [1] + [4] * 8 + [1]
    assert Plan.uniform(space, 4, 4).resolved(space).layers["layer1.0.conv1"].w_bits == 4
    # W2A4 is in w_bits x a_bits, not among the pairs.
    with pytest.raises(ConfigError) as err:
        Plan.uniform(space, 2, 4).resolved(space)
    assert str(err.value) == ("plan layer 'layer1.0.conv1': W2A4 is outside space "
                              "synthetic_resnet8; allowed: W2A8, W4A4, W4A8, W8A8")


def test_spaces_show_and_list_print_the_pairs(cli, space_file, tmp_path):
    path = space_file({"choices": ["W8A8", "W4A8", "W4A4"]}, name="pairs.yaml")
    shown = cli("spaces", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "choices: W4A4, W4A8, W8A8 (3 per searchable layer)\n" in shown.stdout
    listing = cli("spaces", env={"NAS_SPACES_DIR": str(tmp_path)})
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[2].split() == ["pairs", "resnet8", "synthetic",
                                                      "W4A4,W4A8,W8A8"]
    default = cli("spaces", "show", "fmnist_resnet8").stdout
    assert "choices: w_bits [2, 4, 8] x a_bits [4, 8] (6 per searchable layer)\n" in default


def test_a_seed_sets_the_models_initial_weights_and_leaves_the_global_generator(synthetic_space):
    # `nas train --seed N` builds its model this way: the same seed the same weights,
    # whatever ran before in the process; another seed other weights.
    import torch

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    state = torch.get_rng_state()
    first = weights(synthetic_space.build_model(seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # what an earlier command may have drawn
    assert torch.equal(weights(synthetic_space.build_model(seed=1)), first)
    assert not torch.equal(weights(synthetic_space.build_model(seed=2)), first)
