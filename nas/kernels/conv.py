"""Integer 2-D convolution: checks a call against the layout contract, prepares it once and
launches the Triton kernels of `nas.kernels.conv_kernels` (on a GPU: autotuned tiles, and the
launch variant - split-K, 4-bit unpacking pre-pass, im2col or padded-image pre-pass - chosen
by timing)."""

from __future__ import annotations

import functools
import math
from dataclasses import astuple, dataclass, field, replace
from typing import NamedTuple

import torch

from nas.errors import ConfigError
from nas.kernels.configs import (DEPTHWISE_CONFIGS, GPU_CONFIGS, INTERPRETER_CONFIG,
                                 FLAT_K_BELOW, INTERPRETER_DEPTHWISE, DirectConfig, KernelConfig,
                                 Launch, epilogue_tile, propose_split_k, validate_config,
                                 validate_direct_config, validate_launch)
# First: without a GPU, importing the kernels switches Triton to its interpreter.
from nas.kernels.conv_kernels import (_INTERPRET, _OUT_FP16, _OUT_FP32, _OUT_INT8, _OUT_INT32,
                                      ROW_WIDTH, _conv_depthwise_kernel, conv_gemm, tap_pairs,
                                      _epilogue_kernel, _im2col_kernel, _pad_image_kernel,
                                      _unpack_int4_kernel)
from nas.kernels.pack import unpack_int4

import triton  # noqa: E402  (after the kernels: see above)

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _unpacked_size(t: torch.Tensor, packed: bool) -> int:
    return t.shape[-1] * 2 if packed else t.shape[-1]


def _check_bits(bits: int, what: str) -> None:
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ConfigError(f"{what}={bits}: the integer kernels take 2-8 bits")


def _check_operands(x, w, w_bits: int, a_bits: int, x_zero_point: int) -> tuple[bool, bool]:
    """Bits, dtypes, ranks and the zero point's range; whether x and w come packed."""
    _check_bits(w_bits, "w_bits")
    _check_bits(a_bits, "a_bits")
    lo, hi = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
    if not lo <= x_zero_point <= hi:
        raise ConfigError(f"conv2d_int: x_zero_point={x_zero_point} is not a {a_bits}-bit code "
                          f"(it must lie in [{lo}, {hi}], like the activations)")
    x_packed, w_packed = x.dtype == torch.uint8, w.dtype == torch.uint8
    for t, packed, bits, name in ((x, x_packed, a_bits, "x"), (w, w_packed, w_bits, "w")):
        if t.dtype not in (torch.int8, torch.uint8):
            raise ConfigError(f"conv2d_int: {name} must be int8 (values) or uint8 (packed 4-bit), "
                              f"got {t.dtype}")
        if packed and bits > 4:
            raise ConfigError(f"conv2d_int: {name} is packed (uint8) but has {bits} bits; only "
                              f"values of 4 bits or fewer are packed")
        if t.ndim != 4:
            raise ConfigError(f"conv2d_int: {name} must be 4-D ({'NHWC' if name == 'x' else 'OHWI'})")
    return x_packed, w_packed


def _output_mode(scale, bias, relu: bool, out_dtype, out_scale) -> tuple[int, torch.dtype]:
    """The epilogue's output mode and dtype: the raw int32 accumulator without a scale."""
    if scale is None:
        if bias is not None or relu or out_dtype not in (None, torch.int32):
            raise ConfigError("conv2d_int: bias, relu and out_dtype need a scale (without one "
                              "the result is the raw int32 accumulator)")
        return _OUT_INT32, torch.int32
    out_torch = out_dtype or torch.float16
    out_mode = {torch.float16: _OUT_FP16, torch.float32: _OUT_FP32,
                torch.int8: _OUT_INT8}.get(out_torch)
    if out_mode is None:
        raise ConfigError(f"conv2d_int: out_dtype {out_torch} is not float16, float32 or int8")
    if out_mode == _OUT_INT8 and not out_scale:
        raise ConfigError("conv2d_int: out_dtype int8 needs out_scale")
    return out_mode, out_torch


def _weight_sums(w, w_packed: bool, per_channel: bool, x_zp_padded: int, dummy):
    """Weight sums the epilogue needs (`dummy` where it needs none): per output channel, for
    the zero-point correction; with padding to correct (`x_zp_padded`, the zero point, or 0
    for none), `padding_corrections`."""
    if not (per_channel or x_zp_padded):
        return dummy, dummy
    tap_sums = (unpack_int4(w, dim=3) if w_packed else w).to(torch.int32).sum(dim=3)
    wsum = tap_sums.sum(dim=(1, 2)).to(torch.int32).contiguous() if per_channel else dummy
    corr = padding_corrections(tap_sums, x_zp_padded) if x_zp_padded else dummy
    return wsum, corr


def padding_corrections(tap_sums: torch.Tensor, x_zp: int) -> torch.Tensor:
    """What the GEMM, reading padding as 0, misses of padding that reads `x_zp`: for every
    rectangle [kh_lo, kh_hi) x [kw_lo, kw_hi) of in-image taps, x_zp times the weights of the
    taps outside it, per output channel. `tap_sums` [O, KH, KW] are the weights summed over
    input channels. Returns int32 [(KH + 1)^2 * (KW + 1)^2, O], row
    (kh_lo * (KH + 1) + kh_hi) * (KW + 1)^2 + kw_lo * (KW + 1) + kw_hi (rows with lo > hi
    are never read)."""
    o, kh, kw = tap_sums.shape
    pfx = torch.zeros((o, kh + 1, kw + 1), dtype=torch.int64, device=tap_sums.device)
    pfx[:, 1:, 1:] = tap_sums.to(torch.int64).cumsum(dim=1).cumsum(dim=2)  # P[o, a, b]
    # rect[o, h_lo, h_hi, w_lo, w_hi] =
    #     P[h_hi, w_hi] - P[h_lo, w_hi] - P[h_hi, w_lo] + P[h_lo, w_lo]
    rect = (pfx[:, None, :, None, :] - pfx[:, :, None, None, :] - pfx[:, None, :, :, None]
            + pfx[:, :, None, :, None])
    corr = x_zp * (pfx[:, kh, kw].view(o, 1, 1, 1, 1) - rect)
    return corr.reshape(o, -1).t().to(torch.int32).contiguous()


def kernel_rows(w: torch.Tensor, packed: bool, channels: int | None = None) -> torch.Tensor:
    """OHWI weights as the kernel-row walk (ROW_K) reads them: int8 [O, KH, ROW_WIDTH], each
    kernel row's KW x `channels` values first (each tap's I values, then zeros up to
    `channels`: the pixels of a `pad_image` launch's image), zeros after."""
    values = unpack_int4(w, dim=3) if packed else w
    o, kh, kw, ci = values.shape
    cp = channels or ci
    taps = torch.zeros((o, kh, kw, cp), dtype=torch.int8, device=w.device)
    taps[..., :ci] = values
    rows = torch.zeros((o, kh, ROW_WIDTH.value), dtype=torch.int8, device=w.device)
    rows[:, :, :kw * cp] = taps.reshape(o, kh, kw * cp)
    return rows


def padded_image(n: int, h: int, wd: int, c: int, kw: int, ph: int, pw: int, sw: int,
                 groups: int, x_packed: bool) -> tuple[int, int, int, int] | None:
    """The image a `pad_image` launch copies x into: (height, width, bytes per pixel,
    ROW_ALIGN), or None where the layer takes none. Only a kernel-row walk with one group (a
    stem) takes one, where a kernel row of pixels padded to whole 4-byte words still fits
    ROW_WIDTH and the image keeps within int32 offsets. The width is rounded up to 4 pixels,
    so that the rows of a stride-2 (4) walk start at multiples of 8 (16) bytes: a row of
    output pixel (n, oh, ow) starts at ((n * height + oh * sh + kh) * width + ow * sw) * cp,
    a multiple of cp * gcd(width, sw)."""
    cp = -(-c // 4) * 4
    if groups != 1 or x_packed or c >= FLAT_K_BELOW or kw * cp > ROW_WIDTH.value:
        return None
    hp, wp = h + 2 * ph, -(-(wd + 2 * pw) // 4) * 4
    if n * hp * wp * cp + ROW_WIDTH.value >= 2 ** 31:
        return None
    v = cp * math.gcd(wp, sw)
    return hp, wp, cp, min(16, v & -v)  # the largest power of two dividing v


# Rows after K in a flattened-walk table: the widest BLOCK_K (a block may run past K by less
# than that; those lanes are masked, the rows only keep their loads in bounds).
FLAT_TABLE_PAD = 128


def flat_walk_table(kh: int, kw: int, ci: int, width: int, channels: int,
                    device) -> torch.Tensor:
    """int32 [K + FLAT_TABLE_PAD, 2] for the flattened walk (K = kh * kw * ci positions
    k = (tap_h, tap_w, c), c fastest): the offset of k's value in NHWC x from the value under
    the pixel's tap (0, 0), (tap_h * width + tap_w) * channels + c, and tap_h * 256 + tap_w
    (zeros past K). Made once per layer, so the kernels look positions up instead of
    dividing per element."""
    k = torch.arange(kh * kw * ci, dtype=torch.int64)
    tap, c = k // ci, k % ci
    tap_h, tap_w = tap // kw, tap % kw
    table = torch.zeros((k.numel() + FLAT_TABLE_PAD, 2), dtype=torch.int64)
    table[:k.numel(), 0] = (tap_h * width + tap_w) * channels + c
    table[:k.numel(), 1] = tap_h * 256 + tap_w
    return table.to(device=device, dtype=torch.int32).contiguous()


def conv2d_int(x: torch.Tensor, w: torch.Tensor, *, w_bits: int, a_bits: int, stride=1,
               padding=0, groups: int = 1, scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, relu: bool = False,
               out_dtype: torch.dtype | None = None, x_zero_point: int = 0,
               out_scale: float | None = None, out_zero_point: int = 0,
               config: KernelConfig | DirectConfig | None = None,
               launch: Launch | None = None) -> torch.Tensor:
    """Integer convolution. Layout contract:

    - `x`: NHWC activations, int8 holding quantized values q_x (signed; at a_bits=4 in
      [-8, 7]), or, for a_bits <= 4 only, uint8 with two values per byte packed along C
      (`pack_int4(x, dim=3)`, C even). Padding reads `x_zero_point`, the code of a real 0.
    - `w`: OHWI weights [O, KH, KW, C // groups], int8 values (at w_bits=4 in [-8, 7]), or,
      for w_bits <= 4, uint8 packed along I (`pack_int4(w, dim=3)`, I even). Values at fewer
      than 8 bits are held in int8 unpacked; only the uint8 dtype means "packed".
    - `scale=None`: returns the exact int32 accumulator sum(q_x * q_w), NHWC [N, OH, OW, O].
    - `scale` (float32 [O], e.g. s_x * s_w per output channel): returns
      scale * (acc - x_zero_point * sum(q_w)) + bias, then ReLU if asked, as `out_dtype`
      float16 (default) or float32, or int8 requantized as
      clamp(round_half_even(y / out_scale) + out_zero_point, -128, 127).
    - Depthwise convolutions (groups == C == O: one channel in and out per group) use a direct kernel;
      other groupings run one implicit GEMM per group.
    - `config` (KernelConfig) fixes the GEMM's tile instead of autotuning it; `launch`
      (Launch: split-K, 4-bit unpacking pre-pass, im2col or padded-image pre-pass) fixes how
      it is launched.
      With `launch=None` a GPU times the candidates once per layer geometry and keeps the
      fastest: no split and `propose_split_k`'s, each plain, with the unpacking pre-pass
      (packed operands), with im2col (fewer than FLAT_K_BELOW input channels per group) and
      with the padded image (`padded_image`: stems).
      Untimed on the CPU interpreter and with a pinned `config` (the proposed split, no
      pre-pass), and inside a CUDA graph capture for a layer not yet timed (no split, no
      pre-pass). The depthwise kernel takes its tile as a `DirectConfig` (autotuned without
      one) and ignores a KernelConfig and `launch`.
    """
    return prepare_conv(x, w, w_bits=w_bits, a_bits=a_bits, stride=stride, padding=padding,
                        groups=groups, scale=scale, bias=bias, relu=relu, out_dtype=out_dtype,
                        x_zero_point=x_zero_point, out_scale=out_scale,
                        out_zero_point=out_zero_point, config=config, launch=launch)()


@dataclass(frozen=True)
class GemmGeometry:
    """A layer as `_conv_gemm_kernel` walks it, its geometry arguments in its order (each
    field is the kernel's parameter of that name in capitals): NHWC input of h x w pixels of
    c values (all groups), oh x ow output pixels, kernel width, strides and padding; ci input
    and co_g output channels per group, o output channels in all, m output pixels and k
    reduction positions per group (KH x KW x ci; the kernel derives KH from it)."""
    h: int
    w: int
    c: int
    oh: int
    ow: int
    kw: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    ci: int
    co_g: int
    o: int
    m: int
    k: int

    def kernel_args(self) -> tuple[int, ...]:
        return astuple(self)


@dataclass(frozen=True)
class _Epilogue:
    """What every kernel's fused epilogue reads: per-channel scale, bias and weight sums (a
    one-value dummy where unused), the zero points and the output scale, and its flags."""
    scale: torch.Tensor
    bias: torch.Tensor
    wsum: torch.Tensor
    x_zp: int
    out_scale: float
    out_zp: int
    flags: dict  # HAS_SCALE, HAS_BIAS, RELU, OUT_MODE


@dataclass
class _GemmLayer:
    """A GEMM convolution checked and prepared once: its operands, epilogue inputs and
    padding-correction table, the kernel flags every launch variant starts from, the tile
    (None: autotuned), and the buffers the variants share (they run one at a time)."""
    x: torch.Tensor
    w: torch.Tensor
    x_packed: bool
    w_packed: bool
    n: int
    kh: int
    groups: int
    geometry: GemmGeometry
    out: torch.Tensor
    epilogue: _Epilogue
    corr: torch.Tensor
    ktab: torch.Tensor | None  # the flattened walk's position table
    dummy: torch.Tensor
    flags: dict
    tile: KernelConfig | None
    buffers: dict = field(default_factory=dict)

    @property
    def kp(self) -> int:
        return im2col_row(self.geometry.k)

    @property
    def image(self) -> tuple[int, int, int, int] | None:
        """The padded image of a `pad_image` launch (`padded_image`), or None."""
        g = self.geometry
        return padded_image(self.n, g.h, g.w, g.c, g.kw, g.pad_h, g.pad_w, g.stride_w,
                            self.groups, self.x_packed)

    def buffer(self, name: str, shape, dtype=torch.int8, zeroed=False, make=None):
        if name not in self.buffers:
            self.buffers[name] = make() if make else (torch.zeros if zeroed else torch.empty)(
                shape, dtype=dtype, device=self.x.device)
        return self.buffers[name]

    def check(self, launch: Launch) -> None:
        """Refuse a launch variant this layer cannot take."""
        g = self.geometry
        if launch.pad_image and self.image is None:
            raise ConfigError(
                f"conv2d_int: pad_image is for a kernel-row walk (one group, int8 activations, "
                f"fewer than {FLAT_K_BELOW} input channels, KW x channels rounded up to 4 at most "
                f"{ROW_WIDTH.value}); launch this {self.kh}x{g.kw} layer of {g.c} channels in "
                f"{self.groups} group(s) without it")
        if launch.im2col and not im2col_fits(g.m, self.groups, g.k):
            raise ConfigError(f"conv2d_int: im2col rows of {g.m} pixels x {self.groups * self.kp} "
                              f"values pass int32 offsets; launch this layer without im2col")
        if launch.split_k * g.m * g.o >= 2 ** 31:
            raise ConfigError(f"conv2d_int: {launch.split_k} splits' partial sums of {g.m} "
                              f"pixels x {g.o} channels pass int32 offsets; launch this layer "
                              f"with fewer splits")


class _Operands(NamedTuple):
    """What the GEMM of one launch variant runs on, and the pre-passes that make it."""
    prepasses: list
    x: torch.Tensor
    w: torch.Tensor
    geometry: GemmGeometry
    flags: dict


def prepare_conv(x: torch.Tensor, w: torch.Tensor, *, w_bits: int, a_bits: int, stride=1,
                 padding=0, groups: int = 1, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, relu: bool = False,
                 out_dtype: torch.dtype | None = None, x_zero_point: int = 0,
                 out_scale: float | None = None, out_zero_point: int = 0,
                 config: KernelConfig | DirectConfig | None = None,
                 launch: Launch | None = None):
    """Check and prepare a `conv2d_int` call (same arguments and contract) and return a
    callable that only launches the kernels (pre-passes, GEMM, epilogue) into preallocated
    buffers and returns the output: what `nas measure` times and captures in CUDA graphs
    (a `GemmLaunch`, whose `variant` is the Launch it runs, or the depthwise kernel's)."""
    x_packed, w_packed = _check_operands(x, w, w_bits, a_bits, x_zero_point)
    if launch is not None:
        validate_launch(launch)
    n, h, wd = x.shape[:3]
    c = _unpacked_size(x, x_packed)
    o, kh, kw = w.shape[:3]
    ci = _unpacked_size(w, w_packed)
    if c % groups or o % groups or ci != c // groups:
        raise ConfigError(f"conv2d_int: x has {c} channels, w is [{o}, {kh}, {kw}, {ci}] with "
                          f"groups={groups}; need C % groups == 0, O % groups == 0 and "
                          f"I == C // groups")
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ConfigError(f"conv2d_int: a {kh}x{kw} kernel does not fit a {h}x{wd} input "
                          f"with padding {padding}")
    out_mode, out_torch = _output_mode(scale, bias, relu, out_dtype, out_scale)
    device = x.device
    x, w = x.contiguous(), w.contiguous()
    geometry = GemmGeometry(h, wd, c, oh, ow, kw, sh, sw, ph, pw, ci, o // groups, o,
                            n * oh * ow, kh * kw * ci)
    out = torch.empty((n, oh, ow, o), dtype=out_torch, device=device)
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    depthwise = groups == c and ci == 1 and o == c and groups > 1
    # The GEMM pads with 0 and corrects in the kernel (see _conv_gemm_kernel); the depthwise
    # kernel reads the zero point itself.
    pad_fix = x_zero_point != 0 and (ph > 0 or pw > 0) and not depthwise
    wsum, corr = _weight_sums(w, w_packed, scale is not None, x_zero_point * pad_fix, dummy)
    epilogue = _Epilogue(
        scale=(scale.to(device=device, dtype=torch.float32).contiguous() if scale is not None
               else dummy),
        bias=(bias.to(device=device, dtype=torch.float32).contiguous() if bias is not None
              else dummy),
        wsum=wsum, x_zp=x_zero_point, out_scale=float(out_scale or 1.0), out_zp=out_zero_point,
        flags=dict(HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, RELU=relu,
                   OUT_MODE=out_mode))
    if depthwise:  # (its weights, [C, KH, KW, 1], are never packed: one value per channel)
        return _depthwise_launch(x, w, x_packed, kh, geometry, out, epilogue, config)
    layer = _gemm_layer(x, w, x_packed, w_packed, n, kh, groups, geometry, out, epilogue,
                        corr, dummy, pad_fix, config)
    if launch is not None:
        layer.check(launch)
        return GemmLaunch(layer, launch)
    sms = INTERPRETER_SMS if _INTERPRET else torch.cuda.get_device_properties(
        device).multi_processor_count
    proposal = propose_split_k(geometry.m, geometry.co_g, groups, ci, kh * kw, sms)
    if layer.tile is not None:
        return GemmLaunch(layer, Launch(proposal))
    variants = timed_launches(n, h, wd, c, o, kh, kw, (sh, sw), (ph, pw), groups, x_packed,
                              w_packed, sms)
    key = (str(device), n, h, wd, c, o, kh, kw, sh, sw, ph, pw, groups,
           tuple(sorted(layer.flags.items())))
    return _fastest(functools.partial(GemmLaunch, layer), key, variants)


def _depthwise_launch(x, w, x_packed: bool, kh: int, g: GemmGeometry, out, epilogue: _Epilogue,
                      config):
    """The depthwise kernel's launch: a given DirectConfig's tile, the interpreter's, or
    autotuned (a KernelConfig is ignored)."""
    e = epilogue
    args = (x, depthwise_taps(w), out, e.scale, e.bias, e.wsum, g.h, g.w, g.c, g.oh, g.ow, kh,
            g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.m, e.x_zp, e.out_scale, e.out_zp)
    tile = (validate_direct_config(config) if isinstance(config, DirectConfig)
            else INTERPRETER_DEPTHWISE if _INTERPRET else None)
    return functools.partial(_run_depthwise, args, {**e.flags, "X_PACKED": x_packed}, tile,
                             g.m, g.c, out)


def _run_depthwise(args: tuple, flags: dict, tile: DirectConfig | None, m: int, c: int,
                   out: torch.Tensor) -> torch.Tensor:
    if tile is not None:
        _conv_depthwise_kernel[(triton.cdiv(m, tile.block_m), triton.cdiv(c, tile.block_c))](
            *args, BLOCK_M=tile.block_m, BLOCK_C=tile.block_c, num_warps=tile.num_warps,
            **flags)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),  # noqa: E731
                             triton.cdiv(c, meta["BLOCK_C"]))
        _tuned_depthwise()[grid](*args, **flags)
    return out


def _gemm_layer(x, w, x_packed: bool, w_packed: bool, n: int, kh: int, groups: int,
                g: GemmGeometry, out, epilogue: _Epilogue, corr, dummy, pad_fix: bool,
                config) -> _GemmLayer:
    """Check a GEMM convolution and prepare what its launch variants share."""
    if x_packed and g.ci % 2:
        raise ConfigError(f"conv2d_int: packed activations need an even channel count per group "
                          f"(C // groups = {g.ci}); pass them unpacked (int8)")
    if isinstance(config, DirectConfig):
        raise ConfigError(f"conv2d_int: {config} is a depthwise tile; this convolution (groups="
                          f"{groups}, {g.ci} input channels per group) runs as a GEMM and takes a "
                          f"KernelConfig")
    tile = validate_config(config or INTERPRETER_CONFIG)
    # Few input channels: a kernel row per GEMM block where it fits (int8 activations), else
    # the flattened walk.
    row_walk = g.ci < FLAT_K_BELOW and g.kw * g.ci <= ROW_WIDTH.value and not x_packed
    flat_walk = g.ci < FLAT_K_BELOW and not row_walk
    # The flattened walk's (and im2col's) position table; kernel sizes are checked to fit it.
    if max(kh, g.kw) > 255:
        raise ConfigError(f"conv2d_int: a {kh}x{g.kw} kernel is wider than 255 taps")
    ktab = flat_walk_table(kh, g.kw, g.ci, g.w, g.c, x.device) if flat_walk else None
    flags = {**epilogue.flags, "X_PACKED": x_packed, "W_PACKED": w_packed, "FLAT_K": flat_walk,
             "ROW_K": row_walk, "ROW_ALIGN": 0, "PAD_FIX": pad_fix}
    return _GemmLayer(x, w, x_packed, w_packed, n, kh, groups, g, out, epilogue, corr, ktab,
                      dummy, flags, tile if (_INTERPRET or config is not None) else None)


def _gemm_operands(layer: _GemmLayer, variant: Launch) -> _Operands:
    if variant.im2col:
        return _im2col_operands(layer)
    if variant.pad_image:
        return _pad_image_operands(layer)
    if layer.flags["ROW_K"]:
        return _row_operands(layer)
    return _tile_operands(layer, variant.unpack_first)


def _unpack_prepass(src: torch.Tensor, dst: torch.Tensor, row_bytes: int, dst_row: int):
    """A pre-pass writing packed `src` to int8 `dst`, rows of `row_bytes` bytes to rows of
    `dst_row` values (the weights, read from memory on every call like any operand)."""
    grid = (triton.cdiv(src.numel(), 1024),)
    return functools.partial(_unpack_int4_kernel[grid], src, dst, src.numel(), row_bytes,
                             dst_row, BLOCK=1024)


def _tile_operands(layer: _GemmLayer, unpack_first: bool) -> _Operands:
    """The tap or flattened walk on the operands as given, packed ones unpacked in every tile
    that reads them, or (`unpack_first`) to int8 once per call, by a pre-pass (weights: once
    per row of tiles otherwise)."""
    g, prepasses, xa, wa = layer.geometry, [], layer.x, layer.w
    if unpack_first and layer.x_packed:
        xa = layer.buffer("x8", (*layer.x.shape[:3], g.c))
        prepasses.append(_unpack_prepass(layer.x, xa, layer.x.shape[3], g.c))
    if unpack_first and layer.w_packed:
        wa = layer.buffer("w8", (g.o, layer.kh, g.kw, g.ci))
        prepasses.append(_unpack_prepass(layer.w, wa, layer.w.shape[3], g.ci))
    flags = {**layer.flags, "X_PACKED": layer.x_packed and xa is layer.x,
             "W_PACKED": layer.w_packed and wa is layer.w}
    return _Operands(prepasses, xa, wa, g, flags)


def _row_operands(layer: _GemmLayer) -> _Operands:
    """The kernel-row walk: weights as rows of ROW_WIDTH, laid out once."""
    wa = layer.buffer("w_rows", None, make=lambda: kernel_rows(layer.w, layer.w_packed))
    return _Operands([], layer.x, wa, layer.geometry, {**layer.flags, "W_PACKED": False})


def _im2col_operands(layer: _GemmLayer) -> _Operands:
    """A 1x1 GEMM over im2col rows [M, groups x kp] (written by a pre-pass, the zero point in
    the padding) and weights [O, kp], zero past K (int8 ones laid out once, packed ones
    unpacked by a pre-pass)."""
    g, kp, groups = layer.geometry, layer.kp, layer.groups
    col = layer.buffer("col", (g.m, groups * kp))
    fresh = "w_col" not in layer.buffers
    w_col = layer.buffer("w_col", (g.o, 1, 1, kp), zeroed=True)
    if fresh and not layer.w_packed:
        w_col.view(g.o, kp)[:, :g.k] = layer.w.reshape(g.o, g.k)
    table = layer.ktab if layer.ktab is not None else layer.buffer(
        "ktab", None, make=lambda: flat_walk_table(layer.kh, g.kw, g.ci, g.w, g.c,
                                                   layer.x.device))
    prepasses = [functools.partial(
        _im2col_kernel[(triton.cdiv(g.m, 64), kp // 32, groups)], layer.x, col, table, g.h,
        g.w, g.c, g.oh, g.ow, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.ci, g.m, g.k,
        kp, layer.epilogue.x_zp, X_PACKED=layer.x_packed, BLOCK_M=64, BLOCK_K=32)]
    if layer.w_packed:
        prepasses.append(_unpack_prepass(layer.w, w_col, g.k // 2, kp))
    rows = GemmGeometry(h=1, w=g.m, c=groups * kp, oh=1, ow=g.m, kw=1, stride_h=1, stride_w=1,
                        pad_h=0, pad_w=0, ci=kp, co_g=g.co_g, o=g.o, m=g.m, k=kp)
    flags = {**layer.flags, "X_PACKED": False, "W_PACKED": False, "FLAT_K": False,
             "ROW_K": False, "PAD_FIX": False}  # the zero point is in the rows
    return _Operands(prepasses, col, w_col, rows, flags)


def _pad_image_operands(layer: _GemmLayer) -> _Operands:
    """The kernel-row walk over x copied (by a pre-pass) into the padded image, whose border,
    the zero point, is written once, and weights as rows of its pixels."""
    g = layer.geometry
    hp, wp, cp, align = layer.image
    xp = layer.buffer("x_image", None, make=lambda: torch.full(
        (layer.n * hp * wp * cp + ROW_WIDTH.value,), layer.epilogue.x_zp, dtype=torch.int8,
        device=layer.x.device))  # a row of slack: the walk reads past the last pixel
    row_block = min(256, triton.next_power_of_2(g.w))
    prepasses = [functools.partial(
        _pad_image_kernel[(layer.n * g.h, triton.cdiv(g.w, row_block))], layer.x, xp, g.h, g.w,
        g.c, g.pad_h, g.pad_w, hp, wp, CP=cp, CP_BLOCK=triton.next_power_of_2(cp),
        BLOCK=row_block)]
    wa = layer.buffer("w_image_rows", None, make=lambda: kernel_rows(layer.w, layer.w_packed, cp))
    image = replace(g, h=hp, w=wp, c=cp, pad_h=0, pad_w=0, ci=cp, k=layer.kh * g.kw * cp)
    flags = {**layer.flags, "W_PACKED": False, "ROW_ALIGN": align,
             "PAD_FIX": False}  # the zero point is in the image's border
    return _Operands(prepasses, xp, wa, image, flags)


class GemmLaunch:
    """One launch variant of a prepared GEMM layer: its pre-passes, the GEMM (the layer's
    tile, or autotuned) and, split, the epilogue kernel. Calling it runs them and returns
    the output."""

    def __init__(self, layer: _GemmLayer, variant: Launch):
        self.layer, self.variant = layer, variant
        g, e, split = layer.geometry, layer.epilogue, variant.split_k
        # Split-K: each split stores its partial int32 sums in a slice of its own, which the
        # epilogue kernel adds up (nothing to zero first).
        self.acc = (layer.out if split == 1
                    else layer.buffer(f"partials{split}", (split, g.m, g.o), torch.int32))
        self.operands = ops = _gemm_operands(layer, variant)
        self.args = (ops.x, ops.w, self.acc, e.scale, e.bias, e.wsum, layer.corr,
                     layer.dummy if layer.ktab is None else layer.ktab,
                     *ops.geometry.kernel_args(), e.x_zp, e.out_scale, e.out_zp)
        self.epilogue_tile = epilogue_tile(g.m, g.o)

    def __call__(self) -> torch.Tensor:
        layer, ops, split = self.layer, self.operands, self.variant.split_k
        for prepass in ops.prepasses:
            prepass()
        m, co_g, programs = ops.geometry.m, ops.geometry.co_g, layer.groups * split
        tile = layer.tile
        if tile is not None:
            grid = (triton.cdiv(m, tile.block_m), triton.cdiv(co_g, tile.block_n), programs)
            conv_gemm[grid](*self.args, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                            BLOCK_K=tile.block_k, num_warps=tile.num_warps,
                            num_stages=tile.num_stages, SPLIT_K=split, **ops.flags,
                            **_register_cap(tile))
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),  # noqa: E731
                                 triton.cdiv(co_g, meta["BLOCK_N"]), programs)
            _tuned()[grid](*self.args, SPLIT_K=split, **ops.flags)
        if split > 1:
            self._sum_splits()
        return layer.out

    def _sum_splits(self) -> None:
        """Split-K's epilogue kernel: the splits' partial sums added up, then the epilogue."""
        g, e, (block_m, block_n) = self.layer.geometry, self.layer.epilogue, self.epilogue_tile
        _epilogue_kernel[(triton.cdiv(g.m, block_m), triton.cdiv(g.o, block_n))](
            self.acc, self.layer.out, e.scale, e.bias, g.m, g.o, e.out_scale, e.out_zp,
            SPLITS=self.variant.split_k, BLOCK_M=block_m, BLOCK_N=block_n, **e.flags)


def depthwise_taps(w: torch.Tensor) -> torch.Tensor:
    """Depthwise weights [C, KH, KW, 1] tap-major, [KH * KW, C] int8: each tap's weights for
    consecutive channels side by side (see _conv_depthwise_kernel)."""
    c, kh, kw = w.shape[:3]
    return w.reshape(c, kh * kw).t().contiguous()


def im2col_row(k: int) -> int:
    """Values in one group's im2col row: the reduction padded to whole 32-value blocks."""
    return -(-k // 32) * 32


def im2col_fits(m: int, groups: int, k: int) -> bool:
    """Whether im2col's rows for m pixels keep within its int32 offsets."""
    return m * groups * im2col_row(k) < 2 ** 31


def launch_candidates(proposal: int, packed: bool, few_channels: bool,
                      pad_image: bool = False) -> list[Launch]:
    """The launch variants a GPU times for a layer: no split and the proposed split, each
    plain, with the unpacking pre-pass (packed operands), with im2col (few input channels
    per group, where its offsets fit) and with the padded image (where `padded_image` gives
    one)."""
    splits = sorted({1, proposal})
    return ([Launch(s) for s in splits] + [Launch(s, unpack_first=True) for s in splits if packed]
            + [Launch(s, im2col=True) for s in splits if few_channels]
            + [Launch(s, pad_image=True) for s in splits if pad_image])


def timed_launches(n: int, h: int, wd: int, c: int, o: int, kh: int, kw: int, stride,
                   padding, groups: int, x_packed: bool, w_packed: bool,
                   sms: int) -> list[Launch]:
    """The launch variants a GPU times for a GEMM layer of this geometry (`launch_candidates`,
    the split as `propose_split_k` proposes it for `sms` SMs); compiling ahead
    (`nas.kernels.aot`) enumerates the same."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    m = n * ((h + 2 * ph - kh) // sh + 1) * ((wd + 2 * pw - kw) // sw + 1)
    ci = c // groups
    proposal = propose_split_k(m, o // groups, groups, ci, kh * kw, sms)
    image = padded_image(n, h, wd, c, kw, ph, pw, sw, groups, x_packed)
    return launch_candidates(proposal, x_packed or w_packed,
                             ci < FLAT_K_BELOW and im2col_fits(m, groups, ci * kh * kw),
                             image is not None)


def _fastest(gemm_launch, key: tuple, variants: list[Launch]):
    """The launch variant that timing finds fastest for this layer, timed once per layer."""
    if len(variants) == 1:
        return gemm_launch(variants[0])
    if key not in _LAUNCH_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            # Timing would break the capture; the next call outside it decides.
            return gemm_launch(variants[0])
        times = {}
        for variant in variants:  # each whole launch (pre-passes, GEMM, split-K's epilogue)
            fn = gemm_launch(variant)
            fn()  # autotunes outside the timing
            times[variant] = _time_launch(fn)
        _LAUNCH_CHOICE[key] = min(times, key=times.get)
    return gemm_launch(_LAUNCH_CHOICE[key])


# Packed operands are also timed unpacked first, by a pre-pass, and layers with few input
# channels with im2col; split-K as `propose_split_k` proposes (see nas.kernels.configs).
INTERPRETER_SMS = 132  # the CPU interpreter splits as an H200 would be proposed to
_LAUNCH_CHOICE: dict[tuple, Launch] = {}  # layer -> the variant timed fastest


_TUNED = _TUNED_DW = None


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (batch-1 layers, few channels): they only waste
    lanes and autotuning time; a BLOCK_K of two taps' channels stays where the tap walk
    takes taps in pairs (`tap_pairs`). The smallest configuration always survives."""
    def fits(c):
        kw = c.kwargs
        return (kw["BLOCK_M"] <= max(64, triton.next_power_of_2(named_args["M"]))
                and kw["BLOCK_N"] <= max(16, triton.next_power_of_2(named_args["CO_G"]))
                and (kw["BLOCK_K"] <= max(32, triton.next_power_of_2(named_args["CI"]))
                     or tap_pairs({**named_args, **kwargs, **kw})))
    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _time_launch(fn) -> float:
    """Microseconds per call of a whole prepared launch, replayed in CUDA graphs as `nas
    measure` times it (eager timing would charge its several launches' host overhead), with
    fewer replays: this only ranks a layer's variants."""
    from nas.kernels.timing import CudaGraphTimer  # only ever on a GPU

    return CudaGraphTimer(reps=20, warmup=3)(fn)


def _bench(kernel_call, quantiles):
    """The autotuner's timer (milliseconds, one value per quantile asked): tiles are ranked as
    the table times layers, in CUDA graphs of back-to-back calls (`_time_launch`). Triton's
    own `do_bench` times one launch at a time with the L2 cache flushed, host launch overhead
    in; it ranked close tiles differently, so the chosen tile, and with it table entries,
    moved by up to 35-50 % between runs on two H200s (cost_models/README.md)."""
    ms = _time_launch(kernel_call) / 1e3
    return [ms] * len(quantiles) if quantiles else ms


def gemm_autotune_configs() -> list:
    """GPU_CONFIGS as Triton autotuning configs, in the same order."""
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k},
                          num_warps=c.num_warps, num_stages=c.num_stages, **_register_cap(c))
            for c in map(validate_config, GPU_CONFIGS)]


def depthwise_autotune_configs() -> list:
    """DEPTHWISE_CONFIGS as Triton autotuning configs, in the same order."""
    return [triton.Config({"BLOCK_M": d.block_m, "BLOCK_C": d.block_c}, num_warps=d.num_warps)
            for d in map(validate_direct_config, DEPTHWISE_CONFIGS)]


def _tuned():
    """The GEMM kernel autotuned over GPU_CONFIGS (built once, on first GPU use)."""
    global _TUNED
    if _TUNED is None:
        configs = gemm_autotune_configs()
        # PAD_FIX is in the key: the padding correction changes the epilogue's cost; SPLIT_K
        # changes the work per program (its partial sums overwrite their slices, so tuning
        # runs need nothing reset).
        _TUNED = triton.autotune(configs, key=["M", "CO_G", "K", "CI", "PAD_FIX", "SPLIT_K"],
                                 prune_configs_by={"early_config_prune": _prune},
                                 **_quick_bench())(conv_gemm)
    return _TUNED


def _register_cap(cfg: KernelConfig) -> dict:
    """The launch option of a register cap, where the tile has one."""
    return {} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}


def _quick_bench() -> dict:
    import inspect

    # Older Triton releases take no do_bench argument; they tune with their default.
    return {"do_bench": _bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def _tuned_depthwise():
    """The depthwise kernel autotuned over DEPTHWISE_CONFIGS (built once, on first GPU use)."""
    global _TUNED_DW
    if _TUNED_DW is None:
        configs = depthwise_autotune_configs()
        _TUNED_DW = triton.autotune(configs, key=["M", "C", "KH", "KW", "stride_h"],
                                    prune_configs_by={"early_config_prune": _prune_depthwise},
                                    **_quick_bench())(_conv_depthwise_kernel)
    return _TUNED_DW


def _prune_depthwise(configs, named_args, **kwargs):
    """Drop channel tiles wider than the layer (the narrowest tile always survives)."""
    kept = [c for c in configs
            if c.kwargs["BLOCK_C"] <= max(32, triton.next_power_of_2(named_args["C"]))]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_C"])]


def tuned_config(case_launch) -> str | None:
    """The autotuned configuration `case_launch` (a `prepare_conv` launch) runs with, as text;
    None where nothing was tuned (CPU interpreter, explicit config)."""
    if _INTERPRET:
        return None  # the interpreter runs its own fixed tiles: no call would tune anything
    saved = {t: t.best_config for t in (_TUNED, _TUNED_DW) if t is not None}
    for tuner in saved:
        tuner.best_config = None
    case_launch()
    for tuner in (_TUNED, _TUNED_DW):  # either may have been built by the call
        cfg = getattr(tuner, "best_config", None)
        if cfg is not None:
            kw = cfg.kwargs
            if "BLOCK_C" in kw:
                return f"BLOCK_M={kw['BLOCK_M']} BLOCK_C={kw['BLOCK_C']} warps={cfg.num_warps}"
            variant = getattr(case_launch, "variant", Launch()).describe()
            return (f"BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']} BLOCK_K={kw['BLOCK_K']} "
                    f"warps={cfg.num_warps} stages={cfg.num_stages}"
                    + (f" maxnreg={cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else "")
                    + (f" {variant}" if variant else ""))
    for tuner, cfg in saved.items():
        tuner.best_config = cfg
    return None
