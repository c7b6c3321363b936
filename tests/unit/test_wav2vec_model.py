"""wav2vec / vq-wav2vec model, quantizers and BCE criterion against fairseq's code as it is written.

There is no torchaudio or HF implementation of these models, so the references below are computed in
the tests from fairseq's formulas; each test names the fairseq lines it checks
(fairseq/models/wav2vec/wav2vec.py = W, fairseq/criterions/wav2vec_criterion.py = C,
fairseq/modules/{gumbel,kmeans}_vector_quantizer.py = G / K).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from repro.config import Wav2VecConfig
from repro.losses.contrastive import binary_contrastive_loss
from repro.models.quantizers import GumbelVectorQuantizer, KmeansVectorQuantizer
from repro.models.wav2vec import (
    Wav2VecModel,
    auto_offset,
    receptive_field,
    sample_negatives,
)
from repro.models.wav2vec2 import conv_output_lengths, parse_conv_layers

README_V1_FEATURES = "[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), (512, 1, 1)]"
README_VQ_FEATURES = README_V1_FEATURES[:-1] + ", (512, 1, 1)]"
README_AGGREGATOR = "[" + ", ".join(f"(512, {k}, 1)" for k in range(2, 14)) + "]"


def tiny(**overrides) -> Wav2VecConfig:
    values = dict(conv_feature_layers="[(16, 10, 5), (16, 8, 4), (16, 4, 2)]",
                  conv_aggregator_layers="[(16, 2, 1), (24, 3, 1)]", skip_connections_agg=True,
                  num_negatives=4, prediction_steps=3, log_compression=True)
    values.update(overrides)
    return Wav2VecConfig(**values)


# --- receptive field, offset, shapes -----------------------------------------------------------


def test_receptive_field_and_auto_offset_of_both_readme_stacks():
    # W l.226-237: rin = k first, rin += (k-1)*jin; jin = product of strides; offset = ceil(rin / jin)
    for stack in (README_V1_FEATURES, README_VQ_FEATURES):
        layers = parse_conv_layers(stack)
        assert receptive_field(layers) == (465, 160)
        assert auto_offset(layers) == 3
    assert auto_offset(parse_conv_layers("[(8, 4, 2), (8, 4, 2)]")) == math.ceil(10 / 4)


def test_readme_vq_model_gives_60_frames_for_10000_samples_and_codes_per_group():
    # The README's usage: 10000 samples -> idxs (1, 60, 2)
    torch.manual_seed(0)
    cfg = Wav2VecConfig(conv_feature_layers=README_VQ_FEATURES, conv_aggregator_layers=README_AGGREGATOR,
                        activation="gelu", skip_connections_agg=True, vq_type="gumbel", vq_groups=2, vq_depth=2,
                        combine_groups=True, vq_vars=320, num_negatives=10)
    model = Wav2VecModel(cfg).eval()
    assert model.offset == 3
    wav = torch.randn(1, 10000)
    with torch.no_grad():
        z = model.feature_extractor(wav)
        c = model.feature_aggregator(z)
        quantized, idxs = model.vector_quantizer.forward_idx(z)
    assert z.shape == (1, 512, 60) and c.shape == (1, 512, 60) and quantized.shape == (1, 512, 60)
    assert int(conv_output_lengths(torch.tensor([10000]), model.conv_layers_spec)) == 60
    assert idxs.shape == (1, 60, 2) and idxs.dtype == torch.long
    assert 0 <= int(idxs.min()) and int(idxs.max()) < 320
    # the quantized frame is the concatenation of the indexed code vectors of each group (G l.190-205)
    codebook = model.vector_quantizer.codebook()  # (G, V, d), shared: combine_groups
    expected = torch.cat([codebook[g][idxs[0, :, g]] for g in range(2)], dim=-1).T
    torch.testing.assert_close(quantized[0], expected)


def test_feature_extractor_block_layout_group_norm_and_log_compression():
    torch.manual_seed(0)
    model = Wav2VecModel(tiny(log_compression=True)).eval()
    block = model.feature_extractor.conv_layers[0]
    assert block[0].bias is None and block[2].num_groups == 1  # one group: channels and time together
    wav = torch.randn(2, 800)
    x = wav.unsqueeze(1)
    for conv_block in model.feature_extractor.conv_layers:
        conv = conv_block[0](x)
        mean = conv.mean(dim=(1, 2), keepdim=True)
        var = conv.var(dim=(1, 2), unbiased=False, keepdim=True)
        normed = (conv - mean) / torch.sqrt(var + 1e-5) * conv_block[2].weight[None, :, None] \
            + conv_block[2].bias[None, :, None]
        x = torch.relu(normed)
    torch.testing.assert_close(model.feature_extractor(wav), torch.log(x.abs() + 1), atol=1e-5, rtol=1e-5)


def test_aggregator_is_causal_replicate_padded_with_scaled_residuals():
    torch.manual_seed(0)
    model = Wav2VecModel(tiny()).eval()
    aggregator = model.feature_aggregator
    z = torch.randn(1, 16, 20)
    c = aggregator(z)
    # the convolutions are causal: frames after t do not reach conv output t (the one-group GroupNorm
    # after them takes its statistics over the whole utterance, as fairseq's, so c_t itself is not)
    block = aggregator.conv_layers[0]
    changed = z.clone()
    changed[..., 12:] += 5.0
    torch.testing.assert_close(block[1](block[0](z))[..., :12], block[1](block[0](changed))[..., :12])
    # layer 0 by hand (W l.439-486): replicate the first frame k-1 times, conv, GroupNorm(1), ReLU,
    # then (x + r) * sqrt(0.5); layer 1 widens 16 -> 24 so its residual goes through the 1x1 projection
    padded = torch.cat([z[..., :1], z], dim=-1)  # k = 2
    layer0 = (torch.relu(block[3](block[1](padded))) + z) * math.sqrt(0.5)
    assert aggregator.residual_proj[0] is None and aggregator.residual_proj[1] is not None
    block1 = aggregator.conv_layers[1]
    padded1 = torch.cat([layer0[..., :1], layer0[..., :1], layer0], dim=-1)  # k = 3
    layer1 = (torch.relu(block1[3](block1[1](padded1))) + aggregator.residual_proj[1](layer0)) * math.sqrt(0.5)
    torch.testing.assert_close(c, layer1, atol=1e-5, rtol=1e-5)


# --- negatives ---------------------------------------------------------------------------------


def fairseq_sample_negatives(batch: int, frames: int, num: int, generator: torch.Generator) -> torch.Tensor:
    """W l.534-571 (`sample_negatives`, n_negatives > 0, no cross-sampling), without the row offsets
    `+ i * high` (ours are row-local), returned (B, K, T) as the final view reads them."""
    torch.randint(low=0, high=frames, size=(batch, num * frames), generator=generator)
    tszs = torch.arange(frames).unsqueeze(-1).expand(-1, num).flatten()
    neg_idxs = torch.randint(low=0, high=frames - 1, size=(batch, num * frames), generator=generator)
    neg_idxs[neg_idxs >= tszs] += 1
    # negs = y[..., neg_idxs.view(-1)].view(fsz, bsz, num, tsz): per row, position p -> (p // T, p % T)
    return neg_idxs.view(batch, num, frames)


def test_faithful_negatives_replay_fairseq_including_its_quirk():
    ours = sample_negatives(3, 50, 10, torch.Generator().manual_seed(7), as_fairseq=True)
    reference = fairseq_sample_negatives(3, 50, 10, torch.Generator().manual_seed(7))
    assert torch.equal(ours, reference)
    # the quirk: a share of about 1/(T-1) of the negatives is the positive frame itself
    frames = 40
    many = sample_negatives(64, frames, 10, torch.Generator().manual_seed(1), as_fairseq=True)
    share = (many == torch.arange(frames).view(1, 1, frames)).float().mean().item()
    assert 0.5 / (frames - 1) < share < 1.5 / (frames - 1)


def test_corrected_negatives_never_equal_the_positive_and_cover_other_frames():
    frames = 40
    negatives = sample_negatives(64, frames, 10, torch.Generator().manual_seed(1), as_fairseq=False)
    assert negatives.shape == (64, 10, frames)
    assert not (negatives == torch.arange(frames).view(1, 1, frames)).any()
    assert int(negatives.min()) == 0 and int(negatives.max()) == frames - 1


def test_model_uses_the_configured_sampling():
    torch.manual_seed(0)
    wav = torch.randn(2, 3000)
    for faithful in (True, False):
        model = Wav2VecModel(tiny(negatives_as_fairseq=faithful)).eval()
        model.set_rng_seed(3)
        replay = torch.Generator()
        replay.set_state(model.negatives_rng.get_state())
        negatives = model(wav)["negative_indices"]
        batch, num, frames = negatives.shape
        assert num == 4 and frames == model.feature_extractor(wav).size(-1)
        assert torch.equal(negatives, sample_negatives(batch, frames, num, replay, as_fairseq=faithful))


# --- predictions and the BCE criterion ---------------------------------------------------------


def test_step_scores_are_dot_products_with_shifted_targets_and_sample_size_counts_positives():
    torch.manual_seed(0)
    model = Wav2VecModel(tiny(vq_type="none")).eval()
    wav = torch.randn(2, 3000)
    out = model(wav)
    z = model.feature_extractor(wav)
    c = model.feature_aggregator(z)
    frames = z.size(-1)
    steps = out["cpc_logits"]
    assert len(steps) == min(3, frames - model.offset)
    heads = model.wav2vec_predictions.project_to_steps(c.unsqueeze(-1))  # (B, C, T, S)
    negatives = out["negative_indices"]
    for step, scores in enumerate(steps):
        shift = model.offset + step
        assert scores.shape == (1 + 4, 2, frames - shift)
        b, t, k = 1, 2, 3
        prediction = heads[b, :, t, step]
        torch.testing.assert_close(scores[0, b, t], prediction @ z[b, :, t + shift])
        negative_frame = int(negatives[b, k, t + shift])
        torch.testing.assert_close(scores[1 + k, b, t], prediction @ z[b, :, negative_frame])
    _, logs = binary_contrastive_loss(out, None)
    # C l.88: sample_size = number of positives = B x sum over steps of (T - offset - step)
    assert logs["sample_size"] == 2 * sum(frames - model.offset - s for s in range(len(steps)))


def test_bce_equals_a_hand_computation_on_a_tiny_case():
    # C l.67-70: binary_cross_entropy_with_logits(..., reduction="sum"); labels 1 for the positive block
    step0 = torch.tensor([[[2.0, -1.0]], [[0.5, 3.0]], [[-2.0, 0.0]]])  # (1+K=3, B=1, T'=2)
    step1 = torch.tensor([[[1.0]], [[1.0]], [[4.0]]])  # (3, 1, 1)

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    positives = [2.0, -1.0, 1.0]
    negatives = [0.5, 3.0, -2.0, 0.0, 1.0, 4.0]
    expected = sum(softplus(-p) for p in positives) + sum(softplus(n) for n in negatives)
    loss, logs = binary_contrastive_loss({"cpc_logits": [step0, step1]}, None)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert logs["sample_size"] == 3 and logs["nsentences"] == 1
    # ours: a prediction is right when its positive beats all negatives (t=0 of step 0 only)
    assert logs["correct"] == 1 and logs["count"] == 3
    balanced, _ = binary_contrastive_loss({"cpc_logits": [step0, step1]}, None, balanced_classes=True)
    expected_balanced = sum(softplus(-p) for p in positives) + sum(softplus(n) for n in negatives) / 2
    assert math.isclose(float(balanced), expected_balanced, rel_tol=1e-6)


def test_extra_losses_only_with_loss_weights_as_fairseq():
    scores = [torch.zeros(3, 2, 5)]
    gumbel = {"cpc_logits": scores, "prob_perplexity": torch.tensor(100.0), "num_vars": 640,
              "code_perplexity": torch.tensor(50.0), "temp": 1.5}
    plain_loss, logs = binary_contrastive_loss(gumbel, None)  # README gumbel: no --loss-weights
    assert "loss_1" not in logs and logs["prob_perplexity"] == 100.0 and logs["temp"] == 1.5
    weighted, logs = binary_contrastive_loss(gumbel, [1.0])
    # W get_extra_losses: num_vars - prob_perplexity (not normalized), times coef and sample_size (C l.98)
    assert math.isclose(float(weighted - plain_loss), (640 - 100) * 10, rel_tol=1e-6)
    kmeans = {"cpc_logits": scores, "kmeans_loss": torch.tensor(0.2), "num_vars": 320}
    with_kmeans, logs = binary_contrastive_loss(kmeans, [1.0])  # README k-means: --loss-weights [1]
    assert math.isclose(float(with_kmeans - plain_loss), 0.2 * 10, rel_tol=1e-5)
    assert math.isclose(logs["loss_1"], 2.0, rel_tol=1e-5) and logs["kmeans_loss"] == pytest.approx(0.2)


# --- quantizers --------------------------------------------------------------------------------


def test_gumbel_temperature_follows_the_schedule_through_the_model():
    model = Wav2VecModel(tiny(vq_type="gumbel", vq_temp=[2.0, 0.5, 0.999995], combine_groups=True, vq_depth=2))
    for updates in (0, 1, 10_000, 300_000, 2_000_000):
        model.set_num_updates(updates)
        assert model.vector_quantizer.curr_temp == max(2.0 * 0.999995**updates, 0.5)
    assert isinstance(model.vector_quantizer, GumbelVectorQuantizer)


def test_kmeans_straight_through_gradient_reaches_the_encoder_and_loss_value():
    torch.manual_seed(0)
    model = Wav2VecModel(tiny(vq_type="kmeans", vq_groups=2, vq_vars=8, combine_groups=False))
    quantizer = model.vector_quantizer
    assert isinstance(quantizer, KmeansVectorQuantizer)
    assert quantizer.embedding.shape == (8, 2, 8)
    wav = torch.randn(2, 3000)
    z = model.feature_extractor(wav)
    result = quantizer(z, produce_targets=True)
    ze = quantizer.projection(z)
    codes = result["targets"]  # (B, T, G): nearest code vector per group (K l.83-92)
    points = ze.view(2, 2, 8, -1).permute(0, 3, 1, 2)  # (B, T, G, d)
    distances = (points.unsqueeze(-2) - quantizer.embedding.transpose(0, 1)).norm(dim=-1)  # (B, T, G, V)
    assert torch.equal(codes, distances.argmin(-1))
    zq = torch.stack([quantizer.embedding[codes[..., g], g] for g in range(2)], dim=-2).reshape(2, -1, 16)
    torch.testing.assert_close(result["x"], zq.transpose(1, 2))  # forward value: zq
    # K l.118-122: latent + gamma * commitment = (1 + gamma) * MSE(ze, zq) in value
    expected = (1 + 0.25) * F.mse_loss(ze, zq.transpose(1, 2))
    torch.testing.assert_close(result["kmeans_loss"], expected)
    # straight-through: d out / d ze = identity, so the encoder gets the gradient of the output
    model.zero_grad()
    (result["x"] * torch.randn_like(result["x"])).sum().backward()
    assert model.feature_extractor.conv_layers[0][0].weight.grad.abs().sum() > 0
    assert quantizer.projection[0].weight.grad.abs().sum() > 0
    assert quantizer.embedding.grad is None or quantizer.embedding.grad.abs().sum() == 0  # only via kmeans_loss
    model.zero_grad()
    quantizer(z.detach())["kmeans_loss"].backward()
    assert quantizer.embedding.grad.abs().sum() > 0


def test_forward_idx_codes_index_the_codebook_for_both_quantizers():
    torch.manual_seed(0)
    for vq_type in ("gumbel", "kmeans"):
        model = Wav2VecModel(tiny(vq_type=vq_type, vq_vars=6, combine_groups=True)).eval()
        z = model.feature_extractor(torch.randn(3, 2000))
        quantized, idxs = model.vector_quantizer.forward_idx(z)
        assert idxs.shape == (3, z.size(-1), 2) and int(idxs.max()) < 6
        codebook = model.vector_quantizer.codebook()
        rebuilt = torch.cat([codebook[g][idxs[..., g]] for g in range(2)], dim=-1).transpose(1, 2)
        torch.testing.assert_close(quantized, rebuilt)


def test_config_defaults_are_the_2019_ones():
    # fairseq 3335de5f base_wav2vec_architecture (the code that trained the released files)
    cfg = Wav2VecConfig()
    assert cfg.num_negatives == 1 and not cfg.skip_connections_agg and not cfg.log_compression
    assert cfg.conv_aggregator_layers == "[(512, 3, 1)] * 9" and cfg.offset == "auto"
    assert dataclasses.asdict(cfg)["vq_temp"] == [2.0, 0.5, 0.999995]


def test_bad_configs_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="model.aggregator"):
        Wav2VecModel(tiny(aggregator="gru"))
    with pytest.raises(ValueError, match="model.vq_type"):
        Wav2VecModel(tiny(vq_type="rvq"))
    with pytest.raises(ValueError, match="model.offset"):
        Wav2VecModel(tiny(offset="soon"))


@pytest.mark.parametrize("vq_type", ["none", "gumbel", "kmeans"])
def test_padded_batch_extraction_equals_each_file_alone(vq_type: str):
    # the one-group GroupNorms see the whole utterance: a padded batch is exact only because their
    # statistics skip the padding (Wav2VecModel.extract); checked against running each file alone
    torch.manual_seed(0)
    model = Wav2VecModel(tiny(vq_type=vq_type, vq_vars=6, combine_groups=vq_type == "gumbel")).eval()
    lengths = [3000, 2200, 1700]
    waves = [torch.randn(n) for n in lengths]
    batch = torch.zeros(3, max(lengths))
    for row, wave in enumerate(waves):
        batch[row, : len(wave)] = wave
    out = model.extract(batch, torch.tensor(lengths), codes=vq_type != "none")
    for row, wave in enumerate(waves):
        with torch.no_grad():
            z = model.feature_extractor(wave[None])
            alone_codes = None
            if model.vector_quantizer is not None:
                z, alone_codes = model.vector_quantizer.forward_idx(z)
            c = model.feature_aggregator(z)
        frames = int(out["frames"][row])
        assert frames == z.size(-1)
        torch.testing.assert_close(out["z"][row, :, :frames], z[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["c"][row, :, :frames], c[0], atol=1e-5, rtol=1e-4)
        if alone_codes is not None:
            assert torch.equal(out["codes"][row, :frames], alone_codes[0])
