"""The "save a checkpoint now and stop" request a SLURM job passes to its trainer.

SLURM warns a job before killing it: the time-limit signal (`--signal=USR2@120`, submitit's
default signal) or SIGTERM on preemption / `scontrol requeue` / `scancel`, followed by SIGKILL
after the grace period. The launcher process (repro/launch/slurm.py) receives the signal and
writes the request file `<run_dir>/STOP_REQUESTED` (one line: which signal, when). The training
process itself ignores these signals (set before exec) so that it is never killed mid-write.

A file, rather than an in-process flag, because the trainer runs in a child process and, by the
layering contract, repro.train cannot import repro.launch; a file also reaches every rank of a
multi-node job through the shared run directory. What the trainer does with it (TRAIN's side):

    after every completed update:
        requested = (run_dir / "STOP_REQUESTED").exists()
        if all_reduce_sum([float(requested)], context)[0] > 0:   # every rank stops at the same update
            save_checkpoint(interval=False, best=False)         # checkpoint_last
            sys.exit(PREEMPTED_EXIT_CODE)                       # not "finished": later stages must not run

The requeued job clears the file before the trainer starts (rank 0) and the trainer resumes from
checkpoint_last in the same run directory. A trainer without the check still resumes exactly,
from its last interval checkpoint, only with more updates to recompute.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from repro.config import STOP_REQUEST_FILE


def stop_request_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STOP_REQUEST_FILE


def request_stop(run_dir: str | Path, reason: str) -> None:
    """Ask the trainer of `run_dir` to save and stop (safe to call from a signal handler, repeatedly)."""
    path = stop_request_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{STOP_REQUEST_FILE}.{os.getpid()}")
    temporary.write_text(f"{reason} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    os.replace(temporary, path)  # atomic: a reader never sees an empty file


def stop_requested(run_dir: str | Path) -> str | None:
    """The reason of a pending request, or None."""
    try:
        return stop_request_path(run_dir).read_text().strip() or "stop requested"
    except FileNotFoundError:
        return None


def clear_stop_request(run_dir: str | Path) -> None:
    """Forget a request left by the previous run of a requeued job."""
    stop_request_path(run_dir).unlink(missing_ok=True)
