"""MLflow backend: one experiment per paper table, one run per (row, run directory).

The store is `tracker.mlflow.tracking_uri`, or by default the embedded
`sqlite:///<runs root>/mlflow.db` with artifacts in `<runs root>/mlartifacts` (nothing to start;
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` browses it).

Every call only appends to an in-memory queue; a background thread sends the queue in batches.
When the store is unreachable the thread warns once, keeps the queue (bounded: the oldest metrics
are dropped first) and retries with exponential backoff, so the training loop never waits on
MLflow. Whatever could not be sent is still in metrics.jsonl: `python -m repro.tools sync-runs
RUN_DIR` replays it (`replay_metrics`, idempotent).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from repro.track.base import metric_key, scalar_metrics
from repro.track.context import (
    RunContext,
    read_tracker_runs,
    run_display_name,
    runs_root,
    update_tracker_runs,
)
from repro.track.jsonl import (
    PARAMS_FILE,
    RESERVED_KEYS,
    STATUS_FILE,
    TAGS_FILE,
    iter_metric_records,
    read_json,
)

log = logging.getLogger("repro.track")

STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
# MLflow 3's UI opens an experiment without this tag on its GenAI traces page; every repro experiment
# trains models, so it is marked as such ("custom_model_development" is the UI's "model training").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri(root: str | Path) -> str:
    """The embedded store beside the run directories."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def sqlite_store_path(tracking_uri: str) -> Path | None:
    """The database file of an embedded `sqlite:///` store (None for a server)."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]) if tracking_uri.startswith(prefix) else None


def default_artifact_location(root: str | Path) -> str:
    return (Path(root).resolve() / "mlartifacts").as_uri()


def _not_found(error: Exception) -> bool:
    return isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Experiment id for `name`, creating it (with `artifact_location` when given) on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created meanwhile by a sibling job of the sweep
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


def log_new_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> int:
    """Log the params the run does not have yet; a changed value is kept as first logged (MLflow
    forbids changing a param) and reported. Returns how many were logged."""
    existing = client.get_run(run_id).data.params
    fresh, changed = [], []
    for key, value in params.items():
        text = _param_value(value)
        if key not in existing:
            fresh.append(Param(key, text))
        elif existing[key] != text:
            changed.append(key)
    if changed:
        log.warning("MLflow run %s keeps its first values of changed params: %s", run_id, ", ".join(sorted(changed)[:10]))
    for chunk in _chunks(fresh, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    return len(fresh)


def log_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    tag_list = [RunTag(str(k), str(v)) for k, v in tags.items()]
    for chunk in _chunks(tag_list, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def metrics_from_records(records: Iterable[dict[str, Any]]) -> list[Metric]:
    """JSONL records -> MLflow metrics, keeping the first value of each (key, step)."""
    seen: set[tuple[str, int]] = set()
    out: list[Metric] = []
    for record in records:
        step, split = int(record["step"]), str(record["split"])
        timestamp = int(float(record.get("time", time.time())) * 1000)
        values = scalar_metrics({k: v for k, v in record.items() if k not in RESERVED_KEYS})
        for name, value in values.items():
            key = metric_key(name, split)
            if (key, step) not in seen:
                seen.add((key, step))
                out.append(Metric(key, value, timestamp, step))
    return out


def replay_metrics(client: MlflowClient, run_id: str, records: Iterable[dict[str, Any]]) -> int:
    """Log the (key, step) pairs of `records` that the run's history lacks; returns how many.

    Idempotent: a second call finds every pair present and logs nothing.
    """
    wanted = metrics_from_records(records)
    present: dict[str, set[int]] = {}
    for key in sorted({metric.key for metric in wanted}):
        present[key] = {metric.step for metric in client.get_metric_history(run_id, key)}
    missing = [metric for metric in wanted if metric.step not in present[metric.key]]
    for chunk in _chunks(missing, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)
    return len(missing)


class _SweepParent:
    """The parent run of a Hydra multirun sweep, shared by its jobs through a file in the sweep dir."""

    FILE = "tracker_parent_runs.json"

    @classmethod
    def run_id(cls, client: MlflowClient, experiment_id: str, context: RunContext, tracking_uri: str) -> str:
        sweep_dir = Path(context.sweep_dir or ".")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with (sweep_dir / f".{cls.FILE}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # jobs of one sweep start concurrently under SLURM
            path = sweep_dir / cls.FILE
            known = json.loads(path.read_text()) if path.exists() else {}
            entry = known.get("mlflow", {})
            if entry.get("run_id") and entry.get("tracking_uri") == tracking_uri:
                return entry["run_id"]
            parent = client.create_run(
                experiment_id,
                run_name=f"{context.experiment} (sweep)",
                tags={"repro.sweep_dir": str(sweep_dir), "repro.experiment": context.experiment},
            )
            known["mlflow"] = {"run_id": parent.info.run_id, "tracking_uri": tracking_uri}
            path.write_text(json.dumps(known, indent=1) + "\n")
            return parent.info.run_id


class MlflowTracker:
    """Tracker backend writing to MLflow from a background thread (see the module docstring)."""

    start_timeout_s = 5.0
    """How long the constructor waits for the run to be created or resumed before going on."""
    first_start_timeout_s = 120.0
    """The same wait when the embedded store does not exist yet: MLflow first creates its tables
    (about 10 s on a busy 2-core machine; nothing is down)."""
    flush_timeout_s = 30.0
    """How long `finish` waits for the queue to drain; what is left is for `sync-runs`."""
    max_queued_metrics = 200_000
    """Queue bound (metric values); beyond it the oldest are dropped (metrics.jsonl has them)."""
    max_backoff_s = 60.0
    """Longest pause between retries while the store is unreachable."""

    def __init__(self, context: RunContext, cfg: Any = None):
        self.context = context
        self.run_dir = context.run_dir
        root = runs_root(self.run_dir)
        configured_uri = getattr(cfg, "tracking_uri", None) if cfg is not None else None
        self.tracking_uri = str(configured_uri) if configured_uri else default_tracking_uri(root)
        self.artifact_location = None if configured_uri else default_artifact_location(root)
        if not configured_uri:
            root.mkdir(parents=True, exist_ok=True)
        name = getattr(cfg, "experiment_name", None) if cfg is not None else None
        self.experiment_name = str(name or context.paper_table or context.experiment)
        self.log_checkpoints = bool(getattr(cfg, "log_checkpoints", False)) if cfg is not None else False

        known = read_tracker_runs(self.run_dir).get("mlflow", {})
        same_store = known.get("tracking_uri") in (None, self.tracking_uri)
        self._run_id: str | None = known.get("run_id") if same_store else None
        self._resuming = self._run_id is not None

        self._ops: collections.deque[tuple[str, Any]] = collections.deque()
        self._queued_metrics = 0
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._failing = False
        self._warned_down = False
        self._warned_dropped = False
        self._run_ready = threading.Event()
        self._client: MlflowClient | None = None
        self._thread = threading.Thread(target=self._work, name="repro-mlflow", daemon=True)
        self._start_and_wait()

    def _start_and_wait(self) -> None:
        """Start the sender and wait (bounded) for the run to be opened, saying what takes the time.

        The first start of the embedded sqlite store creates MLflow's tables (~10 s): it is timed and
        announced, not reported as an outage. A store that fails outright ends the wait at once (the
        sender has already warned)."""
        embedded_store = sqlite_store_path(self.tracking_uri)
        creating_store = embedded_store is not None and not (embedded_store.exists() and embedded_store.stat().st_size)
        if creating_store:
            log.info("MLflow: creating the embedded store %s (first start only: MLflow sets up its tables)",
                     embedded_store)
        started = time.monotonic()
        deadline = started + (self.first_start_timeout_s if creating_store else self.start_timeout_s)
        self._thread.start()
        while not self._run_ready.wait(0.05):
            if self._warned_down:
                return
            if time.monotonic() >= deadline:
                break
        if self._run_ready.is_set():
            if creating_store:
                log.info("MLflow: embedded store ready in %.1f s", time.monotonic() - started)
        elif embedded_store is not None:  # a local file: slow, not down
            log.warning(
                "MLflow's embedded store %s is still %s after %.0f s; training goes on, metrics wait in a "
                "queue and in metrics.jsonl", embedded_store,
                "creating its tables" if creating_store else "opening", time.monotonic() - started,
            )
        else:
            log.warning(
                "MLflow (%s) did not answer within %.0f s; training goes on, metrics wait in a queue "
                "and in metrics.jsonl", self.tracking_uri, self.start_timeout_s,
            )

    # ---- Tracker protocol (all non-blocking) -------------------------------------------------
    def log_params(self, params: dict) -> None:
        self._put("params", {str(k): v for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        timestamp = int(time.time() * 1000)
        batch = [Metric(metric_key(name, split), value, timestamp, int(step)) for name, value in
                 scalar_metrics(metrics).items()]
        if batch:
            self._put("metrics", batch)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".pt" and not self.log_checkpoints:
            return
        self._put("artifact", path)

    def set_tags(self, tags: dict) -> None:
        self._put("tags", {str(k): str(v) for k, v in tags.items()})

    def run_ids(self) -> dict[str, str]:
        return {"mlflow": self._run_id} if self._run_id else {}

    def finish(self, status: str = "FINISHED") -> None:
        status = status if status in STATUSES else "FAILED"
        self._put("terminate", status)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.flush_timeout_s)
        if self._thread.is_alive():
            with self._cond:
                self._abandoned = True  # never send late: sync-runs will replay from metrics.jsonl
                left = len(self._ops)
                self._cond.notify_all()
            log.warning(
                "MLflow (%s) unreachable at the end of the run: %d queued operations not sent; when it is "
                "back, run `python -m repro.tools sync-runs %s`", self.tracking_uri, left, self.run_dir,
            )

    # ---- background sender --------------------------------------------------------------------
    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if self._abandoned:
                return
            self._ops.append((kind, payload))
            if kind == "metrics":
                self._queued_metrics += len(payload)
                self._drop_oldest_metrics()
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> None:
        while self._queued_metrics > self.max_queued_metrics:
            for index, (kind, payload) in enumerate(self._ops):
                if kind == "metrics":
                    del self._ops[index]
                    self._queued_metrics -= len(payload)
                    break
            else:
                return
            if not self._warned_dropped:
                self._warned_dropped = True
                log.warning("MLflow queue full: oldest metrics dropped (sync-runs replays them later)")

    def _next_batch(self) -> tuple[str, Any, int]:
        """The next operation; consecutive metric operations merge into one log_batch request."""
        kind, payload = self._ops[0]
        if kind != "metrics":
            return kind, payload, 1
        merged: list[Metric] = []
        taken = 0
        for op_kind, op_payload in self._ops:
            if op_kind != "metrics" or len(merged) + len(op_payload) > MAX_METRICS_PER_BATCH:
                break
            merged.extend(op_payload)
            taken += 1
        if not merged:  # a single call with more than MAX_METRICS_PER_BATCH values
            merged, taken = payload, 1
        return kind, merged, taken

    def _work(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while self._run_ready.is_set() and not self._ops and not self._closing and not self._abandoned:
                    self._cond.wait()
                if self._abandoned or (self._closing and not self._ops and self._run_ready.is_set()):
                    return
            try:
                if not self._run_ready.is_set():
                    self._open_run()
                    self._run_ready.set()
                with self._cond:
                    if not self._ops:
                        continue
                    kind, payload, taken = self._next_batch()
                self._send(kind, payload)
                with self._cond:
                    for _ in range(taken):
                        done_kind, done_payload = self._ops.popleft()
                        if done_kind == "metrics":
                            self._queued_metrics -= len(done_payload)
                if self._failing:
                    self._failing = False
                    log.warning("MLflow (%s) reachable again; queued metrics sent", self.tracking_uri)
                backoff = 0.5
            except Exception as error:  # store down, network, server error: retry later
                self._failing = True
                if not self._warned_down:
                    self._warned_down = True
                    log.warning(
                        "MLflow (%s) failed: %s: %s. Training goes on; metrics.jsonl keeps everything; "
                        "retrying with backoff (`python -m repro.tools sync-runs %s` replays what is missed)",
                        self.tracking_uri, type(error).__name__, str(error)[:300], self.run_dir,
                    )
                with self._cond:
                    self._cond.wait_for(lambda: self._abandoned, timeout=backoff)
                    if self._abandoned:
                        return
                backoff = min(backoff * 2, self.max_backoff_s)

    def _open_run(self) -> None:
        """Create the run, or continue the one this run directory already has."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        if self._run_id is not None:
            try:
                run = client.get_run(self._run_id)
            except Exception as error:
                if not _not_found(error):
                    raise
                log.warning("MLflow run %s not found in %s; starting a new run", self._run_id, self.tracking_uri)
                self._run_id, self._resuming = None, False
            else:
                if run.info.status != "RUNNING":
                    client.update_run(self._run_id, status="RUNNING")
                return
        experiment_id = get_or_create_experiment(client, self.experiment_name, self.artifact_location)
        tags = {"mlflow.runName": self.context.run_name}
        if self.context.sweep_dir:
            tags["mlflow.parentRunId"] = _SweepParent.run_id(client, experiment_id, self.context, self.tracking_uri)
        run = client.create_run(experiment_id, run_name=self.context.run_name, tags=tags)
        self._run_id = run.info.run_id
        update_tracker_runs(
            self.run_dir, "mlflow",
            {"run_id": self._run_id, "tracking_uri": self.tracking_uri, "experiment_id": experiment_id},
        )

    def _send(self, kind: str, payload: Any) -> None:
        client, run_id = self._client, self._run_id
        assert client is not None and run_id is not None
        if kind == "metrics":
            client.log_batch(run_id, metrics=payload)
        elif kind == "params":
            log_new_params(client, run_id, payload)
        elif kind == "tags":
            log_tags(client, run_id, payload)
        elif kind == "artifact":
            if Path(payload).exists():
                client.log_artifact(run_id, str(payload))
        elif kind == "terminate":
            client.set_terminated(run_id, status=payload)


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Replay `<run_dir>/metrics.jsonl` into the run's MLflow run (creating the run if it never was).

    Returns {"run_id", "tracking_uri", "logged_metrics", "logged_params", "status"}.
    """
    run_dir = Path(run_dir).resolve()
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path}: no metrics.jsonl (is {run_dir} a run directory?)")
    known = read_tracker_runs(run_dir).get("mlflow", {})
    uri = tracking_uri or known.get("tracking_uri") or default_tracking_uri(runs_root(run_dir))
    client = MlflowClient(tracking_uri=uri)
    tags = read_json(run_dir / TAGS_FILE, default={}) or {}
    params = read_json(run_dir / PARAMS_FILE, default={}) or {}
    run_id = known.get("run_id") if known.get("tracking_uri") in (None, uri) else None
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception as error:
            if not _not_found(error):
                raise
            run_id = None
    if run_id is None:
        experiment = tags.get("repro.experiment") or run_dir.name
        name = tags.get("repro.paper_table") or experiment
        root = runs_root(run_dir)
        artifact_location = default_artifact_location(root) if uri == default_tracking_uri(root) else None
        experiment_id = get_or_create_experiment(client, name, artifact_location)
        run_name = run_display_name(run_dir, experiment)
        run_id = client.create_run(experiment_id, run_name=run_name, tags={"mlflow.runName": run_name}).info.run_id
        update_tracker_runs(run_dir, "mlflow", {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id})
    if tags:
        log_tags(client, run_id, tags)
    logged_params = log_new_params(client, run_id, params) if params else 0
    logged = replay_metrics(client, run_id, iter_metric_records(metrics_path))
    status = (read_json(run_dir / STATUS_FILE, default={}) or {}).get("status")
    run = client.get_run(run_id)
    if status in STATUSES and status != "RUNNING" and run.info.status != status:
        client.set_terminated(run_id, status=status)
    return {"run_id": run_id, "tracking_uri": uri, "logged_metrics": logged, "logged_params": logged_params,
            "status": status or run.info.status}
