"""Experiment tracking with mlflow. The only module that imports mlflow (models/, unlearn/, evaluation/ never do).

Conventions:
* Backend: `MLFLOW_TRACKING_URI` when set (a remote `mlflow server` works), else SQLite `sqlite:///mlflow.db` in the
  working directory. A relative SQLite path is made absolute, so every process of a sweep writes the same database.
* A run: params = `data.*` (data set and forget set), `train.*` (the recipe of the original and Retrain models),
  `hp.*` (exactly the hyper-parameters the method uses), `method` (the name asked for) and `method.config` (what it
  runs); never an internal flag or a missing value. Per-epoch metrics with `step` = unlearning epoch (UA, RA, TA,
  MIA_efficacy, accuracy.train/val, SVC_MIA.<four other features>, rUA, agreement, avg_gap, cumulative RTE_seconds,
  kept_fraction for masked methods, stat.* for other epoch statistics), each under one name only, and Retrain's final
  values `retrain.UA|RA|TA|MIA_efficacy` at every step (a reference line on the same chart); tags (git commit, device,
  torch version, split hash, aliases, ...); artifacts (the result JSON, the resolved arguments `config.yaml`, the
  split indices, plots).
* Sweeps: one parent run, one child per cell (tag `mlflow.parentRunId`, which the UI uses to group them), logged by
  the sweep's own process from each cell's result JSON (`log_result_run`: same params, metrics, tags and artifacts as
  a live run, with the cell's real start and end time; the parent holds the tables and the sweep's plots).
* An unreachable server is a one-line `UserError` before any work. A failure later (the server went away) is a one-line
  warning; tracking stops for that process and the local result files carry on.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from evaluation import write_result
from utils import UserError, atomic_write_text, file_lock, to_jsonable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SCALAR_METRICS = ("UA", "RA", "TA", "MIA_efficacy", "rUA", "agreement", "avg_gap", "RTE_seconds")
KEPT_FRACTION = "kept_fraction"
REFERENCE_METRICS = ("UA", "RA", "TA", "MIA_efficacy")
# Scores computed once after unlearning (--forget_quality, --mia): logged at the last epoch's step (`final_metrics`).
FORGET_QUALITY_METRICS = ("forget_score", "final_score", "retain_acc_ratio", "test_acc_ratio")
# The same number under a second name only doubles the metric list: UA = 100 - accuracy.forget, RA = accuracy.retain,
# TA = accuracy.test, MIA_efficacy = SVC_MIA.confidence.
DUPLICATE_ACCURACIES = ("forget", "retain", "test")
DUPLICATE_SVC_FEATURES = ("confidence",)
EXPERIMENT_DESCRIPTION = (
    "Machine unlearning of image classifiers, compared with Retrain (a model trained without the forget set). Each run "
    "is one method on one forget set and seed: UA, RA, TA and MIA_efficacy per unlearning epoch, their Retrain values "
    "as `retrain.*`, and `avg_gap` (mean absolute gap to Retrain; lower is closer). Benchmarks are parent runs holding "
    "the results table and plots; expand one to see its cells.")
# mlflow 3 opens an experiment on its GenAI overview unless the experiment says it is about training models.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

# mlflow's HTTP client retries with exponential back-off for minutes by default; a sweep should notice an outage
# quickly and carry on with its local files instead. Explicit user settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


# ---------------------------------------------------------------------------------------------------------------------
# Where to track, and whether it answers
# ---------------------------------------------------------------------------------------------------------------------

def tracking_uri(environ: dict | None = None) -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; relative SQLite paths are resolved against the working
    directory."""
    uri = (environ if environ is not None else os.environ).get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other backends and in-memory databases)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the tracking backend cannot be used (before anything is trained or written)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UserError(f"cannot reach the mlflow tracking server at {uri} ({reason}); start it "
                            f"(mlflow server --port 5000), fix MLFLOW_TRACKING_URI, or pass --no-track") from None
    elif parsed.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"cannot use the tracking database {uri}: folder '{folder}' is missing or not writable; "
                            f"set MLFLOW_TRACKING_URI or pass --no-track")


def open_tracker(experiment: str, uri: str | None = None) -> tuple[MlflowTracker, str]:
    """Check the backend, then get or create the experiment. Returns the tracker and the experiment id."""
    uri = uri or tracking_uri()
    check_tracking_uri(uri)
    tracker = MlflowTracker(uri)
    return tracker, tracker.experiment_id(experiment)


UI_ADDRESS = "http://127.0.0.1:5000"


def runs_view_link(uri: str, experiment_id: str) -> str:
    """The address that opens the experiment's runs table directly (not mlflow's overview page): on the tracking
    server itself, or on `mlflow ui` started at its default address for a local SQLite database."""
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs?compareRunsMode=TABLE"


def how_to_browse(uri: str, experiment_id: str) -> str:
    """One line for the end of a run: the runs view, and the command that serves it for a local database."""
    link = runs_view_link(uri, experiment_id)
    if urlparse(uri).scheme in ("http", "https"):
        return f"mlflow runs: {link}"
    return f"mlflow runs: {link} (after `mlflow ui --backend-store-uri {uri}`)"


# ---------------------------------------------------------------------------------------------------------------------
# What gets logged
# ---------------------------------------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def epoch_metrics(metrics: dict, stats: dict | None = None) -> dict[str, float]:
    """Flatten one epoch's metrics (the keys of the result JSON) into mlflow metric names.

    `metrics` is what `experiment.unlearn_and_evaluate` hands to `on_epoch` (epoch statistics as `stat_<name>`), an
    entry of a result's "curves", or a final result (then `stats` is the last entry of its "epoch_stats")."""
    flat: dict[str, float] = {}
    for key in SCALAR_METRICS:
        value = _number(metrics.get(key))
        if value is not None:
            flat[key] = value
    for part, value in (metrics.get("accuracy") or {}).items():
        if _number(value) is not None and part not in DUPLICATE_ACCURACIES:
            flat[f"accuracy.{part}"] = float(value)
    for feature, value in (metrics.get("SVC_MIA_forget_efficacy") or {}).items():
        if _number(value) is not None and feature not in DUPLICATE_SVC_FEATURES:
            flat[f"SVC_MIA.{feature}"] = float(value)
    epoch_stats = {k[len("stat_"):]: v for k, v in metrics.items() if k.startswith("stat_")}
    epoch_stats.update(stats or {})
    for name, value in epoch_stats.items():
        if _number(value) is not None:
            flat[KEPT_FRACTION if name == KEPT_FRACTION else f"stat.{name}"] = float(value)
    return flat


def final_metrics(result: dict) -> dict[str, float]:
    """The scores a result gets once, after its last epoch: the forgetting quality of `--forget_quality N` as
    `forget_quality.<key>`, and each per-example attack summary of `--mia` (the method's, the original's, Retrain's
    and their gaps: {"lira_online": {"auc": ..}, ..}) as `mia.<summary>.<key>`."""
    quality = result.get("forget_quality") or {}
    flat = {f"forget_quality.{key}": float(quality[key]) for key in FORGET_QUALITY_METRICS
            if _number(quality.get(key)) is not None}
    for summary, values in (result.get("per_example_mia") or {}).items():
        if summary == "seconds" or not isinstance(values, dict):
            continue  # timings and file paths are not scores
        flat.update({f"mia.{summary}.{key}": float(value) for key, value in values.items()
                     if _number(value) is not None})
    return flat


def log_final_metrics(handle, result: dict, timestamp_ms: int | None = None) -> None:
    values = final_metrics(result)
    if values:
        handle.log_metrics(values, step=int(result.get("epochs_run") or 1), timestamp_ms=timestamp_ms)


def reference_metrics(retrain: dict | None) -> dict[str, float]:
    """Retrain's final UA, RA, TA, MIA_efficacy as `retrain.<name>` (logged at every epoch step: a flat line that the
    method's curve can be read against)."""
    return {f"retrain.{key}": float((retrain or {})[key]) for key in REFERENCE_METRICS
            if _number((retrain or {}).get(key)) is not None}


def flat_params(values: dict[str, Any]) -> dict[str, str]:
    """Short string values (mlflow caps a value at 6000 characters); a missing value (None) is not a parameter."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: PLC0415  (mlflow only when a real tracker is opened)

    params = {}
    for key, value in values.items():
        if value is None:
            continue
        text = str(to_jsonable(value))
        params[str(key)] = text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
    return params


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------------------------------
# Trackers and run handles
# ---------------------------------------------------------------------------------------------------------------------

class NullRun:
    """A run that logs nothing (--no-track)."""

    run_id = None
    record = None

    def log_epoch(self, epoch: int, metrics: dict, stats: dict | None = None, reference: dict | None = None,
                  timestamp_ms: int | None = None) -> None: ...

    def log_metrics(self, values: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None: ...

    def log_params(self, params: dict) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def log_files(self, result_file: Path | None = None, config: dict | None = None, split_file: Path | None = None,
                  plots: Iterable[Path] = (), others: Iterable[Path] = ()) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def end(self, status: str = "FINISHED", end_time_ms: int | None = None) -> None: ...


class NullTracker:
    enabled = False
    uri = None

    def start_run(self, experiment_id, run_name, params=None, tags=None, parent_run_id=None, description=None,
                  start_time_ms=None) -> NullRun:
        return NullRun()


class MlflowTracker:
    """Explicit `MlflowClient` calls (no global active run), so one process can hold a parent and many children."""

    enabled = True

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient  # noqa: PLC0415  (mlflow only when a real tracker is opened)

        self.uri = uri
        self.broken: str | None = None
        try:
            # Opening a SQLite store creates and migrates the database when it is new. Two processes doing that at once
            # (the first jobs of a sweep on a fresh database) interleave their migrations and leave the database
            # half-migrated for good, so the first opening is serialised; once migrated, opening only reads the schema.
            database = sqlite_database(uri)
            with file_lock(database) if database is not None else contextlib.nullcontext():
                self.client = MlflowClient(tracking_uri=uri)
        except Exception as exc:  # mlflow raises many types for bad URIs and stores
            raise UserError(f"cannot open the mlflow tracking backend {uri} ({_short(exc)}); set MLFLOW_TRACKING_URI "
                            f"or pass --no-track") from None

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment; a new one gets the description and the model-training view."""
        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    return self.client.create_experiment(name, tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION,
                                                                     EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except Exception:  # created by a parallel job in the meantime
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            if experiment.lifecycle_stage == "deleted":
                raise UserError(f"mlflow experiment '{name}' is deleted; restore it or pass --experiment")
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before these tags existed, or by another tool
                self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                if "mlflow.note.content" not in experiment.tags:
                    self.client.set_experiment_tag(experiment.experiment_id, "mlflow.note.content",
                                                   EXPERIMENT_DESCRIPTION)
            return experiment.experiment_id
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot use the mlflow tracking backend {self.uri} ({_short(exc)}); fix "
                            f"MLFLOW_TRACKING_URI or pass --no-track") from None

    def end_stale_runs(self, experiment_id: str, tag_key: str, tag_value: str, status: str = "KILLED") -> int:
        """Mark every RUNNING run of the experiment whose tag `tag_key` equals `tag_value` as `status`; return how many.

        A process that is killed (SIGKILL, a lost node) cannot end its runs, which then show as running forever; a new
        invocation calls this for the runs only it could have started (e.g. a sweep's parent runs, by their tag)."""
        if status not in ("KILLED", "FAILED", "FINISHED"):
            raise ValueError(f"status {status!r}; allowed: KILLED, FAILED, FINISHED")
        ended, page_token = 0, None
        while True:
            # The tag is matched here rather than in the filter string, so any tag value works without quoting rules.
            page = self.guard("search runs", self.client.search_runs, [experiment_id],
                              filter_string="attributes.status = 'RUNNING'", max_results=1000, page_token=page_token)
            if page is None:
                return ended
            for stale in page:
                if stale.data.tags.get(tag_key) == tag_value:
                    self.guard("end stale run", self.client.set_terminated, stale.info.run_id, status)
                    if self.broken:
                        return ended
                    ended += 1
            page_token = page.token
            if not page_token:
                return ended

    def guard(self, what: str, call, *args, **kwargs):
        """Run one tracking call; the first failure is reported in one line and stops tracking in this process."""
        if self.broken:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            self.broken = f"{what}: {_short(exc)}"
            print(f"warning: mlflow tracking stopped ({self.broken}); results are still written to local files",
                  file=sys.stderr, flush=True)
            return None

    def start_run(self, experiment_id: str, run_name: str, params: dict | None = None, tags: dict | None = None,
                  parent_run_id: str | None = None, description: str | None = None,
                  start_time_ms: int | None = None) -> MlflowRun | NullRun:
        """`start_time_ms` (unix ms): when the work began, for runs logged after the fact (default: now)."""
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        all_tags.setdefault("mlflow.source.git.commit", all_tags.get("git_commit", ""))
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if description:
            all_tags["mlflow.note.content"] = description
        created = self.guard("create run", self.client.create_run, experiment_id, tags=all_tags, run_name=run_name,
                             start_time=start_time_ms)
        if created is None:
            return NullRun()
        handle = MlflowRun(self, created.info.run_id, experiment_id)
        if params:
            handle.log_params(params)
        return handle


class MlflowRun:
    def __init__(self, tracker: MlflowTracker, run_id: str, experiment_id: str):
        self.tracker, self.run_id, self.experiment_id = tracker, run_id, experiment_id
        self.client = tracker.client
        self.ended = False

    @property
    def record(self) -> dict | None:
        """Where this run lives, for the local result JSON; None when tracking failed on the way."""
        if self.tracker.broken or not self.ended:
            return None
        return {"tracking_uri": self.tracker.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param  # noqa: PLC0415  (mlflow only when a real tracker is opened)

        items = [Param(k, v) for k, v in flat_params(params).items()]
        for chunk in _chunks(items, 100):
            self.tracker.guard("log params", self.client.log_batch, self.run_id, params=chunk)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag  # noqa: PLC0415  (mlflow only when a real tracker is opened)

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, 100):
            self.tracker.guard("set tags", self.client.log_batch, self.run_id, tags=chunk)

    def log_epoch(self, epoch: int, metrics: dict, stats: dict | None = None, reference: dict | None = None,
                  timestamp_ms: int | None = None) -> None:
        """One unlearning epoch (`step` = epoch), with Retrain's final values when `reference` holds them."""
        self.log_metrics({**epoch_metrics(metrics, stats), **reference_metrics(reference)}, step=epoch,
                         timestamp_ms=timestamp_ms)

    def log_metrics(self, values: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415  (mlflow only when a real tracker is opened)

        timestamp_ms = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, v, timestamp_ms, step) for k, v in values.items()]  # NaN is stored as such
        for chunk in _chunks(items, 1000):
            self.tracker.guard("log metrics", self.client.log_batch, self.run_id, metrics=chunk)

    def log_files(self, result_file: Path | None = None, config: dict | None = None, split_file: Path | None = None,
                  plots: Iterable[Path] = (), others: Iterable[Path] = ()) -> None:
        """The run's artifacts: result JSON, resolved arguments (config.yaml), split indices, plots."""
        if result_file is not None and Path(result_file).is_file():
            self.tracker.guard("log artifact", self.client.log_artifact, self.run_id, str(result_file))
        if config is not None:
            import yaml  # noqa: PLC0415  (PyYAML comes with mlflow; only a real tracker writes it)

            self._log_written("config.yaml", yaml.safe_dump(to_jsonable(config), sort_keys=False))
        if split_file is not None and Path(split_file).is_file():
            self.tracker.guard("log split", self.client.log_artifact, self.run_id, str(split_file), "split")
        for plot in plots:
            if plot is not None and Path(plot).is_file():
                self.tracker.guard("log plot", self.client.log_artifact, self.run_id, str(plot), "plots")
        for other in others:
            if other is not None and Path(other).is_file():
                self.tracker.guard("log artifact", self.client.log_artifact, self.run_id, str(other))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_written(artifact_file, text)

    def _log_written(self, artifact_file: str, text: str) -> None:
        """Log text as an artifact file with the mode any new file gets under the umask: mlflow's own `log_text` and
        `log_dict` go through a private temporary file (0600), which a local artifact store then keeps."""
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / Path(artifact_file).name
            atomic_write_text(local, text)
            parent = str(Path(artifact_file).parent)
            self.tracker.guard("log artifact", self.client.log_artifact, self.run_id, str(local),
                               None if parent == "." else parent)

    def end(self, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """`end_time_ms` (unix ms): when the work ended, for runs logged after the fact (default: now)."""
        if not self.ended:
            self.tracker.guard("end run", self.client.set_terminated, self.run_id, status, end_time=end_time_ms)
            self.ended = True


def log_result_run(tracker: MlflowTracker, experiment_id: str, name: str, result: dict, result_file: Path,
                   params: dict, tags: dict, parent_run_id: str | None = None, plots: Iterable[Path] = (),
                   times_ms: tuple[int, int] | None = None) -> MlflowRun | NullRun:
    """Log a finished result (a benchmark cell computed in a worker) as a run: the same params, per-epoch metrics
    (from its "curves", else the final metrics at step = epochs run), Retrain reference metrics, tags and artifacts as
    a live mlflow_forget.py run. Start and end are the work's own (`times_ms`, else the result's `started_at` /
    `finished_at`), so the run's duration is the time the cell took, not the time it took to log it."""
    start_ms, end_ms = times_ms or (result.get("started_at"), result.get("finished_at"))
    handle = tracker.start_run(experiment_id, name, params=params, tags=tags, parent_run_id=parent_run_id,
                               start_time_ms=start_ms)
    curves = result.get("curves") or []
    reference = result.get("retrain")
    if curves:
        for entry in curves:
            handle.log_epoch(int(entry["epoch"]), entry, reference=reference, timestamp_ms=end_ms)
    else:
        stats = (result.get("epoch_stats") or [{}])[-1] if result.get("epoch_stats") else {}
        handle.log_epoch(int(result.get("epochs_run") or 1), result, stats, reference=reference, timestamp_ms=end_ms)
    log_final_metrics(handle, result, timestamp_ms=end_ms)
    split_file = result.get("split_file")
    handle.log_files(result_file, config=result.get("args"), split_file=Path(split_file) if split_file else None,
                     plots=plots)
    handle.end("FINISHED", end_time_ms=end_ms)
    return handle


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def ending(handle):
    """End a tracked run as FINISHED, KILLED (Ctrl-C) or FAILED, whatever happens inside the block."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        handle.end(status)


def link_result(handle, result: dict, path: Path) -> dict:
    """Say in the local result file which tracked run holds it (rewritten atomically); return the result."""
    if handle.record:
        result["tracking"] = handle.record
        write_result(path, result)
    result["result_file"] = str(path)
    return result
