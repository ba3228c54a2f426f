import re
import subprocess
import sys

from conftest import ROOT


def run_bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_bench_prints_every_pipeline_with_its_speed_up(mnist_dir):
    proc = run_bench("--data-dir", mnist_dir, "--epochs", 1)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^(plain|ours).*?\s(\d+\.\d+)\s+(\d+\.\d+)x(.*)$", proc.stdout, re.M)
    assert len(rows) == 3 and rows[0][2] == "1.00"
    assert [bool(r[3]) for r in rows] == [False, True, False]  # ours in fp32


def test_bench_rejects_bad_input(tmp_path):
    assert run_bench("--epochs", 0).returncode == 2
    proc = run_bench("--data-dir", tmp_path / "nowhere")
    assert proc.returncode == 1 and "MNIST not found" in proc.stderr
