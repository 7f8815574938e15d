"""The fake-quantized model as ONNX: QuantizeLinear / DequantizeLinear around float ops.

torch's exporter (torch.export based, the default since torch 2.9; the TorchScript one is
deprecated) cannot trace torch.fake_quantize_per_*_affine: torch.export decomposes them into
their cachemask forms, which have no fake-tensor kernel (pytorch#167063), and its ONNX
translation admits 8-bit ranges only. So each quantized layer is swapped for an export-only
module, `_ExportLayer`, that calls two custom ops (namespace `nas_export`):

- `quantize_dequantize(x, scale, zero_point, qmin, qmax)`: in torch, nas's fake quantization
  (nas.quant.fake, the model's own arithmetic); in ONNX, QuantizeLinear to uint8 / int8, a
  Clip to [qmin, qmax] where the range is narrower than the type, DequantizeLinear.
- `dequantize(q, scale, zero_point, axis, dtype)`: the weight's integers, computed once as
  the model's fake quantization computes them, dequantized; in ONNX, an int4 / uint4 / int8 /
  uint8 initializer and a DequantizeLinear (per channel on axis 0, or per tensor).

The custom translations go in through `custom_translation_table`. The bias and everything
between layers (ReLU, pooling, residual additions) stay float, as in the model.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from nas.errors import ModelError
from nas.export.spec import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, container, quantized_layers
from nas.quant.fake import broadcast_along, fake_quantize

if TYPE_CHECKING:
    import onnx

    from nas.plan import Plan
    from nas.spaces import SearchSpace

_TORCH_INT = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8}


# ------------------------------------------------------------------ custom ops (torch side)

@torch.library.custom_op("nas_export::quantize_dequantize", mutates_args=())
def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         qmin: int, qmax: int) -> torch.Tensor:
    return fake_quantize(x, scale, zero_point, qmin, qmax)


@_quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("nas_export::dequantize", mutates_args=())
def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                dtype: str) -> torch.Tensor:
    # (q - z) * s equals the fake quantization's clamp(round(w / s), qmin - z, qmax - z) * s
    # exactly: q - z is a small integer, exact in float.
    axis_ = axis if scale.ndim else None
    z = broadcast_along(zero_point.float(), q, axis_)
    return (q.float() - z) * broadcast_along(scale, q, axis_)


@_dequantize.register_fake
def _(q, scale, zero_point, axis, dtype):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


# ------------------------------------------------------------------ translations (ONNX side)

def _translations() -> dict:
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset21 as op

    types = {"int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8,
             "int4": ir.DataType.INT4, "uint4": ir.DataType.UINT4}

    def quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int):
        dtype = ir.DataType.INT8 if qmin < 0 else ir.DataType.UINT8
        zp = op.Cast(zero_point, to=dtype)  # folded later
        q = op.QuantizeLinear(x, scale, zp)
        if (qmin, qmax) not in ((-128, 127), (0, 255)):  # a narrower range: clamp to it
            lo, hi = (op.Constant(value=ir.tensor(np.array(v, dtype.numpy())))
                      for v in (qmin, qmax))
            q = op.Clip(q, lo, hi)
        return op.DequantizeLinear(q, scale, zp)

    def dequantize(q, scale, zero_point, axis: int, dtype: str):
        if dtype in ("int4", "uint4"):  # the int8 / uint8 buffer holds them; folded later
            q = op.Cast(q, to=types[dtype])
        return op.DequantizeLinear(q, scale, op.Cast(zero_point, to=types[dtype]), axis=axis)

    return {torch.ops.nas_export.quantize_dequantize.default: quantize_dequantize,
            torch.ops.nas_export.dequantize.default: dequantize}


# ------------------------------------------------------------------ the export-only model

class _ExportLayer(nn.Module):
    """A QuantConv2d / QuantLinear as the custom ops compute it: buffers `weight_int`,
    `weight_scale`, `weight_zero_point` (or a float `weight`), `input_scale`,
    `input_zero_point`, `bias` - named so in the ONNX file, under the layer's name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
            self.padding, self.pad_mode = layer.padding, layer.padding_mode
            self.pad = getattr(layer, "_reversed_padding_repeated_twice", None)
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        weight = layer.weight.detach().float()
        self.w_dtype = None
        if wq.enabled:
            self.w_dtype = container(wq.bits, wq.symmetric, weight=True)
            axis = wq.axis if wq.scale.ndim else None
            scale = broadcast_along(wq.scale.detach().float(), weight, axis)
            zp = broadcast_along(wq.zero_point.detach().float(), weight, axis)
            q = torch.clamp(torch.round(weight * (1.0 / scale)), wq.qmin - zp, wq.qmax - zp) + zp
            self.w_axis = wq.axis or 0
            self.register_buffer("weight_int", q.to(_TORCH_INT[self.w_dtype]))
            self.register_buffer("weight_scale", wq.scale.detach().float().clone())
            self.register_buffer("weight_zero_point", wq.zero_point.detach().to(torch.int32).clone())
        else:
            self.register_buffer("weight", weight.clone())
        self.a_range = (aq.qmin, aq.qmax) if aq.enabled else None
        if aq.enabled:
            self.register_buffer("input_scale", aq.scale.detach().float().clone())
            self.register_buffer("input_zero_point", aq.zero_point.detach().to(torch.int32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_range is not None:
            x = torch.ops.nas_export.quantize_dequantize(x, self.input_scale,
                                                         self.input_zero_point, *self.a_range)
        if self.w_dtype is not None:
            w = torch.ops.nas_export.dequantize(self.weight_int, self.weight_scale,
                                                self.weight_zero_point, self.w_axis, self.w_dtype)
        else:
            w = self.weight
        if not self.conv:
            return F.linear(x, w, self.bias)
        if self.pad_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.pad_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def export_model(model: nn.Module, plan: "Plan") -> nn.Module:
    """A CPU copy of the quantized `model` with each quantized layer an `_ExportLayer`; it
    computes what the model computes (float layers stay as they are)."""
    layers = quantized_layers(model, plan)
    out = copy.deepcopy(model).cpu().eval()
    for name, layer in layers.items():
        if hasattr(layer, "weight_quantizer"):
            out.set_submodule(name, _ExportLayer(out.get_submodule(name)))
    return out


# ------------------------------------------------------------------ ONNX

def to_onnx(model: nn.Module, plan: "Plan", space: "SearchSpace",
            metadata: dict[str, str]) -> "onnx.ModelProto":
    """The quantized model as an ONNX model (opset 21, any batch), `metadata` in its
    metadata_props."""
    import onnx

    wrapper = export_model(model, plan)
    info = space.data_info()
    sample = torch.zeros(2, info.in_channels, *info.image_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (sample,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                custom_translation_table=_translations(), optimize=False)
    except Exception as exc:  # noqa: BLE001 - a model torch.export cannot trace, by any error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch's ONNX exporter cannot export model {space.model}: "
                         f"{first}") from exc
    proto = program.model_proto
    _fold_casts(proto)
    proto = _tidy(proto)
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    return proto


def _fold_casts(proto: "onnx.ModelProto") -> None:
    """Replace each Cast of an initializer by the cast initializer, under the source's name
    where nothing else reads it: the int4 weights are then stored as int4, and the zero
    points as their integer type, named after their layer (`<layer>.weight_zero_point`).

    onnxscript's optimizer folds only tensors of up to 8192 elements, and renames them."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    renames: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.input[0] not in inits:
            continue
        source = inits[node.input[0]]
        to = next(a.i for a in node.attribute if a.name == "to")
        array = numpy_helper.to_array(source).astype(helper.tensor_dtype_to_np_dtype(to))
        if readers[source.name] == 1:
            graph.initializer.remove(source)
            del inits[source.name]
            name = source.name
            renames[node.output[0]] = name
        else:
            name = node.output[0]
        folded = numpy_helper.from_array(array, name)
        graph.initializer.append(folded)
        inits[name] = folded
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _tidy(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """Fold what is constant (the batch size's shape arithmetic) and drop what nothing reads.

    Not onnxscript's whole optimizer: it merges initializers of equal values across layers
    (every zero point 0 would become one tensor), and the layers' names are worth keeping."""
    from onnxscript import ir
    from onnxscript.ir.passes import common
    from onnxscript.optimizer import fold_constants_ir

    model = ir.from_proto(proto)
    fold_constants_ir(model)
    ir.passes.Sequential(common.RemoveUnusedNodesPass(),
                         common.LiftConstantsToInitializersPass(lift_all_constants=True,
                                                                size_limit=0),
                         common.RemoveUnusedOpsetsPass())(model)
    return ir.to_proto(model)


def metadata(space: "SearchSpace", plan: "Plan", source: dict[str, Any]) -> dict[str, str]:
    """metadata_props: what a runtime needs to feed the model, and where it came from
    (`source`: plan, checkpoint or run, calibration, as plain data)."""
    import json

    from nas import __version__
    from nas.export.spec import input_spec

    spec = input_spec(space)
    shape = ["N" if d is None else d for d in spec["shape"]]
    props = {
        "input_name": spec["name"], "input_layout": spec["layout"],
        "input_shape": json.dumps(shape), "input_dtype": spec["dtype"],
        "input_pixel_scale": repr(spec["pixel_scale"]), "input_mean": json.dumps(spec["mean"]),
        "input_std": json.dumps(spec["std"]), "input_preprocessing": spec["preprocessing"],
        "output_name": OUTPUT_NAME, "space": space.name, "model": space.model,
        "dataset": space.data, "num_classes": str(space.data_info().num_classes),
        "plan": json.dumps({n: str(p) for n, p in plan.layers.items()}),
        "quantization": ("QDQ: weights int4/uint4 (2-4 bits) or int8/uint8 (5-8 bits) "
                         "initializers with DequantizeLinear; activations QuantizeLinear to "
                         "uint8/int8, a Clip to the plan's range below 8 bits, "
                         "DequantizeLinear; bias and the ops between layers float"),
        "source": json.dumps(source), "nas_version": __version__,
    }
    return props
