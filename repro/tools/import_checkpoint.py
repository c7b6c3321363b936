"""`python -m repro.tools import-checkpoint IN --out DIR`: a fairseq checkpoint or HF folder in our format.

Reads IN.pt through the restricted unpickler (repro.checkpoints.fairseq, nothing in the file runs), or
an HF transformers folder (config.json + model.safetensors [+ vocab.json], repro.checkpoints.export:
a model fine-tuned with transformers then evaluates with our decoders and sweeps), and writes
* `DIR/checkpoint.pt`: our model file (format.py; `torch.load(weights_only=True)` reads it) of any kind
  (wav2vec 2.0 pretrained or CTC, wav2vec, vq-wav2vec, RoBERTa on units),
* `DIR/config.yaml`: the model and task configuration it was built with,
* `DIR/dict.ltr.txt`: the target dictionary, when the file carries one (newer fine-tuned files) or
  `--dict` names one (the released CTC files do not store theirs, §9.1).

A RoBERTa units model (the extracted `bert_kmeans.tar` folder, or its `.pt` with `dict.txt` beside it
or named by `--dict`) is converted by repro.checkpoints.roberta; its `dict.txt` of unit codes is
written beside our file in fairseq's format (without the `<mask>` the masked_lm task appends).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from repro.checkpoints.export import attach_dictionary, is_hf_folder, load_any
from repro.checkpoints.fairseq import LoadedModel
from repro.checkpoints.format import CheckpointError, atomic_save, model_file
from repro.checkpoints.roberta import KINDS as ROBERTA_KINDS
from repro.checkpoints.roberta import load_roberta
from repro.config import stored_model_config
from repro.data.dictionary import Dictionary
from repro.data.units import MASK_SYMBOL

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
DICTIONARY_NAME = "dict.ltr.txt"
UNIT_DICTIONARY_NAME = "dict.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="fairseq checkpoint (.pt), any era; one of ours; an HF transformers folder; "
                             "or the extracted bert_kmeans folder (RoBERTa on vq-wav2vec units)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dict", type=Path, default=None,
                        help="dict.ltr.txt to store with a CTC model whose file lacks its dictionary "
                             "(RoBERTa: its dict.txt of unit codes, when not beside the checkpoint)")


def write_model(loaded: LoadedModel, source: Path, out_dir: Path, dictionary: Dictionary | None) -> Path:
    """DIR/checkpoint.pt and DIR/config.yaml of a loaded model; returns the checkpoint path."""
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
    return checkpoint_path


def write_roberta(loaded: LoadedModel, source: Path, out_dir: Path) -> Path:
    """Our file, config.yaml and the unit dict.txt of a loaded RoBERTa model; returns the checkpoint path."""
    dictionary = loaded.dictionary
    if dictionary is None:
        raise CheckpointError(f"{source}: no dict.txt beside the checkpoint; name it with --dict")
    checkpoint_path = write_model(loaded, source, out_dir, dictionary)
    end = len(dictionary) - 1 if dictionary.symbols[-1] == MASK_SYMBOL else len(dictionary)
    lines = [f"{dictionary.symbols[i]} {dictionary.counts[i]}\n" for i in range(dictionary.nspecial, end)]
    (out_dir / UNIT_DICTIONARY_NAME).write_text("".join(lines), encoding="utf-8")
    return checkpoint_path


def import_checkpoint(source: Path, out_dir: Path, dictionary_path: Path | None = None) -> Path:
    """Convert `source`; returns the path of the written checkpoint."""
    if source.is_dir() and not is_hf_folder(source):  # the extracted bert_kmeans.tar
        return write_roberta(load_roberta(source, dictionary_path), source, out_dir)
    loaded = load_any(source)
    if loaded.kind in ROBERTA_KINDS:  # --dict names the unit dict.txt, read with the checkpoint
        return write_roberta(load_roberta(source, dictionary_path) if dictionary_path else loaded, source, out_dir)
    loaded = attach_dictionary(loaded, dictionary_path, source)
    checkpoint_path = write_model(loaded, source, out_dir, loaded.dictionary)
    if loaded.dictionary is not None:
        loaded.dictionary.save(out_dir / DICTIONARY_NAME)
    return checkpoint_path


def main(args: argparse.Namespace) -> int:
    try:
        path = import_checkpoint(args.checkpoint, args.out, args.dict)
    except CheckpointError as error:
        print(f"import-checkpoint: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0
