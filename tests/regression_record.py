"""The regression record's format, shared by `test_regression.py` and `record_regression.py`.

`tests/data/regression_c407b81.json` holds the commands (`base`, the `random` and `classwise` forget sets, `cases`)
and, under `kinds`, what commit c407b81 gave for them on each kind of CPU it was run on. `FIRST_KIND` is the machine
the record was first made on, whose kind was not written down; it stands for every kind that has no entry of its own.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

CASE_KEYS = ("UA", "RA", "TA", "MIA_efficacy", "avg_gap", "rUA", "agreement", "accuracy", "SVC_MIA_forget_efficacy")
FIRST_KIND = "first"
RECORD_THREADS = 2  # the thread count of every recorded run (the first machine's 2 cores), set for each command


def cpu_kind() -> str:
    """What selects the CPU kernels, and so the summation order: vendor and torch's vector-instruction level (the
    thread count, the third factor, is fixed at `RECORD_THREADS`)."""
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {vendor} {torch.backends.cpu.get_cpu_capability()} {RECORD_THREADS} threads"


def values_for_this_machine(record: dict) -> tuple[str, dict]:
    kind = cpu_kind()
    return (kind, record["kinds"][kind]) if kind in record["kinds"] else (FIRST_KIND, record["kinds"][FIRST_KIND])


def checksum(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["state_dict"]
    floats = [v.double() for v in state.values() if v.is_floating_point()]
    return {"l1": float(sum(v.abs().sum() for v in floats)), "l2": float(sum((v ** 2).sum() for v in floats))}


def case_folder(out: Path, case: dict) -> Path:
    """Each case in its own folder: the result files are named by method."""
    return out / f"{case['scenario']}-{'_'.join(case['args'])}".replace("-", "")
