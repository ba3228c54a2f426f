"""The fault promises under probing: one lock per log folder, one check per record kind, paths
that cannot fail to encode, worker errors as the run's one line, partial files that say truly
what was saved, bad data refused before anything is written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import report
import runner
from conftest import FAST, ROOT, STEP4, make_mnist, run_step, snapshot, write_idx


def one_line(err):
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# 1. two runs, one log folder

def test_a_second_run_into_a_held_log_folder_is_refused_and_changes_nothing(finished_run, mnist_dir):
    before = snapshot(finished_run)
    fd = report.lock_log_dir(finished_run)  # as a run in the middle of its commit holds it
    try:
        result = run_step(4, *FAST, "--seed", 3, "--data-dir", mnist_dir, "--log-dir", finished_run)
    finally:
        os.close(fd)
    line = one_line(result.stderr)
    assert result.returncode == 1 and f"run {os.getpid()}" in line and "another --log-dir" in line
    assert snapshot(finished_run) == before
    assert run_step(4, *FAST, "--seed", 3, "--data-dir", mnist_dir, "--log-dir", finished_run).returncode == 0


def test_the_commit_does_not_depend_on_a_check_before_each_rename(tmp_path):
    final = tmp_path / "a.log"
    staged = {final: report.write_hidden(final, b"new", "staged")}
    assert report.commit(staged) == [] and final.read_bytes() == b"new"  # nothing there before: no backup


# 2. records that pass the check, and what the readers use

def test_each_field_a_reader_uses_is_checked(finished_run):
    record = json.loads((finished_run / "step4.json").read_text())
    report.check_single(record)
    for key in report.HISTORY_FIELDS:
        broken = json.loads(json.dumps(record))
        del broken["history"][0][key]
        with pytest.raises(ValueError):
            report.check_single(broken)
    for key in ("rotated_test", "params", "step"):
        with pytest.raises(ValueError):
            report.check_single({k: v for k, v in record.items() if k != key})
    runs = [{"seed": 1, "history": record["history"], "rotated_test": record["rotated_test"]}]
    report.check_seeds({"params": 1, "runs": runs})
    with pytest.raises(ValueError):
        report.check_seeds({"params": 1, "runs": [{k: v for k, v in runs[0].items() if k != "rotated_test"}]})
    with pytest.raises(ValueError):
        report.check_ablation({"params": 1, "variants": [{"name": "full recipe", "runs": runs}]})


def test_a_previous_record_without_epochs_is_treated_as_missing(finished_run, mnist_dir):
    record = json.loads((finished_run / "step4.json").read_text())
    for h in record["history"]:
        del h["epoch"]
    (finished_run / "step3.json").write_text(json.dumps({**record, "step": 3}))
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", finished_run)
    assert result.returncode == 0, result.stderr
    assert "step3.json could not be understood (history entry 1 has no int 'epoch')" in \
        (finished_run / "step4.log").read_text()


def test_a_seeds_record_without_rotated_counts_does_not_stop_an_ablation(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    assert run_step(4, *FAST, "--seeds", 4, "--data-dir", mnist_dir, "--log-dir", logs).returncode == 0
    record = json.loads((logs / "step4_seeds.json").read_text())
    for r in record["runs"]:
        del r["rotated_test"]
    (logs / "step4_seeds.json").write_text(json.dumps(record))
    result = run_step(4, *FAST, "--ablate", "--seeds", 4, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    assert "step4_seeds.json could not be understood" in (logs / "step4_ablation.log").read_text()


# 3. a folder where a file goes

def test_a_folder_where_the_record_goes_keeps_the_old_set_and_says_so(finished_run, mnist_dir):
    (finished_run / "step4.json").unlink()
    (finished_run / "step4.json").mkdir()
    before = snapshot(finished_run)
    result = run_step(4, *FAST, "--seed", 2, "--data-dir", mnist_dir, "--log-dir", finished_run)
    line = one_line(result.stderr)
    assert result.returncode == 1 and "step4.json is a folder" in line and "files are untouched" in line
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"step4.partial.log", "step4.partial.pt"}
    assert not [p for p in finished_run.iterdir() if p.name.endswith(".tmp")]


def test_a_killed_runs_hidden_files_are_cleaned_and_a_lost_file_put_back(finished_run, mnist_dir):
    log = finished_run / "step4.log"
    os.replace(log, finished_run / ".step4.log.99999.old.tmp")  # killed between two renames
    (finished_run / ".step4.pt.99999.staged.tmp").write_bytes(b"half")
    report.clean_stale(finished_run)
    assert log.exists() and not [p for p in finished_run.iterdir() if p.name.endswith(".tmp")]


# 4. a signal after the run is done

def test_a_signal_after_a_finished_run_cannot_interrupt_the_exit(mnist_dir, tmp_path, in_process):
    runner.main(STEP4, [*FAST, "--data-dir", str(mnist_dir), "--log-dir", str(tmp_path / "logs")])
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in runner.TERMINATING)
    # and the run's lock on the folder ended with it: a second run in this process may write there
    runner.main(STEP4, [*FAST, "--seed", "2", "--data-dir", str(mnist_dir), "--log-dir", str(tmp_path / "logs")])
    assert json.loads((tmp_path / "logs" / "step4.json").read_text())["seed"] == 2


# 5. names that are not UTF-8

@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="needs a UTF-8 file system encoding")
def test_log_and_data_folders_whose_names_are_not_utf8(tmp_path):
    cafe = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    data = make_mnist(os.path.join(cafe, "data"))
    result = run_step(4, *FAST, "--data-dir", data, "--log-dir", os.path.join(cafe, "logs"))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / os.fsdecode(b"caf\xe9") / "logs" / "step4.log").read_text()
    assert "caf\\udce9" in log or "caf\\xe9" in log


# 6. a worker that cannot load the data

def test_a_worker_that_cannot_load_the_data_is_the_runs_one_line(mnist_dir, tmp_path, in_process, monkeypatch, capsys):
    real = runner.load_data
    monkeypatch.setattr(runner, "load_data", lambda data_dir, *a, **k: real(mnist_dir, *a, **k))  # the parent's
    code = in_process(STEP4, *FAST, "--seeds", "1-2", "--jobs", 2, "--data-dir", tmp_path / "gone",
                      "--log-dir", tmp_path / "logs")
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "MNIST not found" in line and "unexpected" not in line


# 7. a full disk while the partial files are kept

def test_a_full_disk_names_what_was_saved(finished_run, mnist_dir, in_process, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    real_write = runner.write_file

    def write_file(path, data):
        if str(path).endswith(".partial.pt"):
            fail()
        real_write(path, data)
    monkeypatch.setattr(runner, "plot_misclassified", fail)
    monkeypatch.setattr(runner, "write_file", write_file)
    code = in_process(STEP4, *FAST, "--data-dir", mnist_dir, "--log-dir", finished_run)
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "trained weights could not be saved (No space left on device)" in line
    assert "step4.partial.log" in line and (finished_run / "step4.partial.log").exists()
    assert not (finished_run / "step4.partial.pt").exists()


def test_a_diverged_run_drops_an_older_partial_weights_file(mnist_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "step2.partial.pt").write_bytes(b"an older run's")
    result = run_step(2, "--epochs", 2, "--lr", "1e6", "--quiet", "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 1 and "diverged" in one_line(result.stderr)
    assert (logs / "step2.partial.log").exists() and not (logs / "step2.partial.pt").exists()


# 7b. a sweep stopped part-way

def stop_at_seed(monkeypatch, stop_seed):
    """Make the sweep's job for `stop_seed` fail, as a kill would stop it there."""
    real = runner.train_job

    def train_job(variant, Net, recipe, seed, data):
        if seed == stop_seed:
            raise RuntimeError("stopped")
        return real(variant, Net, recipe, seed, data)
    monkeypatch.setattr(runner, "train_job", train_job)


def test_a_stopped_sweep_keeps_its_finished_runs_and_the_same_command_resumes(mnist_dir, tmp_path, in_process,
                                                                            monkeypatch, capsys):
    sweep = [*FAST, "--seeds", "1-3", "--data-dir", mnist_dir]
    assert in_process(STEP4, *sweep, "--log-dir", tmp_path / "whole") == 0
    logs = tmp_path / "resumed"
    with monkeypatch.context() as m:
        stop_at_seed(m, 2)
        assert in_process(STEP4, *sweep, "--log-dir", logs) == 1
    line = one_line(capsys.readouterr().err)
    assert "step4_seeds.partial.json, which the same command resumes from" in line
    kept = json.loads((logs / "step4_seeds.partial.json").read_text())
    assert [r["seed"] for r in kept["runs"]] == [1] and not (logs / "step4_seeds.json").exists()
    assert in_process(STEP4, *sweep, "--log-dir", logs) == 0
    assert "1 of 3 runs taken from" in (logs / "step4_seeds.log").read_text()
    assert not (logs / "step4_seeds.partial.json").exists()
    resumed, whole = (json.loads((d / "step4_seeds.json").read_text())["runs"] for d in (logs, tmp_path / "whole"))
    assert resumed[0]["history"] == kept["runs"][0]["history"]  # taken, not trained again
    untimed = [[{k: v for k, v in h.items() if not k.endswith("seconds")} for h in r["history"]]
               for r in resumed + whole]
    assert untimed[:3] == untimed[3:] and [r["seed"] for r in resumed] == [1, 2, 3]


def test_a_stopped_sweeps_runs_of_another_model_are_not_taken(mnist_dir, tmp_path, in_process, monkeypatch):
    sweep = [*FAST, "--seeds", "1-2", "--data-dir", mnist_dir, "--log-dir", tmp_path]
    with monkeypatch.context() as m:
        stop_at_seed(m, 2)
        assert in_process(STEP4, *sweep) == 1
    partial = tmp_path / "step4_seeds.partial.json"
    partial.write_text(partial.read_text().replace('"model": "', '"model": "0'))
    assert in_process(STEP4, *sweep) == 0
    log = (tmp_path / "step4_seeds.log").read_text()
    assert "holds runs made with another model" in log and "taken from" not in log


def test_a_resumed_sweep_takes_only_its_own_seeds_and_says_what_it_replaced(mnist_dir, tmp_path, in_process,
                                                                           monkeypatch):
    with monkeypatch.context() as m:
        stop_at_seed(m, 3)
        assert in_process(STEP4, *FAST, "--seeds", "1-3", "--data-dir", mnist_dir, "--log-dir", tmp_path) == 1
    assert in_process(STEP4, *FAST, "--seeds", "2-3", "--data-dir", mnist_dir, "--log-dir", tmp_path) == 0
    log = (tmp_path / "step4_seeds.log").read_text()
    assert "holds 1 run of other seeds or recipes" in log and "1 of 2 runs taken from" in log
    assert [r["seed"] for r in json.loads((tmp_path / "step4_seeds.json").read_text())["runs"]] == [2, 3]


# 8-10. bad data and bad numbers

def test_unreadable_data_is_one_line_and_writes_nothing(mnist_dir, tmp_path, in_process, monkeypatch, capsys):
    def denied(path, *args):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(common, "_raw_file_problem", denied)
    code = in_process(STEP4, *FAST, "--data-dir", mnist_dir, "--log-dir", tmp_path / "logs")
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "cannot read" in line and "Permission denied" in line
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("lr", ["1e39", "inf", "1e400"])
def test_an_lr_the_optimizer_cannot_hold_is_a_usage_error(lr, mnist_dir, tmp_path):
    result = run_step(4, "--lr", lr, "--data-dir", mnist_dir, "--log-dir", tmp_path / "logs")
    assert result.returncode == 2 and "--lr" in result.stderr and not (tmp_path / "logs").exists()


def test_all_zero_training_images_are_named_as_bad_data(tmp_path):
    data = make_mnist(tmp_path / "data")
    write_idx(data / "MNIST" / "raw" / "train-images-idx3-ubyte", torch.zeros(256, 28, 28), 2051)
    result = run_step(4, *FAST, "--data-dir", data, "--log-dir", tmp_path / "logs")
    line = one_line(result.stderr)
    assert result.returncode == 1 and "std 0" in line and "diverged" not in line
    assert not (tmp_path / "logs").exists()


# smaller: FIFOs, and what importing a step changes

def test_a_fifo_is_refused_not_waited_on(finished_run, mnist_dir, tmp_path):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    result = run_step(4, "--eval", fifo, "--data-dir", mnist_dir)
    assert result.returncode == 1 and "cannot be read (not a regular file)" in one_line(result.stderr)
    os.mkfifo(finished_run / "step3.json")
    record, why = report.usable_record(finished_run / "step3.json", report.check_single)
    assert record is None and "could not be read" in why


def test_importing_a_step_leaves_the_importers_hooks_alone():
    code = ("import signal, sys; hook = sys.excepthook; before = signal.getsignal(signal.SIGINT); "
            "import step4; assert sys.excepthook is hook and signal.getsignal(signal.SIGINT) is before")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0



def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    ready = tmp_path / "ready"
    worker = f"import os, runner; open({str(ready)!r}, 'w').close(); runner._exit_with_parent(os.getppid())"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"print(subprocess.Popen([sys.executable, '-c', {worker!r}]).pid, flush=True); "
                               "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    assert ready.exists() and alive(pid)  # the worker waits while its parent lives
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(pid)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
