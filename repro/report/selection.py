"""wav2vec 2.0 §4.3's choice of the fine-tuning run: a learning-rate x seed grid, the winner by dev-other WER.

"For Libri-light, we train three seeds with two different learning rates (2e-5 and 3e-5) for all subsets and
choose the configuration with lowest WER on dev-other subset decoded with the official 4-gram language model
(LM) with beam 50 and fixed model weights (LM weight 2, word insertion penalty -1)."

With `selection.type=grid` a row's stages change meaning:

- `finetune` fine-tunes every grid point in its own run directory `<run_dir>/grid/lr<lr>_seed<seed>/` and
  scores it on `selection.split` with `selection.decoding` (locally one after the other, each resuming; on
  SLURM as parallel jobs, see `submit_grid`). The points cite no paper row: they are trials, not results.
- `evaluate` picks the winner, writes `<run_dir>/selection.json` (every point's score, the winner, the spread
  over seeds per learning rate) and evaluates the winner's checkpoint_best with the row's own decodings in
  the row's run directory, which is what the report joins with the paper.

It sits in the report layer because it runs stages (repro.train / decode through the callables it is given),
keeps run bookkeeping (repro.track) and submits jobs (repro.launch); the grid itself is repro.launch.plan's.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from repro.launch.plan import GridPoint, grid_points
from repro.track import build_tracker
from repro.track.jsonl import read_json, write_json_atomic
from repro.track.status import read_status, run_stages

GRID_DIR = "grid"
"""`<run_dir>/grid/<point>/`: one fine-tuning run per grid point."""
SELECTION_FILE = "selection.json"
"""`<run_dir>/selection.json`: the scores, the winner and the spread, read by the report."""

Stage = tuple[str, Callable[[DictConfig, Path, Any], Any]]


class SelectionError(RuntimeError):
    """The grid cannot be scored (a point did not finish, or its result lacks the selection split)."""


def point_run_dir(run_dir: Path, point: GridPoint) -> Path:
    return Path(run_dir) / GRID_DIR / point.name


def point_config(cfg: DictConfig, point: GridPoint) -> DictConfig:
    """The row's config for one grid point: its lr and seed, scored only with the selection decoding on the
    selection split, citing no paper row (a trial is never reported against the paper)."""
    point_cfg = copy.deepcopy(cfg)  # keeps the typed schema
    selection = cfg.selection
    point_cfg.optimization.lr = [point.lr]
    point_cfg.common.seed = point.seed
    point_cfg.selection.type = "none"
    point_cfg.stage = None
    point_cfg.stages = ["finetune", "evaluate"]
    point_cfg.decodings = {"selection": OmegaConf.to_container(selection.decoding, resolve=False)}
    point_cfg.paper.decoding = ["selection"]
    point_cfg.paper.eval_splits = [str(selection.split)]
    point_cfg.paper.rows = []
    return point_cfg


def point_score(point_dir: Path, split: str, decoding: str = "selection") -> float | None:
    """The point's selection WER from its `eval/results.json`, None when it has not been scored."""
    results = read_json(Path(point_dir) / "eval" / "results.json", default={}).get("results", {})
    value = results.get(split, {}).get(decoding, {}).get("wer")
    return None if value is None else float(value)


def choose(scores: dict[GridPoint, float]) -> GridPoint:
    """The lowest WER; on a tie the first point in grid order."""
    if not scores:
        raise SelectionError("no grid point has a score")
    return min(scores, key=lambda point: (scores[point], list(scores).index(point)))


def seed_spread(scores: dict[GridPoint, float]) -> dict[str, dict[str, float]]:
    """Per learning rate: mean, standard deviation (sample, 0 for one seed), min and max over seeds."""
    by_lr: dict[float, list[float]] = {}
    for point, value in scores.items():
        by_lr.setdefault(point.lr, []).append(value)
    return {
        f"{lr:g}": {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values), "seeds": len(values)}
        for lr, values in by_lr.items()
    }


def score_grid(cfg: DictConfig, run_dir: Path) -> dict[GridPoint, float]:
    """Every point's score; a point without one is an error naming its run directory."""
    split = str(cfg.selection.split)
    scores: dict[GridPoint, float] = {}
    missing = []
    for point in grid_points(cfg.selection):
        value = point_score(point_run_dir(run_dir, point), split)
        if value is None or math.isnan(value):
            missing.append(str(point_run_dir(run_dir, point)))
        else:
            scores[point] = value
    if missing:
        raise SelectionError(f"grid points without a {split} score (fine-tune them first, e.g. stage=finetune): "
                             + ", ".join(missing))
    return scores


def write_selection(cfg: DictConfig, run_dir: Path, scores: dict[GridPoint, float]) -> dict[str, Any]:
    winner = choose(scores)
    decoding = cfg.selection.decoding
    record = {
        "criterion": {"split": str(cfg.selection.split), "decoding": str(decoding.type), "beam": int(decoding.beam),
                      "lm_weight": float(decoding.lm_weight), "word_score": float(decoding.word_score)},
        "points": [{"lr": p.lr, "seed": p.seed, "wer": v, "run_dir": str(point_run_dir(run_dir, p))}
                   for p, v in scores.items()],
        "winner": {"lr": winner.lr, "seed": winner.seed, "wer": scores[winner],
                   "checkpoint": str(point_run_dir(run_dir, winner) / cfg.checkpoint.save_dir / "checkpoint_best.pt")},
        "spread": seed_spread(scores),
    }
    write_json_atomic(Path(run_dir) / SELECTION_FILE, record)
    return record


def read_selection(run_dir: Path) -> dict[str, Any] | None:
    """`selection.json` of a run directory, or None for a run that selected nothing."""
    record = read_json(Path(run_dir) / SELECTION_FILE, default={})
    return record or None


def grid_stages(cfg: DictConfig, stages: Sequence[Stage], gpus: int) -> list[Stage]:
    """The row's stages under `selection.type=grid`: finetune -> the grid, evaluate -> select + evaluate."""
    if cfg.selection.type == "none":
        return list(stages)
    if cfg.selection.type != "grid":
        raise ValueError(f"selection.type={cfg.selection.type!r}: choose 'grid' or 'none'")
    implementations = dict(stages)
    finetune, evaluate = implementations.get("finetune"), implementations.get("evaluate")
    if finetune is None and evaluate is None:
        return list(stages)
    if evaluate is None:  # a grid point needs its score even when only `stage=finetune` runs
        from repro.decode.evaluate import run_evaluate as evaluate

    def run_grid(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
        points = grid_points(cfg.selection)
        for index, point in enumerate(points, start=1):
            point_dir = point_run_dir(run_dir, point)
            if read_status(point_dir).get("status") == "finished":
                print(f"selection: {point.name} finished earlier ({index}/{len(points)})", flush=True)
                continue
            print(f"selection: fine-tuning {point.name} ({index}/{len(points)}) in {point_dir}", flush=True)
            point_cfg = point_config(cfg, point)
            run_stages(point_cfg, point_dir, name=f"{cfg.experiment}/{GRID_DIR}/{point.name}",
                       stages=[("finetune", finetune), ("evaluate", evaluate)], gpus=gpus,
                       tracker=build_tracker(point_cfg, point_dir))
        return {point.name: point_score(point_run_dir(run_dir, point), str(cfg.selection.split)) for point in points}

    def run_select(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> Any:
        record = write_selection(cfg, run_dir, score_grid(cfg, run_dir))
        winner = record["winner"]
        print(f"selection: {GridPoint(winner['lr'], winner['seed']).name} wins with {cfg.selection.split} WER "
              f"{winner['wer']:.2f}; evaluating it with the row's decodings", flush=True)
        if tracker is not None:
            tracker.log_metrics({"selected_lr": winner["lr"], "selected_seed": winner["seed"],
                                 "selection_wer": winner["wer"]}, step=0, split="selection")
        eval_cfg = copy.deepcopy(cfg)  # keeps the typed schema
        eval_cfg.common_eval.path = winner["checkpoint"]
        return evaluate(eval_cfg, run_dir, tracker)

    replaced = {"finetune": run_grid, "evaluate": run_select}
    return [(name, replaced.get(name, function)) for name, function in stages]


def submit_grid(cfg: DictConfig, run_dir: Path) -> int:
    """SLURM: one job per unfinished grid point, then the select + evaluate job once all of them succeeded."""
    from repro.launch import slurm

    run_dir = Path(run_dir).absolute()
    job_ids = []
    for point in grid_points(cfg.selection):
        point_dir = point_run_dir(run_dir, point)
        if read_status(point_dir).get("status") == "finished":
            continue
        job_ids.append(slurm.submit_job(point_config(cfg, point), point_dir))
    final_cfg = copy.deepcopy(cfg)  # keeps the typed schema
    final_cfg.stage = "evaluate"
    job_id = slurm.submit_job(final_cfg, run_dir, after=job_ids)
    print(f"repro: {cfg.experiment}: {len(job_ids)} grid job(s) {' '.join(job_ids) or '(all finished)'}; "
          f"select + evaluate as job {job_id} after them", flush=True)
    return 0


def selection_summary(record: dict[str, Any]) -> str:
    """'lr 2e-05 seed 3 (dev_other 9.81); seeds: lr 2e-05 9.90 ± 0.08, lr 3e-05 10.12 ± 0.11' for the report."""
    winner, criterion = record["winner"], record["criterion"]
    spread = ", ".join(f"lr {lr} {stats['mean']:.2f} ± {stats['std']:.2f} (n={stats['seeds']})"
                       for lr, stats in record.get("spread", {}).items())
    return (f"selected lr {winner['lr']:g} seed {winner['seed']} ({criterion['split']} {winner['wer']:.2f}); "
            f"over seeds: {spread}")
