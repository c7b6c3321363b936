"""Reference wav2vec 2.0 implementations for parity tests: torchaudio and HF transformers models built
from one of our ModelConfigs. The key mapping is the exporter's (repro.checkpoints.export; fairseq_spec.md
§9.4, §9.5), so the parity tests check the very mapping users export with. Test-only helpers."""

from __future__ import annotations

import torch

from repro.checkpoints.export import hf_config_dict, to_hf_state, to_torchaudio_state, torchaudio_kwargs
from repro.config import ModelConfig

__all__ = ["build_torchaudio", "hf_config", "max_diff_valid", "to_hf_state", "to_torchaudio_state", "waveforms"]


def build_torchaudio(cfg: ModelConfig, aux_num_out: int | None = None):
    import torchaudio

    return torchaudio.models.wav2vec2_model(**torchaudio_kwargs(cfg, aux_num_out))


def hf_config(cfg: ModelConfig, vocab_size: int = 32, **overrides):
    """HF Wav2Vec2Config of `cfg` as the exporter writes it (mask_time_prob kept small: HF's masking of
    short test inputs needs fewer frames than fairseq's 0.65)."""
    from transformers import Wav2Vec2Config

    kind = "wav2vec_ctc" if cfg._name == "wav2vec_ctc" else "wav2vec2"
    kwargs = hf_config_dict(cfg, kind, vocab_size)
    for key in ("architectures", "model_type"):
        kwargs.pop(key)
    kwargs.update({"mask_time_prob": 0.05, "final_dropout": 0.0, **overrides})  # overrides win
    return Wav2Vec2Config(**kwargs)


def waveforms(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random waveforms (batch, max length), zero beyond each length, and their padding mask (None: no padding)."""
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(len(lengths), max(lengths), generator=gen)
    padding = torch.zeros(source.shape, dtype=torch.bool)
    for row, length in enumerate(lengths):
        source[row, length:] = 0.0
        padding[row, length:] = True
    return source, (padding if bool(padding.any()) else None)


def max_diff_valid(a: torch.Tensor, b: torch.Tensor, frame_padding: torch.Tensor | None) -> float:
    """Largest absolute difference over the frames that are not padding."""
    if frame_padding is not None:
        a, b = a[~frame_padding], b[~frame_padding]
    return (a - b).abs().max().item()
