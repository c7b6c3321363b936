"""End to end: a reduced `make demo` (tiny corpus, few updates) through the real parts.

corpus -> manifests/labels -> pretraining -> fine-tuning (pretrained and from scratch) -> Viterbi
and 4-gram evaluation -> MLflow (embedded) and W&B (offline) -> report. Checks that every stage
left its artifacts, that pretraining leaves chance even at this size, that the report leads with the
effect and holds the demo rows with numbers, that the HTML parses with its plots embedded, and that
each step's wall time and peak memory are printed. Then re-runs the same command: everything is
reused, nothing retrained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRETRAIN_UPDATES = 200  # the demo model leaves chance on the 0.1 h corpus after ~150 (accuracy 0.145 at 150)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    command = [
        sys.executable, "-m", "repro", "experiment=demo",
        f"demo.corpus_dir={work / 'corpus'}", "demo.corpus_hours=0.1",
        f"demo.pretrain_updates={PRETRAIN_UPDATES}", "demo.finetune_updates={10m:20,1h:20}", "demo.splits=[10m,1h]",
        f"demo.report_dir={work / 'reports'}", f"hydra.run.dir={work / 'runs' / 'demo'}",
    ]  # the demo's default trackers: MLflow (embedded) and W&B (offline)
    # PYTHONPATH: the repro of this checkout, not whichever one the venv has installed
    env = {"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(work), "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=1800, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    second = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=1800, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    return work, first, second


def test_every_stage_left_its_artifacts(demo_run):
    work, first, _ = demo_run
    corpus = work / "corpus"
    assert (corpus / "corpus.json").exists() and (corpus / "lm" / "4-gram.bin").stat().st_size > 0
    assert (corpus / "manifests" / "pretrain" / "train.tsv").exists()
    for split in ("train_10m", "train_1h", "dev_clean", "dev_other", "test_clean", "test_other"):
        assert (corpus / "manifests" / "finetune" / f"{split}.ltr").exists(), split
    runs = work / "runs" / "demo"
    expected = ["pretrain"] + [f"{v}_{s}" for s in ("10m", "1h") for v in ("pretrained", "scratch")]
    for name in expected:
        run = runs / name
        assert json.loads((run / "status.json").read_text())["status"] == "finished", name
        assert (run / "checkpoints" / "checkpoint_last.pt").exists(), name
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps and max(steps) == (PRETRAIN_UPDATES if name == "pretrain" else 20), name
    results = json.loads((runs / "pretrained_1h" / "eval" / "results.json").read_text())
    assert set(results["results"]) >= {"dev_clean", "dev_other", "test_clean", "test_other"}
    assert set(results["results"]["dev_other"]) == {"viterbi", "kenlm_4gram"}
    assert (work / "runs" / "mlflow.db").exists()
    assert len(list(runs.glob("*/wandb/offline-run-*/run-*.wandb"))) == len(expected) + 1  # + self-training
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    steps = json.loads((runs / "steps.json").read_text())
    assert [s["name"] for s in steps][1:6] == ["demo/pretrain"] + [f"demo/{name}" for name in expected[1:]]
    assert all(0 < s["peak_rss_mb"] < 4096 for s in steps)  # bounded: the old demo held ~2.5 GB
    # demo.processes=2 (default): from-scratch fine-tuning runs beside the pretraining, each in a process
    by_name = {s["name"]: s for s in steps}
    pretrain_end = by_name["demo/pretrain"]["started"] + by_name["demo/pretrain"]["seconds"]
    assert by_name["demo/scratch_10m"]["started"] < pretrain_end
    assert by_name["demo/pretrained_10m"]["started"] >= pretrain_end
    # the self-training step (Xu et al.): the 10m model labelled the pool; re-fine-tuned, evaluated, compared
    st_run = runs / "self_training_10m"
    assert json.loads((st_run / "status.json").read_text())["status"] == "finished"
    compared = json.loads((st_run / "self_training.json").read_text())
    assert compared["compared"] == 8 and 0 <= compared["better_in"] <= 8  # 4 splits x 2 decodings
    assert "Self-training on 10m + the unlabeled pool labelled by the 10m model" in first.stdout
    assert "peak RSS (MiB)" in first.stdout


def test_pretraining_leaves_chance_at_reduced_size(demo_run):
    work, _, _ = demo_run
    run = work / "runs" / "demo" / "pretrain"
    valid = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [line["accuracy"] for line in valid if line.get("split") == "valid" and "accuracy" in line]
    chance = 1 / (1 + 20)  # 20 distractors (conf/model/wav2vec2_demo.yaml)
    assert accuracy[-1] > 2 * chance, accuracy
    codes = [line["code_perplexity"] for line in valid if line.get("split") == "valid"]
    assert codes[-1] > 0.5 * 2 * 4  # no collapse: at least half of the 2 x 4 codes in use


def test_mlflow_runs_are_named_after_their_directory_and_marked_as_training(demo_run):
    from mlflow.tracking import MlflowClient

    work, _, _ = demo_run
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    assert experiments and all(e.tags.get("mlflow.experimentKind") == "custom_model_development" for e in experiments)
    names = {run.info.run_name for e in experiments for run in client.search_runs([e.experiment_id])}
    assert {"demo/pretrain", "demo/pretrained_10m", "demo/scratch_10m", "demo/pretrained_1h", "demo/scratch_1h"} <= names


def test_report_holds_demo_rows_with_numbers_and_embedded_plots(demo_run):
    work, _, _ = demo_run
    html = (work / "reports" / "report.html").read_text()
    assert html.index("Word error rate (%), laid out as the paper") < html.index("low-resource labeled data")
    assert "demo goals met" in html and "<details>" in html  # the verdict leads; paper rows not run are folded
    markdown = (work / "reports" / "results.md").read_text()
    synthetic = markdown.split("## Synthetic corpus")[1].split("## Compute")[0]
    rows = [line for line in synthetic.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 * 2 * 2 + 2  # splits x (pretrained, scratch) x (viterbi, 4-gram), + self-training
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(_is_number(c) for c in cells[4:8]), row
    page = _Page()
    page.feed((work / "reports" / "report.html").read_text())
    assert len(page.images) >= 3
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "Synthetic corpus" in "".join(page.text)


def test_rerun_resumes_instead_of_retraining(demo_run):
    _, _, second = demo_run
    assert second.stderr.count("already finished") == 6  # pretraining, 4 fine-tunings, self-training


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_first_run_says_it_creates_the_tracking_store_and_checks_the_audio(demo_run):
    _, first, second = demo_run
    first_output, second_output = first.stdout + first.stderr, second.stdout + second.stderr
    assert "MLflow: creating the embedded store" in first_output
    assert "did not answer" not in first_output and "did not answer" not in second_output
    assert "creating the embedded store" not in second_output
    assert "audio check: " in first_output
    # each evaluation line once on the terminal (4 fine-tuning runs: 10m and 1h, pretrained and scratch; and
    # the self-training run)
    assert first_output.count("dev_other/viterbi: WER ") == 5
