"""`python -m repro.tools labels TSV --output-dir DIR --output-name NAME`: `.wrd` / `.ltr` labels.

Same contract as fairseq's `examples/wav2vec/libri_labels.py` (fairseq_spec.md §4.3): one line per
manifest row, words from the `<speaker>-<chapter>.trans.txt` beside the audio. A row without a
transcript is an error naming the audio file (fairseq asserts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repro.data.librispeech import TranscriptError, TranscriptLookup, words_to_letters
from repro.data.manifest import ManifestError, read_manifest


def label_lines(manifest_path: str | Path) -> tuple[list[str], list[str]]:
    """(word lines, letter lines), one per manifest row."""
    manifest = read_manifest(manifest_path)
    lookup = TranscriptLookup()
    words, letters = [], []
    for index in range(len(manifest)):
        text = lookup.words(manifest.audio_path(index))
        words.append(text)
        letters.append(words_to_letters(text))
    return words, letters


def write_labels(manifest_path: str | Path, output_dir: str | Path, output_name: str) -> tuple[Path, Path]:
    """Write `<output_dir>/<output_name>.wrd` and `.ltr`; returns their paths."""
    words, letters = label_lines(manifest_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wrd_path = output_dir / f"{output_name}.wrd"
    ltr_path = output_dir / f"{output_name}.ltr"
    wrd_path.write_text("".join(line + "\n" for line in words), encoding="utf-8")
    ltr_path.write_text("".join(line + "\n" for line in letters), encoding="utf-8")
    return wrd_path, ltr_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tsv", metavar="TSV", help="manifest written by `repro.tools manifest`")
    parser.add_argument("--output-dir", required=True, help="directory for NAME.wrd and NAME.ltr")
    parser.add_argument("--output-name", required=True, help="base name of the label files (e.g. train)")


def main(args: argparse.Namespace) -> int:
    try:
        wrd_path, ltr_path = write_labels(args.tsv, args.output_dir, args.output_name)
    except (ManifestError, TranscriptError) as error:
        print(f"labels: {error}", file=sys.stderr)
        return 1
    print(f"labels: wrote {wrd_path} and {ltr_path}", file=sys.stderr)
    return 0
