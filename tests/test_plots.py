"""loss.png: the figure the run folder gets, checked on its drawn layout."""

from __future__ import annotations

import math

import pytest

from ddpmctl.plots import loss_curve, loss_figure


def rows(peak_lr: float, steps: int = 2000) -> list[dict]:
    """A run's metrics: falling loss, linear warmup then cosine decay of the learning rate."""
    out = []
    for step in range(10, steps + 1, 10):
        lr = peak_lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        out.append({"step": step, "loss": 0.05 + 1 / step, "lr": lr})
    return out


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def legend_clashes(fig) -> list[str]:
    """What the legend covers of the right axis (tick labels, offset text, label) or where it leaves the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    right = fig.axes[1].yaxis
    texts = [t for t in right.get_ticklabels() if t.get_visible() and t.get_text()]
    assert texts, "the right axis has no tick labels to check against"
    texts += [t for t in (right.get_offset_text(), right.label) if t.get_visible() and t.get_text()]
    clashes = [f"covers {t.get_text()!r}" for t in texts if overlap(box, t.get_window_extent(renderer))]
    if box.x0 < 0 or box.y0 < 0 or box.x1 > fig.bbox.x1 or box.y1 > fig.bbox.y1:
        clashes.append("leaves the figure")
    return clashes


@pytest.mark.parametrize("peak_lr", [1e-4, 2e-3, 0.5])
def test_the_legend_keeps_off_the_right_axis_tick_labels(peak_lr):
    import matplotlib.pyplot as plt

    fig = loss_figure(rows(peak_lr))
    try:
        assert legend_clashes(fig) == []
    finally:
        plt.close(fig)


def test_the_check_sees_a_legend_in_the_figure_corner():
    import matplotlib.pyplot as plt

    fig = loss_figure(rows(1e-4))
    try:
        fig.axes[0].get_legend().remove()
        fig.legend(loc="upper right")  # where loss.png had it: on the right axis' top tick labels
        assert legend_clashes(fig)
    finally:
        plt.close(fig)


def test_loss_curve_writes_a_png(tmp_path):
    import json

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows(1e-4, 200)))
    assert loss_curve(metrics, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loss_curve(tmp_path / "none.jsonl", tmp_path / "x.png") is None
