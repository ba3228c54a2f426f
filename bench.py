"""Seconds per epoch of step 4's Net and recipe through the plain torchvision pipeline against
ours, interleaved epoch by epoch in one run so that all see the same machine. Each epoch is a
training pass plus a test pass. The rows add one thing at a time:

  plain: per-image RandomAffine (the same rotation and shift), ToTensor, Normalize, DataLoader,
         fp32
  ours:  the dataset as one tensor on the device, batched affine_grid + grid_sample, fp32:
         what the steps run
  + bf16 autocast for training (--precision bf16; the test pass stays fp32)

    python bench.py --data-dir ../shared/data --epochs 3
"""
import argparse
import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import common
import report
import runner
import step4


def plain_epoch(model, optimizer, scheduler, train_loader, test_loader, device):
    model.train()
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        loss = F.nll_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return 100 * correct / len(test_loader.dataset)


def ours_epoch(model, optimizer, scheduler, data, recipe, generator):
    batches = common.batches(data.train_images, data.train_labels, data.norm, recipe, generator)
    common.train_epoch(model, optimizer, scheduler, batches, recipe.precision)
    return common.percent(common.evaluate(model, data.test_images, data.test_labels, data.norm)[1],
                          len(data.test_labels))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DIR", "data"), help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain pipeline")
    parser.add_argument("--device", default="cpu", help="cpu (the claim in the README), cuda or cuda:N")
    args = parser.parse_args()
    if args.epochs < 1 or args.workers < 0:
        parser.error("--epochs must be at least 1 and --workers at least 0")
    if runner.device_problem(args.device):
        parser.error(f"argument --device: {runner.device_problem(args.device)}")
    return parser, args


def plain_loaders(data_dir, norm, recipe, workers):
    """torchvision's MNIST through a DataLoader, with the same rotation and shift per image."""
    to_tensor = [transforms.ToTensor(), transforms.Normalize((norm[0],), (norm[1],))]
    train_set = datasets.MNIST(data_dir, train=True, transform=transforms.Compose(
        [transforms.RandomAffine(recipe.max_rotation, translate=(recipe.max_shift / 28,) * 2, fill=0)]
        + to_tensor))
    test_set = datasets.MNIST(data_dir, train=False, transform=transforms.Compose(to_tensor))
    return (DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, num_workers=workers),
            DataLoader(test_set, batch_size=1000, num_workers=workers))


PIPELINES = {  # name -> (pipeline, precision)
    "plain: DataLoader, per-image affine, fp32": ("plain", "fp32"),
    "ours: tensors, batched affine, fp32": ("ours", "fp32"),
    "ours + bf16 autocast": ("ours", "bf16"),
}


def main():
    parser, args = parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)  # as the steps do, for every pipeline
    recipe = step4.RECIPE
    try:
        data = common.load_data(args.data_dir, device)
    except common.UserError as e:
        parser.exit(1, f"bench.py: error: {e}\n")
    train_loader, test_loader = plain_loaders(args.data_dir, data.norm, recipe, args.workers)
    runs = {}
    for name, (kind, precision) in PIPELINES.items():
        torch.manual_seed(1)
        r = dataclasses.replace(recipe, precision=precision)
        model = common.make_net(step4.Net, r).to(device)
        optimizer, scheduler = common.make_optimizer(model, dataclasses.replace(r, epochs=args.epochs),
                                                     len(train_loader))
        runs[name] = (kind, r, model, optimizer, scheduler, torch.Generator().manual_seed(1), [], [])
    print(f"step 4 Net ({common.count_params(step4.Net()):,} parameters), batch {recipe.batch_size}, "
          f"device {device}, {torch.get_num_threads()} CPU threads ({report.cpu_name()}), torch "
          f"{torch.__version__}, {args.epochs} epochs each, interleaved")
    for epoch in range(1, args.epochs + 1):
        for name, (kind, r, model, optimizer, scheduler, g, times, accs) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if kind == "plain":
                acc = plain_epoch(model, optimizer, scheduler, train_loader, test_loader, device)
            else:
                acc = ours_epoch(model, optimizer, scheduler, data, r, g)
            times.append(time.perf_counter() - start)  # both end in a host sync (.item())
            accs.append(acc)
            print(f"epoch {epoch} {name:<46} {times[-1]:6.1f} s  test {acc:.2f}", flush=True)
    print_table(runs, device)


def print_table(runs, device):
    steps_row = ("ours", common.resolve_precision("auto", device))  # what a step runs: --precision auto
    base = statistics.mean(next(iter(runs.values()))[6])
    print(f"\n{'pipeline':<46} {'s/epoch':>8} {'speed-up':>9}")
    for name, run in runs.items():
        mean = statistics.mean(run[6])
        mark = "  <- what the steps run on this device" if PIPELINES[name] == steps_row else ""
        print(f"{name:<46} {mean:8.2f} {base / mean:8.2f}x{mark}")


if __name__ == "__main__":
    main()
