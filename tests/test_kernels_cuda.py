"""The Triton integer convolution compiled for a real GPU: exact int32 results against a
float64 reference, for every autotuning configuration and for ResNet-sized layers. The CPU
interpreter accepts things a GPU compiler does not (tl.dot rules, layouts), so these run
wherever CUDA is present; without it they are skipped."""

import pytest
import torch

from nas.kernels import conv2d_int, pack_int4
from nas.kernels.configs import DEPTHWISE_CONFIGS, GPU_CONFIGS, Launch
from tests.test_kernels import (check_padding_correction, check_zero_point_padding,
                                reference, values)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _check(n, h, w, c, o, k, stride, padding, groups, w_bits, a_bits, seed, config=None,
           launch=None):
    gen = torch.Generator().manual_seed(seed)
    x = values((n, h, w, c), a_bits, gen)
    wt = values((o, k, k, c // groups), w_bits, gen)
    expected = reference(x, wt, stride, padding, groups)
    xin, win = x, wt
    if a_bits <= 4 and c % 2 == 0 and ((c // groups) % 2 == 0 or c == groups):
        xin = pack_int4(x, dim=3)
    if w_bits <= 4 and (c // groups) % 2 == 0:
        win = pack_int4(wt, dim=3)
    out = conv2d_int(xin.cuda(), win.cuda(), w_bits=w_bits, a_bits=a_bits, stride=stride,
                     padding=padding, groups=groups, config=config, launch=launch)
    torch.cuda.synchronize()
    assert out.dtype == torch.int32 and torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 4)])  # unpacked and both packed
@pytest.mark.parametrize("index", range(len(GPU_CONFIGS)))
def test_every_config_is_exact(index, w_bits, a_bits):
    # 70 channels: three blocks of 32 (or two of 64) per tap, the last one partial.
    _check(2, 9, 7, 70, 45, 3, 2, 1, 1, w_bits, a_bits, seed=index, config=GPU_CONFIGS[index])


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 8), (2, 4)])
@pytest.mark.parametrize("geometry", [
    (4, 56, 56, 64, 64, 3, 1, 1, 1),    # ResNet-18 layer1
    (4, 56, 56, 64, 128, 1, 2, 0, 1),   # downsample 1x1 stride 2
    (1, 14, 14, 256, 256, 3, 1, 1, 1),  # batch 1, deep: split-K proposed (and timed)
    (1, 7, 7, 512, 512, 3, 1, 1, 1),    # batch 1, layer4
    (2, 224, 224, 3, 64, 7, 2, 3, 1),   # stem: 3 channels
    (2, 28, 28, 96, 96, 3, 2, 1, 96),   # depthwise
    (2, 12, 12, 64, 32, 3, 1, 1, 4),    # grouped
    (8, 1, 1, 512, 1000, 1, 1, 0, 1),   # a Linear as a 1x1 conv
    (2, 16, 16, 4, 32, 3, 1, 1, 1),     # few channels: kernel rows (int8 x), flattened (packed x)
])
def test_autotuned_layers_are_exact(geometry, w_bits, a_bits):
    _check(*geometry, w_bits, a_bits, seed=sum(geometry))


@pytest.mark.parametrize("index", [i for i, c in enumerate(GPU_CONFIGS) if c.block_k >= 64])
def test_tap_pairs_are_exact_for_every_config(index):
    # Input channels of half the tile's BLOCK_K: two taps per step (9 taps: the last pair
    # half empty), unsplit and split; unpacked operands (packed ones walk one tap a step).
    cfg = GPU_CONFIGS[index]
    for split in (1, 3):
        _check(2, 9, 7, cfg.block_k // 2, 45, 3, 2, 1, 1, 8, 8, seed=index, config=cfg,
               launch=Launch(split))
        _check(1, 6, 5, cfg.block_k // 2, 20, 3, 1, 1, 1, 4, 8, seed=index, config=cfg,
               launch=Launch(split, unpack_first=True))


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 8)])
@pytest.mark.parametrize("split_k", [2, 16])
def test_split_k_is_exact_on_the_gpu(split_k, w_bits, a_bits):
    # Partial sums stored per split by autotuned tiles, added up by the epilogue kernel.
    _check(1, 7, 7, 512, 512, 3, 1, 1, 1, w_bits, a_bits, seed=split_k, launch=Launch(split_k))


def test_split_k_replayed_in_a_cuda_graph_stays_exact():
    # Every replay overwrites the splits' partial sums (nothing is zeroed between calls), as
    # `nas measure` replays graphs of back-to-back calls.
    from nas.kernels.conv import prepare_conv

    gen = torch.Generator().manual_seed(5)
    x, wt = values((1, 7, 7, 512), 8, gen), values((512, 3, 3, 512), 8, gen)
    launch = prepare_conv(x.cuda(), wt.cuda(), w_bits=8, a_bits=8, padding=1,
                          launch=Launch(16))
    launch()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
        out = launch()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference(x, wt, 1, 1, 1))


@pytest.mark.parametrize("w_bits, a_bits", [(4, 8), (4, 4)])
@pytest.mark.parametrize("split_k", [1, 16])
def test_unpack_first_is_exact_on_the_gpu(split_k, w_bits, a_bits):
    # Packed operands unpacked by a pre-pass, then the int8 GEMM (autotuned tiles).
    _check(1, 7, 7, 512, 512, 3, 1, 1, 1, w_bits, a_bits, seed=split_k,
           launch=Launch(split_k, unpack_first=True))
    _check(4, 28, 28, 128, 128, 3, 1, 1, 1, w_bits, a_bits, seed=split_k,
           launch=Launch(unpack_first=True))


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 4)])
@pytest.mark.parametrize("geometry", [
    (2, 224, 224, 3, 64, 7, 2, 3, 1),   # ImageNet stem
    (2, 16, 16, 4, 32, 3, 1, 1, 1),     # few channels, even: packed activations
    (2, 12, 12, 12, 16, 3, 1, 1, 2),    # grouped, 6 channels per group
])
def test_im2col_is_exact_on_the_gpu(geometry, w_bits, a_bits):
    # Rows written out by the pre-pass, then a 1x1 GEMM (autotuned tiles); split-K too.
    _check(*geometry, w_bits, a_bits, seed=sum(geometry), launch=Launch(im2col=True))
    _check(*geometry, w_bits, a_bits, seed=sum(geometry), launch=Launch(3, im2col=True))


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("geometry", [
    (2, 224, 224, 3, 64, 7, 2, 3, 1),   # ImageNet stem: rows at multiples of 8 bytes
    (2, 224, 224, 3, 32, 3, 2, 1, 1),   # MobileNetV2's stem
    (2, 28, 28, 1, 16, 3, 1, 1, 1),     # Fashion-MNIST's stem: 4 bytes
    (1, 33, 35, 2, 8, 7, 4, 3, 1),      # stride 4: 16 bytes
    (2, 15, 17, 6, 24, 3, 3, 2, 1),     # 8-byte pixels, stride 3
])
def test_pad_image_is_exact_on_the_gpu(geometry, w_bits):
    # x copied into the padded image by its pre-pass, then the aligned row walk (autotuned
    # tiles, cp.async vector loads); split-K too.
    _check(*geometry, w_bits, 8, seed=sum(geometry), launch=Launch(pad_image=True))
    _check(*geometry, w_bits, 8, seed=sum(geometry), launch=Launch(3, pad_image=True))


@pytest.mark.parametrize("launch", [Launch(pad_image=True), Launch(2, pad_image=True)])
def test_pad_image_border_holds_the_zero_point_on_the_gpu(launch):
    check_padding_correction(3, 1, (7, 7), (3, 3), (2, 2), (2, 20, 22), device="cuda",
                             launch=launch)


@pytest.mark.parametrize("bits, zp, pack", [(8, -5, False), (4, 3, True)])
def test_im2col_zero_point_and_epilogue_on_the_gpu(bits, zp, pack):
    check_zero_point_padding(bits, zp, pack, (2, 9, 9, 4), 16, device="cuda",
                             launch=Launch(im2col=True))


def test_split_k_epilogue_matches_the_fused_one():
    gen = torch.Generator().manual_seed(6)
    x, wt = values((1, 14, 14, 256), 8, gen).cuda(), values((128, 3, 3, 256), 8, gen).cuda()
    scale, bias = (torch.rand(128, generator=gen) * 1e-3).cuda(), torch.randn(128, generator=gen).cuda()
    args = dict(w_bits=8, a_bits=8, padding=1, scale=scale, bias=bias, relu=True, x_zero_point=5)
    for out_dtype, extra in ((torch.float32, {}), (torch.int8, dict(out_scale=0.05))):
        fused = conv2d_int(x, wt, out_dtype=out_dtype, launch=Launch(1), **args, **extra)
        split = conv2d_int(x, wt, out_dtype=out_dtype, launch=Launch(9), **args, **extra)
        # The same int32 sums through the same epilogue code, compiled into two kernels (the
        # compiler may contract multiply-adds differently): float32 within an ulp or two,
        # requantized codes within one step.
        if out_dtype == torch.float32:
            assert torch.allclose(fused, split, rtol=1e-6, atol=1e-6)
        else:
            assert (fused.int() - split.int()).abs().max() <= 1


def test_fused_epilogue_on_the_gpu():
    gen = torch.Generator().manual_seed(5)
    x, wt = values((2, 14, 14, 64), 8, gen), values((32, 3, 3, 64), 8, gen)
    scale, bias, zp = torch.rand(32, generator=gen) * 1e-3, torch.randn(32, generator=gen), -7
    real = torch.nn.functional.conv2d((x.double() - zp).permute(0, 3, 1, 2),
                                      wt.permute(0, 3, 1, 2).double(), padding=1)
    expected = (real.permute(0, 2, 3, 1) * scale.double() + bias.double()).clamp(min=0)
    y = conv2d_int(x.cuda(), wt.cuda(), w_bits=8, a_bits=8, padding=1, scale=scale.cuda(),
                   bias=bias.cuda(), relu=True, x_zero_point=zp, out_dtype=torch.float32)
    # int32 -> float32 times a float32 scale: a few float32 ulps.
    assert torch.allclose(y.cpu().double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits, zp, pack", [(8, -5, False), (4, 3, True)])
@pytest.mark.parametrize("channels", [64, 4])  # the tap walk, the flattened walk
def test_zero_point_padding_on_the_gpu(bits, zp, pack, channels):
    # A nonzero zero point: padding is read as 0 and corrected in the epilogue.
    check_zero_point_padding(bits, zp, pack, (2, 9, 9, channels), 16, device="cuda")


@pytest.mark.parametrize("ci, groups, kernel, padding, stride", [
    (64, 1, (3, 3), (1, 1), 1), (20, 1, (5, 3), (3, 2), 1), (5, 1, (7, 7), (3, 3), 2),
    (18, 2, (3, 5), (1, 3), (2, 1))])
def test_padding_correction_on_the_gpu(ci, groups, kernel, padding, stride):
    # Autotuned tiles over 2 x 23 x 21 pixels: tiles holding border and interior pixels.
    check_padding_correction(ci, groups, kernel, padding, stride, (2, 23, 21), device="cuda")


def test_depthwise_zero_point_padding_on_the_gpu():
    gen = torch.Generator().manual_seed(7)
    x, wt, zp = values((2, 10, 10, 48), 8, gen), values((48, 3, 3, 1), 8, gen), -9
    real = torch.nn.functional.conv2d((x.double() - zp).permute(0, 3, 1, 2),
                                      wt.permute(0, 3, 1, 2).double(), padding=1, groups=48)
    y = conv2d_int(x.cuda(), wt.cuda(), w_bits=8, a_bits=8, padding=1, groups=48,
                   scale=torch.ones(48).cuda(), x_zero_point=zp, out_dtype=torch.float32)
    assert torch.equal(y.cpu().double(), real.permute(0, 2, 3, 1))


@pytest.mark.parametrize("index", range(len(DEPTHWISE_CONFIGS)))
def test_every_depthwise_tile_is_exact(index):
    _check(2, 17, 15, 96, 96, 3, 1, 1, 96, 8, 8, seed=index, config=DEPTHWISE_CONFIGS[index])


@pytest.mark.parametrize("w_bits, a_bits", [(4, 8), (8, 4), (4, 4)])
def test_nibble_unpacking_in_tiles_covers_every_value(w_bits, a_bits):
    # Packed operands are unpacked four per register on the GPU: every 4-bit value in every
    # byte position, over channel counts whose last block is partial.
    _check(2, 6, 6, 102, 40, 3, 1, 1, 1, w_bits, a_bits, seed=11, launch=Launch())
