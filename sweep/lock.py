"""One benchmark process per out dir at a time.

Two processes on one --out would both compute every missing cell and both rewrite results.md and sweep.json. The
first takes an exclusive `flock` on `<out>/benchmark.lock` and writes its pid and command line into it; a second
reads them back and stops with one line naming the holder (exit 2, before any work). The kernel releases the lock
when its holder dies, however it dies (kill -9, out of memory), so the file a dead process left behind is simply
taken over: no stale-lock guessing from pids that may have been reused. Linux implements `flock` on NFS with POSIX
locks, which the server arbitrates, so the rule also holds for an out dir on a shared file system.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from utils import EnvironmentUserError, UserError

__all__ = ["LOCK_FILE", "OutDirLock"]

LOCK_FILE = "benchmark.lock"


class OutDirLock:
    """`with OutDirLock(out, command):` holds `<out>/benchmark.lock` (creating `out`) or raises UserError naming the
    process that holds it."""

    def __init__(self, out: Path, command: list[str]):
        self.path = Path(out) / LOCK_FILE
        self.command = command
        self._handle: IO[str] | None = None

    def __enter__(self) -> OutDirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # not "w": the holder's record must survive until the lock is ours
        except OSError as exc:
            raise EnvironmentUserError(f"--out '{self.path.parent}': cannot create its lock file "
                                       f"({exc.strerror or exc}); pass a writable --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise UserError(f"--out '{self.path.parent}' is in use by {holder}; wait for it to end or pass another "
                            f"--out (one benchmark per out dir at a time)") from None
        # Ours now: whatever the file says is a process that has ended (its lock ended with it).
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.truncate(0)  # the record describes a holder: there is none now
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _describe(text: str) -> str:
    try:
        record = json.loads(text)
        pid, command = int(record["pid"]), " ".join(str(part) for part in record["command"])
    except (ValueError, RecursionError, KeyError, TypeError):
        return "another process (its lock file records nothing readable)"
    return f"process {pid} on {record.get('host', '?')} since {record.get('started_at', '?')} ({command})"
