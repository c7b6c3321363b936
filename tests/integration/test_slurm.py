"""Real SLURM submissions (scripts/slurm-single-node.sh starts a one-node cluster; CI does it).

A tiny pretraining (model=wav2vec2_tiny on a synthetic corpus) goes through `cluster=slurm`
twice at once: one run is left alone, the other is requeued with `scontrol requeue` in the middle
and must end with the same losses at every update. A 2-point multirun goes through
hydra-submitit-launcher (`hydra/launcher=repro_slurm`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import make_corpus  # noqa: E402

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
MAX_UPDATE = 16


def _slurm_available() -> str | None:
    """None when a SLURM controller answers, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client commands (sinfo/sbatch); run `bash scripts/slurm-single-node.sh up` as root"
    probe = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"SLURM unreachable: {probe.stderr.strip()}"
    if not any(state.split()[-1].rstrip("*") in ("idle", "mix", "alloc") for state in probe.stdout.splitlines()):
        return f"no usable SLURM node: {probe.stdout.strip()!r}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    reason = _slurm_available()
    require(reason is None, reason or "")


def tiny_overrides(data_dir: Path, max_update: int = MAX_UPDATE) -> list[str]:
    return [
        "+model=wav2vec2_tiny", "stages=[pretrain]", "tracker=none", "common.seed=3", "common.cpu=true",
        "common.log_interval=1", "common.log_format=json", f"task.data={data_dir}", "task.max_sample_size=12000",
        "task.min_sample_size=4000", "dataset.train_subset=train", "dataset.valid_subset=valid",
        "dataset.max_tokens=48000", "dataset.num_workers=0", "dataset.required_batch_size_multiple=1",
        "criterion.loss_weights=[0.1,10.0]", f"optimization.max_update={max_update}", "optimization.lr=[0.005]",
        "lr_scheduler.warmup_updates=3", "checkpoint.save_interval_updates=3", "model.mask_prob=0.5",
        "model.mask_length=4",
    ]


SLURM_OVERRIDES = ["cluster=slurm", "cluster.timeout_min=10", "cluster.cpus_per_task=1"]


def repro(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "repro", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"python -m repro {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def job_id(run_dir: Path) -> str:
    return (run_dir / "slurm" / "job_ids").read_text().split()[-1]


def job_state(job: str) -> str:
    """Empty once the job has left the queue."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_for(condition, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def train_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per update; a step logged twice (replayed after a resume) keeps its last value."""
    losses = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train" and "loss" in record:
            losses[int(record["step"])] = float(record["loss"])
    return losses


def task_log(run_dir: Path) -> str:
    logs = sorted((run_dir / "slurm").glob("*_0_log.*"))
    return "\n".join(path.read_text() for path in logs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("slurm_corpus"))


@pytest.fixture(scope="module")
def two_runs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny pretraining submitted twice, at once (2 CPUs = 2 concurrent jobs)."""
    root = tmp_path_factory.mktemp("slurm_runs")
    reference, requeued = root / "reference", root / "requeued"
    for run_dir in (reference, requeued):
        result = repro([*tiny_overrides(corpus), *SLURM_OVERRIDES, f"hydra.run.dir={run_dir}"])
        assert f"as SLURM job {job_id(run_dir)} (1 task(s), update_freq 1)" in result.stdout
    return reference, requeued


def test_requeued_job_resumes_and_ends_with_the_uninterrupted_losses(two_runs):
    reference, requeued = two_runs
    job = job_id(requeued)
    wait_for(lambda: len(train_losses(requeued)) >= 4, 120, "4 updates before the requeue")
    interrupted_at = max(train_losses(requeued))
    assert interrupted_at < MAX_UPDATE - 4, "the run finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: job_state(job) == "PENDING", 60, f"job {job} to be requeued")
    # a requeued job waits ~120 s (Reason=BeginTime) unless released
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_for(lambda: job_state(job) == "", 180, f"requeued job {job} to finish", poll=0.5)
    wait_for(lambda: job_state(job_id(reference)) == "", 120, "the reference job", poll=0.5)
    assert "Submitted job triggered an exception" not in task_log(reference)

    log = task_log(requeued)
    assert log.count("Starting with JobEnvironment") == 2, log[-3000:]  # ran twice, same log (append)
    resumed = [line for line in log.splitlines() if line.startswith("repro: resumed from")]
    assert resumed, log[-3000:]
    resumed_update = int(resumed[-1].rsplit(" ", 1)[-1])
    assert 0 < resumed_update < MAX_UPDATE
    expected, got = train_losses(reference), train_losses(requeued)
    assert sorted(got) == list(range(1, MAX_UPDATE + 1))
    assert got == expected  # bit-exact: same seeds, same batches, same RNG state after the resume
    assert not (requeued / "STOP_REQUESTED").exists()  # the first run's request was cleared by the second


def test_tiny_pretraining_runs_through_cluster_slurm(two_runs):
    reference, _ = two_runs
    job = job_id(reference)
    wait_for(lambda: job_state(job) == "", 150, f"job {job} to finish", poll=0.5)
    log = task_log(reference)
    assert sorted(train_losses(reference)) == list(range(1, MAX_UPDATE + 1)), log[-3000:]
    assert (reference / "checkpoints" / "checkpoint_last.pt").exists()
    # the job ran the frozen config in the same run directory, with the plan's world size written in
    frozen = (reference / "slurm" / "job_config.yaml").read_text()
    assert "distributed_world_size: 1" in frozen and f"max_update: {MAX_UPDATE}" in frozen
    assert "cluster:\n  name: slurm" in (reference / "config.yaml").read_text()
    assert "Submitted job triggered an exception" not in log


def test_multirun_of_two_through_the_hydra_submitit_launcher(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    repro(["-m", "hydra/launcher=repro_slurm", *tiny_overrides(corpus, max_update=3), *SLURM_OVERRIDES,
           "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=null", "common.seed=1,2",
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"], timeout=170)
    first, second = train_losses(sweep_dir / "0"), train_losses(sweep_dir / "1")
    assert sorted(first) == sorted(second) == [1, 2, 3]
    assert first != second  # different seeds, different runs
    logs = list((sweep_dir / ".submitit").rglob("*_0_log.out"))
    assert len(logs) == 2
    for path in logs:
        assert "global_rank=0(1)" in path.read_text()  # one SLURM task per job on this CPU node
