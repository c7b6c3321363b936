"""`python -m repro.tools featurize`: wav2vec context features of every file, as fairseq's
examples/wav2vec/wav2vec_featurize.py writes them (fairseq_spec.md §4.4), for flashlight / wav2letter.

    python -m repro.tools featurize --input DATA --output FEATS --model wav2vec_large.pt --split train valid

Input: `DATA/<split>/*.<ext>` (sorted; `--ext tsv` reads the manifest `DATA/<split>.tsv` instead).
Output, per audio file, `FEATS/<split>/<name>.h5context` (the audio extension replaced), an HDF5 file:

    features  float32 (T * C,)  c (or z with --use-feat) time-major: data.T.flatten() of (C, T)
    info      float64 (3,)      [100.0 (= 16000 // 160, frames per second), T, C]

and every non-audio file of the split directory copied beside them (the label files) unless
`--no-copy-labels`. Features are unnormalized-waveform features in eval mode, as fairseq's.

Files are batched by length on the GPU when there is one (padded rows are exact: the model's
normalizations skip the padding); a progress bar counts files; an interrupted split resumes: finished
files (written atomically) are skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from repro.checkpoints.format import CheckpointError
from repro.tools.audio_units import (
    AudioFile,
    UnitsError,
    choose_device,
    file_lengths,
    iterate_batches,
    model_on_device,
    run_model,
    split_files,
    stage_inputs,
)

FRAMES_PER_SECOND = 16_000 // 160
SUFFIX = ".h5context"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", type=Path, required=True, help="directory with one folder (or .tsv) per split")
    parser.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    parser.add_argument("--model", type=Path, required=True, help="wav2vec / vq-wav2vec checkpoint (fairseq's or ours)")
    parser.add_argument("--split", nargs="+", required=True, help="dataset splits")
    parser.add_argument("--ext", default="wav", help="audio extension, or 'tsv' to read <input>/<split>.tsv")
    parser.add_argument("--no-copy-labels", action="store_true", help="do not copy the split's non-audio files")
    parser.add_argument("--use-feat", action="store_true", help="write the features z instead of the context c")
    parser.add_argument("--gpu", type=int, default=None, help="GPU index (default: cuda:0 when available)")
    parser.add_argument("--device", default=None, help="torch device (overrides --gpu): cpu, cuda, cuda:1")
    parser.add_argument("--batch-samples", type=int, default=None,
                        help="padded samples per batch (default 2.4M on a GPU; one file per call on CPU)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="audio-reading processes (default 2 on a GPU, 0 on CPU where they cost more than they save)")


def require_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise UnitsError("featurize writes HDF5 through h5py, which is not installed (pip install h5py)") from None
    return h5py


def output_path(output_dir: Path, item: AudioFile) -> Path:
    return output_dir / (str(Path(item.name).with_suffix("")) + SUFFIX)


def write_h5(path: Path, features: np.ndarray) -> None:
    """features (C, T) -> fairseq's flashlight layout, written to a temporary name then renamed."""
    h5py = require_h5py()
    channels, frames = features.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as out:
        out["features"] = np.ascontiguousarray(features.T).reshape(-1).astype(np.float32)
        out["info"] = np.array([FRAMES_PER_SECOND, frames, channels], dtype=np.float64)
    os.replace(partial, path)


def read_h5(path: Path) -> np.ndarray:
    """(C, T) features of a `.h5context` file (the inverse of write_h5)."""
    h5py = require_h5py()
    with h5py.File(path, "r") as data:
        _, frames, channels = (int(v) for v in data["info"][()])
        return data["features"][()].reshape(frames, channels).T


def copy_labels(input_dir: Path, output_dir: Path, extension: str) -> int:
    """Copy every non-audio file of the split directory (fairseq copies the label files)."""
    copied = 0
    for path in sorted(input_dir.iterdir()) if input_dir.is_dir() else []:
        if path.is_file() and not path.name.endswith(f".{extension}"):
            shutil.copy(path, output_dir / path.name)
            copied += 1
    return copied


def featurize_split(model_path: Path, input_root: Path, output_root: Path, split: str, extension: str = "wav",
                    use_feat: bool = False, copy: bool = True, device: str | None = None,
                    batch_samples: int | None = None, num_workers: int | None = None, progress: bool = True) -> dict[str, int]:
    """Features of one split; returns counts (files written / skipped as already done, frames)."""
    require_h5py()
    if num_workers is None:
        num_workers = 2 if choose_device(device).type == "cuda" else 0
    model, torch_device, batch_samples = model_on_device(model_path, False, "featurize", device, batch_samples)
    files = split_files(input_root, split, extension)
    output_dir = output_root / split
    output_dir.mkdir(parents=True, exist_ok=True)
    pending = [item for item in files if not output_path(output_dir, item).is_file()]
    counts = {"files": len(files), "skipped": len(files) - len(pending), "written": 0, "frames": 0}
    bar = tqdm(total=len(files), initial=counts["skipped"], desc=f"featurize {split}", unit="file",
               disable=not progress, file=sys.stderr)
    for rows, waves in iterate_batches(pending, file_lengths(pending), batch_samples, num_workers):
        out = run_model(model, waves, torch_device, aggregate=not use_feat, codes=False)
        features = out["z"] if use_feat else out["c"]
        for row, index in enumerate(rows):
            frames = int(out["frames"][row])
            write_h5(output_path(output_dir, pending[index]), features[row, :, :frames].float().numpy())
            counts["written"] += 1
            counts["frames"] += frames
        bar.update(len(rows))
    bar.close()
    if copy and extension != "tsv":
        copy_labels(input_root / split, output_dir, extension)
    return counts


def main(args: argparse.Namespace) -> int:
    device = args.device or (f"cuda:{args.gpu}" if args.gpu is not None else None)
    try:
        for split in args.split:
            counts = featurize_split(args.model, args.input, args.output, split, args.ext, args.use_feat,
                                     not args.no_copy_labels, device, args.batch_samples, args.num_workers)
            print(f"featurize {split}: {counts['written']} files written, {counts['skipped']} already done "
                  f"-> {args.output / split}", file=sys.stderr)
    except (UnitsError, CheckpointError, ValueError, OSError) as error:
        print(f"featurize: {error}", file=sys.stderr)
        return 1
    return 0


def run_featurize(cfg: Any, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `featurize`: context features of the train and valid manifests of `task.data`, written to
    `<run_dir>/features/<split>/`. The model is `common_eval.path` or this run's checkpoint_best.pt."""
    model_path, splits, device = stage_inputs(cfg, run_dir, "featurize")
    output_root = Path(run_dir) / "features"
    result: dict[str, Any] = {"output_dir": str(output_root)}
    for split in splits:
        counts = featurize_split(model_path, Path(cfg.task.data), output_root, split, extension="tsv",
                                 device=device, num_workers=int(cfg.dataset.num_workers))
        if tracker is not None:
            tracker.log_metrics({"files": float(counts["files"]), "frames": float(counts["frames"])}, step=0,
                                split=f"features_{split}")
        result[split] = counts
    return result
