"""Training tasks: one module per task owns its data, model construction and loss hooks.

The trainer (repro.train.trainer.Trainer) is generic; repro.train.stages only wires a task to it.
A task module defines:

    KIND: str    # checkpoint kind its runs write (repro.checkpoints.format.KINDS), e.g. "wav2vec2"
    STAGE: str   # the stage that runs it: "pretrain" or "finetune"
    def build(cfg: DictConfig, resume: dict | None) -> repro.tasks.common.TaskSetup

`build` returns the model, the TaskHooks (loss, metric reduction, what the checkpoint stores) and
the train / valid SplitData. `resume` is the newest checkpoint of the run directory (already checked
to be of kind KIND) or None; a task that needs the resumed architecture to build its model reads
`resume["model_cfg"]` (the trainer then loads the weights and training state from it). The torch
generator is seeded with `common.seed` just before `build`, so random initial weights are
reproducible.

A task is chosen by the config's (task._name, model._name); `None` as the model name matches any
model. To add a task: write `repro/tasks/<name>.py` with the three names above and add one line to
TASKS below.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

TASKS: dict[tuple[str, str | None], str] = {
    ("audio_pretraining", "wav2vec2"): "repro.tasks.wav2vec2_pretraining",
    ("audio_pretraining", "wav2vec"): "repro.tasks.wav2vec_pretraining",
    ("audio_finetuning", None): "repro.tasks.ctc_finetuning",
    ("masked_lm", "roberta"): "repro.tasks.masked_lm",
    ("audio_finetuning", "roberta_ctc"): "repro.tasks.roberta_ctc",
}
"""(task._name, model._name or None for any) -> module implementing the task."""


def task_module(cfg: Any) -> ModuleType:
    """The module of the task `cfg` describes, or a ValueError listing the known combinations."""
    task_name, model_name = str(cfg.task._name), str(cfg.model._name)
    name = TASKS.get((task_name, model_name)) or TASKS.get((task_name, None))
    if name is None:
        known = ", ".join(f"task._name={t} model._name={m or '*'}" for t, m in TASKS)
        raise ValueError(f"no training task for task._name={task_name!r} with model._name={model_name!r}; "
                         f"known: {known}")
    return importlib.import_module(name)
