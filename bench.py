"""Seconds per epoch of step 4's Net and recipe through the plain torchvision pipeline
(per-image RandomAffine: the same rotation and shift, ToTensor, Normalize, DataLoader, fp32) against ours (the dataset as
one tensor, batched rotation, bf16 autocast on CPU), interleaved in one run so both see the same
machine. Each epoch is a training pass plus a test pass.

    python bench.py --data-dir ../shared/data --epochs 2
"""
import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import common
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
    common.train_epoch(model, optimizer, scheduler, *data["train"], recipe.batch_size, generator,
                       data["norm"], recipe.max_rotation, recipe.precision)
    return common.evaluate(model, *data["test"], data["norm"])[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=common.os.environ.get("MNIST_DIR", "data"), help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain pipeline")
    args = parser.parse_args()
    device = torch.device("cpu")
    torch.set_flush_denormal(True)  # as the steps do, for every pipeline
    recipe = step4.RECIPE
    try:
        raw = common.load_mnist(args.data_dir)
    except common.UserError as e:
        parser.exit(1, f"bench.py: error: {e}\n")
    stats = common.data_stats(raw["train_images"], raw["train_labels"])
    norm = (stats["mean"], stats["std"])
    data = {"train": common.to_device(raw["train_images"], raw["train_labels"], device),
            "test": common.to_device(raw["test_images"], raw["test_labels"], device), "norm": norm}
    to_tensor = [transforms.ToTensor(), transforms.Normalize((norm[0],), (norm[1],))]
    train_set = datasets.MNIST(args.data_dir, train=True, transform=transforms.Compose(
        [transforms.RandomAffine(recipe.max_rotation, translate=(recipe.max_shift / 28,) * 2, fill=0)]
        + to_tensor))
    test_set = datasets.MNIST(args.data_dir, train=False, transform=transforms.Compose(to_tensor))
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, num_workers=args.workers)
    test_loader = DataLoader(test_set, batch_size=1000, num_workers=args.workers)

    pipelines = {
        "plain (DataLoader, per-image affine, fp32)": "plain",
        "ours, fp32 (tensors, batched affine)": "fp32",
        "ours, bf16 autocast (what the steps run)": "bf16",
    }
    runs = {}
    for name, kind in pipelines.items():
        torch.manual_seed(1)
        r = dataclasses.replace(recipe, precision="fp32" if kind == "plain" else kind)
        model = common.make_net(step4.Net, r)
        optimizer, scheduler = common.make_optimizer(model, dataclasses.replace(r, epochs=args.epochs),
                                                     len(train_loader))
        runs[name] = (kind, r, model, optimizer, scheduler, torch.Generator().manual_seed(1), [], [])
    print(f"step 4 Net ({common.count_params(step4.Net()):,} parameters), batch {recipe.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.epochs} epochs each, interleaved")
    for epoch in range(1, args.epochs + 1):
        for name, (kind, r, model, optimizer, scheduler, g, times, accs) in runs.items():
            start = time.perf_counter()
            if kind == "plain":
                acc = plain_epoch(model, optimizer, scheduler, train_loader, test_loader, device)
            else:
                acc = ours_epoch(model, optimizer, scheduler, data, r, g)
            times.append(time.perf_counter() - start)
            accs.append(acc)
            print(f"epoch {epoch} {name:<46} {times[-1]:6.1f} s  test {acc:.2f}", flush=True)
    base = statistics.mean(next(iter(runs.values()))[6])
    print(f"\n{'pipeline':<46} {'s/epoch':>8} {'speed-up':>9}")
    for name, run in runs.items():
        mean = statistics.mean(run[6])
        print(f"{name:<46} {mean:8.1f} {base / mean:8.2f}x")


if __name__ == "__main__":
    main()
