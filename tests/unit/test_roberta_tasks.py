"""RoBERTa through the project's trainer: masked-LM pretraining on synthetic unit 'speech' beats the
unigram baseline; its checkpoint fine-tunes with CTC on letter targets and resumes; the fairseq-format
released file fine-tunes too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from roberta_files import synthetic_unit_corpus, unit_codes, write_2019_checkpoint, write_unit_dictionary

from repro.checkpoints.fairseq import load
from repro.config import ReproConfig
from repro.data.units import UnitFileError, unigram_accuracy
from repro.decode.evaluate import run_evaluate
from repro.track.jsonl import JsonlTracker
from repro.train.stages import run_finetune, run_pretrain

CODES = unit_codes(20)
TINY = {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 4,
        "max_positions": 64, "dropout": 0.0, "attention_dropout": 0.0}


def write_corpus(data: Path, seed: int = 0) -> dict[str, list[str]]:
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_unit_dictionary(data / "dict.txt", CODES)
    lines = synthetic_unit_corpus(240, rng, CODES)
    splits = {"train": lines[:200], "valid": lines[200:]}
    for split, rows in splits.items():
        (data / f"{split}.src").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return splits


def config(data: Path, **groups) -> OmegaConf:
    base = {
        "common": {"seed": 1, "cpu": True, "log_interval": 50, "log_format": "none"},
        "dataset": {"num_workers": 0, "max_tokens": 1200, "required_batch_size_multiple": 1,
                    "validate_interval_updates": 0},
        "checkpoint": {"save_interval_updates": 0, "best_checkpoint_metric": "loss"},
        "tracker": {"backends": []},
    }
    return OmegaConf.merge(OmegaConf.structured(ReproConfig), base, groups, {"task": {"data": str(data)}})


def pretrain_config(data: Path, **groups) -> OmegaConf:
    return config(
        data, task={"_name": "masked_lm", "tokens_per_sample": 64, "mask_prob": 0.3, "mask_multiple_length": 3,
                    "mask_stdev": 1.0},
        model={"_name": "roberta", **TINY}, criterion={"_name": "masked_lm"},
        optimization={"max_update": 200, "lr": [2e-3], "clip_norm": 1.0}, lr_scheduler={"warmup_updates": 20},
        **groups,
    )


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def train(stage, cfg, run_dir: Path) -> None:
    tracker = JsonlTracker(run_dir)
    stage(cfg, run_dir, tracker)
    tracker.finish()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    splits = write_corpus(root / "data")
    train(run_pretrain, pretrain_config(root / "data"), root / "run")
    return root, splits


def test_masked_lm_beats_the_unigram_baseline(pretrained):
    root, splits = pretrained
    train_records, (valid,) = records(root / "run", "train"), records(root / "run", "valid")
    assert [r["step"] for r in train_records] == [50, 100, 150, 200]
    baseline = unigram_accuracy(splits["valid"])
    assert valid["accuracy"] > 2 * baseline, (valid, baseline)  # measured: 0.31 vs 0.117
    assert train_records[-1]["accuracy"] > train_records[0]["accuracy"] + 0.1
    assert valid["ppl"] == pytest.approx(2 ** valid["loss"], rel=1e-6)
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5
    loaded = load(root / "run" / "checkpoints" / "checkpoint_best.pt")
    assert loaded.kind == "roberta" and loaded.dictionary.symbols[-1] == "<mask>"


def test_pretrained_units_model_fine_tunes_with_ctc_and_resumes(pretrained, tmp_path):
    root, splits = pretrained
    data = root / "data"
    letters = "ABCDEF"
    for split, rows in splits.items():  # a letter per unit word: labels the features can carry
        (data / f"{split}.ltr").write_text("".join(" ".join(letters[len(row) % 6] * 2) + " |\n" for row in rows))
    (data / "dict.ltr.txt").write_text("| 10\n" + "".join(f"{letter} 5\n" for letter in letters))
    cfg = config(data, task={"_name": "audio_finetuning", "labels": "ltr"},
                 model={"_name": "roberta_ctc", "w2v_path": str(root / "run" / "checkpoints" / "checkpoint_best.pt"),
                        "apply_mask": True, "mask_prob": 0.1, "mask_length": 2, "final_dropout": 0.1},
                 criterion={"_name": "ctc"}, optimization={"max_update": 10, "lr": [1e-3], "sentence_avg": True},
                 lr_scheduler={"warmup_updates": 2}, common={"log_interval": 5},
                 checkpoint={"best_checkpoint_metric": "wer", "save_interval_updates": 5})
    train(run_finetune, cfg, tmp_path / "ft")
    (valid,) = records(tmp_path / "ft", "valid")
    assert np.isfinite(valid["loss"]) and 0 <= valid["uer"] and "wer" in valid
    fine_tuned = load(tmp_path / "ft" / "checkpoints" / "checkpoint_last.pt")
    assert fine_tuned.kind == "roberta_ctc" and fine_tuned.dictionary.symbols[4:] == ["|", *letters]
    resumed = OmegaConf.merge(cfg, {"optimization": {"max_update": 15}, "checkpoint": {"reset_lr_scheduler": True}})
    train(run_finetune, resumed, tmp_path / "ft")  # resumes at update 10 with the model's and units' setup
    assert [r["step"] for r in records(tmp_path / "ft", "train")] == [5, 10, 15]

    # stage evaluate decodes the units of every split with the row's decoders
    evaluation = OmegaConf.merge(cfg, {"paper": {"eval_splits": ["valid", "test"], "decoding": ["viterbi"]}})
    summary = run_evaluate(evaluation, tmp_path / "ft")
    assert list(summary) == ["valid"]  # no test.src: skipped
    result = json.loads((tmp_path / "ft" / "eval" / "results.json").read_text())["results"]["valid"]["viterbi"]
    assert result == summary["valid"]["viterbi"] and 0 <= result["uer"]


def test_released_bert_kmeans_fine_tunes_and_rejects_foreign_units(tmp_path):
    released = tmp_path / "bert_kmeans"
    write_2019_checkpoint(released, CODES)
    data = tmp_path / "data"
    rows = [" ".join(row.split()[:30]) for row in synthetic_unit_corpus(12, np.random.default_rng(3), CODES)]
    (data).mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.src").write_text("\n".join(rows) + "\n")
        (data / f"{split}.ltr").write_text("A B |\n" * len(rows))
    (data / "dict.ltr.txt").write_text("| 3\nA 2\nB 1\n")
    cfg = config(data, task={"_name": "audio_finetuning", "labels": "ltr"},
                 model={"_name": "roberta_ctc", "w2v_path": str(released / "model.pt")},
                 criterion={"_name": "ctc"}, optimization={"max_update": 2, "lr": [1e-4], "sentence_avg": True},
                 lr_scheduler={"warmup_updates": 1}, dataset={"disable_validation": True})
    train(run_finetune, cfg, tmp_path / "ft")
    assert load(tmp_path / "ft" / "checkpoints" / "checkpoint_last.pt").model_cfg.max_positions == 40
    (data / "train.src").write_text(rows[0] + " 5-5\n" + "\n".join(rows[1:]) + "\n")  # a code bert_kmeans lacks
    with pytest.raises(UnitFileError, match=r"train\.src:1: code '5-5'"):
        train(run_finetune, cfg, tmp_path / "ft2")
