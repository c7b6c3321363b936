"""The engine learns: on the tone corpus a tiny pretraining run lowers the contrastive loss (train and
validation) without codebook collapse. (Fine-tuning needs ~150 updates to move the WER on this corpus,
too long for the suite; the resume test covers its mechanics.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import make_corpus, pretrain_config  # noqa: E402

from repro.track.jsonl import JsonlTracker  # noqa: E402
from repro.train.stages import run_pretrain  # noqa: E402


def curve(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def run(stage, cfg, run_dir: Path) -> None:
    tracker = JsonlTracker(run_dir)
    stage(cfg, run_dir, tracker)
    tracker.finish()


def test_pretraining_learns_without_collapse(tmp_path):
    data = make_corpus(tmp_path / "data", train=48, valid=12, seed=1)
    pretrain_cfg = pretrain_config(
        data, optimization={"max_update": 40, "lr": [2e-3]}, lr_scheduler={"warmup_updates": 5},
        common={"log_interval": 10, "log_format": "none"}, checkpoint={"save_interval_updates": 0},
        dataset={"validate_interval_updates": 0},
    )
    run(run_pretrain, pretrain_cfg, tmp_path / "pt")
    train = curve(tmp_path / "pt", "train")
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3, [r["loss"] for r in train]
    # 2 groups x 16 codewords: a collapsed quantizer would use a handful of codes
    assert min(r["code_perplexity"] for r in train) > 6.0
    (valid,) = curve(tmp_path / "pt", "valid")
    assert valid["step"] == 40 and valid["loss"] < train[0]["loss"] - 0.3
