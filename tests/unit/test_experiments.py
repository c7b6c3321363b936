"""Config audit of every experiment row against the paper tables, and the launch plan / dry run."""

from __future__ import annotations

import csv
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from repro.config import check_ranges, register_configs
from repro.launch import preemption, slurm
from repro.launch.plan import derive_update_freq, effective_batch_samples, plan_launch, world_size
from repro.report.paper import load_paper_rows

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
# A copy of the project's reference/paper_hparams.csv (the paper's and fairseq's hyper-parameters).
HPARAMS = Path(__file__).resolve().parent / "data" / "paper_hparams.csv"
EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
SPLITS = ("10m", "1h", "10h", "100h", "960h")
FINETUNE_ROWS = [f"{model}_{split}" for model in ("base", "large", "large_lv60") for split in SPLITS]
ST_ROWS = [f"large_lv60_{split}_st" for split in SPLITS]


def compose_experiment(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


@pytest.fixture(scope="module")
def composed() -> dict:
    return {name: compose_experiment(name) for name in EXPERIMENTS}


def load_hparams() -> dict[tuple[str, str, str, str], str]:
    """(section, model, labeled_data, parameter) -> value."""
    with HPARAMS.open() as handle:
        return {(r["section"], r["model"], r["labeled_data"], r["parameter"]): r["value"] for r in csv.DictReader(handle)}


def yaml_value(hparams, model: str, split: str, parameter_prefix: str) -> str:
    matches = [value for (section, row_model, labeled, parameter), value in hparams.items()
               if section == "finetune-fairseq-config" and row_model == model and labeled == split
               and parameter.startswith(parameter_prefix)]
    assert len(matches) == 1, (model, split, parameter_prefix, matches)
    return matches[0]


def appendix_b(hparams, split: str) -> tuple[float, float, int]:
    value = hparams[("finetune-paper-appendixB", "both", split, "timestep mask p / channel mask p / updates")]
    p, channel_p, updates = (part.strip() for part in value.split("/"))
    return float(p), float(channel_p), int(updates)


def test_every_row_of_the_issue_has_a_file():
    expected = {"base_pretrain", "large_pretrain", "large_lv60_pretrain", "demo", *FINETUNE_ROWS, *ST_ROWS}
    assert expected <= set(EXPERIMENTS)


def test_every_experiment_composes_and_names_itself(composed):
    for name, cfg in composed.items():
        assert cfg.experiment == name
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_paper_rows_exist_in_paper_results(composed):
    known = load_paper_rows()
    cited = 0
    for name, cfg in composed.items():
        for row in cfg.paper.rows:
            assert row in known, f"{name}: paper row {row!r} is not in paper_results.csv"
            cited += 1
        if name in FINETUNE_ROWS:
            assert cfg.paper.rows, f"{name} cites no paper row"
            assert all(known[row].labeled_data == cfg.paper.labeled_data for row in cfg.paper.rows)
            assert all(known[row].pretrain_data == cfg.paper.pretrain_data for row in cfg.paper.rows)
    assert cited == 26  # BASE 9, LARGE 5, LARGE LV-60k 6, self-training 2, discrete BERT (roberta_vq_*) 4


@pytest.mark.parametrize("name", FINETUNE_ROWS + ST_ROWS)
def test_finetuning_hyperparameters_match_paper_hparams(composed, name):
    cfg = composed[name]
    hparams = load_hparams()
    model, split = name.removesuffix("_st").rsplit("_", 1)
    # fairseq has no LARGE LS-960 fine-tuning yaml: those rows use the vox (LARGE LV-60k) recipe
    csv_model = "BASE" if model == "base" else "LARGE (LV-60k)"

    # Appendix B, paper semantics -> fairseq semantics (fairseq_spec §6.2): x mask_length 10 / x 64
    p, channel_p, updates = appendix_b(hparams, split)
    assert math.isclose(cfg.model.mask_prob, 10 * p)
    assert math.isclose(cfg.model.mask_channel_prob, 64 * channel_p)
    assert cfg.model.mask_length == 10 and cfg.model.mask_channel_length == 64
    assert cfg.optimization.max_update == updates

    assert math.isclose(cfg.optimization.lr[0], float(yaml_value(hparams, csv_model, split, "lr")))
    freeze, layerdrop, feature_grad_mult = yaml_value(hparams, csv_model, split, "freeze_finetune_updates").split(" / ")
    assert cfg.model.freeze_finetune_updates == int(freeze)
    assert math.isclose(cfg.model.layerdrop, float(layerdrop))
    assert cfg.model.feature_grad_mult == float(feature_grad_mult)
    gpus, max_tokens = yaml_value(hparams, csv_model, split, "world_size x update_freq").split(" / ")
    world, update_freq = (int(part) for part in gpus.split(" x "))
    assert cfg.distributed_training.paper_world_size * cfg.optimization.update_freq[0] == world * update_freq
    assert cfg.dataset.max_tokens == int(max_tokens)

    assert cfg.lr_scheduler._name == "tri_stage"
    assert list(cfg.lr_scheduler.phase_ratio) == [0.1, 0.4, 0.5] and cfg.lr_scheduler.final_lr_scale == 0.05
    assert cfg.model._name == "wav2vec_ctc" and cfg.model.apply_mask and cfg.optimization.sentence_avg
    assert cfg.task.normalize is (model == "large_lv60")
    assert cfg.model.layer_norm_first is (model == "large_lv60")
    assert cfg.stages[-2:] == ["finetune", "evaluate"]
    if name in ST_ROWS:
        assert cfg.stages[0] == "pseudo_label"


@pytest.mark.parametrize("split", SPLITS)
def test_departures_from_the_fairseq_yamls_are_commented(split):
    """Where Appendix B and a fairseq yaml disagree, the split recipe says which is followed."""
    hparams = load_hparams()
    p, channel_p, updates = appendix_b(hparams, split)
    lines = {line.split(":")[0].strip(): line for line in (CONF / "experiment" / "recipes" / f"split_{split}.yaml")
             .read_text().splitlines() if ":" in line and not line.lstrip().startswith("#")}
    for model in ("BASE", "LARGE (LV-60k)"):
        checks = {"mask_prob": (float(yaml_value(hparams, model, split, "mask_prob")), 10 * p),
                  "mask_channel_prob": (float(yaml_value(hparams, model, split, "mask_channel_prob")), 64 * channel_p),
                  "max_update": (float(yaml_value(hparams, model, split, "max_update")), updates)}
        for key, (fairseq_value, paper_value) in checks.items():
            if not math.isclose(fairseq_value, paper_value):
                assert "yaml" in lines[key] and "paper" in lines[key], f"split_{split}.yaml {key}: no comment"


def test_pretraining_rows_follow_the_fairseq_yamls(composed):
    hparams = load_hparams()

    def fairseq(model: str, parameter: str) -> str:
        return hparams[("pretrain-fairseq-config", model, "", parameter)]

    for name, model in (("base_pretrain", "BASE"), ("large_lv60_pretrain", "LARGE (LV-60k)")):
        cfg = composed[name]
        assert cfg.optimization.max_update == int(fairseq(model, "max_update"))
        assert math.isclose(cfg.optimization.lr[0], float(fairseq(model, "lr")))
        assert cfg.lr_scheduler.warmup_updates == int(fairseq(model, "warmup_updates"))
        assert cfg.dataset.max_tokens == int(fairseq(model, "max_tokens (samples/GPU)"))
        assert cfg.task.max_sample_size == int(fairseq(model, "max_sample_size (crop)"))
        assert cfg.distributed_training.paper_world_size == int(fairseq(model, "distributed_world_size"))
        assert cfg.model.final_dim == int(fairseq(model, "final_dim"))
        assert cfg.stages == ["pretrain"] and cfg.model._name == "wav2vec2"
    large = composed["large_pretrain"]  # no yaml: the paper's LARGE values (8% warmup, 3e-4, LayerDrop 0.2)
    assert large.lr_scheduler.warmup_updates == round(0.08 * large.optimization.max_update)
    assert large.optimization.lr[0] == 3e-4 and large.model.encoder_layerdrop == 0.2
    assert composed["base_pretrain"].paper.gpus * composed["base_pretrain"].paper.hours == 64 * 72


def test_tuned_lm_weights_where_the_paper_gives_them(composed):
    hparams = load_hparams()
    rows = {("base", "10m"): "BASE (LS-960)", ("base", "100h"): "BASE (LS-960)", ("base", "960h"): "BASE (LS-960)",
            ("large_lv60", "10m"): "LARGE (LV-60k)", ("large_lv60", "960h"): "LARGE (LV-60k)"}
    for (model, split), csv_model in rows.items():
        value = hparams[("decoding-table7-quoted", csv_model, split, "4-gram LM weight / word insertion")]
        lm_weight, word_score = (float(part) for part in value.split("/"))
        decoding = composed[f"{model}_{split}"].decodings.kenlm_4gram
        assert (decoding.lm_weight, decoding.word_score) == (lm_weight, word_score)
        assert decoding.beam == 1500 and decoding.type == "kenlm"


def test_cfg_job_of_large_lv60_100h_shows_the_paper_recipe():
    result = subprocess.run([sys.executable, "-m", "repro", "experiment=large_lv60_100h", "--cfg", "job"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job = OmegaConf.create(result.stdout)
    assert job.model.layer_norm_first is True and job.model.extractor_mode == "layer_norm"  # pre-LN LARGE
    assert job.task.normalize is True and job.model.normalize is True
    assert (job.model.mask_prob, job.model.mask_channel_prob) == (0.5, 0.512)  # Appendix B 100 h: p 0.05 / 0.008
    assert job.optimization.max_update == 50000
    assert "  layer_norm_first: true\n" in result.stdout and "  mask_prob: 0.5\n" in result.stdout


# --- launch plan -----------------------------------------------------------------------------------


def test_update_freq_keeps_the_paper_batch():
    assert derive_update_freq(64, 8, 1) == 8  # BASE pretraining on one 8-GPU node
    assert derive_update_freq(128, 16, 1) == 8
    assert derive_update_freq(20, 4, 1) == 5  # vox fine-tuning as fairseq's yaml runs it
    assert derive_update_freq(64, 64, 1) == 1
    assert derive_update_freq(None, 4, 3) == 3  # no paper world size: as configured
    with pytest.raises(ValueError, match="not a multiple"):
        derive_update_freq(64, 48, 1)
    assert world_size(2, 8) == 16 and world_size(1, 0) == 1 and world_size(3, 0) == 3
    with pytest.raises(ValueError):
        world_size(0, 8)
    assert effective_batch_samples(1_400_000, 8, 8) == 89_600_000


def test_plan_on_a_v100_node_keeps_the_base_batch():
    cfg = compose_experiment("base_pretrain", "cluster=slurm_v100")
    plan = plan_launch(cfg, environ={})
    assert (plan.nodes, plan.tasks_per_node, plan.world_size, plan.update_freq) == (1, 8, 8, 8)
    assert plan.batch_samples == 64 * 1_400_000 and math.isclose(plan.batch_seconds, 5600.0)
    assert plan.paper_gpu_hours == 64 * 72 and plan.estimated_hours == 64 * 72 / 8
    assert plan.estimated_jobs == math.ceil(64 * 72 / 8 * 60 / 4320)
    local = plan_launch(compose_experiment("base_pretrain"), environ={"WORLD_SIZE": "2"})
    assert (local.cluster, local.world_size, local.update_freq) == ("local", 2, 32)


def test_every_experiment_passes_the_range_checks(composed):
    for cfg in composed.values():
        check_ranges(cfg)


def _dry_run_a100_two_nodes() -> str:
    return slurm.describe_plan(compose_experiment(
        "base_pretrain", "cluster=slurm_a100", "cluster.nodes=2", "cluster.partition=gpu", "cluster.timeout_min=1440"))


def test_dry_run_prints_world_size_update_freq_batch_compute_and_config():
    text = _dry_run_a100_two_nodes()  # needs no SLURM: only the #SBATCH lines come from submitit
    lines = text.splitlines()
    assert "world size: 16 process(es)  -> distributed_training.distributed_world_size" in lines
    assert "update_freq: 4  (configured 1; paper world size 64 GPUs; 16 x 4 here)" in lines
    assert ("effective batch: <= 89,600,000 samples = 5,600.0 s (1.56 h) of audio per update "
            "(max_tokens 1,400,000 x 16 x 4)") in lines
    assert "paper compute: 64 x V100 x 72.0 h (3.0 days) = 4,608 GPU-hours" in lines
    assert ("estimate here: 288.0 h (12.0 days) on 16 x A100 at the paper's per-GPU speed; "
            "12 SLURM run(s) of 1440 min (requeued in between)") in lines
    resolved = OmegaConf.create(text.split("resolved config:\n", 1)[1])
    assert resolved.distributed_training.distributed_world_size == 16
    assert resolved.optimization.max_update == 400000 and resolved.cluster.gpu_type == "A100"


def test_dry_run_prints_the_sbatch_lines_submitit_writes():
    # submitit's SLURM executor refuses to start where `srun` is missing, so the lines need a SLURM client
    require(shutil.which("srun") is not None, "no `srun` on PATH: submitit cannot render #SBATCH lines without SLURM")
    text = _dry_run_a100_two_nodes()
    lines = text.splitlines()
    for expected in ("  #SBATCH --nodes=2", "  #SBATCH --ntasks-per-node=8", "  #SBATCH --gpus-per-node=8",
                     "  #SBATCH --cpus-per-task=16", "  #SBATCH --partition=gpu", "  #SBATCH --time=1440",
                     "  #SBATCH --signal=USR2@120", "  #SBATCH --requeue"):
        assert expected in lines, text[:1500]


def test_dry_run_reports_a_batch_that_cannot_be_kept():
    cfg = compose_experiment("base_pretrain", "cluster=slurm_v100", "cluster.nodes=3")  # 24 GPUs vs 64
    assert "cannot launch: distributed_training.paper_world_size=64 is not a multiple" in slurm.describe_plan(cfg)


def test_dry_run_through_the_cli_submits_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "repro", "experiment=large_lv60_10m", "cluster=slurm_h100",
                             "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # vox rows ran on 20 effective GPUs: 5 of the node's 8 GPUs x update_freq 4 keep that batch exactly
    assert "using 5 of the 8 GPUs per node" in result.stdout
    assert "update_freq: 4" in result.stdout
    assert not (tmp_path / "run" / "slurm").exists()
    three_nodes = subprocess.run([sys.executable, "-m", "repro", "experiment=large_lv60_10m", "cluster=slurm_h100",
                                  "cluster.nodes=3", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "cannot launch: distributed_training.paper_world_size=20 is not a multiple of the world size 24" in (
        three_nodes.stdout + three_nodes.stderr)


# --- preemption hand-off ------------------------------------------------------------------------


def test_stop_request_round_trip(tmp_path):
    assert preemption.stop_requested(tmp_path) is None
    preemption.request_stop(tmp_path, "SIGTERM (job 7)")
    preemption.request_stop(tmp_path, "SIGUSR2 (job 7)")  # idempotent, last reason wins
    assert preemption.stop_requested(tmp_path).startswith("SIGUSR2 (job 7) at ")
    assert (tmp_path / "STOP_REQUESTED").exists() and not list(tmp_path.glob(".STOP_REQUESTED*"))
    preemption.clear_stop_request(tmp_path)
    preemption.clear_stop_request(tmp_path)
    assert preemption.stop_requested(tmp_path) is None


def test_checkpoint_asks_the_trainer_to_save_and_resubmits_the_same_job(tmp_path):
    job = slurm.SlurmStageJob(str(tmp_path / "slurm"), "job_config", str(tmp_path), "/somewhere")
    job._child = subprocess.Popen([sys.executable, "-c", "pass"])  # a child that stops as asked
    delayed = job.checkpoint()
    assert preemption.stop_requested(tmp_path).startswith("time limit / preemption signal")
    resubmitted = pickle.loads(pickle.dumps(delayed.function))  # what submitit writes for the requeue
    assert isinstance(resubmitted, slurm.SlurmStageJob) and resubmitted._child is None
    assert (resubmitted.run_dir, resubmitted.cwd) == (str(tmp_path), "/somewhere")
    assert resubmitted.command()[-1] == f"hydra.run.dir='{tmp_path}'"
    job._child.wait()


def test_inside_slurm_job(monkeypatch):
    for name in ("REPRO_SLURM_JOB", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert not slurm.inside_slurm_job()
    monkeypatch.setenv("SLURM_JOB_ID", "12")  # an salloc shell: not a task, submit from here
    assert not slurm.inside_slurm_job()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert slurm.inside_slurm_job()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("REPRO_SLURM_JOB", "1")
    assert slurm.inside_slurm_job()


def test_a_node_that_cannot_keep_the_paper_batch_uses_fewer_gpus():
    from repro.launch.plan import usable_gpus_per_node

    assert usable_gpus_per_node(20, 1, 8) == 5  # vox rows: 20 effective GPUs -> 5 GPUs x update_freq 4
    assert usable_gpus_per_node(64, 1, 8) == 8
    assert usable_gpus_per_node(20, 2, 8) == 5  # 10 GPUs x update_freq 2
    assert usable_gpus_per_node(None, 1, 8) == 8
    assert usable_gpus_per_node(7, 2, 8) == 8  # nothing divides: derive_update_freq explains the refusal
