"""The report's sections on how far to trust the law, before what it recommends: the forecast
across compute (fitted at C/4, checked at C), the trials flagged before fitting, and whether each
family's optimum is bracketed by the sizes measured; and the number formats every section shares."""

from __future__ import annotations

from vitscale.study import diagnose, valleys
from vitscale.study.summary import LEVEL, Summary


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def span(iv) -> str:
    return f"{100 * iv[0]:.1f}–{100 * iv[1]:.1f}"


def forecast(s: Summary) -> list:
    fc = s.forecast
    share = f"1/{round(1 / fc.cut)}" if abs(1 / fc.cut - round(1 / fc.cut)) < 1e-9 else f"{fc.cut:g}"
    if not fc.checks:
        return [f"Nothing was forecast across compute: {fc.note}."]
    head = ("trial", f"at {share}", "predicted", f"{LEVEL:.0%} interval", "measured", "error (points)",
            "log-linear", "covered")
    body = [
        (c.trial + (" **(pick)**" if c.trial == fc.pick else ""), pct(c.early), pct(c.predicted),
         span(c.interval), pct(c.measured), f"{100 * (c.predicted - c.measured):+.1f}", pct(c.loglinear),
         "yes" if c.covered else "**no**")
        for c in fc.checks
    ]

    def regret(trial, points) -> str:
        return "-" if trial is None else f"{trial} (regret {100 * points:.1f} points)"

    line = (f"mean {100 * fc.loglinear_mean_abs_error:.1f}, max {100 * fc.loglinear_max_abs_error:.1f}"
            if fc.loglinear_mean_abs_error is not None else "not possible (fewer than two points a trial)")
    return [
        f"The law was fitted on the {fc.points} annealed points at or below {share} of each trial's budget, "
        f"then predicted every trial's {s.metric} at its full budget, four times further than it saw. "
        f"Mean absolute error **{100 * fc.mean_abs_error:.1f} points**, "
        f"maximum **{100 * fc.max_abs_error:.1f}**; "
        f"the {LEVEL:.0%} interval covered {fc.covered} of {len(fc.checks)}. "
        f"Its pick for the budget: **{regret(fc.pick, fc.regret)}**, the measured best's accuracy less the "
        f"pick's.",
        (head, body),
        f"Baselines with no law: persistence (the best at {share} stays the best) picks "
        f"{regret(fc.persistence, fc.persistence_regret)}; each trial's own line in log samples, extended, "
        f"errs by {line} points and picks {regret(fc.loglinear_pick, fc.loglinear_regret)}.",
        _loss_first(fc, regret),
    ]


def _loss_first(fc, regret) -> str:
    """The same forecast with the law fitted on test loss first, then mapped to accuracy."""
    if fc.loss_first_mean_abs_error is None:
        return f"Loss first (the law on test cross-entropy, then mapped to accuracy): {fc.loss_first_note}."
    bound = f"; {fc.loss_first_note}" if fc.loss_first_note else ""
    return (f"Loss first, from the same points (the law fitted on test cross-entropy in log space, then a "
            f"sigmoid from loss to accuracy): mean error {100 * fc.loss_first_mean_abs_error:.1f}, max "
            f"{100 * fc.loss_first_max_abs_error:.1f} points, picks "
            f"{regret(fc.loss_first_pick, fc.loss_first_regret)}{bound}. The study's law is still fitted on "
            "accuracy; loss first erred less on the studies of this version measured so far (docs/study.md).")


def flags(s: Summary) -> list:
    lines = [diagnose.unresolved(s.noise)] if diagnose.unresolved(s.noise) else []
    if not s.flags:
        return lines + [f"No trial is shorter than {diagnose.MIN_STEPS} steps, unstable across seeds, or "
                        "worse with more training."]
    def then(f) -> str:
        if f.left_out:
            return "**left out of the fits**"
        if f.kind == "unstable":
            return "kept, with one more seed where the study ran it"
        return "kept" + (" (a base: every law is relative to it)" if f.kind == "not improving" else "")

    return lines + [
        "Flagged before fitting. A trial not improving with length, or with a loss that is not finite, is "
        "left out of the fits; one whose seeds disagree gets another seed; a short one stays in, its points "
        "to be trusted less.",
        (("trial", "flag", "why", "then"), [(f.trial, f.kind, f.detail, then(f)) for f in s.flags]),
    ]


def _where(v) -> str:
    """A valley's verdict in words."""
    if v.bracketed:
        return "bracketed"
    if v.edge == "within noise":
        return "not resolved: a neighbour is within noise of the best"
    outward = "÷2" if v.edge == "smallest" else "×2"
    return f"**not bracketed**: the {v.edge} size is best (next: a factor {outward} further out)"


def not_bracketed(s: Summary) -> list:
    """The recommendation's first line where a family's optimum at its top compute is not bracketed."""
    open_ = valleys.unbracketed(s.valleys)
    if not open_:
        return []
    where = [f"{v.family} at {v.compute:.3g} ({v.best}: "
             + (f"its {v.edge} size)" if v.edge != "within noise" else "within noise of a neighbour)")
             for v in open_]
    return ["**The optimum is not bracketed** for " + "; ".join(where) + ": the best size may lie outside "
            "the sizes measured, and the law's pick there is an extrapolation."]


def optimum(s: Summary) -> list:
    if not s.valleys:
        return ["No family has three or more sizes at one compute: nothing brackets an optimum."]
    head = ("family", "compute", f"{s.metric} by size (smallest first)", "best", "verdict", "N_opt (M MACs)")
    body = [
        (v.family, f"{v.compute:.3g}",
         ", ".join(f"{t} {100 * a:.1f}" for t, a in zip(v.trials, v.measured, strict=True)), v.best,
         _where(v), "-" if v.optimum is None else f"{v.optimum / 1e6:.3g}")
        for v in s.valleys
    ]
    lines = [
        "Each family's trials at equal training compute. Its optimum is bracketed where the best beats the "
        f"size on each side by more than the noise ({100 * s.noise.seed_sd:.1f} points); N_opt is where a "
        "parabola in log size through them peaks (Hoffmann et al.'s approach 2).",
        (head, body),
    ]
    for g in s.scaling:
        law = "none" if g.law_slope is None else f"C^{g.law_slope:.2f}"
        if g.slope is None:
            lines.append(f"{g.family}: no N_opt ~ C^a: {g.note}. The law's frontier over these computes: "
                         f"{law}.")
            continue
        iv = f" ({LEVEL:.0%} interval {g.interval[0]:.2f} to {g.interval[1]:.2f})" if g.interval else ""
        lines.append(f"{g.family}: N_opt ~ C^{g.slope:.2f}{iv} from {g.valleys} bracketed slices; the law's "
                     f"frontier over the same computes: {law}" + (f". **{g.note}**." if g.note else "."))
    return lines


def verified(s: Summary) -> list:
    """The recommendation's opening: each verified pick, predicted against measured."""
    out = []
    for v in s.verified:
        budget = "the budget" if v.multiple == 1 else f"{v.multiple:g}x the budget"
        how = (f"trained at {budget} ({v.steps} steps, seeds: {', '.join(pct(a) for a in v.measured)})"
               if v.trained else f"measured by trial {v.trial}")
        verdict = "inside" if v.covered else "**outside**"
        out.append(f"**Verified{'' if v.multiple == 1 else ' ahead'}:** the law's pick at {budget}, "
                   f"{v.trial.removeprefix('verify-')}, {how}: **{pct(v.mean)} measured against "
                   f"{pct(v.predicted)} predicted** ({LEVEL:.0%} interval {span(v.interval)}), {verdict} the "
                   "interval.")
    return out
