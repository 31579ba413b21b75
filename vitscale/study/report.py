"""A study's report: summary.json, the PNG plots (plots.py), report.md, and report.html with the
plots embedded (it opens in a browser with no network). The backtest comes first: a reader
sees how well the law predicted trials it did not see before reading what it recommends."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from vitscale.common.io import atomic_write_text
from vitscale.study import plots, summary
from vitscale.study.config import REPORT_HTML, REPORT_MD, SUMMARY
from vitscale.study.plots import PLOTS
from vitscale.study.report_checks import flags, forecast, not_bracketed, optimum, pct, span, verified
from vitscale.study.results import TrialResult
from vitscale.study.summary import LEVEL, Candidate, Summary


def _shape(c: Candidate) -> str:
    m = c.model
    size = m.image_size if isinstance(m.image_size, int) else "x".join(map(str, m.image_size))
    return (
        f"depth {m.depth}, width {m.width}, {m.heads} head{'s' * (m.heads > 1)}, {size} px, "
        f"patch {m.patch_size}"
        + (f", {m.frames} frames" if m.frames > 1 else "")
        + f" ({c.params / 1e6:.2f} M params, {c.flops / 1e6:.3g} M multiply-adds per sample)"
    )


def _backtest(s: Summary) -> list:
    bt = s.backtest
    if not bt.checks:
        return [f"Nothing was backtested: {bt.note or 'no strategy has a trial to hold out'}."]
    head = (
        "strategy",
        "held out",
        "seeds",
        "predicted",
        f"{LEVEL:.0%} interval",
        "measured (± noise)",
        "error (points)",
        "covered",
    )
    body = [
        (
            c.strategy,
            c.trial,
            c.seeds,
            pct(c.predicted),
            span(c.interval),
            f"{pct(c.measured)} ± {100 * c.noise:.1f}",
            f"{100 * c.error:+.1f}",
            "yes" if c.covered else "**no**",
        )
        for c in bt.checks
    ]
    lines = [
        f"The law was fitted without each strategy's largest trial ({', '.join(bt.held_out)}), on "
        f"{', '.join(bt.fitted_on)}, and then predicted the held-out trials' final {s.metric}. "
        f"Mean absolute error **{100 * bt.mean_abs_error:.1f} points**, maximum "
        f"**{100 * bt.max_abs_error:.1f}**; the {LEVEL:.0%} interval covered {bt.covered} of "
        f"{len(bt.checks)}. Intervals: refits to trials resampled within each strategy (a random seed of "
        f"each, every point moved by its sampling noise on the measured split), plus the held-out "
        f"trial's own measurement noise.",
        (head, body),
    ]
    if bt.structure:
        lines.append(_structure(bt.structure).replace("Structure:", "Fitted without the held-out trials:"))
    if bt.note:
        lines.append(bt.note + ".")
    lines.append("Only after this check is the law refitted on every trial for the recommendation below.")
    return lines


def _recommendation(s: Summary) -> list:
    rec = s.recommendation
    lines = [*verified(s), *not_bracketed(s), f"Budget: {rec.budget}."]
    m = rec.measured
    if rec.pick:
        p = rec.pick
        lines.append(
            f"The law (fitted on every trial) recommends **{p.strategy} at {p.factor:.3g}x the base's "
            f"flops**: {_shape(p)}, trained **{p.steps} steps** ({p.samples} samples). Predicted "
            f"{s.metric} **{pct(p.accuracy)}** ({LEVEL:.0%} interval for one training run "
            f"{span(p.interval)})"
            + (", an extrapolation beyond the sizes and lengths measured" if p.extrapolation else "")
            + "."
            + (f" **Unreliable:** it rests on {', '.join(p.bounds)} at a bound of the fit (the points could "
               "not place them), so its interval is narrower than what is known." if p.bounds else "")
        )
        if len(rec.tied) > 1:
            lines.append(
                "Tied within noise (one run of each could come out either way): "
                + ", ".join(
                    f"{c.strategy} at {c.factor:.3g}x, {c.steps} steps, {pct(c.accuracy)}" for c in rec.tied
                )
                + "; the cheapest to train is named"
                + (f" ({rec.best.strategy} is the most accurate)." if rec.best != p else ".")
            )
    else:
        lines.append(
            "No law could be fitted (too few trials or lengths); the recommendation is the best trial "
            "measured."
        )
    lines.append(
        f"Best measured within the budget: **{rec.measured_best.name}** at {rec.measured_best.steps} steps, "
        f"{pct(rec.measured_best.accuracy)} "
        f"(± {100 * (rec.measured_best.interval[1] - rec.measured_best.accuracy):.1f} "
        f"at {LEVEL:.0%})"
        + (
            f"; tied with it and cheaper to train: **{m.name}** at {m.steps} steps, {pct(m.accuracy)}"
            if m.name != rec.measured_best.name or m.steps != rec.measured_best.steps
            else ""
        )
        + (
            f". Ties within noise: {', '.join(f'{c.name}@{c.steps}' for c in rec.measured_tied)}"
            if len(rec.measured_tied) > 1
            else ""
        )
        + "."
    )
    if rec.pick:
        gain = rec.pick.accuracy - rec.measured_best.accuracy
        lines.append(f"The law's pick is predicted {100 * gain:+.1f} points against the best measured.")
    if rec.note:
        lines.append(rec.note)
    lines += _ahead(rec.ahead)
    if s.fit_metric_note:
        lines.append(s.fit_metric_note)
    return lines


def _ahead(ahead: tuple[Candidate, ...]) -> list:
    """The law's best at larger budgets, as a table (none where the law predicts none)."""
    if not ahead:
        return []
    head = (
        "budget",
        "strategy",
        "x base flops",
        "shape",
        "steps",
        "predicted",
        f"{LEVEL:.0%} interval",
        "extrapolation",
        "rests on a bound",
    )
    body = [
        (
            f"{c.multiple:g}x",
            c.strategy,
            f"{c.factor:.3g}",
            _shape(c),
            c.steps,
            pct(c.accuracy),
            span(c.interval),
            "yes" if c.extrapolation else "no",
            f"**{', '.join(c.bounds)}**" if c.bounds else "no",
        )
        for c in ahead
    ]
    return [
        "For larger budgets, the law's best (extrapolations are forecasts, not measurements):",
        (head, body),
    ]


def _structure(st, strategies: tuple[str, ...] = ()) -> str:
    if st is None:
        return ""

    def pts(e):
        return "could not be fitted" if e is None else f"{100 * e:.2f} points"

    chosen = "one law shared by the strategies" if st.shared else "a separate law per strategy"
    if st.shared and any("+" in f for f in strategies):
        chosen = "one law shared by the strategies of each recipe (the plain ones share one)"
    return (
        f"Structure: {chosen}, the one that predicted each trial's final accuracy better from the others "
        f"(leave-one-trial-out mean absolute error: shared {pts(st.error_shared)}, separate "
        f"{pts(st.error_separate)})."
    )


def _law(s: Summary) -> list:
    if not s.law:
        return ["No law was fitted."]
    one = s.law.laws[0]
    head = ("parameter", "value", f"{LEVEL:.0%} bootstrap interval")
    body = [(p.name, f"{p.value:.4g}", f"{p.interval[0]:.4g}–{p.interval[1]:.4g}") for p in s.parameters]
    rmse = ", ".join(f"{'/'.join(law.strategies)} {100 * law.rmse:.2f}" for law in s.law.laws)
    starts = "; ".join(
        f"{'/'.join(law.strategies)}: {law.agreeing} of {law.starts} starts reached the best loss"
        + ("" if law.converged else ", which **did not converge** (the iteration cap stopped it)")
        for law in s.law.laws)
    bounds = "; ".join(f"{'/'.join(law.strategies)}: {', '.join(law.at_bounds())}" for law in s.law.laws
                       if law.at_bounds())
    starts += (f". **At a bound of the fit** (the points could not place them; what rests on them is marked "
               f"unreliable): {bounds}" if bounds else ". No parameter is at a bound of the fit")
    return [
        f"error(s, N, D) = e + a (N / {one.n0:.3g})^-alpha_s + b (D / d0)^-beta (N / {one.n0:.3g})^-gamma, "
        "N the forward multiply-adds per sample (n0 the base's; a recipe's laws: its base's), D the training "
        "samples (gamma > 0: a larger model learns more per sample), over every annealed point of every "
        "seed, Huber loss from a grid of starts. Shared, the strategies (which all start from the base) "
        "share e, a and the length term and each has its own size exponent; separate, each has all six. "
        f"{_structure(s.structure, s.strategies)} RMSE (points): {rmse}. Starts: {starts}. "
        f"Noise: one seed's final accuracy "
        f"varies by {100 * s.noise.seed_sd:.2f} points (standard deviation over {s.noise.dof} degrees of "
        f"freedom; sampling of the measured split alone {100 * s.noise.binomial:.2f}).",
        (head, body),
        "frontier.png",
    ]


def _isoflops(s: Summary) -> list:
    if not s.isoflops:
        return ["No compute is reached by three or more trials' annealed points."]
    head = ("compute", "trials (measured / law)", "best measured", "law's optimum")
    body = [
        (
            f"{i.compute:.3g}",
            ", ".join(
                f"{t} {100 * a:.1f}/{'-' if p is None else f'{100 * p:.1f}'}"
                for t, a, p in zip(i.trials, i.measured, i.predicted, strict=True)
            ),
            i.best,
            f"{i.law_best} ({i.law_best_flops / 1e6:.3g} M)" if i.law_best_flops else "-",
        )
        for i in s.isoflops
    ]
    return [
        "At each compute, every trial whose annealed points reach it (between two of its points, linear in "
        "log compute): measured against the law at the same size and length, and the size each prefers.",
        (head, body),
        "isoflops.png",
    ]


def _sweep(s: Summary) -> list:
    sw = s.sweep
    if not sw:
        return ["No learning-rate sweep: every trial used the recipe's base_lr."]
    lengths = sw.lengths or tuple(sorted({p.steps for p in sw.points}))
    best = dict(zip(lengths, sw.best, strict=False))
    first = {p.steps: i for i, p in reversed(list(enumerate(sw.points)))}  # where a length's best is named
    head = ("base_lr", "steps", "accuracy (± s.e.)", "val loss", "best at its length")
    body = [
        (
            f"{p.lr:g}",
            p.steps,
            f"{pct(p.accuracy)} ± {100 * p.stderr:.1f}",
            "-" if p.loss is None else f"{p.loss:.4f}",
            f"{best[p.steps]:.3g}" if p.steps in best and i == first[p.steps] else "",
        )
        for i, p in enumerate(sw.points)
    ]
    if len(lengths) > 1:
        rule = (f"The best rate at {lengths[0]} steps is {sw.best[0]:.3g}, at {lengths[-1]} steps "
                f"{sw.best[-1]:.3g} (rate ~ steps^{sw.exponent:.2f}); each {s.param} trial trains at the "
                f"rate on that line for its own steps, held within the rates swept (base: {sw.lr:.3g}).")
    else:
        rule = f"Every {s.param} trial then trains at base_lr {sw.lr:.3g}."
    return [
        f"The base model at each learning rate and length, each run annealed with its own cooldown. {rule} "
        f"The sweep cost {sw.compute:.3g} multiply-adds, {100 * sw.share:.1f}% of the trials' "
        f"{sw.trials_compute:.3g}, in {sw.wall_s:.0f} s.",
        (head, body),
    ]


def _runtime(s: Summary) -> list:
    rt = s.runtime
    lines = [
        f"Pearson r of measured time per training sample with flops {rt.pearson_flops:.3f}, params "
        f"{rt.pearson_params:.3f}, acts {rt.pearson_acts:.3f}."
    ]
    if rt.model:
        m = rt.model
        loo = np.abs(rt.loo_errors) if rt.loo_errors else None
        lines.append(
            f"Runtime model: seconds per sample = {m.per_flop:.3g} x flops + {m.per_act:.3g} x acts + "
            f"{m.overhead:.3g}; in-sample R² {m.r2:.3f} over {m.points} configs"
            + (
                f"; leave-one-out error mean {100 * loo.mean():.1f}%, max {100 * loo.max():.1f}%"
                if loo is not None
                else ""
            )
            + ". It prices the training time of the law's candidates."
        )
    elif rt.note:
        lines.append(f"No runtime model: {rt.note}.")
    return [*lines, "runtime.png"]


TRIALS_NOTE = (
    "Each trial runs a stable phase and, from its checkpoints, a cooldown branch ending at each "
    "fraction of the budget: every accuracy below is annealed. Seeds: the final accuracy of each."
)


def _recipes(s: Summary, rows: list[TrialResult]) -> list:
    """Each family, a recipe's beside the plain strategies it repeats: measured, and under the law."""
    budget = s.recommendation.compute
    head = ("family", "trials", "best measured (full length)", "the law's best near the budget")
    body = []
    for st in s.strategies:
        mine = [r for r in rows if st in r.strategies]
        best = max(mine, key=lambda r: r.accuracy) if mine else None
        f = [p for p in s.frontier if p.strategy == st]
        near = min(f, key=lambda p: abs(math.log(p.compute / budget))) if f and budget else None
        body.append((
            st,
            len(mine),
            f"{best.name} {pct(best.accuracy)}" if best else "–",
            f"{near.factor:.3g}x the base, {pct(near.accuracy)} (at {near.compute:.3g})" if near else "–",
        ))
    return [
        "A recipe's families (STRATEGY+RECIPE) train every strategy's trials again under the recipe's "
        "overrides, scaled from its own base, under the same budget; their training compute counts what the "
        "recipe does per sample (multi-resolution: the mean over its sides; token dropping: the thinner "
        "blocks). A recipe moves the frontier where its family's row beats its strategy's.",
        (head, body),
    ]


def _sections(s: Summary, rows: list[TrialResult]) -> list[tuple[str, list]]:
    """The report as (heading, [paragraph str | table (header, rows) | image name]) pairs."""
    trials = (
        "trial",
        "strategies",
        "depth",
        "width",
        "heads",
        "res",
        "params (M)",
        "M MACs",
        "acts (M)",
        "steps",
        "train compute",
        "samples/s",
        "peak MB",
        "annealed accuracy by fraction",
        "seeds",
        "accuracy ± s.e.",
        "wall s",
    )
    trial_rows = [
        (
            r.name,
            ",".join(r.strategies),
            r.model["depth"],
            r.model["width"],
            r.model["heads"],
            r.model["image_size"],
            f"{r.params / 1e6:.2f}",
            f"{r.flops / 1e6:.3g}",
            f"{r.acts / 1e6:.2f}",
            r.steps,
            f"{r.compute:.3g}",
            f"{r.measured['samples_per_s']:.0f}",
            f"{r.measured['peak_mem_mb']:.0f}",
            " / ".join(f"{100 * p.accuracy:.1f}" for p in r.points()),
            ", ".join(f"{100 * a:.1f}" for a in r.accuracies),
            f"{pct(r.accuracy)} ± {100 * r.stderr:.1f}",
            f"{r.wall_s:.0f}",
        )
        for r in rows
    ]
    return [
        ("Forecast across compute: the law predicts the budget from a quarter of it", forecast(s)),
        ("Backtest: the law predicts trials it did not see", _backtest(s)),
        ("Trials to trust less", flags(s)),
        ("Recommendation", _recommendation(s)),
        *([("Recipes", _recipes(s, rows))] if any("+" in f for f in s.strategies) else []),
        ("The law over size and length", _law(s)),
        ("IsoFLOP profiles", _isoflops(s)),
        ("Where each family's optimum sits", optimum(s)),
        ("Learning-rate sweep", _sweep(s)),
        ("Trials", [TRIALS_NOTE, (trials, trial_rows)]),
        ("Runtime", _runtime(s)),
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
                body.append(
                    "<table><tr>"
                    + "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
                    + "</tr>"
                    + "".join(
                        "<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows
                    )
                    + "</table>"
                )
            elif item.endswith(".png"):
                if not (out / item).is_file():
                    continue
                data = base64.b64encode((out / item).read_bytes()).decode()
                caption = html.escape(PLOTS[item])
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
            else:
                body.append(f"<p>{_inline(item)}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>vitscale study</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def write(out: Path, s: Summary, rows: list[TrialResult]) -> None:
    """summary.json, the plots, report.md and report.html in the study directory."""
    summary.write(out / SUMMARY, s)
    for stale in ("accuracy_vs_compute.png", "accuracy_vs_time.png"):  # plots of the first report
        (out / stale).unlink(missing_ok=True)
    plots.plot_frontier(out, s, rows)
    plots.plot_isoflops(out, s)
    plots.plot_runtime(out, s, rows)
    plots.plot_growth(out, s, rows)
    sections = _sections(s, rows)
    atomic_write_text(out / REPORT_MD, markdown(sections))
    atomic_write_text(out / REPORT_HTML, page(sections, out))
