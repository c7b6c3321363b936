"""`python -m repro.tools tokenize`: vq-wav2vec discrete units of a corpus, as fairseq's
examples/wav2vec/vq-wav2vec_featurize.py writes them (fairseq_spec.md §4.5), for BERT / RoBERTa training.

    python -m repro.tools tokenize --data-dir MANIFESTS --output-dir UNITS --checkpoint vq-wav2vec_kmeans.pt \
        --split train valid test --extension tsv

Input: the manifest `<data-dir>/<split>.tsv` (`--extension tsv`) or the files `<data-dir>/<split>/**/*.<ext>`.
Output in `<output-dir>`:

    <split>.src   one line per utterance (input order): its frames' codes, space separated, each code the
                  group-local indices joined by '-' ("12-304 7-44 ..." for 2 groups)
    <split>.lbl   the utterance's line of `<data-dir>/<split>.<labels>` (with --labels; fairseq's name, which
                  RoBERTa CTC fine-tuning reads when `<split>.<labels>` is absent)
    dict.<labels>.txt  copied from `<data-dir>` (with --labels, when there): the fine-tuning targets' dictionary,
                  so that the output directory is a `task.data` for `model=roberta_ctc` as it stands
    dict.txt      fairseq Dictionary format, `<code> <count>` per line, most frequent first (ties by code),
                  counted over the first split given (fairseq-preprocess builds it from the training split)

Files longer than --max-size samples are cut into equal chunks whose codes are concatenated (as fairseq).
Batches of files run on the GPU when there is one (exact: padded rows equal per-file runs). An interrupted
split resumes: `<split>.src.partial` holds the finished utterances, fsynced every window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from repro.checkpoints.format import CheckpointError
from repro.data.units import TOKENIZED_LABELS_EXT
from repro.models.wav2vec import Wav2VecModel
from repro.tools.audio_units import (
    AudioFile,
    UnitsError,
    choose_device,
    file_lengths,
    iterate_batches,
    load_wav2vec,
    model_on_device,
    run_model,
    split_files,
    stage_inputs,
)

DICTIONARY_NAME = "dict.txt"
WINDOW = 256
"""Utterances processed (and made durable) per step of a split; also the resume granularity."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="vq-wav2vec checkpoint (fairseq's or ours)")
    parser.add_argument("--data-dir", type=Path, required=True, help="directory of manifests or split folders")
    parser.add_argument("--output-dir", type=Path, required=True, help="where <split>.src and dict.txt go")
    parser.add_argument("--splits", "--split", dest="splits", nargs="+", required=True, help="splits")
    parser.add_argument("--extension", default="tsv", help="'tsv' (manifests) or the audio extension to glob")
    parser.add_argument("--labels", default=None, help="label extension to copy alongside, e.g. 'ltr'")
    parser.add_argument("--max-size", type=int, default=1_300_000, help="longest chunk in samples (fairseq)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--batch-samples", type=int, default=None,
                        help="padded samples per batch (default 2.4M on a GPU; one file per call on CPU)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="audio-reading processes (default 2 on a GPU, 0 on CPU where they cost more than they save)")


def code_string(codes: torch.Tensor) -> str:
    """(T, G) group-local indices -> '12-304 7-44 ...' (fairseq's text format)."""
    return " ".join("-".join(str(int(g)) for g in frame) for frame in codes.tolist())


def chunk_bounds(length: int, max_size: int) -> list[tuple[int, int]]:
    """fairseq: the smallest `div` with length // div <= max_size, then torch.chunk(div) boundaries."""
    div = 1
    while length // div > max_size:
        div += 1
    step = -(-length // div)  # torch.chunk: chunks of ceil(length / div)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def tokenize_files(model: Wav2VecModel, files: Sequence[AudioFile], device: torch.device, batch_samples: int,
                   max_size: int, num_workers: int) -> list[str]:
    """Code strings of `files`, in their order (chunks of long files run as rows of their own)."""
    lengths = file_lengths(files)
    pieces: list[tuple[int, int, int]] = []  # (file index, start, end)
    for index, length in enumerate(lengths):
        pieces.extend((index, start, end) for start, end in chunk_bounds(length, max_size))
    chunk_files = [files[index] for index, _, _ in pieces]
    codes: dict[int, torch.Tensor] = {}
    reader = iterate_batches(chunk_files, [end - start for _, start, end in pieces], batch_samples, num_workers)
    for rows, waves in reader:
        cut = [wave[pieces[row][1]:pieces[row][2]] for row, wave in zip(rows, waves)]
        out = run_model(model, cut, device, aggregate=False, codes=True)
        for position, row in enumerate(rows):
            codes[row] = out["codes"][position, : int(out["frames"][position])]
    lines = [[] for _ in files]
    for row, (index, _, _) in enumerate(pieces):
        lines[index].append(codes[row])
    return [code_string(torch.cat(parts)) for parts in lines]


def read_labels(data_dir: Path, split: str, labels: str, count: int) -> list[str]:
    path = data_dir / f"{split}.{labels}"
    if not path.is_file():
        raise UnitsError(f"{path}: label file not found (--labels {labels})")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != count:
        raise UnitsError(f"{path}: {len(lines)} lines but the split has {count} utterances")
    return lines


def append_durably(path: Path, lines: Sequence[str]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
        handle.flush()
        os.fsync(handle.fileno())


def tokenize_split(model_path: Path, data_dir: Path, output_dir: Path, split: str, extension: str = "tsv",
                   labels: str | None = None, max_size: int = 1_300_000, device: str | None = None,
                   batch_samples: int | None = None, num_workers: int | None = None, progress: bool = True) -> Path:
    """Write `<output_dir>/<split>.src` (and .lbl); resumes from `<split>.src.partial`. Returns the .src path."""
    if num_workers is None:
        num_workers = 2 if choose_device(device).type == "cuda" else 0
    model, torch_device, batch_samples = model_on_device(model_path, True, "tokenize", device, batch_samples)
    files = split_files(data_dir, split, extension)
    label_lines = read_labels(data_dir, split, labels, len(files)) if labels else None
    output_dir.mkdir(parents=True, exist_ok=True)
    final, partial = output_dir / f"{split}.src", output_dir / f"{split}.src.partial"
    if final.is_file() and not partial.exists():
        done = len(final.read_text(encoding="utf-8").splitlines())
        if done == len(files):
            return final  # finished earlier
        final.rename(partial)  # an older, shorter output: continue it
    done = len(partial.read_text(encoding="utf-8").splitlines()) if partial.is_file() else 0
    if done > len(files):
        raise UnitsError(f"{partial}: {done} lines but the split has {len(files)} utterances; remove it to restart")
    bar = tqdm(total=len(files), initial=done, desc=f"tokenize {split}", unit="utt", disable=not progress,
               file=sys.stderr)
    for start in range(done, len(files), WINDOW):
        window = files[start:start + WINDOW]
        append_durably(partial, tokenize_files(model, window, torch_device, batch_samples, max_size, num_workers))
        bar.update(len(window))
    bar.close()
    partial.touch()
    os.replace(partial, final)
    if label_lines is not None:
        (output_dir / f"{split}.{TOKENIZED_LABELS_EXT}").write_text("".join(line + "\n" for line in label_lines), encoding="utf-8")
    return final


def copy_label_dictionary(data_dir: Path, output_dir: Path, labels: str) -> None:
    """`dict.<labels>.txt` beside the units (fine-tuning's targets); a data dir without one is said, not refused."""
    source = data_dir / f"dict.{labels}.txt"
    if source.is_file():
        shutil.copyfile(source, output_dir / source.name)
    else:
        print(f"tokenize: no {source}; put the targets' dictionary beside the units before fine-tuning on them",
              file=sys.stderr)


def count_codes(src: Path) -> Counter:
    counts: Counter = Counter()
    with open(src, encoding="utf-8") as handle:
        for line in handle:
            counts.update(line.split())
    return counts


def write_dictionary(counts: Counter, path: Path) -> None:
    """fairseq Dictionary text format: `<symbol> <count>`, most frequent first, ties by symbol."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    path.write_text("".join(f"{symbol} {count}\n" for symbol, count in ordered), encoding="utf-8")


def code_usage(counts: Counter, groups: int, num_vars: int) -> dict[str, float]:
    """How the codebook is used: distinct codes, their perplexity (exp entropy), per-group usage."""
    total = sum(counts.values())
    if total == 0:
        return {"tokens": 0.0, "codes_used": 0.0}
    probs = np.array(list(counts.values()), dtype=np.float64) / total
    usage = {"tokens": float(total), "codes_used": float(len(counts)),
             "code_perplexity": float(np.exp(-(probs * np.log(probs)).sum())),
             "codes_possible": float(num_vars**groups)}
    for group in range(groups):
        used = {symbol.split("-")[group] for symbol in counts}
        usage[f"group{group}_used"] = float(len(used))
    return usage


def main(args: argparse.Namespace) -> int:
    try:
        sources = []
        for split in args.splits:
            sources.append(tokenize_split(args.checkpoint, args.data_dir, args.output_dir, split, args.extension,
                                          args.labels, args.max_size, args.device, args.batch_samples,
                                          args.num_workers))
            print(f"tokenize {split}: {sources[-1]}", file=sys.stderr)
        write_dictionary(count_codes(sources[0]), args.output_dir / DICTIONARY_NAME)
        if args.labels:
            copy_label_dictionary(args.data_dir, args.output_dir, args.labels)
    except (UnitsError, CheckpointError, ValueError, OSError) as error:
        print(f"tokenize: {error}", file=sys.stderr)
        return 1
    return 0


def run_tokenize(cfg: Any, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `tokenize`: the units of `<task.data>/<split>.tsv` for the train and valid splits, written to
    `<run_dir>/units/` with `dict.txt` from the training split; code usage logged to the trackers
    (split `units_<split>`: tokens, codes_used, codes_possible, code_perplexity, group<g>_used).

    The model is `common_eval.path` (`checkpoint=PATH`) or this run's `checkpoints/checkpoint_best.pt`.
    """
    model_path, splits, device = stage_inputs(cfg, run_dir, "tokenize")
    output_dir = Path(run_dir) / "units"
    loaded = load_wav2vec(model_path, need_quantizer=True, tool="tokenize")
    quantizer = loaded.model.vector_quantizer
    result: dict[str, Any] = {"output_dir": str(output_dir)}
    for split in splits:
        source = tokenize_split(model_path, Path(cfg.task.data), output_dir, split, device=device,
                                num_workers=int(cfg.dataset.num_workers))
        counts = count_codes(source)
        if split == splits[0]:
            write_dictionary(counts, output_dir / DICTIONARY_NAME)
        usage = code_usage(counts, quantizer.groups, quantizer.num_vars)
        if tracker is not None:
            tracker.log_metrics(usage, step=0, split=f"units_{split}")
        result[split] = usage
        print(f"repro tokenize {split}: {int(usage['codes_used'])} of {int(usage['codes_possible'])} codes used, "
              f"perplexity {usage.get('code_perplexity', 0.0):.1f} -> {source}", file=sys.stderr)
    return result
