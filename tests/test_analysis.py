"""The Analysis rules on hand-made histories: each sentence must match the numbers."""
import common

FACTS_PLAIN = {"batchnorm": False, "dropout": False, "max_rotation": 0.0, "schedule": "constant"}
FACTS_AUG = {"batchnorm": True, "dropout": False, "max_rotation": 7.0, "schedule": "onecycle"}


def history(test, train):
    return [{"epoch": i + 1, "train_loss": 0.1, "train_acc": tr, "test_loss": 0.05, "test_acc": te,
             "lr": 0.01, "seconds": 2.0} for i, (te, tr) in enumerate(zip(test, train))]


def analysis(test, train, params=7000, facts=FACTS_AUG, **kw):
    return common.analyze(4, history(test, train), params, facts, **kw)


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
    assert text[2].startswith("Bar met") and "lowest 99.40" in text[2]


def test_bar_missed_in_one_of_the_last_three():
    text = analysis([98.0, 99.45, 99.38, 99.47], [99.0] * 4)
    assert text[2].startswith("Bar missed") and "first reached at epoch 2" in text[2]
    assert "1 of the last 3" in text[2]


def test_bar_never_reached():
    text = analysis([98.0, 99.1, 99.2], [99.0] * 3)
    assert "never reaches 99.40" in text[2] and "0.20 short" in text[2]


def test_more_than_fifteen_epochs_does_not_count():
    text = analysis([99.5] * 16, [99.0] * 16)
    assert text[2].startswith("Bar missed")


def test_noisy_tail_versus_settled_tail():
    assert "noisy" in analysis([99.0, 99.5, 99.1, 99.45], [99.0] * 4)[3]
    assert "settled" in analysis([99.0, 99.44, 99.46, 99.45], [99.0] * 4)[3]


def test_over_budget_asks_to_cut_parameters():
    text = analysis([99.0, 99.1, 99.1], [99.9] * 3, params=900_000, facts=FACTS_PLAIN)
    assert "over the 10,000 budget" in text[0] and text[-1].startswith("Next: cut the parameters")


def test_previous_step_comparison_uses_its_record():
    prev = {"step": 3, "params": 7766,
            "summary": common.summarize(history([99.0, 99.2, 99.1], [99.0] * 3))}
    text = analysis([99.3, 99.45, 99.5], [99.0] * 3, prev=prev)
    line = next(t for t in text if t.startswith("Against step 3"))
    assert "99.20 -> 99.50 (+0.30)" in line


def test_rotation_robustness_verdicts():
    assert any("more robust" in t for t in analysis([99.5] * 3, [99.0] * 3, rotated=98.5, prev_rotated=97.0))
    assert any("less robust" in t for t in analysis([99.5] * 3, [99.0] * 3, rotated=96.5, prev_rotated=97.0))


def seeds_record(finals):
    runs = [{"seed": i, "summary": common.summarize(history([f, f, f], [99.0] * 3))}
            for i, f in enumerate(finals, 1)]
    return {"summary": common.seed_summary(runs)}


def test_seed_summary_sentence_reports_every_seed():
    seeds = seeds_record([99.45, 99.50, 99.38])
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, seeds=seeds))
    assert "2 of 3 held the bar" in text and "worst last-3 value 99.38" in text


def ablation_record(full, without):
    def variant(name, acc):
        return {"name": name, "reverted": "x 1 -> 0", "rotated_test_acc": 98.0,
                "summary": common.summarize(history([acc] * 3, [99.0] * 3))}
    return {"seed": 1, "variants": [variant("full recipe", full), variant("rotation", without)]}


def test_ablation_difference_within_seed_spread_is_not_a_gain():
    seeds = seeds_record([99.40, 99.50, 99.45])  # std 0.05
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, seeds=seeds,
                             ablation=ablation_record(99.47, 99.44)))
    assert "one seed per variant" in text and "not called a gain" in text


def test_ablation_difference_beyond_seed_spread_is_credited():
    seeds = seeds_record([99.40, 99.50, 99.45])
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, seeds=seeds,
                             ablation=ablation_record(99.47, 99.20)))
    assert "Without rotation" in text and "(-0.27)" in text and "earns its place" in text


def test_ablation_without_seed_record_calls_nothing_a_gain():
    text = " ".join(analysis([99.5] * 3, [99.0] * 3, ablation=ablation_record(99.47, 99.0)))
    assert "no difference is called a gain" in text


def test_missing_previous_record_is_said_in_the_target(tmp_path):
    assert "was not found" in common.previous_line(3, None, tmp_path)


def test_next_step_once_the_bar_is_met_depends_on_what_was_measured():
    plain = analysis([99.5] * 3, [99.0] * 3)[-1]
    assert "--seeds" in plain and "--ablate" in plain
    seeds = seeds_record([99.45, 99.50])
    measured = analysis([99.5] * 3, [99.0] * 3, seeds=seeds, ablation=ablation_record(99.5, 99.4))[-1]
    assert "--seeds" not in measured and "--ablate" not in measured
