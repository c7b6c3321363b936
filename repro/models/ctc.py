"""wav2vec 2.0 + CTC head (fairseq's `wav2vec_ctc`, fairseq_spec.md §3.1).

Submodule names are fairseq's fine-tuned keys: `w2v_encoder.w2v_model.*` (the pretrained model without its
quantizer / project_q / final_proj) and `w2v_encoder.proj.*`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from repro.config import ModelConfig
from repro.models.wav2vec2 import Wav2Vec2Model

# Fine-tuning fields that replace the pretrained model's (fairseq Wav2VecEncoder arg_overrides, §3.1,
# Trap 11). mask_dropout is not among them (fairseq passes it under another name, so it never applies).
FINETUNE_OVERRIDES = (
    "dropout",
    "activation_dropout",
    "dropout_input",
    "attention_dropout",
    "mask_length",
    "mask_prob",
    "require_same_masks",
    "mask_selection",
    "mask_other",
    "no_mask_overlap",
    "mask_channel_length",
    "mask_channel_prob",
    "mask_channel_before",
    "mask_channel_selection",
    "mask_channel_other",
    "no_mask_channel_overlap",
    "feature_grad_mult",
)
# Fields that only the CTC wrapper reads; they come from the fine-tuning config.
CTC_FIELDS = (
    "w2v_path",
    "no_pretrained_weights",
    "apply_mask",
    "final_dropout",
    "layerdrop",
    "freeze_finetune_updates",
    "normalize",
)
PRETRAINING_ONLY_PREFIXES = (
    "quantizer.",
    "project_q.",
    "final_proj.",
    "target_glu.",
    "_ema",
    "target_proj.",
    "decoder.",
)


def _field(cfg: Any, name: str) -> Any:
    value = getattr(cfg, name)
    return list(value) if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig" else value


def merge_finetune_config(pretrained_cfg: Any, finetune_cfg: Any) -> ModelConfig:
    """The model config of a fine-tuned model: the pretrained architecture with fairseq's arg_overrides.

    `encoder_layerdrop` takes the fine-tuning `layerdrop`; the CTC fields come from `finetune_cfg`.
    Raises when both configs state a different waveform `normalize` (fairseq asserts the same).
    """
    values = {f.name: _field(pretrained_cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    for name in FINETUNE_OVERRIDES + CTC_FIELDS:
        values[name] = _field(finetune_cfg, name)
    values["encoder_layerdrop"] = finetune_cfg.layerdrop
    values["_name"] = "wav2vec_ctc"
    pre_norm, ft_norm = getattr(pretrained_cfg, "normalize", None), getattr(finetune_cfg, "normalize", None)
    if pre_norm is not None and ft_norm is not None and bool(pre_norm) != bool(ft_norm):
        raise ValueError(
            f"model.normalize={ft_norm} but the pretrained model was trained with normalize={pre_norm} "
            "(fairseq requires the same waveform normalization for fine-tuning)"
        )
    if ft_norm is None:
        values["normalize"] = pre_norm
    return ModelConfig(**values)


class Wav2VecEncoder(nn.Module):
    """Pretrained encoder + dropout + linear projection to the vocabulary (fairseq's Wav2VecEncoder)."""

    def __init__(self, cfg: Any, vocab_size: int) -> None:
        super().__init__()
        self.w2v_model = Wav2Vec2Model(cfg)
        self.w2v_model.remove_pretraining_modules()
        self.apply_mask = bool(cfg.apply_mask)
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.freeze_finetune_updates = int(cfg.freeze_finetune_updates)
        self.num_updates = 0
        self.proj = nn.Linear(cfg.encoder_embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Frozen phase: the encoder runs without gradients but still in train mode (masks, dropout on).
        frozen = self.num_updates < self.freeze_finetune_updates
        with torch.no_grad() if frozen else contextlib.nullcontext():
            res = self.w2v_model.extract_features(
                source, padding_mask, mask=self.apply_mask and self.training
            )
        x = self.proj(self.final_dropout(res["x"]))  # (B, T, V)
        return x, res["padding_mask"]


class Wav2Vec2CTC(nn.Module):
    """wav2vec 2.0 encoder with a CTC projection; forward returns raw logits (B, T, V)."""

    def __init__(self, cfg: Any, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.w2v_encoder = Wav2VecEncoder(cfg, vocab_size)

    def set_num_updates(self, num_updates: int) -> None:
        """Called by the trainer after every optimizer step (freeze_finetune_updates)."""
        self.w2v_encoder.num_updates = num_updates
        self.w2v_encoder.w2v_model.set_num_updates(num_updates)

    def set_rng_seed(self, seed: int) -> None:
        """Masks and LayerDrop of the next forwards derive from `seed` (see Wav2Vec2Model.set_rng_seed)."""
        self.w2v_encoder.w2v_model.set_rng_seed(seed)

    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits (B, T, V) and the frame padding mask (B, T) or None.

        Padded frames get logits [0, -inf, ...] (always blank), fairseq HEAD's `get_logits` (§3.1).
        """
        logits, frame_padding = self.w2v_encoder(source, padding_mask)
        if frame_padding is not None and bool(frame_padding.any()):
            blank_only = torch.full(
                (logits.size(-1),), float("-inf"), dtype=logits.dtype, device=logits.device
            )
            blank_only[0] = 0.0
            logits = torch.where(frame_padding.unsqueeze(-1), blank_only, logits)
        return logits, frame_padding

    @classmethod
    def from_pretrained(
        cls,
        pretrained: Wav2Vec2Model | None,
        pretrained_cfg: Any,
        finetune_cfg: Any,
        vocab_size: int,
    ) -> Wav2Vec2CTC:
        """CTC model whose encoder starts from `pretrained` with fairseq's fine-tuning overrides.

        The pretraining-only weights (quantizer, project_q, final_proj) are dropped; the rest must match
        exactly. With `finetune_cfg.no_pretrained_weights` (or pretrained=None) the encoder stays random.
        """
        model = cls(merge_finetune_config(pretrained_cfg, finetune_cfg), vocab_size)
        if pretrained is not None and not finetune_cfg.no_pretrained_weights:
            state = {
                key: value
                for key, value in pretrained.state_dict().items()
                if not key.startswith(PRETRAINING_ONLY_PREFIXES)
            }
            model.w2v_encoder.w2v_model.load_state_dict(state, strict=True)
        return model
