"""A report in one folder: figures (PNG), the data behind each (CSV, same name) and
report.md showing them under a summary table."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from nas.report import data, figures
from nas.report.collect import Run
from nas.report.costs import ReportCosts
from nas.runs import atomic_write_text

SUMMARY_HEADERS = ["run", "method", "size B", "MBitOps", "latency us", "accuracy %",
                   "accuracy is", "trials or steps"]


def build(runs: list[Run], costs: ReportCosts, folder: Path) -> list[Path]:
    """Write every figure, its CSV and report.md into `folder`; the paths written."""
    written: list[Path] = []
    sections = []
    for cost, title in (("size", "size"), ("bitops", "BitOps"), ("latency", "latency")):
        rows = data.tradeoff_rows(runs, costs, cost)
        stem = f"accuracy-vs-{cost}"
        note = _latency_note(rows, costs) if cost == "latency" else ""
        written += _figure(folder, stem, rows, lambda p, r=rows, c=cost, n=note:
                           figures.tradeoff(r, data.COLUMNS[c], p, n))
        sections.append((f"Accuracy vs {title}" + (f" ({note})" if note else ""), stem))
    for i, run in enumerate(runs, 1):
        rows = data.layer_rows(run, costs)
        stem = f"layers-{i}-{_slug(run.method)}"
        title = f"{run.method} plan of {run.name}: bits per layer and share of size"
        written += _figure(folder, stem, rows, lambda p, r=rows, t=title: figures.layers(r, t, p))
        sections.append((f"Plan of {run.name} ({run.method}) per layer", stem))
    summary = data.summary_rows(runs, costs)
    atomic_write_text(folder / "summary.csv", _csv(summary))
    atomic_write_text(folder / "report.md", _markdown(runs, costs, summary, sections))
    return written + [folder / "summary.csv", folder / "report.md"]


def _figure(folder: Path, stem: str, rows: list[dict], draw) -> list[Path]:
    atomic_write_text(folder / f"{stem}.csv", _csv(rows))
    png = folder / f"{stem}.png"
    tmp = folder / f".{stem}.tmp.png"
    draw(tmp)
    tmp.replace(png)
    return [png, folder / f"{stem}.csv"]


def _latency_note(rows: list[dict], costs: ReportCosts) -> str:
    """How the plotted latencies were found, as `nas cost` labels them."""
    where = f"{costs.device}, batch {costs.batch}"
    kinds = {r["latency"] for r in rows}
    if kinds == {"measured"}:
        return f"measured, {where}"
    if kinds == {"estimated"}:
        return f"estimated, {where}"
    return f"measured where a table has the layer, estimated elsewhere, {where}"


def summary_table(summary: list[dict]) -> list[list]:
    """The summary rows as table cells (the command prints them, report.md shows them)."""
    return [[r["run"], r["method"], int(r["size_bytes"]), round(r["bitops"] / 1e6, 2),
             round(r["latency_us"], 2),
             "" if r["accuracy"] == "" else round(r["accuracy"], 2), r["accuracy_kind"],
             r["trials"]] for r in summary]


def _markdown(runs: list[Run], costs: ReportCosts, summary: list[dict], sections) -> str:
    lines = [f"# Report: space {runs[0].space.name}", "",
             (f"{len(runs)} run{'s' if len(runs) > 1 else ''}. Sizes and BitOps from the cost "
             f"models; latency on {costs.device} at batch {costs.batch} (estimated where no "
             f"measured table has the layer: {costs.estimate_method}). Trial accuracies are on "
             f"the arch split, the runs' own plans on the test split, as the accuracy column "
             f"says."), "",
             "| " + " | ".join(SUMMARY_HEADERS) + " |",
             "|" + "---|" * len(SUMMARY_HEADERS)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in summary_table(summary)]
    lines += ["", "Data: [summary.csv](summary.csv)", ""]
    for title, stem in sections:
        lines += [f"## {title}", "", f"![{title}]({stem}.png)", "",
                  f"Data: [{stem}.csv]({stem}.csv)", ""]
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)
