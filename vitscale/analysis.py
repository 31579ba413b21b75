"""What a scaling study's trials say: per-strategy fits on annealed points, a backtest of
the size-and-length law on held-out trials, the runtime model, the recommendation.

Every point fitted is annealed: the end of a cooldown branch (the mean over a trial's
seeds). Mid-run evaluations at full learning rate are kept for plots only.

    per strategy   the lower envelope of (training compute, error) over its trials' annealed
                   points, fitted by error(C) = e_inf + a (C/C0)^-b
    backtest       per strategy, error(N, D) = e + a N^-alpha + b D^-beta fitted on every
                   trial but the largest, which it then predicts: the error of the law
    runtime        seconds per sample against flops and acts
"""

from __future__ import annotations

from dataclasses import asdict

from vitscale import fits, stats
from vitscale.results import SweepPoint, TrialResult
from vitscale.study import StudyConfig, parse_budget, pick_lr

MULTIPLES = (1.0, 2.0, 4.0)  # budgets the recommendation predicts for
EFFICIENT_WITHIN = 0.01  # the efficient pick: the fastest trial this close to the best accuracy


def _strategy(members: list[TrialResult], budget_compute: float) -> dict:
    members = sorted(members, key=lambda r: r.flops)
    flops = [r.flops for r in members]
    out: dict = {"trials": [r.name for r in members],
                 "acts_growth": stats.loglog_slope(flops, [r.acts for r in members])
                 if len(set(flops)) > 1 else float("nan")}
    points = [(p.compute, 1.0 - p.accuracy) for r in members for p in r.points()]
    fc, fe = fits.frontier([c for c, _ in points], [e for _, e in points])
    out["frontier"] = {"compute": fc, "error": fe}
    out["backtest"] = backtest(members)
    try:
        law = fits.fit_power_law(fc, fe)
    except ValueError as e:
        out["fit"], out["fit_error"] = None, str(e)
        return out
    at = [m * budget_compute for m in MULTIPLES]
    ci = fits.bootstrap(fc, fe, at)
    out["fit"] = law.as_dict() | {"b_interval": ci["b"], "e_inf_interval": ci["e_inf"]}
    out["predictions"] = [
        {"multiple": m, "compute": c, "accuracy": 1.0 - float(law.predict(c)),
         "interval": [1.0 - ci[f"at_{i}"][1], 1.0 - ci[f"at_{i}"][0]], "extrapolation": c > max(fc) * 1.0001}
        for i, (m, c) in enumerate(zip(MULTIPLES, at, strict=True))]
    return out


def backtest(members: list[TrialResult]) -> dict | None:
    """Fit error(N, D) on a family's annealed points without its largest trial, then predict
    that trial's final accuracy. N = forward multiply-adds per sample, D = samples seen."""
    members = sorted(members, key=lambda r: r.flops)
    if len(members) < 3:
        return None
    held, fitted = members[-1], members[:-1]
    pts = [(r.flops, p.samples, 1.0 - p.accuracy) for r in fitted for p in r.points()]
    try:
        law = fits.fit_joint_law(*zip(*pts, strict=True))
    except ValueError as e:
        return {"trial": held.name, "error": str(e)}
    predicted = 1.0 - float(law.predict(held.flops, held.samples))
    return {"trial": held.name, "fitted_on": [r.name for r in fitted], "law": law.as_dict(),
            "predicted": predicted, "measured": held.accuracy, "stderr": held.stderr,
            "error": predicted - held.accuracy}


def _runtime(rows: list[TrialResult]) -> dict:
    seconds = [1.0 / r.measured["samples_per_s"] for r in rows]
    out = {f"pearson_{k}": stats.pearson([getattr(r, k) for r in rows], seconds)
           for k in ("flops", "params", "acts")}
    try:
        model = fits.fit_runtime([r.flops for r in rows], [r.acts for r in rows], seconds)
        out["model"] = model.as_dict()
    except ValueError as e:
        out["model"], out["model_error"] = None, str(e)
    return out


def _sweep(sweep: list[SweepPoint], rows: list[TrialResult]) -> dict | None:
    if not sweep:
        return None
    compute = sum(p.compute for p in sweep)
    trials = sum(r.compute * len(r.seeds) for r in rows)
    return {"points": [asdict(p) for p in sweep], "lr": pick_lr(sweep).lr, "compute": compute,
            "trials_compute": trials, "share": compute / trials if trials else float("nan"),
            "wall_s": sum(p.wall_s for p in sweep)}


def summarize(study: StudyConfig, rows: list[TrialResult], sweep: list[SweepPoint] = ()) -> dict:
    """summary.json: per-strategy fits and backtests, the sweep, runtime model, recommendation."""
    best = max(rows, key=lambda r: (r.accuracy, -r.wall_s))
    strategies = {s: _strategy([r for r in rows if s in r.strategies], best.compute)
                  for s in study.strategies}
    recommendation = {
        "trial": best.name, "strategy": "base" if best.name == "base" else best.strategies[0],
        "factor": best.factor, "model": best.model, "accuracy": best.accuracy, "stderr": best.stderr,
        "accuracies": best.accuracies, "params": best.params, "flops": best.flops, "compute": best.compute,
        "wall_s": best.wall_s}
    ahead = []
    for m in MULTIPLES[1:]:
        options = [(s, p) for s, a in strategies.items() for p in a.get("predictions", [])
                   if p["multiple"] == m]
        if options:
            s, p = max(options, key=lambda o: o[1]["accuracy"])
            ahead.append({"multiple": m, "strategy": s} | p)
    recommendation["predicted"] = ahead
    close = [r for r in rows if r.accuracy >= best.accuracy - EFFICIENT_WITHIN]
    fastest = min(close, key=lambda r: r.samples / r.seeds[0].train_samples_per_s)
    recommendation["efficient"] = {"name": fastest.name, "accuracy": fastest.accuracy,
                                   "params": fastest.params, "flops": fastest.flops,
                                   "compute": fastest.compute}
    tests = [b for a in strategies.values() if (b := a.get("backtest")) and "predicted" in b]
    errors = [abs(b["error"]) for b in tests]
    note = ("The fits use the k-NN top-1 of each cooldown's end; the trials are ranked by the linear probe "
            "of "
            "their full-length encoder." if study.objective == "mae" else "")
    return {"fit_metric_note": note, "budget": study.budget, "budget_kind": parse_budget(study.budget).kind,
            "objective": study.objective, "param": study.param,
            "metric": "linear-probe top-1" if study.objective == "mae" else "val top-1",
            "trials": len(rows), "total_wall_s": sum(r.wall_s for r in rows),
            "sweep": _sweep(list(sweep), rows),
            "backtest": {"mean_abs_error": sum(errors) / len(errors) if errors else None,
                         "max_abs_error": max(errors) if errors else None, "trials": len(tests)},
            "strategies": strategies, "runtime": _runtime(rows), "recommendation": recommendation}
