"""Model FLOPs of wav2vec 2.0 per utterance, for model-FLOPs utilisation (MFU) in the GPU benchmark.

Counted as 2 FLOPs per multiply-accumulate of the matrix products (everything else - norms,
activations, softmax, the Gumbel quantizer, the contrastive head - is a few percent and left out,
as MFU conventions do). For one utterance of S samples whose feature encoder yields T frames:

    conv feature encoder   sum over layers l:  2 * C_in(l) * C_out(l) * kernel(l) * T_out(l)
    feature projection     2 * C_last * D * T
    positional conv        2 * D * (D / groups) * kernel_pos * T
    per Transformer layer  2 * T * (4 * D^2 + 2 * D * F)      (q, k, v, out projections; fc1, fc2)
                         + 2 * 2 * T^2 * D                    (Q K^T and attention x V)
    CTC head (fine-tune)   2 * D * V * T

A training step costs 3x the forward (the backward computes gradients for inputs and weights),
except the first conv layer, whose input (the waveform) needs no gradient, and any frozen part.
"""

from __future__ import annotations

from typing import Any

from repro.models.wav2vec2 import parse_conv_layers


def conv_frames(conv_layers: list[tuple[int, int, int]], samples: int) -> list[int]:
    """Output length of every conv layer (no padding, fairseq's extractor)."""
    lengths = []
    length = samples
    for _, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1
        lengths.append(length)
    return lengths


def forward_flops(cfg: Any, samples: int, vocab_size: int = 0) -> dict[str, float]:
    """Forward FLOPs of one utterance, by part (see the module docstring for the formula)."""
    conv_layers = parse_conv_layers(cfg.conv_feature_layers)
    lengths = conv_frames(conv_layers, samples)
    frames = lengths[-1]
    conv = 0.0
    in_channels = 1
    for (channels, kernel, _), length in zip(conv_layers, lengths):
        conv += 2.0 * in_channels * channels * kernel * length
        in_channels = channels
    dim, ffn = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    parts = {
        "feature_encoder": conv,
        "feature_projection": 2.0 * in_channels * dim * frames,
        "positional_conv": 2.0 * dim * (dim / cfg.conv_pos_groups) * cfg.conv_pos * frames,
        "transformer": cfg.encoder_layers * (2.0 * frames * (4 * dim * dim + 2 * dim * ffn)
                                             + 4.0 * frames * frames * dim),
        "ctc_head": 2.0 * dim * vocab_size * frames,
    }
    first_conv = 2.0 * 1 * conv_layers[0][0] * conv_layers[0][1] * lengths[0]
    parts["first_conv"] = first_conv  # part of feature_encoder; listed for the backward count
    return parts


def training_flops(cfg: Any, samples: int, vocab_size: int = 0, feature_encoder_frozen: bool = False) -> float:
    """Forward + backward FLOPs of one utterance (3x forward; see the module docstring)."""
    parts = forward_flops(cfg, samples, vocab_size)
    total = 0.0
    for name, value in parts.items():
        if name == "first_conv":
            continue
        if name == "feature_encoder":
            if feature_encoder_frozen:  # forward only
                total += value
            else:  # the first layer's input gradient is never needed
                total += 3.0 * value - parts["first_conv"]
            continue
        total += 3.0 * value
    return total


# Dense peak throughput (FLOP/s) of the tensor cores by device name and dtype, from the vendors' sheets.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype`, or None when the device is not in the table."""
    for key, table in PEAK_FLOPS.items():
        if key in device_name.upper():
            return table.get(dtype)
    return None
