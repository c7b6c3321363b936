"""Pseudo-labelling as a real SLURM job array (scripts/slurm-single-node.sh starts a one-node cluster; CI does it).

`python -m repro stage=pseudo_label cluster=slurm self_training.num_shards=2` submits one array of two
tasks through submitit's `map_array` and a merge job that depends on the array (`afterok`), and returns
without waiting. The merge job must be held by that dependency, start only after both array tasks ended,
and write the labels a local, unsharded labelling of the same audio writes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import require

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_self_training import corpus, label_files, st_config, stage_command  # noqa: E402, F401  (corpus: fixture)
from test_slurm import _slurm_available  # noqa: E402

from repro.launch.pseudo_label import run_pseudo_label  # noqa: E402

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    """Before the corpus is built: skip here, fail in CI, without a SLURM controller."""
    reason = _slurm_available()
    require(reason is None, reason or "")


def job_fields(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job record (an array shows one record per task)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in text.splitlines() if line]


def test_labelling_array_of_two_shards_then_a_merge_job_that_waits_for_both(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "slurm_labels"
    command = [*stage_command(corpus, out, num_shards=2), "cluster=slurm", "cluster.timeout_min=10",
               "cluster.cpus_per_task=1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    said = re.search(r"shard array (\d+) \(2 of 2 shard\(s\)\), merge job (\d+) after it", result.stdout)
    assert said, result.stdout[-2000:] + result.stderr[-2000:]
    array, merge = said.groups()
    assert f"squeue -j {array},{merge}" in result.stdout
    assert not (out / "pseudo.tsv").exists()  # the command returned before the merge

    [held] = job_fields(merge)
    assert held["JobState"] == "PENDING" and held["Reason"] == "Dependency", held
    assert held["Dependency"].startswith(f"afterok:{array}"), held

    deadline = time.time() + 300
    while not (out / "summary.json").exists() and time.time() < deadline:
        time.sleep(1)
    while job_fields(merge)[0]["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED") and time.time() < deadline:
        time.sleep(1)
    assert (out / "summary.json").exists(), "the merge job did not write the labels within 5 minutes"

    tasks = job_fields(array)
    assert sorted(task["ArrayTaskId"] for task in tasks) == ["0", "1"]  # one array of two tasks
    assert all(task["JobState"] == "COMPLETED" for task in tasks), tasks
    merged = job_fields(merge)[0]
    assert merged["JobState"] == "COMPLETED", merged
    started = datetime.fromisoformat(merged["StartTime"])
    assert all(started >= datetime.fromisoformat(task["EndTime"]) for task in tasks)  # waited for both
    records = [json.loads(marker.read_text()) for marker in sorted((out / "shards").glob("*.done.json"))]
    assert sorted(record["slurm_array_task"] for record in records) == ["0", "1"]  # each ran in its task
    assert json.loads((out / "summary.json").read_text())["merged_in_slurm_job"] == merge

    local = tmp_path / "local"
    run_pseudo_label(st_config(corpus, local), tmp_path)
    assert label_files(out) == label_files(local)
