"""`python -m repro.tools export --to hf|torchaudio CHECKPOINT --out DIR`: use a model outside repro.

CHECKPOINT is one of ours, any released fairseq wav2vec 2.0 file (read through the restricted unpickler)
or an HF folder. `--to hf` writes a transformers `save_pretrained` folder (config.json, model.safetensors,
the processor files of CTC models); `--to torchaudio` writes model.pt and the keyword arguments of
`torchaudio.models.wav2vec2_model` (README.txt in DIR shows the two lines that load them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repro.checkpoints.export import export_hf, export_torchaudio, load_any
from repro.checkpoints.format import CheckpointError

EXPORTERS = {"hf": export_hf, "torchaudio": export_torchaudio}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="our checkpoint, a fairseq .pt file, or an HF folder")
    parser.add_argument("--to", choices=sorted(EXPORTERS), required=True, help="target library")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dict", type=Path, default=None,
                        help="dict.ltr.txt of a CTC model whose file lacks its dictionary (released fairseq files)")


def main(args: argparse.Namespace) -> int:
    try:
        loaded = load_any(args.checkpoint, args.dict)
        written = EXPORTERS[args.to](loaded, args.out)
    except CheckpointError as error:
        print(f"export: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
