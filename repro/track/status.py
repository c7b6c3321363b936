"""`<run_dir>/status.json`: a run's state, stage, devices and wall time, read by the report.

Wall time accumulates over restarts, so a run that was preempted and resumed reports the
compute it really used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from repro.config import PREEMPTED_EXIT_CODE
from repro.track.jsonl import read_json, write_json_atomic

Stage = tuple[str, Callable[[DictConfig, Path, Any], Any]]


class RunStatus:
    """Writes `status.json` atomically each time the run's state changes."""

    def __init__(self, run_dir: Path, name: str, stage: str, gpus: int):
        self.path = Path(run_dir) / "status.json"
        previous = read_status(run_dir)
        self.earlier_seconds = float(previous.get("wall_seconds", 0.0))  # a resumed run adds to it
        self.started = time.time()
        self.fields = {"name": name, "stage": stage, "gpus": gpus,
                       "completed_stages": list(previous.get("completed_stages", []))}

    def completed(self, stage: str) -> None:
        """Remember that `stage` finished in this run directory (kept across invocations)."""
        if stage not in self.fields["completed_stages"]:
            self.fields["completed_stages"].append(stage)

    def write(self, status: str, **extra) -> None:
        """Record `status` ('running', 'finished', 'failed') and the wall time so far."""
        wall = self.earlier_seconds + time.time() - self.started
        record = {**self.fields, **extra, "status": status, "wall_seconds": round(wall, 3), "updated": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, record)


def read_status(run_dir: Path) -> dict:
    """The run's last recorded status, or {} when it never started."""
    return read_json(Path(run_dir) / "status.json", default={})


def run_stages(cfg: DictConfig, run_dir: Path, name: str, stages: Sequence[Stage], gpus: int, tracker: Any) -> Any:
    """Run `stages` ([(name, fn(cfg, run_dir, tracker))]) in order as one tracked run.

    Writes the resolved config, keeps `status.json` current ('running' -> 'finished' / 'failed' /
    'preempted' when the trainer saved on a stop request) and finishes the tracker accordingly.
    Returns the last stage's result.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    status = RunStatus(run_dir, name=name, stage=",".join(stage for stage, _ in stages), gpus=gpus)
    outcome, result = "failed", None
    try:
        for stage, function in stages:
            status.write("running", current_stage=stage)
            result = function(cfg, run_dir, tracker)
            status.completed(stage)
        outcome = "finished"
    except SystemExit as stop:
        if stop.code == PREEMPTED_EXIT_CODE:
            outcome = "preempted"
        raise
    finally:
        status.write(outcome)
        if tracker is not None:
            tracker.finish({"finished": "FINISHED", "preempted": "KILLED"}.get(outcome, "FAILED"))
    return result


def missing_pseudo_labels(cfg: DictConfig, run_dir: Path) -> str | None:
    """Why `cfg.stage` may not run alone in a self-training row's run directory, or None.

    A self-training row's finetune and evaluate stages mean "on the pseudo-labels": run before its
    pseudo_label stage finished here they would be a plain fine-tuning written into, and reported as, the
    self-training row. Evaluating a given checkpoint (`checkpoint=PATH`, e.g. a released self-trained
    model) is allowed.
    """
    stages = list(cfg.stages)
    if not cfg.stage or "pseudo_label" not in stages or cfg.stage == "pseudo_label":
        return None
    if cfg.stage == "evaluate" and cfg.common_eval.path:
        return None
    if "pseudo_label" in read_status(run_dir).get("completed_stages", []):
        return None
    return (f"stage {cfg.stage!r} of the self-training row {cfg.experiment} needs its pseudo_label stage to have "
            f"finished in {run_dir} (stages: {', '.join(stages)}); run the row without stage=, or stage=pseudo_label "
            f"first. A plain fine-tuning is the row without '_st' (e.g. experiment={cfg.experiment.removesuffix('_st')}).")
