"""Reference wav2vec 2.0 implementations for parity tests: torchaudio and HF transformers models built
from one of our ModelConfigs, and our state dict (= fairseq keys) mapped onto theirs (fairseq_spec.md §9.4,
§9.5). Test-only helpers."""

from __future__ import annotations

import re

import torch

from repro.config import ModelConfig
from repro.models.wav2vec2 import parse_conv_layers


def _common_key(key: str, style: str) -> str | None:
    """Map one fairseq/our key of Wav2Vec2Model to torchaudio ('ta') or HF ('hf') names (None = dropped)."""
    ta = style == "ta"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m[1]}.conv.{m[2]}"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.2(?:\.1)?\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m[1]}.layer_norm.{m[2]}"
    enc = "encoder.transformer." if ta else "encoder."
    pos = "pos_conv_embed.conv."
    simple = {
        "post_extract_proj.weight": (
            "encoder.feature_projection.projection.weight" if ta else "feature_projection.projection.weight"
        ),
        "post_extract_proj.bias": (
            "encoder.feature_projection.projection.bias" if ta else "feature_projection.projection.bias"
        ),
        "layer_norm.weight": (
            "encoder.feature_projection.layer_norm.weight" if ta else "feature_projection.layer_norm.weight"
        ),
        "layer_norm.bias": (
            "encoder.feature_projection.layer_norm.bias" if ta else "feature_projection.layer_norm.bias"
        ),
        "encoder.pos_conv.0.weight_g": enc + pos + "parametrizations.weight.original0",
        "encoder.pos_conv.0.weight_v": enc + pos + "parametrizations.weight.original1",
        "encoder.pos_conv.0.bias": enc + pos + "bias",
        "encoder.layer_norm.weight": enc + "layer_norm.weight",
        "encoder.layer_norm.bias": enc + "layer_norm.bias",
        "mask_emb": None if ta else "masked_spec_embed",
    }
    if key in simple:
        return simple[key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        rest = m[2]
        rest = re.sub(r"^self_attn\.", "attention.", rest)
        rest = re.sub(r"^self_attn_layer_norm\.", "layer_norm.", rest)
        rest = re.sub(r"^fc1\.", "feed_forward.intermediate_dense.", rest)
        rest = re.sub(r"^fc2\.", "feed_forward.output_dense.", rest)
        return f"{enc}layers.{m[1]}.{rest}"
    return None


def to_torchaudio_state(state: dict[str, torch.Tensor], ctc: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if ctc:
            if key.startswith("w2v_encoder.proj."):
                out["aux." + key.removeprefix("w2v_encoder.proj.")] = value
                continue
            key = key.removeprefix("w2v_encoder.w2v_model.")
        mapped = _common_key(key, "ta")
        if mapped is not None:
            out[mapped] = value
    return out


def to_hf_state(state: dict[str, torch.Tensor], head: str | None = None) -> dict[str, torch.Tensor]:
    """head None: HF Wav2Vec2Model; 'pretraining': Wav2Vec2ForPreTraining; 'ctc': Wav2Vec2ForCTC."""
    prefix = "" if head is None else "wav2vec2."
    top = {
        "quantizer.vars": "quantizer.codevectors",
        "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
        "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
        "project_q.weight": "project_q.weight",
        "project_q.bias": "project_q.bias",
        "final_proj.weight": "project_hid.weight",
        "final_proj.bias": "project_hid.bias",
        "w2v_encoder.proj.weight": "lm_head.weight",
        "w2v_encoder.proj.bias": "lm_head.bias",
    }
    out = {}
    for key, value in state.items():
        if key in top:
            if head is not None:
                out[top[key]] = value
            continue
        mapped = _common_key(key.removeprefix("w2v_encoder.w2v_model."), "hf")
        if mapped is not None:
            out[prefix + mapped] = value
    return out


def build_torchaudio(cfg: ModelConfig, aux_num_out: int | None = None):
    import torchaudio

    return torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm" if cfg.extractor_mode == "layer_norm" else "group_norm",
        extractor_conv_layer_config=parse_conv_layers(cfg.conv_feature_layers),
        extractor_conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=cfg.conv_pos,
        encoder_pos_conv_groups=cfg.conv_pos_groups,
        encoder_num_layers=cfg.encoder_layers,
        encoder_num_heads=cfg.encoder_attention_heads,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=cfg.encoder_ffn_embed_dim,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=0.0,
        aux_num_out=aux_num_out,
    )


def hf_config(cfg: ModelConfig, vocab_size: int = 32, **overrides):
    from transformers import Wav2Vec2Config

    layers = parse_conv_layers(cfg.conv_feature_layers)
    final_dim = cfg.final_dim or cfg.encoder_embed_dim
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.encoder_embed_dim,
        num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.encoder_attention_heads,
        intermediate_size=cfg.encoder_ffn_embed_dim,
        hidden_act="gelu",
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        layer_norm_eps=1e-5,
        feat_extract_norm="layer" if cfg.extractor_mode == "layer_norm" else "group",
        feat_extract_activation="gelu",
        conv_dim=[c for c, _, _ in layers],
        conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers],
        conv_bias=cfg.conv_bias,
        num_conv_pos_embeddings=cfg.conv_pos,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        do_stable_layer_norm=cfg.layer_norm_first,
        mask_time_prob=0.05,
        mask_feature_prob=0.0,
        num_codevectors_per_group=cfg.latent_vars,
        num_codevector_groups=cfg.latent_groups,
        codevector_dim=cfg.latent_dim or final_dim,
        proj_codevector_dim=final_dim,
        contrastive_logits_temperature=cfg.logit_temp,
        num_negatives=cfg.num_negatives,
        diversity_loss_weight=0.1,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return Wav2Vec2Config(**kwargs)
