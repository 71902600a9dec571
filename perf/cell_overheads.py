"""The per-epoch and per-cell overheads of a benchmark cell, old way against new way, side by side in one process.

    .venv/bin/python perf/cell_overheads.py              # the benchmark's model: resnet18, width 16, digits_noisy
    .venv/bin/python perf/cell_overheads.py --repeats 500

After every epoch the divergence guard (`unlearn.driver.run_unlearning`) keeps a copy of the last finite state and
checks the new one for inf/NaN; every cell reads the original and the Retrain checkpoints. On a model this small these
fixed costs are a visible part of an epoch (a bi-objective epoch is about 0.1 s on one CPU thread), so they were made
cheaper without changing a number:

  copy        `copy.deepcopy(model.state_dict())` | `copy_state(model, into=<last copy>)` (bitwise the same copy)
  finite      one `isfinite(t).all()` per tensor, stacked | `state_is_finite` (grouped abs and max kernels)
  checkpoint  `utils.load_checkpoint` | `pipeline.stages.read_checkpoint` (read once per file version per process)

The two ways alternate in every round (a busy machine slows both alike); the median per call and the ratio are
printed. The script also checks that both ways agree (equal copies, equal verdicts on a finite and a poisoned model).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import create_model  # noqa: E402
from pipeline.stages import read_checkpoint  # noqa: E402
from unlearn.driver import copy_state, state_is_finite  # noqa: E402
from utils import atomic_torch_save, load_checkpoint  # noqa: E402


def finite_per_tensor(model: torch.nn.Module) -> bool:
    """The check as it was: one flag per tensor, stacked, one host sync."""
    flags = [torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all())


def seconds_per_call(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="calls per way and round (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is printed (default 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a benchmark cell runs
    torch.manual_seed(0)
    model = create_model("resnet18", 10, in_channels=1, width=16)
    last = copy_state(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pth.tar"
        atomic_torch_save(path, {"state_dict": model.state_dict(), "epoch": 30})
        ways = {
            "copy": (lambda: copy.deepcopy(model.state_dict()), lambda: copy_state(model, into=last)),
            "finite": (lambda: finite_per_tensor(model), lambda: state_is_finite(model)),
            "checkpoint": (lambda: load_checkpoint(path), lambda: read_checkpoint(path)),
        }
        # Both ways agree before anything is timed.
        assert all(torch.equal(a, b) for a, b in zip(copy.deepcopy(model.state_dict()).values(),
                                                      copy_state(model, into=last).values()))
        assert finite_per_tensor(model) and state_is_finite(model)
        assert torch.equal(read_checkpoint(path)["state_dict"]["fc.weight"],
                           load_checkpoint(path)["state_dict"]["fc.weight"])
        poisoned = copy.deepcopy(model)
        with torch.no_grad():
            next(poisoned.parameters())[0].fill_(float("nan"))
        assert not finite_per_tensor(poisoned) and not state_is_finite(poisoned)

        print(f"resnet18 width 16, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{len(model.state_dict())} tensors; one CPU thread; "
              f"median of {args.rounds} rounds of {args.repeats} calls")
        print(f"{'part':<11} {'before ms':>10} {'after ms':>9} {'before/after':>13}")
        for name, (before, after) in ways.items():
            times: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                times["before"].append(seconds_per_call(before, args.repeats))
                times["after"].append(seconds_per_call(after, args.repeats))
            old, new = (statistics.median(times[k]) * 1000 for k in ("before", "after"))
            print(f"{name:<11} {old:>10.3f} {new:>9.3f} {old / new:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
