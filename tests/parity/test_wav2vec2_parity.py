"""Parity of our wav2vec 2.0 with torchaudio's and HF transformers' implementations.

Same random weights (our state dict = fairseq keys, mapped per fairseq_spec.md §9.4/§9.5), float32, eval
mode unless stated; every Transformer layer's output must agree within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import w2v_refs
from transformers import Wav2Vec2ForCTC as HFForCTC
from transformers import Wav2Vec2ForPreTraining as HFForPreTraining
from transformers import Wav2Vec2Model as HFModel
from w2v_refs import max_diff_valid, waveforms

from repro.config import ModelConfig
from repro.losses.contrastive import contrastive_loss
from repro.losses.ctc import ctc_loss
from repro.models.ctc import Wav2Vec2CTC
from repro.models.wav2vec2 import Wav2Vec2Model

TOL = 1e-4
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0)

# Real widths, two layers (the per-layer computation is what is compared).
STYLES = {
    "base": ModelConfig(encoder_layers=2, **NO_DROPOUT),
    "large": ModelConfig(
        encoder_layers=2,
        encoder_embed_dim=1024,
        encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16,
        **NO_DROPOUT,
    ),
    "large_lv60": ModelConfig(
        encoder_layers=2,
        encoder_embed_dim=1024,
        encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16,
        extractor_mode="layer_norm",
        layer_norm_first=True,
        conv_bias=True,
        **NO_DROPOUT,
    ),
}
SMALL_CONV = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"


def small_cfg(**overrides) -> ModelConfig:
    base = dict(
        conv_feature_layers=SMALL_CONV,
        encoder_layers=2,
        encoder_embed_dim=48,
        encoder_ffn_embed_dim=96,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
        quantize_targets=True,
        final_dim=24,
        latent_vars=8,
        num_negatives=7,
        feature_grad_mult=1.0,
        **NO_DROPOUT,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(scope="module", params=list(STYLES))
def style_models(request):
    """Our model with random weights and both references loaded with the same weights (built once)."""
    torch.manual_seed(0)
    cfg = STYLES[request.param]
    ours = Wav2Vec2Model(cfg).eval()
    # Non-trivial norms/biases so that the mapping of every tensor is exercised.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        torchaudio_model = w2v_refs.build_torchaudio(cfg)
        hf_model = HFModel(w2v_refs.hf_config(cfg))
    torchaudio_model.load_state_dict(
        w2v_refs.to_torchaudio_state(ours.state_dict()), strict=True, assign=True
    )
    hf_model.load_state_dict(w2v_refs.to_hf_state(ours.state_dict()), strict=True, assign=True)
    return cfg, ours, torchaudio_model.eval(), hf_model.eval()


LENGTHS = pytest.mark.parametrize("lengths", [[4000, 4000], [4000, 2700]], ids=["no_padding", "padding"])


@LENGTHS
def test_layers_match_torchaudio(style_models, lengths):
    cfg, ours, reference, _ = style_models
    source, padding = waveforms(lengths)
    with torch.no_grad():
        out = ours.extract_features(source, padding)
        ref_layers, _ = reference.extract_features(source, torch.tensor(lengths))
        ref_final, _ = reference(source, torch.tensor(lengths))
    assert len(out["layer_results"]) == len(ref_layers) == cfg.encoder_layers
    for ours_layer, ref_layer in zip(out["layer_results"], ref_layers):
        assert max_diff_valid(ours_layer, ref_layer, out["padding_mask"]) <= TOL
    assert max_diff_valid(out["x"], ref_final, out["padding_mask"]) <= TOL


@LENGTHS
def test_layers_match_hf(style_models, lengths):
    cfg, ours, _, reference = style_models
    source, padding = waveforms(lengths)
    attention_mask = None if padding is None else (~padding).long()
    with torch.no_grad():
        out = ours.extract_features(source, padding)
        ref = reference(source, attention_mask=attention_mask, output_hidden_states=True)
    ref_layers = ref.hidden_states[1:]  # [0] is the encoder input
    assert len(ref_layers) == len(out["layer_results"]) == cfg.encoder_layers
    for ours_layer, ref_layer in zip(out["layer_results"][:-1], ref_layers[:-1]):
        assert max_diff_valid(ours_layer, ref_layer, out["padding_mask"]) <= TOL
    # HF's last hidden state of pre-LN models includes the encoder layer norm.
    assert max_diff_valid(out["x"], ref.last_hidden_state, out["padding_mask"]) <= TOL


def test_ctc_matches_hf_logits_and_loss():
    torch.manual_seed(1)
    vocab = 12
    ft = small_cfg(_name="wav2vec_ctc", quantize_targets=False)
    ours = Wav2Vec2CTC(ft, vocab).eval()
    reference = HFForCTC(
        w2v_refs.hf_config(ft, vocab_size=vocab, ctc_loss_reduction="sum", ctc_zero_infinity=True)
    )
    reference.load_state_dict(w2v_refs.to_hf_state(ours.state_dict(), head="ctc"), strict=True)
    reference.eval()
    lengths = [8000, 5200]
    source, padding = waveforms(lengths, seed=3)
    targets = torch.tensor([[5, 6, 4, 7, 8, 9], [10, 4, 11, 1, 1, 1]])  # pad = 1
    hf_labels = targets.masked_fill(targets == 1, -100)
    with torch.no_grad():
        logits, frame_padding = ours(source, padding)
        ref = reference(source, attention_mask=(~padding).long(), labels=hf_labels)
        loss, logs = ctc_loss(logits, frame_padding, targets, torch.tensor([6, 3]))
    assert frame_padding is not None and bool(frame_padding[1].any()) and not bool(frame_padding[0].any())
    assert max_diff_valid(logits, ref.logits, frame_padding) <= TOL
    # Padded frames are forced to blank (fairseq HEAD get_logits).
    assert torch.all(logits[frame_padding][:, 0] == 0) and torch.all(
        logits[frame_padding][:, 1:] == float("-inf")
    )
    assert abs(loss.item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item()))
    assert logs["sample_size"] == 2 and logs["ntokens"] == 9


def _deterministic_gumbel(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    """Noise-free stand-in for F.gumbel_softmax so both models pick the same codes (exact one-hot)."""
    soft = torch.softmax(logits / tau, dim=dim)
    index = soft.argmax(dim, keepdim=True)
    hard_one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard_one_hot + (soft - soft.detach())


def _to_hf_negatives(mask: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Our row-local (B, M, K) indices over masked frames -> HF's flat (B, T, K) frame indices."""
    batch, frames = mask.shape
    out = (torch.arange(batch * frames).view(batch, frames, 1)).repeat(1, 1, negatives.size(-1))
    for row in range(batch):
        positions = mask[row].nonzero().squeeze(1)
        out[row, positions] = row * frames + positions[negatives[row]]
    return out


def test_pretraining_loss_and_gradients_match_hf(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", _deterministic_gumbel)
    torch.manual_seed(2)
    cfg = small_cfg()
    ours = Wav2Vec2Model(cfg).train()
    reference = HFForPreTraining(w2v_refs.hf_config(cfg)).train()
    reference.load_state_dict(w2v_refs.to_hf_state(ours.state_dict(), head="pretraining"), strict=True)
    ours.set_num_updates(1000)
    reference.set_gumbel_temperature(ours.quantizer.curr_temp)

    source, _ = waveforms([8000, 8000, 8000], seed=5)
    ours.set_rng_seed(11)
    batch, frames = 3, int(ours.feature_lengths(torch.tensor(8000)))
    mask = torch.from_numpy(ours.compute_time_mask((batch, frames), None))
    num_masked = int(mask[0].sum())
    negatives = torch.randint(0, num_masked, (batch, num_masked, cfg.num_negatives))
    negatives[0, :, 0] = negatives[0, :, 1]  # repeated draws are allowed (with replacement)

    conv_outputs = {}

    def keep_grad(name):
        def hook(module, inputs, output):
            output.retain_grad()
            conv_outputs[name] = output

        return hook

    ours.feature_extractor.register_forward_hook(keep_grad("ours"))
    reference.wav2vec2.feature_extractor.register_forward_hook(keep_grad("hf"))

    out = ours(source, mask_indices=mask, negative_indices=negatives)
    loss, logs = contrastive_loss(out, loss_weights=[0.1, 0.0])
    ref = reference(
        source, mask_time_indices=mask, sampled_negative_indices=_to_hf_negatives(mask, negatives)
    )
    assert abs(logs["loss_0"] - ref.contrastive_loss.item()) <= 1e-4 * abs(ref.contrastive_loss.item())
    assert abs(logs["loss_1"] - 0.1 * ref.diversity_loss.item()) <= 1e-4 * max(
        1.0, abs(ref.diversity_loss.item())
    )
    assert abs(loss.item() - ref.loss.item()) <= 1e-4 * abs(ref.loss.item())
    assert abs(out["prob_perplexity"].item() - ref.codevector_perplexity.item()) <= 1e-3

    loss.backward()
    ref.loss.backward()
    grad_ours, grad_ref = conv_outputs["ours"].grad, conv_outputs["hf"].grad
    scale = grad_ref.abs().max().item()
    assert scale > 0
    assert (grad_ours - grad_ref).abs().max().item() <= 1e-4 * scale
    hf_params = dict(reference.named_parameters())
    mapping = w2v_refs.to_hf_state({k: p for k, p in ours.named_parameters()}, head="pretraining")
    for hf_name, ours_param in mapping.items():
        ref_grad = hf_params[hf_name].grad
        if ours_param.grad is None:
            assert ref_grad is None or ref_grad.abs().max() == 0, hf_name
            continue
        tol = 1e-4 * max(ref_grad.abs().max().item(), 1e-3)
        assert (ours_param.grad - ref_grad).abs().max().item() <= tol, hf_name
