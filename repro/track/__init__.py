"""Experiment tracking: metrics.jsonl always, MLflow and/or W&B as configured (`tracker=` group).

`build_tracker(cfg, run_dir)` returns one Tracker that fans out to the JSONL log and the
configured backends. Backends are imported lazily (mlflow takes seconds to import), never stop
training when they fail, and continue the same runs when the process restarts in the same run
directory (ids in `<run_dir>/tracker_runs.json`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from repro.track.base import FanOutTracker, Tracker, metric_key
from repro.track.context import build_context, read_tracker_runs, update_tracker_runs
from repro.track.jsonl import JsonlTracker, logged_names_by_step

__all__ = ["FanOutTracker", "JsonlTracker", "Tracker", "build_tracker", "metric_key"]

log = logging.getLogger("repro.track")

BACKENDS = ("mlflow", "wandb")


def _tracker_config(cfg: Any) -> Any:
    try:
        return cfg.tracker
    except Exception:
        return None


def build_tracker(cfg: Any, run_dir: str | Path, run_ids: dict[str, str] | None = None) -> FanOutTracker:
    """JSONL + the backends named in `cfg.tracker.backends`, tagged and parameterized from `cfg`.

    `run_ids` (backend -> run id, e.g. from a checkpoint) continues those runs when the run
    directory does not remember them itself. The resolved config is logged as params, and
    `<run_dir>/config.yaml` (written by the CLI) as an artifact.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker_cfg = _tracker_config(cfg)
    names = list(tracker_cfg.backends) if tracker_cfg is not None else []
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ValueError(f"tracker.backends: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")

    already_logged = logged_names_by_step(run_dir / "metrics.jsonl")
    known = read_tracker_runs(run_dir)
    for backend, run_id in (run_ids or {}).items():
        if backend in BACKENDS and run_id and backend not in known:
            update_tracker_runs(run_dir, backend, {"run_id": run_id})

    context = build_context(cfg, run_dir)
    backends: list[Any] = [JsonlTracker(run_dir)]
    for name in names:
        try:
            if name == "mlflow":
                from repro.track.mlflow import MlflowTracker

                backends.append(MlflowTracker(context, tracker_cfg.mlflow))
            else:
                from repro.track.wandb import WandbTracker

                backends.append(WandbTracker(context, tracker_cfg.wandb))
        except Exception as error:  # a tracker must never stop training
            log.warning("tracker %s disabled: %s: %s (metrics.jsonl keeps everything)", name, type(error).__name__, error)

    tracker = FanOutTracker(backends, already_logged=already_logged)
    tracker.set_tags(context.tags)
    tracker.log_params(context.params)
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        tracker.log_artifact(config_file)
    return tracker
