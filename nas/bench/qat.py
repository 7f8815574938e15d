"""`nas bench qat`: what QAT recovers of what PTQ loses, and what export keeps.

For uniform W8A8, uniform W4A4 and a searched mixed plan, on one float checkpoint: float,
PTQ, QAT and QAT with distillation test accuracy, each QAT run made exactly as a user makes
it (`nas qat`, a run folder each), and each QAT model exported (`nas export`) and checked in
onnxruntime. The searched plan is also fine-tuned from its search's supernet (`nas qat
--run`), the path that keeps the search's score. Goals (the whitepaper's claims): at 4 bits
QAT recovers at least 70 % of what PTQ loses, (QAT - PTQ) / (float - PTQ); at 8 bits PTQ is
within 0.5 points of float.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

RECOVERY_GOAL = 70.0  # % of the 4-bit PTQ loss that QAT wins back
PTQ8_GOAL = 0.5  # points between 8-bit PTQ and float


def nas_run(args: list[str], log: Path) -> Path:
    """Run one `nas` command as a user does, in its own process (its output to `log`); its
    run folder."""
    import subprocess
    import sys

    runs = Path(args[args.index("--runs-dir") + 1])
    before = set(runs.iterdir()) if runs.is_dir() else set()
    with open(log, "a") as out:
        print(f"$ nas {' '.join(args)}", file=out, flush=True)
        code = subprocess.run([sys.executable, "-m", "nas", *args], stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        from nas.errors import NasError

        raise NasError(f"bench step 'nas {' '.join(args)}' failed (exit {code}); its output "
                       f"is in {log}")
    (folder,) = set(runs.iterdir()) - before
    return folder


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def recovery(float_acc: float, ptq: float, qat: float) -> float | None:
    """Percent of the PTQ loss that QAT wins back; None when PTQ lost nothing."""
    lost = float_acc - ptq
    return None if lost <= 0 else 100.0 * (qat - ptq) / lost


def run_plan(name: str, plan_args: list[str], common: list[str], qat_budget: str,
             folder: Path, say: Callable[[str], None]) -> dict:
    """QAT (plain and distilled) of one plan, each exported and checked: one result row."""
    runs, log = str(folder / "runs"), folder / "commands.log"
    row: dict = {"plan": name}
    for distill in (False, True):
        tag = "qat_distill" if distill else "qat"
        say(f"{name}: {'QAT + distillation' if distill else 'QAT'} for {qat_budget}")
        run = nas_run([*common, "--runs-dir", runs, "qat", *plan_args, "--budget", qat_budget,
                    "--no-progress", *(["--distill"] if distill else [])], log)
        s = _summary(run)
        row.update({"float": s["float_accuracy"], "ptq": s["ptq_accuracy"],
                    f"{tag}_start": s["qat_start_accuracy"], tag: s["qat_accuracy"],
                    f"{tag}_run": str(run), "size_bytes": s["size_bytes"],
                    "bits": s["bits"], "source": s["source"]})
        if s.get("one_shot_test_accuracy") is not None:
            row["one_shot"] = s["one_shot_test_accuracy"]
        exported = nas_run([*common, "--runs-dir", runs, "export", "--run", str(run),
                         "--output", str(folder / f"{name}-{tag}.onnx")], log)
        check = _summary(exported)["check"]
        row[f"{tag}_export"] = {k: check[k] for k in (
            "top1_agreement", "onnx_accuracy", "torch_accuracy", "accuracy_gap",
            "max_logit_diff", "passed")}
    row["recovery"] = recovery(row["float"], row["ptq"], row["qat"])
    row["recovery_distill"] = recovery(row["float"], row["ptq"], row["qat_distill"])
    return row


def verdicts(rows: list[dict]) -> list[dict]:
    """The goals, each row that they apply to, met or not."""
    out = []
    for r in rows:
        if r["plan"] == "W8A8":
            gap = r["float"] - r["ptq"]
            out.append({"goal": f"8-bit PTQ within {PTQ8_GOAL} points of float", "plan": r["plan"],
                        "measured": f"{gap:+.2f} points", "met": gap <= PTQ8_GOAL})
        elif r["plan"] == "W4A4":
            for key, label in (("recovery", "QAT"), ("recovery_distill", "QAT + distillation")):
                value = r[key]
                out.append({"goal": f"{label} recovers >= {RECOVERY_GOAL:g} % of the 4-bit PTQ "
                                    f"loss", "plan": r["plan"],
                            "measured": "PTQ lost nothing" if value is None else f"{value:.1f} %",
                            "met": value is None or value >= RECOVERY_GOAL})
    return out


def tables(results: dict) -> list[tuple[str, list[str], list[list]]]:
    def pct(v):
        return "-" if v is None else round(v, 2)

    acc = [[r["plan"], r["source"], r["bits"] if isinstance(r["bits"], str) else
            " ".join(f"{k}x{v}" for k, v in r["bits"].items()), pct(r["float"]), pct(r["ptq"]),
            pct(r.get("one_shot")), pct(r["qat"]), pct(r["qat_distill"]),
            "-" if r["recovery"] is None else f"{r['recovery']:.0f} %",
            "-" if r["recovery_distill"] is None else f"{r['recovery_distill']:.0f} %"]
           for r in results["rows"]]
    parity = [[r["plan"], r["source"], label, pct(e["torch_accuracy"]), pct(e["onnx_accuracy"]),
               pct(e["top1_agreement"]), f"{e['max_logit_diff']:.3g}",
               "passed" if e["passed"] else "FAILED"]
              for r in results["rows"]
              for label, e in (("QAT", r["qat_export"]), ("QAT + distill", r["qat_distill_export"]))]
    goals = [[v["goal"], v["plan"], v["measured"], "met" if v["met"] else "MISSED"]
             for v in results["verdicts"]]
    return [
        (f"test accuracy (%) on {results['space']}, QAT budget {results['qat_budget']} per run",
         ["plan", "weights from", "bits", "float", "PTQ", "one-shot", "QAT", "QAT + distill",
          "QAT recovers", "distill recovers"], acc),
        ("export parity: onnxruntime (CPU) vs the fake-quantized torch model, test split",
         ["plan", "weights from", "model", "torch %", "onnx %", "top-1 agreement %",
          "max |logit diff|", "check"], parity),
        ("goals", ["goal", "plan", "measured", "verdict"], goals),
    ]
