"""`python -m repro.tools import-checkpoint IN --out DIR`: a fairseq checkpoint or HF folder in our format.

Reads IN.pt through the restricted unpickler (repro.checkpoints.fairseq, nothing in the file runs), or
an HF transformers folder (config.json + model.safetensors [+ vocab.json], repro.checkpoints.export:
a model fine-tuned with transformers then evaluates with our decoders and sweeps), and writes
* `DIR/checkpoint.pt`: our model file (format.py; `torch.load(weights_only=True)` reads it) of any kind
  (wav2vec 2.0 pretrained or CTC, wav2vec, vq-wav2vec),
* `DIR/config.yaml`: the model and task configuration it was built with,
* `DIR/dict.ltr.txt`: the target dictionary, when the file carries one (newer fine-tuned files) or
  `--dict` names one (the released CTC files do not store theirs, §9.1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from repro.checkpoints.export import load_any
from repro.checkpoints.format import CheckpointError, atomic_save, model_file
from repro.config import stored_model_config

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
DICTIONARY_NAME = "dict.ltr.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="fairseq checkpoint (.pt), any era; one of ours; or an HF transformers folder")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dict", type=Path, default=None,
                        help="dict.ltr.txt to store with a CTC model whose file lacks its dictionary")


def import_checkpoint(source: Path, out_dir: Path, dictionary_path: Path | None = None) -> Path:
    """Convert `source`; returns the path of the written checkpoint."""
    loaded = load_any(source, dictionary_path)
    dictionary = loaded.dictionary
    model_cfg = stored_model_config(loaded.model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    atomic_save(
        model_file(kind=loaded.kind, model_state=loaded.model.state_dict(), model_cfg=model_cfg,
                   task_cfg=loaded.task_cfg, dictionary=None if dictionary is None else list(dictionary.symbols)),
        checkpoint_path,
    )
    config = {"source": str(source), "kind": loaded.kind, "model": model_cfg, "task": loaded.task_cfg}
    (out_dir / CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.create(config)), encoding="utf-8")
    if dictionary is not None:
        dictionary.save(out_dir / DICTIONARY_NAME)
    return checkpoint_path


def main(args: argparse.Namespace) -> int:
    try:
        path = import_checkpoint(args.checkpoint, args.out, args.dict)
    except CheckpointError as error:
        print(f"import-checkpoint: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0
