"""Stage name -> the function that runs it, imported only when the stage runs.

One registry for every way a stage is started: `python -m repro` (repro/cli.py) and the demo's
steps (repro/tools/demo.py). Modules are named as strings, so this file imports nothing above
`repro.config` and a stage whose module has not landed is reported by name, not as an ImportError.
"""

from __future__ import annotations

import importlib

from repro.config import STAGES

# stage -> (module, function, what the stage would do: said when its module has not landed)
STAGE_IMPLEMENTATIONS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("repro.train.stages", "run_pretrain", "pretraining (wav2vec 2.0, wav2vec, vq-wav2vec)"),
    "finetune": ("repro.train.stages", "run_finetune", "CTC fine-tuning"),
    "evaluate": ("repro.decode.evaluate", "run_evaluate", "decoding and WER scoring of a checkpoint"),
    "pseudo_label": ("repro.launch.pseudo_label", "run_pseudo_label",
                     "pseudo-labelling unlabeled audio for self-training (Xu et al. 2020)"),
    "st_compare": ("repro.train.self_training", "run_compare",
                   "the self-trained model's WER beside its labelling model's"),
    "featurize": ("repro.tools.featurize", "run_featurize", "wav2vec / vq-wav2vec feature extraction"),
    "tokenize": ("repro.tools.tokenize", "run_tokenize", "vq-wav2vec tokenization of audio into discrete units"),
    "demo": ("repro.tools.demo", "run_demo", "the miniature end-to-end reproduction"),
}


class StageNotBuilt(RuntimeError):
    """A stage exists in the design but its implementation has not landed."""


def resolve_stage(stage: str):
    """Return the callable implementing `stage`, or raise a plain-spoken error."""
    if stage not in STAGE_IMPLEMENTATIONS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    module_name, function_name, purpose = STAGE_IMPLEMENTATIONS[stage]
    missing = f"this version of repro has no implementation of {purpose}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise StageNotBuilt(f"stage {stage!r} is not built yet: {missing} (module {module_name} is absent)") from None
        raise
    if not hasattr(module, function_name):
        raise StageNotBuilt(f"stage {stage!r} is not built yet: {missing} ({module_name}.{function_name} is absent)")
    return getattr(module, function_name)
