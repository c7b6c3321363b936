"""Weights & Biases backend: offline by default (no account; `wandb sync` uploads later).

Run naming: project = `tracker.wandb.project`, group = the experiment row (its stages sit
together), job_type = the stage, name = the row, tags = paper table and row ids. The run id is
kept in `<run_dir>/tracker_runs.json` and reopened with resume="allow", so a restarted process
continues the same run. Every log passes `step=` (the update number): offline resume restarts
W&B's own step counter, and explicit steps keep the history monotonic across restarts.

`read_offline_history` reads the logged history back from the offline `.wandb` files (W&B keeps
no readable history offline): a `:W&B` header, then protobuf `Record`s in LevelDB-log framing.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import wandb

from repro.track.base import metric_key, scalar_metrics
from repro.track.context import RunContext, read_tracker_runs, update_tracker_runs

log = logging.getLogger("repro.track")

MODES = ("offline", "online", "disabled")


def _new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


class WandbTracker:
    """Tracker backend for W&B; wandb itself buffers and retries uploads in its service process."""

    flush_interval_s = 2.0
    """How often W&B writes its `.wandb` file (its default, 15 s, loses that much on a SIGKILL)."""
    finish_wait_s = 10.0
    """Longest wait in `finish` for an offline run's file to be complete."""

    def __init__(self, context: RunContext, cfg: Any = None):
        self.context = context
        self.run_dir = context.run_dir
        mode = str(getattr(cfg, "mode", "offline") or "offline")
        if mode not in MODES:
            raise ValueError(f"tracker.wandb.mode: {mode!r} is not one of {MODES}")
        self.mode = mode
        project = str(getattr(cfg, "project", None) or "repro")
        entity = getattr(cfg, "entity", None)
        known = read_tracker_runs(self.run_dir).get("wandb", {})
        self.wandb_root = Path(os.environ.get("WANDB_DIR") or known.get("dir") or self.run_dir)
        self.run_id = known.get("run_id") or _new_run_id()
        # Stored before init: a process killed during init still continues this id next time.
        update_tracker_runs(
            self.run_dir, "wandb",
            {"run_id": self.run_id, "project": project, "mode": mode, "dir": str(self.wandb_root)},
        )
        tags = [t for t in [context.paper_table, *context.rows, context.stage] if t]
        self.wandb_root.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project,
            entity=str(entity) if entity else None,
            group=context.experiment,
            job_type=context.stage,
            name=context.run_name,
            id=self.run_id,
            resume="allow",
            mode=mode,  # type: ignore[arg-type]
            dir=str(self.wandb_root),
            tags=[t[:64] for t in tags],
            reinit="create_new",
            settings=wandb.Settings(
                silent=True, console="off", x_transaction_log_flush_interval=self.flush_interval_s
            ),
        )

    def log_params(self, params: dict) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        values = {metric_key(name, split): value for name, value in scalar_metrics(metrics).items()}
        if values:
            self._run.log(values, step=int(step))

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.exists():
            self._run.save(str(path), base_path=str(path.parent), policy="now")

    def set_tags(self, tags: dict) -> None:
        self._run.config.update({f"tag/{k}": str(v) for k, v in tags.items()}, allow_val_change=True)

    def run_ids(self) -> dict[str, str]:
        return {"wandb": self.run_id}

    def finish(self, status: str = "FINISHED") -> None:
        self._run.finish(exit_code=0 if status == "FINISHED" else 1)
        if self.mode == "offline":
            # finish() returns a moment before the service has written the file: wait for it, so
            # that `wandb sync` or a reader right after sees the whole run.
            deadline = time.monotonic() + self.finish_wait_s
            files = offline_run_files(self.wandb_root, self.run_id)
            while files and not offline_file_complete(files[-1]) and time.monotonic() < deadline:
                time.sleep(0.05)


# ---- reading offline runs back ------------------------------------------------------------------
_BLOCK = 32 * 1024
_HEADER = 7  # crc32 (4), length (2), chunk type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path, tail_blocks: int | None = None) -> Iterator[Any]:
    """Protobuf `Record`s of one `.wandb` file, in order (only those starting in the last
    `tail_blocks` 32 KiB blocks when given: a cheap look at the end of a long run's file)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    position, pending, started = 7, b"", True
    if tail_blocks is not None and len(data) > tail_blocks * _BLOCK:
        position = (len(data) // _BLOCK - tail_blocks + 1) * _BLOCK
        started = False  # a record continued from an earlier block cannot be decoded
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, chunk_type = struct.unpack("<IHB", data[position : position + _HEADER])
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if chunk_type == 0:
            continue
        if chunk_type in (_FULL, _FIRST):
            pending, started = chunk, True
        elif started:
            pending += chunk
        if started and chunk_type in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_file_complete(path: str | Path) -> bool:
    """True once W&B has written the run's exit record (everything before it is on disk)."""
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in iter_records(path, tail_blocks=2))
    except (OSError, ValueError):
        return False


def offline_run_files(wandb_root: str | Path, run_id: str) -> list[Path]:
    """The `.wandb` files of a run (one per process that opened it), oldest first."""
    pattern = str(Path(wandb_root) / "wandb" / "*-run-*" / f"run-{run_id}.wandb")
    return sorted((Path(p) for p in glob.glob(pattern)), key=lambda p: p.stat().st_mtime)


def read_offline_history(wandb_root: str | Path, run_id: str) -> list[dict[str, Any]]:
    """History rows `{"_step": n, key: value, ...}` of a run, across all its offline segments."""
    rows: list[dict[str, Any]] = []
    for path in offline_run_files(wandb_root, run_id):
        for record in iter_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            row: dict[str, Any] = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row["_step"] = record.history.step.num
            rows.append(row)
    return rows
