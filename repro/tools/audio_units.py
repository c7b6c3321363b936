"""What `featurize` and `tokenize` share: the model check, the file list of a split, the audio checks,
and batched exact inference (padded batches whose rows equal per-file runs, Wav2VecModel.extract).

Files are read by DataLoader workers (prefetching the next batches while the model runs), grouped by
length into batches of at most `batch_samples` padded samples, and run on the GPU when there is one.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from repro.checkpoints.fairseq import LoadedModel, load
from repro.data.manifest import ManifestError, read_manifest
from repro.models.wav2vec import Wav2VecModel

SAMPLE_RATE = 16_000


class UnitsError(ValueError):
    """Bad input to featurize / tokenize (the message names the file, line or key)."""


def load_wav2vec(path: Path | str, need_quantizer: bool, tool: str) -> LoadedModel:
    """A wav2vec / vq-wav2vec model from `path`, or a UnitsError saying what the file holds instead."""
    loaded = load(path)
    if loaded.kind != "wav2vec":
        what = {"wav2vec2": "a wav2vec 2.0 model", "wav2vec_ctc": "a fine-tuned wav2vec 2.0 (CTC) model"}
        raise UnitsError(
            f"{tool}: {path} holds {what.get(loaded.kind, repr(loaded.kind))}; {tool} needs a wav2vec (2019) or "
            f"vq-wav2vec checkpoint (fairseq arch 'wav2vec')"
            + ("; wav2vec 2.0's quantizer only makes training targets, it is not a tokenizer" if need_quantizer else "")
        )
    if need_quantizer and loaded.model.vector_quantizer is None:
        raise UnitsError(f"{tool}: {path} is a wav2vec model without a quantizer (model.vq_type='none'); tokens "
                         "need a vq-wav2vec checkpoint (vq_type gumbel or kmeans)")
    return loaded


def stage_inputs(cfg: Any, run_dir: Path, stage: str) -> tuple[Path, list[str], str | None]:
    """(model, splits, device) of the featurize / tokenize stages: the model is `common_eval.path`
    (`checkpoint=PATH`) or the run's own `checkpoints/checkpoint_best.pt`; the splits are the train
    subset and the valid subsets of `task.data`; the CPU when common.cpu."""
    model_path = Path(cfg.common_eval.path or Path(run_dir) / cfg.checkpoint.save_dir / "checkpoint_best.pt")
    if not model_path.is_file():
        raise UnitsError(f"stage {stage}: no model at {model_path}; give checkpoint=PATH or pretrain first")
    valid = [] if cfg.dataset.disable_validation else str(cfg.dataset.valid_subset or "").split(",")
    splits = [cfg.dataset.train_subset] + [split.strip() for split in valid if split.strip()]
    return model_path, splits, "cpu" if cfg.common.cpu else None


def model_on_device(model_path: Path | str, need_quantizer: bool, tool: str, device: str | None,
                    batch_samples: int | None) -> tuple[Wav2VecModel, torch.device, int]:
    """(eval model on the device, the device, padded samples per batch: 2.4M on a GPU; on CPU one file
    per call, since CPU convolutions are already parallel over time and the padding and masked
    normalizations of a batch cost more than they save: 0.54x the per-file loop, bench_featurize)."""
    torch_device = choose_device(device)
    model = load_wav2vec(model_path, need_quantizer, tool).model.to(torch_device).eval()
    if batch_samples is None:
        batch_samples = 2_400_000 if torch_device.type == "cuda" else 1
    return model, torch_device, batch_samples


def choose_device(requested: str | None) -> torch.device:
    """'cuda' when available unless told otherwise ('cpu', 'cuda', 'cuda:1')."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- which files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFile:
    path: Path
    name: str
    """Relative name: the manifest's path, or the file name within the split directory."""
    where: str
    """Where the file is listed (manifest:line or the directory), for error messages."""


def split_files(root: Path, split: str, extension: str) -> list[AudioFile]:
    """`<root>/<split>.tsv` when extension is 'tsv' (manifest order), else the sorted
    `<root>/<split>/**/*.<extension>` files (fairseq's featurize globs the split directory)."""
    if extension == "tsv":
        manifest = root / f"{split}.tsv"
        if not manifest.is_file():
            raise UnitsError(f"{manifest}: manifest of split {split!r} not found")
        try:
            listed = read_manifest(manifest)
        except ManifestError as error:
            raise UnitsError(str(error)) from None
        return [AudioFile(listed.audio_path(i), entry.rel_path, f"{manifest}, row {i + 1}")
                for i, entry in enumerate(listed.entries)]
    directory = root / split
    if not directory.is_dir():
        raise UnitsError(f"{directory}: split directory not found")
    paths = sorted(Path(p) for p in glob.glob(str(directory / "**" / f"*.{extension}"), recursive=True))
    if not paths:
        raise UnitsError(f"{directory}: no *.{extension} files")
    return [AudioFile(p, str(p.relative_to(directory)), str(directory)) for p in paths]


def read_audio(item: AudioFile) -> np.ndarray:
    """float32 mono samples at 16 kHz, unnormalized (as fairseq's featurize scripts), or a UnitsError."""
    try:
        wave, rate = sf.read(str(item.path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as error:  # soundfile.LibsndfileError is a RuntimeError
        raise UnitsError(f"{item.path} ({item.where}): cannot read audio: {error}") from None
    if rate != SAMPLE_RATE:
        raise UnitsError(f"{item.path} ({item.where}): sample rate {rate} Hz; wav2vec models take {SAMPLE_RATE} Hz "
                         "audio (fairseq asserts it too): resample the corpus first")
    if wave.shape[1] != 1:
        raise UnitsError(f"{item.path} ({item.where}): {wave.shape[1]} channels; mono audio expected")
    return wave[:, 0]


# --- batches -------------------------------------------------------------------------------------


def length_batches(lengths: Sequence[int], batch_samples: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so that rows x longest <= batch_samples (>= 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_samples:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


class _Reading(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[AudioFile], batches: list[list[int]]) -> None:
        self.files, self.batches = files, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[list[int], list[np.ndarray]]:
        rows = self.batches[index]
        return rows, [read_audio(self.files[i]) for i in rows]


def _first(item: object) -> object:
    return item


def padded(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded samples and (B,) lengths."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), int(lengths.max()))
    for row, wave in enumerate(waves):
        batch[row, : len(wave)] = torch.from_numpy(wave)
    return batch, lengths


def iterate_batches(files: Sequence[AudioFile], lengths: Sequence[int], batch_samples: int,
                    num_workers: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """(file indices, waves) per batch, read ahead by `num_workers` processes."""
    batches = length_batches(lengths, batch_samples)
    loader = torch.utils.data.DataLoader(_Reading(files, batches), batch_size=None, collate_fn=_first,
                                         num_workers=num_workers, prefetch_factor=4 if num_workers else None)
    yield from loader


def file_lengths(files: Sequence[AudioFile]) -> list[int]:
    """Samples per file from the headers (no decoding); a UnitsError names an unreadable file."""
    lengths = []
    for item in files:
        try:
            lengths.append(int(sf.info(str(item.path)).frames))
        except (RuntimeError, OSError) as error:
            raise UnitsError(f"{item.path} ({item.where}): cannot read audio: {error}") from None
    return lengths


def run_model(model: Wav2VecModel, waves: Sequence[np.ndarray], device: torch.device, aggregate: bool,
              codes: bool) -> dict[str, torch.Tensor]:
    """Wav2VecModel.extract on one padded batch, results on the CPU."""
    batch, lengths = padded(waves)
    # a single file has no padding: the model's plain (fused) normalizations give the same result
    out = model.extract(batch.to(device), None if len(waves) == 1 else lengths.to(device), aggregate=aggregate,
                        codes=codes)
    return {key: value.cpu() for key, value in out.items()}
