"""Overhead of our training loop versus a bare PyTorch loop, measured side by side in one run.

Both loops train the same architecture from the same initialisation on the same batches (same order, same device),
alternating repetitions so that machine load affects both equally. Prints the time per epoch and the ratio.

    python perf/train_loop_overhead.py                                   # digits, width-16 ResNet-18
    python perf/train_loop_overhead.py --synthetic-cifar 45000 --width 64 --device cuda   # CIFAR-shaped data
    python perf/train_loop_overhead.py --dataset fashion_mnist --data /usr/share/datasets/fashion-mnist \
        --train_subset 2000 --repeats 3                                  # Fashion-MNIST, the CPU tier's model
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import SplitData, load_dataset, make_split  # noqa: E402
from models import create_model  # noqa: E402
from perf.gpu_path import synthetic_cifar  # noqa: E402  (one CIFAR-shaped synthetic set for every perf script)
from training import TrainRecipe, make_optimizer, train_one_epoch  # noqa: E402
from utils import make_generator, resolve_device, synchronize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data", default="../data", help="dataset root, as the run scripts' --data")
    p.add_argument("--train_subset", type=int, default=None, help="train on this stratified subset, as the run scripts")
    p.add_argument("--synthetic-cifar", type=int, default=0, help="use N CIFAR-shaped random images instead")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    data = (synthetic_cifar(args.synthetic_cifar) if args.synthetic_cifar else
            load_dataset(args.dataset, args.data, download=False)).to(device)
    split = make_split(data, -1, 1, seed=1, train_subset=None if args.synthetic_cifar else args.train_subset)
    splits = SplitData(data, split, batch_size=args.batch_size)

    def fresh():
        torch.manual_seed(0)
        return create_model(args.arch, data.num_classes, data.in_channels, args.width, data.mean, data.std).to(device)

    recipe = TrainRecipe(lr=0.05, batch_size=args.batch_size)
    # The bare loop sees exactly the batches our loader produces (materialised beforehand, so it pays no loader cost).
    batches = list(splits.train_loader("train", make_generator(1), batch_size=args.batch_size))

    def ours() -> float:
        model = fresh()
        opt = make_optimizer(model, recipe)
        loader = splits.train_loader("train", make_generator(1), batch_size=args.batch_size)
        synchronize(device)
        start = time.perf_counter()
        train_one_epoch(model, loader, opt)
        synchronize(device)
        return time.perf_counter() - start

    def bare() -> float:
        model = fresh()
        opt = make_optimizer(model, recipe)
        model.train()
        synchronize(device)
        start = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        synchronize(device)
        return time.perf_counter() - start

    ours(), bare()  # warm-up (allocator, kernels)
    times = {"ours": [], "bare": []}
    for _ in range(args.repeats):
        times["ours"].append(ours())
        times["bare"].append(bare())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ours_t, bare_t = statistics.median(times["ours"]), statistics.median(times["bare"])
    print(f"device {name}; {args.arch} width {args.width}; {len(batches)} batches of {args.batch_size} "
          f"({'synthetic CIFAR' if args.synthetic_cifar else args.dataset}, {len(split.train)} training images); "
          f"median of {args.repeats}; {torch.get_num_threads()} CPU thread(s)")
    print(f"our loop  : {ours_t * 1000:9.1f} ms/epoch")
    print(f"bare loop : {bare_t * 1000:9.1f} ms/epoch")
    print(f"ratio     : {ours_t / bare_t:9.3f}  (our loop includes shuffling/augmentation; the bare one does not)")


if __name__ == "__main__":
    main()
