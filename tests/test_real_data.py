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
    return common.load_data(MNIST_DIR, torch.device("cpu"))


def test_real_mnist_shapes_and_statistics(data):
    assert data.stats["shape"] == [60000, 28, 28] and len(data.test_labels) == 10000
    assert data.norm == (0.1307, 0.3081)


@pytest.mark.parametrize("n", [n for n in range(1, 5) if (ROOT / f"logs/step{n}.pt").exists()])
def test_committed_weights_reproduce_the_recorded_count(data, n):
    record = json.loads((ROOT / f"logs/step{n}.json").read_text())
    step = __import__(f"step{n}")
    model = common.make_net(step.Net, step.RECIPE)
    model.load_state_dict(torch.load(ROOT / f"logs/step{n}.pt", weights_only=True))
    _, correct = common.evaluate(model, data.test_images, data.test_labels, data.norm)
    assert correct == record["history"][-1]["test_correct"]  # exact: counts, no tolerance
