"""`<run_dir>/run.lock`: one process at a time trains, evaluates or logs in a run directory.

Two identical commands started together would otherwise both train, write every metric twice
and open two tracker runs. The lock is an exclusive `flock` on `run.lock`, so the kernel releases
it whatever way the holder ends (exit, exception, SIGKILL): a file left behind by a dead process
is stale and simply taken over. The file also records the holder (host, pid, start time,
command, SLURM job) so that a refused process can say who has the directory.

On a file system without `flock` (some Lustre mounts) the record alone decides: the holder is
alive when its pid runs on this host with the same start time, or when it is on another host
and not an earlier run of this same SLURM job (a requeued job runs one instance at a time).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# flock is not offered by this file system (e.g. Lustre without -o flock): fall back to the record
LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def holder_record() -> dict:
    """What a holder writes about itself."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start_ticks": _process_start_ticks(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
        "command": " ".join(sys.argv),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def describe_holder(record: dict) -> str:
    where = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')}"
    if record.get("slurm_job_id"):
        where += f", SLURM job {record['slurm_job_id']}"
    if record.get("command"):
        where += f": {record['command']}"
    return where


def holder_alive(record: dict) -> bool:
    """Best judgement when the file system cannot lock: is the recorded holder still running?"""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        own_job = os.environ.get("SLURM_JOB_ID")
        return not (own_job and record.get("slurm_job_id") == own_job)  # else an earlier run of this job
    pid = int(record.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    recorded = record.get("pid_start_ticks")
    return recorded is None or _process_start_ticks(pid) in (None, recorded)


def _read_record(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = b""
    while chunk := os.read(fd, 65536):
        text += chunk
    try:
        record = json.loads(text.decode("utf-8", errors="replace") or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode("utf-8") + b"\n")
    os.fsync(fd)


def _refusal(run_dir: Path, record: dict, advice: str = "") -> RunDirectoryLocked:
    return RunDirectoryLocked(
        f"run directory {run_dir} is in use by {describe_holder(record)}. Wait for it to end, or give this run its "
        f"own directory (hydra.run.dir=...){advice}"
    )


def _open_locked(path: Path) -> tuple[int, bool]:
    """Open `path` and take its flock: (fd, flock_supported). Raises BlockingIOError while held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        except OSError as error:
            if error.errno in LOCKS_UNSUPPORTED:
                return fd, False
            os.close(fd)
            raise
        # the holder unlinks the file when it releases: make sure we locked the file still in place
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, True
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def run_directory_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold `<run_dir>/run.lock` for the duration of the block, or raise RunDirectoryLocked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        fd, supported = _open_locked(path)
    except BlockingIOError:
        with open(path, "rb") as handle:
            record = _read_record(handle.fileno())
        raise _refusal(run_dir, record) from None
    try:
        previous = _read_record(fd)
        if not supported:
            if holder_alive(previous):
                raise _refusal(run_dir, previous, f"; if that process is gone, delete {path} (this file system "
                                                  "cannot lock, so its end cannot be seen from here)")
            log.warning("%s: the file system does not support flock; the lock relies on the holder record", path)
        if previous:
            log.warning("run directory %s: taking over the stale lock of %s (that process is gone)",
                        run_dir, describe_holder(previous))
        _write_record(fd, holder_record())
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # before the lock goes: a waiting opener then sees a new file (inode check)
    finally:
        os.close(fd)  # releases the flock
