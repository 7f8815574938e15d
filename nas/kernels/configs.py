"""Launch configurations for the implicit-GEMM kernel, checked against Hopper's rules.

The CPU interpreter runs any configuration, so the GPU's constraints are enforced here:
int8 `tl.dot` needs BLOCK_K >= 32 and a multiple of 32; the wgmma path wants BLOCK_M a
multiple of 64 and 4 or 8 warps; BLOCK_N a multiple of 16 (the MMA's N granularity).
"""

from __future__ import annotations

from dataclasses import dataclass

from nas.errors import ConfigError

# Fewer input channels per group than this: the GEMM walks the flattened (kh, kw, ci) axis
# (or kernel rows) instead of one tap at a time (a block of 32 channels would be mostly
# padding).
FLAT_K_BELOW = 16

# Split-K (see _conv_gemm_kernel) is proposed for layers whose tiles would fill under a
# quarter of the GPU's SMs, and only as far as every split keeps SPLIT_MIN_STEPS reduction
# steps; on a GPU the proposal is kept only where timing the whole launch beats no split
# (the split pays for storing its partial sums and adding them up in a separate epilogue).
# The latency estimate (nas.cost.roofline) splits as proposed here, and its calibration
# reads `packed_operands`, so this module stays free of torch.
SPLIT_MIN_STEPS, SPLIT_MAX = 4, 16
# At most this many splits on request: the epilogue kernel unrolls one load per split.
SPLIT_LIMIT = 64


def propose_split_k(m: int, co_g: int, groups: int, ci: int, taps: int, sms: int) -> int:
    """Reduction splits for an implicit GEMM of m pixels x co_g channels per group, counted
    with 64 x 64 tiles and 64-channel reduction steps (tap by tap, or flattened below
    FLAT_K_BELOW input channels)."""
    tiles = -(-m // 64) * -(-co_g // 64) * groups
    if tiles * 4 > sms:
        return 1
    steps = -(-taps * ci // 64) if ci < FLAT_K_BELOW else taps * -(-ci // 64)
    return max(1, min(-(-sms // tiles), steps // SPLIT_MIN_STEPS, SPLIT_MAX))


def packed_operands(info, w_bits: int, a_bits: int) -> tuple[bool, bool]:
    """Whether a layer's activations and weights go to the kernel packed two per byte: at 4
    bits or fewer, where the packed axis (channels per group) is even."""
    ci = info.in_channels // info.groups
    return (a_bits <= 4 and ci % 2 == 0 and info.groups == 1), (w_bits <= 4 and ci % 2 == 0)


# Split-K's epilogue kernel reads every split's partial sums: tiles small enough that a
# layer small enough to be split (batch 1) still spreads over about as many programs as an
# H200 has SMs; the smallest keeps 2 values per thread and split.
EPILOGUE_TILES = ((64, 64), (32, 64), (32, 32), (16, 32), (16, 16))


def epilogue_tile(m: int, o: int, programs: int = 128) -> tuple[int, int]:
    """The largest of EPILOGUE_TILES that gives at least `programs` programs over an [m, o]
    output (else the smallest)."""
    for bm, bn in EPILOGUE_TILES:
        if -(-m // bm) * -(-o // bn) >= programs:
            return bm, bn
    return EPILOGUE_TILES[-1]


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None  # a register cap per thread for ptxas (None: its own choice)


@dataclass(frozen=True)
class Launch:
    """How a GEMM convolution is launched, beside its tile (KernelConfig).

    - split_k: programs sharing each output tile's reduction (each stores its int32 partial
      sums in a slice of its own; the epilogue then runs as a kernel of its own, which adds
      them up: exact);
    - unpack_first: packed 4-bit operands unpacked to int8 once, by a pre-pass, instead of in
      every tile that reads them;
    - im2col: the GEMM's rows (activation patches, zero point in the padding) written out
      first by a pre-pass, then multiplied as a 1x1 convolution (operands int8; packed
      weights are unpacked by the pre-pass too);
    - pad_image: for a kernel-row walk (a stem: few input channels, int8 activations, one
      group), x copied first by a pre-pass into an image with its padding (the zero point)
      and each pixel's channels padded to a multiple of 4 bytes, so that the walk loads
      whole aligned rows, unmasked."""

    split_k: int = 1
    unpack_first: bool = False
    im2col: bool = False
    pad_image: bool = False

    def describe(self) -> str:
        """The choices that differ from the default, as `key=value` words ('' for none)."""
        return " ".join([f"split_k={self.split_k}"] * (self.split_k > 1)
                        + ["unpack_first=1"] * self.unpack_first + ["im2col=1"] * self.im2col
                        + ["pad_image=1"] * self.pad_image)

    @classmethod
    def parse(cls, words: dict[str, str]) -> "Launch":
        """The inverse of describe(), from its words split at '='."""
        return cls(int(words.get("split_k", 1)), words.get("unpack_first") == "1",
                   words.get("im2col") == "1", words.get("pad_image") == "1")


def validate_launch(launch: Launch) -> Launch:
    if not isinstance(launch, Launch):
        raise ConfigError(f"launch={launch!r} must be a nas.kernels.configs.Launch (or None to "
                          f"choose one)")
    if isinstance(launch.split_k, bool) or not isinstance(launch.split_k, int) or launch.split_k < 1:
        raise ConfigError(f"launch split_k={launch.split_k!r} must be a positive whole number")
    if launch.split_k > SPLIT_LIMIT:
        raise ConfigError(f"launch split_k={launch.split_k}: at most {SPLIT_LIMIT} splits (the "
                          f"epilogue kernel reads every split's partial sums)")
    for name in ("unpack_first", "im2col", "pad_image"):
        if not isinstance(getattr(launch, name), bool):
            raise ConfigError(f"launch {name}={getattr(launch, name)!r} must be True or False")
    if launch.unpack_first and launch.im2col:
        raise ConfigError("launch: im2col already unpacks its operands; give unpack_first=False "
                          "with it")
    if launch.pad_image and (launch.unpack_first or launch.im2col):
        raise ConfigError("launch: pad_image is a layout of its own for the kernel-row walk; give "
                          "it without unpack_first and im2col")
    return launch


def validate_config(cfg: KernelConfig) -> KernelConfig:
    problems = []
    if cfg.block_k < 32 or cfg.block_k % 32:
        problems.append(f"BLOCK_K={cfg.block_k} must be a multiple of 32 (int8 tl.dot)")
    if cfg.block_m < 64 or cfg.block_m % 64:
        problems.append(f"BLOCK_M={cfg.block_m} must be a multiple of 64 (wgmma)")
    if cfg.block_n < 16 or cfg.block_n % 16:
        problems.append(f"BLOCK_N={cfg.block_n} must be a multiple of 16")
    if cfg.num_warps not in (4, 8):
        problems.append(f"num_warps={cfg.num_warps} must be 4 or 8 (wgmma)")
    if cfg.num_stages < 1:
        problems.append(f"num_stages={cfg.num_stages} must be at least 1")
    if cfg.maxnreg is not None and not (24 <= cfg.maxnreg <= 255 and cfg.maxnreg % 8 == 0):
        problems.append(f"maxnreg={cfg.maxnreg} must be a multiple of 8 in 24-255")
    if problems:
        raise ConfigError("invalid kernel config: " + "; ".join(problems))
    return cfg


# Autotuned on the GPU; every entry must pass validate_config (a test checks).
GPU_CONFIGS = [
    KernelConfig(128, 128, 64, 8, 3), KernelConfig(128, 64, 64, 4, 4),
    KernelConfig(64, 128, 64, 4, 4), KernelConfig(64, 64, 128, 4, 3),
    KernelConfig(128, 256, 64, 8, 3), KernelConfig(64, 32, 64, 4, 4),
    KernelConfig(128, 128, 128, 8, 3), KernelConfig(64, 64, 64, 4, 2),
    KernelConfig(128, 64, 32, 4, 4), KernelConfig(64, 64, 32, 4, 3),
    KernelConfig(256, 128, 64, 8, 3), KernelConfig(256, 64, 64, 8, 3),
    KernelConfig(128, 128, 64, 4, 4),
    # Compiled for sm_90 (`nas bench compile`): 128-168 registers, so 3 blocks per SM, and
    # about 200 instructions per 64x128x128 step of the W8A8 MMA loop.
    KernelConfig(64, 128, 128, 4, 3),
    # 128x128 with 8 warps needs 128-140 registers with the zero-point corrections: capped
    # at 128 (a few bytes spill in the epilogue) two blocks share an SM, so one's tensor-core
    # steps can run while the other waits for its own (int8 wgmma is synchronous in Triton).
    KernelConfig(128, 128, 64, 8, 3, maxnreg=128),
]
# The one configuration the CPU interpreter runs (valid on the GPU too).
INTERPRETER_CONFIG = KernelConfig(64, 32, 32, 4, 1)


@dataclass(frozen=True)
class DirectConfig:
    """A tile of the direct (depthwise) kernel: output pixels x channels."""

    block_m: int
    block_c: int
    num_warps: int = 4


def validate_direct_config(cfg: DirectConfig) -> DirectConfig:
    problems = [f"{name}={v} must be a power of two (tl.arange)"
                for name, v in (("BLOCK_M", cfg.block_m), ("BLOCK_C", cfg.block_c))
                if v < 1 or v & (v - 1)]
    if cfg.num_warps not in (1, 2, 4, 8):
        problems.append(f"num_warps={cfg.num_warps} must be 1, 2, 4 or 8")
    if problems:
        raise ConfigError("invalid depthwise config: " + "; ".join(problems))
    return cfg


# Autotuned on the GPU: wide channel tiles read longer contiguous runs per pixel (NHWC),
# tall ones suit few channels.
DEPTHWISE_CONFIGS = [
    DirectConfig(64, 32, 4), DirectConfig(32, 64, 4), DirectConfig(64, 64, 4),
    DirectConfig(128, 32, 4), DirectConfig(32, 128, 4), DirectConfig(16, 128, 4),
    DirectConfig(128, 64, 8), DirectConfig(64, 128, 8),
]
INTERPRETER_DEPTHWISE = DirectConfig(64, 32, 4)
