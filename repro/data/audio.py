"""Reading one audio file the way fairseq's FileAudioDataset does (fairseq_spec.md §4.1).

`soundfile.read(path, dtype="float32")`, multi-channel audio averaged to mono, no resampling:
a sample rate other than the expected one is an error. Every failure is an `AudioError`
naming the file, so a bad file deep inside a training run is easy to find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


class AudioError(RuntimeError):
    """An audio file that cannot be used (the message starts with its path)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable (rank 0 sends a refusal to the other ranks): rebuilt from path and reason
        return type(self), (self.path, self.reason)


UNKNOWN_LENGTH_FRAMES = 2**63 - 1
"""libsndfile's SF_COUNT_MAX: the frame count it reports when a header does not say (a FLAC written to a
stream or pipe leaves STREAMINFO's total-samples field 0)."""
UNKNOWN_LENGTH = (
    "length unknown: the header has no total-sample count (a FLAC written to a stream?) and libsndfile cannot "
    "read such a file to its end; re-encode it (e.g. `flac -d -c F | flac -o F2 -`, or soundfile.write)"
)
"""Why a file of unknown length is left out of manifests and refused by training."""


def read_audio(
    path: str | Path,
    expected_sample_rate: int | None = 16_000,
    expected_num_samples: int | None = None,
) -> np.ndarray:
    """Samples of `path` as float32 (samples,), channels averaged.

    Raises `AudioError` when the file is missing or unreadable, holds no samples, is
    truncated (fewer samples decoded than its header - or `expected_num_samples`, the
    manifest's count - announces), or has a sample rate other than `expected_sample_rate`
    (None accepts any rate).
    """
    path = Path(path)
    try:
        with soundfile.SoundFile(str(path)) as sound_file:
            sample_rate = sound_file.samplerate
            header_frames = sound_file.frames
            if header_frames >= UNKNOWN_LENGTH_FRAMES:
                raise AudioError(path, UNKNOWN_LENGTH)
            if expected_sample_rate is not None and sample_rate != expected_sample_rate:
                raise AudioError(
                    path, f"sample rate {sample_rate} Hz, expected {expected_sample_rate} Hz (no resampling)"
                )
            waveform = sound_file.read(dtype="float32", always_2d=True)  # (samples, channels)
    except AudioError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError) as error:
        raise AudioError(path, f"cannot read audio: {error}") from error
    num_samples = waveform.shape[0]
    if num_samples == 0:
        raise AudioError(path, "audio file holds zero samples")
    if num_samples < header_frames:
        raise AudioError(path, f"truncated: decoded {num_samples} samples, header announces {header_frames}")
    if expected_num_samples is not None and num_samples != expected_num_samples:
        raise AudioError(
            path,
            f"holds {num_samples} samples but the manifest says {expected_num_samples} "
            "(truncated or replaced?)",
        )
    if waveform.shape[1] == 1:
        return np.ascontiguousarray(waveform[:, 0])
    return waveform.mean(axis=1, dtype=np.float32)


def audio_num_samples(path: str | Path) -> int:
    """Frames announced by the file header (what the manifest records); `AudioError` if unreadable."""
    try:
        return int(soundfile.info(str(path)).frames)
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError) as error:
        raise AudioError(path, f"cannot read audio header: {error}") from error
