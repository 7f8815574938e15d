"""Triton integer convolution: exact int32 results on the CPU interpreter (tiny shapes)."""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.errors import ConfigError
from nas.kernels import conv2d_int, pack_int4, unpack_int4
from nas.kernels.configs import (DEPTHWISE_CONFIGS, EPILOGUE_TILES, FLAT_K_BELOW, GPU_CONFIGS,
                                 INTERPRETER_CONFIG, INTERPRETER_DEPTHWISE, DirectConfig,
                                 KernelConfig, Launch, epilogue_tile, validate_config,
                                 validate_direct_config)
from nas.kernels.conv_kernels import ROW_WIDTH

pytestmark = pytest.mark.triton


def reference(x, w, stride, padding, groups, zero_point=0):
    """torch convolution in float64 on the integer values (exact for these magnitudes), the
    input padded with the zero point."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    pad = (pw, pw, ph, ph)
    xp = torch.nn.functional.pad(x.permute(0, 3, 1, 2).double(), pad, value=zero_point)
    out = torch.nn.functional.conv2d(xp, w.permute(0, 3, 1, 2).double(), stride=stride,
                                     groups=groups)
    return out.permute(0, 2, 3, 1).round().to(torch.int32)


def values(shape, bits, gen):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    return torch.randint(lo, hi, shape, dtype=torch.int8, generator=gen)


# Every path of the integer convolution, each certain: (kind of layer, launch, packed operands).
# Hypothesis draws only shapes and values within a path. Kinds: the depthwise kernel; the GEMM's
# tap walk (16 or more input channels per group), kernel-row walk (fewer, int8 activations,
# KW x channels at most 32) and flattened walk (fewer, the rest); grouped layers of both.
# pack: operands passed packed two 4-bit values per byte (x activations, w weights).
KERNEL_PATHS = [
    ("depthwise", None, ""),
    ("depthwise", Launch(), "x"),
    ("tap", None, ""),  # the launch conv2d_int proposes
    ("tap", Launch(1), "x"),
    ("tap", Launch(3), "w"),
    ("tap", Launch(2, unpack_first=True), "xw"),
    ("tap", Launch(im2col=True), "xw"),
    ("row", Launch(1), "w"),
    ("row", Launch(2), ""),
    ("row", Launch(2, im2col=True), ""),
    ("row", Launch(2, pad_image=True), "w"),
    ("flat", Launch(1), "x"),
    ("flat", Launch(3), ""),
    ("flat", Launch(2), "w"),
    ("flat", Launch(unpack_first=True), "xw"),
    ("grouped-tap", Launch(1), ""),
    ("grouped-tap", Launch(3), "x"),
    ("grouped-tap", Launch(2, unpack_first=True), "xw"),
    ("grouped-few", Launch(1), "w"),
    ("grouped-few", Launch(2, im2col=True), "x"),
]
# NAS_HYPOTHESIS_EXAMPLES in all, shared by the paths (60: 3 each; the first is the smallest).
EXAMPLES_PER_PATH = max(2, int(os.environ.get("NAS_HYPOTHESIS_EXAMPLES", 60)) // len(KERNEL_PATHS))


@st.composite
def conv_cases(draw, kind, launch, pack):
    x_packed, w_packed = "x" in pack, "w" in pack

    def channels(lo, hi, even=False):
        return 2 * draw(st.integers((lo + 1) // 2, hi // 2)) if even else draw(st.integers(lo, hi))

    kh = draw(st.sampled_from([1, 3, 5, 7]))
    # the flattened walk of int8 activations: KW x channels past a 32-value row
    kw = draw(st.sampled_from([3, 5, 7] if kind == "flat" and not x_packed else [1, 3, 5, 7]))
    groups = 1
    if kind == "depthwise":
        c = channels(2, 9, even=x_packed)  # packed: whole bytes (channels read one by one)
        groups, o, ci = c, c, 1
    elif kind in ("tap", "grouped-tap"):
        groups = 1 if kind == "tap" else 2
        ci = channels(16, 40 if kind == "tap" else 18, even=x_packed or w_packed)
        o = groups * draw(st.integers(1, 9 if kind == "tap" else 4))
    elif kind == "row":
        row = ROW_WIDTH.value // kw
        if launch.pad_image:  # each pixel's channels padded to whole 4-byte words
            row = row // 4 * 4
        ci = channels(1 + w_packed, min(FLAT_K_BELOW - 1, row), even=w_packed)
        o = draw(st.integers(1, 9))
    elif kind == "flat":
        low = 1 if x_packed else ROW_WIDTH.value // kw + 1
        ci = channels(max(low, 1 + x_packed), FLAT_K_BELOW - 1, even=x_packed or w_packed)
        o = draw(st.integers(1, 9))
    else:  # grouped-few
        groups = draw(st.integers(2, 3))
        ci, o = channels(1 + bool(pack), 9, even=bool(pack)), groups * draw(st.integers(1, 4))
    c = groups * ci if kind != "depthwise" else c
    w_bits, a_bits = draw(st.sampled_from([(8, 8), (4, 8), (4, 4), (8, 4)]))
    a_bits, w_bits = (4 if x_packed else a_bits), (4 if w_packed else w_bits)
    lo, hi = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
    ph, pw = draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, kw // 2 + 1))
    return dict(n=draw(st.integers(1, 2)),
                h=draw(st.integers(max(1, kh - 2 * ph), kh - 2 * ph + 5)),
                w=draw(st.integers(max(1, kw - 2 * pw), kw - 2 * pw + 5)), c=c, o=o, ci=ci,
                kernel=(kh, kw), padding=(ph, pw), groups=groups,
                stride=(draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))),
                w_bits=w_bits, a_bits=a_bits, seed=draw(st.integers(0, 10**6)),
                zp=draw(st.one_of(st.sampled_from([0, lo, hi]), st.integers(lo, hi))))


class _KernelSpy:
    """Stands in for a Triton kernel of nas.kernels.conv: records each launch's name and
    compile-time flags, then runs the real kernel."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs))
            return run(*args, **kwargs)
        return launch


def launched_kernels(call):
    """Run `call` and return its result and the kernels it launched, in order."""
    from unittest import mock

    import nas.kernels.conv as conv

    log = []
    names = ("conv_gemm", "_conv_depthwise_kernel", "_im2col_kernel", "_pad_image_kernel",
             "_unpack_int4_kernel", "_epilogue_kernel")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(conv, name,
                                                  _KernelSpy(getattr(conv, name), name, log)))
        return call(), log


def check_path(kind, launch, pack, log):
    """The kernels that ran are those of the path (kind, launch, pack)."""
    ran = [name for name, _ in log]
    if kind == "depthwise":
        assert ran == ["_conv_depthwise_kernel"]
        return
    (flags,) = [f for name, f in log if name == "conv_gemm"]
    assert (flags["SPLIT_K"] > 1) == ("_epilogue_kernel" in ran)
    if launch is not None:
        assert flags["SPLIT_K"] == launch.split_k
    x_packed, w_packed = "x" in pack, "w" in pack
    prepasses = set(ran) - {"conv_gemm", "_epilogue_kernel"}
    if launch is not None and launch.im2col:  # the GEMM of a 1x1 convolution over int8 rows
        assert "_im2col_kernel" in prepasses
        assert not (flags["FLAT_K"] or flags["ROW_K"] or flags["X_PACKED"] or flags["W_PACKED"])
        assert ("_unpack_int4_kernel" in prepasses) == w_packed
        return
    if launch is not None and launch.pad_image:  # the row walk over an aligned image
        assert prepasses == {"_pad_image_kernel"}
        assert flags["ROW_K"] and flags["ROW_ALIGN"] > 0 and not flags["W_PACKED"]
        return
    walk = {"tap": (False, False), "row": (False, True), "flat": (True, False),
            "grouped-tap": (False, False)}
    if kind in walk:
        assert (flags["FLAT_K"], flags["ROW_K"]) == walk[kind]
    else:
        assert flags["FLAT_K"] or flags["ROW_K"]
    unpack_first = launch is not None and launch.unpack_first
    w_in_tiles = w_packed and not flags["ROW_K"]  # the row walk lays weights out as int8 rows
    assert flags["X_PACKED"] == (x_packed and not unpack_first)
    assert flags["W_PACKED"] == (w_in_tiles and not unpack_first)
    assert prepasses == ({"_unpack_int4_kernel"} if unpack_first and (x_packed or w_in_tiles)
                         else set())


@pytest.mark.parametrize("kind, launch, pack", KERNEL_PATHS,
                         ids=[f"{k}-{l.describe() or 'plain' if l else 'proposed'}-{p or 'int8'}"
                              for k, l, p in KERNEL_PATHS])
@settings(max_examples=EXAMPLES_PER_PATH, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_exact_int32_against_reference(kind, launch, pack, data):
    case = data.draw(conv_cases(kind, launch, pack))
    gen = torch.Generator().manual_seed(case["seed"])
    x = values((case["n"], case["h"], case["w"], case["c"]), case["a_bits"], gen)
    w = values((case["o"], *case["kernel"], case["ci"]), case["w_bits"], gen)
    expected = reference(x, w, case["stride"], case["padding"], case["groups"], case["zp"])
    xin = pack_int4(x, dim=3) if "x" in pack else x
    win = pack_int4(w, dim=3) if "w" in pack else w
    out, log = launched_kernels(lambda: conv2d_int(
        xin, win, w_bits=case["w_bits"], a_bits=case["a_bits"], stride=case["stride"],
        padding=case["padding"], groups=case["groups"], x_zero_point=case["zp"], launch=launch))
    check_path(kind, launch, pack, log)
    assert out.dtype == torch.int32 and torch.equal(out, expected)


def test_resnet_like_layer_and_batch_one():
    gen = torch.Generator().manual_seed(0)
    x = values((1, 8, 8, 33), 8, gen)  # odd channel count: masked loads
    w = values((17, 3, 3, 33), 8, gen)
    assert torch.equal(conv2d_int(x, w, w_bits=8, a_bits=8, stride=2, padding=1),
                       reference(x, w, 2, 1, 1))


def test_padded_image_of_twelve_bytes_per_pixel():
    # 10 channels pad to 12 bytes per pixel, not a power of two: the pre-pass copies each
    # pixel as a power-of-two block, masked to the 12 bytes.
    gen = torch.Generator().manual_seed(0)
    x = values((1, 4, 5, 10), 8, gen)
    w = values((3, 2, 2, 10), 8, gen)
    out, log = launched_kernels(lambda: conv2d_int(x, w, w_bits=8, a_bits=8, padding=1,
                                                   x_zero_point=3, launch=Launch(pad_image=True)))
    assert "_pad_image_kernel" in [name for name, _ in log]
    assert torch.equal(out, reference(x, w, 1, 1, 1, zero_point=3))


@pytest.mark.parametrize("unpack_first", [False, True])  # in the tiles, or by a pre-pass
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_operands_over_several_channel_blocks(groups, unpack_first):
    # 2 x 66 channels: three 32-channel blocks per tap (the last one partial) per group,
    # packed bytes masked at the block edge; stride 2 and padding exercise the zero point.
    gen = torch.Generator().manual_seed(3)
    x = values((2, 5, 6, 66 * groups), 4, gen)
    w = values((10, 3, 3, 66), 4, gen)
    out = conv2d_int(pack_int4(x, dim=3), pack_int4(w, dim=3), w_bits=4, a_bits=4, stride=2,
                     padding=1, groups=groups, launch=Launch(unpack_first=unpack_first))
    assert torch.equal(out, reference(x, w, 2, 1, groups))


def test_packed_activations_with_odd_channels_per_group_are_rejected():
    gen = torch.Generator().manual_seed(0)
    x = pack_int4(values((1, 3, 3, 6), 4, gen), dim=3)  # 2 groups of 3 channels
    with pytest.raises(ConfigError, match=r"even channel count per group \(C // groups = 3\)"):
        conv2d_int(x, values((4, 1, 1, 3), 4, gen), w_bits=4, a_bits=4, groups=2)


def check_zero_point_padding(bits, zp, pack, x_shape, out_channels, device="cpu", launch=None):
    """Padding must read the zero point (a real 0). With scale 1 the float32 output is the exact
    integer sum((q_x - zp) * q_w) over an input zero-padded in real terms."""
    gen = torch.Generator().manual_seed(4)
    x, w = values(x_shape, bits, gen), values((out_channels, 3, 3, x_shape[3]), bits, gen)
    real = torch.nn.functional.conv2d((x.double() - zp).permute(0, 3, 1, 2),
                                      w.permute(0, 3, 1, 2).double(), padding=1)
    xin, win = (pack_int4(x, dim=3), pack_int4(w, dim=3)) if pack else (x, w)
    y = conv2d_int(xin.to(device), win.to(device), w_bits=bits, a_bits=bits, padding=1,
                   scale=torch.ones(out_channels, device=device), x_zero_point=zp,
                   out_dtype=torch.float32, launch=launch)
    assert torch.equal(y.cpu().double(), real.permute(0, 2, 3, 1))


@pytest.mark.parametrize("bits, zp, pack", [(8, -5, False), (4, 3, True)])
def test_zero_point_pads_the_tap_path(bits, zp, pack):
    # 32 channels: the tap-by-channel-block loop, which pads with 0 and adds the zero point
    # times the padded taps' weights in its epilogue.
    check_zero_point_padding(bits, zp, pack, (1, 4, 5, 32), 6)


@pytest.mark.parametrize("split_k", [1, 4])  # with split-K only one split adds it
@pytest.mark.parametrize("ci, groups, kernel, padding, stride", [
    (20, 1, (5, 3), (3, 2), 1),  # tap walk, padding wider than half the kernel
    (5, 1, (3, 3), (4, 1), 2),  # flattened walk; the first output rows are all padding
    (18, 2, (3, 5), (1, 3), (2, 1)),  # grouped
])
def test_zero_point_padding_correction_at_every_border(ci, groups, kernel, padding, stride,
                                                       split_k):
    check_padding_correction(ci, groups, kernel, padding, stride, (2, 6, 7),
                             launch=Launch(split_k))


def check_padding_correction(ci, groups, kernel, padding, stride, nhw, device="cpu",
                             launch=None):
    """The GEMM reads padding as 0 and adds zero point x the padded taps' weights per output
    pixel; the raw int32 accumulator must equal a convolution over zero-point padding."""
    gen = torch.Generator().manual_seed(5)
    x = values((*nhw, ci * groups), 8, gen)
    w = values((4 * groups, *kernel, ci), 8, gen)
    out = conv2d_int(x.to(device), w.to(device), w_bits=8, a_bits=8, stride=stride,
                     padding=padding, groups=groups, x_zero_point=-7, launch=launch)
    assert torch.equal(out.cpu(), reference(x, w, stride, padding, groups, zero_point=-7))


@pytest.mark.parametrize("launch", [Launch(im2col=True), Launch(3, im2col=True)])
@pytest.mark.parametrize("ci, groups, kernel, padding, stride", [
    (5, 1, (3, 3), (4, 1), 2), (18, 2, (3, 5), (1, 3), (2, 1))])
def test_im2col_rows_carry_the_zero_point(ci, groups, kernel, padding, stride, launch):
    check_padding_correction(ci, groups, kernel, padding, stride, (2, 6, 7), launch=launch)


@pytest.mark.parametrize("bits, zp, pack", [(8, -5, False), (4, 3, True)])
def test_im2col_with_packed_operands_and_the_epilogue(bits, zp, pack):
    # Packed activations go into the rows unpacked; packed weights are unpacked into rows
    # of whole 32-value blocks by a pre-pass on every call.
    check_zero_point_padding(bits, zp, pack, (2, 5, 4, 6), 7, launch=Launch(im2col=True))
    check_zero_point_padding(bits, zp, pack, (1, 4, 5, 32), 6,
                             launch=Launch(2, im2col=True))


@pytest.mark.parametrize("n, hw, ci, o, kernel, stride, padding, groups, zp, split", [
    (2, (6, 7), 16, 5, (3, 3), 1, 1, 1, 0, 1),      # 9 taps: the last pair's tap b is empty
    (1, (5, 5), 16, 9, (3, 3), 2, 1, 1, 5, 1),      # stride 2, zero point (padding correction)
    (2, (5, 6), 16, 4, (2, 2), 1, 0, 1, 0, 1),      # 4 taps: whole pairs
    (1, (7, 6), 16, 33, (1, 3), 1, (0, 1), 1, 7, 3),  # one kernel row; split-K
    (1, (4, 9), 16, 3, (3, 1), 1, (1, 0), 1, -8, 2),  # one kernel column: tap b wraps a row
    (1, (5, 5), 16, 6, (3, 3), 1, 1, 2, 2, 2),      # two groups of 16 channels
])
def test_tap_pairs_are_exact(n, hw, ci, o, kernel, stride, padding, groups, zp, split):
    # BLOCK_K = 2 x CI: each step takes two taps' channels (tap_pairs).
    from nas.kernels.conv_kernels import tap_pairs

    cfg = KernelConfig(64, 32, 2 * ci, 4, 1)
    assert tap_pairs(dict(FLAT_K=False, ROW_K=False, X_PACKED=False, W_PACKED=False, CI=ci,
                          BLOCK_K=cfg.block_k, K=kernel[0] * kernel[1] * ci))
    gen = torch.Generator().manual_seed(sum(hw) + o)
    x = values((n, *hw, ci * groups), 8, gen)
    w = values((o, *kernel, ci), 8, gen)
    out = conv2d_int(x, w, w_bits=8, a_bits=8, stride=stride, padding=padding, groups=groups,
                     x_zero_point=zp, config=cfg, launch=Launch(split))
    assert torch.equal(out, reference(x, w, stride, padding, groups, zp))


def test_gemm_geometry_is_the_kernels_geometry_parameters_in_their_order():
    # A launch passes GemmGeometry.kernel_args() by position, between the pointers and the
    # zero points: its fields must name those parameters of the kernel, in order.
    from dataclasses import fields

    from nas.kernels.conv import GemmGeometry
    from nas.kernels.conv_kernels import _conv_gemm_kernel

    names = _conv_gemm_kernel.arg_names
    params = names[names.index("ktab_ptr") + 1:names.index("x_zp")]
    assert [f.name for f in fields(GemmGeometry)] == [p.lower() for p in params]
    assert GemmGeometry(*range(15)).kernel_args() == tuple(range(15))


def test_tap_pairs_only_where_a_block_is_two_taps_of_int8_values():
    from nas.kernels.conv_kernels import tap_pairs

    base = dict(FLAT_K=False, ROW_K=False, X_PACKED=False, W_PACKED=False, CI=64, BLOCK_K=128,
                K=9 * 64)
    assert tap_pairs(base)
    for change in (dict(BLOCK_K=64), dict(CI=48), dict(K=64), dict(X_PACKED=True),
                   dict(W_PACKED=True), dict(FLAT_K=True), dict(ROW_K=True)):
        assert not tap_pairs({**base, **change}), change


@st.composite
def padded_image_cases(draw):
    """Layers a pad_image launch takes (a stem): one group, int8 activations, fewer than 16
    channels, KW x channels rounded up to 4 at most 32; any kernel height, stride, padding."""
    c = draw(st.integers(1, 8))
    kw = draw(st.sampled_from([k for k in (1, 2, 3, 5, 7) if k * (-(-c // 4) * 4) <= 32]))
    kh = draw(st.sampled_from([1, 3, 7]))
    ph, pw = draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, kw // 2 + 1))
    w_bits = draw(st.sampled_from([8, 4]))
    return dict(n=draw(st.integers(1, 2)), h=draw(st.integers(max(1, kh - 2 * ph), kh - 2 * ph + 4)),
                w=draw(st.integers(max(1, kw - 2 * pw), kw - 2 * pw + 6)), c=c,
                o=draw(st.integers(1, 40)), kernel=(kh, kw), padding=(ph, pw),
                stride=(draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3, 4]))),
                w_bits=w_bits, pack=w_bits == 4 and c % 2 == 0 and draw(st.booleans()),
                zp=draw(st.sampled_from([0, -128, 127, 5])), split=draw(st.sampled_from([1, 2, 3])),
                seed=draw(st.integers(0, 10**6)))


@settings(max_examples=int(os.environ.get("NAS_HYPOTHESIS_EXAMPLES", 60)) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(padded_image_cases())
def test_pad_image_launch_is_exact(case):
    # x is copied into an image with the zero point in its border and each pixel padded to
    # whole words; the row walk then reads aligned rows, lanes past the kernel row included
    # (zero weights), and corrects nothing.
    gen = torch.Generator().manual_seed(case["seed"])
    x = values((case["n"], case["h"], case["w"], case["c"]), 8, gen)
    w = values((case["o"], *case["kernel"], case["c"]), case["w_bits"], gen)
    out = conv2d_int(x, pack_int4(w, dim=3) if case["pack"] else w, w_bits=case["w_bits"],
                     a_bits=8, stride=case["stride"], padding=case["padding"],
                     x_zero_point=case["zp"], launch=Launch(case["split"], pad_image=True))
    assert torch.equal(out, reference(x, w, case["stride"], case["padding"], 1, case["zp"]))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.int8])
def test_pad_image_epilogue_matches_the_masked_row_walk(out_dtype):
    # The same integer accumulator reaches the same epilogue: identical outputs.
    gen = torch.Generator().manual_seed(6)
    x, w = values((2, 9, 10, 3), 8, gen), values((24, 7, 7, 3), 8, gen)
    args = dict(w_bits=8, a_bits=8, stride=2, padding=3, x_zero_point=-9,
                scale=torch.rand(24, generator=gen) * 1e-2, bias=torch.randn(24, generator=gen),
                relu=True, out_dtype=out_dtype, out_scale=0.05, out_zero_point=-3)
    padded = conv2d_int(x, w, launch=Launch(pad_image=True), **args)
    assert torch.equal(padded, conv2d_int(x, w, launch=Launch(), **args))
    assert (padded != padded.flatten()[0]).any()  # not a constant (ReLU, clamping)


def test_padded_image_geometry():
    from nas.kernels.conv import padded_image

    # ResNet-18's stem: 224 + 2 x 3 padded to 232 columns of 4-byte pixels; rows of a stride-2
    # walk start at multiples of 4 * gcd(232, 2) = 8 bytes.
    assert padded_image(64, 224, 224, 3, 7, 3, 3, 2, 1, False) == (230, 232, 4, 8)
    assert padded_image(1, 28, 28, 1, 3, 1, 1, 1, 1, False) == (30, 32, 4, 4)
    assert padded_image(1, 28, 28, 1, 3, 1, 1, 4, 1, False) == (30, 32, 4, 16)
    assert padded_image(1, 9, 9, 5, 3, 0, 1, 2, 1, False) == (9, 12, 8, 16)
    assert padded_image(1, 9, 9, 5, 5, 0, 1, 2, 1, False) is None  # 5 x 8 bytes > 32
    assert padded_image(1, 9, 9, 16, 1, 0, 0, 1, 1, False) is None  # the tap walk's
    assert padded_image(1, 9, 9, 6, 3, 1, 1, 1, 2, False) is None  # grouped
    assert padded_image(1, 9, 9, 4, 3, 1, 1, 1, 1, True) is None  # packed activations
    assert padded_image(2048, 512, 512, 3, 3, 1, 1, 1, 1, False) is None  # past int32


def test_pad_image_is_refused_where_the_layer_takes_none():
    gen = torch.Generator().manual_seed(0)
    x, w = values((1, 5, 5, 16), 8, gen), values((4, 3, 3, 16), 8, gen)
    with pytest.raises(ConfigError, match=r"pad_image is for a kernel-row walk .*launch this 3x3 "
                                          r"layer of 16 channels in 1 group\(s\) without it"):
        conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, launch=Launch(pad_image=True))


def _epilogue_case():
    gen = torch.Generator().manual_seed(1)
    x = values((2, 5, 5, 6), 8, gen)
    w = values((7, 3, 3, 6), 8, gen)
    scale = torch.rand(7, generator=gen) * 1e-3
    bias = torch.randn(7, generator=gen)
    zp = -5
    real = torch.nn.functional.conv2d((x.double() - zp).permute(0, 3, 1, 2),
                                      w.permute(0, 3, 1, 2).double(), padding=1)
    return x, w, scale, bias, zp, real.permute(0, 2, 3, 1) * scale.double() + bias.double()


@pytest.mark.parametrize("split_k", [1, 3])  # epilogue fused, or a kernel of its own
def test_fused_epilogue_dequantizes_with_zero_point_correction(split_k):
    x, w, scale, bias, zp, expected = _epilogue_case()
    y = conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, scale=scale, bias=bias, x_zero_point=zp,
                   out_dtype=torch.float32, launch=Launch(split_k))
    # int32 -> float32 times a float32 scale: relative error of a few float32 ulps.
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-5)
    relu = conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, scale=scale, bias=bias,
                      x_zero_point=zp, relu=True, launch=Launch(split_k))
    assert relu.dtype == torch.float16
    # The same float32 value rounded to float16 (11 significant bits): half an ulp, at most
    # 2**-11 of the value (measured: 4.3e-4 relative, 0.0156 at 38.8). rtol doubles it for the
    # float32 product and bias rounding before the conversion; atol covers that rounding
    # (2**-24 of terms below 2**7) where the output cancels towards 0 or ReLU clamps it.
    assert torch.allclose(relu.double(), expected.clamp(min=0), rtol=2 ** -10, atol=2 ** -16)


@pytest.fixture(scope="module")
def grouped_case():
    """A grouped convolution (35 output channels per group, 60 x 70 outputs: every epilogue
    tile has partial rows or columns) and its fused launch's outputs, float32 and int8. The
    fused launch runs no epilogue kernel, so the tile that kernel would take plays no part in
    them: computed once for every tile below."""
    gen = torch.Generator().manual_seed(9)
    x, w = values((2, 5, 6, 2 * 20), 8, gen), values((70, 3, 3, 20), 8, gen)
    scale, bias = torch.rand(70, generator=gen) * 1e-2, torch.randn(70, generator=gen)
    args = dict(w_bits=8, a_bits=8, padding=1, groups=2, scale=scale, bias=bias, relu=True,
                x_zero_point=-3)
    outputs = ((torch.float32, {}), (torch.int8, dict(out_scale=0.02)))
    fused, log = launched_kernels(lambda: [
        conv2d_int(x, w, out_dtype=out_dtype, launch=Launch(1), **args, **extra)
        for out_dtype, extra in outputs])
    assert [name for name, _ in log] == ["conv_gemm", "conv_gemm"]
    return x, w, args, list(zip(outputs, fused))


@pytest.mark.parametrize("tile", EPILOGUE_TILES)
def test_split_k_epilogue_of_a_grouped_convolution(tile, grouped_case, monkeypatch):
    # The separate epilogue kernel adds up the splits' partial sums and indexes output
    # channels across groups, in every tile it may run with.
    import nas.kernels.conv as conv

    monkeypatch.setattr(conv, "epilogue_tile", lambda m, o: tile)
    x, w, args, fused = grouped_case
    split = {}
    for (out_dtype, extra), fused_out in fused:
        split[out_dtype] = conv2d_int(x, w, out_dtype=out_dtype, launch=Launch(5), **args,
                                      **extra)
        assert torch.equal(fused_out, split[out_dtype])  # the same int32 sums, same epilogue code
    raw = reference(x, w, 1, 1, 2, zero_point=-3)
    scale, bias = args["scale"].double(), args["bias"].double()
    real = (raw.double() - (-3) * w.double().sum(dim=(1, 2, 3))) * scale + bias
    assert torch.allclose(split[torch.float32].double(), real.clamp(min=0), rtol=1e-6,
                          atol=1e-5)
    # without a scale: the raw int32 sums, added up exactly
    assert torch.equal(conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, groups=2,
                                  x_zero_point=-3, launch=Launch(5)), raw)


def test_split_k_epilogue_tiles_spread_small_layers_over_the_sms():
    assert epilogue_tile(49, 512) == (16, 16)  # ResNet-18 layer4 at batch 1: 4 x 32 programs
    assert epilogue_tile(784, 128) == (16, 32)  # layer2 at batch 1: 49 x 4
    assert epilogue_tile(3136, 64) == (32, 32)  # layer1 at batch 1: 98 x 2
    assert epilogue_tile(12544, 256) == (64, 64)  # layer3 at batch 64 (split on request)
    assert epilogue_tile(1, 1000) == (16, 16)  # the classifier: 63 programs at most


@pytest.mark.parametrize("split_k", [1, 3])
def test_requantized_int8_output(split_k):
    x, w, scale, bias, zp, _ = _epilogue_case()
    y = conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, scale=scale, bias=bias, x_zero_point=zp,
                   out_dtype=torch.float32, launch=Launch(1))
    q = conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, scale=scale, bias=bias, x_zero_point=zp,
                   out_dtype=torch.int8, out_scale=0.05, out_zero_point=3,
                   launch=Launch(split_k))
    expected = torch.clamp(torch.round(y / 0.05) + 3, -128, 127).to(torch.int8)
    assert q.dtype == torch.int8 and torch.equal(q, expected)


@pytest.mark.parametrize("shape, dim", [((4, 6), -1), ((6, 3), 0), ((2, 3, 3, 8), 3)])
def test_pack_unpack_roundtrip(shape, dim):
    t = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(t, dim)
    assert packed.dtype == torch.uint8 and packed.shape[dim] == t.shape[dim] // 2
    assert torch.equal(unpack_int4(packed, dim), t)


def test_pack_layout_and_errors():
    packed = pack_int4(torch.tensor([1, -1, -8, 7], dtype=torch.int8))
    assert packed.tolist() == [0xF1, 0x78]  # low nibble first, two's complement
    with pytest.raises(ConfigError, match="odd size 3"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ConfigError, match=r"values must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(ConfigError, match="takes an int8 tensor"):
        pack_int4(torch.zeros(2))


def test_depthwise_config_validator():
    assert all(validate_direct_config(d) for d in DEPTHWISE_CONFIGS + [INTERPRETER_DEPTHWISE])
    with pytest.raises(ConfigError, match=r"BLOCK_C=48 must be a power of two.*num_warps=3"):
        validate_direct_config(DirectConfig(64, 48, 3))


def test_config_validator():
    assert all(validate_config(c) for c in GPU_CONFIGS + [INTERPRETER_CONFIG])
    for bad, message in [(KernelConfig(64, 32, 16), "BLOCK_K=16 must be a multiple of 32"),
                         (KernelConfig(64, 32, 48), "BLOCK_K=48"),
                         (KernelConfig(32, 32, 32), "BLOCK_M=32 must be a multiple of 64"),
                         (KernelConfig(64, 24, 32), "BLOCK_N=24"),
                         (KernelConfig(64, 32, 32, num_warps=2), "num_warps=2 must be 4 or 8"),
                         (KernelConfig(64, 32, 32, maxnreg=100),
                          "maxnreg=100 must be a multiple of 8 in 24-255")]:
        with pytest.raises(ConfigError, match=message):
            validate_config(bad)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="BLOCK_K=16"):
        conv2d_int(values((1, 3, 3, 4), 8, gen), values((4, 1, 1, 4), 8, gen), w_bits=8, a_bits=8,
                   config=KernelConfig(64, 32, 16))


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=8, a_bits=8, groups=3), "need C % groups == 0"),
    (dict(w_bits=8, a_bits=4, x_zero_point=8),
     r"x_zero_point=8 is not a 4-bit code \(it must lie in \[-8, 7\]"),
    (dict(w_bits=9, a_bits=8), "w_bits=9: the integer kernels take 2-8 bits"),
    (dict(w_bits=8, a_bits=8, relu=True), "bias, relu and out_dtype need a scale"),
    (dict(w_bits=8, a_bits=8, padding=0, stride=1, groups=1, scale=torch.ones(4),
          out_dtype=torch.int8), "out_dtype int8 needs out_scale"),
    (dict(w_bits=8, a_bits=8, launch=Launch(0)), r"launch split_k=0 must be a positive whole"),
    (dict(w_bits=8, a_bits=8, launch=Launch(2.0)), r"launch split_k=2.0 must be a positive"),
    (dict(w_bits=8, a_bits=8, launch=Launch(unpack_first="yes")),
     r"launch unpack_first='yes' must be True or False"),
    (dict(w_bits=8, a_bits=8, launch=2), r"launch=2 must be a nas.kernels.configs.Launch"),
    (dict(w_bits=8, a_bits=8, launch=Launch(unpack_first=True, im2col=True)),
     "im2col already unpacks its operands"),
    (dict(w_bits=8, a_bits=8, launch=Launch(im2col=True, pad_image=True)),
     "pad_image is a layout of its own for the kernel-row walk; give it without unpack_first"),
    (dict(w_bits=8, a_bits=8, launch=Launch(pad_image=1)),
     r"launch pad_image=1 must be True or False"),
])
def test_bad_arguments(kwargs, message):
    gen = torch.Generator().manual_seed(0)
    x, w = values((1, 3, 3, 4), 8, gen), values((4, 1, 1, 4), 8, gen)
    with pytest.raises(ConfigError, match=message):
        conv2d_int(x, w, **kwargs)


def test_depthwise_rejects_a_bad_split_k_too():
    gen = torch.Generator().manual_seed(0)
    x, w = values((1, 3, 3, 4), 8, gen), values((4, 3, 3, 1), 8, gen)
    with pytest.raises(ConfigError, match=r"launch split_k=0 must be a positive whole number"):
        conv2d_int(x, w, w_bits=8, a_bits=8, groups=4, launch=Launch(0))


def test_packed_operand_with_more_than_four_bits_is_rejected():
    gen = torch.Generator().manual_seed(0)
    x = pack_int4(values((1, 3, 3, 4), 4, gen), dim=3)
    with pytest.raises(ConfigError, match="x is packed .* but has 8 bits"):
        conv2d_int(x, values((4, 1, 1, 4), 8, gen), w_bits=8, a_bits=8)


def test_autotuning_prunes_tiles_larger_than_the_problem():
    import triton

    from nas.kernels.conv import _prune

    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k})
               for c in GPU_CONFIGS]
    tiles = lambda kept: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])  # noqa: E731
                          for c in kept}
    flags = dict(FLAT_K=False, ROW_K=False, X_PACKED=False, W_PACKED=False)
    big = tiles(_prune(configs, {"M": 200704, "CO_G": 256, "CI": 128, "K": 1152}, **flags))
    assert big == tiles(configs)  # a large layer keeps every tile
    # Batch 1 at 7x7 (M = 49), 64 output channels, 3 input channels (a stem).
    assert tiles(_prune(configs, {"M": 49, "CO_G": 64, "CI": 3, "K": 147},
                        **{**flags, "ROW_K": True})) == {(64, 64, 32)}
    # Nothing fits 8 output channels: the smallest tile stands in.
    assert tiles(_prune(configs, {"M": 49, "CO_G": 8, "CI": 64, "K": 576}, **flags)) == {
        (64, 32, 64)}
    # 64 input channels: 128-wide blocks stay where the tap walk pairs taps (int8 operands,
    # two taps or more), not otherwise.
    layer1 = {"M": 64 * 56 * 56, "CO_G": 64, "CI": 64, "K": 9 * 64}
    k_sizes = lambda kept: {k for _, _, k in tiles(kept)}  # noqa: E731
    assert k_sizes(_prune(configs, layer1, **flags)) == {32, 64, 128}
    assert k_sizes(_prune(configs, layer1, **{**flags, "W_PACKED": True})) == {32, 64}
    assert k_sizes(_prune(configs, {**layer1, "K": 64}, **flags)) == {32, 64}


def test_split_k_is_proposed_where_tiles_cannot_fill_the_gpu():
    from nas.kernels.conv import propose_split_k

    # ResNet-18 3x3 layers on an H200 (132 SMs), counted in 64 x 64 tiles.
    assert propose_split_k(7 * 7, 512, 1, 512, 9, 132) == 16  # batch 1, layer4: 8 tiles
    assert propose_split_k(14 * 14, 256, 1, 256, 9, 132) == 9  # layer3: 16 tiles, 132 // 16 + 1
    assert propose_split_k(28 * 28, 128, 1, 128, 9, 132) == 4  # layer2: 18 steps, 4 per split
    assert propose_split_k(56 * 56, 64, 1, 64, 9, 132) == 1  # layer1: 49 tiles, enough
    assert propose_split_k(64 * 7 * 7, 512, 1, 512, 9, 132) == 1  # batch 64
    assert propose_split_k(7 * 7, 512, 1, 256, 1, 132) == 1  # a 1x1 conv: 4 steps, too few
    assert propose_split_k(1, 1000, 1, 512, 1, 132) == 2  # the classifier at batch 1
    assert propose_split_k(112 * 112, 64, 1, 3, 49, 132) == 1  # the stem (flattened walk)
    assert propose_split_k(8, 8, 2, 3, 49, 132) == 1  # flattened: 147 values = 3 steps


def test_gpu_launch_path_autotunes_and_keeps_the_variant_timing_finds_fastest(monkeypatch):
    # The GPU's host path (autotuning over GPU_CONFIGS, the launch variant chosen by timing)
    # run on the interpreter: a scripted clock stands in for CUDA graphs, 132 SMs for an H200.
    import types

    import nas.kernels.conv as conv

    timed = []
    clocks = {"split": lambda v: 1.0 / v.split_k, "whole": lambda v: float(v.split_k),
              "prepass": lambda v: 0.5 if v.pad_image else 1.0 if v.unpack_first or v.im2col
              else 2.0}

    def tile_clock(kernel_call, quantiles=None):
        kernel_call()  # autotuning runs each candidate tile
        return 1.0

    def launch_clock(fn):  # the launch choice times each whole launch
        fn()
        timed.append(fn.variant)
        return clocks[faster](fn.variant)

    monkeypatch.setattr(conv, "_INTERPRET", False)
    monkeypatch.setattr(conv, "_bench", tile_clock)
    monkeypatch.setattr(conv, "_time_launch", launch_clock)
    monkeypatch.setattr(conv, "_TUNED", None)
    monkeypatch.setattr(conv, "_LAUNCH_CHOICE", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gen = torch.Generator().manual_seed(8)
    x, w = values((1, 7, 7, 64), 8, gen), values((64, 3, 3, 64), 8, gen)
    scale, bias = torch.rand(64, generator=gen) * 1e-2, torch.randn(64, generator=gen)
    expected = reference(x, w, 1, 1, 1, zero_point=3)
    real = (expected.double() - 3 * w.double().sum(dim=(1, 2, 3))) * scale.double() + bias.double()
    args = dict(w_bits=8, a_bits=8, padding=1, x_zero_point=3)
    faster = "split"
    # The first call autotunes (three tiles fit), running the split kernel once per tile
    # into the same accumulator: it must be reset before the real run.
    assert torch.equal(conv.prepare_conv(x, w, launch=Launch(2), **args)(), expected)
    # 49 pixels x 64 channels: one tile for 132 SMs; 9 reduction steps: 2 splits proposed.
    launch = conv.prepare_conv(x, w, **args)
    assert launch.variant == Launch(2) and timed == [Launch(1), Launch(2)]
    assert torch.equal(launch(), expected) and torch.equal(launch(), expected)
    assert conv.tuned_config(launch).endswith(" split_k=2")
    fused = conv.prepare_conv(x, w, scale=scale, bias=bias, out_dtype=torch.float32, **args)
    assert fused.variant == Launch(2)
    assert torch.allclose(fused().double(), real, rtol=1e-6, atol=1e-5)
    conv.prepare_conv(x, w, **args)
    assert len(timed) == 4  # the fused case was timed once; the repeat not at all
    faster = "whole"
    monkeypatch.setattr(conv, "_LAUNCH_CHOICE", {})
    # Inside a CUDA graph capture nothing is timed: no split until a call outside decides.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert conv.prepare_conv(x, w, **args).variant == Launch(1) and len(timed) == 4
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert conv.prepare_conv(x, w, **args).variant == Launch(1) and len(timed) == 6
    # Packed 4-bit weights: each split is also timed with the unpacking pre-pass.
    faster, timed[:] = "prepass", []
    w4 = values((64, 3, 3, 64), 4, gen)
    packed = conv.prepare_conv(x, pack_int4(w4, dim=3), w_bits=4, a_bits=8, padding=1)
    assert timed == [Launch(1), Launch(2), Launch(1, unpack_first=True),
                     Launch(2, unpack_first=True)]
    assert packed.variant == Launch(1, unpack_first=True)
    assert torch.equal(packed(), reference(x, w4, 1, 1, 1))
    # Three input channels (a stem): also timed with im2col and the padded image; one split
    # (one reduction step).
    timed[:] = []
    x3, w3 = values((2, 9, 9, 3), 8, gen), values((64, 3, 3, 3), 8, gen)
    stem = conv.prepare_conv(x3, w3, stride=2, **args)
    assert timed == [Launch(1), Launch(1, im2col=True), Launch(1, pad_image=True)]
    assert stem.variant == Launch(pad_image=True)
    assert torch.equal(stem(), reference(x3, w3, 2, 1, 1, zero_point=3))
    assert conv.tuned_config(stem).endswith(" pad_image=1")
    # Depthwise: its own kernel, autotuned over channel tiles no wider than the layer needs.
    monkeypatch.setattr(conv, "_TUNED_DW", None)
    xd, wd = values((2, 6, 6, 40), 8, gen), values((40, 3, 3, 1), 8, gen)
    dw = conv.prepare_conv(xd, wd, w_bits=8, a_bits=8, padding=1, groups=40, x_zero_point=3)
    assert torch.equal(dw(), reference(xd, wd, 1, 1, 40, zero_point=3))
    assert conv.tuned_config(dw) in {f"BLOCK_M={d.block_m} BLOCK_C={d.block_c} warps={d.num_warps}"
                                     for d in DEPTHWISE_CONFIGS if d.block_c <= 64}


def test_autotuner_times_tiles_with_the_tables_graph_timer(monkeypatch):
    # Triton's autotuner asks for milliseconds at three quantiles; each tile is timed as the
    # table times a layer (CUDA graphs, here a scripted clock in microseconds).
    import nas.kernels.conv as conv

    calls = []
    monkeypatch.setattr(conv, "_time_launch", lambda fn: calls.append(fn) or 250.0)
    tile = object()
    assert conv._bench(tile, quantiles=(0.5, 0.2, 0.8)) == [0.25, 0.25, 0.25]
    assert conv._bench(tile, quantiles=None) == 0.25 and calls == [tile, tile]
    assert conv._quick_bench() == {"do_bench": conv._bench}


def test_im2col_is_refused_where_its_rows_would_pass_int32_offsets():
    x = torch.empty((1, 8192, 8192, 1), dtype=torch.int8)  # 2**26 pixels x 32-value rows
    w = torch.ones((1, 3, 3, 1), dtype=torch.int8)
    with pytest.raises(ConfigError, match=r"im2col rows of 67108864 pixels x 32 values pass "
                                          r"int32 offsets; launch this layer without im2col"):
        conv2d_int(x, w, w_bits=8, a_bits=8, padding=1, launch=Launch(im2col=True))


def test_split_k_is_refused_where_its_partial_sums_would_pass_int32_offsets():
    x = torch.empty((1, 1024, 512, 1), dtype=torch.int8)  # 2**19 pixels
    w = torch.ones((64, 1, 1, 1), dtype=torch.int8)
    with pytest.raises(ConfigError, match=r"64 splits' partial sums of 524288 pixels x 64 "
                                          r"channels pass int32 offsets; launch this layer "
                                          r"with fewer splits"):
        conv2d_int(x, w, w_bits=8, a_bits=8, launch=Launch(64))
    with pytest.raises(ConfigError, match=r"launch split_k=65: at most 64 splits \(the "
                                          r"epilogue kernel reads every split's partial sums\)"):
        conv2d_int(x[:, :8, :8], w, w_bits=8, a_bits=8, launch=Launch(65))


def test_padding_corrections_hold_the_padded_taps_weights_of_every_rectangle():
    from nas.kernels.conv import padding_corrections

    gen = torch.Generator().manual_seed(3)
    tap_sums = torch.randint(-500, 500, (4, 3, 5), generator=gen, dtype=torch.int32)
    corr = padding_corrections(tap_sums, x_zp=-7)
    assert corr.shape == (4 * 4 * 6 * 6, 4) and corr.dtype == torch.int32
    for h_lo in range(4):
        for h_hi in range(h_lo, 4):
            for w_lo in range(6):
                for w_hi in range(w_lo, 6):
                    inside = tap_sums[:, h_lo:h_hi, w_lo:w_hi].sum(dim=(1, 2))
                    row = (h_lo * 4 + h_hi) * 36 + w_lo * 6 + w_hi
                    assert torch.equal(corr[row], -7 * (tap_sums.sum(dim=(1, 2)) - inside))


def test_depthwise_takes_its_tile_as_a_direct_config():
    gen = torch.Generator().manual_seed(4)
    # 70 pixels in tiles of 16 (the last one partial; the third spans both images), 40
    # channels in tiles of 8.
    x, w = values((2, 5, 7, 40), 8, gen), values((40, 3, 3, 1), 8, gen)
    out, log = launched_kernels(lambda: conv2d_int(x, w, w_bits=8, a_bits=8, padding=1,
                                                   groups=40, x_zero_point=5,
                                                   config=DirectConfig(16, 8, 2)))
    assert torch.equal(out, reference(x, w, 1, 1, 40, zero_point=5))
    (name, flags), = log
    assert (name, flags["BLOCK_M"], flags["BLOCK_C"], flags["num_warps"]) == (
        "_conv_depthwise_kernel", 16, 8, 2)
    with pytest.raises(ConfigError, match=r"is a depthwise tile; this convolution \(groups=1, "
                                          r"40 input channels per group\) runs as a GEMM"):
        conv2d_int(x, values((8, 3, 3, 40), 8, gen), w_bits=8, a_bits=8,
                   config=DirectConfig(16, 8, 2))


def _signed_byte(word: int, i: int) -> int:
    b = (word >> (8 * i)) & 0xFF
    return b - 256 if b > 127 else b


def _dp4a(a: int, b: int, c: int) -> int:
    """PTX dp4a.s32.s32: c + the four signed byte products of a and b (32-bit wrap)."""
    return (c + sum(_signed_byte(a, i) * _signed_byte(b, i) for i in range(4))) & 0xFFFFFFFF


def run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """The few PTX integer instructions the GPU's inline assembly uses (nibble unpacking,
    byte products), evaluated on 32-bit registers named as in the string ($0, $1, ...), so
    the exact strings the kernels compile are checked."""
    regs = dict(regs)
    ops = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
           "shr.u32": lambda a, b: a >> b, "mul.lo.u32": lambda a, b: (a * b) & 0xFFFFFFFF,
           "dp4a.s32.s32": _dp4a}
    for statement in asm.strip("{} ").split(";"):
        words = statement.replace(",", " ").split()
        if not words or words[0] == ".reg":
            continue
        op, dst, *args = words
        values = [regs[a] if a in regs else int(a, 0) for a in args]
        regs[dst] = ops[op](*values)
    return regs


def test_gpu_nibble_unpacking_sign_extends_all_four_bytes_of_a_word():
    from nas.kernels import conv_kernels

    low, high = conv_kernels._LOW_NIBBLES.value, conv_kernels._HIGH_NIBBLES.value
    gen = torch.Generator().manual_seed(5)
    for byte in range(256):
        for position in range(4):
            others = torch.randint(0, 256, (4,), generator=gen).tolist()
            others[position] = byte
            word = sum(b << (8 * i) for i, b in enumerate(others))
            got = [run_ptx(low, {"$1": word})["$0"], run_ptx(high, {"$1": word})["$0"]]
            for asm_out, shift in zip(got, (0, 4)):
                out = [(asm_out >> (8 * i)) & 0xFF for i in range(4)]
                for i, b in enumerate(others):
                    nibble = (b >> shift) & 0xF
                    assert out[i] == (nibble - 16 if nibble > 7 else nibble) & 0xFF


def test_gpu_byte_products_add_each_value_to_its_own_accumulator():
    # _DP4A_MAC as Triton runs it with pack=4: four int8 values of x in $4 and of w in $5
    # (value j in byte j), four int32 accumulators in $6-$9, the four results in $0-$3.
    from nas.kernels import conv_kernels

    asm = conv_kernels._DP4A_MAC.value
    gen = torch.Generator().manual_seed(8)
    edges = [-128, -127, -1, 0, 1, 127]
    for trial in range(300):
        x = torch.randint(-128, 128, (4,), generator=gen).tolist()
        w = torch.randint(-128, 128, (4,), generator=gen).tolist()
        acc = torch.randint(-2 ** 31, 2 ** 31 - 1, (4,), generator=gen).tolist()
        if trial < len(edges) ** 2:  # every pair of extreme bytes, in every position
            x = [edges[trial // len(edges)]] * 4
            w = [edges[trial % len(edges)]] * 4
        regs = {"$4": sum((v & 0xFF) << (8 * j) for j, v in enumerate(x)),
                "$5": sum((v & 0xFF) << (8 * j) for j, v in enumerate(w))}
        regs.update({f"${6 + j}": a & 0xFFFFFFFF for j, a in enumerate(acc)})
        out = run_ptx(asm, regs)
        for j in range(4):
            assert out[f"${j}"] == (acc[j] + x[j] * w[j]) & 0xFFFFFFFF


@pytest.mark.parametrize("ci, a_bits", [(20, 8), (3, 8), (4, 4)])  # tap, row, flattened walk
def test_epilogue_in_column_halves_equals_the_whole_tile(ci, a_bits):
    # Tiles of 64 or more columns finish a scaled output in two halves of columns (fewer
    # registers live), each with its padding correction. 45 channels: the second half is
    # partly masked. Same arithmetic per element, so equal to the last bit.
    gen = torch.Generator().manual_seed(12)
    x, w = values((2, 6, 5, ci), a_bits, gen), values((45, 3, 3, ci), 8, gen)
    if a_bits == 4:
        x = pack_int4(x, dim=3)
    scale, bias = torch.rand(45, generator=gen) * 1e-2, torch.randn(45, generator=gen)
    kwargs = dict(w_bits=8, a_bits=a_bits, padding=1, scale=scale, bias=bias, x_zero_point=-3,
                  relu=True, launch=Launch())
    halves = {}  # each launch's float32 output, finished in column halves
    for out in ({"out_dtype": torch.float32}, {"out_dtype": torch.int8, "out_scale": 0.02}):
        whole = conv2d_int(x, w, config=KernelConfig(64, 32, 32, 4, 1), **kwargs, **out)
        half = conv2d_int(x, w, config=KernelConfig(64, 64, 32, 4, 1), **kwargs, **out)
        assert torch.equal(whole, half)
        if out["out_dtype"] == torch.float32:
            halves[kwargs["launch"]] = half
    # Raw int32 accumulators and split-K partial sums finish in halves too (the unsplit
    # launch's float32 output was compared above).
    xr = unpack_int4(x, dim=3) if a_bits == 4 else x
    for launch in (Launch(), Launch(3)):
        raw = conv2d_int(x, w, w_bits=8, a_bits=a_bits, padding=1, x_zero_point=-3,
                         launch=launch, config=KernelConfig(64, 64, 32, 4, 1))
        assert torch.equal(raw, reference(xr, w, 1, 1, 1, zero_point=-3))
        if launch not in halves:
            split = dict(kwargs, launch=launch, out_dtype=torch.float32)
            halves[launch] = conv2d_int(x, w, config=KernelConfig(64, 64, 32, 4, 1), **split)
            assert torch.equal(conv2d_int(x, w, config=KernelConfig(64, 32, 32, 4, 1), **split),
                               halves[launch])
    real = torch.nn.functional.conv2d((xr.double() + 3).permute(0, 3, 1, 2),
                                      w.permute(0, 3, 1, 2).double(), padding=1)
    expected = (real.permute(0, 2, 3, 1) * scale.double() + bias.double()).clamp(min=0)
    assert torch.allclose(halves[Launch()].double(), expected, rtol=1e-6, atol=1e-5)
