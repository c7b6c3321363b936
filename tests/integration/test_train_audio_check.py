"""Training checks the audio of every split it will read before the first update, not when a batch comes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import finetune_config, make_corpus  # noqa: E402

from repro.data.audio_headers import AudioCheckError  # noqa: E402
from repro.train.stages import run_finetune  # noqa: E402


def test_bad_audio_in_a_validation_split_stops_training_before_the_first_update(tmp_path: Path) -> None:
    data = make_corpus(tmp_path / "data", train=6, valid=3)
    bad = data / "audio" / "valid" / "valid_002.wav"
    frames = soundfile.info(str(bad)).frames
    soundfile.write(bad, np.zeros(frames, np.float32), 8000)  # same length, another rate
    # Validation would first read this file after 4 updates; only 1 is asked for.
    cfg = finetune_config(data, None, optimization={"max_update": 1})
    run_dir = tmp_path / "run"
    with pytest.raises(AudioCheckError) as refused:
        run_finetune(cfg, run_dir)
    assert f"{data / 'valid.tsv'}:4: {bad}: sample rate 8000 Hz, expected 16000 Hz" in str(refused.value)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
