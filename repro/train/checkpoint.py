"""Trainer checkpoints: everything a killed run needs to continue as if it had never stopped.

A file is the model file of CONTRACTS.md (`format`, `kind`, `model`, `model_cfg`, `task_cfg`,
`dictionary`) plus `train_state`: optimizer, scheduler, loss scaler, sampler position, the RNG
states of every rank, update count, epoch, best metric, tracker run ids and the resolved config.
Only tensors, dicts, lists, strings, numbers, bools and None are stored, so
`torch.load(weights_only=True)` reads it (numpy's RNG state is converted to a tensor).

Files in `<run_dir>/checkpoints/` (fairseq's names): `checkpoint_<epoch>_<update>.pt` every
`save_interval_updates` (the newest `keep_interval_updates` are kept), `checkpoint_last.pt`, and
`checkpoint_best.pt`. Every write is atomic (repro.checkpoints.format.atomic_save; copies go
through a temporary file and a rename too), so a kill leaves either the old or the new file.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.checkpoints.format import (
    CheckpointError,
    atomic_save,
    read_checkpoint,
    sweep_stale_temporaries,
    temporary_file,
)

log = logging.getLogger(__name__)

FORMAT = "repro-checkpoint-v1"
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
INTERVAL_PATTERN = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")
TRAIN_STATE_KEYS = ("num_updates", "epoch", "optimizer", "lr_scheduler", "loss_scaler", "sampler", "rng")


# --- RNG states ----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global), torch CPU and CUDA generator states, as weights_only-safe values."""
    version, internal_state, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "state": [int(v) for v in internal_state], "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; the CUDA states are restored only when the GPU count matches."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((
        numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
        numpy["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has %d CUDA RNG states but %d GPUs are visible; CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())


# --- files ---------------------------------------------------------------------------------------


def interval_name(epoch: int, num_updates: int) -> str:
    return f"checkpoint_{epoch}_{num_updates}.pt"


def interval_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """(update, path) of the interval files in save_dir, newest first."""
    if not save_dir.is_dir():
        return []
    found = []
    for path in save_dir.iterdir():
        match = INTERVAL_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(2)), path))
    return sorted(found, key=lambda item: item[0], reverse=True)


def atomic_copy(source: Path, destination: Path) -> None:
    """Copy through a temporary file in the destination's directory, fsync, rename."""
    handle, name = temporary_file(destination)
    temporary = Path(name)
    try:
        with open(source, "rb") as src, os.fdopen(handle, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(temporary, source.stat().st_mode & 0o777)
        os.replace(temporary, destination)
    except OSError as error:
        raise CheckpointError(f"{destination}: could not copy {source.name} there: {error}") from error
    finally:
        if temporary.exists():
            temporary.unlink()
    directory = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class CheckpointManager:
    """Writes, rotates and finds trainer checkpoints in one directory (only rank 0 writes)."""

    def __init__(self, save_dir: Path, keep_interval_updates: int = -1, enabled: bool = True) -> None:
        self.save_dir = Path(save_dir)
        self.keep_interval_updates = keep_interval_updates
        self.enabled = enabled
        if enabled:
            # a writer killed mid-save leaves a temporary as large as a checkpoint: reclaim them on start
            removed = sweep_stale_temporaries(self.save_dir)
            if removed:
                log.info("removed %d temporary file(s) left by killed checkpoint writes in %s",
                         len(removed), self.save_dir)

    def save(self, checkpoint: dict[str, Any], epoch: int, num_updates: int, interval: bool,
             best: bool) -> list[Path]:
        """Write the interval file (if `interval`), then checkpoint_last, then checkpoint_best (if `best`).

        The interval file comes first so that a kill between the writes leaves a newer interval
        file than checkpoint_last, which `load_latest` prefers.
        """
        if not self.enabled:
            return []
        self.save_dir.mkdir(parents=True, exist_ok=True)
        written = []
        last = self.save_dir / LAST
        if interval:
            interval_path = self.save_dir / interval_name(epoch, num_updates)
            atomic_save(checkpoint, interval_path)
            atomic_copy(interval_path, last)
            written += [interval_path, last]
        else:
            atomic_save(checkpoint, last)
            written.append(last)
        if best:
            atomic_copy(last, self.save_dir / BEST)
            written.append(self.save_dir / BEST)
        self._rotate()
        return written

    def ensure_best(self) -> None:
        """A run that never validated still leaves a checkpoint_best (= last) for the decoder."""
        if self.enabled and not (self.save_dir / BEST).exists() and (self.save_dir / LAST).exists():
            atomic_copy(self.save_dir / LAST, self.save_dir / BEST)

    def _rotate(self) -> None:
        if self.keep_interval_updates < 0:
            return
        for _, path in interval_checkpoints(self.save_dir)[self.keep_interval_updates:]:
            path.unlink(missing_ok=True)

    def load_latest(self, expected_kind: str | None = None) -> tuple[dict[str, Any], Path] | None:
        """The newest readable trainer checkpoint, or None when the directory has none at all.

        A truncated or foreign checkpoint_last is reported and the newest good interval file is
        used instead; if files exist but none is usable, this raises rather than start over.
        """
        last = self.save_dir / LAST
        intervals = interval_checkpoints(self.save_dir)
        candidates: list[Path] = ([last] if last.exists() else []) + [path for _, path in intervals]
        if not candidates:
            return None
        problems = []
        newest_interval_update = intervals[0][0] if intervals else -1
        for path in candidates:
            try:
                checkpoint = read_trainer_checkpoint(path, expected_kind)
            except CheckpointError as error:
                log.error("cannot resume from %s: %s; trying an older checkpoint", path, error)
                problems.append(f"{path}: {error}")
                continue
            num_updates = int(checkpoint["train_state"]["num_updates"])
            if path == last and num_updates < newest_interval_update:
                # killed between the interval write and the checkpoint_last copy: the interval is newer
                log.info("%s (update %d) is older than %s; trying the interval file first",
                         path, num_updates, intervals[0][1].name)
                fallback = self._first_readable([p for _, p in intervals], expected_kind, problems)
                if fallback is not None:
                    return fallback
            return checkpoint, path
        raise CheckpointError(
            f"no usable checkpoint in {self.save_dir} (refusing to start over):\n  " + "\n  ".join(problems)
        )

    @staticmethod
    def _first_readable(paths: list[Path], expected_kind: str | None,
                        problems: list[str]) -> tuple[dict[str, Any], Path] | None:
        for path in paths:
            try:
                return read_trainer_checkpoint(path, expected_kind), path
            except CheckpointError as error:
                log.error("cannot resume from %s: %s; trying an older checkpoint", path, error)
                problems.append(f"{path}: {error}")
        return None


def read_trainer_checkpoint(path: Path, expected_kind: str | None = None) -> dict[str, Any]:
    """Read one of our files and check that it is a trainer checkpoint of the expected kind."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {checkpoint.get('format')!r} is not {FORMAT!r}")
    if expected_kind is not None and checkpoint.get("kind") != expected_kind:
        raise CheckpointError(f"{path}: holds a {checkpoint.get('kind')!r} model, this stage trains {expected_kind!r}")
    train_state = checkpoint.get("train_state")
    if not isinstance(train_state, dict):
        raise CheckpointError(f"{path}: a model file without train_state (not a trainer checkpoint)")
    missing = [key for key in TRAIN_STATE_KEYS if key not in train_state]
    if missing:
        raise CheckpointError(f"{path}: train_state lacks {', '.join(missing)}")
    return checkpoint


def build_checkpoint(
    *, kind: str, model_state: dict[str, torch.Tensor], model_cfg: dict[str, Any], task_cfg: dict[str, Any],
    dictionary: list[str] | None, train_state: dict[str, Any],
) -> dict[str, Any]:
    """The dict written to disk (CONTRACTS.md model file + train_state)."""
    return {
        "format": FORMAT,
        "kind": kind,
        "model": model_state,
        "model_cfg": model_cfg,
        "task_cfg": task_cfg,
        "dictionary": dictionary,
        "train_state": train_state,
    }
