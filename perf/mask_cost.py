"""Per-step cost of the gradient-mask add-ons next to the plain base method, measured side by side in one process.

    .venv/bin/python perf/mask_cost.py                       # resnet18 width 16 on digits_noisy, NGPlus, all modes
    .venv/bin/python perf/mask_cost.py --bases NGPlus SRL SCRUB --steps 50 --device cuda

Every (base, mode) gets its own copy of the same initial model, its own Adam optimiser and GradientMask, and the same
fixed pool of (forget, retain) batches, so the timings compare the update rule only (no data loading). A step is what
`BiObjectiveMethod.run_epoch` does per batch pair: `step()` plus reading the mask's kept fraction. After a warm-up, the
configurations are timed in interleaved rounds (each round times every configuration for --steps steps) and the median
over rounds is reported, which keeps slow drifts of a shared machine from favouring one configuration. The ratio is to
the base with mode `none` (for NGPlus: plain NegGrad+). "mask ms" times `GradientMask.direction` alone (plus the
kept-fraction read) on one captured set of gradients. On CPU the default clock is the process's CPU time, so other
jobs on a shared machine do not inflate the numbers (use --threads 1 there). Budget: NGPlus+prob within 1.3x of NGPlus
per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import SplitData, load_dataset, make_split  # noqa: E402
from models import count_parameters, create_model  # noqa: E402
from unlearn import UnlearnContext, resolve_hyperparameters, resolve_method  # noqa: E402
from unlearn.masks import MASK_MODES  # noqa: E402
from utils import device_name, make_generator, resolve_device, synchronize  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits_noisy")
    p.add_argument("--data", default="../data", help="dataset root (CIFAR/SVHN only)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--bases", nargs="+", default=["NGPlus"], help="bi-objective bases to time")
    p.add_argument("--modes", nargs="+", default=list(MASK_MODES), choices=MASK_MODES)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--quantile", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time (robust to other load on a shared machine, "
                        "sums over threads); auto: cpu on CPU devices, wall on CUDA")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def batch_pool(splits: SplitData, batch_size: int, count: int, generator: torch.Generator):
    """`count` (forget, retain) batch pairs of full size, prepared once on the device."""
    forget = list(splits.train_loader("forget", generator, batch_size=batch_size, augment=False))
    retain = list(splits.train_loader("retain", generator, batch_size=batch_size, augment=False))
    forget = [b for b in forget if len(b[1]) == batch_size]
    return [(*forget[i % len(forget)], *retain[i % len(retain)]) for i in range(count)]


def build(base: str, mode: str, model: torch.nn.Module, splits: SplitData, args, seed: int):
    resolved = resolve_method(base, mode)
    hp = resolve_hyperparameters(resolved, {"beta": args.beta, "quantile": args.quantile,
                                            "batch_size": args.batch_size})
    ctx = UnlearnContext(model=model, data=splits, generator=make_generator(seed), hp=hp, progress=False)
    method = resolved.cls(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreachable q does not change the cost
        method.setup()
    method.model.train()
    return method


def captured_gradients(method, batch):
    """(g_U, g_C, saliency) that the method's step hands to its mask, for timing the mask alone."""
    captured = {}
    direction = method.mask.direction

    def capture(forget, retain, saliency=None):
        captured["args"] = ([g.clone() for g in forget], [g.clone() for g in retain],
                            None if saliency is None else [g.clone() for g in saliency])
        return direction(forget, retain, saliency)

    method.mask.direction = capture
    method.step(*batch)
    method.mask.direction = direction
    return captured["args"]


def run_mask(method, gradients, count: int) -> None:
    for _ in range(count):
        method.mask.direction(*gradients)
        _ = method.mask.kept_count  # as run_epoch records every step (counted on the device, no host sync)


def run_steps(method, batches, start: int, count: int) -> None:
    for i in range(start, start + count):
        method.step(*batches[i % len(batches)])
        _ = method.mask.kept_count  # as run_epoch records every step (counted on the device, no host sync)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data).to(device)
    forget_size = min(4 * args.batch_size, len(data.train_labels) // 4)
    split = make_split(data, class_to_replace=-1, num_indexes_to_replace=forget_size, seed=args.seed)
    splits = SplitData(data, split, batch_size=args.batch_size, augment=False)
    batches = batch_pool(splits, args.batch_size, 8, make_generator(args.seed))
    torch.manual_seed(args.seed)
    initial = create_model(args.arch, data.num_classes, in_channels=data.in_channels, width=args.width,
                           mean=data.mean, std=data.std).to(device)

    configs = [(base, mode) for base in args.bases for mode in args.modes]
    methods = {}
    for base, mode in configs:
        model = create_model(args.arch, data.num_classes, in_channels=data.in_channels, width=args.width,
                             mean=data.mean, std=data.std).to(device)
        model.load_state_dict(initial.state_dict())
        methods[base, mode] = build(base, mode, model, splits, args, args.seed)
        run_steps(methods[base, mode], batches, 0, args.warmup)

    clock = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    now = time.perf_counter if clock == "wall" else time.process_time

    def timed(fn, *fn_args) -> float:
        synchronize(device)
        start = now()
        fn(*fn_args)
        synchronize(device)
        return now() - start

    times = {config: [] for config in configs}
    mask_times = {config: [] for config in configs}
    kept = {config: [] for config in configs}
    gradients = {config: captured_gradients(methods[config], batches[0]) for config in configs}
    for round_index in range(args.rounds):
        for config in configs:
            start_step = args.warmup + 1 + round_index * args.steps
            times[config].append(timed(run_steps, methods[config], batches, start_step, args.steps) / args.steps)
            kept[config].append(methods[config].mask.kept_fraction)
            mask_times[config].append(timed(run_mask, methods[config], gradients[config], args.steps) / args.steps)

    params = count_parameters(initial)
    print(f"{args.arch} width {args.width} ({params:,} parameters, {len(list(initial.parameters()))} tensors) on "
          f"{args.dataset}, batch {args.batch_size}, {device_name(device)}, {torch.get_num_threads()} CPU threads; "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps; "
          f"median per step, {clock} clock")
    print(f"{'base':8s} {'mode':10s} {'ms/step':>9s} {'min':>8s} {'max':>8s} {'ratio':>7s} "
          f"{'mask ms':>8s} {'kept':>6s}")
    for base in args.bases:
        reference = statistics.median(times[base, "none"]) if (base, "none") in times else None
        for mode in args.modes:
            per_step = times[base, mode]
            median = statistics.median(per_step)
            ratio = f"{median / reference:7.2f}" if reference else f"{'-':>7s}"
            print(f"{base:8s} {mode:10s} {1e3 * median:9.2f} {1e3 * min(per_step):8.2f} {1e3 * max(per_step):8.2f} "
                  f"{ratio} {1e3 * statistics.median(mask_times[base, mode]):8.2f} {kept[base, mode][-1]:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
