"""§4.3's lr x seed grid: every point fine-tuned in its own run directory, the winner by the selection WER,
resumed points skipped, the winner evaluated in the row's directory; self-training rows without pseudo-labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from repro.config import CONF_DIR, register_configs
from repro.launch.plan import describe_selection
from repro.report import selection
from repro.report.collect import record_from_run_dir
from repro.report.paper import load_paper_rows
from repro.report.tables import build_tables
from repro.track.status import missing_pseudo_labels, read_status

# dev-other WER each grid point "reaches" in this test: lr 3e-5 seed 2 is the best
WER = {(2e-5, 1): 12.0, (2e-5, 2): 11.0, (2e-5, 3): 11.5, (3e-5, 1): 10.5, (3e-5, 2): 9.75, (3e-5, 3): 10.0}


def compose_row(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "tracker=none", *overrides])


@pytest.fixture(scope="module")
def base_10m():
    return compose_row("base_10m")


def recording_stages(calls: list):
    """finetune writes a checkpoint; evaluate writes results.json as run_evaluate does (split -> decoding -> wer)."""

    def finetune(cfg, run_dir: Path, tracker=None):
        calls.append(("finetune", run_dir.name, cfg.optimization.lr[0], cfg.common.seed))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "checkpoint_best.pt").write_text(f"{cfg.optimization.lr[0]} {cfg.common.seed}")

    def evaluate(cfg, run_dir: Path, tracker=None):
        calls.append(("evaluate", run_dir.name, cfg.common_eval.path, list(cfg.paper.decoding),
                      list(cfg.paper.eval_splits)))
        if cfg.common_eval.path:  # the row's evaluation of the winner: every decoding the paper reports
            results = {split: {name: {"wer": 5.0} for name in cfg.paper.decoding} for split in cfg.paper.eval_splits}
            metrics = [{"split": f"{split}/{name}", "step": 0, "wer": 5.0}
                       for split in cfg.paper.eval_splits for name in cfg.paper.decoding]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        else:
            wer = WER[(cfg.optimization.lr[0], cfg.common.seed)]
            results = {cfg.paper.eval_splits[0]: {"selection": {"wer": wer}}}
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / "results.json").write_text(json.dumps({"results": results}))
        return results

    return [("finetune", finetune), ("evaluate", evaluate)]


def test_the_grid_is_the_papers(base_10m):
    points = selection.grid_points(base_10m.selection)
    assert [(p.lr, p.seed) for p in points] == list(WER)
    point_cfg = selection.point_config(base_10m, points[4])
    assert point_cfg.optimization.lr == [3e-5] and point_cfg.common.seed == 2 and point_cfg.selection.type == "none"
    assert list(point_cfg.paper.decoding) == ["selection"] and list(point_cfg.paper.eval_splits) == ["dev_other"]
    assert point_cfg.paper.rows == []  # a trial is never reported against the paper
    decoding = point_cfg.decodings.selection
    assert (decoding.type, decoding.beam, decoding.lm_weight, decoding.word_score) == ("kenlm", 50, 2.0, -1.0)


def test_choose_and_spread_are_plain_numbers():
    scores = {selection.GridPoint(lr, seed): wer for (lr, seed), wer in WER.items()}
    assert selection.choose(scores) == selection.GridPoint(3e-5, 2)
    tied = {selection.GridPoint(2e-5, 1): 9.0, selection.GridPoint(3e-5, 1): 9.0}
    assert selection.choose(tied) == selection.GridPoint(2e-5, 1)  # ties: first in grid order
    spread = selection.seed_spread(scores)
    assert spread["3e-05"]["mean"] == pytest.approx((10.5 + 9.75 + 10.0) / 3)
    assert spread["2e-05"]["std"] == pytest.approx(0.5) and spread["2e-05"]["seeds"] == 3
    with pytest.raises(selection.SelectionError):
        selection.choose({})


def test_grid_runs_every_point_resumes_and_evaluates_the_winner(base_10m, tmp_path):
    calls: list = []
    stages = selection.grid_stages(base_10m, recording_stages(calls), gpus=0)
    assert [name for name, _ in stages] == ["finetune", "evaluate"]
    run_grid, run_select = (function for _, function in stages)

    with pytest.raises(selection.SelectionError, match="without a dev_other score"):
        run_select(base_10m, tmp_path, None)  # nothing fine-tuned yet
    scores = run_grid(base_10m, tmp_path, None)
    assert scores == {f"lr{lr:g}_seed{seed}": wer for (lr, seed), wer in WER.items()}
    assert [c[2:4] for c in calls if c[0] == "finetune"] == list(WER)
    assert all(read_status(tmp_path / "grid" / name)["status"] == "finished" for name in scores)

    calls.clear()
    run_grid(base_10m, tmp_path, None)  # a re-run resumes: finished points are not trained again
    assert calls == []

    run_select(base_10m, tmp_path, None)
    record = json.loads((tmp_path / "selection.json").read_text())
    assert (record["winner"]["lr"], record["winner"]["seed"], record["winner"]["wer"]) == (3e-5, 2, 9.75)
    assert record["criterion"] == {"split": "dev_other", "decoding": "kenlm", "beam": 50, "lm_weight": 2.0,
                                   "word_score": -1.0}
    (_, run_name, checkpoint, decodings, splits), = calls
    assert run_name == tmp_path.name and checkpoint.endswith("grid/lr3e-05_seed2/checkpoints/checkpoint_best.pt")
    assert decodings == ["viterbi", "kenlm_4gram", "transformer"] and "test_other" in splits

    # the report joins the row's run (not the trials) with the paper and shows the selection
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(base_10m, resolve=True))
    (tmp_path / "status.json").write_text(json.dumps({"name": "base_10m", "status": "finished"}))
    record = record_from_run_dir(tmp_path)
    table1 = {row.row_id: row for row in build_tables([record], load_paper_rows())[0].rows}
    row = table1["w2v2-t9-base-ls-960-10m-none"]
    assert row.ours["dev_other"] == 5.0 and row.paper["dev_other"] == 51.5
    assert "selected lr 3e-05 seed 2 (dev_other 9.75)" in row.status and "lr 2e-05 11.50 ± 0.50 (n=3)" in row.status
    assert record_from_run_dir(tmp_path / "grid" / "lr3e-05_seed2").rows == []  # a trial cites no paper row


def test_selection_none_is_one_plain_run(tmp_path):
    cfg = compose_row("base_10m", "selection=none", "optimization.lr=[3e-5]")
    calls: list = []
    stages = recording_stages(calls)
    assert selection.grid_stages(cfg, stages, gpus=0) == stages
    assert describe_selection(cfg) is None
    assert "6 fine-tunings" in describe_selection(compose_row("base_10m"))


def test_a_self_training_row_does_not_masquerade(tmp_path):
    row = compose_row("large_lv60_10m_st", "stage=finetune")
    problem = missing_pseudo_labels(row, tmp_path)
    assert problem is not None and "pseudo_label" in problem and "experiment=large_lv60_10m" in problem
    assert missing_pseudo_labels(compose_row("large_lv60_10m_st", "stage=pseudo_label"), tmp_path) is None
    assert missing_pseudo_labels(compose_row("large_lv60_10m_st", "stage=evaluate", "common_eval.path=/m/st.pt"),
                                 tmp_path) is None  # evaluating a released self-trained checkpoint is allowed
    assert missing_pseudo_labels(compose_row("large_lv60_10m", "stage=finetune"), tmp_path) is None
    (tmp_path / "status.json").write_text(json.dumps({"status": "finished", "completed_stages": ["pseudo_label"]}))
    assert missing_pseudo_labels(row, tmp_path) is None

    # a run directory of the row whose pseudo_label never finished is not reported against Xu et al.
    plain = compose_row("large_lv60_10m_st")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(plain, resolve=True))
    (tmp_path / "status.json").write_text(json.dumps({"status": "finished", "completed_stages": ["finetune"]}))
    assert record_from_run_dir(tmp_path).rows == []
    (tmp_path / "status.json").write_text(json.dumps({"status": "finished",
                                                      "completed_stages": ["pseudo_label", "finetune", "evaluate"]}))
    assert record_from_run_dir(tmp_path).rows == list(plain.paper.rows)
