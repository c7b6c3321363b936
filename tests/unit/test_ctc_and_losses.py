"""CTC model, CTC loss and the contrastive criterion (fairseq_spec.md §2, §3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from repro.config import ModelConfig
from repro.losses.contrastive import contrastive_loss
from repro.losses.ctc import ctc_loss
from repro.models.ctc import Wav2Vec2CTC, merge_finetune_config
from repro.models.presets import PRESETS
from repro.models.wav2vec2 import Wav2Vec2Model


def tiny(**overrides) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PRESETS["tiny"]), overrides))


def finetune_cfg(**overrides) -> ModelConfig:
    values = dict(
        _name="wav2vec_ctc",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.1,
        dropout_input=0.0,
        mask_prob=0.5,
        mask_channel_prob=0.25,
        mask_channel_length=8,
        layerdrop=0.1,
        feature_grad_mult=0.0,
        apply_mask=True,
        final_dropout=0.0,
        freeze_finetune_updates=5,
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_from_pretrained_applies_overrides_and_drops_pretraining_keys():
    torch.manual_seed(0)
    pre_cfg = tiny(dropout_input=0.1, encoder_layerdrop=0.05)
    pretrained = Wav2Vec2Model(pre_cfg)
    model = Wav2Vec2CTC.from_pretrained(pretrained, pre_cfg, finetune_cfg(), vocab_size=10)
    merged = model.cfg
    assert (
        merged.encoder_layerdrop == 0.1 and merged.dropout_input == 0.0 and merged.activation_dropout == 0.1
    )
    assert merged.mask_prob == 0.5 and merged.feature_grad_mult == 0.0
    assert merged.encoder_embed_dim == 64 and merged.conv_feature_layers == pre_cfg.conv_feature_layers
    keys = set(model.state_dict())
    assert "w2v_encoder.proj.weight" in keys and "w2v_encoder.w2v_model.mask_emb" in keys
    assert not any(".quantizer." in k or ".project_q." in k or ".final_proj." in k for k in keys)
    for key, value in pretrained.state_dict().items():
        if not key.startswith(("quantizer", "project_q", "final_proj")):
            assert torch.equal(model.state_dict()["w2v_encoder.w2v_model." + key], value)
    assert model.w2v_encoder.proj.bias.abs().max() == 0
    # A fine-tuned state dict (fairseq keys) loads strictly into a fresh model.
    Wav2Vec2CTC(merged, 10).load_state_dict(model.state_dict(), strict=True)
    mismatch = finetune_cfg(normalize=True)
    try:
        merge_finetune_config(tiny(normalize=False), mismatch)
        raise AssertionError("normalize mismatch not detected")
    except ValueError as err:
        assert "normalize" in str(err)


def test_freeze_phase_and_blank_forcing():
    torch.manual_seed(0)
    cfg = merge_finetune_config(tiny(), finetune_cfg())
    model = Wav2Vec2CTC(cfg, vocab_size=10).train()
    source = torch.randn(2, 8000)
    padding = torch.zeros(2, 8000, dtype=torch.bool)
    padding[1, 5000:] = True
    logits, frames = model(source, padding)
    assert logits.shape == (2, 24, 10) and frames is not None and frames[1].sum() > 0
    assert torch.all(logits[frames][:, 0] == 0) and torch.all(torch.isinf(logits[frames][:, 1:]))
    logits[~frames].sum().backward()
    assert model.w2v_encoder.proj.weight.grad is not None
    assert all(p.grad is None for p in model.w2v_encoder.w2v_model.parameters())  # frozen phase
    model.zero_grad()
    model.set_num_updates(5)
    logits, frames = model(source, padding)
    logits[~frames].sum().backward()
    assert model.w2v_encoder.w2v_model.encoder.layers[0].fc1.weight.grad is not None
    assert all(p.grad is None for p in model.w2v_encoder.w2v_model.feature_extractor.parameters())


def test_ctc_loss_matches_reference_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 30, 8)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 20:] = True
    target = torch.tensor([[4, 5, 6, 2], [7, 4, 1, 1]])  # eos (2) and pad (1) are dropped
    loss, logs = ctc_loss(logits, padding, target, torch.tensor([3, 2]), sentence_avg=False)
    lprobs = F.log_softmax(logits, -1).transpose(0, 1)
    expected = F.ctc_loss(
        lprobs,
        torch.tensor([4, 5, 6, 7, 4]),
        torch.tensor([30, 20]),
        torch.tensor([3, 2]),
        blank=0,
        reduction="sum",
        zero_infinity=True,
    )
    assert torch.allclose(loss, expected)
    assert logs == {"loss": float(expected), "ntokens": 5.0, "nsentences": 2.0, "sample_size": 5.0}
    impossible, _ = ctc_loss(logits[:, :2], None, torch.tensor([[4, 5, 6], [4, 5, 6]]), torch.tensor([3, 3]))
    assert impossible.item() == 0.0  # zero_infinity


def test_contrastive_loss_terms_and_accuracy():
    logits = torch.tensor(
        [[[5.0, 1.0]], [[1.0, 1.0]], [[0.0, float("-inf")]]]
    )  # (1+K=3, B=1, M=2): frame 0 correct, frame 1 wrong (negative 0 ties higher)
    logits[:, 0, 1] = torch.tensor([1.0, 3.0, 0.0])
    ppl = torch.tensor(48.0, requires_grad=True)
    pen = torch.tensor(0.25, requires_grad=True)
    out = {
        "x": logits,
        "prob_perplexity": ppl,
        "code_perplexity": torch.tensor(30.0),
        "num_vars": 64,
        "temp": 1.5,
        "features_pen": pen,
    }
    loss, logs = contrastive_loss(out, [0.1, 10.0])
    ce = F.cross_entropy(
        logits.transpose(0, 2).reshape(-1, 3), torch.zeros(2, dtype=torch.long), reduction="sum"
    )
    diversity = 0.1 * (64 - 48) / 64 * 2
    penalty = 10 * 0.25 * 2
    assert math.isclose(logs["loss_0"], ce.item(), rel_tol=1e-6)
    assert math.isclose(logs["loss_1"], diversity, rel_tol=1e-6) and math.isclose(
        logs["loss_2"], penalty, rel_tol=1e-6
    )
    assert math.isclose(loss.item(), ce.item() + diversity + penalty, rel_tol=1e-6)
    assert (
        logs["correct"] == 1 and logs["count"] == 2 and logs["sample_size"] == 2 and logs["nsentences"] == 1
    )
    assert logs["prob_perplexity"] == 48.0 and logs["code_perplexity"] == 30.0 and logs["temp"] == 1.5
    loss.backward()
    assert math.isclose(ppl.grad.item(), -0.1 / 64 * 2, rel_tol=1e-6)
    # A constant row (argmax == argmin == 0) is not counted as correct; no weights -> CE only.
    flat = {"x": torch.zeros(3, 1, 1)}
    loss_flat, logs_flat = contrastive_loss(flat, None)
    assert logs_flat["correct"] == 0 and "loss_0" not in logs_flat
    assert math.isclose(loss_flat.item(), math.log(3), rel_tol=1e-6)


def test_logged_metrics_share_fairseqs_tail():
    """The three reducers log loss in bits per sample_size unit, accuracy = correct / count only when
    something was counted, and the batch counts unchanged (fairseq's reduce_metrics)."""
    from repro.losses.masked_lm import reduce_masked_lm
    from repro.tasks.common import reduce_contrastive
    from repro.tasks.ctc_finetuning import reduce_ctc

    totals = {"loss": 40.0, "sample_size": 8.0, "ntokens": 8.0, "nsentences": 2.0, "correct": 3.0, "count": 4.0}
    for reduce in (reduce_masked_lm, reduce_contrastive):
        metrics = reduce(dict(totals))
        assert math.isclose(metrics["loss"], 5.0 / math.log(2))
        assert metrics["accuracy"] == 0.75
        assert (metrics["ntokens"], metrics["nsentences"], metrics["sample_size"]) == (8.0, 2.0, 8.0)
        assert "accuracy" not in reduce({**totals, "count": 0.0, "correct": 0.0})
    ctc = reduce_ctc({"loss": 40.0, "sample_size": 2.0, "ntokens": 8.0, "nsentences": 2.0})
    assert math.isclose(ctc["loss"], 20.0 / math.log(2)) and math.isclose(ctc["nll_loss"], 5.0 / math.log(2))
    assert (ctc["ntokens"], ctc["nsentences"], ctc["sample_size"]) == (8.0, 2.0, 2.0) and "accuracy" not in ctc
    assert reduce_contrastive({"loss": 1.0})["loss"] == 1.0 / math.log(2)  # no sample_size counts as 1
