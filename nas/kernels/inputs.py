"""Random inputs of a layer's geometry, as the integer kernels take them, and the same layer
in torch fp16 (cuDNN) as the baseline: what `nas measure` times, `nas bench kernels`
compares and `nas.kernels.aot` compiles ahead of time.

Values are drawn on a generator's device (on the GPU: no host work or copies).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nas.kernels.configs import packed_operands
from nas.kernels.pack import pack_int4

# Activations are timed with a nonzero zero point: the built-in spaces quantize them
# asymmetrically, and padded layers then pay the kernel's padding correction.
ACTIVATION_ZERO_POINT = 1


def _int_values(shape, bits: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8, device=gen.device)


def fp16_baseline(info, batch: int, device: torch.device, gen: torch.Generator):
    """(the layer in torch fp16 channels_last, its input, its weights)."""
    def randn(*shape):
        return torch.randn(shape, generator=gen, device=gen.device).to(device, torch.float16)

    kh, kw = info.kernel
    xf = randn(batch, info.in_channels, *info.in_hw).contiguous(memory_format=torch.channels_last)
    wf = randn(info.out_channels, info.in_channels // info.groups, kh, kw).contiguous(
        memory_format=torch.channels_last)
    conv = dict(stride=info.stride, padding=info.padding, groups=info.groups)  # Linear: 1x1

    def baseline():
        F.conv2d(xf, wf, None, **conv)
    return baseline, xf, wf


def int_operands(info, batch: int, w_bits: int, a_bits: int, device: torch.device,
                 gen: torch.Generator):
    """(NHWC activation codes, OHWI weight codes, both unpacked int8; the epilogue's
    arguments of a `prepare_conv` call: bits, per-channel scale, bias, ReLU, zero point)."""
    x = _int_values((batch, *info.in_hw, info.in_channels), a_bits, gen).to(device)
    wt = _int_values((info.out_channels, *info.kernel, info.in_channels // info.groups), w_bits,
                     gen).to(device)
    scale = torch.rand(info.out_channels, generator=gen, device=gen.device).to(device) * 1e-3
    bias = torch.randn(info.out_channels, generator=gen, device=gen.device).to(device)
    return x, wt, dict(w_bits=w_bits, a_bits=a_bits, scale=scale, bias=bias, relu=True,
                       x_zero_point=ACTIVATION_ZERO_POINT)


def pack_operands(info, w_bits: int, a_bits: int, x: torch.Tensor, wt: torch.Tensor):
    """x and wt as the kernels take them: packed two per byte where `packed_operands` says."""
    x_packed, w_packed = packed_operands(info, w_bits, a_bits)
    return (pack_int4(x, dim=3) if x_packed else x), (pack_int4(wt, dim=3) if w_packed else wt)


def int_launch(info, batch: int, w_bits: int, a_bits: int, device: torch.device,
               gen: torch.Generator, config=None, launch=None):
    """The integer kernel's launch for one (layer, precision) on random inputs, prepared
    (`prepare_conv`: calling it launches and nothing else): NHWC int8 activations and OHWI
    int8 weights, packed two per byte where `packed_operands` says. `config` and `launch`
    pin the GEMM kernel's tile and launch variant (default: autotuned and chosen by timing
    on the GPU)."""
    from nas.kernels.conv import prepare_conv

    x, wt, epilogue = int_operands(info, batch, w_bits, a_bits, device, gen)
    return prepare_conv(*pack_operands(info, w_bits, a_bits, x, wt), config=config,
                        launch=launch, stride=info.stride, padding=info.padding,
                        groups=info.groups, **epilogue)
