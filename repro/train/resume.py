"""What a resumed run may change: the checkpoint's config against the current one.

Re-running a command on its run directory resumes the checkpoint there. If the config changed
in a way that changes training (another learning rate, seed, mask probability...), resuming
would continue the old run under new values and mix both in one curve, so it is refused with
the list of differences, unless fairseq's `checkpoint.reset_*` flags accept them
(fairseq's CheckpointConfig: reset_optimizer, reset_lr_scheduler, reset_dataloader, reset_meters):

- reset_optimizer     accepts optimizer.*, optimization.clip_norm and the fp16/bf16 settings;
                      Adam's moments and the loss scaler restart.
- reset_lr_scheduler  accepts optimization.lr, lr_scheduler.* and a max_update the schedule
                      is stretched over; the new schedule continues from the current update.
- reset_dataloader    accepts what makes other batches (dataset.max_tokens, batch_size,
                      train_subset, task.data, crop sizes, update_freq, paper_world_size);
                      the data order restarts at epoch 1.
- reset_meters        accepts another best-checkpoint metric or validation set; the best
                      value and the wall time restart.
- all four together   accept any change (model, criterion, seed ...): only the weights are
                      kept, as fairseq's finetune_from_model does.

One deviation from fairseq: the update count is kept under reset_optimizer (fairseq restarts it
at 0), because our checkpoint files are ordered by update number in the same directory.

The flags act only while the configs differ: once the resumed run has saved, its checkpoints
carry the new config, so a requeued job (whose frozen config still holds the flags) resumes
exactly instead of resetting again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RESET_FLAGS = ("reset_optimizer", "reset_lr_scheduler", "reset_dataloader", "reset_meters")

# Keys that do not change what is computed: names, stage selection, evaluation and decoding,
# trackers, the cluster, how often things are logged, validated and saved, worker processes, the
# process count (update_freq keeps the effective batch), stopping criteria that do not shape the
# learning-rate schedule. A key matches a rule equal to it or below it (`rule.` / `rule[`).
IGNORED = (
    "experiment", "stage", "stages", "dry_run", "sweep_objective", "common_eval", "cluster", "tracker",
    "decode", "decodings", "paper", "demo",
    "common.cpu", "common.log_interval", "common.log_format",
    "dataset.num_workers", "dataset.validate_interval_updates", "dataset.validate_after_updates",
    "dataset.disable_validation", "dataset.skip_invalid_size_inputs_valid_test", "task.eval_wer",
    "criterion.log_keys", "criterion.post_process",
    "checkpoint.save_dir", "checkpoint.save_interval_updates", "checkpoint.keep_interval_updates",
    "checkpoint.no_save", "checkpoint.save_optimizer_state",
    *(f"checkpoint.{flag}" for flag in RESET_FLAGS),
    "distributed_training.distributed_world_size", "distributed_training.distributed_backend",
    "optimization.max_epoch", "optimization.stop_min_lr",
    "model.w2v_path",  # a resumed model's weights come from the checkpoint, not from this file
)

# Which flag accepts a change of a key: the flag that drops the state the change invalidates.
ACCEPTED_BY = {
    "optimizer": "reset_optimizer",
    "optimization.clip_norm": "reset_optimizer",
    "common.fp16": "reset_optimizer",
    "common.bf16": "reset_optimizer",
    "common.fp16_init_scale": "reset_optimizer",
    "common.fp16_scale_window": "reset_optimizer",
    "common.min_loss_scale": "reset_optimizer",
    "optimization.lr": "reset_lr_scheduler",
    "optimization.max_update": "reset_lr_scheduler",
    "lr_scheduler": "reset_lr_scheduler",
    "dataset.max_tokens": "reset_dataloader",
    "dataset.batch_size": "reset_dataloader",
    "dataset.required_batch_size_multiple": "reset_dataloader",
    "dataset.train_subset": "reset_dataloader",
    "task.data": "reset_dataloader",
    "task.max_sample_size": "reset_dataloader",
    "task.min_sample_size": "reset_dataloader",
    "task.enable_padding": "reset_dataloader",
    "optimization.update_freq": "reset_dataloader",
    "distributed_training.paper_world_size": "reset_dataloader",
    "dataset.valid_subset": "reset_meters",
    "checkpoint.best_checkpoint_metric": "reset_meters",
    "checkpoint.maximize_best_checkpoint_metric": "reset_meters",
}
ALL_RESETS = "all four"


class ResumeConfigError(ValueError):
    """The run directory's checkpoint was trained with a config that differs where training changes."""


@dataclass(frozen=True)
class ConfigChange:
    key: str
    saved: Any
    current: Any
    accepted_by: str
    """The reset flag that accepts this change, or ALL_RESETS."""

    def describe(self) -> str:
        if self.accepted_by == ALL_RESETS:
            how = "all four checkpoint.reset_*=true keep only the weights"
        else:
            how = f"checkpoint.{self.accepted_by}=true accepts it"
        return f"{self.key}: {self.saved!r} -> {self.current!r}  ({how})"


def _matches(key: str, rule: str) -> bool:
    return key == rule or key.startswith((rule + ".", rule + "["))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.mask_prob': 0.65, 'optimization.lr': [5e-05], ...}; lists stay whole values."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def schedule_uses_max_update(cfg: dict[str, Any]) -> bool:
    """Whether the learning-rate schedule is stretched over optimization.max_update (repro.train.optim)."""
    scheduler = cfg.get("lr_scheduler") or {}
    name = scheduler.get("_name")
    if name == "polynomial_decay":
        return scheduler.get("total_num_update") is None
    if name == "cosine":
        return scheduler.get("lr_period_updates") is None
    return name == "tri_stage"


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[ConfigChange]:
    """Keys present in both resolved configs whose values differ where training changes."""
    old, new = _flatten(saved), _flatten(current)
    schedule_stretched = schedule_uses_max_update(saved) or schedule_uses_max_update(current)
    changes = []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or any(_matches(key, rule) for rule in IGNORED):
            continue
        if key == "optimization.max_update" and not schedule_stretched:
            continue  # only a stopping point: training longer or shorter changes no update
        rule = max((rule for rule in ACCEPTED_BY if _matches(key, rule)), key=len, default=None)
        changes.append(ConfigChange(key, old[key], new[key], ACCEPTED_BY[rule] if rule else ALL_RESETS))
    return changes


def resets_for_resume(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> frozenset[str]:
    """The reset flags to apply when resuming `where` (a checkpoint path) under `current`.

    Empty when nothing that changes training differs (the flags are then ignored, see the module
    doc). Raises ResumeConfigError listing every change that the set flags do not accept.
    """
    flags = frozenset(flag for flag in RESET_FLAGS if (current.get("checkpoint") or {}).get(flag))
    if saved is None:
        log.warning("%s records no config (an older checkpoint): the resumed config cannot be compared", where)
        return frozenset()
    changes = config_changes(saved, current)
    if not changes:
        if flags:
            log.info("%s: config unchanged, so %s do nothing (exact resume)", where,
                     ", ".join(f"checkpoint.{flag}" for flag in sorted(flags)))
        return frozenset()
    refused = [change for change in changes if not (
        flags == frozenset(RESET_FLAGS) or change.accepted_by in flags)]
    if refused:
        raise ResumeConfigError(
            f"{where} was trained with another config; resuming would continue it under new values:\n  "
            + "\n  ".join(change.describe() for change in refused)
            + "\nGive the changed run its own directory (hydra.run.dir=runs/<name>), or accept the changes "
            "with the checkpoint.reset_* overrides named above."
        )
    log.warning("%s: resuming under a changed config (%s) with %s", where,
                ", ".join(change.key for change in changes),
                ", ".join(f"checkpoint.{flag}" for flag in sorted(flags)))
    return flags
