"""The scripts as a user runs them, on small synthetic MNIST: runs, records, and every fault."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import step4
from conftest import ROOT, run_step

FAST = ["--epochs", "1", "--quiet"]


@pytest.fixture
def finished_run(mnist_dir, tmp_path):
    """One finished 1-epoch run of step 4; returns its log folder."""
    logs = tmp_path / "logs"
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    return logs


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_run_writes_log_record_and_weights(finished_run):
    log = (finished_run / "step4.log").read_text()
    record = json.loads((finished_run / "step4.json").read_text())
    for name in ("step4.pt", "step4_curves.png", "step4_misclassified.png", "steps_test_accuracy.png"):
        assert (finished_run / name).stat().st_size > 0
    assert "\r" not in log and "TARGET" in log and "RESULT" in log and "ANALYSIS" in log
    assert "was not found" in log  # no step 3 record in this folder
    params = common.count_params(common.make_net(step4.Net, step4.RECIPE))
    assert record["params"] == params and f"Parameters: {params:,}" in log
    assert re.search(rf"^total\s+{params:,}$", log, re.M)  # the layer table agrees
    assert len(record["history"]) == 1 and record["recipe"]["max_rotation"] == 7.0
    assert record["weights_sha256"] in log
    import hashlib
    assert hashlib.sha256((finished_run / "step4.pt").read_bytes()).hexdigest() == record["weights_sha256"]
    assert "most confused" in log and record["seed"] == 1


def test_same_seed_same_numbers(mnist_dir, tmp_path, finished_run):
    again = tmp_path / "again"
    assert run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", again).returncode == 0
    first = json.loads((finished_run / "step4.json").read_text())["history"]
    second = json.loads((again / "step4.json").read_text())["history"]
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]
    assert strip(first) == strip(second)
    assert (finished_run / "step4.pt").read_bytes() == (again / "step4.pt").read_bytes()


def test_eval_reproduces_the_record(finished_run, mnist_dir):
    result = run_step(4, "--eval", finished_run / "step4.pt", "--data-dir", mnist_dir)
    assert result.returncode == 0, result.stderr
    assert "(matches)" in result.stdout and "confusion matrix" in result.stdout


def test_eval_rejects_weights_of_another_step(finished_run, mnist_dir, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(step4.Net().state_dict() | {"extra": torch.zeros(1)}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a weights file")
    for path, words in ((other, "does not hold weights"), (garbage, "not a readable weights file"),
                        (tmp_path / "none.pt", "does not exist")):
        result = run_step(2, "--eval", path, "--data-dir", mnist_dir)
        assert result.returncode == 1 and words in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_next_step_cites_the_previous_record(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    for step in (3, 4):
        assert run_step(step, *FAST, "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    log = (logs / "step4.log").read_text()
    prev = json.loads((logs / "step3.json").read_text())
    assert f"Step 3 measured: {prev['params']:,} parameters" in log
    assert "for step 3's weights" in log  # rotated copy compared with step 3's saved weights


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--epochs", "-3"], ["--epochs", "abc"],
                                   ["--device", "tpu9"], ["--lr", "0"], ["--lr", "-1"],
                                   ["--batch-size", "0"], ["--nonsense"]])
def test_bad_flags_exit_2_and_write_nothing(flags, tmp_path, mnist_dir):
    logs = tmp_path / "logs"
    result = run_step(4, *flags, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr
    assert not logs.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, mnist_dir):
    result = run_step(4, "--device", "cuda", "--data-dir", mnist_dir, "--log-dir", tmp_path / "logs")
    assert result.returncode == 2 and "CUDA is not available" in result.stderr


def test_missing_data_fails_fast_with_advice(tmp_path):
    start = time.perf_counter()
    result = run_step(4, "--data-dir", tmp_path / "no-such-folder", "--log-dir", tmp_path / "logs")
    assert result.returncode == 1 and time.perf_counter() - start < 30
    assert "no-such-folder" in result.stderr and "--data-dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_truncated_file_is_named(mnist_dir, tmp_path):
    path = mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", tmp_path / "logs")
    assert result.returncode == 1 and "t10k-images-idx3-ubyte" in result.stderr
    assert "delete it" in result.stderr and "Traceback" not in result.stderr and result.stdout == ""


def test_log_dir_that_is_a_file_is_left_alone(mnist_dir, tmp_path):
    target = tmp_path / "logs"
    target.write_text("precious")
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", target)
    assert result.returncode == 1 and "is a file" in result.stderr
    assert target.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_log_dir_fails_before_training(mnist_dir, tmp_path):
    logs = tmp_path / "ro"
    logs.mkdir(mode=0o500)
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 1 and "cannot write" in result.stderr


def test_divergence_stops_and_keeps_the_last_good_files(finished_run, mnist_dir):
    before = snapshot(finished_run)
    result = run_step(2, "--epochs", "2", "--lr", "1e6", "--quiet", "--data-dir", mnist_dir,
                      "--log-dir", finished_run)
    assert result.returncode == 1 and re.search(r"diverged at epoch \d+, batch \d+ \(loss (nan|inf)\)", result.stderr)
    assert "lower --lr" in result.stderr and "Traceback" not in result.stderr
    # step 4's finished files are untouched, and step 2 wrote only its partial log
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"step2.partial.log"}


def test_a_finished_run_removes_the_partial_log_of_an_earlier_one(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    failed = run_step(2, "--epochs", "3", "--lr", "1e6", "--quiet", "--data-dir", mnist_dir, "--log-dir", logs)
    assert failed.returncode == 1 and (logs / "step2.partial.log").exists()
    result = run_step(2, *FAST, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    assert (logs / "step2.log").exists() and not (logs / "step2.partial.log").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_the_previous_files(finished_run, mnist_dir, sig):
    before = snapshot(finished_run)
    proc = subprocess.Popen([sys.executable, str(ROOT / "step4.py"), "--epochs", "500",
                             "--data-dir", str(mnist_dir), "--log-dir", str(finished_run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # wait until training has really started
        if line.startswith("epoch  2/500"):
            break
    start = time.perf_counter()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.perf_counter() - start < 10
    assert proc.returncode == 130 and "interrupted" in err and "step4.partial.log" in err
    assert "Traceback" not in err
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert "epoch  2/500" in after["step4.partial.log"].decode()


def test_seeds_mode_writes_its_summary(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    result = run_step(4, *FAST, "--seeds", "1", "2", "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    record = json.loads((logs / "step4_seeds.json").read_text())
    assert [r["seed"] for r in record["runs"]] == [1, 2]
    assert record["summary"]["runs"] == 2 and not (logs / "step4.json").exists()
    assert "held the bar" in (logs / "step4_seeds.log").read_text()


def test_ablate_trains_one_variant_per_change(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    result = run_step(4, *FAST, "--ablate", "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    record = json.loads((logs / "step4_ablation.json").read_text())
    names = [v["name"] for v in record["variants"]]
    assert names == ["full recipe"] + list(step4.CHANGES)
    full = record["variants"][0]["recipe"]
    for variant in record["variants"][1:]:
        changed = {k for k in full if variant["recipe"][k] != full[k]}
        assert changed == set(step4.CHANGES[variant["name"]])
    # the step's own run now quotes the ablation record it finds
    assert run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    assert "Ablation (one seed per variant" in (logs / "step4.log").read_text()


def test_help_shows_every_flag_with_its_default():
    result = run_step(4, "--help")
    for flag in ("--epochs", "--data-dir", "--log-dir", "--seed", "--device", "--lr",
                 "--batch-size", "--quiet", "--eval", "--seeds", "--ablate"):
        assert flag in result.stdout
    assert "default: 15" in result.stdout and "default: 0.1" in result.stdout
