"""The Hydra app behind `python -m repro`: compose the config, pick the stages, wire the parts.

Only wiring lives here. Each stage is a function `run(cfg, run_dir, tracker) -> dict` in the
module that owns the work; a stage whose module does not exist yet says so and exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from repro.config import CONF_DIR, ConfigError, check_ranges, register_configs
from repro.report import selection
from repro.stages import StageNotBuilt, resolve_stage
from repro.track import build_tracker
from repro.track.lock import RunDirectoryLocked, run_directory_lock
from repro.track.status import missing_pseudo_labels, run_stages

log = logging.getLogger("repro")

def _rewrite_shorthands(argv: list[str]) -> list[str]:
    """`checkpoint=PATH` (DESIGN.md's spelling) -> `common_eval.path=PATH`; `lr=X` -> `optimization.lr=[X]`.

    `checkpoint` is also fairseq's checkpoint-saving group (`checkpoint.save_interval_updates`),
    so a bare value cannot be stored there; fairseq keeps the learning rate as a list (`selection=none lr=3e-5`).
    """
    def rewrite(arg: str) -> str:
        if arg.startswith("checkpoint="):
            return "common_eval.path=" + arg[len("checkpoint="):]
        if arg.startswith("lr="):
            return f"optimization.lr=[{arg[len('lr='):]}]"
        return arg

    return [rewrite(arg) for arg in argv]


def _rewrite_plan_gpus(argv: list[str]) -> list[str]:
    """`plan.gpus=8,16,32` (a table of GPU counts, not a sweep) -> `plan.gpus=[8,16,32]`."""
    prefix = "plan.gpus="
    return [f"{prefix}[{arg[len(prefix):]}]" if arg.startswith(prefix) and not arg[len(prefix):].startswith("[")
            else arg for arg in argv]


def run(cfg: DictConfig) -> tuple[int, object]:
    """Run the configured stages in order; return (process exit code, the last stage's result)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    check_ranges(cfg)  # before anything is submitted, built or written
    stages = [cfg.stage] if cfg.stage else list(cfg.stages)
    try:
        implementations = [(stage, resolve_stage(stage)) for stage in stages]
    except (StageNotBuilt, ValueError) as error:
        print(f"repro: {error}", file=sys.stderr)
        return 2, None

    if cfg.dry_run:
        from repro.launch import slurm  # submitit is only needed here

        print(slurm.describe_plan(cfg))
        if cfg.plan.measure or cfg.plan.gpus:
            from repro.launch.cost import describe_cost  # times real training steps with plan.measure

            print(describe_cost(cfg))
        return 0, None
    if (problem := missing_pseudo_labels(cfg, run_dir)) is not None:
        print(f"repro: {problem}", file=sys.stderr)
        return 2, None
    if cfg.cluster.name == "slurm":
        from repro.launch import slurm

        if not slurm.inside_slurm_job():
            if cfg.selection.type == "grid" and "finetune" in stages:
                return selection.submit_grid(cfg, run_dir), None
            if "pseudo_label" in stages and not cfg.self_training.wait:  # array -> merge job -> the row's job
                return slurm.submit_self_training(cfg, run_dir, stages), None
            if "pseudo_label" in stages:  # its own SLURM job array, submitted and awaited from here
                run_stages(cfg, run_dir, name=cfg.experiment, stages=[implementations[stages.index("pseudo_label")]],
                           gpus=0, tracker=build_tracker(cfg, run_dir))
                stages = [stage for stage in stages if stage != "pseudo_label"]
                if not stages:
                    return 0, None
                cfg = OmegaConf.merge(cfg, {"stage": None, "stages": stages})  # the job resumes after labelling
            return slurm.submit(cfg, run_dir), None

    # One launch per run directory: its first process holds the lock (the other ranks share the
    # directory), taken before the trackers open runs, so a second launch leaves nothing behind.
    from repro.train.distributed import detect_env  # torch: imported once there is work to do

    holds_lock = detect_env().rank == 0
    gpus = _visible_gpus(cfg)
    with run_directory_lock(run_dir) if holds_lock else contextlib.nullcontext():
        result = run_stages(cfg, run_dir, name=cfg.experiment, stages=selection.grid_stages(cfg, implementations, gpus),
                            gpus=gpus, tracker=build_tracker(cfg, run_dir))
    return 0, result


def objective_value(path: str, result) -> float:
    """For Bayesian sweeps: `path` ('dev_other/lm_sweep/wer') looked up in the last stage's result."""
    node = result
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"sweep_objective {path!r}: {key!r} is not in the stage result")
        node = node[key]
    return float(node)


def _visible_gpus(cfg: DictConfig) -> int:
    """GPUs this run uses (for GPU-hour accounting in the report); 0 on CPU."""
    import torch

    if cfg.common.cpu or not torch.cuda.is_available():
        return 0
    return int(cfg.distributed_training.distributed_world_size)


register_configs()


def user_errors() -> tuple[type[Exception], ...]:
    """The project's errors about the user's input (config, files, data, checkpoints): their messages
    name the key, file or line, so a traceback adds nothing for the user."""
    from repro.checkpoints.format import CheckpointError
    from repro.data.audio import AudioError
    from repro.data.dataset import LabelError
    from repro.data.dictionary import DictionaryError
    from repro.data.librispeech import TranscriptError
    from repro.data.manifest import ManifestError
    from repro.data.synth import CorpusError
    from repro.decode.evaluate import EvaluationError
    from repro.decode.lexicon import LexiconError
    from repro.models.transformer_lm import TransformerLMError
    from repro.tools.audio_units import UnitsError
    from repro.train.resume import ResumeConfigError
    from repro.train.trainer import TrainingDiverged

    return (ConfigError, RunDirectoryLocked, ResumeConfigError, FileNotFoundError, CheckpointError, AudioError,
            LabelError, DictionaryError, TranscriptError, ManifestError, CorpusError, EvaluationError, LexiconError,
            TransformerLMError, TrainingDiverged, UnitsError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        code, result = run(cfg)
    except Exception as error:
        # one line, as the tools print; HYDRA_FULL_ERROR=1 keeps Hydra's full traceback for debugging
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(error, user_errors()):
            raise
        print(f"repro: {error}", file=sys.stderr)
        sys.exit(1)
    if code:
        sys.exit(code)
    # a Bayesian sweeper (Optuna) minimises what the task function returns
    return objective_value(cfg.sweep_objective, result) if cfg.sweep_objective else None


def refusal_before_the_run(overrides: list[str]) -> str | None:
    """Why the command must be refused before Hydra creates (or writes into) its run directory, or None.

    A self-training row's stage=finetune / stage=evaluate before its pseudo-labels exist is refused; Hydra
    would already have written `.hydra/` and `cli.log` into the run directory by the time the app runs, so
    the row is composed here first (only when `stage=` is given, the one case that can be refused). Anything
    unusual (Hydra flags, a multirun, overrides that do not compose) is left to the app, which says it."""
    if any(argument.startswith("-") for argument in overrides):
        return None
    if not any(argument.startswith("stage=") and argument != "stage=pseudo_label" for argument in overrides):
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            run_dir = Path(str(cfg.hydra.run.dir)).absolute()
    except Exception:  # noqa: BLE001  (the app composes again and reports it properly)
        return None
    return missing_pseudo_labels(cfg, run_dir)


def main() -> None:
    sys.argv = _rewrite_plan_gpus(_rewrite_shorthands(sys.argv))
    if (problem := refusal_before_the_run(sys.argv[1:])) is not None:
        print(f"repro: {problem}", file=sys.stderr)  # nothing created or written: the directory stays as it was
        sys.exit(2)
    _hydra_main()
