import json

import pytest
import torch

import common
import search
import step3
import step4
from conftest import ROOT


def test_the_shipped_candidate_is_step_3s_net_trained_with_step_4s_recipe():
    torch.manual_seed(0)
    ours = search.Candidate(search.SHIPPED).state_dict()
    torch.manual_seed(0)
    theirs = step3.Net().state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    assert all(torch.equal(a, b) for a, b in zip(ours.values(), theirs.values()))  # same initial weights
    assert search.recipe_of(search.SHIPPED) == step4.RECIPE


@pytest.mark.parametrize("path", sorted((ROOT / search.OUT).glob("*.json")), ids=lambda p: p.name)
def test_each_search_record_was_trained_as_search_py_defines_its_candidate(path):
    record = json.loads(path.read_text())
    assert common.Recipe(**record["recipe"]) == search.recipe_of(record["candidate"])
    assert record["params"] == common.count_params(search.Candidate(record["candidate"]))


def test_every_candidate_but_the_larger_ones_is_within_6000_parameters():
    for name in search.CANDIDATES:
        larger = ("U14", "U12", "U12l", "S30", "S30n")
        assert (common.count_params(search.Candidate(name)) <= 6_000) == (name not in larger), name


def write_record(folder, name, seed, counts, cpu="Intel(R) Xeon(R) Processor"):
    """A search record of one seed whose validation counts per epoch are `counts`."""
    history = [{"epoch": e, "test_correct": c, "test_total": 10_000, "train_correct": 1, "train_total": 2,
                "seconds": 1.0} for e, c in enumerate(counts, 1)]
    (folder / f"{name}_seed{seed}.json").write_text(json.dumps(
        {"candidate": name, "params": common.count_params(search.Candidate(name)), "seed": seed, "history": history,
         "cpu": cpu}))


def test_the_report_pairs_only_runs_of_one_cpu_kind(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "OUT", tmp_path)
    monkeypatch.setattr(search, "plot_curve", lambda rows, path: None)
    for seed in (1, 2):
        write_record(tmp_path, "U14", seed, [9_950] * 3)
        write_record(tmp_path, "S26n", seed, [9_946] * 3)
        write_record(tmp_path, "S26a", seed, [9_944 + seed] * 3, cpu="AMD EPYC")
        write_record(tmp_path, "S26c", seed, [9_946 + 2 * seed] * 3, cpu="AMD EPYC")
    search.report_table()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["S26c"][2] == "AMD" and rows["U14"][2] == "Xeon"
    assert rows["S26c"][7] == "" and rows["S26a"][7] == ""  # an AMD run never pairs with the Xeon's U14
    assert rows["S26c"][8] == "+0.035 (SE 0.005, 2 seeds) |"  # ...but with S26a: +0.03, +0.04
    assert rows["S26n"][7] == "-0.040 (SE 0.000, 2 seeds)" and rows["U14"][8] == "+0.040 (SE 0.000, 2 seeds) |"


def test_a_single_seed_gets_no_standard_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "OUT", tmp_path)
    monkeypatch.setattr(search, "plot_curve", lambda rows, path: None)
    write_record(tmp_path, "T30y", 1, [9_915] * 3, cpu="AMD EPYC")
    for seed in (1, 2):
        write_record(tmp_path, "T30n", seed, [9_950 + seed] * 3, cpu="AMD EPYC")
    rows = {name: se for name, _, _, _, se in search.report_rows()}
    assert rows["T30y"] is None and rows["T30n"] == pytest.approx(0.005)
    search.report_table()
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| T30y |"))
    assert line.split(" | ")[5:7] == ["99.150", "-"]  # not 0.000: one seed measures no spread


def test_the_report_pairs_candidates_by_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "OUT", tmp_path)
    for seed, (ref, small) in enumerate([(9_945, 9_940), (9_950, 9_940), (9_948, 9_941)], 1):
        write_record(tmp_path, "U14", seed, [9_950, ref, 9_960])  # the lowest validation count is the middle one
        write_record(tmp_path, "U10", seed, [9_950, small, 9_960])
    rows = {name: (lows, mean) for name, _, lows, mean, _ in search.report_rows()}
    assert rows["U10"][0] == {1: 99.40, 2: 99.40, 3: 99.41}
    diff, se, n = search.paired(rows["U10"][0], rows["U14"][0])
    assert n == 3 and round(diff, 4) == round((-0.05 - 0.10 - 0.07) / 3, 4) and se > 0


def test_the_report_draws_the_curve_with_every_kind_of_candidate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "OUT", tmp_path)
    names = [search.REFERENCE, search.FINALIST, search.BEST_SMALL, *search.TEST_SWEPT, search.SHIPPED, "S26b", "S22h", "U10", "U10c", "S26a", "S26f"]  # each colour and panel
    for name in names:
        for seed in (1, 2):
            write_record(tmp_path, name, seed, [9_940 + seed + e for e in (1, 2, 3)])
    search.report_table()
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in names)
    assert (tmp_path / "size_vs_margin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", list(search.TEST_SWEEPS))
def test_each_test_sweep_record_is_its_candidates_model_on_the_cpu_kind_it_names(name):
    path, kind = search.TEST_SWEEPS[name]
    record = json.loads((ROOT / "logs" / path).read_text())
    assert record["params"] == common.count_params(search.Candidate(name.split()[0]))
    assert [r["seed"] for r in record["runs"]] == list(range(1, 21))
    header = (ROOT / "logs" / path).with_suffix(".log").read_text().splitlines()[:8]
    machine = record.get("machine") or next((line for line in header if line.startswith("machine:")), None)
    if machine is not None:  # the oldest records name no machine; the README says which they ran on
        assert search.cpu_kind(machine) == kind


def sweep_record(folder, name, lows):
    history = lambda low: [{"epoch": e, "test_correct": c, "test_total": 10_000, "train_correct": 1,
                            "train_total": 2, "seconds": 1.0} for e, c in enumerate([9_960] * 12 + [low, low + 3, low + 1], 1)]
    (folder / f"{name}.json").write_text(json.dumps(
        {"params": 5_000, "runs": [{"seed": s, "history": history(low)} for s, low in enumerate(lows, 1)]}))


def test_the_sweep_table_pairs_each_sweep_with_the_shipped_one_on_its_cpu_kind_only(tmp_path, monkeypatch, capsys):
    sweep_record(tmp_path, "shipped", [9_950, 9_952])
    sweep_record(tmp_path, "small", [9_945, 9_939])  # its second seed misses the bar: 99.39
    sweep_record(tmp_path, "other_cpu", [9_941, 9_941])
    monkeypatch.setattr(search, "TEST_SWEEPS", {search.SHIPPED: ("shipped.json", "AMD"), "U10": ("small.json", "AMD"),
                                                "U14": ("other_cpu.json", "Xeon")})
    rows = search.sweep_rows(tmp_path)
    assert [(r[0], r[4], round(r[5], 3)) for r in rows] == [(search.SHIPPED, 2, 99.51), ("U10", 1, 99.42), ("U14", 2, 99.41)]
    search.sweep_table(rows)
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["U10"].endswith("| 1 of 2 | 99.39 | 99.420 | 0.030 | -0.090 (SE 0.040) |")  # -0.05 and -0.13
    assert lines["U14"].endswith("|  |")  # a Xeon sweep never pairs with the AMD's
    search.plot_sweeps(rows, tmp_path / "sweeps.png")
    assert (tmp_path / "sweeps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_sweep_record_is_left_out_not_a_traceback(tmp_path, monkeypatch, capsys):
    sweep_record(tmp_path, "small", [9_945, 9_939])
    monkeypatch.setattr(search, "TEST_SWEEPS", {search.SHIPPED: ("gone.json", "AMD"), "U10": ("small.json", "AMD")})
    rows = search.sweep_rows(tmp_path)
    assert [r[0] for r in rows] == ["U10"]
    search.sweep_table(rows)  # without the shipped sweep there is nothing to pair with
    assert capsys.readouterr().out.splitlines()[-1].endswith("| 0.030 |  |")
    assert search.sweep_rows(tmp_path / "nowhere") == []
