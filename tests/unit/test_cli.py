"""The Hydra app and the tool dispatcher: composition, clear errors, honest 'not built' stages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from repro.cli import (
    CONF_DIR,
    STAGE_IMPLEMENTATIONS,
    StageNotBuilt,
    _rewrite_checkpoint_shorthand,
    resolve_stage,
)
from repro.config import ReproConfig, register_configs
from repro.tools.__main__ import main as tools_main

REPO = Path(__file__).resolve().parents[2]


def run_repro(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repro", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


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


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_repro("experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.experiment == "demo" and printed.model.conv_pos == 128


def test_stage_not_built_says_so_and_exits_nonzero(tmp_path):
    with pytest.raises(StageNotBuilt, match="pseudo_label.*not built yet"):
        resolve_stage("pseudo_label")
    result = run_repro("experiment=demo", "stage=pseudo_label", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2
    assert "not built yet" in result.stderr


def test_stage_messages_say_what_is_missing_without_tracker_references():
    # users cannot look up our tracker: the message names the missing work in plain words
    unbuilt = []
    for stage, (_, _, purpose) in STAGE_IMPLEMENTATIONS.items():
        assert not re.search(r"\bissue\b|#\d", purpose, re.IGNORECASE), (stage, purpose)
        try:
            resolve_stage(stage)
        except StageNotBuilt as error:
            unbuilt.append(stage)
            assert f"no implementation of {purpose}" in str(error)
            assert not re.search(r"\bissue\b|#\d|tracked", str(error), re.IGNORECASE), str(error)
    assert "pseudo_label" in unbuilt  # at least one stage exercises the message


def test_checkpoint_shorthand_points_at_common_eval_path():
    argv = ["repro", "experiment=base_960h", "checkpoint=/m/wav2vec_small_960h.pt", "checkpoint.save_interval_updates=5"]
    assert _rewrite_checkpoint_shorthand(argv) == [
        "repro", "experiment=base_960h", "common_eval.path=/m/wav2vec_small_960h.pt", "checkpoint.save_interval_updates=5"
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
