"""Collect finished, running and failed runs into `RunRecord`s, from MLflow or from run directories.

A run directory (written by `python -m repro`) holds `config.yaml` (the resolved config),
`status.json` (state, wall time, devices) and `metrics.jsonl` (every logged value). Evaluation
results are the `metrics.jsonl` lines whose split is `<subset>/<decoding>` (e.g.
`dev_other/kenlm_4gram`), carrying `wer` and `uer`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repro.report.selection import read_selection
from repro.track.jsonl import iter_metric_records, record_metrics

log = logging.getLogger(__name__)

# Decoding setup name -> the `lm` column of paper_results.csv it reproduces.
DECODING_LM = {"viterbi": "None", "kenlm_4gram": "4-gram", "transformer": "Transf."}


@dataclass
class RunRecord:
    """What the report needs to know about one run."""

    name: str
    """Experiment row (e.g. `base_10m`), or for demo sub-runs `demo/<variant>`."""
    run_dir: str
    status: str
    """'finished', 'running' or 'failed'."""
    stage: str
    rows: list[str] = field(default_factory=list)
    """Paper row ids this run reproduces."""
    synthetic: bool = False
    model: str = ""
    """Model label shown in tables (e.g. 'BASE', 'tiny')."""
    pretrain_data: str = ""
    labeled_data: str = ""
    pretrained: bool = True
    """False for the no-pretraining baseline."""
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """decoding -> split -> {'wer': .., 'uer': ..}."""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """'train/<metric>' or 'valid/<metric>' -> [(update, value)]."""
    wall_seconds: float | None = None
    gpus: int = 0
    paper_gpu_hours: float | None = None
    selection: dict[str, Any] | None = None
    recipe: str = "paper"
    """Whose values the run followed: 'paper' or 'fairseq' (`recipe=fairseq`)."""
    """The §4.3 grid's `selection.json` (scores, winner, spread over seeds) when the run selected its model."""

    @property
    def gpu_hours(self) -> float | None:
        if self.wall_seconds is None or self.gpus == 0:
            return None
        return self.wall_seconds * self.gpus / 3600.0


def _split_metrics(lines: list[dict[str, Any]]):
    """Separate evaluation results from training/validation curves."""
    results: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in lines:
        split = str(line.get("split", "train"))
        step = int(line.get("step", 0))
        values = record_metrics(line)
        if "/" in split:  # evaluation: "<subset>/<decoding>"
            subset, decoding = split.split("/", 1)
            results[decoding][subset] = values
        else:
            for key, value in values.items():
                curves[f"{split}/{key}"].append((step, value))
    return dict(results), dict(curves)


def _param_value(text: str) -> Any:
    """An MLflow param (always a string) back to its value: 'None' -> None, '[1, 2]' -> [1, 2]."""
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _label_from_config(config: dict[str, Any]) -> dict[str, Any]:
    paper = config.get("paper") or {}
    model = config.get("model") or {}
    return {
        "rows": list(paper.get("rows") or []),
        "synthetic": bool(paper.get("synthetic", False)),
        "model": str(paper.get("model_label") or model.get("_name", "")),
        "pretrain_data": str(paper.get("pretrain_data") or ""),
        "labeled_data": str(paper.get("labeled_data") or ""),
        "pretrained": not bool(model.get("no_pretrained_weights", False)),
        "paper_gpu_hours": (paper.get("gpus") or 0) * (paper.get("hours") or 0) or None,
        "recipe": str(paper.get("recipe") or "paper"),
    }


def _skipped_pseudo_labels(config: dict[str, Any], status: dict[str, Any]) -> bool:
    """A self-training row's run whose results did not come from pseudo-labels (nor from a given checkpoint)."""
    if "pseudo_label" not in (config.get("stages") or []):
        return False
    if (config.get("common_eval") or {}).get("path"):
        return False
    return "pseudo_label" not in status.get("completed_stages", [])


def record_from_run_dir(run_dir: Path) -> RunRecord | None:
    """Build a record from one run directory, or None if it is not one."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return None
    config = yaml.safe_load(config_path.read_text()) or {}
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    metrics_path = run_dir / "metrics.jsonl"
    results, curves = _split_metrics(list(iter_metric_records(metrics_path))) if metrics_path.exists() else ({}, {})
    label = _label_from_config(config)
    if _skipped_pseudo_labels(config, status):
        log.warning("%s: a self-training row run without its pseudo_label stage; not reported against %s",
                    run_dir, label["rows"])
        label["rows"] = []
    return RunRecord(
        selection=read_selection(run_dir),
        name=str(status.get("name") or config.get("experiment", run_dir.name)),
        run_dir=str(run_dir),
        status=str(status.get("status", "running" if metrics_path.exists() else "not run")),
        stage=str(status.get("stage") or config.get("stage") or ",".join(config.get("stages", []))),
        results=results,
        curves=curves,
        wall_seconds=status.get("wall_seconds"),
        gpus=int(status.get("gpus", 0)),
        **label,
    )


def collect_run_dirs(root: Path) -> list[RunRecord]:
    """Every run directory below `root` (a run dir is one holding config.yaml), sorted by name."""
    records = []
    for config_path in sorted(Path(root).rglob("config.yaml")):
        if ".hydra" in config_path.parts or "checkpoints" in config_path.parts:
            continue
        record = record_from_run_dir(config_path.parent)
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: (r.name, r.run_dir))


def collect_mlflow(tracking_uri: str) -> list[RunRecord]:
    """Records from an MLflow store: each run's `run_dir` tag points at its directory when it is
    reachable; otherwise the record is rebuilt from the run's params, tags and metric histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    records: list[RunRecord] = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=10_000):
            tags = run.data.tags
            run_dir = Path(tags.get("repro.run_dir", ""))  # set by repro.track.context
            if tags.get("repro.run_dir") and (run_dir / "config.yaml").exists():
                record = record_from_run_dir(run_dir)
                if record is not None:
                    records.append(record)
                continue
            params = run.data.params
            config: dict[str, Any] = {"paper": {}, "model": {}}
            for key, value in params.items():
                section, _, leaf = key.partition(".")
                if section in ("paper", "model") and leaf:
                    config[section][leaf] = _param_value(value)
            results: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
            curves: dict[str, list[tuple[int, float]]] = {}
            for key in run.data.metrics:
                history = client.get_metric_history(run.info.run_id, key)
                parts = key.split("/")
                if len(parts) == 3:  # "<subset>/<decoding>/<metric>"
                    subset, decoding, metric = parts
                    results[decoding].setdefault(subset, {})[metric] = history[-1].value
                else:
                    name = key if "/" in key else f"train/{key}"
                    curves[name] = sorted((m.step, m.value) for m in history)
            status = {"FINISHED": "finished", "RUNNING": "running", "FAILED": "failed"}.get(run.info.status, "running")
            records.append(
                RunRecord(
                    name=tags.get("mlflow.runName", run.info.run_id),
                    run_dir="",
                    status=status,
                    stage=tags.get("repro.stage", ""),
                    results=dict(results),
                    curves=curves,
                    wall_seconds=((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000.0,
                    gpus=int(tags.get("gpus", 0) or 0),
                    **_label_from_config(config),
                )
            )
    return sorted(records, key=lambda r: (r.name, r.run_dir))
