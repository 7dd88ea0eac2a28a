"""Optional experiment trackers that mirror the metrics stream: TensorBoard and MLflow.

metrics.jsonl and summary.json stay the source of truth (the study reads only those); a tracker
receives the same records as metrics.jsonl, through `MetricsLog`, and the final summary when the run
ends. Only rank 0 tracks. Both packages are imported lazily, on use, and come with
`pip install 'pretune[track]'`.

    trackers = open_trackers(cfg, run_dir, enabled=rt.is_main)
    for t in trackers: t.log({"step": 10, "loss": 2.3})
    for t in trackers: t.close(summary)      # None: the run failed

A resumed run continues its MLflow run (the id is kept in OUT_DIR/mlflow_run_id) and appends to its
TensorBoard events, hiding the old events after the checkpoint it resumes from (`resume_after`), those
metrics.jsonl drops too. MLflow cannot delete or replace a
metric's points, so a resumed run does not log a figure again at the steps its MLflow run already holds
(those the killed session logged after the checkpoint it resumes from): each step appears once, with
the killed session's value, which is the resumed session's own unless the resume changed a setting
(optim.lr) or training is not deterministic (metrics.jsonl and TensorBoard hold the resumed session's).
The summary/ figures are always logged: the newest is the run's. An interim record (the partial
logging interval where train.stop_after cut a run short; metrics.jsonl drops it on resume) is not sent
to the trackers.

MLflow's keys are the metrics.jsonl keys with "/" turned into ".": a file store keeps metric KEY in
the file metrics/KEY, so val_loss and a source's val_loss/a.txt could not both exist (val_loss.a.txt
can). summary/KEY is the one "/" kept. A tracker that fails while the run goes on (a full disk, a
tracking server gone) is dropped with a warning; metrics.jsonl stays the record (MetricsLog).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from urllib.parse import urlparse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from pretune.errors import ConfigError
from pretune.files import atomic_write_bytes

INSTALL_HINT = "pip install 'pretune[track]'"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_VALUE = 500  # the limit of older MLflow servers (newer ones take 6000)
MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000
MAX_KEY = 250


class Tracker(Protocol):
    """Receives what metrics.jsonl receives, then the final summary."""

    def log(self, record: dict) -> None:
        """One metrics record: "step" and figures; values that are not numbers are skipped."""

    def close(self, summary: dict | None) -> None:
        """End the run; `summary` is summary.json's content, None when the run failed."""

    def resume_after(self, step: int) -> None:
        """The run resumes from its checkpoint at `step`: what was logged after it is logged again."""


# ----------------------------------------------------------------------------- helpers


def numeric_items(record: dict, skip: Iterable[str] = ("step",)) -> Iterator[tuple[str, float]]:
    """(key, float) for every real number in a flat record (not bools, not `skip`)."""
    skipped = set(skip)
    for key, value in record.items():
        if key in skipped or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield key, float(value)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _import(module: str, key: str):
    """Import a tracker's package, or say which key needs it and how to install it."""
    problem = _missing(module, key)
    if problem:
        raise ConfigError(problem)
    return importlib.import_module(module)


def _missing(module: str, key: str) -> str | None:
    """None when `module` imports; else the problem, naming the key and the fix."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return (f"{key}=true needs {module}, which cannot be imported ({e}); install it with "
                f"{INSTALL_HINT}, or set {key}=false")
    return None


def tracker_problems(cfg) -> list[str]:
    """The missing packages of the trackers that cfg.track enables (for validating a run up front)."""
    track = getattr(cfg, "track", None)
    wanted = [("torch.utils.tensorboard", "track.tensorboard", track and track.tensorboard),
              ("mlflow", "track.mlflow", track and track.mlflow)]
    return [p for module, key, on in wanted if on and (p := _missing(module, key))]


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Scalars in OUT_DIR/tensorboard, tagged like the metrics.jsonl keys; the summary under summary/."""

    def __init__(self, log_dir: Path, resumed: bool):
        self.module = _import("torch.utils.tensorboard", "track.tensorboard")
        self.log_dir, self.resumed = Path(log_dir), resumed
        self.writer = None
        self.purge_step: int | None = None  # a resumed run's first step: older events from it on are hidden
        self.last_step = 0

    def resume_after(self, step: int) -> None:
        """Hide the events of the steps after the checkpoint at `step`, which the resumed run logs again
        (or, resumed at its last step, never logs: metrics.jsonl keeps them, and so does TensorBoard)."""
        self.purge_step = step + 1

    def _writer(self, step: int | None = None):
        """Open the writer on first use, hiding the old events from the resumed run's first step on.
        A resumed run that was not told its checkpoint's step hides them from the first step it logs."""
        if self.writer is None:
            purge = self.purge_step
            if purge is None and self.resumed and step is not None:
                purge = step
            self.writer = self.module.SummaryWriter(str(self.log_dir), purge_step=purge)
        return self.writer

    def log(self, record: dict) -> None:
        if record.get("interim"):
            return  # a partial interval (train.stop_after), which a resume logs again whole
        step = int(record.get("step", self.last_step))
        writer = self._writer(step)
        for key, value in numeric_items(record):
            writer.add_scalar(key, value, step)
        self.last_step = step

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            step = int(summary.get("steps") or self.last_step)
            writer = self._writer()  # never purges from the summary's step: its points stay
            for key, value in numeric_items(flatten(summary), skip=()):
                writer.add_scalar(f"summary/{key}", value, step)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------- MLflow


def mlflow_uri(configured: str | None) -> str:
    """track.mlflow_uri, else MLFLOW_TRACKING_URI, else a file store in ./mlruns."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    """A file: URI or a plain path (a one-letter scheme is a Windows drive)."""
    scheme = urlparse(uri).scheme
    return scheme == "file" or len(scheme) <= 1


SUMMARY_PREFIX = "summary/"


def _clean_key(key: str) -> str:
    """An MLflow key for a metrics.jsonl key: letters, digits, _ - . and spaces, with "/" as ".".

    A file store keeps a metric in the file metrics/KEY, so KEY and KEY/NAME cannot both exist
    (val_loss and val_loss/a.txt, with several sources); summary/ is the one "/" left, and no
    other key has one."""
    summary = key.startswith(SUMMARY_PREFIX)
    body = re.sub(r"[^\w\-. ]", "_", key[len(SUMMARY_PREFIX) if summary else 0:].replace("/", "."))
    return ((SUMMARY_PREFIX if summary else "") + body)[:MAX_KEY]


class MLflowTracker:
    """One MLflow run per run directory: the resolved config as params, metrics by step, the summary's
    numbers as summary/KEY metrics and summary.json as an artifact. Uses MlflowClient (no global
    active run), so one process can track several runs one after another."""

    def __init__(self, cfg, run_dir: Path):
        _import("mlflow", "track.mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.Metric, self.run_dir = Metric, Path(run_dir)
        uri = mlflow_uri(cfg.track.mlflow_uri)
        if _is_file_store(uri):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless told otherwise;
            # it is what track.mlflow_uri=None promises (./mlruns), so opt in unless the user opted out.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.logged: dict[str, int] = {}  # a continued run's figures: the last step it holds of each
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment_id = self._experiment(cfg.track.experiment)
            self.run_id, existing = self._open_run(experiment_id, bool(cfg.resume))
        except MlflowException as e:
            raise ConfigError(f"track.mlflow_uri={uri}: MLflow refused it ({e.message.splitlines()[0]}); "
                              f"give a working tracking URI or set track.mlflow=false") from None
        from pretune.config_io import to_dict

        params = [Param(_clean_key(k), str(v)[:MAX_PARAM_VALUE])
                  for k, v in flatten(to_dict(cfg)).items() if _clean_key(k) not in existing]
        for batch in _chunks(params, MAX_PARAMS_PER_BATCH):  # params are immutable: only new ones
            self.client.log_batch(self.run_id, params=batch)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another run created it meanwhile (parallel study runs)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _open_run(self, experiment_id: str, resume: bool) -> tuple[str, dict]:
        """(run id, params it already has): the run recorded in the run dir when resuming, else a new one."""
        id_file = self.run_dir / MLFLOW_RUN_ID_FILE
        if resume and id_file.is_file():
            run = self._existing_run(id_file.read_text().strip())
            if run is not None:
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.logged = self._last_steps(run)
                return run.info.run_id, dict(run.data.params)
        tags = {"pretune.run_dir": str(self.run_dir.resolve())}
        run = self.client.create_run(experiment_id, run_name=str(self.run_dir), tags=tags)
        atomic_write_bytes(id_file, (run.info.run_id + "\n").encode())
        return run.info.run_id, {}

    def _existing_run(self, run_id: str):
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted, or another tracking server
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _last_steps(self, run) -> dict[str, int]:
        """The last step of each figure (not summary/) a continued run already holds."""
        last = {}
        for key in run.data.metrics:
            if not key.startswith("summary/"):
                steps = [m.step for m in self.client.get_metric_history(run.info.run_id, key)]
                if steps:
                    last[key] = max(steps)
        return last

    def _log_metrics(self, items: Iterable[tuple[str, float]], step: int, again: bool = True) -> None:
        """Log figures at `step`; again=False leaves out those the run already holds at or after it."""
        now = int(time.time() * 1000)
        metrics = [self.Metric(key, v, now, step) for key, v in ((_clean_key(k), v) for k, v in items)
                   if again or step > self.logged.get(key, -1)]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def resume_after(self, step: int) -> None:
        """Nothing to hide: MLflow cannot delete points, so the steps the run holds are not logged again."""

    def log(self, record: dict) -> None:
        if record.get("interim"):
            return  # a partial interval (train.stop_after), which a resume logs again whole
        self._log_metrics(numeric_items(record), int(record.get("step", 0)), again=False)

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            items = [(f"summary/{k}", v) for k, v in numeric_items(flatten(summary), skip=())
                     if math.isfinite(v)]
            self._log_metrics(items, int(summary.get("steps") or 0))
        summary_file = self.run_dir / "summary.json"
        if summary_file.is_file():
            self.client.log_artifact(self.run_id, str(summary_file))
        elif summary is not None:
            self.client.log_text(self.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
        ok = summary is not None and summary.get("status") not in ("diverged", "failed")
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


# ----------------------------------------------------------------------------- entry point


def open_trackers(cfg, run_dir: str | Path, enabled: bool) -> list[Tracker]:
    """The trackers that cfg.track enables (none on ranks other than 0, where `enabled` is False).

    Raises ConfigError naming the key and `pip install 'pretune[track]'` when a package is missing."""
    track = getattr(cfg, "track", None)
    if not enabled or track is None:
        return []
    problems = tracker_problems(cfg)
    if problems:
        raise ConfigError(problems)
    run_dir = Path(run_dir)
    trackers: list[Tracker] = []
    if track.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard", resumed=bool(cfg.resume)))
    if track.mlflow:
        trackers.append(MLflowTracker(cfg, run_dir))
    return trackers
