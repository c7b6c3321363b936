"""The cost planner of the dry run (repro.launch.cost): its arithmetic on a fake measured GPU step, and
the measuring path on CPU with the tiny model (real training steps of the row's task)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from repro.cli import CONF_DIR, _rewrite_plan_gpus
from repro.config import register_configs
from repro.launch.cost import MeasuredStep, cost_rows, describe_cost, estimate, measure_step
from repro.models.presets import PRESETS


def compose_row(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


FAKE_GPU_STEP = MeasuredStep(forward_backward_seconds=0.5, optimizer_seconds=0.1, device="cuda:0 (fake)",
                             on_gpu=True, utterances=5, samples_per_utterance=250_000)


def test_arithmetic_on_a_fake_measured_step():
    row = estimate(FAKE_GPU_STEP, gpus=8, update_freq=8, max_update=400_000, usd_per_gpu_hour=2.0)
    assert row.update_seconds == pytest.approx(8 * 0.5 + 0.1)
    assert row.wall_hours == pytest.approx(400_000 * 4.1 / 3600)
    assert row.gpu_hours == pytest.approx(8 * 400_000 * 4.1 / 3600)
    assert row.cost == pytest.approx(2.0 * 8 * 400_000 * 4.1 / 3600)


def test_table_for_several_cluster_sizes_keeps_the_papers_batch():
    # BASE pretraining: 64 V100 x 1.6 days in the paper, 400k updates; update_freq keeps the 64-GPU batch.
    cfg = compose_row("experiment=base_pretrain", "cluster=slurm_v100", "dry_run=true", "plan.gpus=[8,16,32,48]",
                      "plan.usd_per_gpu_hour=2.0")
    rows = {row.gpus: row for row in cost_rows(cfg, FAKE_GPU_STEP, [8, 16, 32, 48])}
    assert [rows[g].update_freq for g in (8, 16, 32)] == [8, 4, 2]
    assert rows[16].update_seconds == pytest.approx(4 * 0.5 + 0.1)
    assert rows[32].gpu_hours == pytest.approx(32 * cfg.optimization.max_update * (2 * 0.5 + 0.1) / 3600)
    assert rows[48].update_freq is None and "64" in rows[48].note  # 48 does not divide the paper's 64 GPUs
    text = describe_cost(cfg, FAKE_GPU_STEP)
    assert "measured on cuda:0 (fake)" in text and "paper compute: 64 x V100" in text
    eight = next(line for line in text.splitlines() if line.split()[:2] == ["8", "8"])
    assert f"${rows[8].cost:,.0f}" in eight


def test_without_a_gpu_it_extrapolates_from_the_papers_compute():
    cfg = compose_row("experiment=base_pretrain", "cluster=slurm_v100", "dry_run=true", "plan.gpus=[16]")
    cpu_step = MeasuredStep(3.0, 0.2, "cpu", on_gpu=False, utterances=5, samples_per_utterance=250_000)
    text = describe_cost(cfg, cpu_step)
    paper_gpu_hours = cfg.paper.gpus * cfg.paper.hours
    assert "no GPU here" in text and "it can only extrapolate, from the paper's compute" in text
    assert f"{paper_gpu_hours:,.0f} GPU-hours" in text
    row = cost_rows(cfg, cpu_step, [16])[0]
    assert row.wall_hours == pytest.approx(paper_gpu_hours / 16) and row.update_seconds is None


def _tiny(cfg, **task):
    tiny = OmegaConf.to_container(OmegaConf.structured(PRESETS["tiny"]))
    tiny.pop("_name")
    cfg = OmegaConf.merge(cfg, {"model": tiny, "task": task, "dataset": {"max_tokens": 32_000},
                                "common": {"cpu": True}, "plan": {"measure": True, "steps": 1}})
    return cfg


@pytest.mark.parametrize("row", ["base_pretrain", "base_10h"])
def test_measuring_path_on_cpu_with_the_tiny_model(row):
    """A real forward/backward/Adam step of the row's task (pretraining; CTC fine-tuning whose pretrained
    file does not exist here) at the row's batch shape, shrunk to the tiny model and 2 s of audio."""
    cfg = _tiny(compose_row(f"experiment={row}", "dry_run=true"), max_sample_size=16_000)
    step = measure_step(cfg, steps=1)
    assert not step.on_gpu and step.device == "cpu"
    assert step.forward_backward_seconds > 0 and step.optimizer_seconds > 0
    if row == "base_pretrain":  # cropped to max_sample_size: 32k tokens = 2 utterances of 16k samples
        assert (step.utterances, step.samples_per_utterance) == (2, 16_000)
    else:  # fine-tuning batches are not cropped: one 15 s utterance would exceed 32k tokens, so 1 x 32k
        assert (step.utterances, step.samples_per_utterance) == (1, 32_000)
    text = describe_cost(cfg)
    assert "measured on cpu" in text and "no GPU here" in text


def test_plan_gpus_on_the_command_line_is_a_table_not_a_sweep():
    assert _rewrite_plan_gpus(["repro", "plan.gpus=8,16,32", "x=1"]) == ["repro", "plan.gpus=[8,16,32]", "x=1"]
    assert _rewrite_plan_gpus(["plan.gpus=[8]"]) == ["plan.gpus=[8]"]
