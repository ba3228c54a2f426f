"""The committed logs agree with the committed code: same models, same weights, same numbers."""
import hashlib
import json

import pytest
import torch

import common
from conftest import ROOT

LOGS = ROOT / "logs"
STEPS = [n for n in range(1, 5) if (LOGS / f"step{n}.json").exists()]
# (folder, step) for every committed single-run record: the CPU runs and the H100 runs
RUNS = [(d, n) for d in (LOGS, LOGS / "h100") for n in range(1, 5) if (d / f"step{n}.json").exists()]
RUN_IDS = [f"{d.name}-step{n}" for d, n in RUNS]


def load(n, folder=LOGS):
    return json.loads((folder / f"step{n}.json").read_text()), __import__(f"step{n}")


def committed_recipe(recipe, record, **changes):
    """The recipe as a run on the record's device resolves it."""
    precision = common.resolve_precision(recipe.precision, torch.device(record["device"]))
    return common.dataclasses.asdict(common.dataclasses.replace(recipe, precision=precision, **changes))


def test_all_four_records_are_committed():
    assert STEPS == [1, 2, 3, 4]


@pytest.mark.parametrize("folder, n", RUNS, ids=RUN_IDS)
def test_record_matches_the_model_and_its_log(folder, n):
    record, step = load(n, folder)
    model = common.make_net(step.Net, step.RECIPE)
    assert record["params"] == common.count_params(model)
    assert record["layers"] == common.layer_table(model)
    assert record["recipe"] == committed_recipe(step.RECIPE, record, epochs=len(record["history"]))
    assert len(record["history"]) == 15
    log = (folder / f"step{n}.log").read_text()
    assert "\r" not in log and f"Parameters: {record['params']:,}" in log
    assert record["summary"] == common.summarize(record["history"])
    for line in record["block"]["analysis"]:
        assert line in log


@pytest.mark.parametrize("folder, n", RUNS, ids=RUN_IDS)
def test_committed_weights_load_and_match_their_hash(folder, n):
    record, step = load(n, folder)
    data = (folder / f"step{n}.pt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["weights_sha256"]
    common.make_net(step.Net, step.RECIPE).load_state_dict(
        torch.load(folder / f"step{n}.pt", weights_only=True))


def test_step4_record_holds_the_bar():
    record, _ = load(4)
    last = [h["test_acc"] for h in record["history"][-common.LAST_N:]]
    assert record["params"] < common.PARAM_BUDGET and min(last) >= common.BAR


@pytest.mark.parametrize("folder", [d for d in (LOGS, LOGS / "h100") if (d / "step4_seeds.json").exists()],
                         ids=lambda d: d.name)
def test_seed_record_covers_at_least_five_seeds_of_the_committed_recipe(folder):
    record = json.loads((folder / "step4_seeds.json").read_text())
    import step4
    assert record["recipe"] == committed_recipe(step4.RECIPE, record)
    assert len(record["runs"]) >= 5
    assert record["summary"] == common.seed_summary(record["runs"])


def test_readme_quotes_the_committed_numbers():
    readme = (ROOT / "README.md").read_text()
    for folder, n in RUNS:
        record, _ = load(n, folder)
        assert f"{record['summary']['final_test_acc']:.2f}" in readme
        assert f"{record['params']:,}" in readme
