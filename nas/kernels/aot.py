"""The integer kernels compiled for the H200 (sm_90) ahead of time, on a machine without a
GPU, and what the machine code says about their speed: registers and spills, shared memory,
thread blocks resident per SM, the tensor-core instruction, whether it runs asynchronously,
and machine instructions per main-loop iteration.

These are static facts of the compiled code, not timings: they show where a kernel cannot be
fast (spills, one block per SM, many instructions per tensor-core step) before a GPU is at
hand. Compiling needs the kernels as Triton JIT functions, not interpreted, so it runs in a
process of its own (`compile_report`), started with `conv_kernels.AOT_ENV` set; there every
launch compiles for the target instead of running (`_compile_instead_of_launch`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

from nas.errors import ConfigError

ARCH = 90  # Hopper: the H200 the latency tables are measured on
# Per-SM limits of compute capability 9.0 (CUDA programming guide, "Technical
# Specifications per Compute Capability").
SM90 = {"registers": 65536, "register_unit": 256, "shared_bytes": 228 * 1024,
        "block_shared_max": 227 * 1024, "block_reserved": 1024, "warps": 64, "blocks": 32}


@dataclass(frozen=True)
class KernelFacts:
    kernel: str
    registers: int
    spill_bytes: int  # stack + local memory per thread: registers spilled
    shared_bytes: int
    num_warps: int
    num_stages: int
    maxnreg: int | None  # the register cap it was compiled with, if any
    mma: str | None  # the tensor-core instruction's shape and types, e.g. m64n128k32.s32.s8.s8
    mma_async: bool  # consecutive MMAs overlap (wgmma wait_group > 0 in the loop)
    loop_instructions: int | None  # SASS instructions per iteration of the MMA loop
    loop_divisions: int | None  # integer divisions in it (each a reciprocal: MUFU.RCP)
    # SASS instructions outside that loop (set-up, the pipeline's first loads, the epilogue;
    # the whole kernel where it has none): run once per tile, whatever the reduction's length
    other_instructions: int

    @property
    def blocks_per_sm(self) -> int:
        """Thread blocks of this kernel one SM holds at once (0: it cannot launch)."""
        per_warp = -(-self.registers * 32 // SM90["register_unit"]) * SM90["register_unit"]
        by_regs = (SM90["registers"] // (per_warp * self.num_warps) if self.registers
                   else SM90["blocks"])
        if self.shared_bytes > SM90["block_shared_max"]:
            return 0
        by_smem = SM90["shared_bytes"] // (self.shared_bytes + SM90["block_reserved"])
        return min(by_regs, by_smem, SM90["warps"] // self.num_warps, SM90["blocks"])


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _machine_code_facts(cubin: bytes) -> tuple[int, int, int | None, int | None, int]:
    """(registers, spill bytes, SASS instructions and integer divisions per iteration of the
    innermost loop that issues tensor-core MMAs, or None without one, and the instructions
    outside it) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    regs, stack, local = map(int, found.groups())
    code = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, ins in code:
        jump = re.search(r"\bBRA\s+(0x[0-9a-f]+)", ins)
        if jump and int(jump.group(1), 16) < address:
            span = (int(jump.group(1), 16), address)
            body = [i for a, i in code if span[0] <= a <= span[1]]
            if any("GMMA" in i or re.match(r"(@\S+\s+)?[IH]MMA", i) for i in body):
                loops.append((len(body), sum("MUFU.RCP" in i for i in body), span))
    loop, divisions, (first, last) = min(loops) if loops else (None, None, (-1, -1))
    # outside the loop, not counting the NOPs that pad the code's end
    other = sum(not (first <= a <= last) and not i.startswith("NOP") for a, i in code)
    return regs, stack + local, loop, divisions, other


def kernel_facts(kernel) -> KernelFacts:
    """The static facts of one CompiledKernel."""
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    mma = re.search(r"wgmma\.mma_async\.sync\.aligned\.(\w+\.\w+\.\w+\.\w+)", ptx) or \
        re.search(r"\bmma\.sync\.aligned\.(\w+(?:\.\w+)*)", ptx)
    pendings = [int(p) for p in re.findall(r"pendings = (\d+)", ttgir)]
    regs, spills, loop, divisions, other = _machine_code_facts(kernel.asm["cubin"])
    return KernelFacts(kernel=kernel.name, registers=regs, spill_bytes=spills,
                       shared_bytes=int(kernel.metadata.shared),
                       num_warps=int(kernel.metadata.num_warps),
                       num_stages=int(kernel.metadata.num_stages),
                       maxnreg=getattr(kernel.metadata, "maxnreg", None),
                       mma=mma.group(1) if mma else None, mma_async=any(p > 0 for p in pendings),
                       loop_instructions=loop, loop_divisions=divisions,
                       other_instructions=other)


def _compile_instead_of_launch(record: Callable, for_gpu_present: bool = False) -> None:
    """From now on, in this process, `kernel[grid](...)` compiles the kernel with exactly the
    specialisation a launch with these arguments would get, and hands the compiled kernel
    (an autotuner's: a list of them) to `record` instead of running it. For sm_90 without a
    GPU (Triton compiles once its driver names the target), or with `for_gpu_present` for
    the GPU this process sees."""
    from triton.backends import DriverBase
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import KernelInterface

    def compile_only(self, grid):
        return lambda *args, **kwargs: record(self.warmup(*args, grid=grid, **kwargs))

    KernelInterface.__getitem__ = compile_only
    if for_gpu_present:
        return

    class TargetOnly(DriverBase):
        """A driver that only names the target (nothing is loaded or launched)."""

        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("nothing runs while compiling ahead of time")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("nothing runs while compiling ahead of time")

    driver.set_active(TargetOnly())


def _candidates(info, batch: int, w_bits: int, a_bits: int) -> list:
    """The launch variants a GPU would time for this (layer, precision) (None for the
    depthwise kernel, which has none); each launch's autotuner then compiles its own tiles,
    those it keeps for the layer and variant."""
    from nas.kernels import conv
    from nas.kernels.configs import packed_operands

    c, o, g = info.in_channels, info.out_channels, info.groups
    if g > 1 and g == c == o:
        return [None]
    return conv.timed_launches(batch, *info.in_hw, c, o, *info.kernel, info.stride,
                               info.padding, g, *packed_operands(info, w_bits, a_bits),
                               conv.INTERPRETER_SMS)


def _candidate_runs(request: dict):
    """(layer, precision, launch, run) for every kernel launch a GPU would try for the
    request's (space, batch): `run()` launches it autotuned, which here compiles every tile
    the autotuner keeps instead."""
    import torch

    from nas.kernels.inputs import int_launch
    from nas.spaces import FLOAT_BITS, SearchSpace, load_space

    given = request["space"]  # a name or .yaml path, or a space as SearchSpace.to_dict gives it
    space = SearchSpace.from_dict(given) if isinstance(given, dict) else load_space(given)
    wanted = set(request.get("precisions") or [])
    names = set(request.get("layers") or [])
    device = torch.device(request.get("device", "cpu"))
    gen = torch.Generator(device=device).manual_seed(0)
    layers = space.layers()
    for i, layer in enumerate(layers, 1):
        if names and layer.name not in names:
            continue
        choices = {(c.w_bits, c.a_bits) for c in layer.choices
                   if c.w_bits not in FLOAT_BITS and c.a_bits not in FLOAT_BITS}
        for w_bits, a_bits in sorted(choices):
            precision = f"W{w_bits}A{a_bits}"
            if wanted and precision not in wanted:
                continue
            infos = [layer.info]
            if request.get("prepadded") and any(layer.info.padding):
                infos.append(layer.info.prepadded())
            for info in infos:
                for launch in _candidates(info, request["batch"], w_bits, a_bits):
                    def run(info=info, launch=launch, w=w_bits, a=a_bits):  # bound now
                        int_launch(info, request["batch"], w, a, device, gen, launch=launch)()
                    yield layer, precision, launch, run
        if request.get("progress", True):
            print(f"compiled layer {i}/{len(layers)} ({layer.name})", file=sys.stderr, flush=True)


def _flatten(record: Callable) -> Callable:
    """`record` for each compiled kernel (an autotuner's warmup compiles a list)."""
    return lambda kernels: [record(k) for k in (kernels if isinstance(kernels, list)
                                                 else [kernels])]


def _worker(request: dict) -> None:
    """Compile every candidate kernel of the request's (space, batch) and print one JSON line
    per compiled kernel (progress on stderr)."""
    compiled: list = []
    _compile_instead_of_launch(_flatten(compiled.append))
    facts_of: dict[str, dict] = {}
    for layer, precision, launch, run in _candidate_runs(request):
        compiled.clear()
        run()
        for kernel in compiled:
            key = kernel.hash
            if key not in facts_of:
                facts = kernel_facts(kernel)
                facts_of[key] = {**facts.__dict__, "blocks_per_sm": facts.blocks_per_sm,
                                 "constants": _constants(kernel), "layers": []}
            use = {"layer": layer.name, "precision": precision,
                   "launch": launch.describe() if launch else ""}
            if use not in facts_of[key]["layers"]:
                facts_of[key]["layers"].append(use)
    for facts in facts_of.values():
        print(json.dumps(facts))


def _warm_worker(request: dict) -> None:
    """Compile this shard's share of the candidate launches into Triton's on-disk cache, for
    the GPU this process sees (or for sm_90 without one), and print how many kernels."""
    compiled: set[str] = set()
    _compile_instead_of_launch(_flatten(lambda k: compiled.add(k.hash)),
                               for_gpu_present=request.get("device", "cpu") != "cpu")
    shard, shards = request["shard"], request["shards"]
    for i, (*_, run) in enumerate(_candidate_runs({**request, "progress": False})):
        if i % shards == shard:
            run()
    print(json.dumps({"shard": shard, "kernels": sorted(compiled)}))


def _compiling_env(for_gpu_present: bool = False) -> dict:
    """The environment of a process that compiles the kernels: never interpreted; without a
    GPU (NAS_KERNELS_AOT), compiled for sm_90 all the same."""
    from nas.kernels.conv_kernels import AOT_ENV

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not for_gpu_present:
        env[AOT_ENV] = "1"
    return env


def warm_cache(space: str, batch: int, jobs: int, device: str = "cuda",
               precisions: list[str] | None = None, layers: list[str] | None = None,
               prepadded: bool = False, timeout_s: float = 1800) -> int:
    """Compile every kernel a GPU would try for the space's layers (those named in `layers`,
    where given; with `prepadded`, each padded one on a bordered input too) at `batch` into
    Triton's on-disk cache, in `jobs` processes at once, so
    that autotuning afterwards loads them instead of compiling one after another. `device`
    "cuda" compiles for the GPU present; "cpu" compiles for sm_90 without one. Returns the
    number of distinct kernels."""
    if jobs < 1:
        raise ConfigError(f"--compile-jobs {jobs}: give 1 or more processes")
    env = _compiling_env(for_gpu_present=device != "cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nas.kernels.aot", json.dumps(
            {"mode": "warm", "space": space, "batch": batch, "precisions": precisions or [],
             "layers": layers or [], "prepadded": prepadded, "device": device, "shard": k,
             "shards": jobs})],
        env=env, stdout=subprocess.PIPE, text=True) for k in range(jobs)]
    kernels: set[str] = set()
    failed = []
    for k, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            failed.append(f"process {k} exited {proc.returncode}")
        for line in out.splitlines():
            if line.startswith("{"):
                kernels.update(json.loads(line)["kernels"])
    if failed:
        raise ConfigError(f"compiling the kernels of {space} ahead of timing failed "
                          f"({'; '.join(failed)}); its error is printed above")
    return len(kernels)


def _constants(kernel) -> dict:
    """The compile-time flags of a compiled kernel (tile sizes and switches)."""
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constants", None) or {}
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    out = {}
    for key, value in constants.items():
        name = names[key[0]] if isinstance(key, tuple) and names else str(key)
        if isinstance(value, (bool, int, float)):
            out[name] = value
    return out


def compile_report(space: str | dict, batch: int, precisions: list[str] | None = None,
                   timeout_s: float = 3600) -> list[dict]:
    """Compile every kernel a GPU would try for the space's layers at `batch` (every
    autotuning tile and launch variant), for sm_90, in a process of its own; one dict per
    distinct compiled kernel: its KernelFacts, flags (the tile among them), and the (layer,
    precision, launch) that use it."""
    request = {"space": space, "batch": batch, "precisions": precisions or []}
    done = subprocess.run([sys.executable, "-m", "nas.kernels.aot", json.dumps(request)],
                          env=_compiling_env(), stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise ConfigError(f"compiling the kernels for sm_{ARCH} failed (exit {done.returncode}); "
                          f"its error is printed above")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    _request = json.loads(sys.argv[1])
    (_warm_worker if _request.get("mode") == "warm" else _worker)(_request)
