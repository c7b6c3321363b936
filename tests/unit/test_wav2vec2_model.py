"""Structure, determinism and contract of Wav2Vec2Model (fairseq_spec.md §1, §9.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from repro.config import ModelConfig
from repro.losses.contrastive import contrastive_loss
from repro.models.presets import PRESETS
from repro.models.wav2vec2 import Wav2Vec2Model, frame_padding_mask, parse_conv_layers


def tiny(**overrides) -> ModelConfig:
    cfg = OmegaConf.structured(PRESETS["tiny"])
    for key, value in overrides.items():
        cfg[key] = value
    return OmegaConf.to_object(cfg)


def fairseq_base_keys(layers: int) -> set[str]:
    """The state-dict keys of a fairseq wav2vec 2.0 BASE checkpoint (§9.3) with `layers` layers."""
    keys = {
        "mask_emb",
        "post_extract_proj.weight",
        "post_extract_proj.bias",
        "layer_norm.weight",
        "layer_norm.bias",
        "quantizer.vars",
        "quantizer.weight_proj.weight",
        "quantizer.weight_proj.bias",
        "project_q.weight",
        "project_q.bias",
        "final_proj.weight",
        "final_proj.bias",
        "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv.0.weight_v",
        "encoder.pos_conv.0.bias",
        "encoder.layer_norm.weight",
        "encoder.layer_norm.bias",
        "feature_extractor.conv_layers.0.2.weight",
        "feature_extractor.conv_layers.0.2.bias",
    }
    keys |= {f"feature_extractor.conv_layers.{i}.0.weight" for i in range(7)}
    for i in range(layers):
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "self_attn_layer_norm",
            "fc1",
            "fc2",
            "final_layer_norm",
        ):
            keys |= {f"encoder.layers.{i}.{part}.weight", f"encoder.layers.{i}.{part}.bias"}
    return keys


def test_base_state_dict_keys_and_shapes_are_fairseq():
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PRESETS["base"]), {"encoder_layers": 2}))
    model = Wav2Vec2Model(cfg)
    state = model.state_dict()
    assert set(state) == fairseq_base_keys(2)
    assert state["quantizer.vars"].shape == (1, 640, 128)
    assert state["encoder.pos_conv.0.weight_g"].shape == (1, 1, 128)
    assert state["encoder.pos_conv.0.weight_v"].shape == (768, 48, 128)
    assert state["final_proj.weight"].shape == (256, 768) and state["project_q.weight"].shape == (256, 256)
    # init_bert_params on the encoder Linears; mask_emb U[0, 1); pos_conv std sqrt(4 / (K * D)).
    assert abs(state["encoder.layers.0.fc1.weight"].std().item() - 0.02) < 1e-3
    assert state["encoder.layers.0.fc1.bias"].abs().max() == 0
    assert 0 <= state["mask_emb"].min() and state["mask_emb"].max() < 1
    assert abs(state["encoder.pos_conv.0.weight_v"].std().item() - (4 / (128 * 768)) ** 0.5) < 2e-4
    # A fairseq-keyed state dict loads strictly.
    fresh = Wav2Vec2Model(cfg)
    fresh.load_state_dict(state, strict=True)


def test_layer_norm_extractor_keys():
    model = Wav2Vec2Model(tiny(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True))
    keys = set(model.state_dict())
    for i in range(7):
        assert {
            f"feature_extractor.conv_layers.{i}.0.bias",
            f"feature_extractor.conv_layers.{i}.2.1.weight",
        } <= keys


def test_conv_spec_and_frame_padding_rule():
    layers = parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]")
    assert len(layers) == 7 and layers[0] == (512, 10, 5) and layers[-1] == (512, 2, 2)
    with pytest.raises(ValueError, match="conv_feature_layers"):
        parse_conv_layers("__import__('os')")
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 8000:] = True
    frames = frame_padding_mask(padding, 49, layers)
    assert frames[0].sum() == 0 and (~frames[1]).sum() == 24  # 8000 samples -> 24 frames
    assert frame_padding_mask(torch.zeros(2, 16000, dtype=torch.bool), 49, layers) is None


def test_forward_contract_and_replay():
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny()).train()
    source = torch.randn(3, 8000)
    padding = torch.zeros(3, 8000, dtype=torch.bool)
    padding[2, 6000:] = True
    model.set_rng_seed(123)
    torch.manual_seed(1)
    first = model(source, padding)
    k, batch, num = first["x"].shape
    assert (k, batch) == (21, 3) and first["mask_indices"].sum() == 3 * num
    assert first["negative_indices"].shape == (3, num, 20)
    assert not (first["mask_indices"] & first["padding_mask"]).any()
    for key in ("features_pen", "prob_perplexity", "code_perplexity", "num_vars", "temp", "padding_mask"):
        assert key in first
    # Same seed -> same masks and negatives (dropout/gumbel replayed with the torch seed).
    model.set_rng_seed(123)
    torch.manual_seed(1)
    second = model(source, padding)
    assert torch.equal(first["mask_indices"], second["mask_indices"])
    assert torch.equal(first["negative_indices"], second["negative_indices"])
    assert torch.equal(first["x"], second["x"])
    # Replaying a draw explicitly with a different generator state gives the same output too.
    model.set_rng_seed(999)
    torch.manual_seed(1)
    third = model(
        source, padding, mask_indices=first["mask_indices"], negative_indices=first["negative_indices"]
    )
    assert torch.equal(first["x"], third["x"])
    model.set_rng_seed(999)
    fourth = model(source, padding)
    assert not torch.equal(first["mask_indices"], fourth["mask_indices"])


def test_identical_negatives_get_minus_inf_and_logits_are_cosine():
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny(latent_vars=2, latent_groups=1, final_dim=32)).eval()
    out = model(torch.randn(2, 8000))
    logits = out["x"]
    # With 2 codes in 1 group, many negatives share the positive's code -> -inf, never the positive.
    assert torch.isinf(logits[1:]).any() and torch.isfinite(logits[0]).all()
    assert logits[torch.isfinite(logits)].abs().max() <= 1 / 0.1 + 1e-4


def test_feature_grad_mult_and_features_pen():
    torch.manual_seed(0)
    source = torch.randn(2, 8000)
    frozen = Wav2Vec2Model(tiny(feature_grad_mult=0.0)).train()
    loss, _ = contrastive_loss(frozen(source), [0.1, 10])
    loss.backward()
    assert all(p.grad is None for p in frozen.feature_extractor.parameters())
    assert frozen.encoder.layers[0].fc1.weight.grad is not None

    full = Wav2Vec2Model(tiny(feature_grad_mult=1.0)).train()
    scaled = Wav2Vec2Model(tiny(feature_grad_mult=0.1)).train()
    scaled.load_state_dict(full.state_dict())
    grads = []
    for model in (full, scaled):
        model.set_rng_seed(3)
        torch.manual_seed(3)
        out = model(source)
        out["features_pen"].backward()
        conv = model.feature_extractor.conv_layers[0][0].weight.grad
        grads.append(conv.clone())
    assert torch.allclose(grads[1], 0.1 * grads[0], rtol=1e-4, atol=1e-8)


def test_extract_features_layer_and_removal():
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny(encoder_layers=3)).eval()
    source = torch.randn(1, 8000)
    full = model.extract_features(source)
    assert full["x"].shape == (1, 24, 64) and len(full["layer_results"]) == 3
    first = model.extract_features(source, layer=0)
    assert len(first["layer_results"]) == 1 and torch.allclose(first["x"], full["layer_results"][0])
    quantized, codes = model.quantize(source)
    assert quantized.shape == (1, 24, 32) and codes.shape == (1, 24, 2) and codes.max() < 16
    model.remove_pretraining_modules()
    assert model.quantizer is None and model.project_q is None and model.final_proj is None
    assert not any(k.startswith(("quantizer", "project_q", "final_proj")) for k in model.state_dict())


def test_layerdrop_is_seeded():
    model = Wav2Vec2Model(tiny(encoder_layers=8, encoder_layerdrop=0.5)).train()
    model.set_rng_seed(5)
    a = [model.encoder._layers_to_skip() for _ in range(3)]
    model.set_rng_seed(5)
    b = [model.encoder._layers_to_skip() for _ in range(3)]
    assert a == b and any(any(s) for s in a) and not all(all(s) for s in a)
    model.eval()
    assert not any(model.encoder._layers_to_skip())


def test_presets_match_yaml_and_sizes():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    for name, preset in PRESETS.items():
        from_yaml = OmegaConf.merge(
            OmegaConf.structured(ModelConfig), OmegaConf.load(conf / f"wav2vec2_{name}.yaml")
        )
        assert OmegaConf.to_object(from_yaml) == preset, name
    expected_millions = {"base": 95.0, "large": 317.4, "large_lv60": 317.4}
    for name, millions in expected_millions.items():
        with torch.device("meta"):
            model = Wav2Vec2Model(PRESETS[name])
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.5, name
    assert np.isclose(
        sum(p.numel() for p in Wav2Vec2Model(PRESETS["tiny"]).parameters()) / 1e6, 0.17, atol=0.05
    )


def test_seq_len_multiple_padding_is_neutral(monkeypatch):
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny(required_seq_len_multiple=4)).eval()
    source = torch.randn(2, 7000)  # 21 frames: padded to 24 inside the encoder
    padding = torch.zeros(2, 7000, dtype=torch.bool)
    padding[1, 5000:] = True
    plain = model.extract_features(source, padding)
    monkeypatch.setattr(type(model.encoder), "pad_to_required_multiple", True)
    padded = model.extract_features(source, padding)
    assert padded["x"].shape == plain["x"].shape == (2, 21, 64)
    assert torch.allclose(padded["x"], plain["x"], atol=1e-5)
    assert all(a.shape == b.shape for a, b in zip(padded["layer_results"], plain["layer_results"]))


def test_cross_sample_negatives():
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny(cross_sample_negatives=5)).train()
    out = model(torch.randn(2, 8000))
    assert out["x"].shape[0] == 1 + 20 + 5 and out["cross_negative_indices"].shape[-1] == 5
    assert out["cross_negative_indices"].max() < 2 * out["x"].shape[2]
    loss, _ = contrastive_loss(out, [0.1, 10])
    loss.backward()
    assert torch.isfinite(loss)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """fairseq's checkpoint_activations: layers recomputed in the backward pass, dropout replayed."""
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Wav2Vec2Model(tiny(checkpoint_activations=checkpointed, dropout=0.1, attention_dropout=0.1,
                                   activation_dropout=0.1)).train()
        source = torch.randn(2, 8000, generator=torch.Generator().manual_seed(2))
        model.set_rng_seed(5)
        torch.manual_seed(3)
        saved_bytes: list[int] = []

        def pack(tensor: torch.Tensor, sizes: list[int] = saved_bytes) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _ = contrastive_loss(model(source), None)
        loss.backward()
        results[checkpointed] = (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                                 if p.grad is not None}, sum(saved_bytes))
    # the layers keep only their inputs (the tiny model's conv extractor holds most of the rest)
    assert results[True][2] < 0.95 * results[False][2]
    assert torch.equal(results[False][0], results[True][0])
    assert results[False][1].keys() == results[True][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_encoder_matches_eager():
    """torch.compile (aot_eager: the traced graph, no generated kernels) gives the eager features."""
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny()).eval()
    source = torch.randn(2, 6000, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(2, 6000, dtype=torch.bool)
    padding[1, 4000:] = True
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager_out = model.extract_features(source, padding)["x"]
        compiled_out = compiled(source, padding, mask=False, features_only=True)["x"]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)


def test_attention_gets_no_mask_unless_a_row_is_padded(monkeypatch):
    """An unpadded batch reaches scaled_dot_product_attention without a mask, so a GPU can use its flash
    or memory-efficient kernel; only a padded batch brings a key mask."""
    import torch.nn.functional as F

    seen = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = Wav2Vec2Model(tiny()).eval()
    source = torch.randn(2, 6000)
    with torch.no_grad():
        model.extract_features(source, None)
        assert seen and all(mask is None for mask in seen)
        seen.clear()
        padding = torch.zeros(2, 6000, dtype=torch.bool)
        model.extract_features(source, padding)  # a mask of all False is no padding either
        assert seen and all(mask is None for mask in seen)
        seen.clear()
        padding[1, 4000:] = True
        model.extract_features(source, padding)
        assert seen and all(mask is not None for mask in seen)


def test_positional_conv_weight_is_cached_only_without_autograd_and_refreshed_when_changed():
    from repro.models.wav2vec2 import WeightNormConv1d

    torch.manual_seed(0)
    conv = WeightNormConv1d(16, 4, groups=2).eval()
    x = torch.randn(2, 16, 11)
    with torch.enable_grad():
        reference = conv(x)
    assert conv._inference_weight is None  # autograd on: never cached
    with torch.inference_mode():
        assert torch.equal(conv(x), reference)  # the same expression: bit-equal
        cached = conv._inference_weight[1]
        assert torch.equal(conv(x), reference) and conv._inference_weight[1] is cached  # reused
    with torch.no_grad():
        conv.weight_g.mul_(2.0)  # an in-place change (optimizer step, load_state_dict) invalidates it
        changed = conv(x)
    assert conv._inference_weight[1] is not cached
    with torch.enable_grad():
        assert torch.equal(changed, conv(x)) and not torch.equal(changed, reference)
    state = {key: value.clone() for key, value in conv.state_dict().items()}
    state["weight_v"].mul_(-1.0)
    conv.load_state_dict(state)  # copies into the parameters in place
    with torch.no_grad():
        loaded = conv(x)
    with torch.enable_grad():
        assert torch.equal(loaded, conv(x)) and not torch.equal(loaded, changed)
