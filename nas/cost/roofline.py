"""The roofline estimate of a layer's latency from the device spec.

time = max(compute, memory) + launch overhead, where
- compute runs the implicit GEMM (M = batch * Ho * Wo, N = Cout / groups, K = Cin / groups *
  kh * kw) in tiles of tile_m x tile_n spread over the SMs in waves, so a layer too small to
  fill the last wave pays for it (wave quantisation). Quantized layers (both bits <= 8) run
  at the INT8 tensor-core rate: Hopper has no int4 MMA, so 4-bit operands are unpacked to
  int8 and 4 bits save bytes, not MMA time. Float layers run at the FP16 (16 bits) or TF32
  (32 bits) rate; depthwise convolutions run on CUDA cores.
- memory moves the input activations (a_bits each), the weights (w_bits each) and an fp16
  output through HBM once.
- split-K: like the integer kernels, a quantized layer too small to fill the GPU is also
  estimated with its reduction split as `nas.kernels.configs.propose_split_k` proposes
  (each split a tile's share of K; every split's int32 partial sums written and read back
  through HBM; two launches: GEMM and epilogue), and the faster of the two stands, as timing
  chooses on a GPU.
"""

from __future__ import annotations

import math

from nas.cost.device_spec import DeviceSpec
from nas.kernels.configs import propose_split_k
from nas.spaces import FLOAT_BITS

OUTPUT_BYTES = 2  # fp16 output of the fused epilogue


def _is_float(bits: int) -> bool:
    return bits in FLOAT_BITS


def roofline_us(info, w_bits: int, a_bits: int, batch: int, spec: DeviceSpec) -> float:
    """Estimated microseconds of one layer at one precision (see the module docstring)."""
    ho, wo = info.out_hw
    groups = info.groups
    m = batch * ho * wo
    n = info.out_channels // groups
    ci, taps = info.in_channels // groups, info.kernel[0] * info.kernel[1]
    k = ci * taps
    quantized = not _is_float(w_bits) and not _is_float(a_bits)
    depthwise = groups > 1 and groups == info.in_channels
    in_bytes = batch * info.in_channels * info.in_hw[0] * info.in_hw[1] * a_bits / 8
    weight_bytes = info.out_channels * k * w_bits / 8
    out_bytes = batch * info.out_channels * ho * wo * OUTPUT_BYTES
    hbm_s = (in_bytes + weight_bytes + out_bytes) / (spec.hbm_tb_s * 1e12)
    if depthwise:
        compute_s = 2.0 * m * n * k * groups / (spec.cuda_core_tops * 1e12)
        return max(compute_s, hbm_s) * 1e6 + spec.launch_overhead_us
    if quantized:
        peak = spec.int8_tops  # 4-bit operands too: no int4 MMA on this device
    elif max(w_bits, a_bits) <= 16:
        peak = spec.fp16_tflops
    else:
        peak = spec.tf32_tflops
    tiles = math.ceil(m / spec.tile_m) * math.ceil(n / spec.tile_n) * groups

    def gemm_us(splits: int) -> float:
        waves = math.ceil(tiles * splits / spec.sms)
        compute_s = waves * 2.0 * spec.tile_m * spec.tile_n * k / splits / (peak * 1e12 / spec.sms)
        if splits == 1:
            return max(compute_s, hbm_s) * 1e6 + spec.launch_overhead_us
        # Each split stores its int32 partial sums and the epilogue kernel reads them all
        # back (counted at HBM bandwidth, though they may stay in L2); two launches.
        acc_s = 2 * splits * m * info.out_channels * 4 / (spec.hbm_tb_s * 1e12)
        return max(compute_s, hbm_s + acc_s) * 1e6 + 2 * spec.launch_overhead_us

    if not quantized:
        return gemm_us(1)
    # The integer kernels time no split against the split the launch rules propose.
    return min(gemm_us(1), gemm_us(propose_split_k(m, n, groups, ci, taps, spec.sms)))
