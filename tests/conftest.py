import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402
import runner  # noqa: E402
import step4  # noqa: E402



def write_idx(path, tensor, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    path.write_bytes(header + tensor.to(torch.uint8).numpy().tobytes())


def synthetic_split(n, generator):
    """Digits as a bright 6x6 square whose position encodes the label, over faint noise."""
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 28, 28, generator=generator) * 40).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        r, c = 4 + (y // 5) * 12, 2 + (y % 5) * 5
        images[i, r:r + 6, c:c + 6] = 255
    return images, labels


def make_mnist(root, n_train=256, n_test=128):
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = synthetic_split(n, g)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)
    return Path(root)


@pytest.fixture
def mnist_dir(tmp_path):
    """Small synthetic MNIST in the real file format: no network, no real data."""
    return make_mnist(tmp_path / "data")


def run_step(step, *args, cwd=ROOT, **kwargs):
    """Run a step script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / f"step{step}.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


FAST = ["--epochs", "1", "--quiet"]


@pytest.fixture
def finished_run(mnist_dir, tmp_path):
    """One finished 1-epoch run of step 4; returns its log folder."""
    logs = tmp_path / "logs"
    result = run_step(4, *FAST, "--data-dir", mnist_dir, "--log-dir", logs)
    assert result.returncode == 0, result.stderr
    return logs


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != report.LOCK_NAME}


@pytest.fixture
def in_process(monkeypatch):
    """Run a step's main() in this process (to inject faults); returns its exit status."""
    handlers = {s: signal.getsignal(s) for s in runner.TERMINATING}

    def run(step, *args):
        try:
            runner.main(step, [str(a) for a in args])
        except SystemExit as e:
            return e.code
        return 0  # main returned: the run finished
    yield run
    for s, h in handlers.items():
        signal.signal(s, h)


STEP4 = runner.Step(4, step4.Net, step4.RECIPE, step4.TARGET, step4.NEXT, step4.CHANGES)
