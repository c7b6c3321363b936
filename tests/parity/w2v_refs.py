"""Reference wav2vec 2.0 implementations for parity tests: torchaudio and HF transformers models built
from one of our ModelConfigs. The key mapping is the exporter's (repro.checkpoints.export; fairseq_spec.md
§9.4, §9.5), so the parity tests check the very mapping users export with. Test-only helpers."""

from __future__ import annotations

from repro.checkpoints.export import hf_config_dict, to_hf_state, to_torchaudio_state, torchaudio_kwargs
from repro.config import ModelConfig

__all__ = ["build_torchaudio", "hf_config", "to_hf_state", "to_torchaudio_state"]


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
    kwargs.update(mask_time_prob=0.05, final_dropout=0.0, **overrides)
    return Wav2Vec2Config(**kwargs)
