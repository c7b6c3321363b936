"""The wav2vec / vq-wav2vec rows are the fairseq README commands (examples/wav2vec/README.md), in the
2019 meaning of their switches (--skip-connections-agg, --log-compression switch features on)."""

from __future__ import annotations

import ast
from pathlib import Path

from hydra import compose, initialize_config_dir

from repro.config import Wav2VecConfig, check_ranges, register_configs
from repro.models.wav2vec import Wav2VecModel, auto_offset
from repro.models.wav2vec2 import parse_conv_layers
from repro.tasks import task_module
from repro.tasks.common import model_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def test_wav2vec_large_is_the_readme_command():
    cfg = composed("wav2vec_large")
    model = cfg.model
    assert cfg.optimization.lr == [0.005] and cfg.optimization.max_update == 400000
    assert cfg.lr_scheduler._name == "cosine" and cfg.lr_scheduler.warmup_updates == 500
    assert cfg.lr_scheduler.warmup_init_lr == 1e-7 and cfg.lr_scheduler.min_lr == 1e-6
    assert cfg.optimization.stop_min_lr == 1e-9
    assert cfg.task.max_sample_size == 150000 and cfg.dataset.max_tokens == 1500000
    assert not cfg.criterion.infonce and cfg.criterion.loss_weights is None
    assert model.skip_connections_agg and model.log_compression and model.residual_scale == 0.5
    assert model.num_negatives == 10 and model.activation == "relu"
    assert [k for _, k, _ in ast.literal_eval(model.conv_aggregator_layers)] == list(range(2, 14))
    assert len(parse_conv_layers(model.conv_feature_layers)) == 7
    assert auto_offset(parse_conv_layers(model.conv_feature_layers)) == 3
    assert task_module(cfg).__name__ == "repro.tasks.wav2vec_pretraining"
    check_ranges(cfg)


def test_vq_wav2vec_rows_are_the_readme_command():
    gumbel, kmeans = composed("vq_wav2vec_gumbel"), composed("vq_wav2vec_kmeans")
    for cfg in (gumbel, kmeans):
        model = cfg.model
        assert cfg.optimization.lr == [1e-5] and cfg.lr_scheduler.warmup_updates == 1000
        assert cfg.dataset.max_tokens == 300000 and cfg.common.seed == 2
        assert cfg.distributed_training.distributed_world_size == 16  # "trained on 16 GPUs"
        assert model.activation == "gelu" and model.vq_groups == 2 and model.vq_depth == 2
        assert model.combine_groups and model.vq_vars == 320 and list(model.vq_temp) == [2.0, 0.5, 0.999995]
        assert model.skip_connections_agg and not model.log_compression  # 2019: no --log-compression = off
        assert len(parse_conv_layers(model.conv_feature_layers)) == 8
        assert not cfg.criterion.infonce
        check_ranges(cfg)
    assert gumbel.model.vq_type == "gumbel" and gumbel.criterion.loss_weights is None  # no diversity term
    assert kmeans.model.vq_type == "kmeans" and list(kmeans.criterion.loss_weights) == [1.0]


def test_rows_build_the_model_they_describe():
    for name in ("wav2vec_large", "vq_wav2vec_gumbel", "vq_wav2vec_kmeans", "demo_vq"):
        cfg = composed(name)
        model = Wav2VecModel(model_config(cfg.model, Wav2VecConfig))
        assert model.offset == 3
        assert (model.vector_quantizer is None) == (name == "wav2vec_large")


def test_demo_vq_pretrains_then_tokenizes():
    cfg = composed("demo_vq")
    assert list(cfg.stages) == ["pretrain", "tokenize"] and cfg.paper.synthetic
    assert cfg.model.vq_type == "gumbel" and not cfg.criterion.infonce
