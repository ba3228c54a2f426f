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
import runner
import step4
from conftest import FAST, ROOT, STEP4, run_step, snapshot

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
    assert len(record["history"]) == 1 and record["recipe"] == common.dataclasses.asdict(
        common.dataclasses.replace(step4.RECIPE, epochs=1, precision="fp32"))
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
                                   ["--device", "tpu9"], ["--lr", "0"], ["--lr", "-1"], ["--lr", "nan"],
                                   ["--batch-size", "0"], ["--nonsense"], ["--eval", ""], ["--log-dir", ""],
                                   ["--seed", "-1"], ["--seed", str(2**64)], ["--seeds", "1", str(2**64)],
                                   ["--seeds", "1", "1"], ["--seeds", "1-3", "2"], ["--seeds", "5-2"],
                                   ["--jobs", "2"], ["--eval", "x.pt", "--seeds", "1"], ["--eval", "x.pt", "--ablate"]],
                         ids=lambda f: " ".join(f) or "empty")
def test_bad_flags_exit_2_and_write_nothing(flags, tmp_path, mnist_dir):
    logs = tmp_path / "logs"
    result = run_step(4, *flags, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr
    assert not logs.exists() and result.stdout == ""


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


def start_training(log_dir, mnist_dir, epochs=500):
    """A step-4 run that has really started training (its 2nd epoch printed)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "step4.py"), "--epochs", str(epochs),
                             "--data-dir", str(mnist_dir), "--log-dir", str(log_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("epoch  2/"):
            break
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupt_keeps_the_previous_files(finished_run, mnist_dir, sig):
    before = snapshot(finished_run)
    proc = start_training(finished_run, mnist_dir)
    start = time.perf_counter()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.perf_counter() - start < 10
    assert proc.returncode == 128 + sig and "interrupted" in err and "step4.partial.log" in err
    assert "Traceback" not in err and "files are untouched" in err
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert "epoch  2/500" in after["step4.partial.log"].decode()


def test_ctrl_c_twice_is_still_one_clean_exit(finished_run, mnist_dir):
    before = snapshot(finished_run)
    proc = start_training(finished_run, mnist_dir)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err
    assert {k: v for k, v in snapshot(finished_run).items() if k in before} == before


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "step4.py"), "--log-dir", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(0.5)  # python is up, torch (seconds) is still importing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(28, "No space left on device")], ids=["ctrl-c", "disk-full"])
def test_a_fault_at_the_end_leaves_the_old_set_byte_for_byte(finished_run, mnist_dir, in_process, monkeypatch, capsys, fault):
    before = snapshot(finished_run)

    def fail(*args, **kwargs):
        raise fault
    monkeypatch.setattr(runner, "plot_misclassified", fail)  # after weights, record and log are staged
    code = in_process(STEP4, *FAST, "--data-dir", mnist_dir, "--log-dir", finished_run)
    err = capsys.readouterr().err
    assert code == (130 if isinstance(fault, KeyboardInterrupt) else 1)
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("warning:")]
    assert "Traceback" not in err and len(lines) == 1 and "files are untouched" in err
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"step4.partial.log", "step4.partial.pt"}  # the training is kept
    assert not [p for p in finished_run.iterdir() if p.name.endswith(".tmp")]  # no temporary files left
    if isinstance(fault, OSError):
        assert "No space left" in err and "Traceback" in after["step4.partial.log"].decode()


def test_an_interrupt_during_the_commit_waits_for_the_new_set(finished_run, mnist_dir, in_process, monkeypatch, capsys):
    real_replace, renames = os.replace, []

    def replace(src, dst):
        if str(dst).startswith(str(finished_run)) and not renames:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the renames begin: held back until they end
            renames.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(runner.os, "replace", replace)
    code = in_process(STEP4, *FAST, "--seed", 2, "--data-dir", mnist_dir, "--log-dir", finished_run)
    err = capsys.readouterr().err
    assert code == 130 and "set was complete" in err and "Traceback" not in err
    record = json.loads((finished_run / "step4.json").read_text())
    assert record["seed"] == 2
    import hashlib
    assert hashlib.sha256((finished_run / "step4.pt").read_bytes()).hexdigest() == record["weights_sha256"]


def test_a_previous_record_that_cannot_be_understood_counts_as_missing(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "step3.json").write_text(json.dumps({"history": [{"epoch": 1}]}))
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    assert "step3.json could not be understood (params is not an integer)" in (logs / "step4.log").read_text()


def test_more_than_fifteen_epochs_warns_and_is_judged_within_fifteen(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    result = run_step(2, "--epochs", 16, "--quiet", "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0 and "warning: --epochs 16 is more than the assignment's 15" in result.stderr
    assert "judged on epochs 13-15" in (logs / "step2.log").read_text()


def test_batch_larger_than_the_train_set_is_refused(mnist_dir, tmp_path):
    result = run_step(4, *FAST, "--batch-size", 100_000, "--data-dir", mnist_dir, "--log-dir", tmp_path / "logs")
    assert result.returncode == 1 and "larger than the 256 training images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_swapped_files_are_refused(mnist_dir, tmp_path):
    raw = mnist_dir / "MNIST" / "raw"
    for kind in ("images-idx3", "labels-idx1"):
        a, b = raw / f"train-{kind}-ubyte", raw / f"t10k-{kind}-ubyte"
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b), b.write_bytes(data_a)
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", tmp_path / "logs")
    assert result.returncode == 1 and "swapped" in result.stderr and "Traceback" not in result.stderr


def test_seeds_mode_writes_its_summary(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    result = run_step(4, *FAST, "--seeds", "1-2", "4", "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    record = json.loads((logs / "step4_seeds.json").read_text())
    assert [r["seed"] for r in record["runs"]] == [1, 2, 4] and not (logs / "step4.json").exists()
    log = (logs / "step4_seeds.log").read_text()
    assert "3 of 3 done" in result.stdout and "held the bar" in log and "Wilson" in log


def test_seeds_in_worker_processes_give_the_same_numbers(mnist_dir, tmp_path):
    runs = {}
    for jobs in (1, 2):  # one CPU thread a run either way: oneDNN's sums depend on the thread count
        logs = tmp_path / f"jobs{jobs}"
        result = run_step(4, "--epochs", 2, "--quiet", "--seeds", "1-3", "--jobs", jobs,
                          "--data-dir", mnist_dir, "--log-dir", logs, env=dict(os.environ, OMP_NUM_THREADS=str(jobs)))
        assert result.returncode == 0, result.stderr
        record = json.loads((logs / "step4_seeds.json").read_text())
        runs[jobs] = [[{k: v for k, v in h.items() if "seconds" not in k} for h in r["history"]]
                      for r in record["runs"]]
    assert runs[1] == runs[2]


def test_ctrl_c_in_a_sweep_with_workers_keeps_the_finished_seeds(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, str(ROOT / "step4.py"), "--epochs", "3", "--seeds", "1-50",
                             "--jobs", "2", "--data-dir", str(mnist_dir), "--log-dir", str(logs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # wait until one seed is done
        if " of 50 done" in line:
            break
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and time.perf_counter() - start < 30
    assert "1 of 50 done" in (logs / "step4_seeds.partial.log").read_text()
    assert not (logs / "step4_seeds.json").exists()


def test_ablate_trains_one_variant_per_change_over_seeds(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    result = run_step(4, *FAST, "--ablate", "--seeds", "1-2", "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    record = json.loads((logs / "step4_ablation.json").read_text())
    names = [v["name"] for v in record["variants"]]
    assert names == ["full recipe"] + list(step4.CHANGES)
    full = record["variants"][0]["recipe"]
    for variant in record["variants"]:
        assert [r["seed"] for r in variant["runs"]] == [1, 2]
        changed = {k for k in full if variant["recipe"][k] != full[k]}
        assert changed == set(step4.CHANGES.get(variant["name"], {}))
    # the step's own run now quotes the ablation record it finds
    assert run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    assert "Ablation (2 seeds per variant: 1-2)" in (logs / "step4.log").read_text()


def test_help_shows_every_flag_with_its_default():
    result = run_step(4, "--help")
    for flag in ("--epochs", "--data-dir", "--log-dir", "--seed", "--device", "--lr",
                 "--batch-size", "--quiet", "--eval", "--seeds", "--ablate", "--jobs"):
        assert flag in result.stdout
    text = " ".join(result.stdout.split())
    assert "default: 15)" in text and f"default: {step4.RECIPE.lr:g})" in text


def test_ablate_reuses_the_seeds_records_runs_only_from_the_same_machine_kind(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    assert run_step(4, *FAST, "--seeds", "1", "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    seeds_path = logs / "step4_seeds.json"
    seeds = json.loads(seeds_path.read_text())
    assert seeds["machine"]  # the record names what computed it
    assert run_step(4, *FAST, "--ablate", "--seeds", "1", "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    assert "full recipe: seeds 1 taken from" in (logs / "step4_ablation.log").read_text()
    assert json.loads((logs / "step4_ablation.json").read_text())["reused"] == [1]
    seeds["machine"] = "another CPU kind"  # the same seed differs between machine kinds: train it here
    seeds_path.write_text(json.dumps(seeds))
    assert run_step(4, *FAST, "--ablate", "--seeds", "1", "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    assert "taken from" not in (logs / "step4_ablation.log").read_text()
    record = json.loads((logs / "step4_ablation.json").read_text())
    assert record["reused"] == [] and [r["seed"] for r in record["variants"][0]["runs"]] == [1]
