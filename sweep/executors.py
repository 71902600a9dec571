"""Where a sweep's cells run: in this process, on local worker processes pinned to devices (one or more workers per
GPU, or CPU workers), or as submitit jobs (a SLURM job array, or submitit's local / debug stand-ins for tests).

Every executor runs the same cell function (`sweep.execute.execute`) and hands its report back to the submitting
process, which writes the cell's result file (`sweep.execute.deliver`) and is the only process that talks to the
tracking store. The scheduler (`schedule`) starts a cell once its dependencies (the original and Retrain models it
needs) are finished, so those models are trained once and shared by every worker.

A pool worker that dies (the kernel's out-of-memory killer, kill -9, a segmentation fault) breaks its pool: the cell
it ran is reported as an error naming the worker's exit and the cell's log, the pool is started again, and the cells
that only shared the pool are run again on it. Pool workers exit on their own when the process that started them dies
(`_worker_init`), so a `kill -9` of benchmark.py leaves no worker behind holding a model and its data.

submitit jobs are recorded in `<out>/jobs.json` (cell key -> job id, its folder and logs, relative to the out dir, so
a copied out dir never collects the original's jobs): an interrupted benchmark, invoked again, collects the results
of jobs still running or finished meanwhile instead of submitting them again. submitit is used to submit jobs and
ask for their state, never to fetch a result: a job writes its cell's report as JSON into its job folder
(`REPORT_FILE`), which the submitting process reads and validates like any cell file. Nothing from the out dir, which
may sit on a shared file system, is ever unpickled here.
"""
from __future__ import annotations

import concurrent.futures as futures
import importlib
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from arg_parser import POSITIVE_INT as _positive
from arg_parser import number
from sweep.execute import deliver, execute, log_path, task_of, valid_report
from sweep.grid import read_cell_json
from utils import UserError, atomic_write_json, resolve_device

__all__ = ["CLUSTERS", "EXECUTORS", "JOBS_FILE", "REPORT_FILE", "InProcess", "LocalPools", "Slot", "SubmititJobs",
           "add_execution_flags", "execution_settings", "plan_slots", "run_cells", "schedule", "start_pool"]

EXECUTORS = ("local", "submitit")
CLUSTERS = ("slurm", "local", "debug")
JOBS_FILE = "jobs.json"
REPORT_FILE = "%j_report.json"  # in a job's folder: the cell's report, written by the job (%j: its id)
INSTALL_SUBMITIT = "pip install submitit"
ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 1.0
PARENT_POLL_SECONDS = 0.5
# SLURM states after which a job will never write its result: its cell is submitted again.
SLURM_DEAD_STATES = {"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                     "REVOKED", "TIMEOUT"}
_non_negative = number(int, 0)


def add_execution_flags(parser) -> None:
    g = parser.add_argument_group("executors: where cells run")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: worker processes on this machine (default); submitit: one job per cell, submitted "
                        "as a job array (--cluster)")
    g.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="--executor local: devices to spread the workers over, e.g. cuda:0 cuda:1 (default: every "
                        "visible GPU with --device auto, else --device); each worker is pinned to its device")
    g.add_argument("--jobs-per-device", dest="jobs_per_device", type=_positive, default=None,
                   help="workers per device (default: 1 per GPU; --jobs on the CPU)")
    g.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="--executor submitit: slurm (default), local (jobs as processes here) or debug (in this "
                        "process)")
    g.add_argument("--slurm-partition", dest="slurm_partition", default=None, help="SLURM partition")
    g.add_argument("--slurm-time", dest="slurm_time", type=_positive, default=240,
                   help="time limit of one job in minutes (default 240; also the local cluster's limit)")
    g.add_argument("--slurm-gpus-per-job", dest="slurm_gpus_per_job", type=_non_negative, default=1,
                   help="GPUs per job (default 1; 0 for CPU-only jobs)")
    g.add_argument("--slurm-cpus-per-job", dest="slurm_cpus_per_job", type=_positive, default=4,
                   help="CPU cores per job (default 4)")
    g.add_argument("--slurm-array-parallelism", dest="slurm_array_parallelism", type=_positive, default=32,
                   help="jobs of the array running at once (default 32; with --cluster local: jobs at once here)")
    g.add_argument("--slurm-folder", dest="slurm_folder", default=None, metavar="DIR",
                   help="submitit's folder: job pickles and the stdout/stderr logs of each job (default "
                        "<out>/submitit)")


def execution_settings(args) -> dict:
    """The `Settings` fields of the execution flags, checked before any work: an unusable device, a missing submitit,
    an unreachable SLURM are one-line errors."""
    slurm = {"partition": args.slurm_partition, "time": args.slurm_time, "gpus_per_job": args.slurm_gpus_per_job,
             "cpus_per_job": args.slurm_cpus_per_job, "array_parallelism": args.slurm_array_parallelism,
             "folder": args.slurm_folder}
    if args.executor == "submitit":
        if args.devices is not None or args.jobs_per_device is not None:
            raise UserError("--devices and --jobs-per-device are for --executor local; submitit jobs get their "
                            "devices from the cluster (--slurm-gpus-per-job)")
        _import_submitit()
        if args.cluster == "slurm":
            check_slurm_reachable()
    else:
        plan_slots(args.devices, args.device, args.jobs or 1, args.jobs_per_device)  # raises on a bad device
    return {"executor": args.executor, "devices": args.devices, "jobs_per_device": args.jobs_per_device,
            "cluster": args.cluster, "slurm": slurm}


def _import_submitit():
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise UserError(f"--executor submitit needs the submitit package, which is not installed: "
                        f"{INSTALL_SUBMITIT}") from None


def check_slurm_reachable() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("--cluster slurm: no SLURM here (sbatch is not on PATH); run on a SLURM login node, or use "
                        "--cluster local")
    try:
        probe = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"--cluster slurm: no SLURM controller answers (sinfo: {exc}); use --cluster local") from None
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        raise UserError(f"--cluster slurm: no SLURM controller answers (sinfo: {reason}); use --cluster local")


# ---------------------------------------------------------------------------------------------------------------------
# Devices of the local executor
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """Workers on one device. `visible_gpus`: the worker's CUDA_VISIBLE_DEVICES ("" hides every GPU), None: as is."""

    device: str
    visible_gpus: str | None
    workers: int


def plan_slots(devices: list[str] | None, device: str, jobs: int, jobs_per_device: int | None) -> list[Slot]:
    """The workers of the local executor. Default: one worker per visible GPU (`jobs_per_device` each) when --device
    is auto and CUDA is there, else `jobs` workers (or `jobs_per_device`) on --device, as before devices existed."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices is None:
        if device in ("auto", "") and gpus > 0:
            devices = [f"cuda:{i}" for i in range(gpus)]
            if gpus == 1:  # the only GPU: nothing to pin, the worker's --device auto finds it
                return [Slot("cuda:0", None, jobs_per_device or 1)]
        else:
            return [Slot(device, None, jobs_per_device or jobs)]
    elif device not in ("auto", ""):
        raise UserError(f"--device {device} and --devices: give one of them (--devices pins each worker to its device "
                        f"and the cells run with --device auto)")
    if len(set(devices)) != len(devices):
        raise UserError(f"--devices {' '.join(devices)}: a device is listed twice; use --jobs-per-device for several "
                        f"workers on one device")
    slots = []
    for name in devices:
        if name == "cpu":
            slots.append(Slot("cpu", "" if gpus else None, jobs_per_device or jobs))
            continue
        index = name.removeprefix("cuda:")
        if not name.startswith("cuda:") or not index.isdigit():
            raise UserError(f"--devices: '{name}' is not a device; use cpu or cuda:N")
        if int(index) >= gpus:
            seen = f"GPUs cuda:0 to cuda:{gpus - 1}" if gpus else "no GPU"
            raise UserError(f"--devices {name}: this machine has {seen}")
        slots.append(Slot(name, index, jobs_per_device or 1))
    return slots


# ---------------------------------------------------------------------------------------------------------------------
# The scheduler and its executors
# ---------------------------------------------------------------------------------------------------------------------

class Executor(Protocol):
    capacity: int  # cells in flight at most

    def start(self, cells: list, out: Path) -> None: ...

    def wait(self) -> list[tuple]: ...  # (cell, report) pairs, at least one

    def adopt(self, cells: list, out: Path) -> list: ...  # cells whose earlier jobs are still theirs to collect


def schedule(pending: list, out: Path, finished: set[str], dead: set[str], handle: Callable, skip: Callable,
             executor: Executor) -> None:
    """Run `pending`, each cell once its dependencies are in `finished`, at most `executor.capacity` at a time; a cell
    whose dependency is in `dead` is skipped (`skip(cell)`, and it joins `dead`). Each report is delivered (the result
    file written here) before `handle(cell, report)`, which updates `finished` / `dead`.

    The slots that finished cells free are filled again before their reports are delivered and handled: handling
    includes the cell's tracking calls (tens of milliseconds each, hundreds of cells), which would otherwise leave a
    worker idle while this process writes."""
    adopted = {cell.key for cell in executor.adopt(pending, out)}
    pending = [cell for cell in pending if cell.key not in adopted]
    in_flight = len(adopted)

    def start_ready() -> None:
        nonlocal in_flight
        ready = []
        for cell in list(pending):
            if any(d in dead for d in cell.deps):
                pending.remove(cell)
                dead.add(cell.key)
                skip(cell)
            elif in_flight + len(ready) < executor.capacity and all(d in finished for d in cell.deps):
                pending.remove(cell)
                ready.append(cell)
        if ready:
            executor.start(ready, out)
            in_flight += len(ready)

    while True:
        start_ready()
        if not in_flight:
            if pending:  # dependencies that are neither finished nor pending: cannot happen, but never hang
                raise RuntimeError(f"unschedulable cells: {[c.key for c in pending]}")
            return
        reports = executor.wait()
        in_flight -= len(reports)
        start_ready()  # with the dependencies finished so far: the reports' own dependants start at the next turn
        for cell, report in reports:
            deliver(cell, report, out)
            handle(cell, report)


class InProcess:
    """One cell at a time in this process (one worker on one device: no process to start)."""

    capacity = 1

    def __init__(self) -> None:
        self._cells: list = []

    def adopt(self, cells: list, out: Path) -> list:
        return []

    def start(self, cells: list, out: Path) -> None:
        self._cells += [(cell, out) for cell in cells]

    def wait(self) -> list[tuple]:
        cell, out = self._cells.pop(0)
        return [(cell, execute(task_of(cell, out)))]


class LocalPools:
    """Worker processes, `slot.workers` per device, each pinned to its device; a cell goes to the device with the
    most free workers. `run`: the cell function (default `sweep.execute.execute`), a module-level function."""

    def __init__(self, slots: list[Slot], run: Callable[[dict], dict] | None = None):
        self.slots = slots
        self.run = run or execute
        self.capacity = sum(slot.workers for slot in slots)
        # Each worker says here which cell it starts (a SimpleQueue: written before the cell runs, no feeder thread
        # that a killed worker could take down with an unsent message), so a dead worker's cell is known.
        self.started = multiprocessing.get_context("spawn").SimpleQueue()
        self.pools = [start_pool(slot.workers, slot.visible_gpus, self.started) for slot in slots]
        self.busy = [0] * len(slots)
        self.running: dict[futures.Future, tuple] = {}  # future -> (cell, slot index, out)
        self.worker_of: dict[str, int] = {}  # cell key -> pid of the worker that started it
        self.rerun: set[str] = set()  # cells started again because a pool broke under them

    def __enter__(self) -> LocalPools:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for pool in self.pools:
            if exc_type is not None:  # the sweep stops: its running cells are not waited for
                _terminate_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)

    def adopt(self, cells: list, out: Path) -> list:
        return []

    def start(self, cells: list, out: Path) -> None:
        for cell in cells:
            index = max(range(len(self.slots)), key=lambda i: self.slots[i].workers - self.busy[i])
            self._submit(cell, index, out)

    def _submit(self, cell, index: int, out: Path) -> None:
        self.busy[index] += 1
        self.running[self.pools[index].submit(_run_in_worker, self.run, task_of(cell, out))] = (cell, index, out)

    def wait(self) -> list[tuple]:
        while True:
            done, _ = futures.wait(self.running, return_when=futures.FIRST_COMPLETED)
            self._read_started()  # also keeps the queue's pipe from filling up over a long sweep
            reports, lost = [], {}
            for future in done:
                cell, index, out = self.running.pop(future)
                self.busy[index] -= 1
                try:
                    reports.append((cell, future.result()))
                except BrokenProcessPool:
                    lost.setdefault(index, []).append((cell, out))
            for index, cells in lost.items():
                reports += self._restart(index, cells)
            if reports:  # else every lost cell runs again
                return reports

    def _restart(self, index: int, lost: list[tuple]) -> list[tuple]:
        """Pool `index` broke under the cells in `lost` ((cell, out) pairs): a worker died. Its cell is reported as an
        error; the other cells of the pool, stopped with it, run again on a fresh pool (once: a cell lost twice is an
        error too). Returns the reports of the pool's cells."""
        pool = self.pools[index]
        rest = [future for future, (_, i, _) in self.running.items() if i == index]
        futures.wait(rest)  # the broken pool fails them all at once
        reports = []
        for future in rest:
            cell, _, out = self.running.pop(future)
            self.busy[index] -= 1
            try:
                reports.append((cell, future.result()))  # finished just before the pool broke
            except BrokenProcessPool:
                lost.append((cell, out))
        # Private, but the only record of the workers' exits: the dead worker's says how it died; the others end
        # with the SIGTERM the broken pool sends them.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=True)
        exits = {process.pid: process.exitcode for process in processes}
        self._read_started()
        slot = self.slots[index]
        self.pools[index] = start_pool(slot.workers, slot.visible_gpus, self.started)
        for cell, out in lost:
            code = exits.get(self.worker_of.get(cell.key))
            if (code is not None and code not in (0, -signal.SIGTERM)) or cell.key in self.rerun:
                reports.append((cell, _death_report(cell, out, code)))
            else:
                self.rerun.add(cell.key)
                self._submit(cell, index, out)
        return reports


    def _read_started(self) -> None:
        while not self.started.empty():
            key, pid = self.started.get()
            self.worker_of[key] = pid


def _death_report(cell, out: Path, code: int | None) -> dict:
    if code is None or code in (0, -signal.SIGTERM):
        how = "its worker pool broke twice while it ran"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"killed by {name}" + (": kill -9, or the kernel's out-of-memory killer" if -code == signal.SIGKILL
                                     else "")
    else:
        how = f"exit status {code}"
    return {"key": cell.key, "status": "error", "error": f"the worker process running this cell died ({how}); "
            f"log: {log_path(cell, out)}", "seconds": 0.0, "cpu_seconds": 0.0, "result": None, "permanent": False}


def _terminate_workers(pool: futures.ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # private: no public way to stop them
        process.terminate()


# In a pool worker: where `_run_in_worker` says which cell this process starts (set by `_worker_init`).
_STARTED = None


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker blocks on its task queue, whose write end it holds itself, so it never sees the parent go: watch the
    # parent's pid instead (getppid changes once the parent is gone and the worker is re-parented).
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # no cleanup to run: every file a cell writes is written atomically


def _worker_init(parent_pid: int, visible_gpus: str | None = None, started=None) -> None:
    """`visible_gpus`: pins the worker to its device (CUDA_VISIBLE_DEVICES, set before CUDA starts in this process;
    "" hides every GPU); None leaves the environment as it is. `started`: the queue of `_run_in_worker`."""
    global _STARTED
    if visible_gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
    torch.set_num_threads(1)  # between cells; a cell sets its own count (sweep.execute.CELL_THREADS)
    _STARTED = started
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _run_in_worker(run: Callable[[dict], dict], task: dict) -> dict:
    if _STARTED is not None:
        _STARTED.put((task["key"], os.getpid()))
    return run(task)


def start_pool(workers: int, visible_gpus: str | None, started=None) -> futures.ProcessPoolExecutor:
    """`workers` worker processes (fresh interpreters: no forked torch thread pools), pinned to `visible_gpus`;
    `started`: a SimpleQueue (of the spawn context) on which each worker says which cell it starts."""
    pool = futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(os.getpid(), visible_gpus, started))
    # With the spawn context, Python 3.11 starts workers one per submit, and `submit` wakes the pool's manager thread
    # before it starts the new worker: the manager then waits on the sentinels of the workers it knew, and the death of
    # the newest one (a cell killed by the OOM killer) goes unseen until some other worker returns a result, or
    # forever when none is running. Private, as `_processes` below: the flag the executor uses for the fork context,
    # which launches every worker at the first submit, before the manager thread starts and learns their sentinels.
    pool._safe_to_dynamically_spawn_children = False
    return pool


class SubmititJobs:
    """One submitit job per cell; the cells ready together are submitted as one job array. `<out>/jobs.json` records
    each cell's job, so a later invocation collects a job still running (or finished meanwhile) instead of submitting
    its cell again; a job that died without a result is reported with its log and its cell submitted again next time.
    A job's report is read from its JSON file (`REPORT_FILE`), never from submitit's result pickle."""

    def __init__(self, cluster: str, slurm: dict, out: Path, total: int):
        submitit = _import_submitit()
        self.submitit = submitit
        self.cluster = cluster
        self.out = out
        self.folder = str(Path(slurm.get("folder") or out / "submitit").absolute() / "%j")
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        # Jobs import the project's modules, wherever they start.
        setup = [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        parameters = {"name": "benchmark", "timeout_min": slurm["time"], "gpus_per_node": slurm["gpus_per_job"],
                      "cpus_per_task": slurm["cpus_per_job"], "tasks_per_node": 1, "nodes": 1}
        if cluster == "slurm":
            parameters.update(slurm_array_parallelism=slurm["array_parallelism"], slurm_setup=setup)
            if slurm.get("partition"):
                parameters["slurm_partition"] = slurm["partition"]
            self.capacity = max(total, 1)  # SLURM throttles the array itself
        else:
            if cluster == "local":
                parameters["local_setup"] = setup
                parameters["gpus_per_node"] = 0 if not _has_cuda() else slurm["gpus_per_job"]
            self.capacity = slurm["array_parallelism"]
        self.executor.update_parameters(**parameters)
        self.jobs_path = out / JOBS_FILE
        self.records: dict[str, dict] = _read_jobs(self.jobs_path)
        self.running: dict[str, tuple] = {}  # cell key -> (cell, job)

    # -- submit --------------------------------------------------------------------------------------------------------
    def start(self, cells: list, out: Path) -> None:
        with self.executor.batch():
            submitted = [(cell, self.executor.submit(run_job, task_of(cell, out), self.folder)) for cell in cells]
        for cell, job in submitted:
            self.running[cell.key] = (cell, job)
            # Paths relative to the out dir: a copied out dir names its own job folders, never the original's.
            self.records[cell.key] = {"job_id": job.job_id, "cluster": self.cluster,
                                      "folder": self._relative(job.paths.folder), "kind": cell.kind,
                                      "label": cell.label, "seed": cell.seed,
                                      "stdout": self._relative(job.paths.stdout),
                                      "stderr": self._relative(job.paths.stderr),
                                      "state": "submitted", "submitted_at": time.time()}
        self._save()

    def _relative(self, path: Path) -> str:
        return os.path.relpath(Path(path).absolute(), self.out.absolute())

    def adopt(self, cells: list, out: Path) -> list:
        """Cells whose recorded job is still running, or finished with a result not yet collected."""
        adopted = []
        for cell in cells:
            record = self.records.get(cell.key)
            if not record or record.get("state") != "submitted" or record.get("cluster") != self.cluster:
                continue
            job = self._recover(record)
            if job is not None:
                self.running[cell.key] = (cell, job)
                adopted.append(cell)
        return adopted

    def _recover(self, record: dict):
        if not isinstance(record.get("folder"), str) or not isinstance(record.get("job_id"), str):
            return None
        folder = self.out / record["folder"]
        if self.cluster == "local":
            job = self.submitit.LocalJob(folder, record["job_id"])
            return job if _local_alive(record["job_id"]) or report_path(job).exists() else None
        if self.cluster == "slurm":
            job = self.submitit.SlurmJob(folder, record["job_id"])
            if report_path(job).exists() or job.state.upper().split()[0] not in SLURM_DEAD_STATES:
                return job
        return None  # a debug job lived in the process that submitted it

    # -- collect -------------------------------------------------------------------------------------------------------
    def wait(self) -> list[tuple]:
        while True:
            done = [key for key, (_, job) in self.running.items() if self._done(job)]
            if done:
                reports = [self._collect(*self.running.pop(key)) for key in done]
                self._save()
                return reports
            time.sleep(POLL_SECONDS)

    def _done(self, job) -> bool:
        if self.cluster == "local" and getattr(job, "_process", None) is None:  # adopted: its controller is not ours
            return not _local_alive(job.job_id)
        return job.done()

    def _collect(self, cell, job) -> tuple:
        record = self.records.setdefault(cell.key, {})
        report = read_cell_json(report_path(job))
        if report is not None and valid_report(report, cell):
            record["state"] = "finished"
            return cell, report
        # The job died (killed, out of memory, out of time: a cell's own errors come back in its report), or left a
        # report that is not this cell's.
        record["state"] = "failed"
        return cell, {"key": cell.key, "status": "error", "seconds": 0.0, "cpu_seconds": 0.0, "result": None,
                      "permanent": False, "error": f"job {job.job_id} ended without a valid report "
                                                   f"({report_path(job).name}); job log: {job.paths.stderr}"}

    def _save(self) -> None:
        atomic_write_json(self.jobs_path, self.records)


def run_job(task: dict, folder: str) -> None:
    """What a submitit job runs: the cell, then its report as JSON in the job's folder (`folder`, with %j for the job
    id). Returns nothing: the submitting process reads the report file, never the job's result pickle."""
    job_id = _import_submitit().JobEnvironment().job_id
    atomic_write_json(_report_file(folder, job_id), execute(task))


def report_path(job) -> Path:
    """Where the job `job` (submitit's handle) writes its cell's report."""
    return _report_file(str(job.paths.folder), job.job_id)


def _report_file(folder: str, job_id: str) -> Path:
    return Path(folder.replace("%j", job_id)) / REPORT_FILE.replace("%j", job_id)


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _read_jobs(path: Path) -> dict[str, dict]:
    records = read_cell_json(path) or {}
    return {key: record for key, record in records.items() if isinstance(record, dict)}


def _local_alive(job_id: str) -> bool:
    """A local job's controller (its id is the controller's pid) still runs: checked by pid and command line, so a
    recycled pid does not pass."""
    try:
        command = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
        status = Path(f"/proc/{int(job_id)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return b"submitit" in command and status != "Z"


def execution_params(settings) -> dict:
    """Where the cells ran, for the benchmark's parent run: the executor and, for local workers, one entry per device
    ("cuda:0 x1", "cpu x2"); for submitit, the cluster and the SLURM knobs that were given."""
    if settings.executor == "submitit":
        knobs = {f"slurm_{k}": v for k, v in settings.slurm.items() if v is not None}
        return {"executor": "submitit", "cluster": settings.cluster, **knobs}
    slots = plan_slots(settings.devices, settings.device, settings.jobs, settings.jobs_per_device)
    named = [(str(resolve_device(slot.device)) if slot.device == "auto" else slot.device, slot.workers)
             for slot in slots]
    return {"executor": "local", "workers": " ".join(f"{device} x{workers}" for device, workers in named),
            "jobs": sum(slot.workers for slot in slots)}


def run_cells(pending: list, settings, finished: set[str], dead: set[str], handle: Callable, skip: Callable) -> None:
    """Run the sweep's pending cells on the executor its settings name."""
    out = settings.out
    if settings.executor == "submitit":
        schedule(pending, out, finished, dead, handle, skip,
                 SubmititJobs(settings.cluster, settings.slurm, out, len(pending)))
        return
    slots = plan_slots(settings.devices, settings.device, settings.jobs, settings.jobs_per_device)
    if len(slots) == 1 and slots[0].workers == 1 and slots[0].visible_gpus is None:
        schedule(pending, out, finished, dead, handle, skip, InProcess())
        return
    with LocalPools(slots) as pools:
        schedule(pending, out, finished, dead, handle, skip, pools)
