"""Integer 2-D convolution in Triton: implicit GEMM for dense and grouped convolutions, a
direct kernel for depthwise ones, with a fused dequantize / bias / ReLU / requantize epilogue.
"""

from __future__ import annotations

import os

import torch

from nas.errors import ConfigError
from nas.kernels.configs import GPU_CONFIGS, INTERPRETER_CONFIG, KernelConfig, validate_config

_INTERPRET = not torch.cuda.is_available()
if _INTERPRET:
    # Must be decided before triton.jit runs: without a GPU the kernels are interpreted.
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Only builtins of triton.language are used (tl.full, not tl.zeros): the library's own
# @jit helpers are compiled for a GPU if something imported triton before the interpreter
# was switched on, and then cannot run under it.

_OUT_INT32, _OUT_FP16, _OUT_FP32, _OUT_INT8 = 0, 1, 2, 3
# Fewer input channels per group than this: the GEMM walks the flattened (kh, kw, ci) axis
# instead of one tap at a time (a block of 32 channels would be mostly padding).
FLAT_K_BELOW = 16


@triton.jit
def _load_x(x_ptr, off, in_image, valid, x_zp, X_PACKED: tl.constexpr):
    """Activation values as int32: padding reads `x_zp` (the depthwise kernel passes the zero
    point, a real 0; the GEMM passes 0 and corrects in its epilogue), and lanes outside the
    GEMM read 0 so they add nothing."""
    if X_PACKED:
        byte = tl.load(x_ptr + off // 2, mask=valid & in_image, other=0).to(tl.int32)
        nib = tl.where(off % 2 == 0, byte & 0xF, (byte >> 4) & 0xF)
        val = tl.where(nib > 7, nib - 16, nib)
    else:
        val = tl.load(x_ptr + off, mask=valid & in_image, other=0).to(tl.int32)
    val = tl.where(in_image, val, x_zp)
    return tl.where(valid, val, 0)


@triton.jit
def _pixels(pid_m, M, OH, OW, BLOCK_M: tl.constexpr):
    """Output pixel rows of this tile: flat index, validity, image, row, column."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rem = offs_m % (OH * OW)
    return offs_m, offs_m < M, offs_m // (OH * OW), rem // OW, rem % OW


@triton.jit
def _epilogue(acc, co, co_mask, out_ptrs, out_mask, scale_ptr, bias_ptr, wsum_ptr, x_zp,
              out_scale, out_zp, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
              RELU: tl.constexpr, OUT_MODE: tl.constexpr):
    if HAS_SCALE:
        wsum = tl.load(wsum_ptr + co, mask=co_mask, other=0)
        scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0)
        y = (acc - x_zp * wsum[None, :]).to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + co, mask=co_mask, other=0.0)[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        if OUT_MODE == 3:
            v = y / out_scale
            r = tl.floor(v)
            d = v - r
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)  # round half to even
            q = tl.minimum(tl.maximum(r + out_zp, -128.0), 127.0)
            tl.store(out_ptrs, q.to(tl.int8), mask=out_mask)
        elif OUT_MODE == 1:
            tl.store(out_ptrs, y.to(tl.float16), mask=out_mask)
        else:
            tl.store(out_ptrs, y, mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _unpack_int4_rows(byte, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 2] bytes of packed nibbles -> [ROWS, COLS] int8 in element order (low
    nibble first). Shifts on the signed byte sign-extend each nibble (a few integer
    operations per byte: this runs on CUDA cores for every tile), then join + reshape
    interleave the halves."""
    b = byte.to(tl.int8, bitcast=True)
    lo = ((b << 4).to(tl.int8) >> 4).to(tl.int8)
    hi = (b >> 4).to(tl.int8)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))


@triton.jit
def _unpack_int4_kernel(src_ptr, dst_ptr, N_BYTES, BLOCK: tl.constexpr):
    """Packed nibbles -> int8 values, low nibble first (`unpack_int4` along the last axis of
    a flat buffer): the pre-pass of an `unpack_first` launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N_BYTES
    b = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int8, bitcast=True)
    tl.store(dst_ptr + 2 * offs, ((b << 4).to(tl.int8) >> 4).to(tl.int8), mask=mask)
    tl.store(dst_ptr + 2 * offs + 1, (b >> 4).to(tl.int8), mask=mask)


@triton.jit
def _padding_correction(oh, ow, rows, co, co_mask, pfx_ptr, H, W, KH, KW, stride_h, stride_w,
                        pad_h, pad_w):
    """Sum of the weights of each output pixel's taps that fall in the padding, per output
    channel: [rows, channels] int32. The taps inside the image form a rectangle
    [kh_lo, kh_hi) x [kw_lo, kw_hi); `pfx` holds 2-D prefix sums of the per-tap weight sums,
    P[co, a, b] = sum over kh < a, kw < b, so the rectangle costs four lookups. Interior
    pixels (no padded tap) load nothing."""
    kh_lo = tl.minimum(tl.maximum(pad_h - oh * stride_h, 0), KH)
    kh_hi = tl.maximum(tl.minimum(H + pad_h - oh * stride_h, KH), kh_lo)
    kw_lo = tl.minimum(tl.maximum(pad_w - ow * stride_w, 0), KW)
    kw_hi = tl.maximum(tl.minimum(W + pad_w - ow * stride_w, KW), kw_lo)
    border = rows & ((kh_lo > 0) | (kh_hi < KH) | (kw_lo > 0) | (kw_hi < KW))
    mask = border[:, None] & co_mask[None, :]
    base = pfx_ptr + (co * ((KH + 1) * (KW + 1)))[None, :]
    rect = tl.load(base + (kh_hi * (KW + 1) + kw_hi)[:, None], mask=mask, other=0)
    rect -= tl.load(base + (kh_lo * (KW + 1) + kw_hi)[:, None], mask=mask, other=0)
    rect -= tl.load(base + (kh_hi * (KW + 1) + kw_lo)[:, None], mask=mask, other=0)
    rect += tl.load(base + (kh_lo * (KW + 1) + kw_lo)[:, None], mask=mask, other=0)
    total = tl.load(base + KH * (KW + 1) + KW, mask=co_mask[None, :], other=0)
    return tl.where(mask, total - rect, 0)


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "KW", "stride_h", "stride_w", "pad_h",
                               "pad_w", "M", "x_zp", "out_zp"])
def _conv_gemm_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, wsum_ptr, pfx_ptr,
                      H, W, C, OH, OW, KW, stride_h, stride_w, pad_h, pad_w,
                      CI, CO_G, O, M, K, x_zp, out_scale, out_zp,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                      OUT_MODE: tl.constexpr, X_PACKED: tl.constexpr, W_PACKED: tl.constexpr,
                      FLAT_K: tl.constexpr, PAD_FIX: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One group's GEMM tile: rows are output pixels (n, oh, ow), columns output channels,
    the reduction runs over (kh, kw, ci), ci fastest as in OHWI weights.

    Two ways to walk the reduction: by kernel tap and, within a tap, blocks of BLOCK_K input
    channels, so every load is a contiguous run of channels (vectorised, no per-element
    division); or, for few input channels (FLAT_K: a stem's 3), over the flattened
    (kh, kw, ci) axis, gathering element by element, so that blocks are not mostly empty.
    Geometry arguments are not specialised (one compilation serves every layer); channel
    counts are, for alignment.

    Padding is read as 0 whatever the activation zero point: a masked load whose default is
    0 is cp.async's own zero fill, and the tile goes straight from shared memory to the
    tensor cores (any other default costs a pass through registers per tile, measured on
    the H200 at 1.5-1.9x slower on ResNet-18's 3x3 layers at batch 64). Padding should read
    the zero point (a real 0), so with PAD_FIX the epilogue adds x_zp times the weights of
    the padded taps (`_padding_correction`); channels past CI read 0 and meet zero weights.

    SPLIT_K > 1 (problems with too few tiles to fill the GPU, e.g. batch 1): the reduction
    steps are shared among SPLIT_K programs per tile, which add their partial int32 sums
    into the zeroed `out_ptr` atomically (integer addition: exact in any order); the
    epilogue then runs as its own kernel (`_epilogue_kernel`)."""
    g = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) - g * SPLIT_K
    offs_m, m_mask, img, oh, ow = _pixels(tl.program_id(0), M, OH, OW, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CO_G
    co = g * CO_G + offs_n
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)  # a builtin: see the note at the top
    if FLAT_K:
        steps = (K + BLOCK_K - 1) // BLOCK_K  # not tl.cdiv: see the note at the top
    else:
        blocks = (CI + BLOCK_K - 1) // BLOCK_K
        steps = (K // CI) * blocks
    if SPLIT_K == 1:
        first, last = 0, steps
    else:
        per_split = (steps + SPLIT_K - 1) // SPLIT_K
        first = split * per_split
        last = tl.minimum(first + per_split, steps)
    if FLAT_K:
        for step in range(first, last):
            offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            ci = offs_k % CI
            tap = offs_k // CI
            kh = tap // KW
            ih = oh[:, None] * stride_h - pad_h + kh[None, :]
            iw = ow[:, None] * stride_w - pad_w + (tap - kh * KW)[None, :]
            in_image = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            valid = m_mask[:, None] & k_mask[None, :]
            x_off = ((img[:, None] * H + ih) * W + iw) * C + g * CI + ci[None, :]
            a = _load_x(x_ptr, x_off, in_image, valid, 0, X_PACKED).to(tl.int8)
            w_off = co[:, None] * K + offs_k[None, :]
            w_valid = n_mask[:, None] & k_mask[None, :]
            if W_PACKED:
                byte = tl.load(w_ptr + w_off // 2, mask=w_valid, other=0).to(tl.int32)
                nib = tl.where(w_off % 2 == 0, byte & 0xF, (byte >> 4) & 0xF)
                b = tl.where(nib > 7, nib - 16, nib).to(tl.int8)
            else:
                b = tl.load(w_ptr + w_off, mask=w_valid, other=0)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    else:
        HALF_K: tl.constexpr = BLOCK_K // 2
        offs_c = tl.arange(0, BLOCK_K)
        offs_b = tl.arange(0, HALF_K)  # byte columns of packed operands
        for step in range(first, last):
            tap = step // blocks
            c0 = (step - tap * blocks) * BLOCK_K
            kh = tap // KW
            ih = oh * stride_h - pad_h + kh
            iw = ow * stride_w - pad_w + (tap - kh * KW)
            in_image = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = (img * H + ih) * W + iw
            k0 = tap * CI + c0  # this block's first position in an OHWI weight row
            if X_PACKED:  # CI even (checked), so a byte never straddles two groups
                x_off = pix[:, None] * (C // 2) + ((g * CI + c0) // 2 + offs_b)[None, :]
                x_mask = in_image[:, None] & (c0 + 2 * offs_b < CI)[None, :]
                a = _unpack_int4_rows(tl.load(x_ptr + x_off, mask=x_mask, other=0),
                                      BLOCK_M, BLOCK_K)
            else:
                x_off = pix[:, None] * C + (g * CI + c0 + offs_c)[None, :]
                x_mask = in_image[:, None] & (c0 + offs_c < CI)[None, :]
                a = tl.load(x_ptr + x_off, mask=x_mask, other=0)
            if W_PACKED:
                w_off = co[:, None] * (K // 2) + (k0 // 2 + offs_b)[None, :]
                w_mask = n_mask[:, None] & (c0 + 2 * offs_b < CI)[None, :]
                b = _unpack_int4_rows(tl.load(w_ptr + w_off, mask=w_mask, other=0),
                                      BLOCK_N, BLOCK_K)
            else:
                w_off = co[:, None] * K + (k0 + offs_c)[None, :]
                b = tl.load(w_ptr + w_off, mask=n_mask[:, None] & (c0 + offs_c < CI)[None, :],
                            other=0)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    if PAD_FIX:  # added once per tile: by the first split (the others' rows are masked off)
        acc += x_zp * _padding_correction(oh, ow, m_mask & (split == 0), co, n_mask, pfx_ptr,
                                          H, W, K // (CI * KW), KW, stride_h, stride_w, pad_h,
                                          pad_w)
    out_ptrs = out_ptr + offs_m[:, None] * O + co[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        _epilogue(acc, co, n_mask, out_ptrs, out_mask, scale_ptr, bias_ptr, wsum_ptr, x_zp,
                  out_scale, out_zp, HAS_SCALE, HAS_BIAS, RELU, OUT_MODE)
    else:
        # A split left without steps (the autotuned BLOCK_K is wider than the proposal
        # assumed) has nothing to add.
        tl.atomic_add(out_ptrs, acc, mask=out_mask & (first < last), sem="relaxed")


@triton.jit(do_not_specialize=["M", "x_zp", "out_zp"])
def _epilogue_kernel(acc_ptr, out_ptr, scale_ptr, bias_ptr, wsum_ptr, M, O, x_zp, out_scale,
                     out_zp, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                     OUT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fused epilogue on its own, over a finished int32 accumulator [M, O] (split-K)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < O
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    offs = offs_m[:, None] * O + offs_n[None, :]
    acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    _epilogue(acc, offs_n, n_mask, out_ptr + offs, mask, scale_ptr, bias_ptr, wsum_ptr, x_zp,
              out_scale, out_zp, True, HAS_BIAS, RELU, OUT_MODE)


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "stride_h", "stride_w", "pad_h",
                               "pad_w", "M", "x_zp", "out_zp"])
def _conv_depthwise_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, wsum_ptr,
                           H, W, C, OH, OW, KH: tl.constexpr, KW: tl.constexpr, stride_h, stride_w, pad_h, pad_w, M,
                           x_zp, out_scale, out_zp,
                           HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                           OUT_MODE: tl.constexpr, X_PACKED: tl.constexpr,
                           W_PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise: each channel convolves alone, so a GEMM would be all padding; this walks
    the kernel taps directly, a tile of output pixels by a tile of channels at a time. The
    kernel size is a compile-time constant, so the taps unroll and their loads are all in
    flight together (a run-time loop waits on each load in turn)."""
    offs_m, m_mask, img, oh, ow = _pixels(tl.program_id(0), M, OH, OW, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = tl.full((BLOCK_M, BLOCK_C), 0, dtype=tl.int32)
    valid = m_mask[:, None] & c_mask[None, :]
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * stride_h - pad_h + kh
            iw = ow * stride_w - pad_w + kw
            in_image = ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            x_off = ((img * H + ih) * W + iw)[:, None] * C + c[None, :]
            a = _load_x(x_ptr, x_off, in_image, valid, x_zp, X_PACKED)
            w_off = c * (KH * KW) + kh * KW + kw
            if W_PACKED:
                byte = tl.load(w_ptr + w_off // 2, mask=c_mask, other=0).to(tl.int32)
                nib = tl.where(w_off % 2 == 0, byte & 0xF, (byte >> 4) & 0xF)
                b = tl.where(nib > 7, nib - 16, nib)
            else:
                b = tl.load(w_ptr + w_off, mask=c_mask, other=0).to(tl.int32)
            acc += a * b[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * C + c[None, :]
    _epilogue(acc, c, c_mask, out_ptrs, valid, scale_ptr, bias_ptr, wsum_ptr, x_zp, out_scale,
              out_zp, HAS_SCALE, HAS_BIAS, RELU, OUT_MODE)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _unpacked_size(t: torch.Tensor, packed: bool) -> int:
    return t.shape[-1] * 2 if packed else t.shape[-1]


def _check_bits(bits: int, what: str) -> None:
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ConfigError(f"{what}={bits}: the integer kernels take 2-8 bits")


def conv2d_int(x: torch.Tensor, w: torch.Tensor, *, w_bits: int, a_bits: int, stride=1,
               padding=0, groups: int = 1, scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, relu: bool = False,
               out_dtype: torch.dtype | None = None, x_zero_point: int = 0,
               out_scale: float | None = None, out_zero_point: int = 0,
               config: KernelConfig | None = None, split_k: int | None = None,
               unpack_first: bool | None = None) -> torch.Tensor:
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
    - `split_k`: how many programs share each output tile's reduction (partial sums added
      atomically, exact); `unpack_first`: packed operands are unpacked to int8 by a pre-pass
      instead of in every tile. With both None they are chosen: `propose_split_k` and
      unpacking in the tiles, then on a GPU the fastest of those and no split, with and
      without the pre-pass, by timing, once per layer geometry (untimed with a pinned
      `config`, on the CPU interpreter, or inside a CUDA graph capture). Giving either fixes
      both (the other: the proposal, no pre-pass). `config` fixes the tile instead of
      autotuning it. The depthwise kernel ignores all three.
    """
    return prepare_conv(x, w, w_bits=w_bits, a_bits=a_bits, stride=stride, padding=padding,
                        groups=groups, scale=scale, bias=bias, relu=relu, out_dtype=out_dtype,
                        x_zero_point=x_zero_point, out_scale=out_scale,
                        out_zero_point=out_zero_point, config=config, split_k=split_k,
                        unpack_first=unpack_first)()


def prepare_conv(x: torch.Tensor, w: torch.Tensor, *, w_bits: int, a_bits: int, stride=1,
                 padding=0, groups: int = 1, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, relu: bool = False,
                 out_dtype: torch.dtype | None = None, x_zero_point: int = 0,
                 out_scale: float | None = None, out_zero_point: int = 0,
                 config: KernelConfig | None = None, split_k: int | None = None,
                 unpack_first: bool | None = None):
    """Check and prepare a `conv2d_int` call (same arguments and contract) and return a
    function that only launches the kernel into a preallocated output and returns it: what
    `nas measure` times and captures in CUDA graphs."""
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
    if scale is None and (bias is not None or relu or out_dtype not in (None, torch.int32)):
        raise ConfigError("conv2d_int: bias, relu and out_dtype need a scale (without one the "
                          "result is the raw int32 accumulator)")
    device = x.device
    x, w = x.contiguous(), w.contiguous()
    m = n * oh * ow
    if scale is None:
        out_mode, out_torch = _OUT_INT32, torch.int32
    else:
        out_torch = out_dtype or torch.float16
        out_mode = {torch.float16: _OUT_FP16, torch.float32: _OUT_FP32,
                    torch.int8: _OUT_INT8}.get(out_torch)
        if out_mode is None:
            raise ConfigError(f"conv2d_int: out_dtype {out_torch} is not float16, float32 or int8")
        if out_mode == _OUT_INT8 and not out_scale:
            raise ConfigError("conv2d_int: out_dtype int8 needs out_scale")
    out = torch.empty((n, oh, ow, o), dtype=out_torch, device=device)
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    wsum = pfx = dummy
    # The GEMM pads with 0 and corrects in its epilogue (see _conv_gemm_kernel).
    pad_fix = x_zero_point != 0 and (ph > 0 or pw > 0)
    if scale is not None or pad_fix:
        from nas.kernels.pack import unpack_int4

        tap_sums = (unpack_int4(w, dim=3) if w_packed else w).to(torch.int32).sum(dim=3)
        if scale is not None:
            wsum = tap_sums.sum(dim=(1, 2)).to(torch.int32).contiguous()
            scale = scale.to(device=device, dtype=torch.float32).contiguous()
        if pad_fix:  # 2-D prefix sums over (kh, kw), a zero row and column in front
            pfx = torch.zeros((o, kh + 1, kw + 1), dtype=torch.int32, device=device)
            pfx[:, 1:, 1:] = tap_sums.cumsum(dim=1).cumsum(dim=2)
    bias_t = bias.to(device=device, dtype=torch.float32).contiguous() if bias is not None else dummy
    scale_t = scale if scale is not None else dummy
    common = dict(HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, RELU=relu,
                  OUT_MODE=out_mode, X_PACKED=x_packed, W_PACKED=w_packed)
    interpreted = _INTERPRET
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int)
                                or split_k < 1):
        raise ConfigError(f"conv2d_int: split_k={split_k!r} must be a positive whole number "
                          f"(or None to choose one)")
    if unpack_first not in (None, True, False):
        raise ConfigError(f"conv2d_int: unpack_first={unpack_first!r} must be True, False or "
                          f"None (to choose)")
    if groups == c and ci == 1 and o == c and groups > 1:
        block_m, block_c = 64, 32
        grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))

        def launch_depthwise() -> torch.Tensor:
            _conv_depthwise_kernel[grid](x, w, out, scale_t, bias_t, wsum, h, wd, c, oh, ow, kh,
                                         kw, sh, sw, ph, pw, m, x_zero_point,
                                         float(out_scale or 1.0), out_zero_point,
                                         BLOCK_M=block_m, BLOCK_C=block_c, **common)
            return out
        return launch_depthwise
    if x_packed and ci % 2:
        raise ConfigError(f"conv2d_int: packed activations need an even channel count per group "
                          f"(C // groups = {ci}); pass them unpacked (int8)")
    k = kh * kw * ci
    cfg = validate_config(config or INTERPRETER_CONFIG)
    common.update(FLAT_K=ci < FLAT_K_BELOW, PAD_FIX=pad_fix)
    co_g = o // groups
    tail = (h, wd, c, oh, ow, kw, sh, sw, ph, pw, ci, co_g, o, m, k, x_zero_point,
            float(out_scale or 1.0), out_zero_point)

    def gemm_launch(split: int, unpack_first: bool = False):
        # Split-K sums into an int32 buffer: the output itself when that is the accumulator.
        acc = out if split == 1 or scale is None else torch.empty(out.shape, dtype=torch.int32,
                                                                  device=device)
        # unpack_first: packed operands are unpacked to int8 once, by a pre-pass, instead of
        # in every tile that reads them (weights: once per row of tiles).
        x8, w8 = (torch.empty((*t.shape[:3], t.shape[3] * 2), dtype=torch.int8, device=device)
                  if unpack_first and packed else None
                  for t, packed in ((x, x_packed), (w, w_packed)))
        unpacks = [(src, dst) for src, dst in ((x, x8), (w, w8)) if dst is not None]
        args = (x if x8 is None else x8, w if w8 is None else w8, acc, scale_t, bias_t, wsum,
                pfx, *tail)
        flags = {**common, "X_PACKED": x_packed and x8 is None, "W_PACKED": w_packed and w8 is None}
        ep_grid = (triton.cdiv(m, 64), triton.cdiv(o, 64))

        def launch() -> torch.Tensor:
            for src, dst in unpacks:
                _unpack_int4_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(),
                                                                       BLOCK=1024)
            if split > 1:
                acc.zero_()
            if interpreted or config is not None:
                grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(co_g, cfg.block_n),
                        groups * split)
                _conv_gemm_kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages, SPLIT_K=split, **flags)
            else:
                grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),  # noqa: E731
                                     triton.cdiv(co_g, meta["BLOCK_N"]), groups * split)
                _tuned()[grid](*args, SPLIT_K=split, **flags)
            if acc is not out:
                _epilogue_kernel[ep_grid](acc, out, scale_t, bias_t, wsum, m, o, x_zero_point,
                                          float(out_scale or 1.0), out_zero_point,
                                          HAS_BIAS=bias is not None, RELU=relu,
                                          OUT_MODE=out_mode, BLOCK_M=64, BLOCK_N=64)
            return out
        launch.split_k, launch.unpack_first = split, bool(unpacks)
        return launch

    sms = INTERPRETER_SMS if interpreted else torch.cuda.get_device_properties(
        device).multi_processor_count
    proposal = propose_split_k(m, co_g, groups, ci, kh * kw, sms)
    if split_k is not None or unpack_first is not None:
        return gemm_launch(split_k or proposal, bool(unpack_first))
    variants = [(split, first) for split in sorted({1, proposal})
                for first in ((False, True) if x_packed or w_packed else (False,))]
    if len(variants) == 1 or interpreted or config is not None:
        return gemm_launch(proposal)
    key = (str(device), n, h, wd, c, o, kh, kw, sh, sw, ph, pw, groups,
           tuple(sorted(common.items())))
    if key not in _LAUNCH_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return gemm_launch(1)  # timing would break the capture; the next call outside decides
        times = {}
        for variant in variants:  # each whole launch (pre-pass, zeroing, GEMM, epilogue)
            fn = gemm_launch(*variant)
            fn()  # autotunes outside the timing
            times[variant] = _time_launch(fn)
        _LAUNCH_CHOICE[key] = min(times, key=times.get)
    return gemm_launch(*_LAUNCH_CHOICE[key])


# Split-K (see _conv_gemm_kernel) is proposed for layers whose tiles would fill under a
# quarter of the GPU's SMs, and only as far as every split keeps SPLIT_MIN_STEPS reduction
# steps; on a GPU the proposal is kept only where timing the whole launch beats no split
# (the split pays for zeroing the accumulator and a separate epilogue). Packed operands are
# timed both unpacked in the tiles and unpacked first, by a pre-pass.
SPLIT_MIN_STEPS, SPLIT_MAX = 4, 16
INTERPRETER_SMS = 132  # the CPU interpreter splits as an H200 would be proposed to
_LAUNCH_CHOICE: dict[tuple, tuple[int, bool]] = {}  # layer -> (split, unpack_first) timed fastest


def propose_split_k(m: int, co_g: int, groups: int, ci: int, taps: int, sms: int) -> int:
    """Reduction splits for an implicit GEMM of m pixels x co_g channels per group, counted
    with 64 x 64 tiles and 64-channel reduction steps (tap by tap, or flattened below
    FLAT_K_BELOW input channels)."""
    tiles = -(-m // 64) * -(-co_g // 64) * groups
    if tiles * 4 > sms:
        return 1
    steps = -(-taps * ci // 64) if ci < FLAT_K_BELOW else taps * -(-ci // 64)
    return max(1, min(-(-sms // tiles), steps // SPLIT_MIN_STEPS, SPLIT_MAX))


_TUNED = None


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (batch-1 layers, few channels): they only waste
    lanes and autotuning time. The smallest configuration always survives."""
    def fits(c):
        kw = c.kwargs
        return (kw["BLOCK_M"] <= max(64, triton.next_power_of_2(named_args["M"]))
                and kw["BLOCK_N"] <= max(16, triton.next_power_of_2(named_args["CO_G"]))
                and kw["BLOCK_K"] <= max(32, triton.next_power_of_2(named_args["CI"])))
    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _time_launch(fn) -> float:
    """Milliseconds per call of a whole prepared launch, replayed in a CUDA graph as
    `nas measure` times it (eager timing would charge its several launches' host overhead)."""
    return triton.testing.do_bench_cudagraph(fn, rep=10)


def _bench(kernel_call, quantiles):
    # Shorter than Triton's default (25 ms warm-up, 100 ms of repetitions): tens of layers
    # times several precisions are tuned per space, and the final timing is done separately.
    return triton.testing.do_bench(kernel_call, warmup=3, rep=15, quantiles=quantiles)


def _tuned():
    """The GEMM kernel autotuned over GPU_CONFIGS (built once, on first GPU use)."""
    global _TUNED
    if _TUNED is None:
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k},
                                 num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in map(validate_config, GPU_CONFIGS)]
        import inspect

        # Older Triton releases take no do_bench argument; they tune with their default.
        quick = {"do_bench": _bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
        # PAD_FIX is in the key: the padding correction changes the epilogue's cost; SPLIT_K
        # changes the work per program. Tuning runs the kernel many times: a split-K
        # accumulator is zeroed before each run and before the real one.
        _TUNED = triton.autotune(configs, key=["M", "CO_G", "K", "CI", "PAD_FIX", "SPLIT_K"],
                                 prune_configs_by={"early_config_prune": _prune},
                                 reset_to_zero=["out_ptr"], **quick)(_conv_gemm_kernel)
    return _TUNED


def tuned_config(case_launch) -> str | None:
    """The autotuned configuration `case_launch` (a `prepare_conv` launch) runs with, as text;
    None where nothing was tuned (CPU interpreter, explicit config, depthwise kernel)."""
    before = getattr(_TUNED, "best_config", None)
    if _TUNED is not None:
        _TUNED.best_config = None
    case_launch()
    cfg = getattr(_TUNED, "best_config", None)
    if cfg is None:
        if _TUNED is not None:
            _TUNED.best_config = before
        return None
    kw = cfg.kwargs
    split = getattr(case_launch, "split_k", 1)
    return (f"BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']} BLOCK_K={kw['BLOCK_K']} "
            f"warps={cfg.num_warps} stages={cfg.num_stages}"
            + (f" split_k={split}" if split > 1 else "")
            + (" unpack_first=1" if getattr(case_launch, "unpack_first", False) else ""))
