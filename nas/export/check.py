"""The exported ONNX model in onnxruntime's CPU provider against the fake-quantized torch
model, on the same images: top-1 agreement, both accuracies, the largest logit difference.

onnxruntime's graph optimizations include one that changes the arithmetic:
WeightBiasQuantization turns a float bias after dequantized inputs into int32 at scale
s_x * s_w, as integer runtimes store it, while the model (and the file) keep it float. The
check runs with every optimization but that one; it also runs onnxruntime's defaults and
reports what that rounding alone changes, for a runtime that does the same.
"""

from __future__ import annotations

from typing import Any

import torch

from nas.export.spec import INPUT_NAME

# The export passes when its top-1 class agrees with torch's on this share of the images and
# its accuracy is within this many points of torch's.
MIN_AGREEMENT = 99.5
MAX_ACCURACY_GAP = 0.1
KEEP_FLOAT_BIAS = ["WeightBiasQuantization"]


class _Tally:
    def __init__(self):
        self.agree = self.right = 0
        self.max_diff = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> None:
        top = out.argmax(1)
        self.agree += int((top == ref.argmax(1)).sum())
        self.right += int((top == y).sum())
        self.max_diff = max(self.max_diff, float((out - ref).abs().max()))


@torch.no_grad()
def check_onnx(onnx_bytes: bytes, model: torch.nn.Module, loader,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run the torch model and onnxruntime on every batch of `loader`; the numbers of the
    check, and whether it passed.

    With the bias kept float, both compute the same integers and dequantize them alike: they
    differ where float arithmetic does (the order of a convolution's sums, 1e-7 relative),
    and by one step of a layer's scale where an activation lands that close to a rounding
    half step."""
    import onnxruntime as ort

    def session(disabled: list[str]):
        return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)

    exact, default = session(KEEP_FLOAT_BIAS), session([])
    model = model.eval()
    images = right_torch = 0
    max_logit = 0.0
    tallies = {"exact": _Tally(), "default": _Tally()}
    for x, y in loader:
        ref = model(x.to(device)).float().cpu()
        feed = {INPUT_NAME: x.float().contiguous().numpy()}
        for name, sess in (("exact", exact), ("default", default)):
            tallies[name].add(torch.from_numpy(sess.run(None, feed)[0]), ref, y)
        images += len(y)
        right_torch += int((ref.argmax(1) == y).sum())
        max_logit = max(max_logit, float(ref.abs().max()))
    t, d = tallies["exact"], tallies["default"]
    agreement = 100.0 * t.agree / images
    acc_torch, acc_onnx = 100.0 * right_torch / images, 100.0 * t.right / images
    return {"runtime": f"onnxruntime {ort.__version__}", "provider": "CPUExecutionProvider",
            "disabled_optimizers": KEEP_FLOAT_BIAS,
            "images": images, "top1_agreement": agreement, "torch_accuracy": acc_torch,
            "onnx_accuracy": acc_onnx, "accuracy_gap": acc_onnx - acc_torch,
            "max_logit_diff": t.max_diff, "max_abs_logit": max_logit,
            "min_agreement": MIN_AGREEMENT, "max_accuracy_gap": MAX_ACCURACY_GAP,
            "passed": agreement >= MIN_AGREEMENT and abs(acc_onnx - acc_torch) <= MAX_ACCURACY_GAP,
            "int32_bias": {"top1_agreement": 100.0 * d.agree / images,
                           "onnx_accuracy": 100.0 * d.right / images,
                           "max_logit_diff": d.max_diff}}
