"""Report: paper row ids, collection from run directories, renderers against reviewed golden files."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from repro.report.__main__ import main as report_main
from repro.report.__main__ import write_report
from repro.report.collect import RunRecord, collect_run_dirs
from repro.report.paper import load_paper_rows, make_row_id
from repro.report.render import to_csv, to_latex, to_markdown
from repro.report.tables import build_tables, compute_rows

GOLDEN = Path(__file__).parent.parent / "golden" / "report"
UPDATE_GOLDEN = os.environ.get("REPRO_UPDATE_GOLDEN") == "1"


def fixed_records() -> list[RunRecord]:
    """A fixed set of runs: three LibriSpeech rows (two finished, one failed) and two demo runs."""
    return [
        RunRecord(
            name="base_10m",
            run_dir="runs/base_10m",
            status="finished",
            stage="finetune,evaluate",
            rows=["w2v2-t1-base-ls-960-10m-4-gram", "w2v2-t1-base-ls-960-10m-transf"],
            model="BASE",
            pretrain_data="LS-960",
            labeled_data="10m",
            results={
                "kenlm_4gram": {"dev_clean": {"wer": 9.3}, "dev_other": {"wer": 15.1}, "test_clean": {"wer": 9.6}, "test_other": {"wer": 16.0}},
                "viterbi": {"dev_clean": {"wer": 46.0}},
            },
            wall_seconds=7200.0,
            gpus=8,
            paper_gpu_hours=8 * 13.0,
        ),
        RunRecord(
            name="large_lv60_100h",
            run_dir="runs/large_lv60_100h",
            status="failed",
            stage="finetune",
            rows=["w2v2-t1-large-lv-60k-100h-transf"],
            model="LARGE",
            pretrain_data="LV-60k",
            labeled_data="100h",
        ),
        RunRecord(
            name="large_lv60_10m_st",
            run_dir="runs/large_lv60_10m_st",
            status="finished",
            stage="pseudo_label,finetune,evaluate",
            rows=["st-t1-wav2vec-2-0-large-st-ctc-ft-lv-60k-10m-with-lm-see-notes"],
            model="LARGE",
            pretrain_data="LV-60k",
            labeled_data="10m",
            results={"kenlm_4gram": {"dev_clean": {"wer": 3.1}, "dev_other": {"wer": 5.0}, "test_clean": {"wer": 3.3},
                                     "test_other": {"wer": 5.6}}},
        ),
        RunRecord(
            name="demo/pretrained_1h",
            run_dir="runs/demo/finetune_1h",
            status="finished",
            stage="finetune",
            synthetic=True,
            model="tiny",
            pretrain_data="synthetic",
            labeled_data="1h",
            results={"viterbi": {"dev-clean": {"wer": 41.25}, "test-other": {"wer": 60.5}}, "kenlm_4gram": {"dev-clean": {"wer": 30.0}}},
            curves={"train/loss": [(1, 5.0), (2, 4.0)], "valid/wer": [(2, 80.0)]},
            wall_seconds=60.0,
        ),
        RunRecord(
            name="demo/scratch_1h",
            run_dir="runs/demo/scratch_1h",
            status="finished",
            stage="finetune",
            synthetic=True,
            model="tiny",
            pretrain_data="synthetic",
            labeled_data="1h",
            pretrained=False,
            results={"viterbi": {"dev-clean": {"wer": 95.0}}},
        ),
    ]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing (generate with REPRO_UPDATE_GOLDEN=1, review, commit)"
    assert text == path.read_text(), f"{name} differs from its reviewed golden file"


def test_row_ids_are_unique_and_stable():
    rows = load_paper_rows()
    assert len(rows) == 216  # one id per line of paper_results.csv
    base = rows["w2v2-t1-base-ls-960-10m-4-gram"]
    assert (base.model, base.labeled_data, base.lm) == ("BASE", "10m", "4-gram")
    assert base.values == {"dev_clean": 8.9, "dev_other": 15.7, "test_clean": 9.1, "test_other": 15.6}
    record = {"paper": "vq-wav2vec (1910.05453)", "table": "WSJ-main", "model": "wav2vec", "pretrain_data": "LS-960",
              "labeled_data": "WSJ si284 (81h)", "lm": "No LM", "metric": "LER"}
    assert make_row_id(record) == "vqw2v-twsj-main-wav2vec-ls-960-wsj-si284-81h-no-lm-ler"


def test_tables_join_ours_with_paper_and_keep_synthetic_apart():
    tables = build_tables(fixed_records(), load_paper_rows())
    assert [t.title.split(":")[0] for t in tables] == [
        "Table 1 (+ Appendix C Table 9)", "Table 2 (+ Appendix C Table 10)", "Table 3", "Xu et al. 2021 Table 1",
        "Xu et al. 2021",
        "Synthetic corpus (demo; not comparable with LibriSpeech numbers)"]
    table1 = {r.row_id: r for r in tables[0].rows}
    # every row we re-run has its no-LM, 4-gram and Transformer lines (Tables 1 + 9)
    assert {r.lm for r in tables[0].rows if (r.model, r.pretrain_data, r.labeled_data) == ("LARGE", "LV-60k", "10m")} == {
        "None", "4-gram", "Transf."}
    assert table1["w2v2-t9-base-ls-960-10m-none"].paper["dev_other"] == 51.5
    assert {r.lm for r in tables[1].rows if r.model.startswith("LARGE - from scratch")} == {"None", "4-gram", "Transf."}
    assert [r.paper for r in tables[2].rows] == [{"dev_clean": 7.4, "dev_other": None, "test_clean": 8.3, "test_other": None}]
    base = table1["w2v2-t1-base-ls-960-10m-4-gram"]
    assert base.status == "finished"
    assert base.delta("dev_clean") == pytest.approx(9.3 - 8.9)
    assert table1["w2v2-t1-base-ls-960-10m-transf"].ours == {"dev_clean": None, "dev_other": None, "test_clean": None, "test_other": None}
    assert table1["w2v2-t1-large-lv-60k-100h-transf"].status == "failed"
    assert table1["w2v2-t1-large-ls-960-1h-transf"].status == "not run"
    # Xu et al.'s "with LM" rows show our best LM decoding present (here the 4-gram), and say so
    self_training = {r.row_id: r for r in tables[3].rows}
    st = self_training["st-t1-wav2vec-2-0-large-st-ctc-ft-lv-60k-10m-with-lm-see-notes"]
    assert st.status == "finished" and st.lm == "with LM (see notes): ours 4-gram"
    assert st.delta("test_clean") == pytest.approx(3.3 - 3.0) and st.delta("test_other") == pytest.approx(5.6 - 5.2)
    assert all("ST (ctc ft)" in r.model for r in tables[3].rows)  # s2s scratch and baselines are not re-run
    assert [r.paper["test_other"] for r in tables[4].rows] == [3.1]  # 960 h, as quoted by HuBERT
    synthetic = tables[5].rows
    assert all(not r.paper for r in synthetic)  # never joined with LibriSpeech numbers
    assert {(r.pretrain_data, r.lm) for r in synthetic} == {("synthetic", "None"), ("synthetic", "4-gram"), ("none (from scratch)", "None")}


def test_renderers_match_golden_files():
    records = fixed_records()
    tables = build_tables(records, load_paper_rows())
    check_golden("results.md", to_markdown(tables, compute_rows(records)))
    check_golden("results.tex", to_latex(tables))
    check_golden("results.csv", to_csv(tables))


class _ImageCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1


def _write_run_dir(path: Path, config: dict, lines: list[dict], status: dict) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "status.json").write_text(json.dumps(status))
    with (path / "metrics.jsonl").open("w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
        handle.write('{"step": 9, "spl')  # a run killed mid-write leaves a partial line


def test_collect_from_run_dirs_and_write_self_contained_html(tmp_path):
    runs = tmp_path / "runs"
    pretrain_lines = [
        {"step": s, "split": "train", "time": 0.0, "loss": 6.0 - s, "prob_perplexity": 10.0 + s, "code_perplexity": 9.0 + s, "temp": 2.0 * 0.99**s}
        for s in range(1, 5)
    ]
    _write_run_dir(
        runs / "demo" / "pretrain",
        {"experiment": "demo", "paper": {"synthetic": True, "model_label": "tiny", "pretrain_data": "synthetic"}, "model": {"_name": "wav2vec2"}},
        pretrain_lines,
        {"status": "finished", "name": "demo/pretrain", "stage": "pretrain", "wall_seconds": 30.0, "gpus": 0},
    )
    finetune_lines = [{"step": 10, "split": "train", "loss": 3.0}, {"step": 10, "split": "valid", "wer": 70.0},
                      {"step": 10, "split": "dev_clean/viterbi", "wer": 55.5, "uer": 20.0}]
    _write_run_dir(
        runs / "demo" / "finetune_10m",
        {"experiment": "demo", "paper": {"synthetic": True, "model_label": "tiny", "pretrain_data": "synthetic", "labeled_data": "10m"},
         "model": {"_name": "wav2vec_ctc"}},
        finetune_lines,
        {"status": "finished", "name": "demo/finetune_10m", "stage": "finetune", "wall_seconds": 20.0, "gpus": 0},
    )
    records = collect_run_dirs(runs)
    assert [r.name for r in records] == ["demo/finetune_10m", "demo/pretrain"]
    finetune, pretrain = records
    assert finetune.results == {"viterbi": {"dev_clean": {"wer": 55.5, "uer": 20.0}}}
    assert pretrain.curves["train/prob_perplexity"] == [(s, 10.0 + s) for s in range(1, 5)]

    assert report_main(["--runs", str(runs), "--out", str(tmp_path / "reports")]) == 0
    page = (tmp_path / "reports" / "report.html").read_text()
    parser = _ImageCollector()
    parser.feed(page)
    assert parser.tables >= 4  # tables 1, 2, synthetic, compute
    assert len(parser.images) >= 3 and all(src.startswith("data:image/png;base64,iVBOR") for src in parser.images)
    assert "55.5" in page
    # the Markdown leads as the page does: the demo's verdict and its own table, the paper's unrun rows folded last
    markdown = (tmp_path / "reports" / "results.md").read_text()
    assert markdown.index("## What the demo shows") < markdown.index("## Synthetic corpus") < markdown.index("## Compute")
    assert markdown.index("## Compute") < markdown.index("<details><summary>Table 1")
    assert "| not run |" not in markdown and "55.5" in markdown
    written = write_report(records, tmp_path / "again")
    assert {"plot:code_usage", "plot:finetuning_error", "plot:pretraining_loss"} <= set(written)


def test_collect_from_mlflow_when_the_run_directories_are_gone(tmp_path):
    """A store on a tracking server outlives the cluster's scratch disk: rebuild the record from the
    run's params, tags and metric histories (names as repro.track logs them)."""
    from mlflow.tracking import MlflowClient

    from repro.report.collect import collect_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("wav2vec2.0 Table 1")
    run = client.create_run(experiment, run_name="base_10m", tags={
        "repro.run_dir": str(tmp_path / "gone"), "repro.stage": "finetune,evaluate"})
    run_id = run.info.run_id
    for key, value in {"paper.rows": '["w2v2-t1-base-ls-960-10m-4-gram"]', "paper.synthetic": "False",
                       "paper.model_label": "BASE", "paper.pretrain_data": "LS-960", "paper.labeled_data": "10m",
                       "paper.gpus": "8", "paper.hours": "None", "model._name": "wav2vec_ctc"}.items():
        client.log_param(run_id, key, value)
    for step, loss in ((1, 9.0), (2, 7.5)):
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_metric(run_id, "dev_other/kenlm_4gram/wer", 15.9, step=0)
    client.set_terminated(run_id, "FINISHED")

    (record,) = collect_mlflow(uri)
    assert (record.name, record.status, record.stage) == ("base_10m", "finished", "finetune,evaluate")
    assert record.rows == ["w2v2-t1-base-ls-960-10m-4-gram"] and record.model == "BASE"
    assert record.paper_gpu_hours is None  # 'None' hours stays unknown, not a crash
    assert record.results == {"kenlm_4gram": {"dev_other": {"wer": 15.9}}}
    assert record.curves["train/loss"] == [(1, 9.0), (2, 7.5)]
    table1 = build_tables([record], load_paper_rows())[0]
    row = next(r for r in table1.rows if r.row_id == "w2v2-t1-base-ls-960-10m-4-gram")
    assert row.ours["dev_other"] == 15.9 and row.paper["dev_other"] == 15.7
