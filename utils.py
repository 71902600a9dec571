"""Small shared helpers: errors, seeding, devices, atomic file writes and weights-only checkpoints.

Kept free of argparse and mlflow so that every module (and the tests) can import it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UserError(Exception):
    """Bad input from the user. Entry scripts print the message as one line and exit with status 2."""


class EnvironmentUserError(UserError):
    """A UserError caused by the environment rather than by the input: data files missing where downloads are off, a
    folder that cannot be written. Reported like any UserError; a sweep does not remember it as the cell's failure,
    since the cause may be gone at its next invocation."""


class DivergenceError(RuntimeError):
    """A method produced a non-finite loss or weights; carries the epoch where it happened."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


# ---------------------------------------------------------------------------------------------------------------------
# Seeding and devices
# ---------------------------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator owned by one run, so that shuffles and random labels do not depend on global state."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def resolve_device(requested: str | None = None) -> torch.device:
    """CUDA when available, else CPU; an explicit request that cannot be honoured is a UserError."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UserError(f"--device '{requested}' is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} requested but CUDA is not available; use --device cpu or auto")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates wall time over several `with watch:` blocks (device-synchronised)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


# ---------------------------------------------------------------------------------------------------------------------
# Mixed precision (--amp) and memory format
# ---------------------------------------------------------------------------------------------------------------------

AMP_MODES = ("off", "bf16")


def check_amp(amp: str) -> str:
    if amp not in AMP_MODES:
        raise UserError(f"--amp '{amp}' is not a precision; allowed: {', '.join(AMP_MODES)}")
    return amp


def forward_precision(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context around forward passes and their losses under `--amp`.

    "off": a null context, no autocast at all, so a run computes exactly what it computed before the flag existed.
    "bf16": torch.autocast to bfloat16 on the device's type. Parameters, gradients and optimiser state stay float32;
    autocast runs losses and softmaxes in float32. bfloat16 has float32's exponent range, so small gradients do not
    underflow and no loss scaling (GradScaler) is needed.
    """
    if check_amp(amp) == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def uses_channels_last(amp: str, device: torch.device | str) -> bool:
    """Whether models and image batches use the channels_last (NHWC) memory format: on CUDA with `--amp bf16` only,
    where cuDNN's tensor-core convolutions work in NHWC and the default layout would cost a transposition per
    convolution. With `--amp off`, or on any other device, layouts (and so results) stay as they are."""
    return check_amp(amp) != "off" and torch.device(device).type == "cuda"


def to_channels_last(model: torch.nn.Module, amp: str) -> torch.nn.Module:
    """`model` with its 4-d weights in channels_last when `uses_channels_last` (in place; values unchanged)."""
    params = list(model.parameters())
    if params and uses_channels_last(amp, params[0].device):
        model.to(memory_format=torch.channels_last)
    return model


def batch_channels_last(images: torch.Tensor, amp: str) -> torch.Tensor:
    """A batch of images in channels_last when `uses_channels_last` (a copy only when it is not already)."""
    if images.dim() == 4 and uses_channels_last(amp, images.device):
        return images.contiguous(memory_format=torch.channels_last)
    return images


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes: a crash or a full disk never leaves a half-written result
# ---------------------------------------------------------------------------------------------------------------------

def ensure_writable_dir(path: str | os.PathLike) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise EnvironmentUserError(f"cannot write to directory '{directory}' ({exc.strerror or exc}); pass a writable "
                                   f"--save_dir") from exc
    return directory


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux), so threads never race."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only portable read is set-and-restore
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600 whatever the umask; results must get the mode any new file would get (0644
        # under umask 022), or collaborators and sweep workers under another account cannot read them.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def to_jsonable(value: Any) -> Any:
    """Turn tensors, numpy values, paths and tuples into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    return value


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    text = json.dumps(to_jsonable(payload), indent=2, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write_bytes(path, text.encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported lazily: most runs draw nothing)."""
    import matplotlib  # noqa: PLC0415  (lazy on purpose: most runs draw nothing)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after use("Agg"), which must come first)

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def file_lock(target: str | os.PathLike) -> Iterator[None]:
    """An exclusive POSIX lock on the hidden file `.<name>.lock` next to `target` (lockf also works on NFS, where
    sweeps often run).

    The lock file is removed on release. A waiter that was blocked on the removed file would otherwise hold a lock
    on a file nobody else sees while a later arrival locks a fresh one: so after acquiring, a holder checks that the
    path still names the file it locked, and starts again when it does not. The work done under the lock should
    still re-check the state of `target` after acquiring (trained already? database migrated already?): the holder
    before may have done it.
    """
    target = Path(target)
    lock_path = target.with_name(f".{target.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(handle.fileno()).st_ino:
                continue  # released and removed while this process waited: lock the file that is there now
            try:
                yield
            finally:
                lock_path.unlink(missing_ok=True)
                fcntl.lockf(handle, fcntl.LOCK_UN)
            return
        finally:
            handle.close()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain values only, loaded with weights_only=True
# ---------------------------------------------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects; any failure is a one-line UserError."""
    file = Path(path)
    if not file.is_file():
        raise EnvironmentUserError(
            f"checkpoint '{file}' does not exist; pass the path of a .pth.tar written by main_baseline.py")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc) and "GLOBAL" not in str(exc):
            raise EnvironmentUserError(
                f"'{file}' is not a readable PyTorch checkpoint (corrupt or another format)") from exc
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "unsupported" in line]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise UserError(
            f"refusing to load '{file}': it contains pickled objects other than tensors and plain values{detail}; "
            f"only weights-only checkpoints are accepted"
        ) from exc
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise EnvironmentUserError(f"'{file}' is not a readable PyTorch checkpoint ({type(exc).__name__})") from exc
    if isinstance(payload, dict) and "state_dict" not in payload and payload and all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        payload = {"state_dict": payload}  # a bare state_dict (upstream Retrain files) is accepted as such
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise UserError(f"'{file}' is not a model checkpoint (no 'state_dict' entry)")
    return payload


# ---------------------------------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------------------------------

def sha256_of_array(values: np.ndarray) -> str:
    array = np.ascontiguousarray(np.asarray(values, dtype=np.int64))
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def temporarily_eval(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Switch a model to eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def cli_main(main) -> None:
    """Run an entry script's main(): bad input -> one line on stderr and exit 2; divergence -> exit 3; no traceback."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted; completed files are intact (writes are atomic)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def check_output_path(path: str | os.PathLike, what: str, directory: bool) -> None:
    """Raise UserError unless `path` is, or can be created as, a writable directory (`directory=True`) or file.

    Checks only, creating nothing: it runs before any work, so that a path through a regular file (`--out
    results.md/x`) or an unwritable folder is one line of error instead of a traceback after minutes of training."""
    path = Path(path)
    kind = "directory" if directory else "file"
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file; pass a directory path")
    if not directory and path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; pass a file path")
    if directory and path.is_dir():
        existing = path
    else:
        existing = next(parent for parent in path.absolute().parents if parent.exists())
        if not existing.is_dir():
            raise UserError(f"{what} '{path}': '{existing}' is a file, so the {kind} cannot be created there; pass "
                            f"a path below a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentUserError(f"{what} '{path}': directory '{existing}' is not writable; pass a writable path")
