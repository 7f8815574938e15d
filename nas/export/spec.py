"""How each quantizer is exported, and the plan document of `nas export --format json|yaml`.

Integer types (the ONNX tensor types of the QDQ graph, named the same in the plan document):

- weights: 2-4 bits in int4 (uint4 when asymmetric), 5-8 bits in int8 (uint8); ONNX has int4
  since opset 21. A width without a type of its own (2, 3, 5, 6, 7) sits in the next wider
  one and uses only the plan's range [qmin, qmax]: the stored integers never leave it.
- activations: uint8 when asymmetric, int8 when symmetric, at every width; below 8 bits a
  Clip to the plan's [qmin, qmax] follows the QuantizeLinear.

16 and 32 bits are float: no quantizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nas.errors import ModelError
from nas.quant.fake import quant_range
from nas.spaces import FLOAT_BITS

if TYPE_CHECKING:
    from torch import nn

    from nas.plan import Plan
    from nas.spaces import SearchSpace

FORMAT = "nas-quant-export"
FORMAT_VERSION = 1
ONNX_OPSET = 21  # int4 / uint4 in QuantizeLinear / DequantizeLinear
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def container(bits: int, symmetric: bool, weight: bool) -> str:
    """The integer type a quantized tensor is stored in (see the module's docstring)."""
    width = 4 if weight and bits <= 4 else 8
    return f"{'' if symmetric else 'u'}int{width}"


# ------------------------------------------------------------------ the model's input

_PIXELS = {"fashion_mnist": "8-bit grayscale pixels", "cifar10": "8-bit RGB pixels",
           "imagefolder": "8-bit RGB pixels"}


def input_spec(space: "SearchSpace") -> dict[str, Any]:
    """What a runtime must feed the model: name, layout, shape (None: any batch), and the
    normalisation the space's data applies (x = (pixels * pixel_scale - mean) / std)."""
    info = space.data_info()
    channels, (h, w) = info.in_channels, info.image_size
    if space.data in _PIXELS:
        from nas.data import _STATS  # the constants nas.data normalises with

        mean, std = (list(v) for v in _STATS[space.data])
        scale = 1 / 255
        text = (f"{_PIXELS[space.data]} as float32, divided by 255, then (x - mean) / std per "
                f"channel")
        if space.data == "imagefolder":
            text = (f"RGB image resized to a short side of {int(h * 256 / 224)} and cropped to "
                    f"its centre {h}x{w}; {text}")
    else:  # synthetic: float images as nas.data makes them, not normalised
        mean, std, scale = [0.0] * channels, [1.0] * channels, 1.0
        text = "float32 images as the synthetic dataset makes them; no normalisation"
    return {"name": INPUT_NAME, "layout": "NCHW", "shape": [None, channels, h, w],
            "dtype": "float32", "pixel_scale": scale, "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "preprocessing": text}


# ------------------------------------------------------------------ the model's layers

def quantized_layers(model: "nn.Module", plan: "Plan") -> dict[str, "nn.Module"]:
    """The plan's layers in `model`, checked to be what export reads: QuantConv2d /
    QuantLinear with fixed ranges that agree with the plan (float layers: the float module).

    A model from `prepare_ptq` or QAT's convert() passes; a quantizer that still learns or
    observes its range, or disagrees with the plan, is refused by name.
    """
    from torch import nn

    from nas.quant.modules import QUANT_TYPES

    modules = dict(model.named_modules())
    found = {}
    for name, prec in plan.layers.items():
        module = modules.get(name)
        both_float = prec.w_bits in FLOAT_BITS and prec.a_bits in FLOAT_BITS
        kinds = (nn.Conv2d, nn.Linear) if both_float else QUANT_TYPES
        if not isinstance(module, kinds):
            what = "no such module" if module is None else type(module).__name__
            want = "Conv2d or Linear" if both_float else "QuantConv2d or QuantLinear"
            raise ModelError(f"layer {name}: the model has {what} where the plan's {prec} "
                             f"needs {want}; export a model quantized by this plan")
        if not both_float:
            _check_quantizer(name, "weight", module.weight_quantizer, prec.w_bits,
                             prec.w_symmetric, 0 if prec.w_granularity == "per_channel" else None)
            _check_quantizer(name, "input", module.input_quantizer, prec.a_bits,
                             prec.a_symmetric, None)
        found[name] = module
    return found


def _check_quantizer(layer: str, role: str, q, bits: int, symmetric: bool, axis) -> None:
    where = f"layer {layer}: its {role} quantizer"
    if q.bits != bits:
        raise ModelError(f"{where} has {q.bits} bits where the plan has {bits}")
    if not q.enabled:
        return
    if (q.symmetric, q.axis) != (symmetric, axis):
        raise ModelError(f"{where} is {'symmetric' if q.symmetric else 'asymmetric'}, axis "
                         f"{q.axis}, where the plan has {'symmetric' if symmetric else 'asymmetric'}"
                         f", axis {axis}")
    if q.learn is not None or q.stochastic or q.observing or not bool(q.initialized):
        state = (f"learns its range ({q.learn})" if q.learn else "rounds stochastically"
                 if q.stochastic else "is still observing" if q.observing else "has no range yet")
        raise ModelError(f"{where} {state}; export needs fixed scales and zero points (a "
                         f"calibrated or converted model)")


def _values(t) -> Any:
    """A scale or zero-point buffer as plain data: a number per tensor, a list per channel."""
    return t.tolist() if t.ndim else t.item()


def quantizer_record(bits: int, symmetric: bool, per_channel: bool, weight: bool,
                     q=None) -> dict[str, Any]:
    """One quantizer of the plan document; with `q` (the model's), its scale and zero point."""
    if bits in FLOAT_BITS:
        return {"bits": bits, "float": True}
    qmin, qmax = quant_range(bits, symmetric)
    record = {"bits": bits, "float": False, "symmetric": symmetric,
              "granularity": "per_channel" if per_channel else "per_tensor",
              "axis": 0 if per_channel else None, "qmin": qmin, "qmax": qmax,
              "dtype": container(bits, symmetric, weight)}
    if q is not None:
        record["scale"] = _values(q.scale.detach().float().cpu())
        record["zero_point"] = _values(q.zero_point.detach().cpu())
    return record


def plan_document(plan: "Plan", space: "SearchSpace", model: "nn.Module | None" = None,
                  source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan keyed by fully qualified module names, for other toolkits: each layer's
    quantizer settings and, where `model` is given, its scales and zero points."""
    infos = {x.name: x.info for x in space.layers()}
    modules = quantized_layers(model, plan) if model is not None else {}
    layers = {}
    for name, prec in plan.layers.items():
        module = modules.get(name)
        quant = module is not None and hasattr(module, "weight_quantizer")
        layers[name] = {
            "type": infos[name].type, "w_bits": prec.w_bits, "a_bits": prec.a_bits,
            "weight": quantizer_record(prec.w_bits, prec.w_symmetric,
                                       prec.w_granularity == "per_channel", True,
                                       module.weight_quantizer if quant else None),
            "input": quantizer_record(prec.a_bits, prec.a_symmetric, False, False,
                                      module.input_quantizer if quant else None),
        }
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"space": plan.space, "name": plan.model, "layer_hash": plan.layer_hash},
            "input": input_spec(space), "ranges": model is not None,
            "source": dict(source or {}), "layers": layers}
