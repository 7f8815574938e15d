"""Launch a few representative layers once each, pinned to the configuration that the
committed latency table says autotuning chose (so a profiler sees one launch per layer, not
the tuning runs); with --cudnn, their fp16 cuDNN baselines instead. Run under `ncu` by
scripts/gpu-profile.sh. Needs a CUDA GPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nas.cost.measure import make_case
from nas.cost.tables import table_key
from nas.kernels.configs import KernelConfig, Launch
from nas.spaces import load_space

ROOT = Path(__file__).resolve().parents[1]
# (space, layer name, batch, precisions)
LAYERS = [
    ("imagenet_resnet18", "layer1.0.conv1", 64, [(8, 8), (4, 8)]),
    ("imagenet_resnet18", "layer3.0.conv2", 64, [(8, 8)]),
    ("imagenet_resnet18", "layer4.0.conv2", 1, [(8, 8), (4, 8)]),
    ("imagenet_mobilenetv2", "features.3.conv.1.0", 64, [(8, 8)]),
]


def config_of(entry: dict) -> dict:
    """The tile and launch variant the table's entry was timed with, as make_case arguments."""
    if "kernel_config" not in entry:
        return {}
    kv = dict(part.split("=") for part in entry["kernel_config"].split())
    if "BLOCK_C" in kv:
        return {}  # the direct (depthwise) kernel: autotuned again (its tile cannot be pinned)
    cap = int(kv["maxnreg"]) if "maxnreg" in kv else None
    return {"config": KernelConfig(int(kv["BLOCK_M"]), int(kv["BLOCK_N"]), int(kv["BLOCK_K"]),
                                   int(kv["warps"]), int(kv["stages"]), cap),
            "launch": Launch.parse(kv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cudnn", action="store_true", help="launch the fp16 baselines instead")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = not args.cudnn  # profile cuDNN's default pick, once
    gen = torch.Generator(device=device).manual_seed(0)
    for space_name, layer, batch, precisions in LAYERS:
        table = json.loads((ROOT / f"cost_models/h200-{space_name}-b{batch}.json").read_text())
        entries = {e["key"]: e for e in table["entries"]}
        info = next(l.info for l in load_space(space_name).layers() if l.name == layer)
        for w_bits, a_bits in precisions:
            entry = entries[table_key(info, batch, w_bits, a_bits)]
            case = make_case(info, batch, w_bits, a_bits, device, gen, **config_of(entry))
            (case.baseline if args.cudnn else case.run)()
            torch.cuda.synchronize()
            print(f"{entry['key']}: table {entry['us']} us, cuDNN {entry['fp16_cudnn_us']} us, "
                  f"{entry.get('kernel_config', 'direct kernel')}", flush=True)


if __name__ == "__main__":
    main()
