"""Loading fairseq wav2vec 2.0 checkpoints of every storage era (fairseq_spec.md §9), safely.

Each test writes a fairseq-format file from random weights with the real state-dict keys (§9.3) and
the real argument names of the released files, loads it with `repro.checkpoints.fairseq.load`, and
compares the outputs with torchaudio's independent implementation holding the same weights (§9.4
key mapping). fairseq itself is not installed: pickled fairseq objects (a Dictionary, meters, config
dataclasses, ChoiceEnums) are produced by stand-in classes registered under fairseq's module names
while saving.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torchaudio
from omegaconf import OmegaConf

from repro.checkpoints.fairseq import (
    NotWav2Vec2Error,
    UnsafeCheckpointError,
    load,
    safe_load,
    stored_config,
    to_plain,
)
from repro.checkpoints.format import CheckpointError, atomic_save, read_checkpoint
from repro.data.dictionary import Dictionary
from repro.tools import import_checkpoint as import_tool

# Tiny dims, BASE-like structure: 7 conv blocks, 2 post-LN layers, D=64, quantizer with G=2 groups.
CONV_LAYERS = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] + [(32, 2, 2)]"
CONV_SPEC = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
DIM, FFN, HEADS, LAYERS, CONV_POS, CONV_POS_GROUPS = 64, 128, 4, 2, 128, 16
FINAL_DIM, LATENT_VARS, LATENT_GROUPS = 32, 8, 2
LETTERS = ["|", "E", "T", "A", "O", "N", "I", "H"]  # dictionary symbols after the 4 specials
VOCAB = 4 + len(LETTERS)
TOLERANCE = 1e-4


# =================================================================================================
# fairseq-format files from random weights
# =================================================================================================


def fairseq_state_dict(*, layer_norm_extractor: bool, conv_bias: bool, pretraining_modules: bool,
                       seed: int) -> dict[str, torch.Tensor]:
    """Random weights under fairseq's Wav2Vec2Model keys (§9.3)."""
    generator = torch.Generator().manual_seed(seed)

    def matrix(*shape: int) -> torch.Tensor:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return torch.randn(*shape, generator=generator) / fan_in**0.5

    def norm_pair(prefix: str, size: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(size, generator=generator),
                f"{prefix}.bias": 0.1 * torch.randn(size, generator=generator)}

    state: dict[str, torch.Tensor] = {"mask_emb": torch.rand(DIM, generator=generator)}
    in_channels = 1
    for index, (channels, kernel, _) in enumerate(CONV_SPEC):
        state[f"feature_extractor.conv_layers.{index}.0.weight"] = matrix(channels, in_channels, kernel)
        if conv_bias:
            state[f"feature_extractor.conv_layers.{index}.0.bias"] = 0.1 * torch.randn(channels, generator=generator)
        if layer_norm_extractor:
            state.update(norm_pair(f"feature_extractor.conv_layers.{index}.2.1", channels))
        elif index == 0:
            state.update(norm_pair("feature_extractor.conv_layers.0.2", channels))
        in_channels = channels
    embed = CONV_SPEC[-1][0]
    state["post_extract_proj.weight"] = matrix(DIM, embed)
    state["post_extract_proj.bias"] = 0.1 * torch.randn(DIM, generator=generator)
    state.update(norm_pair("layer_norm", embed))
    if pretraining_modules:
        state["quantizer.vars"] = torch.rand(1, LATENT_GROUPS * LATENT_VARS, FINAL_DIM // LATENT_GROUPS,
                                             generator=generator)
        state["quantizer.weight_proj.weight"] = torch.randn(LATENT_GROUPS * LATENT_VARS, embed, generator=generator)
        state["quantizer.weight_proj.bias"] = torch.zeros(LATENT_GROUPS * LATENT_VARS)
        state["project_q.weight"] = matrix(FINAL_DIM, FINAL_DIM)
        state["project_q.bias"] = torch.zeros(FINAL_DIM)
        state["final_proj.weight"] = matrix(FINAL_DIM, DIM)
        state["final_proj.bias"] = torch.zeros(FINAL_DIM)
    state["encoder.pos_conv.0.bias"] = 0.1 * torch.randn(DIM, generator=generator)
    state["encoder.pos_conv.0.weight_g"] = 0.5 + torch.rand(1, 1, CONV_POS, generator=generator)
    state["encoder.pos_conv.0.weight_v"] = matrix(DIM, DIM // CONV_POS_GROUPS, CONV_POS)
    for layer in range(LAYERS):
        prefix = f"encoder.layers.{layer}"
        for projection in ("k", "v", "q", "out"):
            state[f"{prefix}.self_attn.{projection}_proj.weight"] = matrix(DIM, DIM)
            state[f"{prefix}.self_attn.{projection}_proj.bias"] = 0.1 * torch.randn(DIM, generator=generator)
        state.update(norm_pair(f"{prefix}.self_attn_layer_norm", DIM))
        state[f"{prefix}.fc1.weight"] = matrix(FFN, DIM)
        state[f"{prefix}.fc1.bias"] = 0.1 * torch.randn(FFN, generator=generator)
        state[f"{prefix}.fc2.weight"] = matrix(DIM, FFN)
        state[f"{prefix}.fc2.bias"] = 0.1 * torch.randn(DIM, generator=generator)
        state.update(norm_pair(f"{prefix}.final_layer_norm", DIM))
    state.update(norm_pair("encoder.layer_norm", DIM))
    return state


def ctc_state_dict(pretrained: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A fine-tuned (Wav2VecCtc) state dict around `pretrained` (§9.3)."""
    generator = torch.Generator().manual_seed(seed)
    state = {f"w2v_encoder.w2v_model.{key}": value for key, value in pretrained.items()}
    state["w2v_encoder.proj.weight"] = torch.randn(VOCAB, DIM, generator=generator) / DIM**0.5
    state["w2v_encoder.proj.bias"] = 0.1 * torch.randn(VOCAB, generator=generator)
    return state


def pretraining_args(**overrides: Any) -> dict[str, Any]:
    """The argparse namespace of an Aug-2020 wav2vec_small.pt-like file (model + task + trainer args)."""
    args = dict(
        activation_dropout=0.0, activation_fn="gelu", adam_betas="(0.9,0.98)", adam_eps=1e-06,
        arch="wav2vec2", attention_dropout=0.1, best_checkpoint_metric="loss", clip_norm=25.0,
        codebook_negatives=0, conv_bias=False, conv_feature_layers=CONV_LAYERS, conv_pos=CONV_POS,
        conv_pos_groups=CONV_POS_GROUPS, criterion="wav2vec", cross_sample_negatives=0,
        data="/private/home/someone/data/librispeech/full", ddp_backend="no_c10d",
        distributed_world_size=64, dropout=0.1, dropout_features=0.1, dropout_input=0.1,
        enable_padding=False, encoder_attention_heads=HEADS, encoder_embed_dim=DIM,
        encoder_ffn_embed_dim=FFN, encoder_layerdrop=0.05, encoder_layers=LAYERS, extractor_mode="default",
        feature_grad_mult=0.1, final_dim=FINAL_DIM, fp16=True, infonce=True, latent_dim=0,
        latent_groups=LATENT_GROUPS, latent_temp="(2,0.5,0.999995)", latent_vars=LATENT_VARS,
        layer_norm_first=False, log_keys='["prob_perplexity","code_perplexity","temp"]', logit_temp=0.1,
        loss_weights="[0.1, 10]", lr=[0.0005], lr_scheduler="polynomial_decay", mask_channel_length=10,
        mask_channel_min_space=1, mask_channel_other=0.0, mask_channel_prob=0.0,
        mask_channel_selection="static", mask_length=10, mask_min_space=1, mask_other=0.0, mask_prob=0.65,
        mask_selection="static", max_sample_size=250000, max_tokens=1400000, max_update=400000,
        min_sample_size=32000, negatives_from_everywhere=False, no_mask_channel_overlap=False,
        no_mask_overlap=False, normalize=False, num_negatives=100, optimizer="adam", quantize_input=False,
        quantize_targets=True, same_quantizer=False, sample_rate=16000, seed=1, target_glu=False,
        task="audio_pretraining", total_num_update=400000, update_freq=[1], warmup_updates=32000,
        weight_decay=0.01,
    )
    args.update(overrides)
    return args


def large_model_section(**overrides: Any) -> dict[str, Any]:
    """`cfg.model` of a hydra-era LARGE (vox-style) pretraining run (wav2vec2_large_librivox.yaml)."""
    section = dict(
        _name="wav2vec2", extractor_mode="layer_norm", encoder_layers=LAYERS, encoder_embed_dim=DIM,
        encoder_ffn_embed_dim=FFN, encoder_attention_heads=HEADS, activation_fn="gelu", layer_type="transformer",
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
        dropout_features=0.0, final_dim=FINAL_DIM, layer_norm_first=True, conv_feature_layers=CONV_LAYERS,
        conv_bias=True, logit_temp=0.1, quantize_targets=True, quantize_input=False, same_quantizer=False,
        target_glu=False, feature_grad_mult=1.0, quantizer_depth=1, quantizer_factor=3, latent_vars=LATENT_VARS,
        latent_groups=LATENT_GROUPS, latent_dim=0, mask_length=10, mask_prob=0.65, mask_selection="static",
        mask_other=0.0, no_mask_overlap=False, mask_min_space=1, require_same_masks=True, mask_dropout=0.0,
        mask_channel_length=10, mask_channel_prob=0.0, mask_channel_before=False, mask_channel_selection="static",
        mask_channel_other=0.0, no_mask_channel_overlap=False, mask_channel_min_space=1, num_negatives=100,
        negatives_from_everywhere=False, cross_sample_negatives=0, codebook_negatives=0, conv_pos=CONV_POS,
        conv_pos_groups=CONV_POS_GROUPS, pos_conv_depth=1, latent_temp=[2.0, 0.1, 0.999995], max_positions=100000,
        checkpoint_activations=False, required_seq_len_multiple=2, crop_seq_to_multiple=1, depthwise_conv_kernel_size=31,
        attn_type="", pos_enc_type="abs", fp16=True,
    )
    section.update(overrides)
    return section


def pretraining_task_section(normalize: bool) -> dict[str, Any]:
    return dict(_name="audio_pretraining", data="/checkpoint/someone/data/libri-light", labels=None,
                binarized_dataset=False, sample_rate=16000, normalize=normalize, enable_padding=False,
                max_sample_size=320000, min_sample_size=32000, num_batch_buckets=0, precompute_mask_indices=False,
                inferred_w2v_config=None, tpu=False, text_compression_level="none")


def hydra_config(model: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """A whole FairseqConfig as fairseq stores it (sections besides model/task abridged)."""
    return {
        "_name": None,
        "common": {"_name": None, "no_progress_bar": False, "log_interval": 200, "fp16": True, "seed": 1},
        "checkpoint": {"_name": None, "save_dir": "checkpoints", "restore_file": "checkpoint_last.pt",
                       "best_checkpoint_metric": "loss", "save_interval_updates": 25000},
        "distributed_training": {"_name": None, "distributed_world_size": 128, "ddp_backend": "legacy_ddp"},
        "dataset": {"_name": None, "max_tokens": 1200000, "batch_size": 4, "valid_subset": "valid"},
        "optimization": {"_name": None, "max_update": 1000000, "lr": [0.005], "update_freq": [1]},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 32000},
        "model": model,
        "task": task,
        "criterion": {"_name": "wav2vec", "infonce": True, "loss_weights": [0.1, 0.0]},
        "bpe": None, "tokenizer": None, "scoring": None, "generation": {"_name": None, "beam": 5},
    }


# --- stand-ins for fairseq classes, registered under fairseq's module names while pickling -------------


class _Choices(enum.StrEnum):
    """Like fairseq's ChoiceEnum-generated enums."""

    default = "default"
    layer_norm = "layer_norm"


class _AverageMeter:
    def __init__(self, val: float, count: int) -> None:
        self.val, self.sum, self.count = val, val * count, count


class _FairseqDictionary:
    """Pickles like fairseq.data.dictionary.Dictionary (its __dict__)."""

    def __init__(self, symbols: list[str]) -> None:
        self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
        self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + symbols
        self.count = [1, 1, 1, 1] + [100 - i for i in range(len(symbols))]
        self.indices = {symbol: index for index, symbol in enumerate(self.symbols)}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
        self.nspecial = 4


@dataclasses.dataclass
class _Wav2Vec2Config:
    """A structured model section, as fairseq's Wav2Vec2Config (object_type of the pickled DictConfig)."""

    _name: str = "wav2vec2"
    extractor_mode: _Choices = _Choices.default


FAKE_FAIRSEQ = {
    "fairseq.dataclass.constants": {"Choices": _Choices},
    "fairseq.logging.meters": {"AverageMeter": _AverageMeter},
    "fairseq.data.dictionary": {"Dictionary": _FairseqDictionary},
    "fairseq.models.wav2vec.wav2vec2": {"Wav2Vec2Config": _Wav2Vec2Config},
}


@contextlib.contextmanager
def fake_fairseq_modules():
    """Make the stand-ins picklable under fairseq's names; removes every trace afterwards."""
    saved: dict[type, tuple[str, str]] = {}
    added: list[str] = []
    try:
        for module_name, classes in FAKE_FAIRSEQ.items():
            parts = module_name.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                if name not in sys.modules:
                    sys.modules[name] = ModuleType(name)
                    added.append(name)
            for class_name, cls in classes.items():
                saved[cls] = (cls.__module__, cls.__qualname__)
                cls.__module__, cls.__qualname__ = module_name, class_name
                setattr(sys.modules[module_name], class_name, cls)
        yield
    finally:
        for cls, (module, qualname) in saved.items():
            cls.__module__, cls.__qualname__ = module, qualname
        for name in reversed(added):
            sys.modules.pop(name, None)


def save_fairseq(checkpoint: dict[str, Any], path: Path, legacy_format: bool = False) -> Path:
    with fake_fairseq_modules():
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    assert "fairseq" not in sys.modules
    return path


def args_era_extra_state() -> dict[str, Any]:
    return {"epoch": 31, "train_iterator": {"epoch": 31, "iterations_in_epoch": 0, "shuffle": True},
            "val_loss": np.float64(2.31), "best": np.float64(2.29), "lr_history": np.arange(3, dtype=np.float32),
            "metrics": {}, "previous_training_time": 123.4}


# --- the four storage eras ----------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    path: Path
    fairseq_state: dict[str, torch.Tensor]  # as the reference should see it (fp32, fp16-rounded if stored so)
    ctc: bool
    layer_norm_extractor: bool
    layer_norm_first: bool
    conv_bias: bool


def make_args_pretrained(directory: Path) -> Case:
    """(a) 2020 args-era pretrained file (wav2vec_small.pt-like), legacy (pre-zip) torch format."""
    state = fairseq_state_dict(layer_norm_extractor=False, conv_bias=False, pretraining_modules=True, seed=1)
    checkpoint = {
        "args": argparse.Namespace(**pretraining_args()),
        "model": state,
        "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "optimizer_name": "FP16Optimizer",
                               "lr_scheduler_state": {"best": 2.29}, "num_updates": 400000}],
        "extra_state": args_era_extra_state(),
        "last_optimizer_state": None,
    }
    path = save_fairseq(checkpoint, directory / "wav2vec_small.pt", legacy_format=True)
    return Case(path, state, ctc=False, layer_norm_extractor=False, layer_norm_first=False, conv_bias=False)


def make_args_finetuned(directory: Path) -> Case:
    """(b) 2020 args-era fine-tuned file (wav2vec_small_960h.pt-like): fp16 weights, w2v_args inside."""
    pretrained = fairseq_state_dict(layer_norm_extractor=False, conv_bias=False, pretraining_modules=True, seed=2)
    state = {key: value.half() for key, value in ctc_state_dict(pretrained, seed=3).items()}
    args = dict(
        activation_dropout=0.1, apply_mask=True, arch="wav2vec_ctc", attention_dropout=0.0, best_checkpoint_metric="wer",
        criterion="ctc", data="/checkpoint/someone/data/librispeech", dropout=0.0, dropout_input=0.0,
        feature_grad_mult=0.0, final_dropout=0.0, fp16=True, freeze_finetune_updates=0, labels="ltr", layerdrop=0.1,
        lr=[0.0001], mask_channel_length=64, mask_channel_other=0.0, mask_channel_prob=0.1,
        mask_channel_selection="static", mask_length=10, mask_other=0.0, mask_prob=0.5, mask_selection="static",
        max_sample_size=None, max_tokens=3200000, max_update=320000, min_sample_size=None,
        no_mask_channel_overlap=False, no_mask_overlap=False, no_pretrained_weights=False, normalize=False,
        post_process="letter", sample_rate=16000, sentence_avg=True, task="audio_pretraining",
        w2v_args=argparse.Namespace(**pretraining_args()), w2v_path="/private/home/someone/wav2vec_small.pt",
        zero_infinity=True,
    )
    checkpoint = {"args": argparse.Namespace(**args), "model": state, "optimizer_history": [],
                  "extra_state": args_era_extra_state(), "last_optimizer_state": None}
    path = save_fairseq(checkpoint, directory / "wav2vec_small_960h.pt")
    reference = {key: value.float() for key, value in state.items()}
    return Case(path, reference, ctc=True, layer_norm_extractor=False, layer_norm_first=False, conv_bias=False)


def make_dictconfig_pretrained(directory: Path) -> Case:
    """(c) Nov 2020 - Mar 2021: `cfg` pickled as an omegaconf DictConfig (vox `*_new.pt`, XLSR-53-like)."""
    state = fairseq_state_dict(layer_norm_extractor=True, conv_bias=True, pretraining_modules=True, seed=4)
    model = OmegaConf.structured(_Wav2Vec2Config)
    OmegaConf.set_struct(model, False)  # the stand-in declares two fields; fairseq's declares them all
    model = OmegaConf.merge(model, {k: v for k, v in large_model_section().items() if k != "extractor_mode"})
    model.extractor_mode = _Choices.layer_norm  # an EnumNode holding a fairseq ChoiceEnum member
    cfg = OmegaConf.create(hydra_config({}, pretraining_task_section(normalize=True)))
    cfg.model = model
    cfg.lr_scheduler.total_num_update = "${optimization.max_update}"  # II("optimization.max_update")
    cfg.checkpoint.save_dir = "${oc.env:HOME}/checkpoints"  # a resolver call: never evaluated
    checkpoint = {"args": None, "cfg": cfg, "model": state, "optimizer_history": [],
                  "extra_state": {"epoch": 12, "metrics": {}}, "last_optimizer_state": None}
    path = save_fairseq(checkpoint, directory / "libri960_big_new.pt")
    return Case(path, state, ctc=False, layer_norm_extractor=True, layer_norm_first=True, conv_bias=True)


def make_dict_cfg_finetuned(directory: Path, with_dictionary: bool = True) -> Case:
    """(d) What fairseq's trainer writes today: plain-dict cfg, w2v_args dict, Dictionary in task_state."""
    pretrained = fairseq_state_dict(layer_norm_extractor=True, conv_bias=True, pretraining_modules=False, seed=5)
    state = ctc_state_dict(pretrained, seed=6)
    finetune_model = dict(
        _name="wav2vec_ctc", w2v_path="/checkpoint/someone/libri960_big.pt", no_pretrained_weights=False,
        dropout_input=0.0, final_dropout=0.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.1,
        conv_feature_layers=CONV_LAYERS, encoder_embed_dim=DIM, apply_mask=True, mask_length=10, mask_prob=0.5,
        mask_selection="static", mask_other=0.0, no_mask_overlap=False, mask_min_space=1, require_same_masks=True,
        mask_dropout=0.0, mask_channel_length=64, mask_channel_prob=0.25, mask_channel_selection="static",
        mask_channel_other=0.0, no_mask_channel_overlap=False, freeze_finetune_updates=10000, feature_grad_mult=0.0,
        layerdrop=0.1, mask_channel_min_space=1, mask_channel_before=False, normalize=True,
        data="/checkpoint/someone/data/librispeech", w2v_args=hydra_config(large_model_section(),
                                                                          pretraining_task_section(True)),
        offload_activations=False, min_params_to_wrap=100000000, checkpoint_activations=False, ddp_backend="legacy_ddp",
        blank_weight=0.0, blank_mode="add",
    )
    task = dict(_name="audio_finetuning", data="/checkpoint/someone/data/librispeech", labels="ltr",
                binarized_dataset=False, sample_rate=16000, normalize=True, enable_padding=False,
                max_sample_size=None, min_sample_size=None, eval_wer=False, autoregressive=False)
    checkpoint = {
        "args": None,
        "cfg": hydra_config(finetune_model, task),
        "model": state,
        "criterion": {},
        "optimizer_history": [{"criterion_name": "CtcCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": 3.1}, "num_updates": 20000}],
        "task_state": {"target_dictionary": _FairseqDictionary(LETTERS)} if with_dictionary else {},
        # fairseq's trainer stores metrics.state_dict(): per aggregator (priority, key, meter class
        # name, meter state) tuples, plain data (fairseq/logging/meters.py MetersDict.state_dict). The
        # 2019 trainer stored its meter objects themselves ("train_meters"): pickled fairseq classes.
        "extra_state": {"epoch": 5, "train_iterator": {"epoch": 5},
                        "metrics": OrderedDict(train=[(0, "loss", "AverageMeter", {"val": 1.5, "sum": 15.0})]),
                        "train_meters": OrderedDict(train_loss=_AverageMeter(1.5, 10)),
                        "previous_training_time": 5000.0},
    }
    path = save_fairseq(checkpoint, directory / "checkpoint_best.pt")
    return Case(path, state, ctc=True, layer_norm_extractor=True, layer_norm_first=True, conv_bias=True)


MAKERS = {"args_pretrained": make_args_pretrained, "args_finetuned": make_args_finetuned,
          "dictconfig_pretrained": make_dictconfig_pretrained, "dict_cfg_finetuned": make_dict_cfg_finetuned}


# =================================================================================================
# Reference: torchaudio with the same weights (§9.4)
# =================================================================================================

TORCHAUDIO_RENAMES = [
    (r"^feature_extractor\.conv_layers\.0\.2\.(weight|bias)$", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^post_extract_proj\.", "encoder.feature_projection.projection."),
    (r"^layer_norm\.", "encoder.feature_projection.layer_norm."),
    (r"^encoder\.pos_conv\.0\.bias$", "encoder.transformer.pos_conv_embed.conv.bias"),
    (r"^encoder\.pos_conv\.0\.weight_g$", "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layer_norm\.", "encoder.transformer.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.", r"encoder.transformer.layers.\1.attention.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.transformer.layers.\1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.transformer.layers.\1.feed_forward.intermediate_dense."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.transformer.layers.\1.feed_forward.output_dense."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.transformer.layers.\1.final_layer_norm."),
    (r"^proj\.", "aux."),
]
TORCHAUDIO_DROPPED = re.compile(r"^(mask_emb|quantizer\.|project_q\.|final_proj\.)")


def torchaudio_reference(case: Case) -> torch.nn.Module:
    model = torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm" if case.layer_norm_extractor else "group_norm",
        extractor_conv_layer_config=CONV_SPEC, extractor_conv_bias=case.conv_bias, encoder_embed_dim=DIM,
        encoder_projection_dropout=0.0, encoder_pos_conv_kernel=CONV_POS, encoder_pos_conv_groups=CONV_POS_GROUPS,
        encoder_num_layers=LAYERS, encoder_num_heads=HEADS, encoder_attention_dropout=0.0,
        encoder_ff_interm_features=FFN, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
        encoder_layer_norm_first=case.layer_norm_first, encoder_layer_drop=0.0,
        aux_num_out=VOCAB if case.ctc else None,
    )
    mapped = {}
    for key, value in case.fairseq_state.items():
        key = key.removeprefix("w2v_encoder.").removeprefix("w2v_model.")
        if TORCHAUDIO_DROPPED.match(key):
            continue
        for pattern, replacement in TORCHAUDIO_RENAMES:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        else:
            raise AssertionError(f"no torchaudio name for fairseq key {key}")
        mapped[key] = value.float()
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def waveforms(batch: int = 2, samples: int = 8000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return 0.3 * torch.randn(batch, samples, generator=generator)  # (B, L)


def our_output(loaded_model: torch.nn.Module, kind: str, source: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "wav2vec_ctc":
            return loaded_model(source)[0]  # (B, T, V) raw logits
        return loaded_model.extract_features(source)["x"]  # (B, T, D)


def reference_output(case: Case, source: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torchaudio_reference(case)(source)[0]


# =================================================================================================
# Tests
# =================================================================================================


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    directory = tmp_path_factory.mktemp("fairseq_files")
    return {name: maker(directory) for name, maker in MAKERS.items()}


@pytest.mark.parametrize("name", list(MAKERS))
def test_each_storage_era_loads_and_matches_torchaudio(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    loaded = load(case.path)
    assert loaded.kind == ("wav2vec_ctc" if case.ctc else "wav2vec2")
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    source = waveforms()
    ours, reference = our_output(loaded.model, loaded.kind, source), reference_output(case, source)
    assert ours.shape == reference.shape == ((2, 24, VOCAB) if case.ctc else (2, 24, DIM))
    assert (ours - reference).abs().max().item() <= TOLERANCE
    # The two models really differ per case (random weights), so the match is not trivial.
    assert reference.abs().mean().item() > 0.05


def test_args_era_pretrained_config(cases: dict[str, Case]) -> None:
    loaded = load(cases["args_pretrained"].path)
    cfg = loaded.model_cfg
    assert (cfg._name, cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == ("wav2vec2", 2, 64, 4)
    assert cfg.latent_temp == [2.0, 0.5, 0.999995]  # argparse stored "(2,0.5,0.999995)"
    assert (cfg.quantize_targets, cfg.final_dim, cfg.latent_vars, cfg.feature_grad_mult) == (True, 32, 8, 0.1)
    assert cfg.extractor_mode == "default" and cfg.layer_norm_first is False and cfg.normalize is False
    assert cfg.require_same_masks is True and cfg.mask_channel_before is False  # absent -> dataclass defaults
    assert loaded.task_cfg["_name"] == "audio_pretraining"
    assert (loaded.task_cfg["max_sample_size"], loaded.task_cfg["min_sample_size"]) == (250000, 32000)
    assert loaded.dictionary is None


def test_args_era_finetuned_config_applies_finetuning_overrides(cases: dict[str, Case]) -> None:
    loaded = load(cases["args_finetuned"].path)
    cfg = loaded.model_cfg
    assert cfg._name == "wav2vec_ctc" and cfg.encoder_layers == 2 and cfg.final_dim == 32
    # Fine-tuning replaces these pretraining values (§3.1): dropout 0.1 -> 0, layerdrop 0.05 -> 0.1.
    assert (cfg.dropout, cfg.dropout_input, cfg.activation_dropout, cfg.encoder_layerdrop) == (0.0, 0.0, 0.1, 0.1)
    assert (cfg.mask_prob, cfg.mask_channel_prob, cfg.mask_channel_length, cfg.apply_mask) == (0.5, 0.1, 64, True)
    assert cfg.dropout_features == 0.1 and cfg.feature_grad_mult == 0.0
    assert cfg.w2v_path is None  # a FAIR cluster path, meaningless here
    assert loaded.task_cfg["_name"] == "audio_finetuning" and loaded.task_cfg["labels"] == "ltr"
    assert loaded.dictionary is None  # the 2020 files do not store it (§9.1)
    assert loaded.model.w2v_encoder.proj.out_features == VOCAB
    assert not any(key.startswith("w2v_encoder.w2v_model.quantizer") for key in loaded.model.state_dict())


def test_dictconfig_era_config(cases: dict[str, Case]) -> None:
    raw = safe_load(cases["dictconfig_pretrained"].path)
    assert type(raw["cfg"]).__name__ == "DictConfig"
    stored = stored_config(raw, cases["dictconfig_pretrained"].path)
    assert stored.era == "cfg" and stored.model["extractor_mode"] == "layer_norm"
    plain = to_plain(raw["cfg"])
    assert plain["lr_scheduler"]["total_num_update"] == 1000000
    assert plain["checkpoint"]["save_dir"] == "${oc.env:HOME}/checkpoints"
    loaded = load(cases["dictconfig_pretrained"].path)
    cfg = loaded.model_cfg
    assert (cfg.extractor_mode, cfg.layer_norm_first, cfg.conv_bias, cfg.normalize) == ("layer_norm", True, True, True)
    assert cfg.latent_temp == [2.0, 0.1, 0.999995]
    assert loaded.task_cfg["normalize"] is True and loaded.task_cfg["max_sample_size"] == 320000


def test_current_trainer_file_carries_its_dictionary(cases: dict[str, Case]) -> None:
    loaded = load(cases["dict_cfg_finetuned"].path)
    assert isinstance(loaded.dictionary, Dictionary)
    assert loaded.dictionary.symbols == ["<s>", "<pad>", "</s>", "<unk>"] + LETTERS
    assert loaded.dictionary.index("|") == 4 and len(loaded.dictionary) == VOCAB
    cfg = loaded.model_cfg
    assert (cfg._name, cfg.freeze_finetune_updates, cfg.mask_channel_prob, cfg.normalize) == ("wav2vec_ctc", 10000, 0.25, True)
    assert (cfg.extractor_mode, cfg.layer_norm_first, cfg.conv_bias) == ("layer_norm", True, True)
    assert loaded.task_cfg["_name"] == "audio_finetuning"


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class RunsShell:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return os.system, (f"touch {marker}",)

    class CallsEval:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return eval, (f"open({str(marker)!r}, 'w').close()",)

    for name, payload in (("system.pt", RunsShell()), ("eval.pt", CallsEval())):
        path = tmp_path / name
        torch.save({"args": argparse.Namespace(arch="wav2vec2"), "model": {}, "extra_state": payload}, path)
        with pytest.raises(UnsafeCheckpointError) as raised:
            load(path)
        message = str(raised.value)
        assert str(path) in message
        assert ("posix.system" in message or "nt.system" in message) if name == "system.pt" else "builtins.eval" in message
        ours = tmp_path / f"ours_{name}"
        torch.save({"format": "repro-checkpoint-v1", "kind": "wav2vec2", "model": {}, "payload": payload}, ours)
        with pytest.raises(UnsafeCheckpointError, match=r"(posix|nt)\.system|builtins\.eval"):
            read_checkpoint(ours)  # our reader (weights_only) refuses it too, naming the global
        assert not marker.exists()


def test_truncated_files_give_a_clear_error(cases: dict[str, Case], tmp_path: Path) -> None:
    for name in ("args_pretrained", "dict_cfg_finetuned"):  # legacy and zip torch formats
        data = cases[name].path.read_bytes()
        path = tmp_path / f"truncated_{name}.pt"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated") as raised:
            load(path)
        assert str(path) in str(raised.value)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("just some text\n")
    for reader in (load, read_checkpoint):
        with pytest.raises(CheckpointError, match="not a torch checkpoint"):
            reader(not_torch)


@pytest.mark.parametrize(
    ("arch_args", "expected"),
    [
        # arch 'wav2vec' (wav2vec, vq-wav2vec) loads: tests/unit/test_wav2vec_checkpoints.py
        ({"arch": "hubert"}, "arch 'hubert' (HuBERT) is not a wav2vec 2.0, wav2vec or vq-wav2vec model"),
        ({"arch": "transformer_lm_gbw", "task": "language_modeling"}, "(a language model) is not a wav2vec 2.0,"),
    ],
)
def test_other_models_are_named(tmp_path: Path, arch_args: dict[str, Any], expected: str) -> None:
    state = {"feature_extractor.conv_layers.0.0.weight": torch.zeros(512, 1, 10),
             "feature_aggregator.conv_layers.0.1.weight": torch.zeros(512, 512, 2)}
    path = tmp_path / "other.pt"
    torch.save({"args": argparse.Namespace(**arch_args, log_compression=True), "model": state,
                "extra_state": {}, "optimizer_history": []}, path)
    with pytest.raises(NotWav2Vec2Error) as raised:
        load(path)
    assert expected in str(raised.value) and str(path) in str(raised.value)


def test_a_bare_state_dict_is_named(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"linear.weight": torch.zeros(2, 2), "linear.bias": torch.zeros(2)}, path)
    with pytest.raises(NotWav2Vec2Error, match="bare state dict of 2 tensors"):
        load(path)


def test_read_checkpoint_refuses_a_fairseq_file(cases: dict[str, Case]) -> None:
    for name in ("args_finetuned", "dict_cfg_finetuned"):
        with pytest.raises(CheckpointError, match="fairseq checkpoint") as raised:
            read_checkpoint(cases[name].path)
        assert str(cases[name].path) in str(raised.value)


@pytest.mark.parametrize("name", ["dict_cfg_finetuned", "args_pretrained"])
def test_import_checkpoint_round_trip(cases: dict[str, Case], tmp_path: Path, name: str) -> None:
    import argparse as argparse_module

    parser = argparse_module.ArgumentParser()
    import_tool.add_arguments(parser)
    out = tmp_path / "imported"
    assert import_tool.main(parser.parse_args([str(cases[name].path), "--out", str(out)])) == 0
    ours = read_checkpoint(out / "checkpoint.pt")  # weights_only=True
    assert ours["format"] == "repro-checkpoint-v1" and ours["kind"] == load(cases[name].path).kind
    assert OmegaConf.load(out / "config.yaml").model.encoder_layers == LAYERS
    original, imported = load(cases[name].path), load(out / "checkpoint.pt")
    assert imported.model_cfg == original.model_cfg and imported.task_cfg == original.task_cfg
    source = waveforms()
    assert torch.equal(our_output(original.model, original.kind, source), our_output(imported.model, imported.kind, source))
    if cases[name].ctc:
        assert Dictionary.load(out / "dict.ltr.txt").symbols == imported.dictionary.symbols == original.dictionary.symbols
    else:
        assert not (out / "dict.ltr.txt").exists() and imported.dictionary is None


def test_import_checkpoint_attaches_a_given_dictionary(cases: dict[str, Case], tmp_path: Path) -> None:
    dict_path = tmp_path / "dict.ltr.txt"
    Dictionary.from_symbols(LETTERS).save(dict_path)
    out = tmp_path / "imported"
    import_tool.import_checkpoint(cases["args_finetuned"].path, out, dict_path)
    assert load(out / "checkpoint.pt").dictionary.symbols[4:] == LETTERS
    wrong = tmp_path / "wrong.ltr.txt"
    Dictionary.from_symbols(LETTERS[:3]).save(wrong)
    with pytest.raises(CheckpointError, match="dictionary has 7 symbols, the CTC head 12"):
        import_tool.import_checkpoint(cases["args_finetuned"].path, tmp_path / "other", wrong)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"value": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a lambda
        atomic_save({"value": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
