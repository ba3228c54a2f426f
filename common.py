"""Everything the four steps share: data, batches, augmentation, the train and test loops,
model inspection, run records, the log writer and the rules that write the Analysis.

A step file holds its story (Target text, `Net`, `RECIPE`) and calls `main(...)` from here.
"""
import argparse
import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BAR = 99.40                # test accuracy (%) each of the last LAST_N epochs must reach
LAST_N = 3                 # how many final epochs the bar applies to
PARAM_BUDGET = 10_000      # parameters allowed from step 2 on
ROTATED_TEST_DEG = 15.0    # the rotated test copy: angles uniform in +-15 degrees...
ROTATED_TEST_SEED = 0      # ...drawn once from this seed, the same for every step
EVAL_BATCH = 256           # test-time batch: on the 2-core CPU 0.2 s a test pass, 1.0 s at 2,000
CHECK_EVERY = 50           # batches between checks for a non-finite loss (each check syncs a GPU)
MNIST_FILES = {  # raw file -> (magic number, trailing dims)
    "train-images-idx3-ubyte": (2051, (28, 28)),
    "train-labels-idx1-ubyte": (2049, ()),
    "t10k-images-idx3-ubyte": (2051, (28, 28)),
    "t10k-labels-idx1-ubyte": (2049, ()),
}


class UserError(Exception):
    """A problem the user can fix; reported as one line, never as a traceback."""


class Diverged(Exception):
    def __init__(self, batch, loss):
        super().__init__(f"loss became {loss} at batch {batch}")
        self.batch, self.loss = batch, loss


# ----------------------------------------------------------------------------- recipe

@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a step trains, as plain data, so it can be printed, compared and varied."""
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.01               # constant LR, or the peak LR of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"     # "constant" or "onecycle"
    max_rotation: float = 0.0      # degrees; each training image gets its own angle
    max_shift: float = 0.0         # pixels; each training image gets its own shift in x and y
    dropout: float | None = None   # passed to Net(dropout=...) when set
    precision: str = "auto"        # "bf16" autocast, "fp32", or "auto": see resolve_precision

    def describe(self):
        sched = "one-cycle (peak lr {:g})".format(self.lr) if self.schedule == "onecycle" \
            else "constant lr {:g}".format(self.lr)
        aug = [f"random rotation +-{self.max_rotation:g} deg"] * bool(self.max_rotation) \
            + [f"random shift +-{self.max_shift:g} px"] * bool(self.max_shift)
        rot = ", ".join(aug) or "no augmentation"
        drop = "" if self.dropout is None else f", dropout {self.dropout:g}"
        return (f"SGD momentum {self.momentum:g}, weight decay {self.weight_decay:g}, {sched}, "
                f"batch {self.batch_size}, {rot}{drop}, "
                f"{'bf16 autocast' if self.precision == 'bf16' else self.precision}")


def resolve_precision(precision, device):
    """"auto" is what measured faster for these small nets: bf16 autocast on CPU (oneDNN's bf16
    kernels), plain fp32 on CUDA (on an H100 the casts cost more than bf16 saves)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" else "fp32"


def make_net(Net, recipe):
    return Net() if recipe.dropout is None else Net(dropout=recipe.dropout)


def conv_block(c_in, c_out, kernel=3, padding=0, bn=True, dropout=0.0):
    """conv -> [BatchNorm] -> ReLU -> [Dropout] as one Sequential, so switching dropout off
    renames no weights; no conv bias where BatchNorm follows."""
    layers = [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _MaxPoolChannelsLast(torch.autograd.Function):
    """max_pool2d run on a channels-last copy, backward by the ordinary kernel with the same
    indices. Why: PyTorch's CPU max-pool is ~5x slower on NCHW than on channels-last maps
    (2.3 vs 0.4 ms for 128x16x24x24 here), and converting the whole model to channels-last
    measured slower overall. Values and gradients are bit-identical to F.max_pool2d."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, indices)
        ctx.pool_args = (kernel, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *ctx.pool_args, indices.contiguous())
        return grad_x, None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with a faster CPU path (see _MaxPoolChannelsLast); the same numbers."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices:
            return super().forward(x)
        pairs = [list(_pair(v)) for v in (self.kernel_size, self.stride, self.padding, self.dilation)]
        return _MaxPoolChannelsLast.apply(x, *pairs, self.ceil_mode)


# ----------------------------------------------------------------------------- data

def _check_raw_file(path, magic, dims):
    """Validate an idx file's header and size, so a cut or wrong file is named, not crashed on."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * (1 + len(dims)))
    if len(header) < 4 + 4 * (1 + len(dims)):
        return "is too short to hold an MNIST header"
    values = [int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header), 4)]
    if values[0] != magic:
        return f"has magic number {values[0]}, expected {magic}"
    if tuple(values[2:]) != dims:
        return f"holds images of {tuple(values[2:])}, expected {dims}"
    expected = len(header) + values[1] * math.prod(dims)
    if size != expected:
        return f"is {size:,} bytes, expected {expected:,} for {values[1]:,} items"
    return None


def load_mnist(data_dir, download=False):
    """MNIST as uint8 tensors: train/test images (N, 28, 28) and labels (N,).

    Reads `data_dir/MNIST/raw` through torchvision; downloads only when `download` is set.
    """
    from torchvision.datasets import MNIST
    root = Path(data_dir)
    raw = root / "MNIST" / "raw"
    missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
    if missing and download:
        import socket
        socket.setdefaulttimeout(15)  # no network should fail in seconds, not hang
        try:
            MNIST(root, train=True, download=True)
            MNIST(root, train=False, download=True)
        except Exception as e:
            raise UserError(f"could not download MNIST into {raw} ({type(e).__name__}); "
                            f"point --data-dir or MNIST_DIR at a folder holding MNIST/raw") from None
        missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
    if missing:
        raise UserError(f"MNIST not found: {raw / missing[0]} is missing; point --data-dir or "
                        f"MNIST_DIR at a folder holding MNIST/raw, or leave both unset to "
                        f"download into ./data")
    for name, (magic, dims) in MNIST_FILES.items():
        problem = _check_raw_file(raw / name, magic, dims)
        if problem:
            raise UserError(f"{raw / name} {problem}: it is corrupt; delete it and download "
                            f"MNIST again")
    train, test = MNIST(root, train=True), MNIST(root, train=False)
    for split, name in ((train, "train"), (test, "t10k")):
        if len(split.data) != len(split.targets) or int(split.targets.max()) > 9:
            raise UserError(f"{raw}/{name}-labels-idx1-ubyte does not match its images: it is "
                            f"corrupt; delete it and download MNIST again")
    return {"train_images": train.data, "train_labels": train.targets,
            "test_images": test.data, "test_labels": test.targets}


def data_stats(images, labels):
    """Measured, never typed in: the normalisation constants come from here."""
    x = images.float() / 255
    return {"shape": list(images.shape), "dtype": str(images.dtype).replace("torch.", ""),
            "mean": round(x.mean().item(), 4), "std": round(x.std().item(), 4),
            "min": round(x.min().item(), 4), "max": round(x.max().item(), 4),
            "class_counts": torch.bincount(labels, minlength=10).tolist()}


def to_device(images, labels, device):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1] on the device, kept there."""
    return images.to(device).unsqueeze(1).float().div_(255), labels.to(device)


def rotate(images, degrees, shifts=None):
    """Rotate each image (N, 1, H, W) by its own angle (and shift it by its own (dx, dy) pixels),
    all in one batched op; zeros fill in."""
    rad = degrees.to(images.device, images.dtype) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    if shifts is None:
        dx = dy = torch.zeros_like(rad)
    else:  # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
        dx, dy = (shifts.to(images.device, images.dtype) * 2 / images.shape[-1]).unbind(1)
    theta = torch.stack([torch.stack([cos, -sin, dx], 1),
                         torch.stack([sin, cos, dy], 1)], 1)            # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def uniform_symmetric(n, bound, generator):
    """n draws uniform in [-bound, bound] from a CPU generator: the same whatever the device."""
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


def draw_augmentation(n, batch_size, max_rotation, max_shift, generator):
    """One epoch's per-image angles (n,) and shifts (n, 2) or None, drawn batch by batch (shifts,
    then angles) so that the stream of random numbers does not depend on the device; they reach
    the device in one copy an epoch rather than one (a GPU sync) a batch."""
    angles, shifts = [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if max_shift:
            shifts.append(uniform_symmetric(2 * size, max_shift, generator).view(size, 2))
        angles.append(uniform_symmetric(size, max_rotation, generator))
    return torch.cat(angles), torch.cat(shifts) if max_shift else None


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- train / test

def train_epoch(model, optimizer, scheduler, images, labels, batch_size, generator, norm,
                max_rotation=0.0, precision="fp32", bar=None, max_shift=0.0):
    """One pass over shuffled batches. Returns {"loss", "acc", "lr"}; raises Diverged."""
    model.train()
    mean, std = norm
    n, device = len(images), images.device
    order = torch.randperm(n, generator=generator).to(device)
    augment = bool(max_rotation or max_shift)
    if augment:
        angles, shifts = draw_augmentation(n, batch_size, max_rotation, max_shift, generator)
        shifts = torch.zeros(n, 2) if shifts is None else shifts  # a zero shift moves nothing
        angles, shifts = angles.to(device), shifts.to(device)
    # each batch's summed loss, kept on the device: no sync a batch
    loss_sums = torch.zeros(math.ceil(n / batch_size), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    lr = optimizer.param_groups[0]["lr"]
    for batch, start in enumerate(range(0, n, batch_size)):
        idx = order[start:start + batch_size]
        x, y = images[idx], labels[idx]
        if augment:
            x = rotate(x, angles[start:start + batch_size], shifts[start:start + batch_size])
        with autocast(device, precision):
            out = model((x - mean) / std)
            loss = F.nll_loss(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        loss_sums[batch] = loss.detach() * len(idx)
        correct += (out.argmax(1) == y).sum()
        if (batch + 1) % CHECK_EVERY == 0 or batch + 1 == len(loss_sums):
            _check_finite(loss_sums[:batch + 1])
        if bar is not None:
            seen = min(start + batch_size, n)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sums[:batch + 1].sum().item() / seen:.4f}",
                            acc=f"{100 * correct.item() / seen:.2f}", refresh=False)
    return {"loss": loss_sums.sum().item() / n, "acc": 100 * correct.item() / n, "lr": lr}


def _check_finite(losses):
    """Raise Diverged naming the first batch (1-based) whose loss is not finite (a NaN or inf
    stays one when multiplied by the batch size)."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = int(bad[0])
        raise Diverged(first + 1, losses[first].item())


@torch.no_grad()
def predict(model, images, norm):
    """Log-probabilities (N, 10) for images (N, 1, 28, 28) in [0, 1]; always fp32, so a
    reported accuracy carries no rounding noise from bf16 (testing is a small share of time)."""
    model.eval()
    mean, std = norm
    return torch.cat([model((images[start:start + EVAL_BATCH] - mean) / std)
                      for start in range(0, len(images), EVAL_BATCH)])


def evaluate(model, images, labels, norm):
    """Returns (mean loss, accuracy in %)."""
    out = predict(model, images, norm)
    return (F.nll_loss(out, labels).item(),
            100 * (out.argmax(1) == labels).float().mean().item())


def rotated_copy(images):
    """The fixed rotated test set used to measure robustness (same angles for every step)."""
    g = torch.Generator().manual_seed(ROTATED_TEST_SEED)
    return rotate(images, uniform_symmetric(len(images), ROTATED_TEST_DEG, g))


def confusion_matrix(predicted, labels):
    """10x10 counts, rows = true digit, columns = predicted digit."""
    return torch.bincount(labels * 10 + predicted, minlength=100).view(10, 10).cpu()


def most_confused(matrix, k=5):
    off = matrix.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().topk(k)
    return [(int(i) // 10, int(i) % 10, int(v)) for v, i in zip(values, flat) if v > 0]


def make_optimizer(model, recipe, steps_per_epoch):
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = None
    if recipe.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch)
    elif recipe.schedule != "constant":
        raise ValueError(f"unknown schedule {recipe.schedule!r}")
    return optimizer, scheduler


# ----------------------------------------------------------------------------- model inspection

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def layer_table(model, input_shape=(1, 1, 28, 28)):
    """Per leaf layer in call order: name, output shape, parameters, receptive field.

    The receptive field follows r += (k - 1) * j, j *= stride; a global pool sees everything.
    """
    rows, hooks = [], []
    for name, module in model.named_modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: rows.append((name, m, tuple(i[0].shape), tuple(o.shape)))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    table, rf, jump = [], 1, 1
    for name, m, in_shape, out_shape in rows:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, d = (_pair(getattr(m, a, 1))[0] for a in ("kernel_size", "stride", "dilation"))
            rf += (k - 1) * d * jump
            jump *= s
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and len(in_shape) == 4:
            rf += (in_shape[-1] - 1) * jump
        table.append({"layer": f"{name} {type(m).__name__}", "output": list(out_shape[1:]),
                      "params": count_params(m), "rf": rf})
    return table


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def format_layer_table(table):
    lines = [f"{'layer':<28} {'output shape':<16} {'params':>8} {'RF':>4}"]
    for row in table:
        shape = "x".join(map(str, row["output"]))
        lines.append(f"{row['layer']:<28} {shape:<16} {row['params']:>8,} {row['rf']:>4}")
    lines.append(f"{'total':<28} {'':<16} {sum(r['params'] for r in table):>8,}")
    return lines


# ----------------------------------------------------------------------------- records and files

def write_atomic(path, data):
    """Write to a temporary file beside `path`, then rename: a crash leaves old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path):
    """A run record, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def summarize(history):
    """The Result numbers of one run, from its per-epoch history."""
    test = [h["test_acc"] for h in history]
    train = [h["train_acc"] for h in history]
    last = test[-LAST_N:]
    return {
        "epochs": len(history),
        "best_train_acc": max(train), "best_train_epoch": train.index(max(train)) + 1,
        "final_train_acc": train[-1],
        "best_test_acc": max(test), "best_test_epoch": test.index(max(test)) + 1,
        "final_test_acc": test[-1],
        "last_test_accs": last,
        "last_min": min(last), "last_spread": max(last) - min(last),
        "held_bar": len(history) <= 15 and len(last) == LAST_N and min(last) >= BAR,
        "gap": train[-1] - test[-1],
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
    }


def seed_summary(runs):
    finals = torch.tensor([r["summary"]["final_test_acc"] for r in runs], dtype=torch.float64)
    return {"seeds": [r["seed"] for r in runs],
            "held": sum(r["summary"]["held_bar"] for r in runs), "runs": len(runs),
            "worst_last": min(r["summary"]["last_min"] for r in runs),
            "final_mean": finals.mean().item(),
            "final_std": finals.std().item() if len(runs) > 1 else 0.0}


# ----------------------------------------------------------------------------- the Analysis rules

def fit_sentence(s, regularised):
    gap, train = s["gap"], s["final_train_acc"]
    if gap >= 0.5:
        return (f"Overfitting: the final train accuracy ({train:.2f}) is {gap:.2f} points above "
                f"test ({s['final_test_acc']:.2f}); the model memorises more than it generalises.")
    if gap >= 0.15:
        return f"Slight overfitting: train is {gap:.2f} points above test at the end."
    if train < 99.0 and not regularised:
        return (f"Underfitting: train accuracy ends at only {train:.2f} and test is within "
                f"{abs(gap):.2f} of it; the model has not learnt the training set.")
    if gap < 0:
        return (f"No overfitting: test ends {-gap:.2f} points above train, whose accuracy is "
                f"measured on {'augmented/dropped-out' if regularised else 'changing'} batches "
                f"while the weights still move.")
    return f"No overfitting: train and test end within {gap:.2f} points of each other."


def bar_sentence(s, history):
    last = " / ".join(f"{a:.2f}" for a in s["last_test_accs"])
    if s["held_bar"]:
        return (f"Bar met: each of the last {LAST_N} epochs is >= {BAR:.2f} ({last}), "
                f"lowest {s['last_min']:.2f}.")
    first = next((h["epoch"] for h in history if h["test_acc"] >= BAR), None)
    if first is None:
        return (f"Bar missed: test accuracy never reaches {BAR:.2f}; best {s['best_test_acc']:.2f} "
                f"is {BAR - s['best_test_acc']:.2f} short.")
    misses = sum(a < BAR for a in s["last_test_accs"])
    return (f"Bar missed: {BAR:.2f} is first reached at epoch {first} but {misses} of the last "
            f"{LAST_N} epochs fall below it ({last}).")


def stability_sentence(s):
    spread = s["last_spread"]
    word = "settled" if spread <= 0.10 else "still moving" if spread <= 0.25 else "noisy"
    return f"Over the last {LAST_N} epochs test accuracy spans {spread:.2f} points: {word}."


def previous_sentences(s, params, prev):
    if prev is None:
        return ["No previous record to compare with."]
    p = prev["summary"]
    out = [f"Against step {prev['step']}: parameters {prev['params']:,} -> {params:,}; "
           f"best test {p['best_test_acc']:.2f} -> {s['best_test_acc']:.2f} "
           f"({s['best_test_acc'] - p['best_test_acc']:+.2f}); final gap {p['gap']:.2f} -> "
           f"{s['gap']:.2f}; seconds per epoch {p['seconds_per_epoch']:.1f} -> "
           f"{s['seconds_per_epoch']:.1f}."]
    return out


def rotated_sentence(step, rotated, prev_rotated):
    if rotated is None:
        return []
    text = f"On the rotated test copy (+-{ROTATED_TEST_DEG:g} deg, seed {ROTATED_TEST_SEED}) this step scores {rotated:.2f}"
    if prev_rotated is None:
        return [text + "."]
    diff = rotated - prev_rotated
    verdict = "more robust to rotation" if diff > 0.1 else "less robust to rotation" \
        if diff < -0.1 else "about as robust to rotation"
    return [text + f" against {prev_rotated:.2f} for step {step - 1}'s weights ({diff:+.2f}): "
                   f"{verdict} than the previous step."]


def seeds_sentence(seeds):
    if seeds is None:
        return []
    sm = seeds["summary"]
    held = "all" if sm["held"] == sm["runs"] else f"{sm['held']} of"
    return [f"Across {sm['runs']} seeds ({', '.join(map(str, sm['seeds']))}) {held} "
            f"{sm['runs']} held the bar in each of their last {LAST_N} epochs; worst last-{LAST_N} "
            f"value {sm['worst_last']:.2f}; final accuracy {sm['final_mean']:.2f} +- "
            f"{sm['final_std']:.2f} (mean +- std)."]


def ablation_sentences(ablation, seeds):
    if ablation is None:
        return []
    variants = ablation["variants"]
    full = variants[0]["summary"]
    noise = seeds["summary"]["final_std"] if seeds else None
    out = [f"Ablation (one seed per variant, seed {ablation['seed']}): the full recipe ends at "
           f"{full['final_test_acc']:.2f}, lowest of last {LAST_N} {full['last_min']:.2f}."]
    for v in variants[1:]:
        s = v["summary"]
        diff = full["final_test_acc"] - s["final_test_acc"]
        low = full["last_min"] - s["last_min"]
        if noise is None:
            judged = "no seed spread measured, so no difference is called a gain"
        elif max(abs(diff), abs(low)) <= noise:
            judged = f"within the seed spread ({noise:.2f}): not called a gain"
        elif diff > 0 or low > 0:
            judged = f"beyond the seed spread ({noise:.2f}): this change earns its place"
        else:
            judged = f"beyond the seed spread ({noise:.2f}), and the variant without it did better"
        rot = f", rotated copy {v['rotated_test_acc']:.2f} vs {variants[0]['rotated_test_acc']:.2f}" \
            if v.get("rotated_test_acc") is not None else ""
        out.append(f"Without {v['name']} ({v['reverted']}): final {s['final_test_acc']:.2f} "
                   f"({-diff:+.2f}), lowest of last {LAST_N} {s['last_min']:.2f} ({-low:+.2f}), "
                   f"last-{LAST_N} spread {s['last_spread']:.2f} (full {full['last_spread']:.2f}){rot}; {judged}.")
    return out


def next_sentence(s, params, facts):
    if params >= PARAM_BUDGET:
        return (f"Next: cut the parameters from {params:,} to under {PARAM_BUDGET:,} (fewer "
                f"channels, global average pooling instead of the big output kernel).")
    if s["held_bar"]:
        todo = [what for what, done in (("that it holds across seeds (--seeds)", facts.get("seeds")),
                                        ("which change earned it (--ablate)", facts.get("ablation")))
                if not done]
        return ("Next: the bar is met; check " + " and ".join(todo) + "." if todo else
                "Next: the bar is met and holds across the seeds above; what is left is trimming "
                "parameters towards the 8,000 stretch, which our scratch runs did not hold.")
    if not facts["batchnorm"]:
        return ("Next: normalise activations with BatchNorm so the small net trains faster and "
                "further, and regularise if it then overfits.")
    if not facts["max_rotation"]:
        return ("Next: the capacity is fixed by the budget, so feed it harder data (random "
                "rotation) and let an LR schedule settle the last epochs.")
    return "Next: the bar is not held; try a longer or smoother schedule, or more capacity."


def analyze(step, history, params, facts, prev=None, rotated=None, prev_rotated=None,
            seeds=None, ablation=None):
    """The Analysis: every sentence is derived from the numbers passed in."""
    s = summarize(history)
    budget = (f"{params:,} parameters: {'within' if params < PARAM_BUDGET else 'over'} the "
              f"{PARAM_BUDGET:,} budget ({100 * params / PARAM_BUDGET:.0f}% of it).")
    regularised = bool(facts["max_rotation"] or facts["dropout"])
    return ([budget, fit_sentence(s, regularised), bar_sentence(s, history), stability_sentence(s)]
            + previous_sentences(s, params, prev) + rotated_sentence(step, rotated, prev_rotated)
            + seeds_sentence(seeds) + ablation_sentences(ablation, seeds)
            + [next_sentence(s, params, dict(facts, seeds=seeds is not None, ablation=ablation is not None))])


def previous_line(step, prev, log_dir):
    if step == 1:
        return "This is the first step: nothing measured yet."
    if prev is None:
        return (f"The previous record {Path(log_dir) / f'step{step - 1}.json'} was not found or "
                f"could not be read (run step{step - 1}.py first); the reasons below stand without its numbers.")
    p = prev["summary"]
    return (f"Step {step - 1} measured: {prev['params']:,} parameters, best train "
            f"{p['best_train_acc']:.2f}, best test {p['best_test_acc']:.2f}, final gap "
            f"{p['gap']:.2f}, last {LAST_N} test {' / '.join(f'{a:.2f}' for a in p['last_test_accs'])}, "
            f"{p['seconds_per_epoch']:.1f} s per epoch.")


def result_lines(s, params, wall, rotated, prev_rotated):
    lines = [f"Parameters: {params:,}",
             f"Best train accuracy: {s['best_train_acc']:.2f} (epoch {s['best_train_epoch']}); final {s['final_train_acc']:.2f}",
             f"Best test accuracy: {s['best_test_acc']:.2f} (epoch {s['best_test_epoch']}); final {s['final_test_acc']:.2f}",
             f"Last {LAST_N} test accuracies: {' / '.join(f'{a:.2f}' for a in s['last_test_accs'])}",
             f"Train-test gap (final epoch): {s['gap']:+.2f}",
             f"Seconds per epoch: {s['seconds_per_epoch']:.1f}; total wall time {wall:.0f} s"]
    if rotated is not None:
        prev = f" (previous step's weights: {prev_rotated:.2f})" if prev_rotated is not None else ""
        lines.append(f"Rotated test copy accuracy: {rotated:.2f}{prev}")
    return lines


def format_block(target, result, analysis):
    out = ["", "=" * 78, "TARGET"]
    out += [f"  {line}" for line in target]
    out += ["RESULT"] + [f"  {i}. {line}" for i, line in enumerate(result, 1)]
    out += ["ANALYSIS"] + [f"  {i}. {line}" for i, line in enumerate(analysis, 1)]
    return out + ["=" * 78]


# ----------------------------------------------------------------------------- command line

def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_args(step, recipe, argv=None):
    parser = argparse.ArgumentParser(
        prog=f"step{step}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Step {step} of the MNIST drill-down: train {recipe.epochs} epochs, write "
                    f"logs/step{step}.log, .json and .pt, ending in a Target / Result / Analysis block.")
    parser.add_argument("--epochs", type=_positive(int), default=recipe.epochs, help="epochs to train")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DIR"),
                        help="folder holding MNIST/raw (also: MNIST_DIR); unset: download into ./data")
    parser.add_argument("--log-dir", default="logs", help="where the log, record, weights and pictures go")
    parser.add_argument("--seed", type=int, default=1, help="seeds weights, shuffling and augmentation")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--lr", type=_positive(float), default=recipe.lr,
                        help="learning rate (the peak for a one-cycle schedule)")
    parser.add_argument("--batch-size", type=_positive(int), default=recipe.batch_size, help="training batch size")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=recipe.precision,
                        help="training arithmetic: bf16 autocast, fp32, or auto (bf16 on CPU, fp32 on CUDA); "
                             "testing is always fp32")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars and no per-epoch lines on the terminal; the log is the same")
    parser.add_argument("--eval", metavar="WEIGHTS", help="evaluate saved weights (e.g. logs/stepN.pt) on the test set and exit")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="train once per seed; writes stepN_seeds.log/.json instead of stepN.*")
    parser.add_argument("--ablate", action="store_true",
                        help="train the recipe and one variant per declared change reverted; writes stepN_ablation.*")
    args = parser.parse_args(argv)
    if args.device != "auto" and device_problem(args.device):
        parser.error(f"argument --device: {device_problem(args.device)}")
    if args.seeds and args.ablate:
        parser.error("--seeds and --ablate are separate runs; pass one of them")
    return args


def device_problem(name):
    """Why `name` (cpu, cuda, cuda:N) cannot be used here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"unknown device {name!r}; use auto, cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"{name!r} is not supported; use auto, cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --device cpu"
    return None


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_log_dir(log_dir):
    """Fail before any training if the log folder cannot take our files."""
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--log-dir {path} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write to --log-dir {path} ({e.strerror}); pass a folder you can write to") from None
    return path


# ----------------------------------------------------------------------------- pictures

def _save_figure(fig, path):
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history, title, path):
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    acc.plot(epochs, [h["test_acc"] for h in history], "o-", label="test")
    acc.axhline(BAR, color="grey", ls="--", lw=1, label=f"{BAR:.2f}")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title=title, ylim=(max(90, acc.get_ylim()[0]), 100))
    loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    acc.legend(), loss.legend()
    _save_figure(fig, path)


def plot_misclassified(images, labels, predicted, path, limit=40):
    plt = _pyplot()
    wrong = (predicted != labels).nonzero().flatten()[:limit].cpu()
    cols = 10
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i, 0].float().cpu(), cmap="gray_r")
        ax.set_title(f"{labels[i].item()} as {predicted[i].item()}", fontsize=8)
    _save_figure(fig, path)


def plot_steps(log_dir):
    """Test accuracy per epoch of every step whose record is in log_dir."""
    records = [r for r in (read_record(Path(log_dir) / f"step{n}.json") for n in range(1, 5)) if r]
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        ax.plot([h["epoch"] for h in r["history"]], [h["test_acc"] for h in r["history"]], "o-",
                ms=3, label=f"step {r['step']} ({r['params']:,} params)")
    ax.axhline(BAR, color="grey", ls="--", lw=1, label=f"{BAR:.2f} bar")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(97.5, 100), title="MNIST drill-down: test accuracy per epoch")
    ax.legend(loc="lower right")
    path = Path(log_dir) / "steps_test_accuracy.png"
    _save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------- running a step

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def prepare_data(args, device):
    """The dataset on the device, its measured statistics, and the log lines that describe it."""
    data_dir = args.data_dir or "data"
    t0 = time.perf_counter()
    raw = load_mnist(data_dir, download=args.data_dir is None)
    stats = data_stats(raw["train_images"], raw["train_labels"])
    train_x, train_y = to_device(raw["train_images"], raw["train_labels"], device)
    test_x, test_y = to_device(raw["test_images"], raw["test_labels"], device)
    lines = [f"data: {Path(data_dir).resolve()} ({time.perf_counter() - t0:.1f} s to load)",
             f"  train {stats['shape']} {stats['dtype']}, test {list(raw['test_images'].shape)}; "
             f"pixel mean {stats['mean']:.4f} std {stats['std']:.4f} (used to normalise), "
             f"min {stats['min']:.1f} max {stats['max']:.1f}",
             f"  train class counts 0-9: {stats['class_counts']}"]
    return {"train": (train_x, train_y), "test": (test_x, test_y), "norm": (stats["mean"], stats["std"]),
            "stats": stats, "lines": lines}


def train(Net, recipe, data, device, seed, say, bars=False, label=""):
    """Train one model from scratch. Returns (model, history); raises Diverged with .epoch set."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # shuffling and angles, device-independent
    model = make_net(Net, recipe).to(device)
    train_x, train_y = data["train"]
    steps = math.ceil(len(train_x) / recipe.batch_size)
    optimizer, scheduler = make_optimizer(model, recipe, steps)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        bar = None
        if bars:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"{label}epoch {epoch}/{recipe.epochs}", leave=False)
        try:
            stats = train_epoch(model, optimizer, scheduler, train_x, train_y, recipe.batch_size,
                                generator, data["norm"], recipe.max_rotation, recipe.precision, bar,
                                recipe.max_shift)
        except Diverged as e:
            e.epoch = epoch
            raise
        finally:
            if bar is not None:
                bar.close()
        trained = time.perf_counter()
        test_loss, test_acc = evaluate(model, *data["test"], data["norm"])
        done = time.perf_counter()
        history.append({"epoch": epoch, "train_loss": stats["loss"], "train_acc": stats["acc"],
                        "test_loss": test_loss, "test_acc": test_acc, "lr": stats["lr"],
                        "train_seconds": trained - start, "seconds": done - start})
        say(f"{label}epoch {epoch:2d}/{recipe.epochs} | train loss {stats['loss']:.4f} acc "
            f"{stats['acc']:6.2f} | test loss {test_loss:.4f} acc {test_acc:6.2f} | lr "
            f"{stats['lr']:.4f} | {done - start:5.1f} s")
    return model, history


def header_lines(step, mode, args, recipe, device):
    return [f"step {step} ({mode}) - {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
            f"seed {args.seed}, device {device}, {torch.get_num_threads()} CPU threads, torch "
            f"{torch.__version__}, torchvision {_torchvision_version()}, python {platform.python_version()}",
            f"recipe: {recipe.describe()}, {recipe.epochs} epochs",
            f"machine: {cpu_name()}, {os.cpu_count()} cores"]


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torchvision_version():
    import torchvision
    return torchvision.__version__


def model_facts(model, recipe):
    return {"batchnorm": any(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
            "dropout": any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()),
            "max_rotation": recipe.max_rotation, "schedule": recipe.schedule}


def previous_step(step, log_dir, device, data):
    """Record of step-1 and its weights' accuracy on the rotated test copy (None when missing)."""
    if step == 1:
        return None, None
    prev = read_record(Path(log_dir) / f"step{step - 1}.json")
    try:
        module = importlib.import_module(f"step{step - 1}")
        model = make_net(module.Net, module.RECIPE).to(device)
        state = torch.load(Path(log_dir) / f"step{step - 1}.pt", map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception:
        return prev, None
    rotated = evaluate(model, data["rotated"], data["test"][1], data["norm"])[1]
    return prev, rotated


def matching_record(path, recipe, params):
    """A seeds/ablation record, only if it was made with this very recipe and model size."""
    record = read_record(path)
    if record and record.get("recipe") == dataclasses.asdict(recipe) and record.get("params") == params:
        return record
    return None


def run_single(step, Net, recipe, target, args, data, device, log_dir, say, lines, started):
    data["rotated"] = rotated_copy(data["test"][0])
    model = make_net(Net, recipe).to(device)
    params, layers = count_params(model), layer_table(model)
    say("")
    for line in format_layer_table(layers):
        say(line)
    say("")
    model, history = train(Net, recipe, data, device, args.seed, say, bars=args.bars)
    test_x, test_y = data["test"]
    predicted = predict(model, test_x, data["norm"]).argmax(1)
    matrix = confusion_matrix(predicted, test_y)
    say("")
    for line in format_confusion(matrix):
        say(line)
    rotated = evaluate(model, data["rotated"], test_y, data["norm"])[1]
    prev, prev_rotated = previous_step(step, log_dir, device, data)
    seeds = matching_record(log_dir / f"step{step}_seeds.json", recipe, params)
    ablation = matching_record(log_dir / f"step{step}_ablation.json", recipe, params)
    summary = summarize(history)
    wall = time.perf_counter() - started
    block = {"target": [previous_line(step, prev, log_dir)] + target.strip().splitlines(),
             "result": result_lines(summary, params, wall, rotated, prev_rotated),
             "analysis": analyze(step, history, params, model_facts(model, recipe), prev, rotated,
                                 prev_rotated, seeds, ablation)}
    weights = _state_bytes(model)
    sha = hashlib.sha256(weights).hexdigest()
    say(f"weights: {log_dir / f'step{step}.pt'} sha256 {sha}")
    for line in format_block(**block):
        say(line, always=True)
    record = {"step": step, "mode": "single", "seed": args.seed, "device": str(device),
              "command": sys.argv, "torch": torch.__version__, "recipe": dataclasses.asdict(recipe),
              "params": params, "data": data["stats"], "layers": layers,
              "history": history, "summary": summary, "wall_seconds": wall,
              "rotated_test_acc": rotated, "previous_rotated_test_acc": prev_rotated,
              "confusion_matrix": matrix.tolist(), "weights_sha256": sha, "block": block}
    write_atomic(log_dir / f"step{step}.pt", weights)
    write_atomic(log_dir / f"step{step}.json", json.dumps(record, indent=1))
    write_atomic(log_dir / f"step{step}.log", "\n".join(lines) + "\n")
    plot_curves(history, f"step {step}", log_dir / f"step{step}_curves.png")
    plot_misclassified(test_x, test_y, predicted, log_dir / f"step{step}_misclassified.png")
    plot_steps(log_dir)


def _state_bytes(model):
    import io
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def format_confusion(matrix):
    lines = ["confusion matrix of the final test pass (rows: true digit, columns: predicted)",
             "     " + "".join(f"{c:>6}" for c in range(10))]
    lines += [f"{r:>5}" + "".join(f"{v:>6}" for v in matrix[r].tolist()) for r in range(10)]
    pairs = ", ".join(f"{t} as {p}: {n}" for t, p, n in most_confused(matrix))
    return lines + [f"most confused (true as predicted): {pairs or 'none'}"]


def ablation_variants(recipe, previous, changes):
    """[(name, reverted text, recipe)]: the full recipe, then one variant per declared change
    with exactly that change's fields set back to the previous step's values."""
    variants = [("full recipe", "nothing", recipe)]
    for name, fields in changes.items():
        reverted = {f: getattr(previous, f) for f in fields}
        text = ", ".join(f"{f} {getattr(recipe, f)} -> {v}" for f, v in reverted.items())
        variants.append((name, text, dataclasses.replace(recipe, **reverted)))
    return variants


def run_seeds(step, Net, recipe, args, data, device, log_dir, say, lines, started):
    params = count_params(make_net(Net, recipe))
    runs = []
    for seed in args.seeds:
        say(f"\n--- seed {seed}")
        _, history = train(Net, recipe, data, device, seed, say, bars=args.bars, label=f"seed {seed} ")
        runs.append({"seed": seed, "history": history, "summary": summarize(history)})
    summary = seed_summary(runs)
    say("")
    say(f"{'seed':>5} {'last ' + str(LAST_N) + ' test accuracies':<28} {'final':>6} {'best':>6} {'held':>5}")
    for r in runs:
        s = r["summary"]
        say(f"{r['seed']:>5} {' / '.join(f'{a:.2f}' for a in s['last_test_accs']):<28} "
            f"{s['final_test_acc']:>6.2f} {s['best_test_acc']:>6.2f} {'yes' if s['held_bar'] else 'NO':>5}")
    say(f"held the bar: {summary['held']} of {summary['runs']} seeds; worst last-{LAST_N} value "
        f"{summary['worst_last']:.2f}; final {summary['final_mean']:.2f} +- {summary['final_std']:.2f} "
        f"(mean +- std); {params:,} parameters; {time.perf_counter() - started:.0f} s", always=True)
    record = {"step": step, "mode": "seeds", "device": str(device), "command": sys.argv,
              "recipe": dataclasses.asdict(recipe), "params": params, "runs": runs,
              "summary": summary, "wall_seconds": time.perf_counter() - started}
    write_atomic(log_dir / f"step{step}_seeds.json", json.dumps(record, indent=1))
    write_atomic(log_dir / f"step{step}_seeds.log", "\n".join(lines) + "\n")


def run_ablation(step, Net, recipe, changes, args, data, device, log_dir, say, lines, started):
    previous = importlib.import_module(f"step{step - 1}").RECIPE
    variants = ablation_variants(recipe, previous, changes)
    data["rotated"] = rotated_copy(data["test"][0])
    results = []
    for name, reverted, variant in variants:
        say(f"\n--- {name}: reverted {reverted}; {variant.describe()}")
        model, history = train(Net, variant, data, device, args.seed, say, bars=args.bars, label=f"[{name}] ")
        rotated = evaluate(model, data["rotated"], data["test"][1], data["norm"])[1]
        results.append({"name": name, "reverted": reverted, "recipe": dataclasses.asdict(variant),
                        "history": history, "summary": summarize(history), "rotated_test_acc": rotated})
    say("")
    say(f"{'variant':<22} {'final':>6} {'best':>6} {'low last ' + str(LAST_N):>11} {'gap':>6} {'rotated':>8}  reverted")
    for r in results:
        s = r["summary"]
        say(f"{r['name']:<22} {s['final_test_acc']:>6.2f} {s['best_test_acc']:>6.2f} {s['last_min']:>11.2f} "
            f"{s['gap']:>+6.2f} {r['rotated_test_acc']:>8.2f}  {r['reverted']}", always=True)
    record = {"step": step, "mode": "ablation", "seed": args.seed, "device": str(device),
              "command": sys.argv, "recipe": dataclasses.asdict(recipe),
              "params": count_params(make_net(Net, recipe)), "variants": results,
              "wall_seconds": time.perf_counter() - started}
    write_atomic(log_dir / f"step{step}_ablation.json", json.dumps(record, indent=1))
    write_atomic(log_dir / f"step{step}_ablation.log", "\n".join(lines) + "\n")


def run_eval(step, Net, recipe, args, device, say):
    path = Path(args.eval)
    model = make_net(Net, recipe).to(device)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a weights file such as logs/step{step}.pt") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}); re-run "
                        f"step{step}.py to write it again") from None
    try:
        model.load_state_dict(state)
    except Exception:
        raise UserError(f"{path} does not hold weights for step {step}'s Net (names or shapes "
                        f"differ); pass the stepN.pt written by step{step}.py") from None
    data = prepare_data(args, device)
    for line in data["lines"]:
        say(line)
    test_x, test_y = data["test"]
    loss, acc = evaluate(model, test_x, test_y, data["norm"])
    predicted = predict(model, test_x, data["norm"]).argmax(1)
    for line in format_confusion(confusion_matrix(predicted, test_y)):
        say(line, always=True)
    record = read_record(path.with_suffix(".json"))
    known = ""
    if record and "summary" in record:
        final = record["summary"]["final_test_acc"]
        known = f"; its record {path.with_suffix('.json')} says {final:.2f} ({'matches' if abs(final - acc) < 0.005 else 'differs'})"
    say(f"{path}: test accuracy {acc:.2f}, loss {loss:.4f}, {count_params(model):,} parameters{known}", always=True)


def main(step, Net, recipe, target, changes=None, argv=None):
    """Parse flags, then run one mode. Exits 2 on bad flags, 1 on bad input or divergence, 130
    when interrupted; finished files are only ever replaced whole."""
    args = parse_args(step, recipe, argv)
    started = time.perf_counter()
    recipe = dataclasses.replace(recipe, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    args.bars = not args.quiet and sys.stdout.isatty()
    lines = []

    def say(line, always=False):
        lines.append(line)
        if always or not args.quiet:
            print(line, flush=True)

    mode = "eval" if args.eval else "seeds" if args.seeds else "ablation" if args.ablate else "single"
    name = {"single": f"step{step}", "seeds": f"step{step}_seeds", "ablation": f"step{step}_ablation"}.get(mode)
    prog = f"step{step}.py"
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (a background job)
    log_dir = None
    try:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_flush_denormal(True)  # tiny activations early in training cost 10x on CPU
        device = pick_device(args.device)
        recipe = dataclasses.replace(recipe, precision=resolve_precision(args.precision, device))
        if mode == "eval":
            return run_eval(step, Net, recipe, args, device, say)
        if mode == "ablation" and (not changes or step == 1):
            raise UserError(f"step {step} declares no changes against a previous step; nothing to ablate")
        log_dir = check_log_dir(args.log_dir)
        data = prepare_data(args, device)  # before any output: a data error is then the only line
        for line in header_lines(step, mode, args, recipe, device) + data["lines"]:
            say(line)
        if mode == "seeds":
            run_seeds(step, Net, recipe, args, data, device, log_dir, say, lines, started)
        elif mode == "ablation":
            run_ablation(step, Net, recipe, changes, args, data, device, log_dir, say, lines, started)
        else:
            run_single(step, Net, recipe, target, args, data, device, log_dir, say, lines, started)
        (log_dir / f"{name}.partial.log").unlink(missing_ok=True)  # an earlier unfinished run's, now replaced
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Diverged as e:
        kept = _keep_partial(log_dir, name, lines, f"diverged: epoch {e.epoch}, batch {e.batch}, loss {e.loss}")
        print(f"{prog}: error: training diverged at epoch {e.epoch}, batch {e.batch} (loss {e.loss}); "
              f"try a lower --lr than {recipe.lr:g}. {kept}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        kept = _keep_partial(log_dir, name, lines, "interrupted")
        print(f"\n{prog}: interrupted. {kept}", file=sys.stderr)
        sys.exit(130)


def _keep_partial(log_dir, name, lines, why):
    """Keep what an unfinished run wrote under a separate name; finished files stay untouched."""
    if log_dir is None or not lines:
        return "Nothing was written."
    path = Path(log_dir) / f"{name}.partial.log"
    try:
        write_atomic(path, "\n".join(lines + [f"[run stopped: {why}]"]) + "\n")
    except OSError:
        return f"The previous {name}.* files are untouched; the partial log could not be written."
    return f"The previous {Path(log_dir) / name}.* files are untouched; this run so far is in {path}."
