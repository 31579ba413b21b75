"""Pictures a person would rather look at (PNG on matplotlib's Agg canvas, no display): training
curves here; `figure`, `color_cycle` and `save_figure` for the modules that draw their own (MAE
reconstructions, a study's plots).

Figures are matplotlib's object API (a `Figure` on an Agg canvas), never pyplot: no global figure
state to close, and no pyplot import (~0.3 s). matplotlib itself (~0.5 s) is imported inside the
functions that draw, so that a process which never draws (a rank that is not the main one, a
short run that stops before its end) does not pay it.
"""

from __future__ import annotations

import os
from pathlib import Path


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kw):
    """A new figure and its axes, as pyplot.subplots(nrows, ncols, figsize=, **kw) returns them,
    drawn on the Agg canvas."""
    # matplotlib is imported here, not at the top: only the processes that draw pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def color_cycle() -> list[str]:
    """The default colour cycle, in order."""
    # Imported here for the reason `figure` gives.
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def save_figure(fig, path: Path) -> None:
    """Save a figure atomically."""
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def curves(rows: list[dict], path: Path) -> None:
    """Training loss by step, and validation metrics by epoch."""
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    fig, (left, right) = figure(1, 2, figsize=(10, 3.5))
    if train:
        left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    left.set(xlabel="step", ylabel="train loss", title="training loss")
    for key in ("val_top1", "knn_top1", "val_loss"):
        pts = [(r["epoch"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            right.plot(*zip(*pts, strict=True), marker="o", label=key)
    right.set(xlabel="epoch", title="validation")
    if right.get_lines():  # none without validation data
        right.legend()
    save_figure(fig, path)
