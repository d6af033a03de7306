"""Plots written into the run folder (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file; a torn last line (a killed run) is ignored."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def loss_figure(rows: list[dict]):  # -> matplotlib.figure.Figure (matplotlib is imported only when plotting)
    """Loss (log scale when positive) and learning rate against step, the legend above the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    loss_line, = ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", linewidth=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(r["loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax2 = ax.twinx()
    lr_line, = ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", linewidth=1, alpha=0.7,
                        label="learning rate")
    ax2.set_ylabel("learning rate")
    # Above the plot, not in a corner: a figure corner is where the right axis' tick labels are, and inside
    # the axes it would hide the curves.
    ax.legend(handles=[loss_line, lr_line], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot loss (log scale) and learning rate against step; returns the PNG path, or None without data."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib.pyplot as plt

    fig = loss_figure(rows)
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_path
