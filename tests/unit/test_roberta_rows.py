"""The RoBERTa-on-units rows carry the paper's hyper-parameters (arXiv 1911.03912, vq-wav2vec §5.2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from repro.config import register_configs
from repro.report.paper import load_paper_rows

CONF = Path(__file__).resolve().parents[2] / "conf"
SPLITS = ("10m", "1h", "10h", "100h")


@pytest.fixture(scope="module")
def rows() -> dict:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        names = ["roberta_vq_kmeans", *(f"roberta_vq_{split}" for split in SPLITS)]
        return {name: compose("config", overrides=[f"experiment={name}"]) for name in names}


def test_pretraining_row_is_the_papers_bert_recipe(rows):
    cfg = rows["roberta_vq_kmeans"]
    assert cfg.task._name == "masked_lm" and cfg.model._name == "roberta" and cfg.criterion._name == "masked_lm"
    assert (cfg.model.encoder_layers, cfg.model.encoder_embed_dim, cfg.model.encoder_ffn_embed_dim,
            cfg.model.encoder_attention_heads) == (12, 768, 3072, 12)
    # 5% of the tokens start a span of N(10, 10) tokens: fairseq's mask_prob counts span starts x length
    assert math.isclose(cfg.task.mask_prob / cfg.task.mask_multiple_length, 0.05)
    assert cfg.task.mask_multiple_length == 10 and cfg.task.mask_stdev == 10.0
    assert cfg.optimization.lr == [1e-5] and cfg.optimization.max_update == 250_000
    assert cfg.lr_scheduler._name == "polynomial_decay" and cfg.lr_scheduler.warmup_updates == 10_000
    assert cfg.lr_scheduler.power == 1.0 and cfg.lr_scheduler.end_learning_rate == 0.0
    tokens_per_update = cfg.distributed_training.paper_world_size * cfg.dataset.max_tokens
    assert tokens_per_update == 128 * 3072  # 393k tokens
    assert cfg.task.tokens_per_sample <= cfg.model.max_positions
    assert cfg.stages == ["pretrain"]


@pytest.mark.parametrize("split", SPLITS)
def test_finetuning_rows_cite_the_paper_and_set_its_dropout(rows, split):
    cfg = rows[f"roberta_vq_{split}"]
    known = load_paper_rows()
    (row,) = cfg.paper.rows
    assert known[row].labeled_data == split and known[row].lm == "4-gram"
    assert known[row].paper == "discrete BERT (1911.03912)"
    assert cfg.model._name == "roberta_ctc" and cfg.task._name == "audio_finetuning" and cfg.task.labels == "ltr"
    # paper: dropout 0.1 in every layer for 10 min and 1 h, disabled for 10 h and 100 h
    assert cfg.model.dropout == (0.1 if split in ("10m", "1h") else 0.0)
    assert cfg.model.apply_mask and cfg.stages[-2:] == ["finetune", "evaluate"]
    assert list(cfg.paper.decoding) == ["viterbi", "kenlm_4gram"]
    assert "kenlm_4gram" in cfg.decodings and cfg.decodings.kenlm_4gram.type == "kenlm"


def test_synth_units_writes_what_the_masked_lm_task_reads(tmp_path):
    import argparse

    from repro.data.units import MaskedUnitDataset, MaskingConfig, load_unit_dictionary
    from repro.tools import synth_units

    assert synth_units.main(argparse.Namespace(dest=tmp_path, utterances=50, codes_per_group=4, seed=3)) == 0
    dictionary, mask_index = load_unit_dictionary(tmp_path / "dict.txt")
    counts = dictionary.counts[dictionary.nspecial:-1]
    assert counts == sorted(counts, reverse=True)  # fairseq preprocess order: most frequent first
    for split, lines in (("train", 50), ("valid", 5)):
        dataset = MaskedUnitDataset(tmp_path / f"{split}.src", dictionary, mask_index, MaskingConfig())
        assert len(dataset) == lines
    first = (tmp_path / "train.src").read_text()
    synth_units.main(argparse.Namespace(dest=tmp_path, utterances=50, codes_per_group=4, seed=3))
    assert (tmp_path / "train.src").read_text() == first  # same seed, same bytes
