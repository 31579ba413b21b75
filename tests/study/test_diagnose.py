"""Flags on trials drawn from a known law with one fault each: too short, seeds that disagree, a
loss that is not finite, an accuracy that falls with more training; none on a clean study."""

from dataclasses import replace

import numpy as np
from test_analysis import TRUE, epochs_study, trial

from vitscale.study import analysis, diagnose, lawfit, report
from vitscale.study.config import StudyConfig
from vitscale.study.summary import Noise


def kinds(rows) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in diagnose.diagnose(rows):
        out.setdefault(f.trial, []).append(f.kind)
    return out


def test_a_clean_study_has_no_flag():
    assert diagnose.diagnose(epochs_study(sd=0.002, seed=1)) == ()


def test_each_fault_gets_its_flag_and_only_it():
    rng = np.random.default_rng(1)
    short = trial("d", 2, diagnose.MIN_STEPS - 1)
    spread = trial("d", 4, 2000, seeds=(0, 1), sd=0.05, rng=rng)  # binomial error 0.4 points
    falling = trial("w", 2, 2000, final=0.2)
    broken = trial("w", 4, 2000)
    seed = broken.seeds[0]
    broken = replace(broken, seeds=(replace(seed, points=(*seed.points[:-1], replace(seed.points[-1],
                                                                                        loss=float("nan")))),))
    found = kinds([trial("d", 1, 2000), short, spread, falling, broken])
    accs = [s.final.accuracy for s in spread.seeds]
    assert abs(accs[0] - accs[1]) / 2**0.5 > 3 * 0.004  # the seeds do disagree, by the flag's measure
    assert found == {"d-x2": ["short"], "d-x4": ["unstable"], "w-x2": ["not improving"], "w-x4": ["unstable"]}
    rows = [trial("d", 1, 2000), short, spread, falling, broken]
    flags = diagnose.diagnose(rows)
    assert {f.trial for f in flags if f.left_out} == {"w-x2", "w-x4"}  # falling, and the loss not finite
    assert [r.name for r in diagnose.fitted(rows, flags)] == ["base", "d-x2", "d-x4"]
    assert diagnose.reseed(rows, flags) == {"d-x4"}  # seeds that disagree: one more


def test_a_base_is_flagged_but_never_left_out():
    base = trial("d", 1, 2000, final=0.05)  # below its point at half its length, 15%
    (flag,) = diagnose.diagnose([base])
    assert flag.kind == "not improving" and not flag.left_out


def test_seeds_within_their_binomial_error_are_not_unstable():
    steady = trial("d", 4, 2000, seeds=(0, 1), sd=0.001, rng=np.random.default_rng(3))
    assert kinds([steady]) == {}


def test_noise_above_two_points_says_what_it_cannot_resolve():
    assert diagnose.unresolved(Noise(0.01, 4, 0.004)) == ""
    assert "does not resolve differences between trials smaller than that" in diagnose.unresolved(
        Noise(0.03, 4, 0.004))


def test_the_report_lists_the_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 4)
    rows = epochs_study()
    rows[3] = trial("d", 8, 2000, final=0.2)  # the largest d: its accuracy collapses at the end
    s = analysis.summarize(StudyConfig(strategies=("d", "w")), rows)
    assert [(f.trial, f.kind) for f in s.flags] == [("d-x8", "not improving")]
    report.write(tmp_path, s, rows)
    text = (tmp_path / "report.md").read_text()
    assert "## Trials to trust less" in text and "| d-x8 | not improving | 20.0% at 1 of its budget" in text
    assert "**left out of the fits**" in text
    predicted = 1 - float(s.law.predict("d", rows[3].flops, rows[3].samples))  # the law never saw it collapse
    truth = 1 - float(TRUE.predict("d", rows[3].flops, rows[3].samples))
    assert abs(predicted - truth) < 0.01 and s.recommendation.measured_best.name != "d-x8"
