"""The Hydra app and the tool dispatcher: composition, clear errors, honest 'not built' stages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from repro.cli import CONF_DIR, _rewrite_shorthands, run
from repro.config import ConfigError, ReproConfig, check_ranges, register_configs
from repro.stages import STAGE_IMPLEMENTATIONS, StageNotBuilt, resolve_stage
from repro.tools.__main__ import main as tools_main

REPO = Path(__file__).resolve().parents[2]


REPO = Path(__file__).resolve().parents[2]


def run_repro(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: the repro of this checkout, not whichever one the venv has installed
    return subprocess.run([sys.executable, "-m", "repro", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def compose_config():
    register_configs()

    def _compose(overrides: list[str]):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    return _compose


def test_demo_composes_with_fairseq_key_names(compose_config):
    cfg = compose_config(["experiment=demo"])
    assert cfg.experiment == "demo"
    # fairseq's group names and defaults (fairseq_spec §1.1, §5)
    assert cfg.model.mask_prob == 0.65 and cfg.model.mask_length == 10
    assert cfg.optimization.clip_norm == 0.0
    assert list(cfg.model.latent_temp) == [2.0, 0.5, 0.999995]
    assert OmegaConf.get_type(cfg) is ReproConfig


def test_unknown_key_and_unknown_experiment_are_errors(compose_config):
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config(["model.mask_probability=0.5"])
    assert "mask_probability" in str(excinfo.value.__cause__ or excinfo.value)
    assert "not in 'ModelConfig'" in str(excinfo.value.__cause__)
    with pytest.raises(Exception, match="no_such_row"):
        compose_config(["experiment=no_such_row"])


def test_out_of_range_values_are_refused_naming_each_key(compose_config):
    cfg = compose_config(["experiment=demo", "model.mask_prob=1.5", "dataset.max_tokens=-4", "optimization.lr=[-0.1]",
                          "model.dropout=0.3", "optimizer.adam_betas=[0.9,1.0]"])
    with pytest.raises(ConfigError) as excinfo:
        check_ranges(cfg)
    message = str(excinfo.value)
    for expected in ("model.mask_prob=1.5: must be in [0, 1]", "dataset.max_tokens=-4: must be > 0",
                     "optimization.lr[0]=-0.1: must be > 0", "optimizer.adam_betas[1]=1.0: must be in [0, 1)"):
        assert expected in message
    assert "model.dropout" not in message  # in range
    check_ranges(compose_config(["experiment=demo", "dataset.batch_size=null"]))  # unset optional values pass


def test_app_refuses_an_out_of_range_value_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    result = run_repro("experiment=demo", "stage=pretrain", "model.mask_prob=1.5", f"task.data={tmp_path}/none",
                       f"hydra.run.dir={run_dir}", "tracker.backends=[]", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "repro: invalid config value(s):\n  model.mask_prob=1.5: must be in [0, 1]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "status.json").exists()


def test_user_errors_print_one_line_unless_hydra_full_error(tmp_path):
    arguments = ("experiment=demo", "stage=evaluate", f"checkpoint={tmp_path}/missing.pt", "tracker.backends=[]",
                 f"hydra.run.dir={tmp_path / 'run'}")
    result = run_repro(*arguments, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"repro: checkpoint {tmp_path}/missing.pt does not exist (set common_eval.path / checkpoint=PATH)"]
    traced = subprocess.run([sys.executable, "-m", "repro", *arguments], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert traced.returncode == 1
    assert "Traceback (most recent call last)" in traced.stderr and "EvaluationError" in traced.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_repro("experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.experiment == "demo" and printed.model.conv_pos == 128


# Every stage of the design is built now; a stage whose module has not landed is simulated by pointing
# one at a module that does not exist.
NOT_LANDED = ("repro.tools.not_landed_yet", "run_featurize", "wav2vec / vq-wav2vec feature extraction")


def test_stage_not_built_says_so_and_exits_nonzero(tmp_path, monkeypatch, capsys, compose_config):
    monkeypatch.setitem(STAGE_IMPLEMENTATIONS, "featurize", NOT_LANDED)
    with pytest.raises(StageNotBuilt, match="featurize.*not built yet"):
        resolve_stage("featurize")
    monkeypatch.chdir(tmp_path)
    code, result = run(compose_config(["experiment=demo", "stage=featurize"]))
    assert code == 2 and result is None
    assert "not built yet" in capsys.readouterr().err


def test_stage_messages_say_what_is_missing_without_tracker_references(monkeypatch):
    # users cannot look up our tracker: the message names the missing work in plain words
    monkeypatch.setitem(STAGE_IMPLEMENTATIONS, "featurize", NOT_LANDED)
    unbuilt = []
    for stage, (_, _, purpose) in STAGE_IMPLEMENTATIONS.items():
        assert not re.search(r"\bissue\b|#\d", purpose, re.IGNORECASE), (stage, purpose)
        try:
            resolve_stage(stage)
        except StageNotBuilt as error:
            unbuilt.append(stage)
            assert f"no implementation of {purpose}" in str(error)
            assert not re.search(r"\bissue\b|#\d|tracked", str(error), re.IGNORECASE), str(error)
    assert unbuilt == ["featurize"]  # the simulated one; every real stage resolves


def test_checkpoint_and_lr_shorthands():
    argv = ["repro", "experiment=base_960h", "checkpoint=/m/wav2vec_small_960h.pt", "checkpoint.save_interval_updates=5",
            "lr=3e-5"]
    assert _rewrite_shorthands(argv) == [
        "repro", "experiment=base_960h", "common_eval.path=/m/wav2vec_small_960h.pt", "checkpoint.save_interval_updates=5",
        "optimization.lr=[3e-5]"
    ]


def test_tools_dispatcher_rejects_unknown_tools(capsys):
    assert tools_main(["no-such-tool"]) == 2
    assert "unknown tool 'no-such-tool'" in capsys.readouterr().err
    assert tools_main(["--help"]) == 0
    assert "manifest" in capsys.readouterr().out


def test_sweep_objective_is_looked_up_in_the_stage_result():
    from repro.cli import objective_value

    result = {"dev_other": {"lm_sweep": {"wer": 12.5, "uer": 4.0}}}
    assert objective_value("dev_other/lm_sweep/wer", result) == 12.5
    with pytest.raises(KeyError, match="dev_clean"):
        objective_value("dev_clean/lm_sweep/wer", result)


def test_bayesian_decoding_sweep_composes_with_the_optuna_sweeper(tmp_path):
    arguments = ["--config-dir", str(REPO / "sweeps"), "--config-name", "decode_lm_weight_optuna",
                 "experiment=base_100h", "decode.lm_model=/lm/4-gram.bin", "decode.lexicon=/lm/lex.txt"]
    hydra_cfg = run_repro(*arguments, "--cfg", "hydra", cwd=tmp_path)
    assert hydra_cfg.returncode == 0, hydra_cfg.stderr
    sweeper = OmegaConf.create(hydra_cfg.stdout).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert set(sweeper.params) == {"decode.lm_weight", "decode.word_score", "decode.sil_weight"}
    job = run_repro(*arguments, "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert cfg.sweep_objective == "dev_other/lm_sweep/wer" and cfg.stage == "evaluate"


def test_a_refused_self_training_stage_leaves_the_run_directory_as_it_was(tmp_path):
    """stage=finetune of an _st row before its pseudo-labels: refused before Hydra creates the run directory
    (no .hydra/, no cli.log) or writes into an existing one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this checkout's repro

    def refused(run_dir: Path, stage: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "repro", "experiment=large_lv60_10m_st", f"stage={stage}",
                               "tracker=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=env)

    fresh = tmp_path / "runs" / "fresh"
    result = refused(fresh, "finetune")
    assert result.returncode == 2 and "needs its pseudo_label stage to have finished" in result.stderr
    assert not fresh.exists() and not fresh.parent.exists()
    existing = tmp_path / "existing"
    (existing / ".hydra").mkdir(parents=True)
    (existing / ".hydra" / "config.yaml").write_text("experiment: large_lv60_10m_st  # an earlier run's\n")
    (existing / "status.json").write_text('{"status": "failed", "completed_stages": []}\n')
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in existing.rglob("*") if path.is_file()}
    result = refused(existing, "evaluate")
    assert result.returncode == 2 and f"finished in {existing}" in result.stderr
    after = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in existing.rglob("*") if path.is_file()}
    assert after == before
