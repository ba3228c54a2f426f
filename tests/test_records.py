"""The committed logs agree with the committed code: same models, same weights, same numbers."""
import hashlib
import json

import pytest
import torch

import common
import report
from conftest import ROOT

LOGS = ROOT / "logs"
STEPS = [n for n in range(1, 5) if (LOGS / f"step{n}.json").exists()]
RECORDS = sorted(LOGS.glob("step*.json"))


def load(n):
    return json.loads((LOGS / f"step{n}.json").read_text()), __import__(f"step{n}")


def committed_recipe(recipe, record, **changes):
    """The recipe as a run on the record's device resolves it."""
    precision = common.resolve_precision(recipe.precision, torch.device(record["device"]))
    return common.dataclasses.replace(recipe, precision=precision, **changes)


def numbers(o):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from ((f"{k}.{path}", x) for path, x in numbers(v))
    elif isinstance(o, list):
        for v in o:
            yield from numbers(v)
    elif isinstance(o, (int, float)) and not isinstance(o, bool):
        yield "", o


def test_all_four_records_are_committed():
    assert STEPS == [1, 2, 3, 4]


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_records_hold_counts_and_no_float_noise(path):
    record = json.loads(path.read_text())
    noisy = [(k, x) for k, x in numbers(record) if isinstance(x, float) and float(f"{x:.8g}") != x]
    assert not noisy, noisy[:3]
    assert "summary" not in record  # summaries are derived from the history, never stored twice
    for key, x in numbers(record):
        if key.endswith(("correct", "total")):
            assert isinstance(x, int), key


@pytest.mark.parametrize("n", STEPS)
def test_record_matches_the_model_and_its_log(n):
    record, step = load(n)
    model = common.make_net(step.Net, step.RECIPE)
    assert record["params"] == common.count_params(model)
    assert record["layers"] == common.layer_table(model)
    assert common.recorded_recipe(record["recipe"]) == committed_recipe(step.RECIPE, record, epochs=len(record["history"]))
    assert len(record["history"]) == 15
    log = (LOGS / f"step{n}.log").read_text()
    assert "\r" not in log and f"Parameters: {record['params']:,}" in log
    for line in record["block"]["result"][1:5]:
        assert line in log
    for line in record["block"]["analysis"]:
        assert line in log


@pytest.mark.parametrize("n", STEPS)
def test_committed_weights_load_and_match_their_hash(n):
    record, step = load(n)
    data = (LOGS / f"step{n}.pt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["weights_sha256"]
    assert record["weights_sha256"] in (LOGS / f"step{n}.log").read_text()
    common.make_net(step.Net, step.RECIPE).load_state_dict(torch.load(LOGS / f"step{n}.pt", weights_only=True))


def test_step4_record_is_judged_on_epochs_13_to_15_and_its_analysis_says_how_it_went():
    record, _ = load(4)
    s = report.summarize(record["history"])
    assert record["params"] < common.PARAM_BUDGET and s["judged"] == [13, 14, 15]
    verdict = "Bar met:" if s["holds_bar"] else "Bar missed:"
    assert [line for line in record["block"]["analysis"] if line.startswith(verdict)]


def test_step4_run_and_seed_1_of_the_sweep_are_one_computation():
    # the README says so: same seed, recipe, device and threads a run give the same counts
    record, _ = load(4)
    sweep = json.loads((LOGS / "step4_seeds.json").read_text())
    threads = f"{sweep['threads']} CPU threads a run"
    assert record["seed"] == 1 and threads in (LOGS / "step4.log").read_text().splitlines()[2]
    seed1 = next(r for r in sweep["runs"] if r["seed"] == 1)
    assert [e["test_correct"] for e in record["history"]] == [e["test_correct"] for e in seed1["history"]]


def test_seed_record_covers_twenty_seeds_of_the_committed_model_and_recipe():
    record = json.loads((LOGS / "step4_seeds.json").read_text())
    import step4
    assert common.recorded_recipe(record["recipe"]) == committed_recipe(step4.RECIPE, record)
    assert record["params"] == common.count_params(common.make_net(step4.Net, step4.RECIPE))
    assert [r["seed"] for r in record["runs"]] == list(range(1, 21))
    assert all(len(r["history"]) == 15 for r in record["runs"])


def test_ablation_record_is_of_the_committed_model_with_three_seeds_per_declared_change():
    record = json.loads((LOGS / "step4_ablation.json").read_text())
    import step4
    assert common.recorded_recipe(record["recipe"]) == committed_recipe(step4.RECIPE, record)
    assert record["params"] == common.count_params(common.make_net(step4.Net, step4.RECIPE))
    assert [v["name"] for v in record["variants"]] == ["full recipe"] + list(step4.CHANGES)
    assert all(len(v["runs"]) >= 3 for v in record["variants"])


def test_readme_quotes_the_committed_numbers():
    readme = (ROOT / "README.md").read_text()
    for n in STEPS:
        record, _ = load(n)
        s = report.summarize(record["history"])
        assert f"{s['final_test']:.2f}" in readme and f"{record['params']:,}" in readme
    seeds = report.seed_summary(json.loads((LOGS / "step4_seeds.json").read_text())["runs"])
    assert f"{seeds['held']} of {seeds['runs']}" in readme and f"{seeds['worst_low']:.2f}" in readme
    assert f"{seeds['low'][0]:.2f} +- {seeds['low'][1]:.2f}" in readme
