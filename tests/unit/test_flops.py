"""The FLOP count behind the GPU benchmark's MFU (benchmarks/flops.py), checked by hand on a tiny shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.flops import conv_frames, forward_flops, peak_flops, training_flops

TINY = SimpleNamespace(conv_feature_layers="[(4, 10, 5), (8, 3, 2)]", encoder_embed_dim=16,
                       encoder_ffn_embed_dim=32, encoder_layers=2, conv_pos=4, conv_pos_groups=2)


def test_frames_follow_the_conv_arithmetic():
    assert conv_frames([(4, 10, 5), (8, 3, 2)], 105) == [20, 9]
    # BASE's extractor: 1 s of audio -> 49 frames (fairseq's 20 ms stride, 25 ms receptive field)
    base = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert conv_frames(base, 16_000)[-1] == 49


def test_forward_and_training_flops_by_hand():
    parts = forward_flops(TINY, 105, vocab_size=10)
    assert parts["feature_encoder"] == 2 * 1 * 4 * 10 * 20 + 2 * 4 * 8 * 3 * 9
    assert parts["feature_projection"] == 2 * 8 * 16 * 9
    assert parts["positional_conv"] == 2 * 16 * 8 * 4 * 9
    per_layer = 2 * 9 * (4 * 16 * 16 + 2 * 16 * 32) + 4 * 9 * 9 * 16
    assert parts["transformer"] == 2 * per_layer
    assert parts["ctc_head"] == 2 * 16 * 10 * 9
    # backward = 2x forward everywhere, except the waveform's gradient (first conv input)
    expected = 3 * (3328 + 2304 + 9216 + 2 * per_layer + 2880) - 1600
    assert training_flops(TINY, 105, vocab_size=10) == pytest.approx(expected)
    frozen = training_flops(TINY, 105, vocab_size=10, feature_encoder_frozen=True)
    assert frozen == pytest.approx(expected - (2 * 3328 - 1600))


def test_peak_table():
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_flops("cpu", "fp32") is None
