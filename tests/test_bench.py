import re
import subprocess
import sys

import torch

import bench
import common
import step4
from conftest import ROOT


def run_bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_stock_pool_swap_keeps_the_model_and_its_numbers():
    torch.manual_seed(0)
    model = step4.Net()
    x = torch.rand(8, 1, 28, 28)
    before = model(x)
    stock = bench.with_stock_pool(model)
    assert not any(isinstance(m, common.MaxPool2d) for m in stock.modules())
    assert any(type(m) is torch.nn.MaxPool2d for m in stock.modules())
    assert torch.equal(stock(x), before)


def test_bench_prints_every_pipeline_with_its_speed_up(mnist_dir):
    proc = run_bench("--data-dir", mnist_dir, "--epochs", 1)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^(plain|ours).*?\s(\d+\.\d+)\s+(\d+\.\d+)x(.*)$", proc.stdout, re.M)
    assert len(rows) == 4 and rows[0][2] == "1.00"
    assert [bool(r[3]) for r in rows] == [False, False, True, False]  # fp32 and our max-pool


def test_bench_rejects_bad_input(tmp_path):
    assert run_bench("--epochs", 0).returncode == 2
    proc = run_bench("--data-dir", tmp_path / "nowhere")
    assert proc.returncode == 1 and "MNIST not found" in proc.stderr
