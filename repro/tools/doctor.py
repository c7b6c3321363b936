"""`python -m repro.tools doctor RUN_DIR [--json]`: what went wrong in a run, with evidence and fix.

Exit status 0 when nothing is wrong, 1 with findings, 2 when RUN_DIR is not a run directory.
The checks are in repro.report.doctor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from repro.report.doctor import DoctorError, diagnose, findings_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml, metrics.jsonl, checkpoints/)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON (for scripts)")


def main(args: argparse.Namespace) -> int:
    try:
        findings = diagnose(args.run_dir)
    except DoctorError as error:
        print(f"doctor: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(findings_json(args.run_dir, findings), indent=1))
    elif not findings:
        print(f"{args.run_dir}: no problems found")
    else:
        print(f"{args.run_dir}: {len(findings)} finding(s)")
        for number, finding in enumerate(findings, start=1):
            print(f"\n{number}. [{finding.code}] {finding.title}")
            for line in finding.evidence:
                print(f"   evidence: {line}")
            print(f"   fix: {finding.fix}")
    return 1 if findings else 0
