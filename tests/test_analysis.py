"""The Analysis rules on hand-made histories: each sentence must match the numbers."""
import json
from pathlib import Path

import pytest

import common
import report

FACTS_PLAIN = {"step": 2, "params": 7000, "regularised": False, "augmented": False, "scheduled": False,
               "rotated": 97.0, "prev_rotated": None, "next": "normalise it."}
FACTS_AUG = dict(FACTS_PLAIN, step=4, regularised=True, augmented=True, scheduled=True, next="trim it.")


def history(test, train, total=10_000):
    """Per-epoch counts from percentages (exact for two decimals of 10,000 images)."""
    return [{"epoch": i + 1, "train_loss": 0.1, "train_correct": round(tr * total / 100), "train_total": total,
             "test_loss": 0.05, "test_correct": round(te * total / 100), "test_total": total,
             "lr": 0.01, "seconds": 2.0} for i, (te, tr) in enumerate(zip(test, train))]


def analysis(test, train, facts=FACTS_AUG, **kw):
    h = history(test, train)
    return report.analyze(report.summarize(h), h, facts, **kw)


def test_overfitting_is_called_out():
    text = analysis([98.9, 99.0, 99.1, 99.1], [99.5, 99.8, 99.9, 99.95], facts=FACTS_PLAIN)
    assert text[1].startswith("Overfitting") and "0.85 points" in text[1]


def test_underfitting_is_called_out():
    text = analysis([97.5, 98.0, 98.3], [97.0, 97.9, 98.2], facts=FACTS_PLAIN)
    assert text[1].startswith("Underfitting") and "98.20" in text[1]


def test_test_above_train_is_not_overfitting():
    text = analysis([99.4, 99.45, 99.5], [99.0, 99.1, 99.2])
    assert text[1].startswith("No overfitting") and "0.30 points above train" in text[1]


def test_bar_met_in_each_of_the_last_three():
    text = analysis([98.0, 99.41, 99.45, 99.40], [99.0] * 4)
    assert text[2].startswith("Bar met") and "lowest 99.40" in text[2] and "epochs 2-4" in text[2]


def test_the_bar_is_an_exact_count():
    assert common.holds_bar(9_940, 10_000) and not common.holds_bar(9_939, 10_000)
    assert common.holds_bar(994, 1_000) and not common.holds_bar(127, 128)  # 99.22%


def test_bar_missed_in_one_of_the_last_three():
    text = analysis([98.0, 99.45, 99.38, 99.47], [99.0] * 4)
    assert text[2].startswith("Bar missed") and "first reached at epoch 2" in text[2]
    assert "1 of epochs 2-4" in text[2]


def test_bar_never_reached():
    text = analysis([98.0, 99.1, 99.2], [99.0] * 3)
    assert "never reaches 99.40" in text[2] and "0.20 short" in text[2]


def test_more_than_fifteen_epochs_is_judged_within_fifteen():
    held_late = analysis([99.0] * 15 + [99.5], [99.0] * 16)
    assert "judged on epochs 13-15" in held_late[2] and held_late[3].startswith("Bar missed")
    assert "never reaches 99.40 within 15 epochs" in held_late[3]
    held_early = analysis([99.5] * 15 + [99.0], [99.0] * 16)
    assert held_early[3].startswith("Bar met: each of epochs 13-15")


@pytest.mark.parametrize("epochs", [1, 2])
def test_short_runs_get_sentences_true_of_them(epochs):
    text = analysis([99.5] * epochs, [99.0] * epochs)
    assert text[2] == f"Bar not judged: it needs 3 epochs and this run trained {epochs} (final test 99.50)."
    assert "spans" not in text[3] if epochs == 1 else "last 2 epochs" in text[3]
    assert not any("first reached" in t or "of the last 3" in t for t in text)


def test_noisy_tail_versus_settled_tail():
    assert "noisy" in analysis([99.0, 99.5, 99.1, 99.45], [99.0] * 4)[3]
    assert "settled" in analysis([99.0, 99.44, 99.46, 99.45], [99.0] * 4)[3]


def test_over_budget_asks_for_what_the_step_says_next():
    text = analysis([99.0, 99.1, 99.1], [99.9] * 3, facts=dict(FACTS_PLAIN, params=900_000, next="cut it."))
    assert "over the 10,000 budget" in text[0] and text[-1] == "Next: cut it."


def test_missed_bar_with_everything_in_place_does_not_repeat_the_plan():
    assert "not held by this run" in analysis([99.3, 99.35, 99.38], [99.0] * 3)[-1]


def test_previous_step_comparison_uses_its_record():
    prev = {"step": 3, "params": 7766, "history": history([99.0, 99.2, 99.1], [99.0] * 3)}
    text = analysis([99.3, 99.45, 99.5], [99.0] * 3, prev=prev)
    line = next(t for t in text if t.startswith("Against step 3"))
    assert "99.20 -> 99.50 (+0.30)" in line


def test_rotation_robustness_verdicts():
    more = analysis([99.5] * 3, [99.0] * 3, facts=dict(FACTS_AUG, rotated=98.5, prev_rotated=97.0))
    less = analysis([99.5] * 3, [99.0] * 3, facts=dict(FACTS_AUG, rotated=96.5, prev_rotated=97.0))
    same = analysis([99.5] * 3, [99.0] * 3, facts=dict(FACTS_AUG, rotated=97.05, prev_rotated=97.0))
    assert any("more robust to rotation than" in t for t in more)
    assert any("less robust to rotation than" in t for t in less)
    assert any("about as robust to rotation as" in t for t in same)


def seeds_record(lows):
    return {"runs": [{"seed": i, "history": history([low, low + 0.05, low + 0.02], [99.0] * 3)}
                     for i, low in enumerate(lows, 1)]}


def test_seed_statistics_report_every_seed_and_a_lower_bound():
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, seeds=seeds_record([99.45, 99.50, 99.38])))
    assert "2 of 3 held the bar" in text and "worst 99.38" in text and "seeds (1-3)" in text
    assert "share of seeds that hold is 21% (Wilson)" in text  # 95% lower bound for 2 of 3


def test_wilson_lower_bound_for_twenty_of_twenty():
    assert report.wilson_lower(20, 20) == pytest.approx(0.839, abs=0.001)
    assert report.wilson_lower(0, 5) == pytest.approx(0.0, abs=1e-12)


def ablation_record(full_lows, without_lows):
    def variant(name, lows):
        return {"name": name, "reverted": "x 1 -> 0", **seeds_record(lows)}
    return {"variants": [variant("full recipe", full_lows), variant("rotation", without_lows)]}


def test_ablation_difference_within_seed_noise_is_not_a_gain():
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, ablation=ablation_record([99.47, 99.40, 99.52],
                                                                            [99.44, 99.46, 99.41])))
    assert "3 seeds per variant" in text and "within seed noise" in text


def test_ablation_difference_beyond_twice_its_standard_error_is_credited():
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, ablation=ablation_record([99.47, 99.50, 99.45],
                                                                            [99.20, 99.25, 99.21])))
    assert "Without rotation" in text and "-0.25 against the full recipe" in text and "earns its place" in text


def test_ablation_on_one_seed_calls_nothing_a_gain():
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, ablation=ablation_record([99.47], [99.0])))
    assert "one seed cannot tell" in text and "earns" not in text


def test_missing_previous_record_is_said_in_the_target(tmp_path):
    record, why = report.usable_record(tmp_path / "step2.json", report.check_single)
    assert record is None and "was not found" in report.previous_line(3, record, why)


def test_a_record_that_may_be_missing_says_nothing_when_missing_but_still_says_when_unreadable(tmp_path):
    assert report.usable_record(tmp_path / "step4_seeds.json", report.check_seeds, missing_ok=True) == (None, None)
    (tmp_path / "step4_seeds.json").write_text("{not json")
    record, why = report.usable_record(tmp_path / "step4_seeds.json", report.check_seeds, missing_ok=True)
    assert record is None and "could not be read" in why


def test_next_step_once_the_bar_is_met_depends_on_what_was_measured():
    plain = analysis([99.5] * 3, [99.0] * 3)[-1]
    assert "--seeds" in plain and "--ablate" in plain
    measured = analysis([99.5] * 3, [99.0] * 3, seeds=seeds_record([99.50, 99.55]),
                        ablation=ablation_record([99.5, 99.5], [99.4, 99.4]))[-1]
    assert measured == "Next: trim it."
    thin = analysis([99.5] * 3, [99.0] * 3, seeds=seeds_record([99.45, 99.50]),
                    ablation=ablation_record([99.5, 99.5], [99.4, 99.4]))[-1]
    assert thin.startswith("Next: all 2 seeds held, but their mean lowest of last 3 (99.47") and "trim" not in thin
    # a mean that rounds to the margin at two decimals is written with three, so it cannot read as "99.50 is under 99.50"
    close = analysis([99.5] * 3, [99.0] * 3, seeds=seeds_record([99.49, 99.50, 99.50]),
                     ablation=ablation_record([99.5, 99.5], [99.4, 99.4]))[-1]
    assert "(99.497) is under 99.50" in close
    one_missed = analysis([99.5] * 3, [99.0] * 3, seeds=seeds_record([99.45, 99.38]),
                          ablation=ablation_record([99.5, 99.5], [99.4, 99.4]))[-1]
    assert one_missed.startswith("Next: 1 of 2 seeds missed the bar") and "trim" not in one_missed


def test_a_record_whose_counts_are_not_integers_is_treated_as_missing(tmp_path):
    record = json.loads((Path(__file__).parent.parent / "logs" / "step3.json").read_text())
    assert report.usable_record(write_json(tmp_path / "ok.json", record), report.check_single)[1] is None
    bad = write_json(tmp_path / "step3.json", {**record, "params": "9,246"})
    found, why = report.usable_record(bad, report.check_single)
    assert found is None and "params is not an integer" in why and "treated as missing" in why


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_next_step_of_a_run_too_short_to_judge_is_to_train_longer():
    assert analysis([99.5], [99.0])[-1] == "Next: train 15 epochs, so the bar can be judged on the last 3."


def test_seed_lists_are_written_as_ranges():
    assert report.seed_list([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
