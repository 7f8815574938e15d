import inspect
import sys

import pytest
import torch
from torch import nn

from nas.errors import ConfigError, ModelError
from nas.models import create_model, get_factory, list_models, register_model
from nas.models.registry import _ARG_RULES, _BUILTIN, _BUILTIN_ARGS, check_model_kwargs


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", list_models())
def test_every_model_adapts_channels_and_classes(name):
    size = 64 if name in ("resnet18", "mobilenet_v2") else 28
    model = create_model(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name, depth", [("resnet8", 8), ("resnet20", 20), ("resnet32", 32),
                                         ("resnet56", 56)])
def test_cifar_resnet_depth(name, depth):
    model = create_model(name)
    # depth counts the stem, two convs per block and the classifier; shortcuts are extra 1x1s.
    convs3x3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert convs3x3 + _count(model, nn.Linear) == depth
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 2


def test_cifar_resnet_rejects_bad_depth():
    from nas.models.resnet_cifar import CifarResNet

    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(10)


def test_mobilenetv2_small_image_variant():
    model = create_model("mobilenetv2").eval()
    assert _count(model, nn.ReLU6) == 35 and _count(model, nn.ReLU) == 0
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
    # Three stride-2 stages take 32x32 to 4x4.
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
    half = create_model("mobilenetv2", width_mult=0.5)
    assert half.features[0][0].out_channels == 16


def test_torchvision_models_are_random_init_and_adapted():
    model = create_model("resnet18", num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    mb = create_model("mobilenet_v2", num_classes=5, in_channels=1)
    assert mb.features[0][0].in_channels == 1 and mb.classifier[1].out_features == 5


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))\n"
        "def not_a_model():\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # in_channels is dropped because the factory does not take it.
    model = create_model("mymodels:tiny", defaults={"num_classes": 3, "in_channels": 1})
    assert model[1].out_features == 3
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        create_model("mymodels:not_a_model")
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        create_model("mymodels:missing")
    with pytest.raises(ModelError, match="cannot import 'nosuchpkg.mod'"):
        create_model("nosuchpkg.mod:f")
    sys.modules.pop("mymodels", None)


def test_unknown_model_lists_choices():
    with pytest.raises(ModelError, match="unknown model 'resnet9'; choose one of .*resnet20"):
        create_model("resnet9")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        register_model(lambda: nn.Identity(), name="resnet8")


@pytest.mark.parametrize("name", sorted(_BUILTIN))
def test_checked_arguments_are_the_factory_arguments(name):
    """The torch-free argument table that checks a space's model.kwargs names exactly the
    built-in factory's parameters, each with a rule."""
    params = inspect.signature(get_factory(name)).parameters
    assert set(_BUILTIN_ARGS[name]) == set(params)
    assert all(key in _ARG_RULES for key in params)


@pytest.mark.parametrize("name, kwargs, message", [
    ("resnet8", {"width": 0}, "model.kwargs.width: 0 must be a whole number of at least 1"),
    ("resnet20", {"width": True}, "model.kwargs.width: True must be a whole number of at least 1"),
    ("resnet18", {"num_classes": 1},
     "model.kwargs.num_classes: 1 must be a whole number of at least 2"),
    ("mobilenetv2", {"width_mult": 0}, "model.kwargs.width_mult: 0 must be a number above 0"),
    ("mobilenetv2", {"dropout": 1.0},
     "model.kwargs.dropout: 1.0 must be a number from 0 up to (not including) 1"),
    ("mobilenetv2", {"stem_stride": "2"},
     "model.kwargs.stem_stride: '2' must be a whole number of at least 1"),
    ("mobilenet_v2", {"width": 8},
     "model.kwargs.width: unknown option for mobilenet_v2; allowed: in_channels, num_classes, "
     "width_mult"),
])
def test_builtin_model_arguments_are_checked(name, kwargs, message):
    with pytest.raises(ConfigError) as err:
        check_model_kwargs(name, kwargs)
    assert str(err.value) == message


def test_good_and_user_model_arguments_pass():
    check_model_kwargs("mobilenetv2", {"width_mult": 0.5, "dropout": 0.0, "stem_stride": 2})
    check_model_kwargs("mymodels:tiny", {"anything": -1})  # a user factory checks its own
