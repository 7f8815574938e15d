"""The Triton code of the integer convolution: implicit GEMM for dense and grouped
convolutions, a direct kernel for depthwise ones, a fused dequantize / bias / ReLU /
requantize epilogue (also as a kernel of its own, after split-K), and two pre-passes: 4-bit
unpacking and im2col. `nas.kernels.conv` checks arguments, prepares and launches them.
"""

from __future__ import annotations

import os

import torch

# Without a GPU the kernels are interpreted, unless they are only to be compiled for one
# (`nas.kernels.aot`, in a process of its own). Decided before triton.jit runs.
AOT_ENV = "NAS_KERNELS_AOT"
_INTERPRET = not torch.cuda.is_available() and os.environ.get(AOT_ENV) != "1"
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Only builtins of triton.language are used (tl.full, not tl.zeros): the library's own
# @jit helpers are compiled for a GPU if something imported triton before the interpreter
# was switched on, and then cannot run under it.

_OUT_INT32, _OUT_FP16, _OUT_FP32, _OUT_INT8 = 0, 1, 2, 3
# Where a kernel row's values (KW x input channels, below FLAT_K_BELOW channels) fit this
# many, the GEMM walks kernel rows (ROW_K): one GEMM block of ROW_WIDTH per row, loaded as a
# contiguous run.
ROW_WIDTH = tl.constexpr(32)


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
def _zero_point_start(acc, co, co_mask, wsum_ptr, x_zp):
    """acc - x_zp * sum(w) per output channel: the zero-point term of a scaled output."""
    return acc - x_zp * tl.load(wsum_ptr + co, mask=co_mask, other=0)[None, :]


@triton.jit
def _epilogue(acc, co, co_mask, out_ptrs, out_mask, scale_ptr, bias_ptr, out_scale, out_zp,
              HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
              OUT_MODE: tl.constexpr):
    """Store the tile: the raw accumulator, or (HAS_SCALE) scale * acc + bias, ReLU and the
    output format. With a scale, `acc` already holds acc - x_zp * sum(w) per channel: the
    kernels start their accumulators from -x_zp * sum(w) (`_zero_point_start`), exact in
    int32, so that no third per-channel vector is live here (compiled for sm_90, this
    epilogue set the GEMM's register peak: 184 per thread for a 128x128 tile, 112 without)."""
    if HAS_SCALE:
        scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0)
        y = acc.to(tl.float32) * scale[None, :]
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


# Sign-extend the low (high) nibble of each of the four bytes in a 32-bit register, all four
# at once: keep the nibbles (0x0F0F0F0F), then OR 0xF0 into every byte whose nibble has its
# sign bit (0x08 * 30 = 0xF0: no carry crosses a byte). Five instructions per four values.
# (tl.constexpr: the only globals a kernel may read.)
_LOW_NIBBLES = tl.constexpr("{ .reg .b32 t, m; and.b32 t, $1, 0x0F0F0F0F; "
                            "and.b32 m, t, 0x08080808; mul.lo.u32 m, m, 30; or.b32 $0, t, m; }")
_HIGH_NIBBLES = tl.constexpr("{ .reg .b32 t, m; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; "
                             "and.b32 m, t, 0x08080808; mul.lo.u32 m, m, 30; or.b32 $0, t, m; }")

if _INTERPRET:
    @triton.jit
    def _nibbles(byte):
        """(low, high) nibbles of packed bytes as int8 values: shifts on the signed byte
        sign-extend each (the interpreter runs no PTX; the GPU takes four bytes at once)."""
        b = byte.to(tl.int8, bitcast=True)
        return ((b << 4).to(tl.int8) >> 4).to(tl.int8), (b >> 4).to(tl.int8)
else:
    @triton.jit
    def _nibbles(byte):
        """(low, high) nibbles of packed bytes as int8 values, four bytes per instruction
        sequence (per byte, Triton's shifts cost several instructions each: byte extracts
        and permutes; compiled for sm_90, the W4A8 tap walk's loop took 2x more)."""
        lo = tl.inline_asm_elementwise(_LOW_NIBBLES, "=r,r", [byte], dtype=tl.int8,
                                       is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_HIGH_NIBBLES, "=r,r", [byte], dtype=tl.int8,
                                       is_pure=True, pack=4)
        return lo, hi


# acc + x * w for four values at once, x and w signed bytes packed four to a 32-bit register
# ($4, $5; value j in byte j), acc and the results one register each ($6-$9, $0-$3): each
# value's weight masked to its own byte, then one dp4a adds that byte's product. The bytes
# are multiplied as they are (Triton's int8 -> int32 conversion took two byte permutes per
# value, compiled for sm_90; a depthwise tap cost two permutes and two multiply-adds per
# output value).
_DP4A_MAC = tl.constexpr("{ .reg .b32 m; "
                         "and.b32 m, $5, 0x000000FF; dp4a.s32.s32 $0, $4, m, $6; "
                         "and.b32 m, $5, 0x0000FF00; dp4a.s32.s32 $1, $4, m, $7; "
                         "and.b32 m, $5, 0x00FF0000; dp4a.s32.s32 $2, $4, m, $8; "
                         "and.b32 m, $5, 0xFF000000; dp4a.s32.s32 $3, $4, m, $9; }")

if _INTERPRET:
    @triton.jit
    def _mac_bytes(acc, x, w):
        """acc + x * w, x and w int8 of acc's shape (the interpreter runs no PTX)."""
        return acc + x.to(tl.int32) * w.to(tl.int32)
else:
    @triton.jit
    def _mac_bytes(acc, x, w):
        """acc + x * w, x and w int8 of acc's shape: one dp4a per value (_DP4A_MAC)."""
        return tl.inline_asm_elementwise(_DP4A_MAC, "=r,=r,=r,=r,r,r,r,r,r,r", [x, w, acc],
                                         dtype=tl.int32, is_pure=True, pack=4)


@triton.jit
def _unpack_int4_rows(byte, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 2] bytes of packed nibbles -> [ROWS, COLS] int8 in element order (low
    nibble first; this runs for every tile): join + reshape interleave the halves."""
    lo, hi = _nibbles(byte)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))


@triton.jit
def _unpack_int4_kernel(src_ptr, dst_ptr, N_BYTES, ROW_BYTES, DST_ROW, BLOCK: tl.constexpr):
    """Packed nibbles -> int8 values, low nibble first (`unpack_int4` along the last axis):
    rows of ROW_BYTES bytes become the first 2 * ROW_BYTES values of rows DST_ROW long. The
    pre-pass of `unpack_first` launches, and of im2col launches' packed weights."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N_BYTES
    lo, hi = _nibbles(tl.load(src_ptr + offs, mask=mask, other=0))
    dst = dst_ptr + (offs // ROW_BYTES) * DST_ROW + 2 * (offs % ROW_BYTES)
    tl.store(dst, lo, mask=mask)
    tl.store(dst + 1, hi, mask=mask)


@triton.jit
def _gather_rows(x_ptr, ktab_ptr, offs_k, row0, kh_lo, kh_hi, kw_lo, kw_hi, valid, x_zp,
                 X_PACKED: tl.constexpr):
    """The GEMM's rows at flattened reduction positions offs_k = (kh, kw, ci), ci fastest:
    [pixels, positions] int32, padding read as `x_zp`, lanes outside `valid` as 0. An
    element-by-element gather; each position's offset in x from its pixel's tap (0, 0)
    (`row0`) and its tap come from `ktab` (`flat_walk_table`, made once per layer), so
    nothing here divides."""
    k_off = tl.load(ktab_ptr + 2 * offs_k)
    k_hw = tl.load(ktab_ptr + 2 * offs_k + 1)
    kh = (k_hw >> 8)[None, :]
    kw = (k_hw & 255)[None, :]
    in_image = ((kh >= kh_lo[:, None]) & (kh < kh_hi[:, None]) & (kw >= kw_lo[:, None])
                & (kw < kw_hi[:, None]))
    return _load_x(x_ptr, row0[:, None] + k_off[None, :], in_image, valid, x_zp, X_PACKED)


@triton.jit
def _pixel_origin(img, oh, ow, H, W, C, stride_h, stride_w, pad_h, pad_w):
    """Flat NHWC pixel index in x under each output pixel's tap (0, 0), maybe in the
    padding (negative or past the row): tap (kh, kw) lies kh * W + kw pixels further."""
    return (img * H + oh * stride_h - pad_h) * W + ow * stride_w - pad_w


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "KW", "stride_h", "stride_w", "pad_h",
                               "pad_w", "M", "x_zp"])
def _im2col_kernel(x_ptr, col_ptr, ktab_ptr, H, W, C, OH, OW, KW, stride_h, stride_w, pad_h,
                   pad_w, CI, M, K, KP, x_zp, X_PACKED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """The implicit GEMM's rows written out once (the pre-pass of an `im2col` launch, for
    layers with few input channels): col[m, g * KP + k] is the activation under reduction
    position k = (kh, kw, ci) of output pixel m in group g; the zero point in the padding (a
    real 0), 0 from K to KP (the row is padded to whole GEMM blocks)."""
    g = tl.program_id(2)
    offs_m, m_mask, img, oh, ow = _pixels(tl.program_id(0), M, OH, OW, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kh_lo, kh_hi, kw_lo, kw_hi = _tap_bounds(oh, ow, m_mask, H, W, K // (CI * KW), KW,
                                             stride_h, stride_w, pad_h, pad_w)
    row0 = _pixel_origin(img, oh, ow, H, W, C, stride_h, stride_w, pad_h, pad_w) * C + g * CI
    valid = m_mask[:, None] & (offs_k < K)[None, :]
    a = _gather_rows(x_ptr, ktab_ptr, offs_k, row0, kh_lo, kh_hi, kw_lo, kw_hi, valid, x_zp,
                     X_PACKED)
    col = col_ptr + offs_m[:, None] * (tl.num_programs(2) * KP) + g * KP + offs_k[None, :]
    tl.store(col, a.to(tl.int8), mask=m_mask[:, None] & (offs_k < KP)[None, :])


@triton.jit(do_not_specialize=["H", "W", "pad_h", "pad_w", "HP", "WP"])
def _pad_image_kernel(x_ptr, dst_ptr, H, W, C, pad_h, pad_w, HP, WP, CP: tl.constexpr,
                      CP_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """The pre-pass of a `pad_image` launch: NHWC x (C channels) into the interior of the
    padded image [N, HP, WP, CP], each pixel's C values first and zeros up to CP (a multiple
    of 4, so each pixel is stored as one aligned word; CP_BLOCK: CP rounded up to a power of
    two, as tl.arange needs, 12 -> 16). One image row per program along axis 0 (no per-pixel
    division; axis 0 takes up to 2**31 - 1 programs, the others 65535). The border holds the
    zero point, written once when the buffer is made; only the interior changes."""
    r = tl.program_id(0)  # image row: n * H + y
    px = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ch = tl.arange(0, CP_BLOCK)
    cols = (px < W)[:, None]
    v = tl.load(x_ptr + (r * W + px)[:, None] * C + ch[None, :],
                mask=cols & (ch < C)[None, :], other=0)
    dst = (((r // H) * HP + r % H + pad_h) * WP + pad_w + px) * CP
    tl.store(dst_ptr + dst[:, None] + ch[None, :], v, mask=cols & (ch < CP)[None, :])


@triton.jit
def _block_mask(rows, chans, CI, EVEN_K: tl.constexpr):
    """Load mask of a [rows, channels] block: with EVEN_K (CI a multiple of BLOCK_K) every
    channel is in range and the mask is constant along the channels, which spares the
    per-vector range checks of the loads."""
    if EVEN_K:
        return tl.broadcast_to(rows[:, None], (rows.shape[0], chans.shape[0]))
    else:
        return rows[:, None] & (chans < CI)[None, :]


@triton.jit
def _tap_bounds(oh, ow, rows, H, W, KH, KW, stride_h, stride_w, pad_h, pad_w):
    """The kernel taps of each output pixel that fall inside the image: the rectangle
    [kh_lo, kh_hi) x [kw_lo, kw_hi) (empty for rows past M), bounds within [0, KH] and
    [0, KW]."""
    kh_lo = tl.minimum(tl.maximum(pad_h - oh * stride_h, 0), KH)
    kh_hi = tl.where(rows, tl.maximum(tl.minimum(H + pad_h - oh * stride_h, KH), kh_lo), kh_lo)
    kw_lo = tl.minimum(tl.maximum(pad_w - ow * stride_w, 0), KW)
    kw_hi = tl.maximum(tl.minimum(W + pad_w - ow * stride_w, KW), kw_lo)
    return kh_lo, kh_hi, kw_lo, kw_hi


@triton.jit
def _padding_correction(kh_lo, kh_hi, kw_lo, kw_hi, rows, co, co_mask, corr_ptr, O, KH, KW):
    """x_zp times the weights of each output pixel's taps that fall in the padding, per
    output channel: [rows, channels] int32. The in-image taps form a rectangle, so the
    correction depends on the pixel only through its bounds: `corr` holds it for every
    rectangle (`padding_corrections`), one load per element, and interior pixels (no padded
    tap) load nothing."""
    border = rows & ((kh_lo > 0) | (kh_hi < KH) | (kw_lo > 0) | (kw_hi < KW))
    rect = (kh_lo * (KH + 1) + kh_hi) * ((KW + 1) * (KW + 1)) + kw_lo * (KW + 1) + kw_hi
    return tl.load(corr_ptr + rect[:, None] * O + co[None, :],
                   mask=border[:, None] & co_mask[None, :], other=0)


@triton.jit
def _row_walk(acc, x_ptr, w_ptr, x_base, ow, m_mask, co, n_mask, kh_lo, kh_hi, first, last,
              W, C, CI, KW, KH, stride_w, pad_w, ROW_ALIGN: tl.constexpr):
    """ROW_K: one step per kernel row, its KW x CI values (KW pixels side by side, one run in
    NHWC x when there is one group), from `x_base`, the value under each pixel's tap (0, 0)
    of its group. The weights come laid out as rows of ROW_WIDTH, zero past KW * CI
    (`kernel_rows`). Which columns fall in the image is the same for every row, so it is
    worked out once; per step only the row's own bounds change."""
    j = tl.arange(0, ROW_WIDTH)
    if not ROW_ALIGN:
        col_tap = j // CI
        col_off = col_tap * C + (j - col_tap * CI)  # from the pixel's tap (0, 0) value
        iw = (ow * stride_w - pad_w)[:, None] + col_tap[None, :]
        col_ok = m_mask[:, None] & (col_tap < KW)[None, :] & (iw >= 0) & (iw < W)
    for kh in range(first, last):
        if ROW_ALIGN:
            # The padded image (`_pad_image_kernel`): every tap is inside it, C is a multiple
            # of 4 and each row's run starts at a multiple of ROW_ALIGN bytes, so the run
            # loads as whole aligned vectors, masked only past M (cp.async; per byte, the
            # masked walk below compiled for sm_90 to 32 byte loads and ~300 instructions
            # per step). Lanes past KW * C read the next pixels, which meet zero weights
            # (the buffer has a row of slack after the last pixel).
            row = tl.multiple_of(x_base + kh * (W * C), ROW_ALIGN)
            a = tl.load(x_ptr + row[:, None] + j[None, :], mask=m_mask[:, None], other=0)
        else:
            row_ok = (kh >= kh_lo) & (kh < kh_hi)
            a = tl.load(x_ptr + (x_base + kh * (W * C))[:, None] + col_off[None, :],
                        mask=col_ok & row_ok[:, None], other=0)
        b = tl.load(w_ptr + co[:, None] * (KH * ROW_WIDTH) + kh * ROW_WIDTH + j[None, :],
                    mask=n_mask[:, None], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    return acc


@triton.jit
def _flat_walk(acc, x_ptr, w_ptr, ktab_ptr, row0, m_mask, co, n_mask, kh_lo, kh_hi, kw_lo,
               kw_hi, first, last, K, X_PACKED: tl.constexpr, W_PACKED: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """FLAT_K: blocks of BLOCK_K positions of the flattened (kh, kw, ci) axis, the rows
    gathered element by element (`_gather_rows`) from `row0`, the value (not byte) under
    each pixel's tap (0, 0) of its group."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_b = tl.arange(0, HALF_K)  # byte columns of packed weights
    for step in range(first, last):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = m_mask[:, None] & (offs_k < K)[None, :]
        a = _gather_rows(x_ptr, ktab_ptr, offs_k, row0, kh_lo, kh_hi, kw_lo, kw_hi, valid,
                         0, X_PACKED).to(tl.int8)
        if W_PACKED:  # K even (CI is): a block's bytes are contiguous in the weight row
            w_off = co[:, None] * (K // 2) + (step * HALF_K + offs_b)[None, :]
            w_mask = n_mask[:, None] & (step * BLOCK_K + 2 * offs_b < K)[None, :]
            b = _unpack_int4_rows(tl.load(w_ptr + w_off, mask=w_mask, other=0), BLOCK_N,
                                  BLOCK_K)
        else:
            b = tl.load(w_ptr + co[:, None] * K + offs_k[None, :],
                        mask=n_mask[:, None] & (offs_k < K)[None, :], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    return acc


@triton.jit
def _tap_pair_walk(acc, x_ptr, w_ptr, row0, co, n_mask, kh_lo, kh_hi, kw_lo, kw_hi, first,
                   last, W, C, CI, KW, K, BLOCK_K: tl.constexpr):
    """TAP_PAIRS: two consecutive taps per step, tap a in the block's first half of columns
    and tap b in the second, from `row0`, the value under each pixel's tap (0, 0) of its
    group. Every MMA step covers BLOCK_K = 2 x CI values, not CI and a masked half (Triton
    waits for each int8 MMA before the next step, so steps of more values each wait less per
    value). Tap b of an odd last step lies past the kernel (kh = KH: outside every pixel's
    taps, read as 0; its weights masked)."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_c = tl.arange(0, BLOCK_K)
    in_b_half = offs_c >= HALF_K
    half = offs_c // HALF_K
    chan = offs_c % HALF_K
    tap = 2 * first
    kh = tap // KW
    kw = tap - kh * KW
    for step in range(first, last):
        kw_b = kw + 1
        wrap = kw_b >= KW
        kw_b = tl.where(wrap, 0, kw_b)
        kh_b = kh + wrap.to(tl.int32)
        in_a = (kh >= kh_lo) & (kh < kh_hi) & (kw >= kw_lo) & (kw < kw_hi)
        in_b = (kh_b >= kh_lo) & (kh_b < kh_hi) & (kw_b >= kw_lo) & (kw_b < kw_hi)
        to_b = ((kh_b - kh) * W + kw_b - kw) * C  # from tap a's value to tap b's
        x_mask = tl.where(in_b_half[None, :], in_b[:, None], in_a[:, None])
        a = tl.load(x_ptr + (row0 + (kh * W + kw) * C)[:, None]
                    + (half * to_b + chan)[None, :], mask=x_mask, other=0)
        k0 = (kh * KW + kw) * CI
        b = tl.load(w_ptr + co[:, None] * K + (k0 + offs_c)[None, :],
                    mask=n_mask[:, None] & (k0 + offs_c < K)[None, :], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        kw = kw_b + 1  # next: the tap after b
        wrap = kw >= KW
        kw = tl.where(wrap, 0, kw)
        kh = kh_b + wrap.to(tl.int32)
    return acc


@triton.jit
def _tap_walk(acc, x_ptr, w_ptr, origin, g, co, n_mask, kh_lo, kh_hi, kw_lo, kw_hi, first,
              last, W, C, CI, KW, K, X_PACKED: tl.constexpr, W_PACKED: tl.constexpr,
              EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Tap by tap and, within a tap, blocks of BLOCK_K input channels: every load a
    contiguous run of channels. Loop-invariant per pixel: where its tap (0, 0) lies in x
    (`origin`, in pixels, maybe in the padding) and which taps are inside the image; the
    loop only adds a tap's scalar offset and steps (kh, kw, c0) by counters: no divisions
    and no per-pixel index arithmetic."""
    XC: tl.constexpr = 2 if X_PACKED else 1  # values per byte of x
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_b = tl.arange(0, HALF_K)  # byte columns of packed operands
    offs_c = tl.arange(0, BLOCK_K)
    blocks = (CI + BLOCK_K - 1) // BLOCK_K
    row0 = origin * (C // XC)
    tap = first // blocks
    c0 = (first - tap * blocks) * BLOCK_K
    kh = tap // KW
    kw = tap - kh * KW
    for step in range(first, last):
        in_image = (kh >= kh_lo) & (kh < kh_hi) & (kw >= kw_lo) & (kw < kw_hi)
        x_row = row0 + (kh * W + kw) * (C // XC) + (g * CI + c0) // XC
        k0 = (kh * KW + kw) * CI + c0  # this block's first position in an OHWI weight row
        if X_PACKED:  # CI even (checked), so a byte never straddles two groups
            x_mask = _block_mask(in_image, c0 + 2 * offs_b, CI, EVEN_K)
            a = _unpack_int4_rows(tl.load(x_ptr + x_row[:, None] + offs_b[None, :],
                                          mask=x_mask, other=0), BLOCK_M, BLOCK_K)
        else:
            x_mask = _block_mask(in_image, c0 + offs_c, CI, EVEN_K)
            a = tl.load(x_ptr + x_row[:, None] + offs_c[None, :], mask=x_mask, other=0)
        if W_PACKED:
            w_off = co[:, None] * (K // 2) + (k0 // 2 + offs_b)[None, :]
            w_mask = _block_mask(n_mask, c0 + 2 * offs_b, CI, EVEN_K)
            b = _unpack_int4_rows(tl.load(w_ptr + w_off, mask=w_mask, other=0),
                                  BLOCK_N, BLOCK_K)
        else:
            w_off = co[:, None] * K + (k0 + offs_c)[None, :]
            w_mask = _block_mask(n_mask, c0 + offs_c, CI, EVEN_K)
            b = tl.load(w_ptr + w_off, mask=w_mask, other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        # next block: channels, then kw, then kh
        c0 += BLOCK_K
        wrap_c = c0 >= CI
        c0 = tl.where(wrap_c, 0, c0)
        kw += wrap_c.to(tl.int32)
        wrap_w = kw >= KW
        kw = tl.where(wrap_w, 0, kw)
        kh += wrap_w.to(tl.int32)
    return acc


@triton.jit
def _walk_steps(K, CI, KW, FLAT_K: tl.constexpr, ROW_K: tl.constexpr,
                TAP_PAIRS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Steps of the reduction walk: blocks of the flattened axis, kernel rows, pairs of taps,
    or taps x channel blocks."""
    if FLAT_K:
        steps = (K + BLOCK_K - 1) // BLOCK_K  # not tl.cdiv: see the note at the top
    elif ROW_K:
        steps = K // (CI * KW)
    elif TAP_PAIRS:
        steps = (K // CI + 1) // 2
    else:
        blocks = (CI + BLOCK_K - 1) // BLOCK_K
        steps = (K // CI) * blocks
    return steps


@triton.jit
def _split_range(steps, split, SPLIT_K: tl.constexpr):
    """[first, last) of the walk's steps that split `split` of SPLIT_K takes."""
    if SPLIT_K == 1:
        first, last = 0, steps
    else:
        per_split = (steps + SPLIT_K - 1) // SPLIT_K
        first = split * per_split
        last = tl.minimum(first + per_split, steps)
    return first, last


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "KW", "stride_h", "stride_w", "pad_h",
                               "pad_w", "M", "x_zp", "out_zp"])
def _conv_gemm_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, wsum_ptr, corr_ptr, ktab_ptr,
                      H, W, C, OH, OW, KW, stride_h, stride_w, pad_h, pad_w,
                      CI, CO_G, O, M, K, x_zp, out_scale, out_zp,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                      OUT_MODE: tl.constexpr, X_PACKED: tl.constexpr, W_PACKED: tl.constexpr,
                      FLAT_K: tl.constexpr, ROW_K: tl.constexpr, ROW_ALIGN: tl.constexpr,
                      PAD_FIX: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, TAP_PAIRS: tl.constexpr):
    """One group's GEMM tile: rows are output pixels (n, oh, ow), columns output channels,
    the reduction runs over (kh, kw, ci), ci fastest as in OHWI weights.

    Four ways to walk the reduction, each a function of its own: by kernel tap and, within
    a tap, blocks of BLOCK_K input channels (`_tap_walk`), or two taps per step where a
    block is two taps' channels (`_tap_pair_walk`, TAP_PAIRS: CI = BLOCK_K / 2, int8
    operands); for few input channels, by kernel row where a row's KW x CI values fit one
    block (`_row_walk`, ROW_K: a stem's 7 x 3; over the padded image of a `pad_image` launch,
    ROW_ALIGN > 0, its rows load as aligned vectors, unmasked), or else over the flattened
    (kh, kw, ci) axis, gathering element by element (`_flat_walk`, FLAT_K), so that blocks
    are not mostly empty. Geometry arguments are not specialised (one compilation serves
    every layer); channel counts are, for alignment.

    Padding is read as 0 whatever the activation zero point: a masked load whose default is
    0 is cp.async's own zero fill, and the tile goes straight from shared memory to the
    tensor cores (any other default costs a pass through registers per tile, measured on
    the H200 at 1.5-1.9x slower on ResNet-18's 3x3 layers at batch 64). Padding should read
    the zero point (a real 0), so with PAD_FIX the kernel adds x_zp times the weights of
    the padded taps (`_padding_correction`, one table lookup per border pixel and channel);
    channels past CI read 0 and meet zero weights.

    SPLIT_K > 1 (problems with too few tiles to fill the GPU, e.g. batch 1): the reduction
    steps are shared among SPLIT_K programs per tile, each of which stores its partial
    int32 sums in a slice of its own of `out_ptr` ([SPLIT_K, M, O]: plain vectorised
    stores, nothing to zero first, no atomics); the epilogue then runs as its own kernel
    (`_epilogue_kernel`), which adds the slices up (integer addition: exact)."""
    g = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) - g * SPLIT_K
    offs_m, m_mask, img, oh, ow = _pixels(tl.program_id(0), M, OH, OW, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CO_G
    co = g * CO_G + offs_n
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)  # a builtin: see the note at the top
    KH = K // (CI * KW)
    kh_lo, kh_hi, kw_lo, kw_hi = _tap_bounds(oh, ow, m_mask, H, W, KH, KW, stride_h, stride_w,
                                             pad_h, pad_w)
    # Where the padding correction goes (once per tile: the first split's; the others' rows
    # are masked off) is about registers, as compiled for sm_90. A tile of 64 or more
    # columns finishes in two halves of columns (IN_HALVES: each half's per-channel vectors,
    # correction and pointers, not the whole tile's, are live at once; a scaled 128x128
    # tile's peak fell from 184 to 128-138 registers) and takes each half's correction
    # there. Otherwise the tap walks start the accumulator from it (loaded into the
    # accumulator's registers; at the end it needed as many again: 128x256 tiles spilled 296
    # bytes), and the flattened walk, whose gathers need the registers during the loop, adds
    # it at the end.
    IN_HALVES: tl.constexpr = BLOCK_N >= 64
    FIX_AT_END: tl.constexpr = PAD_FIX and (IN_HALVES or FLAT_K)
    fix_rows = m_mask & (split == 0)
    if HAS_SCALE:  # once per tile, like the padding correction
        acc = _zero_point_start(acc, co, n_mask, wsum_ptr, tl.where(split == 0, x_zp, 0))
    if PAD_FIX and not FIX_AT_END:
        acc += _padding_correction(kh_lo, kh_hi, kw_lo, kw_hi, fix_rows, co, n_mask, corr_ptr,
                                   O, KH, KW)
    steps = _walk_steps(K, CI, KW, FLAT_K, ROW_K, TAP_PAIRS, BLOCK_K)
    first, last = _split_range(steps, split, SPLIT_K)
    origin = _pixel_origin(img, oh, ow, H, W, C, stride_h, stride_w, pad_h, pad_w)
    if ROW_K:
        acc = _row_walk(acc, x_ptr, w_ptr, origin * C + g * CI, ow, m_mask, co, n_mask, kh_lo,
                        kh_hi, first, last, W, C, CI, KW, KH, stride_w, pad_w, ROW_ALIGN)
    elif FLAT_K:  # in values: _load_x halves the offsets for packed x
        acc = _flat_walk(acc, x_ptr, w_ptr, ktab_ptr, origin * C + g * CI, m_mask, co, n_mask,
                         kh_lo, kh_hi, kw_lo, kw_hi, first, last, K, X_PACKED, W_PACKED,
                         BLOCK_N, BLOCK_K)
    elif TAP_PAIRS:
        acc = _tap_pair_walk(acc, x_ptr, w_ptr, origin * C + g * CI, co, n_mask, kh_lo, kh_hi,
                             kw_lo, kw_hi, first, last, W, C, CI, KW, K, BLOCK_K)
    else:
        acc = _tap_walk(acc, x_ptr, w_ptr, origin, g, co, n_mask, kh_lo, kh_hi, kw_lo, kw_hi,
                        first, last, W, C, CI, KW, K, X_PACKED, W_PACKED, EVEN_K, BLOCK_M,
                        BLOCK_N, BLOCK_K)
    if IN_HALVES:
        HALF_N: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
        for h in tl.static_range(2):  # one half, then the other
            cols = tl.program_id(1) * BLOCK_N + h * HALF_N + tl.arange(0, HALF_N)
            _finish_tile(left if h == 0 else right, cols, kh_lo, kh_hi, kw_lo, kw_hi, fix_rows,
                         corr_ptr, KH, KW, m_mask, offs_m, CO_G, g, O, out_ptr, scale_ptr,
                         bias_ptr, out_scale, out_zp, split * (M * O), FIX_AT_END, HAS_SCALE,
                         HAS_BIAS, RELU, OUT_MODE, SPLIT_K)
    else:
        _finish_tile(acc, offs_n, kh_lo, kh_hi, kw_lo, kw_hi, fix_rows, corr_ptr, KH, KW,
                     m_mask, offs_m, CO_G, g, O, out_ptr, scale_ptr, bias_ptr, out_scale,
                     out_zp, split * (M * O), FIX_AT_END, HAS_SCALE, HAS_BIAS, RELU, OUT_MODE,
                     SPLIT_K)


@triton.jit
def _finish_tile(acc, cols, kh_lo, kh_hi, kw_lo, kw_hi, fix_rows, corr_ptr, KH, KW, m_mask,
                 offs_m, CO_G, g, O, out_ptr, scale_ptr, bias_ptr, out_scale, out_zp,
                 split_offset, ADD_FIX: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, RELU: tl.constexpr, OUT_MODE: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """A GEMM tile's (or part's) columns `cols` of its group: the padding correction where
    it is added at the end (ADD_FIX), then the epilogue or, split, the partial sums stored in
    the split's slice, `split_offset` values in (a split left without steps - the autotuned
    BLOCK_K is wider than the proposal assumed - stores what it started from: zeros, or the
    first split's zero-point term and correction)."""
    co = g * CO_G + cols
    co_mask = cols < CO_G
    if ADD_FIX:
        acc += _padding_correction(kh_lo, kh_hi, kw_lo, kw_hi, fix_rows, co, co_mask, corr_ptr,
                                   O, KH, KW)
    ptrs = out_ptr + offs_m[:, None] * O + co[None, :]
    mask = m_mask[:, None] & co_mask[None, :]
    if SPLIT_K > 1:
        tl.store(ptrs + split_offset, acc, mask=mask)
    else:
        _epilogue(acc, co, co_mask, ptrs, mask, scale_ptr, bias_ptr, out_scale, out_zp,
                  HAS_SCALE, HAS_BIAS, RELU, OUT_MODE)


@triton.jit(do_not_specialize=["M", "out_zp"])
def _epilogue_kernel(acc_ptr, out_ptr, scale_ptr, bias_ptr, M, O, out_scale, out_zp,
                     SPLITS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     RELU: tl.constexpr, OUT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """The fused epilogue on its own, after split-K: the sum of the splits' int32 partial
    sums [SPLITS, M, O] (the first split's started from the zero-point term), then the
    epilogue, or the raw sum without a scale. The splits unroll, so that all their loads
    are in flight at once (a run-time loop would wait on each in turn)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < O
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    offs = offs_m[:, None] * O + offs_n[None, :]
    acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(acc_ptr + s * (M * O) + offs, mask=mask, other=0)
    _epilogue(acc, offs_n, n_mask, out_ptr + offs, mask, scale_ptr, bias_ptr, out_scale, out_zp,
              HAS_SCALE, HAS_BIAS, RELU, OUT_MODE)


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "stride_h", "stride_w", "pad_h",
                               "pad_w", "M", "x_zp", "out_zp"])
def _conv_depthwise_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, wsum_ptr,
                           H, W, C, OH, OW, KH: tl.constexpr, KW: tl.constexpr, stride_h,
                           stride_w, pad_h, pad_w, M, x_zp, out_scale, out_zp,
                           HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                           OUT_MODE: tl.constexpr, X_PACKED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise: each channel convolves alone, so a GEMM would be all padding; this walks
    the kernel taps directly, a tile of output pixels by a tile of channels at a time. The
    kernel size is a compile-time constant, so the taps unroll and their loads are all in
    flight together (a run-time loop waits on each load in turn).

    The weights come tap-major, [KH * KW, C] int8 (`depthwise_taps`, laid out once per
    layer), so a tap's weights for the tile's channels are one contiguous run: vector loads
    (OHWI's stride of KH * KW between channels made one byte load per channel and tap,
    compiled for sm_90: 144 of them per thread for a 64 x 32 tile). Int8 padding reads the
    zero point as the load's own default (registers set before a predicated load), not a
    select per value; lanes past M or C are never stored, and meet zero weights past C.
    Products are taken of the bytes as loaded, one dp4a each on the GPU (`_mac_bytes`)."""
    offs_m, m_mask, img, oh, ow = _pixels(tl.program_id(0), M, OH, OW, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = tl.full((BLOCK_M, BLOCK_C), 0, dtype=tl.int32)
    if HAS_SCALE:
        acc = _zero_point_start(acc, c, c_mask, wsum_ptr, x_zp)
    valid = m_mask[:, None] & c_mask[None, :]
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * stride_h - pad_h + kh
            iw = ow * stride_w - pad_w + kw
            in_image = ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            x_off = ((img * H + ih) * W + iw)[:, None] * C + c[None, :]
            if X_PACKED:
                a = _load_x(x_ptr, x_off, in_image, valid, x_zp, X_PACKED).to(tl.int8)
            else:
                a = tl.load(x_ptr + x_off, mask=in_image & valid, other=x_zp)
            b = tl.load(w_ptr + (kh * KW + kw) * C + c, mask=c_mask, other=0)
            acc = _mac_bytes(acc, a, tl.broadcast_to(b[None, :], (BLOCK_M, BLOCK_C)))
    out_ptrs = out_ptr + offs_m[:, None] * C + c[None, :]
    _epilogue(acc, c, c_mask, out_ptrs, valid, scale_ptr, bias_ptr, out_scale, out_zp,
              HAS_SCALE, HAS_BIAS, RELU, OUT_MODE)


def _even_k(args) -> bool:
    return args["CI"] % args["BLOCK_K"] == 0


def tap_pairs(args) -> bool:
    """Whether the tap walk takes two taps per step: the tile's BLOCK_K is two taps' input
    channels, the kernel has two taps or more, and both operands are int8 values (packed
    ones split a block's bytes differently)."""
    return (not (args["FLAT_K"] or args["ROW_K"] or args["X_PACKED"] or args["W_PACKED"])
            and 2 * args["CI"] == args["BLOCK_K"] and args["K"] >= 2 * args["CI"])


# The GEMM as launched: EVEN_K and TAP_PAIRS follow from the tile (autotuned or given) and
# the layer.
conv_gemm = triton.heuristics({"EVEN_K": _even_k, "TAP_PAIRS": tap_pairs})(_conv_gemm_kernel)
