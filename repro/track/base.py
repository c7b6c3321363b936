"""The Tracker protocol every backend speaks, and the fan-out that drives several at once.

A tracker never stops training: the fan-out isolates each backend, so one that raises is
reported once and the others (always including the JSONL log) keep going.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("repro.track")


@runtime_checkable
class Tracker(Protocol):
    """What the trainer, evaluators and tools call; every backend implements all of it."""

    def log_params(self, params: dict) -> None:
        """Record run parameters (a flat dict; values are stringified by the backend)."""

    def log_metrics(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        """Record scalar metrics of update `step` for `split` ('train', 'valid', 'dev_other/viterbi')."""

    def log_artifact(self, path: str | Path) -> None:
        """Attach a file (resolved config, report rows, optionally checkpoints)."""

    def set_tags(self, tags: dict) -> None:
        """Attach string tags (row ids, stage, commit, host, SLURM ids)."""

    def run_ids(self) -> dict[str, str]:
        """Backend name -> run id, stored in checkpoints so a resumed job continues the same runs."""
        ...

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and close ('FINISHED', 'FAILED' or 'KILLED')."""


def metric_key(name: str, split: str) -> str:
    """The key a metric has in MLflow / W&B: bare for training, `<split>/<name>` otherwise."""
    return name if split == "train" else f"{split}/{name}"


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep the finite-or-not numeric entries as floats; bools and non-numbers are dropped."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if hasattr(value, "item") and callable(value.item):  # 0-d tensors / numpy scalars
            try:
                value = value.item()
            except (TypeError, ValueError):
                continue
        if isinstance(value, int | float):
            out[str(name)] = float(value)
    return out


class FanOutTracker:
    """Send every call to each backend; a failing backend is warned about once and skipped for that call.

    `already_logged` maps (split, step) to the metric names that a previous process of the same
    run directory already recorded (read from metrics.jsonl). After a restart from a checkpoint the
    trainer replays the updates since that checkpoint; their metrics are dropped here so that every
    backend sees each (split, step, name) once and steps stay monotonic.
    """

    def __init__(
        self,
        backends: Iterable[Any],
        already_logged: Mapping[tuple[str, int], set[str]] | None = None,
    ):
        self.backends = list(backends)
        self._already_logged = dict(already_logged or {})
        self._warned: set[tuple[int, str]] = set()
        self._replay_noted = False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        for index, backend in enumerate(self.backends):
            try:
                getattr(backend, method)(*args, **kwargs)
            except Exception as error:  # a tracker must never stop training
                if (index, method) not in self._warned:
                    self._warned.add((index, method))
                    log.warning(
                        "tracker %s.%s failed (%s: %s); training goes on, metrics.jsonl keeps everything",
                        type(backend).__name__, method, type(error).__name__, error,
                    )

    def log_params(self, params: dict) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        seen = self._already_logged.get((split, int(step)))
        if seen:
            fresh = {name: value for name, value in metrics.items() if name not in seen}
            if len(fresh) < len(metrics) and not self._replay_noted:
                self._replay_noted = True
                log.info("resumed run: metrics of updates already logged before the restart are not logged again")
            if not fresh:
                return
            metrics = fresh
        self._call("log_metrics", metrics, int(step), split)

    def log_artifact(self, path: str | Path) -> None:
        self._call("log_artifact", path)

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", tags)

    def run_ids(self) -> dict[str, str]:
        ids: dict[str, str] = {}
        for backend in self.backends:
            try:
                ids.update(backend.run_ids())
            except Exception as error:
                log.warning("tracker %s.run_ids failed: %s", type(backend).__name__, error)
        return ids

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", status)
