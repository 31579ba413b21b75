"""A study's report: summary.json, PNG plots, report.md, and report.html with the plots
embedded (it opens in a browser with no network)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from vitscale.checkpoint import atomic_write_text
from vitscale.results import TrialResult
from vitscale.visual import plt, save_figure

PLOTS = {
    "accuracy_vs_compute.png": "Annealed accuracy against training compute, per strategy (envelope, law)",
    "accuracy_vs_time.png": "Accuracy against measured training time",
    "runtime.png": "Measured time per training sample against acts and against flops",
    "growth.png": "Activations against flops for each scaled family (growth exponent in the legend)",
}


def _colors(strategies) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(strategies)}


def _members(rows: list[TrialResult], strategy: str) -> list[TrialResult]:
    return sorted((r for r in rows if strategy in r.strategies), key=lambda r: r.flops)


def _seconds(r: TrialResult) -> float:
    """Training time of a trial's full budget at its measured training throughput."""
    return r.samples / r.seeds[0].train_samples_per_s


def plot_accuracy(out: Path, summary: dict, rows: list[TrialResult]) -> None:
    colors = _colors(summary["strategies"])
    fig, by_compute = plt.subplots(figsize=(7, 4.5))
    for s, a in summary["strategies"].items():
        for r in _members(rows, s):
            curve = [p for seed in r.seeds[:1] for p in seed.curve]
            by_compute.plot([p.compute for p in curve], [p.accuracy for p in curve], "x", color=colors[s],
                            alpha=0.35, ms=4)
            pts = r.points()
            by_compute.plot([p.compute for p in pts], [p.accuracy for p in pts], "-", color=colors[s],
                            alpha=0.35, lw=0.8)
        fc, fe = a["frontier"]["compute"], a["frontier"]["error"]
        by_compute.plot(fc, 1 - np.asarray(fe), "o", color=colors[s], ms=3)
        if a.get("fit"):
            f = a["fit"]
            xs = np.geomspace(min(fc), 4 * max(fc), 100)
            ys = 1 - (f["e_inf"] + f["a"] * (xs / f["c0"]) ** -f["b"])
            by_compute.plot(xs, ys, "--", color=colors[s], label=f"{s}: b={f['b']:.2f}, R²={f['r2']:.2f}")
        else:
            by_compute.plot([], [], "o", color=colors[s], label=f"{s}: no fit")
    by_compute.plot([], [], "x", color="gray", label="mid-run, not annealed (not fitted)")
    by_compute.set(xscale="log", xlabel="training compute (multiply-adds)", ylabel=summary["metric"],
                   title="annealed points (lines), their envelope (dots) and the fitted law (dashed)")
    by_compute.title.set_fontsize(9)
    by_compute.legend(fontsize=7)
    save_figure(fig, out / "accuracy_vs_compute.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary["strategies"]:
        members = _members(rows, s)
        ax.errorbar([_seconds(r) for r in members], [r.accuracy for r in members],
                    yerr=[r.stderr for r in members], fmt="o-", color=colors[s], label=s, ms=4, capsize=2)
        for r in members:
            ax.annotate(r.name, (_seconds(r), r.accuracy), fontsize=6)
    ax.set(xscale="log", xlabel="training time at measured throughput (s)", ylabel=summary["metric"])
    ax.legend(fontsize=7)
    save_figure(fig, out / "accuracy_vs_time.png")


def plot_runtime(out: Path, summary: dict, rows: list[TrialResult]) -> None:
    seconds = [1e3 / r.measured["samples_per_s"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("acts", "flops"), strict=True):
        ax.scatter([getattr(r, key) for r in rows], seconds, s=12)
        for r, t in zip(rows, seconds, strict=True):
            ax.annotate(r.name, (getattr(r, key), t), fontsize=6)
        ax.set(xlabel=f"{key} per sample", ylabel="ms per training sample",
               title=f"Pearson r = {summary['runtime'][f'pearson_{key}']:.3f}")
    save_figure(fig, out / "runtime.png")


def plot_growth(out: Path, summary: dict, rows: list[TrialResult]) -> None:
    colors = _colors(summary["strategies"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, a in summary["strategies"].items():
        members = _members(rows, s)
        ax.plot([r.flops for r in members], [r.acts for r in members], "o-", color=colors[s],
                label=f"{s}: acts ~ flops^{a['acts_growth']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="flops (multiply-adds)", ylabel="acts")
    ax.legend(fontsize=7)
    save_figure(fig, out / "growth.png")


# ----------------------------------------------------------------------------- text
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _recommendation(summary: dict) -> list[str]:
    rec = summary["recommendation"]
    m = rec["model"]
    size = m["image_size"] if isinstance(m["image_size"], int) else "x".join(map(str, m["image_size"]))
    seeds = (f" (mean of {len(rec['accuracies'])} seeds: {', '.join(_pct(a) for a in rec['accuracies'])})"
             if len(rec["accuracies"]) > 1 else "")
    lines = [f"For a budget of `{summary['budget']}` per model ({summary['objective']} objective, "
             f"{summary['param']}), train **{rec['trial']}**: depth {m['depth']}, width {m['width']}, "
             f"{m['heads']} heads, {size} px, patch {m['patch_size']}"
             + (f", {m['frames']} frames" if m["frames"] > 1 else "")
             + f" ({rec['params'] / 1e6:.2f} M params, {rec['flops'] / 1e9:.3g} GFLOPs). It reached "
             f"{_pct(rec['accuracy'])} ± {100 * rec['stderr']:.1f} {summary['metric']}{seeds} with "
             f"{rec['compute']:.3g} multiply-adds of training compute in {rec['wall_s']:.0f} s."]
    eff = rec["efficient"]
    if eff["name"] != rec["trial"]:
        lines.append(f"Within one point of it and faster to train: **{eff['name']}** "
                     f"({_pct(eff['accuracy'])}, {eff['params'] / 1e6:.2f} M params, "
                     f"{eff['compute']:.3g} multiply-adds).")
    for p in rec["predicted"]:
        lo, hi = p["interval"]
        lines.append(f"With {p['multiple']:g}x that compute, the best fitted strategy is "
                     f"**{p['strategy']}**, predicted {_pct(p['accuracy'])} "
                     f"(90% bootstrap interval {_pct(lo)} to {_pct(hi)})"
                     + (" — an extrapolation beyond the measured compute." if p["extrapolation"] else ".")
                     + (" The fitted law falls below what was already measured, so read it as a poor fit, "
                        "not a forecast." if p["accuracy"] < rec["accuracy"] else ""))
    if summary.get("fit_metric_note"):
        lines.append(summary["fit_metric_note"])
    return lines


def _backtest(summary: dict) -> list:
    bt = summary["backtest"]
    if not bt["trials"]:
        return ["No strategy has three or more trials: nothing to backtest."]
    head = ("strategy", "held out", "fitted on", "predicted", "measured (± s.e.)", "error (points)")
    body = [(s, b["trial"], ", ".join(b["fitted_on"]), _pct(b["predicted"]),
             f"{_pct(b['measured'])} ± {100 * b['stderr']:.1f}", f"{100 * b['error']:+.1f}")
            for s, a in summary["strategies"].items() if (b := a.get("backtest")) and "predicted" in b]
    return [f"Each strategy's law error(N, D) = e + a N^-α + b D^-β (N: multiply-adds per sample, D: samples "
            f"seen) is fitted on the annealed points of all but its largest trial, which it then predicts. "
            f"Mean absolute error **{100 * bt['mean_abs_error']:.1f} points**, maximum "
            f"{100 * bt['max_abs_error']:.1f}, over {bt['trials']} held-out trials.", (head, body)]


def _sweep(summary: dict) -> list:
    sw = summary.get("sweep")
    if not sw:
        return ["No learning-rate sweep: every trial used the recipe's base_lr."]
    head = ("base_lr", "steps", "accuracy (± s.e.)", "val loss", "chosen")
    body = [(f"{p['lr']:g}", p["steps"], f"{_pct(p['accuracy'])} ± {100 * p['stderr']:.1f}",
             "-" if p["loss"] is None else f"{p['loss']:.4f}", "yes" if p["lr"] == sw["lr"] else "")
            for p in sw["points"]]
    return [f"The base model at each learning rate, each run annealed with its own cooldown; every "
            f"{summary['param']} trial then trains at base_lr {sw['lr']:g}. The sweep cost "
            f"{sw['compute']:.3g} multiply-adds, {100 * sw['share']:.1f}% of the trials' "
            f"{sw['trials_compute']:.3g}, "
            f"in {sw['wall_s']:.0f} s.", (head, body)]


TRIALS_NOTE = ("Each trial runs a stable phase and, from its checkpoints, a cooldown branch ending at each "
               "fraction of the budget: every accuracy below is annealed. Seeds: the final accuracy of each.")


def _sections(summary: dict, rows: list[TrialResult]) -> list[tuple[str, list]]:
    """The report as (heading, [paragraph str | table (header, rows) | image name]) pairs."""
    trials = ("trial", "strategies", "depth", "width", "heads", "res", "params (M)", "GFLOPs", "acts (M)",
              "steps", "train compute", "samples/s", "peak MB", "annealed accuracy by fraction", "seeds",
              "accuracy ± s.e.", "wall s")
    trial_rows = [(r.name, ",".join(r.strategies), r.model["depth"], r.model["width"], r.model["heads"],
                   r.model["image_size"], f"{r.params / 1e6:.2f}", f"{r.flops / 1e9:.3f}",
                   f"{r.acts / 1e6:.2f}", r.steps, f"{r.compute:.3g}", f"{r.measured['samples_per_s']:.0f}",
                   f"{r.measured['peak_mem_mb']:.0f}",
                   " / ".join(f"{100 * p.accuracy:.1f}" for p in r.points()),
                   ", ".join(f"{100 * a:.1f}" for a in r.accuracies),
                   f"{_pct(r.accuracy)} ± {100 * r.stderr:.1f}", f"{r.wall_s:.0f}") for r in rows]
    fit_head = ("strategy", "acts growth", "b (90% CI)", "e_inf (90% CI)", "R²", "RMSE", "points")
    fit_rows = []
    for s, a in summary["strategies"].items():
        f = a.get("fit")
        if not f:
            fit_rows.append((s, f"{a['acts_growth']:.2f}", a.get("fit_error", "-"), "", "", "", ""))
            continue
        fit_rows.append((s, f"{a['acts_growth']:.2f}",
                         f"{f['b']:.3f} ({f['b_interval'][0]:.3f}–{f['b_interval'][1]:.3f})",
                         f"{f['e_inf']:.3f} ({f['e_inf_interval'][0]:.3f}–{f['e_inf_interval'][1]:.3f})",
                         f"{f['r2']:.3f}", f"{f['rmse']:.4f}", f["points"]))
    rt = summary["runtime"]
    runtime = [f"Pearson r of measured time per training sample with flops {rt['pearson_flops']:.3f}, "
               f"params {rt['pearson_params']:.3f}, acts {rt['pearson_acts']:.3f}."]
    if rt.get("model"):
        rm = rt["model"]
        runtime.append(f"Runtime model: seconds per sample = {rm['per_flop']:.3g} x flops + "
                       f"{rm['per_act']:.3g} x acts + {rm['overhead']:.3g}; "
                       f"R² = {rm['r2']:.3f} over {rm['points']} configs.")
    return [
        ("Backtest: the law predicts trials it did not see", _backtest(summary)),
        ("Recommendation", _recommendation(summary)),
        ("Learning-rate sweep", _sweep(summary)),
        ("Trials", [TRIALS_NOTE, (trials, trial_rows), "accuracy_vs_compute.png", "accuracy_vs_time.png"]),
        ("Fits: error(C) = e_inf + a (C/C0)^-b per strategy, on the envelope of annealed points",
         [(fit_head, fit_rows)]),
        ("Runtime", [*runtime, "runtime.png"]),
        ("Growth", ["growth.png"]),
    ]


def markdown(sections) -> str:
    out = ["# Scaling study report", ""]
    for heading, items in sections:
        out += [f"## {heading}", ""]
        for item in items:
            if isinstance(item, tuple):
                head, body = item
                out.append("| " + " | ".join(map(str, head)) + " |")
                out.append("|" + "---|" * len(head))
                out += ["| " + " | ".join(map(str, r)) + " |" for r in body]
            elif item.endswith(".png"):
                out.append(f"![{PLOTS[item]}]({item})")
            else:
                out.append(item)
            out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def page(sections, out: Path) -> str:
    body = ["<h1>Scaling study report</h1>"]
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, tuple):
                head, rows = item
                body.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                                      for r in rows) + "</table>")
            elif item.endswith(".png"):
                data = base64.b64encode((out / item).read_bytes()).decode()
                caption = html.escape(PLOTS[item])
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                            f"<figcaption>{caption}</figcaption></figure>")
            else:
                body.append(f"<p>{_inline(item)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:right}img{max-width:100%}figcaption{font-size:12px;color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vitscale study</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write(out: Path, study, summary: dict, rows: list[TrialResult]) -> None:
    """summary.json, the plots, report.md and report.html in the study directory."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_accuracy(out, summary, rows)
    plot_runtime(out, summary, rows)
    plot_growth(out, summary, rows)
    sections = _sections(summary, rows)
    atomic_write_text(out / "report.md", markdown(sections))
    atomic_write_text(out / "report.html", page(sections, out))
