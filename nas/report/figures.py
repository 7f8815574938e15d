"""The report's PNG figures, drawn from the rows of nas.report.data with matplotlib's Agg
backend (no display needed). matplotlib is imported here only, so `import nas` stays light."""

from __future__ import annotations

from pathlib import Path

SIZE = (8, 5)  # inches; at DPI this is 800 x 500 pixels
DPI = 100
# Each cost's axis: the scale its column is divided by, and the unit after it.
_AXES = {"size_bytes": (1e3, "size (KB)"), "bitops": (1e6, "BitOps (M)"),
         "latency_us": (1.0, "latency (us)")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tradeoff(rows: list[dict], column: str, path: Path, xlabel_note: str = "") -> None:
    """Accuracy against one cost: every scored plan as a point coloured by searcher, each
    run's Pareto front as a step line, the space's uniform plans (the rows with no run) as
    labelled markers on the cost axis."""
    plt = _pyplot()
    scale, xlabel = _AXES[column]
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    scored = [r for r in rows if r["run"]]
    searchers = list(dict.fromkeys(r["searcher"] for r in scored))
    colours = {s: f"C{i}" for i, s in enumerate(searchers)}
    for searcher in searchers:
        mine = [r for r in scored if r["searcher"] == searcher]
        kinds = ", ".join(dict.fromkeys(r["accuracy_kind"] for r in mine))
        ax.scatter([r[column] / scale for r in mine], [r["accuracy"] for r in mine], s=24,
                   color=colours[searcher], alpha=0.7, label=f"{searcher} ({kinds})")
        for run in dict.fromkeys(r["run"] for r in mine):
            front = sorted((r for r in mine if r["run"] == run and r["pareto"]),
                           key=lambda r: r[column])
            if front:  # ringed too: a front of one plan draws no line
                xs, ys = [r[column] / scale for r in front], [r["accuracy"] for r in front]
                ax.step(xs, ys, where="post", color=colours[searcher], linewidth=1.5)
                ax.scatter(xs, ys, s=90, facecolors="none", edgecolors=colours[searcher],
                           linewidths=1.5)
    ax.set_ylabel("accuracy (%)")
    uniform: dict[float, list[str]] = {}  # plans of equal cost share one marker
    for r in (r for r in rows if not r["run"]):
        uniform.setdefault(r[column] / scale, []).append(r["point"])
    for x, labels in uniform.items():
        ax.axvline(x, color="0.6", linestyle=":", linewidth=1)
        # On the cost axis itself (x in data, y in axes units): no accuracy to place them at.
        ax.plot([x], [0.0], marker="^", color="0.3", markersize=8, linestyle="none",
                transform=ax.get_xaxis_transform(), clip_on=False)
        ax.annotate("/".join(labels), (x, 0.0), xycoords=ax.get_xaxis_transform(),
                    textcoords="offset points", xytext=(3, 6), fontsize=8, color="0.3")
    ax.set_xlabel(xlabel + (f", {xlabel_note}" if xlabel_note else ""))
    ax.set_title(f"accuracy vs {xlabel.split(' (')[0]} (step lines: Pareto fronts; "
                 f"triangles: uniform plans)", fontsize=10)
    if searchers:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, plt, path)


def layers(rows: list[dict], title: str, path: Path) -> None:
    """A plan layer by layer: weight and activation bits as bars, each layer's share of the
    plan's size as a line on the right axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["w_bits"] for r in rows], width=0.4, label="weight bits",
           color="C0")
    ax.bar([i + 0.2 for i in x], [r["a_bits"] for r in rows], width=0.4,
           label="activation bits", color="C1")
    ax.set_ylabel("bits")
    ax.set_ylim(0, 1.35 * max((max(r["w_bits"], r["a_bits"]) for r in rows), default=8))
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=45, ha="right", fontsize=8)
    share = ax.twinx()
    share.plot(x, [r["size_share_percent"] for r in rows], color="C2", marker="o",
               label="share of size (%)")
    share.set_ylabel("share of the plan's size (%)")
    share.set_ylim(0, 1.35 * max((r["size_share_percent"] for r in rows), default=100))
    handles = ax.get_legend_handles_labels()
    extra = share.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left",
              ncol=3)
    ax.set_title(title, fontsize=10)
    _save(fig, plt, path)


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
