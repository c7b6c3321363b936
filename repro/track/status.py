"""`<run_dir>/status.json`: a run's state, stage, devices and wall time, read by the report.

Wall time accumulates over restarts, so a run that was preempted and resumed reports the
compute it really used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunStatus:
    """Writes `status.json` atomically each time the run's state changes."""

    def __init__(self, run_dir: Path, name: str, stage: str, gpus: int):
        self.path = Path(run_dir) / "status.json"
        previous = read_status(run_dir)
        self.earlier_seconds = float(previous.get("wall_seconds", 0.0))  # a resumed run adds to it
        self.started = time.time()
        self.fields = {"name": name, "stage": stage, "gpus": gpus}

    def write(self, status: str, **extra) -> None:
        """Record `status` ('running', 'finished', 'failed') and the wall time so far."""
        wall = self.earlier_seconds + time.time() - self.started
        record = {**self.fields, **extra, "status": status, "wall_seconds": round(wall, 3), "updated": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.path)


def read_status(run_dir: Path) -> dict:
    """The run's last recorded status, or {} when it never started."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}
