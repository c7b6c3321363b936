"""Loading wav2vec_large.pt, vq-wav2vec.pt and vq-wav2vec_kmeans.pt (fairseq arch `wav2vec`) safely.

Each test writes a fairseq-format file as the 2019 trainer did: an `argparse.Namespace` holding the
README command's arguments (plus trainer arguments), and random weights under the state-dict keys and
shapes fairseq's modules have (fairseq/models/wav2vec/wav2vec.py, fairseq/modules/*_vector_quantizer.py),
written out here from fairseq's module structure, not from our model. Loading must be strict: no
missing or unexpected key. Files of today's trainer (`cfg` dict) are covered too.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from repro.checkpoints.fairseq import load
from repro.checkpoints.format import CheckpointError
from repro.models.wav2vec import Wav2VecModel
from repro.tools.import_checkpoint import import_checkpoint

AGGREGATOR_12 = "[" + ", ".join(f"(512, {k}, 1)" for k in range(2, 14)) + "]"
FEATURES_7 = "[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), (512, 1, 1)]"
FEATURES_8 = FEATURES_7[:-1] + ", (512, 1, 1)]"

TRAINER_ARGS = dict(task="audio_pretraining", criterion="binary_cross_entropy", optimizer="adam",
                    lr_scheduler="cosine", max_update=400000, min_lr=1e-06, warmup_updates=500,
                    warmup_init_lr=1e-07, max_sample_size=150000, max_tokens=1500000, fp16=True, seed=1,
                    sample_rate=16000, data="/private/home/someone/manifests", encoder="cnn")

# README "Train a wav2vec model" (the wav2vec_large.pt command)
WAV2VEC_LARGE_ARGS = dict(arch="wav2vec", conv_feature_layers=FEATURES_7, conv_aggregator_layers=AGGREGATOR_12,
                          skip_connections_agg=True, residual_scale=0.5, log_compression=True, num_negatives=10,
                          lr=[0.005])
# README "Train a gumbel vq-wav2vec model"; no --log-compression, so off in 2019
VQ_GUMBEL_ARGS = dict(arch="wav2vec", conv_feature_layers=FEATURES_8, conv_aggregator_layers=AGGREGATOR_12,
                      activation="gelu", offset="auto", skip_connections_agg=True, residual_scale=0.5,
                      log_keys=["prob_perplexity", "code_perplexity", "temp"], vq_type="gumbel", vq_groups=2,
                      vq_depth=2, combine_groups=True, vq_vars=320, vq_temp="(2,0.5,0.999995)", prediction_steps=12,
                      num_negatives=10, cross_sample_negatives=0, lr=[1e-05], seed=2, max_tokens=300000)
VQ_KMEANS_ARGS = dict(VQ_GUMBEL_ARGS, vq_type="kmeans", loss_weights=[1.0])


def fairseq_wav2vec_state(args: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under fairseq's `Wav2VecModel` keys for these args (the 2019 architecture
    defaults where an argument is absent: skip connections off, conv bias on, 3-wide 9-layer aggregator)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    state: dict[str, torch.Tensor] = {}
    features = ast.literal_eval(args["conv_feature_layers"])
    in_dim = 1
    for i, (dim, k, _) in enumerate(features):  # Sequential(conv, dropout, Fp32GroupNorm(1, dim), act)
        state[f"feature_extractor.conv_layers.{i}.0.weight"] = rand(dim, in_dim, k)
        state[f"feature_extractor.conv_layers.{i}.2.weight"] = 1 + rand(dim)
        state[f"feature_extractor.conv_layers.{i}.2.bias"] = rand(dim)
        in_dim = dim
    embed = in_dim
    for i, (dim, k, _) in enumerate(ast.literal_eval(args["conv_aggregator_layers"])):
        # Sequential(pad, conv, dropout, Fp32GroupNorm, act); residual_proj only where the width changes
        state[f"feature_aggregator.conv_layers.{i}.1.weight"] = rand(dim, in_dim, k)
        state[f"feature_aggregator.conv_layers.{i}.1.bias"] = rand(dim)
        state[f"feature_aggregator.conv_layers.{i}.3.weight"] = 1 + rand(dim)
        state[f"feature_aggregator.conv_layers.{i}.3.bias"] = rand(dim)
        if in_dim != dim and args.get("skip_connections_agg"):
            state[f"feature_aggregator.residual_proj.{i}.weight"] = rand(dim, in_dim, 1)
        in_dim = dim
    steps = args.get("prediction_steps", 12)
    state["wav2vec_predictions.project_to_steps.weight"] = rand(in_dim, embed, 1, steps)  # ConvTranspose2d
    state["wav2vec_predictions.project_to_steps.bias"] = rand(embed)
    groups, num_vars = args.get("vq_groups", 2), args.get("vq_vars", 320)
    shared = 1 if args.get("combine_groups") else groups
    if args.get("vq_type") == "gumbel":  # depth 2: Sequential(Sequential(Linear(d, 2d), act), Linear(2d, G*V))
        state["vector_quantizer.vars"] = torch.rand(1, shared * num_vars, embed // groups, generator=generator)
        state["vector_quantizer.weight_proj.0.0.weight"] = rand(2 * embed, embed)
        state["vector_quantizer.weight_proj.0.0.bias"] = rand(2 * embed)
        state["vector_quantizer.weight_proj.1.weight"] = rand(groups * num_vars, 2 * embed)
        state["vector_quantizer.weight_proj.1.bias"] = rand(groups * num_vars)
    elif args.get("vq_type") == "kmeans":  # embedding (V, G or 1, d/G); Sequential(grouped 1x1 conv, GroupNorm(G))
        state["vector_quantizer.embedding"] = rand(num_vars, shared, embed // groups)
        state["vector_quantizer.projection.0.weight"] = rand(embed, embed // groups, 1)
        state["vector_quantizer.projection.1.weight"] = 1 + rand(embed)
        state["vector_quantizer.projection.1.bias"] = rand(embed)
    return state


def save_args_era(path: Path, args: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    state = fairseq_wav2vec_state(args, seed)
    half = {key: value.half() for key, value in state.items()}  # --fp16 runs saved half weights
    torch.save({"args": argparse.Namespace(**{**TRAINER_ARGS, **args}), "model": half,
                "optimizer_history": [{"criterion_name": "BinaryCrossEntropyCriterion", "num_updates": 400000}],
                "extra_state": {"epoch": 1}, "last_optimizer_state": None}, path)
    return {key: value.float() for key, value in half.items()}


@pytest.mark.parametrize(("name", "args"), [("wav2vec_large", WAV2VEC_LARGE_ARGS), ("vq-wav2vec", VQ_GUMBEL_ARGS),
                                            ("vq-wav2vec_kmeans", VQ_KMEANS_ARGS)])
def test_released_files_load_strictly_from_their_args(tmp_path: Path, name: str, args: dict[str, Any]) -> None:
    state = save_args_era(tmp_path / f"{name}.pt", args, seed=len(name))
    loaded = load(tmp_path / f"{name}.pt")
    assert loaded.kind == "wav2vec" and isinstance(loaded.model, Wav2VecModel)
    ours = loaded.model.state_dict()
    assert set(ours) == set(state)  # strict: no missing, no unexpected key
    for key, value in state.items():
        assert torch.equal(ours[key], value), key
    cfg = loaded.model_cfg
    assert cfg.skip_connections_agg and cfg.num_negatives == 10 and loaded.model.offset == 3
    # the stored args win; what they lack is 2019's default (log compression only where the command set it)
    assert cfg.log_compression is (name == "wav2vec_large")
    assert loaded.model.feature_extractor.log_compression is (name == "wav2vec_large")
    assert cfg.activation == ("relu" if name == "wav2vec_large" else "gelu")
    if name != "wav2vec_large":
        assert cfg.vq_temp == [2.0, 0.5, 0.999995] and cfg.combine_groups and cfg.vq_groups == 2
    assert loaded.task_cfg["_name"] == "audio_pretraining" and loaded.task_cfg["max_sample_size"] == 150000

    # the loaded weights are used as fairseq uses them: first feature block by hand
    wav = torch.randn(1, 4000)
    with torch.no_grad():
        z = loaded.model.feature_extractor(wav)
        block = F.conv1d(wav.unsqueeze(1), state["feature_extractor.conv_layers.0.0.weight"], stride=5)
        block = F.group_norm(block, 1, state["feature_extractor.conv_layers.0.2.weight"],
                             state["feature_extractor.conv_layers.0.2.bias"])
        first = loaded.model.feature_extractor.conv_layers[0](wav.unsqueeze(1))
    activation = torch.relu if name == "wav2vec_large" else F.gelu
    torch.testing.assert_close(first, activation(block), atol=1e-5, rtol=1e-5)
    assert z.shape[1] == 512 and z.shape[2] == (4000 - 465) // 160 + 1


def test_vq_files_tokenize_and_import_round_trip(tmp_path: Path) -> None:
    save_args_era(tmp_path / "vq-wav2vec_kmeans.pt", VQ_KMEANS_ARGS, seed=3)
    loaded = load(tmp_path / "vq-wav2vec_kmeans.pt")
    wav = torch.randn(1, 10000)
    with torch.no_grad():
        _, idxs = loaded.model.vector_quantizer.forward_idx(loaded.model.feature_extractor(wav))
    assert idxs.shape == (1, 60, 2) and int(idxs.max()) < 320  # README: torch.Size([1, 60, 2])
    written = import_checkpoint(tmp_path / "vq-wav2vec_kmeans.pt", tmp_path / "imported")
    again = load(written)
    assert again.kind == "wav2vec" and again.model_cfg == loaded.model_cfg
    with torch.no_grad():
        _, idxs_again = again.model.vector_quantizer.forward_idx(again.model.feature_extractor(wav))
    assert torch.equal(idxs, idxs_again)
    stored = torch.load(written, weights_only=True)
    assert "encoder_layers" not in stored["model_cfg"]  # only wav2vec fields, not the wav2vec 2.0 ones


def test_a_2019_file_without_the_later_arguments_takes_2019_defaults(tmp_path: Path) -> None:
    # fairseq 392fce8a wrote no activation / offset / vq_* arguments; cross_sample_negatives was a bool
    args = dict(arch="wav2vec", conv_feature_layers=FEATURES_7, conv_aggregator_layers=AGGREGATOR_12,
                skip_connections_agg=True, log_compression=True, num_negatives=10, cross_sample_negatives=False)
    save_args_era(tmp_path / "old.pt", args, seed=5)
    cfg = load(tmp_path / "old.pt").model_cfg
    assert cfg.activation == "relu" and cfg.offset == "auto" and cfg.vq_type == "none"
    assert cfg.cross_sample_negatives == 0 and cfg.prediction_steps == 12


def test_todays_trainer_cfg_file_and_its_defaults(tmp_path: Path) -> None:
    model_section = {"_name": "wav2vec", "conv_feature_layers": FEATURES_8, "conv_aggregator_layers": AGGREGATOR_12,
                     "activation": "gelu", "vq_type": "gumbel", "vq_depth": 2, "combine_groups": True,
                     "vq_temp": [2.0, 0.5, 0.999995], "offset": "auto", "infonce": False}
    state = fairseq_wav2vec_state(dict(model_section, skip_connections_agg=True), seed=7)
    cfg = {"model": model_section, "task": {"_name": "audio_pretraining", "data": "/data", "sample_rate": 16000},
           "criterion": {"_name": "wav2vec", "infonce": False}}
    torch.save({"cfg": cfg, "model": state, "args": None}, tmp_path / "hydra.pt")
    loaded = load(tmp_path / "hydra.pt")
    # the file omits skip_connections_agg / log_compression / num_negatives: today's defaults apply
    assert loaded.model_cfg.skip_connections_agg and loaded.model_cfg.log_compression
    assert loaded.model_cfg.num_negatives == 10


def test_wrong_weights_and_unsupported_settings_are_named(tmp_path: Path) -> None:
    state = save_args_era(tmp_path / "large.pt", WAV2VEC_LARGE_ARGS, seed=1)
    del state["wav2vec_predictions.project_to_steps.bias"]
    torch.save({"args": argparse.Namespace(**{**TRAINER_ARGS, **WAV2VEC_LARGE_ARGS}), "model": state},
               tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing: wav2vec_predictions.project_to_steps.bias") as raised:
        load(tmp_path / "broken.pt")
    assert "broken.pt" in str(raised.value)
    torch.save({"args": argparse.Namespace(**{**TRAINER_ARGS, **WAV2VEC_LARGE_ARGS, "aggregator": "gru"}),
                "model": state}, tmp_path / "gru.pt")
    with pytest.raises(CheckpointError, match="gru.pt: model.aggregator='gru'"):
        load(tmp_path / "gru.pt")

