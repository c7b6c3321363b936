"""Where and what a run is: names, tags and flattened params shared by every tracking backend.

Also the run directory's `tracker_runs.json`, which remembers each backend's run id so that a
restarted or requeued process continues the same MLflow and W&B runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.track.jsonl import read_json, write_json_atomic

TRACKER_RUNS_FILE = "tracker_runs.json"
_RUNS_FILE_LOCK = threading.Lock()
REPO_DIR = Path(__file__).resolve().parents[2]


def _select(cfg: Any, dotted: str, default: Any = None) -> Any:
    """cfg.a.b with a default, for DictConfig, dict or attribute objects (tests pass small ones)."""
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
        except Exception:  # a '???' (missing) value reads as absent
            return default
    return default if node is None else node


def runs_root(run_dir: str | Path) -> Path:
    """The directory holding all run directories (the embedded MLflow store lives there).

    The nearest ancestor named `runs` (Hydra puts single runs in runs/<row> and sweeps in
    runs/multirun/<row>/<overrides>), else the run directory's parent.
    """
    run_dir = Path(run_dir).resolve()
    for ancestor in run_dir.parents:
        if ancestor.name == "runs":
            return ancestor
    return run_dir.parent


def git_commit(repo_dir: Path = REPO_DIR) -> tuple[str | None, bool]:
    """(commit hash, working tree dirty) of the code being run, or (None, False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None, False
        dirty = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def _hydra_sweep() -> tuple[str | None, str | None]:
    """(sweep dir, job number) when this process is one job of a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None, None
        hydra_cfg = HydraConfig.get()
        if str(hydra_cfg.mode) != "RunMode.MULTIRUN":
            return None, None
        return str(Path(hydra_cfg.sweep.dir).resolve()), str(hydra_cfg.job.num)
    except Exception:
        return None, None


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b.c": "value"}; lists and scalars are stringified."""
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = json.dumps(node) if isinstance(node, list | tuple) else str(node)
    return out


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain containers (missing values stay '???')."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg) if isinstance(cfg, dict) else {}


@dataclass
class RunContext:
    """Everything a backend needs to name, tag and place a run."""

    run_dir: Path
    experiment: str
    stage: str
    paper_table: str | None
    rows: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    sweep_dir: str | None = None

    @property
    def runs_root(self) -> Path:
        return runs_root(self.run_dir)

    @property
    def run_name(self) -> str:
        """What the run is, for tracker UIs: its directory under the runs root (`demo/pretrained_10m`,
        `base_10m`), so that sibling runs of one experiment are told apart; the experiment otherwise."""
        return run_display_name(self.run_dir, self.experiment)


def run_display_name(run_dir: str | Path, experiment: str) -> str:
    """The run directory relative to the runs root (posix), or `experiment` when that is empty."""
    run_dir = Path(run_dir).resolve()
    try:
        relative = run_dir.relative_to(runs_root(run_dir)).as_posix()
    except ValueError:
        relative = ""
    return relative if relative not in ("", ".") else experiment


def build_context(cfg: Any, run_dir: str | Path) -> RunContext:
    """Derive run name, tags and params from the composed config and the environment."""
    run_dir = Path(run_dir).resolve()
    experiment = str(_select(cfg, "experiment", run_dir.name))
    stage_value = _select(cfg, "stage")
    stages = _select(cfg, "stages", [])
    stage = str(stage_value) if stage_value else ",".join(str(s) for s in stages) or "unknown"
    table = _select(cfg, "paper.table")
    rows = [str(r) for r in (_select(cfg, "paper.rows", []) or [])]
    commit, dirty = git_commit()
    sweep_dir, job_num = _hydra_sweep()
    tags = {
        "repro.experiment": experiment,
        "repro.stage": stage,
        "repro.rows": ",".join(rows),
        "repro.paper_table": str(table) if table else "",
        "repro.run_dir": str(run_dir),
        "repro.host": socket.gethostname(),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["repro.git_dirty"] = str(dirty).lower()
    for env_name, tag in (
        ("SLURM_JOB_ID", "slurm.job_id"),
        ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
        ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id"),
        ("SLURM_RESTART_COUNT", "slurm.restart_count"),
        ("SLURM_JOB_PARTITION", "slurm.partition"),
    ):
        if os.environ.get(env_name):
            tags[tag] = os.environ[env_name]
    if sweep_dir:
        tags["repro.sweep_dir"] = sweep_dir
        tags["repro.sweep_job_num"] = str(job_num)
    return RunContext(
        run_dir=run_dir,
        experiment=experiment,
        stage=stage,
        paper_table=str(table) if table else None,
        rows=rows,
        tags=tags,
        params=flatten(resolved_config(cfg)),
        sweep_dir=sweep_dir,
    )


def read_tracker_runs(run_dir: str | Path) -> dict[str, dict[str, str]]:
    """Backend name -> {"run_id": ..., backend details} from `<run_dir>/tracker_runs.json`."""
    return read_json(Path(run_dir) / TRACKER_RUNS_FILE, default={}) or {}


def update_tracker_runs(run_dir: str | Path, backend: str, info: dict[str, str]) -> None:
    """Record one backend's run in `<run_dir>/tracker_runs.json` (atomic; other backends kept)."""
    with _RUNS_FILE_LOCK:
        runs = read_tracker_runs(run_dir)
        runs[backend] = {**runs.get(backend, {}), **info}
        write_json_atomic(Path(run_dir) / TRACKER_RUNS_FILE, runs)
