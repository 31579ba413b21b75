"""Growing the study's design until each family's optimum is bracketed.

After seed 0 of the planned factors, a family whose best trial sits at an edge of its sizes (or
whose edge trial is within noise of its best) gets the next factor outward: half its smallest, or
twice its largest. Its seed 0 runs, and the check repeats, up to study.bracket extra factors a
family. A law fitted on one side of an optimum extrapolates to it; one fitted across it
interpolates, and the IsoFLOP valley of valleys.py can be measured at all.

The choice reads each seed 0's validation accuracy at the end of its stable run, never the test
accuracy the fits use (as the leading trials are chosen, runner.extra_seeds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

NOISE = 2.0  # an edge within this many binomial standard errors of the family's best is tied with it


def outward(sizes: Mapping[str, list[tuple[float, float, float]]]) -> dict[str, float]:
    """The next factor of each family that needs one. `sizes[family]`: (factor, accuracy, stderr)
    of each of its trials with a result (the base at factor 1). Below three sizes, nothing."""
    out = {}
    for family, trials in sizes.items():
        if len(trials) < 3:
            continue
        trials = sorted(trials)
        best = max(a for _, a, _ in trials)
        low, high = (best - t[1] <= NOISE * t[2] for t in (trials[0], trials[-1]))
        if low and (not high or trials[0][1] >= trials[-1][1]):
            out[family] = trials[0][0] / 2
        elif high:
            out[family] = trials[-1][0] * 2
    return out


def grow(bracket: int, trials: list, plan: Callable[[dict[str, tuple[float, ...]]], list],
         results: Callable[[list], dict[str, tuple[float, float]]]) -> list:
    """The trials once every family is bracketed, or has `bracket` extra factors, or can go no
    further (its scaler gives no new shape, e.g. depth 1 halved). `plan(extra)`: the trials with
    each family's extra factors; `results(trials)`: (accuracy, stderr) of those of `trials` that
    have one (training them first where the study is running; only what finished where it is
    collected, and a trial without one stops the growth)."""
    extra: dict[str, tuple[float, ...]] = {}
    known = results(trials)
    for _ in range(bracket):
        by_family: dict[str, list[tuple[float, float, float]]] = {}
        for t in trials:
            if t.name in known:
                for f in t.strategies:
                    by_family.setdefault(f, []).append((t.factor, *known[t.name]))
        more = {f: x for f, x in outward(by_family).items() if x not in extra.get(f, ())}
        if not more:
            break
        extra = {f: extra.get(f, ()) + ((more[f],) if f in more else ()) for f in {*extra, *more}}
        grown = plan(extra)
        added = [t for t in grown if t.name not in {u.name for u in trials}]
        if not added:
            break
        got = results(added)
        known |= got
        trials = grown
        if len(got) < len(added):  # collected before they finished: planned, reported missing
            break
    return trials
