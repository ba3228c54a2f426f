"""The ML core of the four steps, in the order a run uses it: the assignment's numbers, the
recipe, model pieces, data, batches, train, evaluate, and what a model is made of (parameters
and receptive field per layer). A step file builds its `Net` from these pieces; `report.py`
turns a run into words, pictures and files, `runner.py` runs it from the command line. Nothing
here writes a file or touches a signal; the one output is `train`'s optional progress bar.
"""
import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- settings
BAR_PER_10K = 9_940        # the bar as a count: correct test images per 10,000 (99.40%)
BAR = BAR_PER_10K / 100    # the same bar in percent, for printing and plots only
LAST_N = 3                 # the bar applies to each of the last LAST_N epochs...
MAX_EPOCHS = 15            # ...within the assignment's 15 epochs
PARAM_BUDGET = 10_000      # parameters allowed from step 2 on
ROTATED_TEST_DEG = 15.0    # the rotated test copy: angles uniform in +-15 degrees...
ROTATED_TEST_SEED = 0      # ...drawn once from this seed, the same for every step
EVAL_BATCH = 256           # test-time batch: on the 2-core CPU 0.2 s a test pass, 1.0 s at 2,000
CHECK_EVERY = 50           # batches between checks for a non-finite loss (each check syncs a GPU)
WARP_GRID = 4              # Recipe.max_warp: displacements drawn on a 4x4 lattice, about 9 pixels apart
CLEAN_BN_IMAGES = 40 * EVAL_BATCH  # Recipe.clean_bn measures BatchNorm's statistics on this many training images
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
    warmup: float = 0.3            # one-cycle: the share of the steps that rise to the peak LR
    max_rotation: float = 0.0      # degrees; each training image gets its own angle
    max_shift: float = 0.0         # pixels; each training image gets its own shift in x and y
    max_scale: float = 0.0         # each training image drawn at its own size, 1 +- this (0.1: 90-110%)
    max_warp: float = 0.0          # pixels; each training image also bent by its own smooth field (see warp_field)
    dropout: float | None = None   # passed to Net(dropout=...) when set
    ema_decay: float = 0.0         # > 0: test and save a moving average of the weights, not the last
    label_smoothing: float = 0.0   # > 0: the loss aims at 1 - this for the true digit, the rest spread evenly
    clean_epochs: int = 0          # the last this many epochs train on the images as they are, unaugmented
    clean_bn: bool = False         # test with BatchNorm statistics measured afresh on unaugmented training images
    precision: str = "auto"        # "bf16" autocast, "fp32", or "auto": see resolve_precision

    @property
    def augmented(self):
        return bool(self.max_rotation or self.max_shift or self.max_scale or self.max_warp)

    def without_augmentation(self):
        """The same recipe with every augmentation bound at 0 (beside `augmented`: one place to
        name them)."""
        return dataclasses.replace(self, max_rotation=0.0, max_shift=0.0, max_scale=0.0,
                                   max_warp=0.0)

    def describe(self):
        warmup = f", {self.warmup:.0%} rising" * (self.warmup != 0.3)
        sched = f"one-cycle (peak lr {self.lr:g}{warmup})" if self.schedule == "onecycle" \
            else f"constant lr {self.lr:g}"
        aug = [f"random rotation +-{self.max_rotation:g} deg"] * bool(self.max_rotation) \
            + [f"random shift +-{self.max_shift:g} px"] * bool(self.max_shift) \
            + [f"random scale +-{self.max_scale:.0%}"] * bool(self.max_scale) \
            + [f"random elastic warp +-{self.max_warp:g} px"] * bool(self.max_warp)
        extras = [] if self.dropout is None else [f"dropout {self.dropout:g}"]
        extras += [f"tested on an EMA of the weights (decay {self.ema_decay:g})"] * bool(self.ema_decay)
        extras += [f"label smoothing {self.label_smoothing:g}"] * bool(self.label_smoothing)
        extras += [f"no augmentation in the last {self.clean_epochs} epochs"] * bool(self.clean_epochs)
        extras += ["BatchNorm statistics of the unaugmented training images"] * self.clean_bn
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


def separable_block(c_in, c_out=None, kernel=3, padding=0, bn=True, dropout=0.0):
    """A 3x3 (or kernel x kernel) conv in two parts: the kernel within each channel (depthwise),
    then conv_block's 1x1 across channels (to c_out, default c_in); 9c + c^2 weights instead of
    9c^2, so the same budget buys about 2.5 times the channels."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, kernel, padding=padding, groups=c_in, bias=False),
                         conv_block(c_in, c_out or c_in, kernel=1, bn=bn, dropout=dropout))


class BlurPool(nn.Module):
    """MaxPool2d(2) made shift-tolerant (Zhang, "Making convolutional networks shift-invariant
    again", 2019): the max over each 2x2 window at stride 1, then a fixed [1, 2, 1] x [1, 2, 1] / 16
    blur at stride 2. The map halves as under MaxPool2d(2), but a digit moved by one pixel moves
    the output smoothly instead of changing which pixel wins each window. No weights: the blur is
    a buffer. kernel_size and stride are the two together's, for layer_table's receptive field."""
    kernel_size, stride = 4, 2

    def __init__(self, channels):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur", (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        x = F.pad(F.max_pool2d(x, 2, stride=1), (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.blur, stride=2, groups=x.shape[1])


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
    try:
        for name, (magic, dims) in MNIST_FILES.items():
            problem = _raw_file_problem(raw / name, magic, dims)
            if problem:
                raise UserError(f"{raw / name} {problem}: it is corrupt; delete it and download MNIST again")
        train, test = MNIST(root, train=True), MNIST(root, train=False)
    except OSError as e:  # unreadable (permissions), or gone while being read
        raise UserError(f"cannot read {e.filename or raw} ({e.strerror or type(e).__name__}); make it "
                        f"readable, or point --data-dir or MNIST_DIR at a readable copy") from None
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


def load_data(data_dir, device, download=False, validation=0):
    """The whole dataset as one set of tensors on the device, with its measured statistics. With
    `validation`, the last that many training images take the test set's place (it is not read),
    and the statistics are those of the training images that remain."""
    raw = load_mnist(data_dir, download)
    if validation:
        cut = len(raw["train_labels"]) - validation
        raw = {"train_images": raw["train_images"][:cut], "train_labels": raw["train_labels"][:cut],
               "test_images": raw["train_images"][cut:], "test_labels": raw["train_labels"][cut:]}
    stats = data_stats(raw["train_images"], raw["train_labels"])
    if stats["std"] == 0:  # normalising would divide by zero, and every loss would be NaN
        raise UserError(f"the training images in {Path(data_dir) / 'MNIST' / 'raw'} have one pixel value "
                        f"throughout (std 0): they hold no digits; download MNIST again")
    return Data(*to_device(raw["train_images"], raw["train_labels"], device),
                *to_device(raw["test_images"], raw["test_labels"], device),
                norm=(stats["mean"], stats["std"]), stats=stats)


# ----------------------------------------------------------------------------- batches

def affine(images, degrees, shifts, scales=None, warps=None):
    """Turn each image (N, 1, H, W) by its own angle, move it by its own (dx, dy) pixels, with
    `scales` (N,) draw it at its own size (2: twice as large) and with `warps` (N, 2, G, G) bend
    it (warp_field), in one batched op; zeros fill in."""
    rad = degrees.to(images.device, images.dtype) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    if scales is not None:  # the grid maps output to input pixels, so a larger digit samples a smaller area
        shrink = 1 / scales.to(images.device, images.dtype)
        cos, sin = cos * shrink, sin * shrink
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
    dx, dy = (shifts.to(images.device, images.dtype) * 2 / images.shape[-1]).unbind(1)
    theta = torch.stack([torch.stack([cos, -sin, dx], 1),
                         torch.stack([sin, cos, dy], 1)], 1)            # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if warps is not None:
        grid = grid + warp_field(warps.to(images.device, images.dtype), images.shape[-1])
    return F.grid_sample(images, grid, align_corners=False)


def warp_field(warps, size):
    """Elastic distortion (Simard et al., 2003) made cheaply: displacements (N, 2, G, G) in pixels
    on a coarse G x G lattice, (dx, dy) per point, interpolated smoothly (bicubic) to every pixel
    of a size x size image; returned as grid offsets (N, size, size, 2) in affine_grid's [-1, 1]
    units. A coarse lattice gives a smooth field, so strokes bend rather than break."""
    field = F.interpolate(warps * (2 / size), size=(size, size), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def uniform_symmetric(n, bound, generator):
    """n draws uniform in [-bound, bound] from a CPU generator: the same whatever the device."""
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


def draw_augmentation(n, batch_size, max_rotation, max_shift, generator, max_scale=0.0, max_warp=0.0):
    """One epoch's angles (n,), shifts (n, 2), scales (n,) or None and warps (n, 2, WARP_GRID,
    WARP_GRID) or None, drawn batch by batch (shifts, angles, scales, warps), so the stream of
    random numbers is the same on any device; a bound of 0 draws nothing."""
    angles, shifts, scales, warps = [], [], [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        shifts.append(uniform_symmetric(2 * size, max_shift, generator).view(size, 2)
                      if max_shift else torch.zeros(size, 2))
        angles.append(uniform_symmetric(size, max_rotation, generator)
                      if max_rotation else torch.zeros(size))
        if max_scale:
            scales.append(1 + uniform_symmetric(size, max_scale, generator))
        if max_warp:
            warps.append(uniform_symmetric(size * 2 * WARP_GRID ** 2, max_warp, generator)
                         .view(size, 2, WARP_GRID, WARP_GRID))
    return (torch.cat(angles), torch.cat(shifts), torch.cat(scales) if scales else None,
            torch.cat(warps) if warps else None)


def batches(images, labels, norm, recipe, generator):
    """One epoch of shuffled, augmented, normalised batches (images, labels). The random numbers
    come from `generator` for the whole epoch up front and reach the device in one copy, not one
    (a host sync on a GPU) per batch."""
    n, size = len(images), recipe.batch_size
    order = torch.randperm(n, generator=generator).to(images.device)
    augment = recipe.augmented
    if augment:
        drawn = [None if d is None else d.to(images.device) for d in draw_augmentation(
            n, size, recipe.max_rotation, recipe.max_shift, generator, recipe.max_scale, recipe.max_warp)]
    mean, std = norm
    for start in range(0, n, size):
        x = images[order[start:start + size]]
        if augment:  # angles, shifts, scales, warps: this batch's share of each
            x = affine(x, *(None if d is None else d[start:start + size] for d in drawn))
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
        optimizer, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=recipe.warmup)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, kept in a
    copy of the model (`self.model`), which is what gets tested and saved."""

    def __init__(self, model, decay):
        self.model, self.decay, self.steps = copy.deepcopy(model), decay, 0
        # made once a run: the state_dict tensors share storage with the modules' own
        self.pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))

    def update(self):
        """Move each average a step towards its model tensor. The decay ramps up from 0.1 at
        step 1, so the average forgets the random initial weights within the first epoch."""
        self.steps += 1
        weight = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for mean, now in self.pairs:
            if mean.is_floating_point():
                mean.lerp_(now, weight)
            else:
                mean.copy_(now)  # BatchNorm's batch counter


def train_epoch(model, optimizer, scheduler, batches, precision, average=None, label_smoothing=0.0):
    """One pass over `batches`. Returns {"loss", "correct", "total", "lr"} (loss: mean over the
    images; lr: the last one used); raises Diverged at the first non-finite loss. With `average`
    (a WeightAverage), each step also moves the average."""
    model.train()
    device = next(model.parameters()).device
    losses, correct, total = [], torch.zeros((), dtype=torch.long, device=device), 0
    for images, labels in batches:
        with autocast(device, precision):
            out = model(images)
            loss = smoothed_nll(out.float(), labels, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach() * len(labels))  # kept on the device: no sync a batch
        if average is not None:
            average.update()
        correct += (out.argmax(1) == labels).sum()
        total += len(labels)
        if len(losses) % CHECK_EVERY == 0:
            check_finite(losses, len(losses) - CHECK_EVERY)
    check_finite(losses, len(losses) - len(losses) % CHECK_EVERY)
    return {"loss": torch.stack(losses).sum().item() / total, "correct": int(correct),
            "total": total, "lr": lr}


def smoothed_nll(log_probs, labels, smoothing):
    """The negative log-likelihood of the true digit, or with `smoothing` of a target that gives the
    true digit 1 - smoothing and spreads smoothing over all ten (cross_entropy's label_smoothing;
    log_softmax of log-probabilities is themselves, so passing them is exact)."""
    if not smoothing:
        return F.nll_loss(log_probs, labels)
    return F.cross_entropy(log_probs, labels, label_smoothing=smoothing)


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


def confusion_matrix(predicted, labels):
    """10x10 counts, rows = true digit, columns = predicted digit."""
    return torch.bincount(labels * 10 + predicted, minlength=100).view(10, 10).cpu()


@torch.no_grad()
def with_clean_bn(model, images, norm):
    """A copy of `model` whose BatchNorm statistics are measured afresh on `images` (training
    images as they are), averaged over chunks of EVAL_BATCH with equal weight: the running
    statistics come from augmented batches and, in a moving average of the weights, from weights
    other than the tested ones."""
    model = copy.deepcopy(model)
    mean, std = norm
    chunks = ((images[start:start + EVAL_BATCH] - mean) / std for start in range(0, len(images), EVAL_BATCH))
    torch.optim.swa_utils.update_bn(chunks, model)
    return model


def train(Net, recipe, data, seed, progress=False):
    """Train one model from scratch; after each epoch yield (tested model, epoch entry): the
    model as trained, or with recipe.ema_decay its moving average, which is what gets tested."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation, device-independent
    model = make_net(Net, recipe).to(data.train_images.device)
    average = WeightAverage(model, recipe.ema_decay) if recipe.ema_decay else None
    tested = average.model if average else model
    steps = math.ceil(len(data.train_labels) / recipe.batch_size)
    optimizer, scheduler = make_optimizer(model, recipe, steps)
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        clean = epoch > recipe.epochs - recipe.clean_epochs  # the last epochs see the digits as the test set has them
        epoch_recipe = recipe.without_augmentation() if clean else recipe
        epoch_batches = batches(data.train_images, data.train_labels, data.norm, epoch_recipe, generator)
        if progress:
            from tqdm import tqdm
            epoch_batches = tqdm(epoch_batches, total=steps, desc=f"epoch {epoch}/{recipe.epochs}", leave=False)
        try:
            stats = train_epoch(model, optimizer, scheduler, epoch_batches, recipe.precision, average,
                                recipe.label_smoothing)
        except Diverged as e:
            raise Diverged(e.batch, e.loss, epoch) from None
        trained = time.perf_counter()
        tested_now = with_clean_bn(tested, data.train_images[:CLEAN_BN_IMAGES], data.norm) if recipe.clean_bn \
            else tested
        test_loss, test_correct = evaluate(tested_now, data.test_images, data.test_labels, data.norm)
        yield tested_now, {"epoch": epoch, "train_loss": round(stats["loss"], 6),
                           "train_correct": stats["correct"], "train_total": stats["total"],
                           "test_loss": round(test_loss, 6), "test_correct": test_correct,
                           "test_total": len(data.test_labels), "lr": float(f"{stats['lr']:.6g}"),
                           "train_seconds": round(trained - start, 2),
                           "seconds": round(time.perf_counter() - start, 2)}


def rotated_copy(images):
    """The fixed rotated test set used to measure robustness (same angles for every step)."""
    g = torch.Generator().manual_seed(ROTATED_TEST_SEED)
    return affine(images, uniform_symmetric(len(images), ROTATED_TEST_DEG, g), torch.zeros(len(images), 2))


def train_job(variant, Net, recipe, seed, data):
    """Train one seed to the end; its history and its rotated-copy count, as plain data."""
    history = []
    for model, entry in train(Net, recipe, data, seed):
        history.append(entry)
    rotated = evaluate(model, rotated_copy(data.test_images), data.test_labels, data.norm)[1]
    return {"variant": variant, "seed": seed, "history": history,
            "rotated_test": {"correct": rotated, "total": len(data.test_labels)}}


def percent(correct, total):
    return 100 * correct / total


def holds_bar(correct, total):
    """The bar as an exact integer comparison: 9,940 of 10,000 holds, 9,939 does not."""
    return correct * 10_000 >= BAR_PER_10K * total


# ----------------------------------------------------------------------------- what a model is made of

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
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, BlurPool)):
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
