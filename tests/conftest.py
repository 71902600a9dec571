"""Shared fixtures. Tests import the project's modules from the repository root."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny budget on digits: enough to exercise every code path in seconds.
TINY = ["--dataset", "digits", "--epochs", "2", "--width", "4", "--no-progress", "--batch_size", "128"]


def run_script(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an entry script for real, as a user would (CleanRL-style smoke test)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run():
    return run_script


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, loaded once for the whole session."""
    from dataset import load_dataset
    return load_dataset("digits")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads, and timings stay steady on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
