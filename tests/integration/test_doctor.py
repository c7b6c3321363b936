"""`python -m repro.tools doctor RUN_DIR`: runs made to fail each way, and a healthy one.

Real tiny runs on the synthetic tone corpus (train_fixtures) where a failure shows within a few updates:
a healthy pretraining run, the same run resumed with a changed config, a fine-tuning run whose encoder
stays frozen and whose learning rate never leaves warmup (its checkpoint then made to emit only blanks).
Failures that take thousands of updates to appear (accuracy at chance, codebook collapse, a dominating
loss term, NaN, fp16 overflows) are crafted metrics.jsonl files beside a real config; data mistakes
(labels, dictionary, lexicon, LM) are crafted files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import finetune_config, make_corpus, pretrain_config  # noqa: E402

from repro.checkpoints.format import atomic_save  # noqa: E402
from repro.tools.__main__ import main as tools_main  # noqa: E402
from repro.track.jsonl import JsonlTracker  # noqa: E402
from repro.track.status import run_stages  # noqa: E402
from repro.train.stages import run_finetune, run_pretrain  # noqa: E402


def train(cfg, run_dir: Path, stage: str) -> Path:
    function = run_pretrain if stage == "pretrain" else run_finetune
    run_stages(cfg, run_dir, run_dir.name, [(stage, function)], gpus=0, tracker=JsonlTracker(run_dir))
    return run_dir


def doctor(run_dir: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()  # drop the training progress printed so far
    code = tools_main(["doctor", str(run_dir), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] == (code == 0)
    return code, report


def codes(report: dict) -> list[str]:
    return [finding["code"] for finding in report["findings"]]


def crafted(run_dir: Path, cfg, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("doctor") / "data")


@pytest.fixture(scope="module")
def healthy_run(corpus, tmp_path_factory) -> Path:
    cfg = pretrain_config(corpus, optimization={"max_update": 16}, checkpoint={"save_interval_updates": 8})
    return train(cfg, tmp_path_factory.mktemp("healthy") / "pretrain", "pretrain")


def test_healthy_run_gets_a_clean_bill(healthy_run, capsys):
    code, report = doctor(healthy_run, capsys)
    assert code == 0, report
    assert tools_main(["doctor", str(healthy_run)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_resumed_run_with_a_changed_config(healthy_run, tmp_path, capsys):
    run_dir = tmp_path / "resumed"
    shutil.copytree(healthy_run, run_dir)
    # A changed learning rate is refused on resume unless checkpoint.reset_lr_scheduler accepts it.
    cfg = pretrain_config(Path(OmegaConf.load(healthy_run / "config.yaml").task.data),
                          optimization={"max_update": 18, "lr": [1e-3]},
                          checkpoint={"save_interval_updates": 8, "reset_lr_scheduler": True})
    train(cfg, run_dir, "pretrain")
    code, report = doctor(run_dir, capsys)
    assert code == 1 and codes(report) == ["config_changed_on_resume"]
    evidence = " | ".join(report["findings"][0]["evidence"])
    assert "optimization.lr: [0.005] -> [0.001]" in evidence and "optimization.max_update: 16 -> 18" in evidence
    assert "(update 8)" in evidence  # the oldest checkpoint trained with the old config


def test_finetuning_stuck_frozen_in_warmup_all_blank(corpus, tmp_path, capsys):
    cfg = finetune_config(corpus, None, model={"freeze_finetune_updates": 10},
                          lr_scheduler={"_name": "polynomial_decay", "warmup_updates": 50})
    run_dir = train(cfg, tmp_path / "finetune", "finetune")
    # A model that emits only blanks (what CTC fine-tuning does for its first thousands of updates).
    last = run_dir / "checkpoints" / "checkpoint_last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["model"]["w2v_encoder.proj.bias"][0] += 100.0
    atomic_save(checkpoint, last)
    code, report = doctor(run_dir, capsys)
    assert code == 1
    findings = {f["code"]: f for f in report["findings"]}
    assert set(findings) == {"wer_stuck", "lr_never_left_warmup"}
    stuck = findings["wer_stuck"]
    assert "only blanks" in stuck["title"]
    evidence = " | ".join(stuck["evidence"])
    assert "argmax is the blank on 100.0% of frames" in evidence
    assert "freeze_finetune_updates=10, update count 6: the encoder never trained" in evidence
    assert "still in warmup at update 6: lr 0.00012 = 12% of the peak 0.001" in evidence
    assert "freeze_finetune_updates" in stuck["fix"] and "warmup" in stuck["fix"]
    assert "warmup_updates=50 >= max_update=6" in " ".join(findings["lr_never_left_warmup"]["evidence"])


def _pretrain_records(steps: int, **values) -> list[dict]:
    base = {"loss": 4.0, "loss_0": 3.8, "loss_1": 0.1, "loss_2": 0.1, "accuracy": 0.3, "code_perplexity": 20.0,
            "lr": 0.005, "gnorm": 1.0}
    return [{"step": step, "split": "train", "time": 0.0, **base, **values} for step in range(1, steps + 1)]


def test_crafted_pretraining_failures(corpus, tmp_path, capsys):
    cfg = pretrain_config(corpus)  # tiny model: 20 negatives (chance 1/21), G x V = 2 x 16
    healthy = crafted(tmp_path / "healthy", cfg, _pretrain_records(6))
    assert doctor(healthy, capsys)[0] == 0

    chance = crafted(tmp_path / "chance", cfg, _pretrain_records(6, accuracy=0.05))
    code, report = doctor(chance, capsys)
    assert code == 1 and codes(report) == ["accuracy_at_chance"]
    assert "1/(1 + 20 negatives) = 0.0476" in report["findings"][0]["evidence"][0]

    collapsed = crafted(tmp_path / "collapse", cfg, _pretrain_records(6, code_perplexity=1.3))
    code, report = doctor(collapsed, capsys)
    assert codes(report) == ["codebook_collapse"] and "G x V = 32" in report["findings"][0]["evidence"][0]

    penalty = crafted(tmp_path / "penalty", cfg, _pretrain_records(6, loss_2=5.0, loss=8.9))
    code, report = doctor(penalty, capsys)
    assert codes(report) == ["extra_loss_dominates"] and "feature penalty" in report["findings"][0]["title"]
    assert "loss_weights[1]" in report["findings"][0]["fix"]


def test_crafted_divergence_and_fp16_overflows(corpus, tmp_path, capsys):
    cfg = pretrain_config(corpus, common={"fp16": True})
    records = _pretrain_records(6)
    records[4]["loss"] = float("nan")
    for record, scale in zip(records, [128.0, 64.0, 32.0, 16.0, 8.0, 4.0]):
        record["loss_scale"] = scale
    code, report = doctor(crafted(tmp_path / "nan", cfg, records), capsys)
    assert code == 1 and codes(report) == ["diverged", "fp16_overflows"]
    assert "first logged at update 5" in report["findings"][0]["evidence"][0]
    assert "fell 5 times, from 128" in report["findings"][1]["evidence"][0]


def test_data_mistakes_labels_dictionary_lexicon_lm(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    labels = (data / "valid.ltr").read_text().splitlines()
    (data / "valid.ltr").write_text("\n".join(labels[:-1]) + "\n")  # one label line lost
    (data / "dict.ltr.txt").write_text("".join(f"{s} 10\n" for s in "ABCDE"))  # no '|'
    lexicon = tmp_path / "lexicon.lst"
    lexicon.write_text("ab\ta b |\ncab\tc a b |\n")  # lower-case spellings, dictionary is upper case
    arpa = tmp_path / "lm.arpa"
    arpa.write_text("\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\tAB\n-1.0\tCAB\n-1.0\tDE\n\n\\end\\\n")
    cfg = finetune_config(data, None, decode={"type": "kenlm", "lexicon": str(lexicon), "lm_model": str(arpa)})
    code, report = doctor(crafted(tmp_path / "run", cfg, []), capsys)
    assert code == 1
    by_title = {f["title"]: f for f in report["findings"]}
    assert codes(report) == ["labels_out_of_step", "dictionary_mismatch", "dictionary_mismatch",
                             "dictionary_mismatch"], list(by_title)
    out_of_step = report["findings"][0]
    assert "valid.tsv: 8 utterances" in out_of_step["evidence"][0] and "7 label lines" in out_of_step["evidence"][0]
    assert "repro.tools labels" in out_of_step["fix"]
    assert any("no word delimiter" in title for title in by_title)
    assert any("symbols the dictionary lacks" in title for title in by_title)
    lm_finding = next(f for title, f in by_title.items() if "LM does not know" in title)
    assert "LM words are upper case, lexicon words lower case" in lm_finding["evidence"][0]


def test_not_a_run_directory(tmp_path, capsys):
    assert tools_main(["doctor", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
