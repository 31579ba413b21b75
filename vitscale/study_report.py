"""A study's report: summary.json, PNG plots, report.md, and report.html with the plots
embedded (it opens in a browser with no network)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from vitscale.checkpoint import atomic_write_text
from vitscale.visual import plt, save_figure

PLOTS = {
    "accuracy_vs_compute.png": "Accuracy against training compute, per strategy (envelope and power-law fit)",
    "accuracy_vs_time.png": "Accuracy against measured training time",
    "runtime.png": "Measured time per training sample against acts and against flops",
    "growth.png": "Activations against flops for each scaled family (growth exponent in the legend)",
}


def _colors(strategies) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(strategies)}


def _members(rows: list[dict], strategy: str) -> list[dict]:
    return sorted((r for r in rows if strategy in r["strategies"]), key=lambda r: r["flops"])


def plot_accuracy(out: Path, summary: dict, rows: list[dict]) -> None:
    colors = _colors(summary["strategies"])
    fig, by_compute = plt.subplots(figsize=(7, 4.5))
    for s, a in summary["strategies"].items():
        for r in _members(rows, s):
            by_compute.plot([p["compute"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]],
                            color=colors[s], alpha=0.25, lw=0.8)
        fc, fe = a["frontier"]["compute"], a["frontier"]["error"]
        by_compute.plot(fc, 1 - np.asarray(fe), "o", color=colors[s], ms=3)
        if a.get("fit"):
            f = a["fit"]
            xs = np.geomspace(min(fc), 4 * max(fc), 100)
            ys = 1 - (f["e_inf"] + f["a"] * (xs / f["c0"]) ** -f["b"])
            by_compute.plot(xs, ys, "--", color=colors[s], label=f"{s}: b={f['b']:.2f}, R²={f['r2']:.2f}")
        else:
            by_compute.plot([], [], "o", color=colors[s], label=f"{s}: no fit")
    by_compute.set(xscale="log", xlabel="training compute (multiply-adds)", ylabel=summary["metric"])
    by_compute.legend(fontsize=7)
    save_figure(fig, out / "accuracy_vs_compute.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary["strategies"]:
        members = _members(rows, s)
        ax.plot([r["curve"][-1]["seconds"] if r["curve"] else r["wall_s"] for r in members],
                [r["accuracy"] for r in members], "o-", color=colors[s], label=s)
        for r in members:
            ax.annotate(r["name"], (r["curve"][-1]["seconds"] if r["curve"] else r["wall_s"], r["accuracy"]),
                        fontsize=6)
    ax.set(xscale="log", xlabel="measured training time (s)", ylabel=summary["metric"])
    ax.legend(fontsize=7)
    save_figure(fig, out / "accuracy_vs_time.png")


def plot_runtime(out: Path, summary: dict, rows: list[dict]) -> None:
    seconds = [1e3 / r["measured"]["samples_per_s"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("acts", "flops"), strict=True):
        ax.scatter([r[key] for r in rows], seconds, s=12)
        for r, t in zip(rows, seconds, strict=True):
            ax.annotate(r["name"], (r[key], t), fontsize=6)
        ax.set(xlabel=f"{key} per sample", ylabel="ms per training sample",
               title=f"Pearson r = {summary['runtime'][f'pearson_{key}']:.3f}")
    save_figure(fig, out / "runtime.png")


def plot_growth(out: Path, summary: dict, rows: list[dict]) -> None:
    colors = _colors(summary["strategies"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, a in summary["strategies"].items():
        members = _members(rows, s)
        ax.plot([r["flops"] for r in members], [r["acts"] for r in members], "o-", color=colors[s],
                label=f"{s}: acts ~ flops^{a['acts_growth']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="flops (multiply-adds)", ylabel="acts")
    ax.legend(fontsize=7)
    save_figure(fig, out / "growth.png")


# ----------------------------------------------------------------------------- text
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sections(summary: dict, rows: list[dict]) -> list[tuple[str, list]]:
    """The report as (heading, [paragraph str | table (header, rows) | image name]) pairs."""
    rec = summary["recommendation"]
    m = rec["model"]
    size = m["image_size"] if isinstance(m["image_size"], int) else "x".join(map(str, m["image_size"]))
    lines = [f"For a budget of `{summary['budget']}` per model ({summary['objective']} objective), train "
             f"**{rec['trial']}**: depth {m['depth']}, width {m['width']}, {m['heads']} heads, {size} px, "
             f"patch {m['patch_size']}" + (f", {m['frames']} frames" if m["frames"] > 1 else "")
             + f" ({rec['params'] / 1e6:.2f} M params, {rec['flops'] / 1e9:.3g} GFLOPs). It reached "
             f"{_pct(rec['accuracy'])} {summary['metric']} with {rec['compute']:.3g} multiply-adds of "
             f"training compute in {rec['wall_s']:.0f} s."]
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
    trials = ("trial", "strategies", "depth", "width", "heads", "res", "params (M)", "GFLOPs", "acts (M)",
              "train compute", "samples/s", "peak MB", "accuracy", "wall s")
    trial_rows = [(r["name"], ",".join(r["strategies"]), r["model"]["depth"], r["model"]["width"],
                   r["model"]["heads"], r["model"]["image_size"], f"{r['params'] / 1e6:.2f}",
                   f"{r['flops'] / 1e9:.3f}", f"{r['acts'] / 1e6:.2f}", f"{r['compute']:.3g}",
                   f"{r['measured']['samples_per_s']:.0f}", f"{r['measured']['peak_mem_mb']:.0f}",
                   _pct(r["accuracy"]), f"{r['wall_s']:.0f}") for r in rows]
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
        ("Recommendation", lines),
        ("Trials", [(trials, trial_rows), "accuracy_vs_compute.png", "accuracy_vs_time.png"]),
        ("Fits: error(C) = e_inf + a (C/C0)^-b per strategy, on the compute envelope",
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


def write(out: Path, study, summary: dict, rows: list[dict]) -> None:
    """summary.json, the plots, report.md and report.html in the study directory."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_accuracy(out, summary, rows)
    plot_runtime(out, summary, rows)
    plot_growth(out, summary, rows)
    sections = _sections(summary, rows)
    atomic_write_text(out / "report.md", markdown(sections))
    atomic_write_text(out / "report.html", page(sections, out))
