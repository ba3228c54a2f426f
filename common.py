"""What the four steps share. First the ML core, in the order a run uses it: settings, recipe,
model pieces, data, batches, train, evaluate. Below the REPORTING banner: records, the Analysis
rules, pictures, files, the command line and the run modes.

A step file holds its story (Target, `Net`, `RECIPE`, what comes next) and calls
`main(Step(...))`; importing a step trains nothing.
"""
import os
import signal
import sys

NOT_STARTED = "\ninterrupted before the run started; nothing was written.\n"


def _quit_during_imports(signum, frame):
    """Ctrl-C while torch imports (seconds): quit at once. Raising KeyboardInterrupt there is not
    safe: torch catches a failed numpy import and goes on with a half-imported numpy."""
    os.write(2, NOT_STARTED.encode())
    os._exit(128 + signum)


def _one_line_interrupt(kind, value, tb):
    """Ctrl-C after the imports but before main() takes over is one line, not a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write(NOT_STARTED)
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = _one_line_interrupt
_handler_before_imports = signal.signal(signal.SIGINT, _quit_during_imports)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

signal.signal(signal.SIGINT, _handler_before_imports)  # the imports are done

# ----------------------------------------------------------------------------- settings
BAR_PER_10K = 9_940        # the bar as a count: correct test images per 10,000 (99.40%)
BAR = BAR_PER_10K / 100    # the same bar in percent, for printing and plots only
LAST_N = 3                 # the bar applies to each of the last LAST_N epochs...
MAX_EPOCHS = 15            # ...within the assignment's 15 epochs
SEED_MARGIN = 99.50        # mean lowest-of-last-N over seeds at which misses become rare (issue 11)
PARAM_BUDGET = 10_000      # parameters allowed from step 2 on
ROTATED_TEST_DEG = 15.0    # the rotated test copy: angles uniform in +-15 degrees...
ROTATED_TEST_SEED = 0      # ...drawn once from this seed, the same for every step
EVAL_BATCH = 256           # test-time batch: on the 2-core CPU 0.2 s a test pass, 1.0 s at 2,000
CHECK_EVERY = 50           # batches between checks for a non-finite loss (each check syncs a GPU)
MAX_SEED = 2**64 - 1       # torch.manual_seed takes 0 .. 2**64 - 1
MNIST_FILES = {            # raw file -> (magic number, dimensions of one item)
    "train-images-idx3-ubyte": (2051, (28, 28)),
    "train-labels-idx1-ubyte": (2049, ()),
    "t10k-images-idx3-ubyte": (2051, (28, 28)),
    "t10k-labels-idx1-ubyte": (2049, ()),
}
MNIST_SIZES = (60_000, 10_000)  # train and test images in the real dataset


class UserError(Exception):
    """A problem the user can fix; reported as one line, never as a traceback."""


class Diverged(Exception):
    """A non-finite training loss; `batch` is 1-based within `epoch`."""

    def __init__(self, batch, loss, epoch=None):
        super().__init__(batch, loss, epoch)  # args in order, so it pickles across processes
        self.batch, self.loss, self.epoch = batch, loss, epoch

    def __str__(self):
        return f"loss became {self.loss} at epoch {self.epoch}, batch {self.batch}"


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
    ema_decay: float = 0.0         # > 0: test and save a moving average of the weights, not the last
    precision: str = "auto"        # "bf16" autocast, "fp32", or "auto": see resolve_precision

    def describe(self):
        sched = f"one-cycle (peak lr {self.lr:g})" if self.schedule == "onecycle" \
            else f"constant lr {self.lr:g}"
        aug = [f"random rotation +-{self.max_rotation:g} deg"] * bool(self.max_rotation) \
            + [f"random shift +-{self.max_shift:g} px"] * bool(self.max_shift)
        extras = [] if self.dropout is None else [f"dropout {self.dropout:g}"]
        extras += [f"tested on an EMA of the weights (decay {self.ema_decay:g})"] * bool(self.ema_decay)
        return ", ".join([f"SGD momentum {self.momentum:g}", f"weight decay {self.weight_decay:g}",
                          sched, f"batch {self.batch_size}", ", ".join(aug) or "no augmentation"]
                         + extras + ["bf16 autocast" if self.precision == "bf16" else self.precision])


def recorded_recipe(fields):
    """The Recipe a record's "recipe" dict describes, or None if it is not a dict of Recipe fields.
    A field the dict lacks was added to Recipe after the record was written, and its default is
    what that run did: each new field's default is the behaviour from before it existed."""
    try:
        return Recipe(**fields)
    except TypeError:
        return None


def resolve_precision(precision, device):
    """"auto" is fp32 on every device. bf16 autocast was 25% faster on an AVX-512 CPU but 4x
    slower on an AVX2-only one (both sold as "AMD EPYC"), and slower on an H100; and a precision
    that followed the machine would give the same seed different numbers on different machines."""
    return "fp32" if precision == "auto" else precision


# ----------------------------------------------------------------------------- model pieces

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
    """max_pool2d on a channels-last copy; the backward is the ordinary kernel with the same
    indices, so values and gradients are bit-identical to F.max_pool2d."""

    @staticmethod
    def forward(ctx, x, pool_args):  # pool_args: (kernel, stride, padding, dilation, ceil_mode)
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *pool_args)
        ctx.save_for_backward(x, indices)
        ctx.pool_args = pool_args
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *ctx.pool_args, indices.contiguous())
        return grad_x, None


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d, the same numbers, with a faster CPU path. It pays for its 30 lines: PyTorch's
    CPU max-pool is ~5x slower on NCHW maps than on channels-last ones (2.3 against 0.4 ms for a
    128x16x24x24 batch on a 2-core AVX-512 EPYC), which was 4-5% of a whole step-4 epoch there
    (bench.py: "ours" against "+ common.MaxPool2d"); converting the whole model to channels-last
    measured slower overall. Values and gradients are bit-identical (a test checks it)."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices:
            return super().forward(x)
        pairs = [list(_pair(v)) for v in (self.kernel_size, self.stride, self.padding, self.dilation)]
        return _MaxPoolChannelsLast.apply(x, (*pairs, self.ceil_mode))


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def make_net(Net, recipe):
    return Net() if recipe.dropout is None else Net(dropout=recipe.dropout)


# ----------------------------------------------------------------------------- data

class Data(NamedTuple):
    """MNIST on the device: images (N, 1, 28, 28) float in [0, 1], labels (N,)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    norm: tuple            # (mean, std) of the training pixels, measured: used to normalise
    stats: dict            # what data_stats measured on the training set


def _raw_file_problem(path, magic, dims):
    """Why an idx file cannot be MNIST (header, dimensions, size, no items), or None."""
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
    if values[1] == 0:
        return "holds 0 items"
    expected = len(header) + values[1] * math.prod(dims)
    if size != expected:
        return f"is {size:,} bytes, expected {expected:,} for {values[1]:,} items"
    return None


def _download(root):
    import socket
    from torchvision.datasets import MNIST
    socket.setdefaulttimeout(15)  # no network should fail in seconds, not hang
    try:
        MNIST(root, train=True, download=True)
        MNIST(root, train=False, download=True)
    except Exception as e:
        raise UserError(f"could not download MNIST into {root / 'MNIST' / 'raw'} ({type(e).__name__}); "
                        f"point --data-dir or MNIST_DIR at a folder holding MNIST/raw") from None


def _check_splits(raw, train, test):
    for split, name in ((train, "train"), (test, "t10k")):
        if len(split.data) != len(split.targets) or int(split.targets.max()) > 9:
            raise UserError(f"{raw}/{name}-labels-idx1-ubyte does not match its images: it is "
                            f"corrupt; delete it and download MNIST again")
    if len(train.data) <= len(test.data):
        raise UserError(f"{raw}/train-images-idx3-ubyte holds {len(train.data):,} images and "
                        f"t10k-images-idx3-ubyte {len(test.data):,}: the train split must be the larger "
                        f"(MNIST: {MNIST_SIZES[0]:,} and {MNIST_SIZES[1]:,}); are the files swapped?")


def load_mnist(data_dir, download=False):
    """MNIST as uint8 tensors: train/test images (N, 28, 28) and labels (N,), read from
    `data_dir/MNIST/raw` through torchvision, downloaded first only when `download` is set."""
    from torchvision.datasets import MNIST
    root = Path(data_dir)
    raw = root / "MNIST" / "raw"
    if download and not all((raw / n).is_file() for n in MNIST_FILES):
        _download(root)
    missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
    if missing:
        raise UserError(f"MNIST not found: {raw / missing[0]} is missing; point --data-dir or "
                        f"MNIST_DIR at a folder holding MNIST/raw, or leave both unset to "
                        f"download into ./data")
    for name, (magic, dims) in MNIST_FILES.items():
        problem = _raw_file_problem(raw / name, magic, dims)
        if problem:
            raise UserError(f"{raw / name} {problem}: it is corrupt; delete it and download MNIST again")
    train, test = MNIST(root, train=True), MNIST(root, train=False)
    _check_splits(raw, train, test)
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


def load_data(data_dir, device, download=False):
    """The whole dataset as one set of tensors on the device, with its measured statistics."""
    raw = load_mnist(data_dir, download)
    stats = data_stats(raw["train_images"], raw["train_labels"])
    return Data(*to_device(raw["train_images"], raw["train_labels"], device),
                *to_device(raw["test_images"], raw["test_labels"], device),
                norm=(stats["mean"], stats["std"]), stats=stats)


# ----------------------------------------------------------------------------- batches

def affine(images, degrees, shifts):
    """Turn each image (N, 1, H, W) by its own angle and move it by its own (dx, dy) pixels, in
    one batched op; zeros fill in."""
    rad = degrees.to(images.device, images.dtype) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
    dx, dy = (shifts.to(images.device, images.dtype) * 2 / images.shape[-1]).unbind(1)
    theta = torch.stack([torch.stack([cos, -sin, dx], 1),
                         torch.stack([sin, cos, dy], 1)], 1)            # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def uniform_symmetric(n, bound, generator):
    """n draws uniform in [-bound, bound] from a CPU generator: the same whatever the device."""
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


def draw_augmentation(n, batch_size, max_rotation, max_shift, generator):
    """One epoch's angles (n,) and shifts (n, 2), drawn batch by batch (shifts, then angles), so
    the stream of random numbers is the same on any device; a bound of 0 draws nothing."""
    angles, shifts = [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        shifts.append(uniform_symmetric(2 * size, max_shift, generator).view(size, 2)
                      if max_shift else torch.zeros(size, 2))
        angles.append(uniform_symmetric(size, max_rotation, generator)
                      if max_rotation else torch.zeros(size))
    return torch.cat(angles), torch.cat(shifts)


def batches(images, labels, norm, recipe, generator):
    """One epoch of shuffled, augmented, normalised batches (images, labels). The random numbers
    come from `generator` for the whole epoch up front and reach the device in one copy, not one
    (a host sync on a GPU) per batch."""
    n, size = len(images), recipe.batch_size
    order = torch.randperm(n, generator=generator).to(images.device)
    augment = bool(recipe.max_rotation or recipe.max_shift)
    if augment:
        angles, shifts = draw_augmentation(n, size, recipe.max_rotation, recipe.max_shift, generator)
        angles, shifts = angles.to(images.device), shifts.to(images.device)
    mean, std = norm
    for start in range(0, n, size):
        x = images[order[start:start + size]]
        if augment:
            x = affine(x, angles[start:start + size], shifts[start:start + size])
        yield (x - mean) / std, labels[order[start:start + size]]


# ----------------------------------------------------------------------------- train / evaluate

def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_optimizer(model, recipe, steps_per_epoch):
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    if recipe.schedule == "constant":
        return optimizer, None
    if recipe.schedule != "onecycle":
        raise ValueError(f"unknown schedule {recipe.schedule!r}")
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch)


def average_pairs(averaged, model):
    """(average, model) tensor pairs from the two state_dicts, weights and BatchNorm statistics.
    Made once a run: the tensors share storage with the modules, which update them in place."""
    return list(zip(averaged.state_dict().values(), model.state_dict().values()))


def update_average(pairs, decay, step):
    """Move each average a step towards its model tensor: an exponential moving average. The decay
    ramps up from 0.1 at step 1, so the average forgets the random initial weights within the
    first epoch."""
    weight = 1 - min(decay, (1 + step) / (10 + step))
    for mean, now in pairs:
        if mean.is_floating_point():
            mean.lerp_(now, weight)
        else:
            mean.copy_(now)  # BatchNorm's batch counter


def train_epoch(model, optimizer, scheduler, batches, precision, average=None, decay=0.0, steps_done=0):
    """One pass over `batches`. Returns {"loss", "correct", "total", "lr"} (loss: mean over the
    images; lr: the last one used); raises Diverged at the first non-finite loss. With `average`
    (average_pairs), each step also moves the average (update_average; `steps_done`: steps before
    this epoch)."""
    model.train()
    device = next(model.parameters()).device
    losses, correct, total = [], torch.zeros((), dtype=torch.long, device=device), 0
    for images, labels in batches:
        with autocast(device, precision):
            out = model(images)
            loss = F.nll_loss(out.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach() * len(labels))  # kept on the device: no sync a batch
        if average is not None:
            update_average(average, decay, steps_done + len(losses))
        correct += (out.argmax(1) == labels).sum()
        total += len(labels)
        if len(losses) % CHECK_EVERY == 0:
            check_finite(losses, len(losses) - CHECK_EVERY)
    check_finite(losses, len(losses) - len(losses) % CHECK_EVERY)
    return {"loss": torch.stack(losses).sum().item() / total, "correct": int(correct),
            "total": total, "lr": lr}


def check_finite(losses, start):
    """Raise Diverged naming the first batch (1-based) from `start` on whose loss is not finite."""
    if start >= len(losses):
        return
    recent = torch.stack(losses[start:])
    bad = (~torch.isfinite(recent)).nonzero()
    if len(bad):
        first = int(bad[0])
        raise Diverged(start + first + 1, recent[first].item())


@torch.no_grad()
def predict(model, images, norm):
    """Log-probabilities (N, 10) for images (N, 1, 28, 28) in [0, 1]; always fp32, so a test
    count carries no bf16 rounding (testing is a small share of the time)."""
    model.eval()
    mean, std = norm
    return torch.cat([model((images[start:start + EVAL_BATCH] - mean) / std)
                      for start in range(0, len(images), EVAL_BATCH)])


def evaluate(model, images, labels, norm):
    """(mean loss, correct count): the count is an exact integer."""
    out = predict(model, images, norm)
    return F.nll_loss(out, labels).item(), int((out.argmax(1) == labels).sum())


def train(Net, recipe, data, seed, progress=False):
    """Train one model from scratch; after each epoch yield (tested model, epoch entry): the
    model as trained, or with recipe.ema_decay its moving average, which is what gets tested."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation, device-independent
    model = make_net(Net, recipe).to(data.train_images.device)
    tested = copy.deepcopy(model) if recipe.ema_decay else model
    average = average_pairs(tested, model) if recipe.ema_decay else None
    steps = math.ceil(len(data.train_labels) / recipe.batch_size)
    optimizer, scheduler = make_optimizer(model, recipe, steps)
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        epoch_batches = batches(data.train_images, data.train_labels, data.norm, recipe, generator)
        if progress:
            from tqdm import tqdm
            epoch_batches = tqdm(epoch_batches, total=steps, desc=f"epoch {epoch}/{recipe.epochs}", leave=False)
        try:
            stats = train_epoch(model, optimizer, scheduler, epoch_batches, recipe.precision,
                                average, recipe.ema_decay, (epoch - 1) * steps)
        except Diverged as e:
            raise Diverged(e.batch, e.loss, epoch) from None
        trained = time.perf_counter()
        test_loss, test_correct = evaluate(tested, data.test_images, data.test_labels, data.norm)
        yield tested, {"epoch": epoch, "train_loss": round(stats["loss"], 6),
                       "train_correct": stats["correct"], "train_total": stats["total"],
                       "test_loss": round(test_loss, 6), "test_correct": test_correct,
                       "test_total": len(data.test_labels), "lr": float(f"{stats['lr']:.6g}"),
                       "train_seconds": round(trained - start, 2),
                       "seconds": round(time.perf_counter() - start, 2)}


def rotated_copy(images):
    """The fixed rotated test set used to measure robustness (same angles for every step)."""
    g = torch.Generator().manual_seed(ROTATED_TEST_SEED)
    return affine(images, uniform_symmetric(len(images), ROTATED_TEST_DEG, g), torch.zeros(len(images), 2))


# ============================================================================= REPORTING
# Everything below reports on runs: nothing here changes what a model learns.

def percent(correct, total):
    return 100 * correct / total


def holds_bar(correct, total):
    """The bar as an exact integer comparison: 9,940 of 10,000 holds, 9,939 does not."""
    return correct * 10_000 >= BAR_PER_10K * total


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def layer_table(model, input_shape=(1, 1, 28, 28)):
    """Per leaf layer in call order: name, output shape, parameters, receptive field.
    The receptive field follows r += (k - 1) * j, j *= stride; a global pool sees everything."""
    rows = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: rows.append((name, m, i[0].shape, o.shape)))
             for name, m in model.named_modules() if not list(m.children())]
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


def format_table(header, rows, align):
    """A plain-text table; `align` holds one '<' or '>' per column."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [" ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths)).rstrip() for row in cells]


def format_layer_table(table):
    rows = [(r["layer"], "x".join(map(str, r["output"])), f"{r['params']:,}", r["rf"]) for r in table]
    rows.append(("total", "", f"{sum(r['params'] for r in table):,}", ""))
    return format_table(("layer", "output shape", "params", "RF"), rows, "<<>>")


def confusion_matrix(predicted, labels):
    """10x10 counts, rows = true digit, columns = predicted digit."""
    return torch.bincount(labels * 10 + predicted, minlength=100).view(10, 10).cpu()


def most_confused(matrix, k=5):
    off = matrix.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().topk(k)
    return [(int(i) // 10, int(i) % 10, int(v)) for v, i in zip(values, flat) if v > 0]


def format_confusion(matrix):
    rows = [[r] + matrix[r].tolist() for r in range(10)]
    pairs = ", ".join(f"{t} as {p}: {n}" for t, p, n in most_confused(matrix))
    return (["confusion matrix of the final test pass (rows: true digit, columns: predicted)"]
            + format_table([""] + list(range(10)), rows, ">" * 11)
            + [f"most confused (true as predicted): {pairs or 'none'}"])


# ----------------------------------------------------------------------------- summaries

def summarize(history):
    """The Result numbers of one run, derived from its per-epoch counts. The bar is judged on the
    last LAST_N epochs within MAX_EPOCHS (`judged`: their numbers, 1-based)."""
    test = [percent(h["test_correct"], h["test_total"]) for h in history]
    train = [percent(h["train_correct"], h["train_total"]) for h in history]
    within = history[:MAX_EPOCHS]
    judged = within[-LAST_N:] if len(within) >= LAST_N else []
    last = test[-LAST_N:]
    return {"epochs": len(history),
            "best_train": max(train), "best_train_epoch": train.index(max(train)) + 1,
            "final_train": train[-1],
            "best_test": max(test), "best_test_epoch": test.index(max(test)) + 1,
            "final_test": test[-1], "last_tests": last,
            "last_min": min(last), "last_spread": max(last) - min(last),
            "judged": [h["epoch"] for h in judged],
            "judged_tests": [percent(h["test_correct"], h["test_total"]) for h in judged],
            "holds_bar": bool(judged) and all(holds_bar(h["test_correct"], h["test_total"]) for h in judged),
            "gap": train[-1] - test[-1],
            "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history)}


def wilson_lower(k, n, z=1.96):
    """Lower end of the 95% Wilson interval for a rate of k successes in n trials."""
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_summary(runs):
    """Across seeds: how many held the bar, the 95% lower bound on that rate, the worst and the
    mean +- std of the lowest-of-last-N, and mean +- std of the final accuracy."""
    summaries = [summarize(r["history"]) for r in runs]
    held = sum(s["holds_bar"] for s in summaries)
    lows, finals = [s["last_min"] for s in summaries], [s["final_test"] for s in summaries]
    return {"seeds": [r["seed"] for r in runs], "runs": len(runs), "held": held,
            "held_lower_95": wilson_lower(held, len(runs)), "worst_low": min(lows),
            "low": mean_std(lows), "final": mean_std(finals)}


def paired_difference(full_runs, variant_runs):
    """Mean and standard error of (variant - full) lowest-of-last-N over the seeds both ran."""
    full = {r["seed"]: summarize(r["history"])["last_min"] for r in full_runs}
    diffs = [summarize(r["history"])["last_min"] - full[r["seed"]] for r in variant_runs if r["seed"] in full]
    mean, std = mean_std(diffs)
    return mean, std / math.sqrt(len(diffs)), len(diffs)


# ----------------------------------------------------------------------------- the Analysis rules
# Each rule takes numbers and returns a list of sentences that are true of them.

OVERFIT_GAP = 0.5          # train above test by this many points at the end: overfitting
SLIGHT_OVERFIT_GAP = 0.15  # ...by this many: slight overfitting
UNDERFIT_TRAIN = 99.0      # train accuracy below this, unregularised: underfitting
SETTLED_SPREAD = 0.10      # last-N test spread up to this: settled
MOVING_SPREAD = 0.25       # ...up to this: still moving; above: noisy
ROBUSTNESS_STEP = 0.1      # rotated-copy change that counts as more or less robust
GAIN_IN_SE = 2.0           # an ablation difference is called real beyond this many standard errors


def fit_sentences(s, regularised):
    gap, train = s["gap"], s["final_train"]
    if gap >= OVERFIT_GAP:
        return [f"Overfitting: the final train accuracy ({train:.2f}) is {gap:.2f} points above "
                f"test ({s['final_test']:.2f}); the model memorises more than it generalises."]
    if gap >= SLIGHT_OVERFIT_GAP:
        return [f"Slight overfitting: train is {gap:.2f} points above test at the end."]
    if train < UNDERFIT_TRAIN and not regularised:
        return [f"Underfitting: train accuracy ends at only {train:.2f} and test is within "
                f"{abs(gap):.2f} of it; the model has not learnt the training set."]
    if gap < 0:
        return [f"No overfitting: test ends {-gap:.2f} points above train, whose accuracy is "
                f"measured on {'augmented or dropped-out' if regularised else 'changing'} batches "
                f"while the weights still move."]
    return [f"No overfitting: train and test end within {gap:.2f} points of each other."]


def bar_sentences(s, history):
    n = s["epochs"]
    if not s["judged"]:
        return [f"Bar not judged: it needs {LAST_N} epochs and this run trained {n} (final test "
                f"{s['final_test']:.2f})."]
    where = f"epochs {s['judged'][0]}-{s['judged'][-1]}"
    over = [f"This run trained {n} epochs; the bar counts within {MAX_EPOCHS}, so it is judged on "
            f"{where}."] if n > MAX_EPOCHS else []
    values = " / ".join(f"{a:.2f}" for a in s["judged_tests"])
    if s["holds_bar"]:
        return over + [f"Bar met: each of {where} is >= {BAR:.2f} ({values}), lowest "
                       f"{min(s['judged_tests']):.2f}."]
    first = next((h["epoch"] for h in history[:MAX_EPOCHS] if holds_bar(h["test_correct"], h["test_total"])), None)
    if first is None:
        best = max(s["judged_tests"] + [s["best_test"]] * (n <= MAX_EPOCHS))
        return over + [f"Bar missed: test accuracy never reaches {BAR:.2f} within {MAX_EPOCHS} "
                       f"epochs; best {best:.2f} is {BAR - best:.2f} short."]
    misses = sum(a < BAR for a in s["judged_tests"])  # display only; the verdict used counts
    return over + [f"Bar missed: {BAR:.2f} is first reached at epoch {first}, but {misses} of "
                   f"{where} fall below it ({values})."]


def stability_sentences(s):
    if s["epochs"] < 2:
        return ["Only one epoch: no spread between epochs to judge."]
    spread, n = s["last_spread"], len(s["last_tests"])
    word = "settled" if spread <= SETTLED_SPREAD else "still moving" if spread <= MOVING_SPREAD else "noisy"
    return [f"Over the last {n} epochs test accuracy spans {spread:.2f} points: {word}."]


def previous_sentences(s, params, prev):
    if prev is None:
        return ["No previous record to compare with."]
    p = summarize(prev["history"])
    return [f"Against step {prev['step']}: parameters {prev['params']:,} -> {params:,}; best test "
            f"{p['best_test']:.2f} -> {s['best_test']:.2f} ({s['best_test'] - p['best_test']:+.2f}); "
            f"final gap {p['gap']:.2f} -> {s['gap']:.2f}; seconds per epoch "
            f"{p['seconds_per_epoch']:.1f} -> {s['seconds_per_epoch']:.1f}."]


def rotated_sentences(step, rotated, prev_rotated):
    text = (f"On the rotated test copy (+-{ROTATED_TEST_DEG:g} deg, seed {ROTATED_TEST_SEED}) this "
            f"step scores {rotated:.2f}")
    if prev_rotated is None:
        return [text + "."]
    diff = rotated - prev_rotated
    verdict = "more robust to rotation than" if diff > ROBUSTNESS_STEP else "less robust to rotation than" \
        if diff < -ROBUSTNESS_STEP else "about as robust to rotation as"
    return [text + f" against {prev_rotated:.2f} for step {step - 1}'s weights ({diff:+.2f}): "
                   f"{verdict} the previous step."]


def seeds_sentences(seeds):
    if seeds is None:
        return []
    sm = seed_summary(seeds["runs"])
    held = "all" if sm["held"] == sm["runs"] else f"{sm['held']} of"
    return [f"Across {sm['runs']} seeds ({seed_list(sm['seeds'])}) {held} {sm['runs']} held the "
            f"bar in each of their last {LAST_N} epochs; the 95% lower confidence bound on the share "
            f"of seeds that hold is {100 * sm['held_lower_95']:.0f}% (Wilson). Lowest of last {LAST_N}: "
            f"worst {sm['worst_low']:.2f}, mean {sm['low'][0]:.2f} +- {sm['low'][1]:.2f}; final "
            f"accuracy {sm['final'][0]:.2f} +- {sm['final'][1]:.2f} (mean +- std over seeds)."]


def ablation_sentences(ablation):
    if ablation is None:
        return []
    full, *others = ablation["variants"]
    seeds = [r["seed"] for r in full["runs"]]
    low = seed_summary(full["runs"])["low"]
    out = [f"Ablation ({len(seeds)} seeds per variant: {seed_list(seeds)}): the full recipe's lowest "
           f"of last {LAST_N} is {low[0]:.2f} +- {low[1]:.2f} (mean +- std)."]
    for v in others:
        diff, se, n = paired_difference(full["runs"], v["runs"])
        if n < 2:
            judged = "one seed cannot tell a change from seed noise"
        elif abs(diff) <= GAIN_IN_SE * se:
            judged = f"within seed noise (|{diff:+.2f}| <= {GAIN_IN_SE:g} x SE {se:.2f})"
        elif diff < 0:
            judged = f"a real loss without it (beyond {GAIN_IN_SE:g} x SE {se:.2f}): this change earns its place"
        else:
            judged = f"the variant without it did better (beyond {GAIN_IN_SE:g} x SE {se:.2f})"
        out.append(f"Without {v['name']} ({v['reverted']}): lowest of last {LAST_N} "
                   f"{seed_summary(v['runs'])['low'][0]:.2f}, {diff:+.2f} against the full recipe; {judged}.")
    return out


def next_sentences(s, facts, seeds=None, ablation=None):
    if not s["judged"]:
        return [f"Next: train {MAX_EPOCHS} epochs, so the bar can be judged on the last {LAST_N}."]
    if s["holds_bar"] and not (seeds and ablation):
        todo = [what for what, done in (("that it holds across seeds (--seeds 1-20)", seeds),
                                        ("which change earned it (--ablate)", ablation)) if not done]
        return ["Next: the bar is met in this run; check " + " and ".join(todo) + "."]
    sm = seed_summary(seeds["runs"]) if seeds else None
    if sm and sm["held"] < sm["runs"]:
        return [f"Next: {sm['runs'] - sm['held']} of {sm['runs']} seeds missed the bar, so holding it is "
                "not yet a property of the recipe: the margin must grow before anything else."]
    if sm and sm["low"][0] < SEED_MARGIN:
        return [f"Next: all {sm['runs']} seeds held, but their mean lowest of last {LAST_N} "
                f"({sm['low'][0]:.2f}) is under {SEED_MARGIN:.2f}, so a seed not yet tried can still "
                "miss: the margin must grow before anything else."]
    if not s["holds_bar"] and facts["augmented"] and facts["scheduled"]:
        return ["Next: the bar is not held by this run, with augmentation and an LR schedule already "
                "in place; the margin must come from the recipe or the model, not from more epochs."]
    return ["Next: " + " ".join(facts["next"].split())]


def analyze(s, history, facts, prev=None, seeds=None, ablation=None):
    """The Analysis: every sentence is derived from the numbers passed in. `facts` holds what the
    model and recipe are (params, batchnorm, regularised, step, rotated accuracies, next text)."""
    params = facts["params"]
    budget = (f"{params:,} parameters: {'within' if params < PARAM_BUDGET else 'over'} the "
              f"{PARAM_BUDGET:,} budget ({100 * params / PARAM_BUDGET:.0f}% of it).")
    return ([budget] + fit_sentences(s, facts["regularised"]) + bar_sentences(s, history)
            + stability_sentences(s) + previous_sentences(s, params, prev)
            + rotated_sentences(facts["step"], facts["rotated"], facts["prev_rotated"])
            + seeds_sentences(seeds) + ablation_sentences(ablation)
            + next_sentences(s, facts, seeds, ablation))


def seed_list(seeds):
    """1, 2, 3, 5 -> '1-3, 5'"""
    parts, start = [], None
    for i, seed in enumerate(seeds):
        start = seed if start is None else start
        if i + 1 == len(seeds) or seeds[i + 1] != seed + 1:
            parts.append(str(seed) if seed == start else f"{start}-{seed}")
            start = None
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the block

def previous_line(step, prev, why):
    if step == 1:
        return "This is the first step: nothing measured yet."
    if prev is None:
        return f"{why} (run step{step - 1}.py first); the reasons below stand without its numbers."
    p = summarize(prev["history"])
    return (f"Step {step - 1} measured: {prev['params']:,} parameters, best train "
            f"{p['best_train']:.2f}, best test {p['best_test']:.2f}, final gap {p['gap']:.2f}, "
            f"last {len(p['last_tests'])} test {' / '.join(f'{a:.2f}' for a in p['last_tests'])}, "
            f"{p['seconds_per_epoch']:.1f} s per epoch.")


def result_lines(s, params, wall, rotated, prev_rotated):
    last = " / ".join(f"{a:.2f}" for a in s["last_tests"])
    prev = f" (previous step's weights: {prev_rotated:.2f})" if prev_rotated is not None else ""
    return [f"Parameters: {params:,}",
            f"Best train accuracy: {s['best_train']:.2f} (epoch {s['best_train_epoch']}); final {s['final_train']:.2f}",
            f"Best test accuracy: {s['best_test']:.2f} (epoch {s['best_test_epoch']}); final {s['final_test']:.2f}",
            f"Last {len(s['last_tests'])} test accuracies: {last}",
            f"Train-test gap (final epoch): {s['gap']:+.2f}",
            f"Seconds per epoch: {s['seconds_per_epoch']:.1f}; total wall time {wall:.0f} s",
            f"Rotated test copy accuracy: {rotated:.2f}{prev}"]


def format_block(target, result, analysis):
    out = ["", "=" * 78, "TARGET"]
    out += [f"  {line}" for line in target]
    out += ["RESULT"] + [f"  {i}. {line}" for i, line in enumerate(result, 1)]
    out += ["ANALYSIS"] + [f"  {i}. {line}" for i, line in enumerate(analysis, 1)]
    return out + ["=" * 78]


def epoch_line(h, epochs, label=""):
    return (f"{label}epoch {h['epoch']:2d}/{epochs} | train loss {h['train_loss']:.4f} acc "
            f"{percent(h['train_correct'], h['train_total']):6.2f} | test loss {h['test_loss']:.4f} acc "
            f"{percent(h['test_correct'], h['test_total']):6.2f} | lr {h['lr']:.4f} | {h['seconds']:5.1f} s")


# ----------------------------------------------------------------------------- pictures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def plot_curves(history, title):
    fig, (acc, loss) = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    for split in ("train", "test"):
        acc.plot(epochs, [percent(h[f"{split}_correct"], h[f"{split}_total"]) for h in history], "o-", label=split)
        loss.plot(epochs, [h[f"{split}_loss"] for h in history], "o-", label=split)
    acc.axhline(BAR, color="grey", ls="--", lw=1, label=f"{BAR:.2f}")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title=title, ylim=(max(90, acc.get_ylim()[0]), 100))
    loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    acc.legend(), loss.legend()
    return _png(fig)


def plot_misclassified(images, labels, predicted, limit=40):
    wrong = (predicted != labels).nonzero().flatten()[:limit].cpu()
    cols, rows = 10, max(1, math.ceil(len(wrong) / 10))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i, 0].float().cpu(), cmap="gray_r")
        ax.set_title(f"{labels[i].item()} as {predicted[i].item()}", fontsize=8)
    return _png(fig)


def plot_steps(records):
    """Test accuracy per epoch of every step record given."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in records:
        ax.plot([h["epoch"] for h in r["history"]],
                [percent(h["test_correct"], h["test_total"]) for h in r["history"]], "o-",
                ms=3, label=f"step {r['step']} ({r['params']:,} params)")
    ax.axhline(BAR, color="grey", ls="--", lw=1, label=f"{BAR:.2f} bar")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(97.5, 100),
           title="MNIST drill-down: test accuracy per epoch")
    ax.legend(loc="lower right")
    return _png(fig)


# ----------------------------------------------------------------------------- records and files

def usable_record(path, check):
    """(record, None), or (None, why) when it is missing or cannot be understood: `check(record)`
    must run without error on a record of the expected shape."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, f"The record {path} was not found"
    except (OSError, ValueError) as e:
        return None, f"The record {path} could not be read ({type(e).__name__})"
    try:
        check(record)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as e:
        return None, f"The record {path} could not be understood ({type(e).__name__}: {e}); treated as missing"
    return record, None


def check_single(record):
    """Raise if a single run's record lacks what its readers use (usable_record's `check`)."""
    summarize(record["history"])
    percent(record["rotated_test"]["correct"], record["rotated_test"]["total"])
    for key in ("params", "step"):
        if not isinstance(record[key], int):
            raise TypeError(f"{key} is not an integer")


def _write_hidden(path, data, suffix):
    """Write `data` to a hidden file beside `path` and return its name; nothing is left on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{suffix}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_file(path, data):
    """Replace `path` whole: a crash leaves the old file or the new one, never half of one."""
    os.replace(_write_hidden(Path(path), data, "new"), path)


TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@contextlib.contextmanager
def signals_held():
    """Terminating signals that arrive inside are acted on when it ends. (A signal mask would not
    do: torch's threads leave the signal free to land on another thread.)"""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in TERMINATING}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def commit(staged):
    """Rename every staged file ({final path: temporary path}) into place; a failed rename puts
    the old files back, so the old set stays whole or the new set is complete. Call it inside
    signals_held(), so that no interruption can land between two renames."""
    moved = []  # (final path, its old file's backup or None)
    try:
        for final, tmp in staged.items():
            backup = final.with_name(f".{final.name}.{os.getpid()}.old.tmp") if final.exists() else None
            if backup:
                os.replace(final, backup)
            moved.append((final, backup))
            os.replace(tmp, final)
    except BaseException:
        for final, backup in reversed(moved):
            os.replace(backup, final) if backup else final.unlink(missing_ok=True)
        raise
    for _, backup in moved:
        if backup:
            backup.unlink(missing_ok=True)


def state_bytes(model):
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- a run

class Step(NamedTuple):
    """One step's story, as its file declares it."""
    number: int
    Net: type
    recipe: Recipe
    target: str                 # why this step, and what it aims at
    next: str                   # the Analysis' last sentence: what the next step does
    changes: dict = {}          # for --ablate: change -> {recipe field: the previous step's value}


@dataclasses.dataclass
class Run:
    """What every mode of a run shares: its step, flags and device, the data once loaded, the
    log so far, the files staged for the final commit, and the weights once trained."""
    step: Step
    args: argparse.Namespace
    recipe: Recipe
    device: torch.device
    name: str                               # file prefix: step4, step4_seeds, step4_ablation
    log_dir: Path | None = None
    data: Data | None = None
    lines: list = dataclasses.field(default_factory=list)
    staged: dict = dataclasses.field(default_factory=dict)
    weights: bytes | None = None
    committed: bool = False
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def say(self, line="", always=False):
        """Log a line, and print it unless --quiet (`always`: print it anyway)."""
        self.lines.append(line)
        if always or not self.args.quiet:
            try:
                print(line, flush=True)
            except OSError:  # the terminal or pipe went away: the log still gets every line
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def stage(self, filename, data):
        """Write one output file of the run under a temporary name until commit."""
        final = self.log_dir / filename
        self.staged[final] = _write_hidden(final, data, "staged")

    def commit(self):
        """Put every staged file in place at once and drop an earlier run's partial files; a
        signal that arrives meanwhile is acted on after, when the new set is complete."""
        with signals_held():
            commit(self.staged)
            self.committed, self.staged = True, {}
            for suffix in (".partial.log", ".partial.pt"):
                (self.log_dir / f"{self.name}{suffix}").unlink(missing_ok=True)

    def keep_partial(self, why, details=()):
        """After a failure: drop staged files, keep the log so far (and trained weights) under
        partial names, and return the sentence that says what is where."""
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        if self.log_dir is None:
            return "Nothing was written."
        prefix = self.log_dir / self.name
        state = (f"The new {prefix}.* set was complete before that" if self.committed else
                 f"The previous {prefix}.* files are untouched")
        try:
            write_file(f"{prefix}.partial.log", "\n".join(self.lines + [f"[run stopped: {why}]", *details]) + "\n")
            if self.weights is not None and not self.committed:
                write_file(f"{prefix}.partial.pt", self.weights)
                return f"{state}; this run so far is in {prefix}.partial.log, its trained weights in {prefix}.partial.pt."
        except OSError as e:
            return f"{state}; the partial log could not be written ({e.strerror})."
        return f"{state}; this run so far is in {prefix}.partial.log."

    def companion(self, mode, check):
        """This step's seeds or ablation record, if it was made with this very recipe and model."""
        record, why = usable_record(self.log_dir / f"step{self.step.number}_{mode}.json", check)
        if why and "not found" not in why:
            self.say(f"note: {why}.")
        params = count_params(make_net(self.step.Net, self.recipe))
        if record and recorded_recipe(record.get("recipe")) == self.recipe and record.get("params") == params:
            return record
        return None


# ----------------------------------------------------------------------------- training jobs

_WORKER = {}  # a worker process's data, loaded once


def _deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # tiny activations early in training cost 10x on CPU


def _worker_start(data_dir, device, threads):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the pool
    torch.set_num_threads(threads)
    _deterministic()
    _WORKER["data"] = load_data(data_dir, torch.device(device))


def _worker_job(job):
    return train_job(*job, _WORKER["data"])


def train_job(variant, Net, recipe, seed, data):
    """Train one seed to the end; its history and its rotated-copy count, as plain data."""
    history = []
    for model, entry in train(Net, recipe, data, seed):
        history.append(entry)
    rotated = evaluate(model, rotated_copy(data.test_images), data.test_labels, data.norm)[1]
    return {"variant": variant, "seed": seed, "history": history,
            "rotated_test": {"correct": rotated, "total": len(data.test_labels)}}


def job_threads(jobs):
    """CPU threads each of `jobs` worker processes gets: this process's, split between them."""
    return torch.get_num_threads() if jobs == 1 else max(1, torch.get_num_threads() // jobs)


def train_jobs(run, jobs):
    """Yield each (variant, recipe, seed) job's result as it finishes: here with --jobs 1, else in
    --jobs worker processes that split this process's CPU threads between them."""
    if run.args.jobs == 1:
        for variant, recipe, seed in jobs:
            yield train_job(variant, run.step.Net, recipe, seed, run.data)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch (or CUDA) has started
    start_args = (run.args.data_dir or "data", str(run.device), job_threads(run.args.jobs))
    with ProcessPoolExecutor(run.args.jobs, context, _worker_start, start_args) as pool:
        futures = [pool.submit(_worker_job, (v, run.step.Net, r, s)) for v, r, s in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()  # a worker that dies makes this raise BrokenProcessPool
        except BaseException:
            running = list(pool._processes.values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in running:  # end the running jobs now, not when they finish
                process.terminate()
            raise


# ----------------------------------------------------------------------------- run modes

def run_single(run):
    """Train once; write the log, record, weights and pictures as one set."""
    model = make_net(run.step.Net, run.recipe)
    layers = layer_table(model)
    for line in [""] + format_layer_table(layers) + [""]:
        run.say(line)
    history = []
    progress = not run.args.quiet and sys.stdout.isatty()
    for model, entry in train(run.step.Net, run.recipe, run.data, run.args.seed, progress):
        history.append(entry)
        run.say(epoch_line(entry, run.recipe.epochs))
    run.weights = state_bytes(model)  # from here on a failure keeps them as stepN.partial.pt
    predicted = predict(model, run.data.test_images, run.data.norm).argmax(1)
    record = single_record(run, history, layers, predicted, model)
    run.stage(f"{run.name}.pt", run.weights)
    run.stage(f"{run.name}.json", json.dumps(record, indent=1))
    run.stage(f"{run.name}.log", "\n".join(run.lines) + "\n")
    run.stage(f"{run.name}_curves.png", plot_curves(history, f"step {run.step.number}"))
    run.stage(f"{run.name}_misclassified.png", plot_misclassified(run.data.test_images, run.data.test_labels, predicted))
    others = [usable_record(run.log_dir / f"step{n}.json", check_single)[0] for n in range(1, 5)
              if n != run.step.number]
    run.stage("steps_test_accuracy.png", plot_steps(sorted([r for r in others if r] + [record], key=lambda r: r["step"])))
    run.commit()


def single_record(run, history, layers, predicted, model):
    """Confusion, rotated copy, the previous step, the Target / Result / Analysis block: the
    record of a finished single run (its lines go to the log as they are made)."""
    data, step = run.data, run.step
    matrix = confusion_matrix(predicted, data.test_labels)
    for line in [""] + format_confusion(matrix):
        run.say(line)
    total = len(data.test_labels)
    rotated = evaluate(model, rotated_copy(data.test_images), data.test_labels, data.norm)[1]
    prev, why = (None, None) if step.number == 1 else \
        usable_record(run.log_dir / f"step{step.number - 1}.json", check_single)
    sha = hashlib.sha256(run.weights).hexdigest()
    run.say(f"weights: {run.log_dir / run.name}.pt sha256 {sha}")
    block = make_block(run, history, layers, prev, why, percent(rotated, total))
    for line in format_block(**block):
        run.say(line, always=True)
    return {"step": step.number, "mode": "single", "seed": run.args.seed, "device": str(run.device),
            "command": sys.argv, "torch": torch.__version__, "recipe": dataclasses.asdict(run.recipe),
            "params": sum(r["params"] for r in layers), "data": data.stats, "layers": layers,
            "history": history, "wall_seconds": round(time.perf_counter() - run.started, 1),
            "rotated_test": {"correct": rotated, "total": total}, "confusion_matrix": matrix.tolist(),
            "weights_sha256": sha, "block": block}


def make_block(run, history, layers, prev, why, rotated):
    s, params = summarize(history), sum(r["params"] for r in layers)
    prev_rotated = percent(prev["rotated_test"]["correct"], prev["rotated_test"]["total"]) if prev else None
    recipe = run.recipe
    augmented = bool(recipe.max_rotation or recipe.max_shift)
    facts = {"step": run.step.number, "params": params, "next": run.step.next, "augmented": augmented,
             "scheduled": recipe.schedule != "constant", "regularised": augmented or bool(recipe.dropout),
             "rotated": rotated, "prev_rotated": prev_rotated}
    analysis = analyze(s, history, facts, prev, run.companion("seeds", seeds_sentences),
                       run.companion("ablation", ablation_sentences))
    wall = time.perf_counter() - run.started
    return {"target": [previous_line(run.step.number, prev, why)] + run.step.target.strip().splitlines(),
            "result": result_lines(s, params, wall, rotated, prev_rotated), "analysis": analysis}


def say_job(run, result, done, total):
    """A finished job's epochs, under a line that says how far the sweep is."""
    name = f"{result['variant']}, " if result["variant"] else ""
    run.say(f"--- {name}seed {result['seed']}: {done} of {total} done", always=True)
    for h in result["history"]:
        run.say(epoch_line(h, len(result["history"])))


def seeds_table(runs):
    rows = []
    for r in runs:
        s = summarize(r["history"])
        rows.append((r["seed"], " / ".join(f"{a:.2f}" for a in s["last_tests"]), f"{s['last_min']:.2f}",
                     f"{s['final_test']:.2f}", f"{s['best_test']:.2f}", "yes" if s["holds_bar"] else "NO"))
    return format_table(("seed", f"last {LAST_N} test", "lowest", "final", "best", "held"), rows, ">>>>>>")


def run_seeds(run):
    """One full run per seed; a table and the seed statistics, written as one set."""
    seeds = run.args.seeds
    runs = []
    for result in train_jobs(run, [(None, run.recipe, seed) for seed in seeds]):
        runs.append({k: v for k, v in result.items() if k != "variant"})
        say_job(run, result, len(runs), len(seeds))
    runs.sort(key=lambda r: seeds.index(r["seed"]))
    params = count_params(make_net(run.step.Net, run.recipe))
    record = {"step": run.step.number, "mode": "seeds", "device": str(run.device), "command": sys.argv,
              "torch": torch.__version__, "recipe": dataclasses.asdict(run.recipe), "params": params,
              "jobs": run.args.jobs, "threads": job_threads(run.args.jobs), "runs": runs}
    run.say("")
    for line in seeds_table(runs) + seeds_sentences(record):
        run.say(line, always=True)
    record["wall_seconds"] = round(time.perf_counter() - run.started, 1)
    run.say(f"{params:,} parameters; {record['wall_seconds']:.0f} s with --jobs {run.args.jobs}", always=True)
    run.stage(f"{run.name}.json", json.dumps(record, indent=1))
    run.stage(f"{run.name}.log", "\n".join(run.lines) + "\n")
    run.commit()


def ablation_variants(recipe, changes):
    """[(name, reverted text, recipe)]: the full recipe, then one variant per declared change
    with exactly that change's fields set back to the previous step's values."""
    variants = [("full recipe", "nothing", recipe)]
    for name, previous in changes.items():
        text = ", ".join(f"{f} {getattr(recipe, f)} -> {v}" for f, v in previous.items())
        variants.append((name, text, dataclasses.replace(recipe, **previous)))
    return variants


def ablation_table(variants):
    rows = []
    for v in variants:
        sm = seed_summary(v["runs"])
        rotated = statistics.mean(percent(r["rotated_test"]["correct"], r["rotated_test"]["total"]) for r in v["runs"])
        rows.append((v["name"], f"{sm['final'][0]:.2f}", f"{sm['low'][0]:.2f} +- {sm['low'][1]:.2f}",
                     f"{sm['worst_low']:.2f}", f"{sm['held']}/{sm['runs']}", f"{rotated:.2f}", v["reverted"]))
    return format_table(("variant", "final", f"lowest of last {LAST_N}", "worst", "held", "rotated", "reverted"),
                        rows, "<>>>>><")


def reused_runs(run, seeds):
    """The full recipe's runs of these seeds from this step's seeds record, when it was made with
    the same recipe, model, device and threads a job: the same computation, so not repeated."""
    record = run.companion("seeds", seeds_sentences)
    if not record or (record.get("device"), record.get("threads")) != (str(run.device), job_threads(run.args.jobs)):
        return []
    known = {r["seed"]: r for r in record["runs"]}
    reused = [known[s] for s in seeds if s in known]
    if reused:
        run.say(f"full recipe: seeds {seed_list([r['seed'] for r in reused])} taken from "
                f"{run.log_dir / f'step{run.step.number}_seeds.json'} (same recipe, model, device and threads)")
    return reused


def run_ablation(run):
    """The recipe and one variant per declared change, each over the same seeds."""
    seeds = run.args.seeds or [1, 2, 3]
    variants = ablation_variants(run.recipe, run.step.changes)
    for name, reverted, recipe in variants:
        run.say(f"{name}: reverted {reverted}; {recipe.describe()}")
    runs = {name: [] for name, _, _ in variants}
    runs["full recipe"] = reused_runs(run, seeds)
    done_seeds = {r["seed"] for r in runs["full recipe"]}
    jobs = [(name, recipe, seed) for name, _, recipe in variants for seed in seeds
            if not (name == "full recipe" and seed in done_seeds)]
    for done, result in enumerate(train_jobs(run, jobs), 1):
        runs[result["variant"]].append({k: v for k, v in result.items() if k != "variant"})
        say_job(run, result, done, len(jobs))
    record = {"step": run.step.number, "mode": "ablation", "device": str(run.device), "command": sys.argv,
              "torch": torch.__version__, "recipe": dataclasses.asdict(run.recipe),
              "params": count_params(make_net(run.step.Net, run.recipe)), "jobs": run.args.jobs,
              "threads": job_threads(run.args.jobs), "seeds": seeds, "reused": sorted(done_seeds),
              "variants": [{"name": n, "reverted": t, "recipe": dataclasses.asdict(r),
                            "runs": sorted(runs[n], key=lambda x: seeds.index(x["seed"]))} for n, t, r in variants]}
    run.say("")
    for line in ablation_table(record["variants"]) + ablation_sentences(record):
        run.say(line, always=True)
    record["wall_seconds"] = round(time.perf_counter() - run.started, 1)
    run.stage(f"{run.name}.json", json.dumps(record, indent=1))
    run.stage(f"{run.name}.log", "\n".join(run.lines) + "\n")
    run.commit()


def load_weights(run, path):
    """The step's Net with the weights in `path`, or a UserError that says what to pass."""
    n = run.step.number
    model = make_net(run.step.Net, run.recipe).to(run.device)
    try:
        state = torch.load(path, map_location=run.device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a weights file such as logs/step{n}.pt") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}); re-run "
                        f"step{n}.py to write it again") from None
    try:
        model.load_state_dict(state)
    except Exception:
        raise UserError(f"{path} does not hold weights for step {n}'s Net (names or shapes differ); "
                        f"pass the stepN.pt written by step{n}.py") from None
    return model


def run_eval(run):
    """Test saved weights, and compare the count with the record beside them."""
    path = Path(run.args.eval)
    model = load_weights(run, path)
    run.data = load_data(run.args.data_dir or "data", run.device, download=run.args.data_dir is None)
    data = run.data
    loss, correct = evaluate(model, data.test_images, data.test_labels, data.norm)
    predicted = predict(model, data.test_images, data.norm).argmax(1)
    for line in format_confusion(confusion_matrix(predicted, data.test_labels)):
        run.say(line, always=True)
    total = len(data.test_labels)
    record, _ = usable_record(path.with_suffix(".json"), check_single)
    known = ""
    if record:
        h = record["history"][-1]
        verdict = "matches" if (h["test_correct"], h["test_total"]) == (correct, total) else "differs"
        known = (f"; its record {path.with_suffix('.json')} says {h['test_correct']:,} of "
                 f"{h['test_total']:,} ({verdict})")
    run.say(f"{path}: test accuracy {percent(correct, total):.2f} ({correct:,} of {total:,}), loss "
            f"{loss:.4f}, {count_params(model):,} parameters{known}", always=True)


# ----------------------------------------------------------------------------- command line

def seed_value(text):
    """A seed: a whole number that torch's generator takes (0 .. 2**64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 .. {MAX_SEED} (what torch's generator takes)")
    return value


def seed_range(text):
    """'7' -> [7]; '1-20' -> [1, ..., 20]."""
    first, dash, last = text.partition("-")
    if not dash:
        return [seed_value(text)]
    low, high = seed_value(first), seed_value(last)
    if high < low:
        raise argparse.ArgumentTypeError(f"{text}: the range must go up (e.g. 1-20)")
    if high - low >= 10_000:
        raise argparse.ArgumentTypeError(f"{text}: more than 10,000 seeds")
    return list(range(low, high + 1))


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_empty(what):
    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty; name {what}")
        return text
    parse.__name__ = "path"
    return parse


def build_parser(step):
    recipe = step.recipe
    parser = argparse.ArgumentParser(
        prog=f"step{step.number}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Step {step.number} of the MNIST drill-down: train {recipe.epochs} epochs, write "
                    f"logs/step{step.number}.log, .json and .pt, ending in a Target / Result / Analysis block.")
    add = parser.add_argument
    add("--epochs", type=_positive(int), default=recipe.epochs, help=f"epochs to train (the bar counts within {MAX_EPOCHS})")
    add("--data-dir", default=os.environ.get("MNIST_DIR"), help="folder holding MNIST/raw (also: MNIST_DIR); unset: download into ./data")
    add("--log-dir", type=_non_empty("a folder"), default="logs", help="where the log, record, weights and pictures go")
    add("--seed", type=seed_value, default=1, help="seeds weights, shuffling and augmentation")
    add("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    add("--lr", type=_positive(float), default=recipe.lr, help="learning rate (the peak for a one-cycle schedule)")
    add("--batch-size", type=_positive(int), default=recipe.batch_size, help="training batch size")
    add("--precision", choices=("auto", "bf16", "fp32"), default=recipe.precision,
        help="training arithmetic: fp32, bf16 autocast, or auto (fp32: see resolve_precision); testing is always fp32")
    add("--quiet", action="store_true", help="no progress bars and no per-epoch lines on the terminal; the log is the same")
    add("--eval", metavar="WEIGHTS", type=_non_empty("a weights file"), help="test saved weights (e.g. logs/stepN.pt) and exit")
    add("--seeds", type=seed_range, nargs="+", metavar="SEED",
        help="one full run per seed (e.g. 1-20 or 1 5 9); writes stepN_seeds.log/.json; with --ablate, its seeds")
    add("--ablate", action="store_true",
        help="the recipe and one variant per declared change reverted, each over --seeds (default 1-3); writes stepN_ablation.*")
    add("--jobs", type=_positive(int), default=1, help="with --seeds or --ablate: train in this many worker processes")
    return parser


def parse_args(step, argv=None):
    parser = build_parser(step)
    args = parser.parse_args(argv)
    if args.seeds:
        args.seeds = [s for group in args.seeds for s in group]
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if twice:
            parser.error(f"argument --seeds: seed {twice[0]} is given twice; each seed runs once")
    if args.device != "auto" and device_problem(args.device):
        parser.error(f"argument --device: {device_problem(args.device)}")
    if args.eval is not None and (args.seeds or args.ablate):
        parser.error("--eval tests saved weights; it does not train, so it takes no --seeds or --ablate")
    if args.jobs > 1 and not (args.seeds or args.ablate):
        parser.error("--jobs splits --seeds or --ablate runs between processes; pass one of them")
    if args.ablate and not step.changes:
        parser.error(f"--ablate: step {step.number} declares no changes against a previous step")
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
        _write_hidden(path / "write-test", b"", "probe").unlink()
    except OSError as e:
        raise UserError(f"cannot write to --log-dir {path} ({e.strerror}); pass a folder you can write to") from None
    return path


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header_lines(run, mode):
    import torchvision
    args, data = run.args, run.data
    stats = data.stats
    return [f"step {run.step.number} ({mode}) - {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
            f"{f'seeds {seed_list(args.seeds)}' if args.seeds else f'seed {args.seed}'}, device {run.device}, "
            f"{job_threads(args.jobs)} CPU threads a run, --jobs {args.jobs}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
            f"recipe: {run.recipe.describe()}, {run.recipe.epochs} epochs",
            f"machine: {cpu_name()}, {os.cpu_count()} cores",
            f"data: {Path(args.data_dir or 'data').resolve()}",
            f"  train {stats['shape']} {stats['dtype']}, test {list(data.test_images.shape)}; pixel mean "
            f"{stats['mean']:.4f} std {stats['std']:.4f} (used to normalise), min {stats['min']:.1f} max {stats['max']:.1f}",
            f"  train class counts 0-9: {stats['class_counts']}"]


def input_warnings(run):
    """Lines for inputs that run but deserve a word: more epochs than allowed, a non-MNIST split."""
    out = []
    if run.recipe.epochs > MAX_EPOCHS:
        out.append(f"warning: --epochs {run.recipe.epochs} is more than the assignment's {MAX_EPOCHS}; "
                   f"the bar is judged on epochs {MAX_EPOCHS - LAST_N + 1}-{MAX_EPOCHS}")
    sizes = (len(run.data.train_labels), len(run.data.test_labels))
    if sizes != MNIST_SIZES:
        out.append(f"warning: {sizes[0]:,} train and {sizes[1]:,} test images, not MNIST's "
                   f"{MNIST_SIZES[0]:,} and {MNIST_SIZES[1]:,}: numbers are not comparable with MNIST's")
    return out


# ----------------------------------------------------------------------------- main

class Interrupted(KeyboardInterrupt):
    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


MODES = {"single": run_single, "seeds": run_seeds, "ablation": run_ablation}


def start(run, mode):
    """Check the inputs, load the data, write the header, then run the mode."""
    run.log_dir = check_log_dir(run.args.log_dir)
    run.data = load_data(run.args.data_dir or "data", run.device, download=run.args.data_dir is None)
    if run.recipe.batch_size > len(run.data.train_labels):
        raise UserError(f"--batch-size {run.recipe.batch_size} is larger than the "
                        f"{len(run.data.train_labels):,} training images; pass at most that")
    for line in header_lines(run, mode):
        run.say(line)
    for line in input_warnings(run):
        run.say(line)
        print(line, file=sys.stderr)
    MODES[mode](run)


def main(step, argv=None):
    """Parse flags, then run one mode. Exit 2 on bad flags; 1 on bad input, divergence or an
    unexpected failure; 128 + the signal's number when interrupted (130 for Ctrl-C)."""
    args = parse_args(step, argv)
    device = pick_device(args.device)
    recipe = dataclasses.replace(step.recipe, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 precision=resolve_precision(args.precision, device))
    mode = "eval" if args.eval is not None else "ablation" if args.ablate else "seeds" if args.seeds else "single"
    run = Run(step, args, recipe, device, f"step{step.number}" + ("" if mode in ("single", "eval") else f"_{mode}"))
    for sig in TERMINATING:
        signal.signal(sig, _interrupt)  # also when started with SIGINT ignored (a background job)
    try:
        _deterministic()
        run_eval(run) if mode == "eval" else start(run, mode)
    except BaseException as e:  # noqa: B036 - every way out gets one line, never a traceback
        sys.exit(report_failure(run, e))


def report_failure(run, error):
    """Print the one line a failure gets, keep what the run had, and return the exit status."""
    for sig in TERMINATING:
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the saving
    prog = f"step{run.step.number}.py"
    if isinstance(error, SystemExit):
        return error.code
    if isinstance(error, UserError):
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    if isinstance(error, Diverged):
        kept = run.keep_partial(f"diverged: {error}")
        print(f"{prog}: error: training diverged at epoch {error.epoch}, batch {error.batch} (loss "
              f"{error.loss}); try a lower --lr than {run.recipe.lr:g}. {kept}", file=sys.stderr)
        return 1
    if isinstance(error, KeyboardInterrupt):
        signum = getattr(error, "signum", signal.SIGINT)
        kept = run.keep_partial(f"interrupted by {signal.Signals(signum).name}")
        print(f"\n{prog}: interrupted ({signal.Signals(signum).name}). {kept}", file=sys.stderr)
        return 128 + signum
    details = traceback.format_exception(error)
    kept = run.keep_partial(f"failed: {type(error).__name__}: {error}", ["".join(details)])
    where = " (its traceback is at the end of the partial log)" if run.log_dir else ""
    print(f"{prog}: error: unexpected {type(error).__name__}: {str(error).rstrip('.')}{where}. {kept}",
          file=sys.stderr)
    return 1
