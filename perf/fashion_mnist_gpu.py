"""Fashion-MNIST on a GPU, as one command: the GPU recipe on all 54,000 training images with `--amp bf16`, the
original model, Retrain, and NGPlus, VarGrad and SalUn on one seed (random forgetting of 10 % of the training split).

Prints each model's accuracies, the seconds per training epoch, and each method's RTE as a fraction of Retrain's
training time; writes the same as JSON with --json. The runs go through the run pipeline (the stages main_baseline.py
and main_forget.py compose), so the numbers are the ones a user's commands give; models and result files go to --out.
Target on an H100-class GPU: the whole script under 10 minutes, the original model at >= 93 % test accuracy.

The four .gz files come from a folder given on the command line (a GPU machine may have no network; the files are
31 MB and can be copied along, e.g. from Debian's dataset-fashion-mnist package):

    python perf/fashion_mnist_gpu.py /usr/share/datasets/fashion-mnist --out /tmp/fmnist --json fmnist_gpu.json
    python perf/fashion_mnist_gpu.py FOLDER --quick        # a 200-image subset, width 4, 1 epoch: a CPU smoke test
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arg_parser import parse_config  # noqa: E402
from dataset import TRAIN_SPLIT_SEED, load_dataset, training_split  # noqa: E402
from pipeline.runs import forget  # noqa: E402
from pipeline.stages import prepare, train_reference  # noqa: E402
from utils import atomic_write_json, cli_main, device_name  # noqa: E402

METHODS = ("NGPlus", "VarGrad", "SalUn")
FORGET_FRACTION = 0.1
TARGET_TEST_ACCURACY = 93.0
TARGET_SECONDS = 600.0
# --quick: a stratified 200-image subset (the tests' files hold 300), a width-4 model, one epoch of everything
QUICK = ["--train_subset", "200", "--width", "4", "--epochs", "1", "--batch_size", "64", "--unlearn_epochs", "1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder holding the four Fashion-MNIST .gz files (or torchvision's layout)")
    p.add_argument("--out", type=Path, default=None,
                   help="where models and results go (default: a temporary folder, removed at the end)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON to this file")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--amp", default="bf16", choices=["off", "bf16"], help="mixed precision (default bf16)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one epoch: a smoke test that runs on a CPU")
    args = p.parse_args(argv)
    if args.out is not None:
        return run(args)
    with tempfile.TemporaryDirectory(prefix="fashion_mnist_gpu_") as out:
        args.out = Path(out)
        return run(args)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    data = load_dataset("fashion_mnist", args.data, download=False)
    subset = int(QUICK[1]) if args.quick else None
    train, _ = training_split(data.train_labels.numpy(), data.num_classes, TRAIN_SPLIT_SEED, subset)
    forget_count = max(1, round(FORGET_FRACTION * len(train)))

    def config(method: str):
        argv = ["--dataset", "fashion_mnist", "--data", str(args.data), "--no-download", "--seed", str(args.seed),
                "--save_dir", str(args.out), "--device", args.device, "--amp", args.amp, "--no-progress",
                "--class_to_replace", "-1", "--num_indexes_to_replace", str(forget_count), "--unlearn", method]
        return parse_config(argv + (QUICK if args.quick else []), "main_forget.py")

    reference = config("retrain")
    prepared = prepare(reference, data=data)
    device = prepared.device
    model = reference.model
    print(f"device {device_name(device)}; fashion_mnist, {len(prepared.split.train)} training images, "
          f"{len(prepared.split.forget)} forgotten; {model.arch} width {model.width or 'full'}, {model.epochs} epochs, "
          f"batch {model.batch_size}, amp {model.amp}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    report: dict = {"device": device_name(device), "quick": args.quick, "amp": model.amp, "arch": model.arch,
                    "width": model.width, "epochs": model.epochs, "batch_size": model.batch_size,
                    "train_images": len(prepared.split.train), "forget_images": len(prepared.split.forget),
                    "split_hash": prepared.split.hash, "models": {}, "methods": {}}
    for kind, retrain in (("original", False), ("Retrain", True)):
        summary = train_reference(prepared, retrain=retrain)
        entry = {"accuracy": summary["accuracy"], "train_seconds": summary["train_seconds"],
                 "epoch_seconds": summary["train_seconds"] / model.epochs}
        report["models"][kind] = entry
        acc = entry["accuracy"]
        print(f"{kind:9s}: test {acc['test']:.2f} %, val {acc['val']:.2f} %, train {acc['train']:.2f} %; "
              f"{entry['epoch_seconds']:.2f} s/epoch, {entry['train_seconds']:.1f} s", flush=True)
    retrain_seconds = report["models"]["Retrain"]["train_seconds"]
    for method in METHODS:
        cfg = config(method)
        result = forget(cfg, prepare(cfg, data=prepared.data, announce=False))
        entry = {key: result.get(key) for key in ("UA", "RA", "TA", "MIA_efficacy", "avg_gap", "RTE_seconds")}
        entry["rte_over_retrain"] = result["RTE_seconds"] / retrain_seconds
        report["methods"][method] = entry
        print(f"{method:9s}: UA {entry['UA']:.2f}, RA {entry['RA']:.2f}, TA {entry['TA']:.2f}, MIA-Eff "
              f"{entry['MIA_efficacy']:.2f}, Avg.Gap {entry['avg_gap']:.2f}; RTE {entry['RTE_seconds']:.1f} s = "
              f"{entry['rte_over_retrain']:.3f} of Retrain's", flush=True)
    report["total_seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    test = report["models"]["original"]["accuracy"]["test"]
    report["targets"] = {"original_test_accuracy": test >= TARGET_TEST_ACCURACY,
                         "total_seconds": report["total_seconds"] < TARGET_SECONDS}
    met = "; ".join(f"{name} {'met' if ok else 'missed'}" for name, ok in report["targets"].items())
    print(f"total {report['total_seconds']:.0f} s (target < {TARGET_SECONDS:.0f} s); original test accuracy "
          f"{test:.2f} % (target >= {TARGET_TEST_ACCURACY:.0f} %)" + ("; quick mode: targets not checked"
                                                                        if args.quick else f"\ntargets: {met}"))
    if args.json is not None:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    cli_main(main)
