"""Shared fixtures. Tests import the project's modules from the repository root.

Two ways to run an entry script (main_baseline.py, main_forget.py, mlflow_forget.py, main_backdoor.py, benchmark.py,
perf/*.py): `run_script` starts a real interpreter (a few seconds of start-up and torch import per call), `run_main`
runs the same `__main__` block in this process. Both return a `subprocess.CompletedProcess`. Each script keeps at least
one real-process smoke test (marked `integration`); every other check of a script's behaviour uses `run_main`."""
import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
import warnings
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


# The intra-op thread count a fresh interpreter starts with: `run_main` gives it to every call, as a new process
# would have it.
DEFAULT_THREADS = torch.get_num_threads()
# The warning filters of a fresh interpreter (python -W default), without pytest's recording of warnings.
_IGNORED_BY_PYTHON = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
             timeout: int | None = None) -> subprocess.CompletedProcess:
    """`run_script` in this process: executes the script's `if __name__ == "__main__"` block (so `utils.cli_main`
    turns bad input into one line and exit 2, as for a user) with `sys.argv`, the working directory and `env` set for
    the call and restored afterwards, and stdout / stderr captured. An exception that would end the interpreter gives
    exit status 1 and its traceback on stderr. `OMP_NUM_THREADS` in `env` sets torch's thread count for the call (a
    real process reads it at start-up); a value of None in `env` unsets that variable. What needs a process of its
    own stays on `run_script`: a kill or signal, hooks installed through PYTHONPATH, an environment variable read
    before torch or CUDA starts. `timeout` is accepted for the signature of `run_script` and not enforced."""
    del timeout
    path = ROOT / script
    saved_env, saved_cwd, saved_argv, saved_path = dict(os.environ), os.getcwd(), sys.argv, list(sys.path)
    saved_threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        for key, value in {"PYTHONPATH": str(ROOT), **(env or {})}.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.chdir(cwd or ROOT)
        sys.argv = [str(path), *args]
        sys.path.insert(0, str(path.parent))  # as `python path/to/script.py` puts the script's folder first
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or DEFAULT_THREADS))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()
            for category in _IGNORED_BY_PYTHON:
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _show_warning
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except Exception:  # what the interpreter would print before exiting with status 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess([sys.executable, str(path), *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def run():
    return run_script


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(*flags, retrain=False) -> Path`: a fresh folder holding the original model of `flags` (and its
    Retrain reference with `retrain=True`), trained as main_baseline.py trains them (`pipeline.stages`) the first time
    a test asks for those exact flags and copied from this run's cache afterwards. Flags are main_baseline.py's (e.g.
    `*TINY, "--seed", "1"`; add the forget set for a Retrain reference), without --save_dir. Tests that ask for the
    same flags share the training; each gets its own copy, so it may write there."""
    import shutil

    from arg_parser import parse_config
    from pipeline.stages import prepare, train_reference

    cache = tmp_path_factory.mktemp("tiny_models")
    trained: dict[tuple, Path] = {}

    def models(*flags: str, retrain: bool = False) -> Path:
        key = (flags, retrain)
        if key not in trained:
            folder = cache / str(len(trained))
            for kind in ([False, True] if retrain else [False]):
                argv = [*flags, "--save_dir", str(folder), *(["--retrain"] if kind else [])]
                train_reference(prepare(parse_config(argv, "main_baseline.py"), need_forget=kind), retrain=kind)
            trained[key] = folder
        copy = tmp_path_factory.mktemp("models")
        shutil.copytree(trained[key], copy, dirs_exist_ok=True)
        return copy

    return models


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, loaded once for the whole session."""
    from dataset import load_dataset
    return load_dataset("digits")


@contextlib.contextmanager
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads, and timings stay steady on a shared machine."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """`one_thread` for a whole module (`pytestmark = pytest.mark.usefixtures("one_thread_per_module")`): robust
    timings on a shared 2-core machine, and the thread count the README numbers used."""
    with _one_torch_thread():
        yield
