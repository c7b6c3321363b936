"""Pseudo-labelling as a real SLURM job array (scripts/slurm-single-node.sh starts a one-node cluster; CI does it).

`python -m repro stage=pseudo_label cluster=slurm self_training.num_shards=2` submits one array of two
tasks through submitit's `map_array`, waits for both, then merges: the merged files must come after both
shards' markers, each shard must have run inside its own array task, and the labels must equal a local,
unsharded labelling of the same audio.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_labelling_runs_as_a_job_array_of_two_shards_and_merges_after_both(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "slurm_labels"
    command = [*stage_command(corpus, out, num_shards=2), "cluster=slurm", "cluster.timeout_min=10",
               "cluster.cpus_per_task=1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "submitted 2 shard(s) as SLURM job array" in result.stderr

    ids = (out / "slurm" / "job_ids").read_text().split()
    assert len(ids) == 2 and len({job.split("_")[0] for job in ids}) == 1  # one array ...
    assert sorted(job.split("_")[1] for job in ids) == ["0", "1"]  # ... of two tasks
    markers = sorted((out / "shards").glob("*.done.json"))
    assert len(markers) == 2
    records = [json.loads(marker.read_text()) for marker in markers]
    assert sorted(record["slurm_array_task"] for record in records) == ["0", "1"]  # each ran in its task

    # the merge waited for both shards
    merged = out / "pseudo.tsv"
    assert merged.stat().st_mtime_ns >= max(marker.stat().st_mtime_ns for marker in markers)
    local = tmp_path / "local"
    run_pseudo_label(st_config(corpus, local), tmp_path)
    assert label_files(out) == label_files(local)
