"""`python -m repro.tools NAME ...`: dispatch to one tool module."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A module that has not landed yet is reported as such.
TOOLS: dict[str, tuple[str, str]] = {
    "manifest": ("repro.tools.manifest", "write train/valid .tsv manifests (fairseq wav2vec_manifest.py)"),
    "labels": ("repro.tools.labels", "write .wrd/.ltr labels for a manifest (fairseq libri_labels.py)"),
    "dictionary": ("repro.tools.dictionary", "write dict.ltr.txt from .ltr label files"),
    "synth-corpus": ("repro.tools.synth_corpus", "generate the synthetic speech corpus (espeak-ng)"),
    "prepare-librispeech": ("repro.tools.prepare_librispeech", "manifests/labels for LibriSpeech + Libri-light splits"),
    "prepare-timit": ("repro.tools.prepare_timit", "TIMIT manifests, 39-phone labels and dict (wav2vec 2.0 Table 3)"),
    "import-checkpoint": ("repro.tools.import_checkpoint", "convert a released fairseq checkpoint or HF folder to ours"),
    "export": ("repro.tools.export", "a checkpoint as an HF transformers folder or torchaudio state dict"),
    "infer": ("repro.tools.infer", "decode a split and score WER (fairseq infer.py)"),
    "sync-runs": ("repro.tools.sync_runs", "replay metrics.jsonl into MLflow after an outage"),
    "runs": ("repro.tools.runs", "list runs and their key metrics"),
    "doctor": ("repro.tools.doctor", "what went wrong in a run directory: evidence and fix for each finding"),
    "featurize": ("repro.tools.featurize", "wav2vec features to h5 (fairseq wav2vec_featurize.py)"),
    "tokenize": ("repro.tools.tokenize", "vq-wav2vec units (fairseq vq-wav2vec_featurize.py)"),
    "synth-units": ("repro.tools.synth_units", "a synthetic unit corpus (tokenize's format) for the RoBERTa rows"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m repro.tools NAME [args]\n\ntools:")
        for name, (_, help_text) in TOOLS.items():
            print(f"  {name:22s}{help_text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        print(f"repro.tools: unknown tool {name!r}; choose one of {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    module_name, help_text = TOOLS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            print(f"repro.tools: {name!r} is not built yet ({module_name} does not exist)", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"python -m repro.tools {name}", description=help_text)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
