"""A study's PNG plots: the law's frontier over compute, the IsoFLOP profiles, the runtime against
acts and flops, and the activations' growth along each family. PLOTS names each with its caption,
which report.md and report.html show under it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitscale.common.figures import color_cycle, figure, save_figure
from vitscale.study.results import TrialResult
from vitscale.study.summary import Summary

PLOTS = {
    "frontier.png": "Error against training compute: every annealed point (seed means), the law's fit along "
    "each trial, each strategy's compute-optimal frontier under the law, the held-out trials marked",
    "isoflops.png": "IsoFLOP profiles: trials at equal training compute against their size, measured "
    "(points) "
    "and the law (lines)",
    "runtime.png": "Measured time per training sample against acts and against flops",
    "growth.png": "Activations against flops for each scaled family (growth exponent in the legend)",
}


def _colors(strategies) -> dict[str, str]:
    cycle = color_cycle()
    return {s: cycle[i % len(cycle)] for i, s in enumerate(("base", *strategies))}


def plot_frontier(out: Path, s: Summary, rows: list[TrialResult]) -> None:
    colors = _colors(s.strategies)
    held = set(s.backtest.held_out)
    fig, ax = figure(figsize=(8, 5))
    for r in rows:
        pts = r.points()
        c = colors[r.family]
        marker = dict(marker="*", ms=11, mfc="none") if r.name in held else dict(marker="o", ms=4)
        ax.plot([p.compute for p in pts], [1 - p.accuracy for p in pts], ls="", color=c, **marker)
        if s.law and (law_s := s.law.strategy_of(r.family)):
            d = np.geomspace(pts[0].samples, pts[-1].samples, 20)
            ax.plot(
                d * r.train_flops_per_sample,
                s.law.predict(law_s, r.flops, d),
                "-",
                color=c,
                lw=0.7,
                alpha=0.6,
            )
    for st in s.strategies:
        f = sorted((p for p in s.frontier if p.strategy == st), key=lambda p: p.compute)
        if f:
            ax.plot(
                [p.compute for p in f],
                [1 - p.accuracy for p in f],
                "--",
                color=colors[st],
                label=f"{st}: the law's best shape at each compute",
            )
    for st in ("base", *s.strategies):
        ax.plot([], [], "o", color=colors[st], label=f"{st} trials (annealed)")
    ax.plot([], [], "*", color="gray", mfc="none", ms=11, label="held out by the backtest")
    budget = s.recommendation.compute
    if budget:
        ax.axvline(budget, color="gray", lw=0.8, ls=":")
        ax.annotate("budget", (budget, ax.get_ylim()[1]), fontsize=7, va="top", ha="right", rotation=90)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training compute (multiply-adds)",
        ylabel=f"error (1 - {s.metric})",
        title="thin lines: the law along each trial's length",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out / "frontier.png")


def plot_isoflops(out: Path, s: Summary) -> None:
    if not s.isoflops:
        return
    colors = _colors(s.strategies)
    fig, axes = figure(
        1, len(s.isoflops), figsize=(3.6 * len(s.isoflops), 3.6), squeeze=False, sharey=True
    )
    for ax, iso in zip(axes[0], s.isoflops, strict=True):
        for st, n, acc in zip(iso.strategies, iso.flops, iso.measured, strict=True):
            ax.plot(n, acc, "o", color=colors[st], ms=5)
        for st in s.law.strategies if s.law else ():
            f = [m for m in s.frontier if m.strategy == st]
            if not f:
                continue
            n = np.geomspace(min(iso.flops), max(iso.flops) * 1.2, 40)  # the law holds from the base up
            ratio = np.median([iso.compute / (d * m) for d, m in zip(iso.samples, iso.flops, strict=True)])
            ax.plot(
                n, 1 - s.law.predict(st, n, iso.compute / (ratio * n)), "-", color=colors[st], lw=1, label=st
            )
        ax.set(
            xscale="log", xlabel="multiply-adds per sample", title=f"{iso.compute:.3g} MACs: best {iso.best}"
        )
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.title.set_fontsize(8)
    axes[0][0].plot([], [], "o", color=colors["base"], label="base")
    axes[0][0].set_ylabel(s.metric)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out / "isoflops.png")


def plot_runtime(out: Path, s: Summary, rows: list[TrialResult]) -> None:
    seconds = [1e3 / r.measured["samples_per_s"] for r in rows]
    fig, axes = figure(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("acts", "flops"), strict=True):
        ax.scatter([getattr(r, key) for r in rows], seconds, s=12)
        for r, t in zip(rows, seconds, strict=True):
            ax.annotate(r.name, (getattr(r, key), t), fontsize=6)
        ax.set(
            xlabel=f"{key} per sample",
            ylabel="ms per training sample",
            title=f"Pearson r = {getattr(s.runtime, f'pearson_{key}'):.3f}",
        )
    save_figure(fig, out / "runtime.png")


def plot_growth(out: Path, s: Summary, rows: list[TrialResult]) -> None:
    colors = _colors(s.strategies)
    by_name = {r.name: r for r in rows}
    fig, ax = figure(figsize=(6, 4))
    for g in s.growth:
        members = [by_name[n] for n in g.trials]
        ax.plot(
            [r.flops for r in members],
            [r.acts for r in members],
            "o-",
            color=colors[g.strategy],
            label=f"{g.strategy}: acts ~ flops^{g.acts_exponent:.2f}",
        )
    ax.set(xscale="log", yscale="log", xlabel="flops (multiply-adds)", ylabel="acts")
    ax.legend(fontsize=7)
    save_figure(fig, out / "growth.png")
