"""The run-directory lock: one live process per run directory, stale locks of dead ones taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from repro.track import lock as run_lock
from repro.track.lock import LOCK_FILE, RunDirectoryLocked, run_directory_lock

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys
sys.path.insert(0, {repo!r})
from repro.track.lock import run_directory_lock
with run_directory_lock({run_dir!r}):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), run_dir=str(run_dir))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_with_the_holder_named_and_a_killed_holder_is_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunDirectoryLocked) as refused:
            with run_directory_lock(tmp_path):
                pytest.fail("entered a directory another live process holds")
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
        assert "hydra.run.dir" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: run.lock stays behind with the dead holder's record
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with run_directory_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {holder.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit


def test_released_on_exit_even_after_an_error(tmp_path):
    with pytest.raises(KeyError):
        with run_directory_lock(tmp_path):
            raise KeyError("stage failed")
    with run_directory_lock(tmp_path):  # free again
        pass


def test_without_flock_the_holder_record_decides(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    record_path = tmp_path / LOCK_FILE
    host = socket.gethostname()

    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        record_path.write_text(json.dumps({"host": host, "pid": alive.pid, "started": "then"}))
        with pytest.raises(RunDirectoryLocked, match=f"pid {alive.pid} on host {host}.*delete"):
            with run_directory_lock(tmp_path):
                pass
    finally:
        alive.kill()
        alive.wait()
    with run_directory_lock(tmp_path):  # the same record, its process now gone: stale
        pass

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    record_path.write_text(json.dumps({"host": "node-elsewhere", "pid": 7, "slurm_job_id": "17"}))
    with pytest.raises(RunDirectoryLocked, match="node-elsewhere"):
        with run_directory_lock(tmp_path):
            pass
    # the same SLURM job on another node is this job's earlier run (requeued): it cannot be alive
    record_path.write_text(json.dumps({"host": "node-elsewhere", "pid": 7, "slurm_job_id": "4242"}))
    with run_directory_lock(tmp_path):
        pass


def test_the_app_refuses_a_held_run_directory_before_opening_any_tracker(tmp_path):
    run_dir = tmp_path / "run"
    with run_directory_lock(run_dir):
        result = subprocess.run(
            [sys.executable, "-m", "repro", "experiment=demo", "stage=evaluate", f"checkpoint={tmp_path}/model.pt",
             f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert result.stderr.startswith(f"repro: run directory {run_dir} is in use by pid {os.getpid()}"), result.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "status.json").exists()
    assert not (run_dir / "tracker_runs.json").exists()
