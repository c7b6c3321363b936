"""`python -m repro.tools runs [--runs DIR | --tracking-uri URI]`: a terminal table of runs.

Columns: row, stage, status, last update, last step, and the latest value of key metrics. From
the run directories' metrics.jsonl files (default, `--runs runs`) or from an MLflow store
(`--tracking-uri`, e.g. `sqlite:///runs/mlflow.db` or `http://127.0.0.1:5000`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_METRICS = ("loss", "prob_perplexity", "code_perplexity", "temp", "valid/loss", "valid/wer")


@dataclass
class RunSummary:
    row: str
    stage: str
    status: str
    last_update: float | None
    last_step: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    where: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--runs", type=Path, default=None, help="directory searched for run dirs (default: runs)")
    source.add_argument("--tracking-uri", default=None, help="read runs from this MLflow store instead")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric keys to show (latest value)"
    )


def _pid_dead(status: dict, tags: dict) -> bool:
    """A RUNNING run whose process is gone (only checkable on the same host)."""
    pid = status.get("pid")
    if not pid or tags.get("repro.host") != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def runs_from_jsonl(root: Path) -> list[RunSummary]:
    from repro.track.base import metric_key
    from repro.track.jsonl import STATUS_FILE, TAGS_FILE, iter_metric_records, read_json, record_metrics

    summaries = []
    for metrics_path in sorted(root.rglob("metrics.jsonl")):
        run_dir = metrics_path.parent
        tags = read_json(run_dir / TAGS_FILE, default={}) or {}
        status = read_json(run_dir / STATUS_FILE, default={}) or {}
        latest: dict[str, float] = {}
        last_time, last_step = None, None
        for record in iter_metric_records(metrics_path):
            last_time = max(last_time or 0.0, float(record.get("time", 0.0)))
            if record["split"] == "train":
                last_step = max(last_step if last_step is not None else -1, int(record["step"]))
            for name, value in record_metrics(record).items():
                latest[metric_key(name, record["split"])] = value
        state = status.get("status", "UNKNOWN")
        if state == "RUNNING" and _pid_dead(status, tags):
            state = "DIED"
        summaries.append(
            RunSummary(
                row=tags.get("repro.experiment", run_dir.name),
                stage=tags.get("repro.stage", "?"),
                status=state,
                last_update=max(filter(None, [last_time, status.get("end_time")]), default=None),
                last_step=last_step,
                metrics=latest,
                where=str(run_dir),
            )
        )
    return summaries


def runs_from_mlflow(tracking_uri: str, keys: list[str]) -> list[RunSummary]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    summaries = []
    for experiment in client.search_experiments():
        page_token = None
        while True:
            page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=page_token)
            for run in page:
                tags = run.data.tags
                if "repro.sweep_dir" in tags and "repro.stage" not in tags:
                    continue  # the parent run of a sweep holds no metrics
                last_update = (run.info.end_time or run.info.start_time or 0) / 1000 or None
                last_step = None
                if "loss" in run.data.metrics:  # one request per run: the training curve's last point
                    history = client.get_metric_history(run.info.run_id, "loss")
                    if history:
                        last_step = max(m.step for m in history)
                        if run.info.status == "RUNNING":
                            last_update = max(m.timestamp for m in history) / 1000
                summaries.append(
                    RunSummary(
                        row=run.info.run_name or tags.get("repro.experiment", "?"),
                        stage=tags.get("repro.stage", "?"),
                        status=run.info.status,
                        last_update=last_update,
                        last_step=last_step,
                        metrics={k: v for k, v in run.data.metrics.items() if k in keys},
                        where=f"{experiment.name}/{run.info.run_id}",
                    )
                )
            page_token = page.token
            if not page_token:
                break
    return summaries


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def format_table(summaries: list[RunSummary], keys: list[str]) -> str:
    header = ["row", "stage", "status", "last update", "step", *keys, "where"]
    lines = [header]
    for run in sorted(summaries, key=lambda r: r.last_update or 0.0, reverse=True):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.last_update)) if run.last_update else "-"
        step = "-" if run.last_step is None else str(run.last_step)
        lines.append(
            [run.row, run.stage, run.status, when, step, *[_format_value(run.metrics.get(k)) for k in keys], run.where]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def main(args: argparse.Namespace) -> int:
    keys = [k.strip() for k in args.metrics.split(",") if k.strip()]
    if args.tracking_uri:
        summaries = runs_from_mlflow(args.tracking_uri, keys)
        source = args.tracking_uri
    else:
        root = args.runs or Path("runs")
        if not root.is_dir():
            print(f"runs: {root} is not a directory", file=sys.stderr)
            return 2
        summaries = runs_from_jsonl(root)
        source = str(root)
    if not summaries:
        print(f"no runs in {source}")
        return 0
    print(format_table(summaries, keys))
    return 0
