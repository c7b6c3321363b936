"""`python -m repro.tools sync-runs RUN_DIR [RUN_DIR ...]`: replay metrics.jsonl into MLflow.

After an MLflow outage (or a run that had no MLflow at all) this logs the (metric, step) pairs
the MLflow run lacks, plus missing params, the tags and the final status. It compares with the
run's metric history first, so running it twice logs nothing twice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store; default: the one recorded in RUN_DIR/tracker_runs.json, else sqlite:///<runs root>/mlflow.db",
    )


def main(args: argparse.Namespace) -> int:
    from repro.track.mlflow import sync_run_dir

    failures = 0
    for run_dir in args.run_dirs:
        try:
            result = sync_run_dir(run_dir, tracking_uri=args.tracking_uri)
        except Exception as error:
            print(f"sync-runs: {run_dir}: {type(error).__name__}: {error}", file=sys.stderr)
            failures += 1
            continue
        print(
            f"{run_dir}: MLflow run {result['run_id']} at {result['tracking_uri']}: "
            f"{result['logged_metrics']} metric values and {result['logged_params']} params logged, "
            f"status {result['status']}"
        )
    return 1 if failures else 0
