"""The always-on tracker: `<run_dir>/metrics.jsonl`, plus params.json, tags.json, tracker_status.json.

metrics.jsonl is the source of truth that `sync-runs` replays into MLflow after an outage and
that `runs` reads when no MLflow store is at hand. One JSON object per `log_metrics` call:
`{"step": int, "split": str, "time": float, **metrics}`, flushed line by line so a killed
process loses at most the line being written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from repro.track.base import scalar_metrics

log = logging.getLogger("repro.track")

METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "params.json"
TAGS_FILE = "tags.json"
STATUS_FILE = "tracker_status.json"
RESERVED_KEYS = ("step", "split", "time")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; a missing file gives `default`, a corrupt one raises naming the file."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def iter_metric_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a metrics.jsonl file in order.

    A line that does not parse (the last line of a process killed mid-write) is skipped with a
    warning naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return
    with path.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: unreadable line skipped (truncated write?)", path, line_number)
                continue
            if not isinstance(record, dict) or "step" not in record or "split" not in record:
                log.warning("%s:%d: record without step/split skipped", path, line_number)
                continue
            yield record


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The metric entries of one record (everything but step/split/time)."""
    return scalar_metrics({k: v for k, v in record.items() if k not in RESERVED_KEYS})


def logged_names_by_step(path: str | Path) -> dict[tuple[str, int], set[str]]:
    """(split, step) -> metric names already in metrics.jsonl (for replay de-duplication)."""
    out: dict[tuple[str, int], set[str]] = {}
    for record in iter_metric_records(path):
        out.setdefault((record["split"], int(record["step"])), set()).update(record_metrics(record))
    return out


class JsonlTracker:
    """Append-only JSONL metrics log in the run directory; never raises on a healthy disk."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        # A process killed mid-line leaves no newline: start ours on a fresh line.
        needs_newline = False
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            with self.metrics_path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                needs_newline = handle.read(1) != b"\n"
        self._handle = self.metrics_path.open("a", encoding="utf-8")
        if needs_newline:
            self._handle.write("\n")
            self._handle.flush()
        status = read_json(self.run_dir / STATUS_FILE, default={}) or {}
        status.update({"status": "RUNNING", "last_start_time": time.time(), "pid": os.getpid()})
        status.setdefault("start_time", status["last_start_time"])
        status.pop("end_time", None)
        write_json_atomic(self.run_dir / STATUS_FILE, status)

    def log_params(self, params: dict) -> None:
        path = self.run_dir / PARAMS_FILE
        merged = read_json(path, default={}) or {}
        merged.update({str(k): v for k, v in params.items()})
        write_json_atomic(path, merged)

    def log_metrics(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        record: dict[str, Any] = {"step": int(step), "split": split, "time": time.time()}
        record.update(scalar_metrics(metrics))
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def log_artifact(self, path: str | Path) -> None:
        """Nothing to do: artifacts of a run live in its run directory already."""

    def set_tags(self, tags: dict) -> None:
        path = self.run_dir / TAGS_FILE
        merged = read_json(path, default={}) or {}
        merged.update({str(k): str(v) for k, v in tags.items()})
        write_json_atomic(path, merged)

    def run_ids(self) -> dict[str, str]:
        return {}

    def finish(self, status: str = "FINISHED") -> None:
        if not self._handle.closed:
            self._handle.close()
        state = read_json(self.run_dir / STATUS_FILE, default={}) or {}
        state.update({"status": status, "end_time": time.time()})
        write_json_atomic(self.run_dir / STATUS_FILE, state)
