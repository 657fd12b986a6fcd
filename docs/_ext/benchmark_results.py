"""Writes the body of ``docs/benchmarks.md`` from ``benchmarks/results/*.json`` at build time.

For each experiment of ``benchmarks/report.py`` (in its order) and each machine with a current
result (``results/<experiment>-<machine>.json``, smoke runs left out), the generated page has the
machine and the run described (``report.machine_text``), a plot of the time ratios of curvjax and
of each peer (each library over its own gradient, as the tables state), and the tables of
``report.document_tables``. ``docs/benchmarks.md`` includes the result,
``docs/_generated/benchmarks.md``; its figures are written next to it. Files are rewritten only
when their bytes change, so an unchanged result does not make Sphinx read the page again.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"

#: Bar colours by library (a peer keeps its colour across plots).
COLOURS = {
    "curvjax": "#1f77b4",
    "vmap(grad)": "#7f7f7f",
    "BackPACK": "#d62728",
    "curvlinops": "#9467bd",
    "jax-privacy": "#2ca02c",
    "Opacus": "#ff7f0e",
    "kronfluence": "#17becf",
}


def _report():
    """``benchmarks/report.py`` as a module (it needs neither jax nor torch)."""
    spec = importlib.util.spec_from_file_location("_curvjax_report", ROOT / "benchmarks/report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ratio_panels(document: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, float]]]]:
    """The time ratios of one result file: a list of (panel title, {row: {library: ratio}}).

    Every ratio is a library's time over its own gradient on the same machine in the same run
    (curvjax and ``vmap(grad)`` over ``jax.grad``, the torch peers (BackPACK, curvlinops, Opacus,
    kronfluence) over their own backward pass),
    as in the tables. Experiments without peers or with tables of another shape give no panel.
    """
    experiment = document.get("experiment")
    panels = []
    if experiment == "overhead":
        for summary in document["results"]:
            rows = {}
            for name, row in summary["rows"].items():
                if name == "grad":
                    continue
                label = "extract (all four)" if name == "all" else name
                rows[label] = {
                    "curvjax": row.get("curvjax_over_jax_grad"),
                    "vmap(grad)": row.get("vmap_over_jax_grad"),
                    "BackPACK": row.get("backpack_over_backward"),
                }
            panels.append((summary["model"], rows))
    elif experiment == "curvature":
        for result in document["results"]:
            grad = result["jax"]["grad"]["seconds"]
            rows = {}
            for name, row in result["jax"].items():
                if name in ("grad", "curvjax.grad", "extract (loss, grad)"):
                    continue
                peer = result.get("backpack", {}).get(name)
                rows[name] = {
                    "curvjax": row["seconds"] / grad,
                    "BackPACK": None if peer is None else peer.get("ratio"),
                }
            panels.append((result["model"], rows))
    elif experiment == "transformer":
        peer = document.get("curvlinops") or {}
        rows = {}
        for name, row in document["jax"].items():
            if name in ("grad", "curvjax.grad"):
                continue
            rows[name] = {
                "curvjax": row.get("ratio"),
                "curvlinops": peer.get(name, {}).get("ratio"),
            }
        panels.append(("GPT-style LM", rows))
    elif experiment == "private":
        for result in document["results"]:
            rows = {}
            for name, row in result["jax"].items():
                if name == "grad":
                    continue
                library = (
                    "curvjax"
                    if name.startswith("curvjax")
                    else "jax-privacy"
                    if name.startswith("jax_privacy")
                    else "vmap(grad)"
                )
                rows[name] = {library: row.get("ratio")}
            for name, row in (result.get("torch") or {}).items():
                if name != "backward":
                    rows[name] = {"Opacus": row.get("ratio")}
            panels.append((result["model"], rows))
    elif experiment == "influence":
        for result in document["results"]:
            peer = (result.get("torch") or {}).get("kronfluence ekfac") or {}
            ekfac = result["jax"].get("curvjax.ekfac") or {}
            rows = {
                "EK-FAC factors": {
                    "curvjax": ekfac.get("ratio"),
                    "kronfluence": peer.get("ratio"),
                }
            }
            panels.append((result["model"], rows))
    return [
        (title, {row: {k: v for k, v in bars.items() if v} for row, bars in rows.items()})
        for title, rows in panels
        if rows
    ]


def plot(panels, title: str) -> bytes:
    """Horizontal bars of the ratios, one panel per model, as PNG bytes (log scale, 1 marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    heights = [
        max(1.5, 0.32 * sum(len(bars) for bars in rows.values()) + 0.8) for _, rows in panels
    ]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(7.5, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for axis, (panel_title, rows) in zip(axes[:, 0], panels, strict=True):
        labels, positions, y = [], [], 0.0
        for row, bars in reversed(list(rows.items())):
            start = y
            for library, ratio in bars.items():
                axis.barh(y, ratio, height=0.8, color=COLOURS.get(library, "#8c564b"))
                axis.text(ratio, y, f" {ratio:.2f}", va="center", fontsize=7)
                y += 1
            labels.append(row)
            positions.append((start + y - 1) / 2)
            y += 0.6
        axis.set_yticks(positions, labels, fontsize=8)
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        values = [ratio for bars in rows.values() for ratio in bars.values()]
        axis.set_xlim(min(0.5, min(values) / 1.5), max(2.0, max(values) * 3))
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(panel_title, fontsize=9)
        axis.tick_params(axis="x", labelsize=8)
    libraries = {library for _, rows in panels for bars in rows.values() for library in bars}
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=COLOURS.get(library, "#8c564b"))
        for library in COLOURS
        if library in libraries
    ]
    figure.legend(
        handles,
        [library for library in COLOURS if library in libraries],
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    axes[-1, 0].set_xlabel(
        "time / the library's own gradient (log scale; lower is better)", fontsize=8
    )
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)


def render(results: Path = ROOT / "benchmarks" / "results") -> str:
    """The generated markdown; writes the figures into ``docs/_generated/``."""
    report = _report()
    GENERATED.mkdir(exist_ok=True)
    documents = []
    for path in sorted(results.glob("*.json")):
        document = report._load(path)
        if document is not None and not document.get("settings", {}).get("smoke"):
            documents.append((path, document))
    lines = []
    for experiment, heading in report.EXPERIMENTS:
        lines += [f"## {heading}", ""]
        current = [(p, d) for p, d in documents if d["experiment"] == experiment]
        if not current:
            lines += [
                f"No result file yet: `python benchmarks/{experiment}.py` writes one.",
                "",
            ]
        for path, document in current:
            machine = path.stem.removeprefix(experiment + "-")
            lines += [f"### {machine}", "", report.machine_text(document), ""]
            panels = ratio_panels(document)
            if panels:
                name = f"benchmark-{path.stem}.png"
                _write(GENERATED / name, plot(panels, f"{experiment} on {machine}"))
                peers = sorted(
                    {lib for _, rows in panels for bars in rows.values() for lib in bars}
                    - {"curvjax"}
                )
                lines += [
                    f"```{{figure}} /_generated/{name}",
                    f":alt: Time ratios of curvjax and {', '.join(peers)} on {machine}",
                    "",
                    f"Time of each row over the library's own gradient on {machine} "
                    "(curvjax and `vmap(grad)` over `jax.grad`, torch libraries over their "
                    "backward pass); the vertical line is 1.",
                    "```",
                    "",
                ]
            lines += [report.document_tables(document), ""]
    return "\n".join(lines)


def _generate(app) -> None:
    GENERATED.mkdir(exist_ok=True)
    _write(GENERATED / "benchmarks.md", render().encode())


def setup(app):
    app.connect("builder-inited", _generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
