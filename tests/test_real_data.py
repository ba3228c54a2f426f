"""Runs only where real MNIST is at hand (MNIST_DIR): the committed weights reproduce their records."""
import json
import os

import pytest
import torch

import common
from conftest import ROOT

MNIST_DIR = os.environ.get("MNIST_DIR")
pytestmark = pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to a folder holding MNIST/raw")


@pytest.fixture(scope="module")
def data():
    raw = common.load_mnist(MNIST_DIR)
    stats = common.data_stats(raw["train_images"], raw["train_labels"])
    return raw, stats


def test_real_mnist_shapes_and_statistics(data):
    raw, stats = data
    assert stats["shape"] == [60000, 28, 28] and len(raw["test_labels"]) == 10000
    assert stats["mean"] == pytest.approx(0.1307, abs=1e-4) and stats["std"] == pytest.approx(0.3081, abs=1e-4)


@pytest.mark.parametrize("n", [n for n in range(1, 5) if (ROOT / f"logs/step{n}.pt").exists()])
def test_committed_weights_reproduce_the_recorded_accuracy(data, n):
    raw, stats = data
    record = json.loads((ROOT / f"logs/step{n}.json").read_text())
    step = __import__(f"step{n}")
    model = common.make_net(step.Net, step.RECIPE)
    model.load_state_dict(torch.load(ROOT / f"logs/step{n}.pt", weights_only=True))
    x, y = common.to_device(raw["test_images"], raw["test_labels"], torch.device("cpu"))
    _, acc = common.evaluate(model, x, y, (stats["mean"], stats["std"]))
    assert acc == pytest.approx(record["summary"]["final_test_acc"], abs=0.015)
