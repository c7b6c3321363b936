"""Named model shapes, mirrored by conf/model/wav2vec2_<name>.yaml (fields that differ from ModelConfig).

base / large_lv60 follow fairseq's pretraining yamls (fairseq_spec.md §6.1); large (LS-960) has no fairseq
yaml and follows the paper (24 blocks, D 1024, LayerDrop 0.2) with the large yaml's quantizer settings.
tiny is ours: a few-hundred-thousand-parameter model for CPU tests and the demo.
"""

from __future__ import annotations

from repro.config import ModelConfig

TINY_CONV_LAYERS = "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2"

PRESETS: dict[str, ModelConfig] = {
    # wav2vec2_base_librispeech.yaml model block (95M parameters).
    "base": ModelConfig(
        quantize_targets=True,
        final_dim=256,
        encoder_layerdrop=0.05,
        dropout_input=0.1,
        dropout_features=0.1,
        feature_grad_mult=0.1,
    ),
    # Paper LARGE on LS-960 (317M): group-norm extractor, post-LN; quantizer as the large yaml.
    "large": ModelConfig(
        quantize_targets=True,
        final_dim=768,
        encoder_layers=24,
        encoder_embed_dim=1024,
        encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16,
        encoder_layerdrop=0.2,
        dropout_input=0.1,
        dropout_features=0.1,
        latent_temp=[2.0, 0.1, 0.999995],
    ),
    # wav2vec2_large_librivox.yaml (LV-60k, 317M): layer-norm extractor with bias, pre-LN, no dropout.
    "large_lv60": ModelConfig(
        extractor_mode="layer_norm",
        layer_norm_first=True,
        conv_bias=True,
        quantize_targets=True,
        final_dim=768,
        encoder_layers=24,
        encoder_embed_dim=1024,
        encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16,
        dropout=0.0,
        attention_dropout=0.0,
        latent_temp=[2.0, 0.1, 0.999995],
        normalize=True,
    ),
    # Ours: BASE structure at toy width, fast on a 2-core CPU.
    "tiny": ModelConfig(
        conv_feature_layers=TINY_CONV_LAYERS,
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=2,
        conv_pos=32,
        conv_pos_groups=4,
        quantize_targets=True,
        final_dim=32,
        latent_vars=16,
        num_negatives=20,
        feature_grad_mult=0.1,
    ),
}
