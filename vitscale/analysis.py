"""What a scaling study's trials say: per-strategy fits, the runtime model, the recommendation.

Error-vs-compute points are every evaluation of every trial of a strategy (the base
counts for all), at the training compute spent so far. The power law is fitted to their
lower envelope, the best error reached with at most that much compute. Mid-run
evaluations come before the cosine schedule has annealed, so the envelope is
pessimistic between a trial's start and its end; the final evaluations are exact.
"""

from __future__ import annotations

from vitscale import fits, stats
from vitscale.study import StudyConfig, parse_budget

MULTIPLES = (1.0, 2.0, 4.0)  # budgets the recommendation predicts for
EFFICIENT_WITHIN = 0.01  # the efficient pick: the fastest trial this close to the best accuracy


def _strategy(name: str, members: list[dict], budget_compute: float) -> dict:
    members = sorted(members, key=lambda r: r["flops"])
    flops = [r["flops"] for r in members]
    out: dict = {"trials": [r["name"] for r in members],
                 "acts_growth": stats.loglog_slope(flops, [r["acts"] for r in members])
                 if len(set(flops)) > 1 else float("nan")}
    points = [(p["compute"], 1.0 - p["accuracy"]) for r in members for p in r["curve"]]
    fc, fe = fits.frontier([c for c, _ in points], [e for _, e in points])
    out["frontier"] = {"compute": fc, "error": fe}
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


def _runtime(rows: list[dict]) -> dict:
    seconds = [1.0 / r["measured"]["samples_per_s"] for r in rows]
    out = {f"pearson_{k}": stats.pearson([r[k] for r in rows], seconds) for k in ("flops", "params", "acts")}
    try:
        model = fits.fit_runtime([r["flops"] for r in rows], [r["acts"] for r in rows], seconds)
        out["model"] = model.as_dict()
    except ValueError as e:
        out["model"], out["model_error"] = None, str(e)
    return out


def summarize(study: StudyConfig, rows: list[dict]) -> dict:
    """summary.json: the per-strategy analysis, the runtime model and the recommendation."""
    best = max(rows, key=lambda r: (r["accuracy"], -r["wall_s"]))
    budget_compute = best["compute"]
    strategies = {s: _strategy(s, [r for r in rows if s in r["strategies"]], budget_compute)
                  for s in study.strategies}
    recommendation = {
        "trial": best["name"], "strategy": "base" if best["name"] == "base" else best["strategies"][0],
        "factor": best["factor"], "model": best["model"], "accuracy": best["accuracy"],
    } | {k: best[k] for k in ("params", "flops", "compute", "wall_s")}
    ahead = []
    for m in MULTIPLES[1:]:
        options = [(s, p) for s, a in strategies.items() for p in a.get("predictions", [])
                   if p["multiple"] == m]
        if options:
            s, p = max(options, key=lambda o: o[1]["accuracy"])
            ahead.append({"multiple": m, "strategy": s} | p)
    recommendation["predicted"] = ahead
    close = [r for r in rows if r["accuracy"] >= best["accuracy"] - EFFICIENT_WITHIN]
    fastest = min(close, key=lambda r: r["curve"][-1]["seconds"] if r["curve"] else r["wall_s"])
    recommendation["efficient"] = {k: fastest[k] for k in ("name", "accuracy", "params", "flops", "compute")}
    kind = parse_budget(study.budget).kind
    note = ("The fits and their predictions use the k-NN top-1 measured during pre-training (every epoch); "
            "the trials are ranked by their final linear probe." if study.objective == "mae" else "")
    return {"fit_metric_note": note, "budget": study.budget, "budget_kind": kind,
            "objective": study.objective,
            "metric": "linear-probe top-1" if study.objective == "mae" else "val top-1",
            "trials": len(rows), "total_wall_s": sum(r["wall_s"] for r in rows),
            "strategies": strategies, "runtime": _runtime(rows), "recommendation": recommendation}

