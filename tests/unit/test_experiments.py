"""Config audit of every experiment row against the wav2vec 2.0 paper, and the launch plan / dry run.

The paper's numbers below were read in the full text of arXiv 2006.11477v3 (§4.2, §4.3, Appendix B
Tables 6-8); each test fails when a row drifts from them.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from repro.config import ReproConfig, check_ranges, register_configs
from repro.launch import preemption, slurm
from repro.launch.plan import derive_update_freq, effective_batch_samples, plan_launch, world_size
from repro.report.paper import load_paper_rows

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
# A copy of the project's reference/paper_hparams.csv (the paper's and fairseq's hyper-parameters).
HPARAMS = Path(__file__).resolve().parent / "data" / "paper_hparams.csv"
GOLDEN_SCHEMA_DEFAULTS = REPO / "tests" / "golden" / "experiments" / "schema_defaults.txt"
EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
SPLITS = ("10m", "1h", "10h", "100h", "960h")
LIBRI_LIGHT = ("10m", "1h", "10h")
FINETUNE_ROWS = [f"{model}_{split}" for model in ("base", "large", "large_lv60") for split in SPLITS]
ST_ROWS = [f"large_lv60_{split}_st" for split in SPLITS] + [f"large_{split}_st" for split in LIBRI_LIGHT]
PRETRAIN_ROWS = ["base_pretrain", "large_pretrain", "large_lv60_pretrain"]
NEW_ROWS = ["large_960h_scratch", "large_timit"]
WAV2VEC2_ROWS = sorted(PRETRAIN_ROWS + FINETUNE_ROWS + ST_ROWS + NEW_ROWS)

# Appendix B Table 6: timestep mask p, channel mask p, updates.
TABLE_6 = {"10m": (0.075, 0.008, 12_000), "1h": (0.075, 0.004, 13_000), "10h": (0.065, 0.004, 20_000),
           "100h": (0.05, 0.008, 50_000), "960h": (0.05, 0.0016, 320_000), "timit": (0.065, 0.012, 40_000)}
# Tables 7 (LibriSpeech-pretrained) and 8 (LibriVox-pretrained): 4-gram weight, word insertion, TransLM weight, insertion.
TABLE_7 = {"10m": (3.23, -0.26, 1.20, -1.39), "1h": (2.90, -1.62, 1.15, -2.08), "10h": (2.46, -0.59, 1.06, -2.32),
           "100h": (2.15, -0.52, 0.87, -1.00), "960h": (1.74, 0.52, 0.92, -0.86)}
TABLE_8 = {"10m": (3.86, -1.18, 1.47, -2.82), "1h": (3.09, -2.33, 1.33, -0.69), "10h": (2.12, -0.90, 0.94, -1.05),
           "100h": (2.15, -0.52, 0.87, -1.00), "960h": (1.57, -0.64, 0.90, -0.31)}
# §4.3 batches and GPUs; App. B LayerDrop.
FINETUNE_SIZE = {"base": (3_200_000, 8, 0.05), "large": (1_280_000, 24, 0.1)}
# §4.2 pretraining: updates, peak lr, LayerDrop, feature_grad_mult, dropouts (Transformer, input, features), GPU-days.
SECTION_4_2 = {"base_pretrain": (400_000, 5e-4, 0.05, 0.1, 0.1, 38.4, 64),
               "large_pretrain": (250_000, 3e-4, 0.2, 0.1, 0.1, 55.2, 128),
               "large_lv60_pretrain": (600_000, 3e-4, 0.0, 1.0, 0.1, 124.8, 128)}


def compose_experiment(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


@pytest.fixture(scope="module")
def composed() -> dict:
    return {name: compose_experiment(name) for name in EXPERIMENTS}


@pytest.fixture(scope="module")
def composed_fairseq() -> dict:
    return {name: compose_experiment(name, "recipe=fairseq") for name in EXPERIMENTS}


@pytest.fixture(scope="module")
def v100_cluster():
    """`cluster=slurm_v100`, composed once and merged into each row."""
    return compose_experiment("demo", "cluster=slurm_v100").cluster


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


def row_parts(name: str) -> tuple[str, str]:
    """'large_lv60_10m_st' -> ('large_lv60', '10m')."""
    model, split = name.removesuffix("_st").rsplit("_", 1)
    return model, split


def test_every_row_of_the_issues_has_a_file():
    expected = {*PRETRAIN_ROWS, "demo", *FINETUNE_ROWS, *ST_ROWS, *NEW_ROWS}
    assert expected <= set(EXPERIMENTS)


def test_every_experiment_composes_and_names_itself(composed):
    for name, cfg in composed.items():
        assert cfg.experiment == name
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_paper_rows_exist_and_cover_every_decoding(composed):
    known = load_paper_rows()
    for name, cfg in composed.items():
        for row in cfg.paper.rows:
            assert row in known, f"{name}: paper row {row!r} is not in paper_results.csv"
    for name in FINETUNE_ROWS + ["large_960h_scratch"]:
        cfg = composed[name]
        rows = [known[row] for row in cfg.paper.rows]
        # Tables 1/2 give the Transformer-LM cell, Appendix C Tables 9/10 the no-LM and 4-gram cells
        assert sorted(row.lm for row in rows) == ["4-gram", "None", "Transf."], name
        assert all(row.labeled_data == cfg.paper.labeled_data and row.pretrain_data == cfg.paper.pretrain_data
                   for row in rows), name
        assert list(cfg.paper.decoding) == ["viterbi", "kenlm_4gram", "transformer"]
    assert known["w2v2-t9-large-lv-60k-10m-4-gram"].values == {"dev_clean": 6.3, "dev_other": 9.8, "test_clean": 6.6,
                                                                 "test_other": 10.3}
    assert known["w2v2-t10-large-from-scratch-no-pre-training-960h-none"].values == {
        "dev_clean": 2.8, "dev_other": 7.6, "test_clean": 3.0, "test_other": 7.7}
    assert known["w2v2-t10-large-from-scratch-no-pre-training-960h-4-gram"].values == {
        "dev_clean": 1.8, "dev_other": 5.4, "test_clean": 2.6, "test_other": 5.8}
    for split in LIBRI_LIGHT:  # Xu et al. Table 1, LS-960 LARGE + ST (ctc ft)
        assert composed[f"large_{split}_st"].paper.rows == [f"st-t1-wav2vec-2-0-large-st-ctc-ft-ls-960-{split}-with-lm-see-notes"]
    timit = composed["large_timit"]
    assert [known[row].values["dev_clean"] for row in timit.paper.rows] == [7.4]  # Table 3: dev PER 7.4 / test 8.3
    assert [known[row].values["test_clean"] for row in timit.paper.rows] == [8.3]


@pytest.mark.parametrize("name", FINETUNE_ROWS + ST_ROWS)
def test_decoding_weights_are_tables_7_and_8(composed, name):
    cfg = composed[name]
    model, split = row_parts(name)
    ngram_weight, ngram_word, transformer_weight, transformer_word = (TABLE_8 if model == "large_lv60" else TABLE_7)[split]
    ngram, transformer = cfg.decodings.kenlm_4gram, cfg.decodings.transformer
    assert (ngram.lm_weight, ngram.word_score) == (ngram_weight, ngram_word)
    assert (transformer.lm_weight, transformer.word_score) == (transformer_weight, transformer_word)
    assert (ngram.type, ngram.beam, transformer.type, transformer.beam) == ("kenlm", 1500, "fairseqlm", 500)  # §4.4


@pytest.mark.parametrize("name", FINETUNE_ROWS + ST_ROWS)
def test_finetuning_follows_section_4_3_and_appendix_b(composed, name):
    cfg = composed[name]
    model, split = row_parts(name)
    p, channel_p, updates = TABLE_6[split]
    assert math.isclose(cfg.model.mask_prob, 10 * p)  # fairseq semantics: x mask_length 10 / x 64 (fairseq_spec §6.2)
    assert math.isclose(cfg.model.mask_channel_prob, 64 * channel_p)
    assert cfg.model.mask_length == 10 and cfg.model.mask_channel_length == 64
    assert cfg.optimization.max_update == updates
    max_tokens, gpus, layerdrop = FINETUNE_SIZE["base" if model == "base" else "large"]
    assert cfg.dataset.max_tokens == max_tokens
    assert cfg.distributed_training.paper_world_size * cfg.optimization.update_freq[0] == gpus
    assert cfg.paper.gpus == gpus and cfg.paper.world_size_source.startswith("paper §4.3")
    assert cfg.model.layerdrop == layerdrop
    assert cfg.model.freeze_finetune_updates == 10_000  # "For the first 10k updates only the output classifier is trained"
    assert cfg.model.feature_grad_mult == 0.0  # "The feature encoder is not trained during fine-tuning"
    assert cfg.lr_scheduler._name == "tri_stage"
    assert list(cfg.lr_scheduler.phase_ratio) == [0.1, 0.4, 0.5] and cfg.lr_scheduler.final_lr_scale == 0.05
    assert cfg.model._name == "wav2vec_ctc" and cfg.model.apply_mask and cfg.optimization.sentence_avg
    assert cfg.task.normalize is (model == "large_lv60")
    assert cfg.model.layer_norm_first is (model == "large_lv60")
    assert cfg.stages[-2:] == ["finetune", "evaluate"]
    pretrain = {"base": "base_pretrain", "large": "large_pretrain", "large_lv60": "large_lv60_pretrain"}[model]
    assert cfg.model.w2v_path == f"runs/{pretrain}/checkpoints/checkpoint_best.pt"  # §4.2: lowest validation L_m
    if name in ST_ROWS:
        assert cfg.stages[0] == "pseudo_label"


@pytest.mark.parametrize("name", FINETUNE_ROWS)
def test_learning_rates_and_their_selection_follow_section_4_3(composed, name):
    cfg = composed[name]
    model, split = row_parts(name)
    selection = cfg.selection
    if split in LIBRI_LIGHT:  # three seeds x {2e-5, 3e-5}, winner by dev-other WER, 4-gram beam 50 / 2 / -1
        assert selection.type == "grid"
        assert list(selection.lrs) == [2e-5, 3e-5] and len(selection.seeds) == 3 and selection.split == "dev_other"
        decoding = selection.decoding
        assert (decoding.type, decoding.beam, decoding.lm_weight, decoding.word_score) == ("kenlm", 50, 2.0, -1.0)
        assert decoding.lm_model.endswith("4-gram.bin")
        assert compose_experiment(name, "selection=none").selection.type == "none"
    else:
        assert selection.type == "none"
        expected = 1e-4 if (model, split) == ("base", "960h") else 3e-5  # BASE 960h: §4.3; others: fairseq yamls
        assert cfg.optimization.lr[0] == expected


def test_pretraining_rows_follow_section_4_2(composed):
    for name, (updates, lr, layerdrop, grad_mult, dropout, hours, gpus) in SECTION_4_2.items():
        cfg = composed[name]
        assert cfg.optimization.max_update == updates and cfg.optimization.lr[0] == lr, name
        assert cfg.lr_scheduler.warmup_updates == round(0.08 * updates), name  # 8% warmup
        assert cfg.model.encoder_layerdrop == layerdrop and cfg.model.feature_grad_mult == grad_mult, name
        assert (cfg.model.dropout, cfg.model.dropout_input, cfg.model.dropout_features) == (dropout,) * 3, name
        assert cfg.criterion.loss_weights[0] == 0.1 and cfg.model.num_negatives == 100 and cfg.model.logit_temp == 0.1
        assert cfg.criterion.loss_weights[1] == (0 if name == "large_lv60_pretrain" else 10)  # L2 penalty: LibriSpeech only
        assert cfg.model.latent_temp[1] == (0.5 if name == "base_pretrain" else 0.1)
        assert (cfg.paper.hours, cfg.paper.gpus, cfg.paper.compute_source) == (hours, gpus, "paper §4.2"), name
        assert cfg.distributed_training.paper_world_size == gpus
        # model selection by the lowest validation contrastive loss, validated about once per epoch (fairseq)
        assert cfg.checkpoint.best_checkpoint_metric == "loss_0" and cfg.dataset.validate_interval_updates > 0
        assert cfg.stages == ["pretrain"] and cfg.model._name == "wav2vec2"


def test_pretraining_yaml_values_stay_available_as_recipe_fairseq(composed_fairseq):
    hparams = load_hparams()

    def fairseq(model: str, parameter: str) -> str:
        return hparams[("pretrain-fairseq-config", model, "", parameter)]

    for name, model in (("base_pretrain", "BASE"), ("large_lv60_pretrain", "LARGE (LV-60k)")):
        cfg = composed_fairseq[name]
        assert cfg.paper.recipe == "fairseq"
        assert cfg.optimization.max_update == int(fairseq(model, "max_update"))
        assert math.isclose(cfg.optimization.lr[0], float(fairseq(model, "lr")))
        assert cfg.lr_scheduler.warmup_updates == int(fairseq(model, "warmup_updates"))
        assert cfg.dataset.max_tokens == int(fairseq(model, "max_tokens (samples/GPU)"))
        assert cfg.task.max_sample_size == int(fairseq(model, "max_sample_size (crop)"))
        assert cfg.distributed_training.paper_world_size == int(fairseq(model, "distributed_world_size"))
        assert cfg.model.final_dim == int(fairseq(model, "final_dim"))
        assert cfg.checkpoint.best_checkpoint_metric == "loss"
    assert composed_fairseq["large_lv60_pretrain"].model.dropout == 0.0


@pytest.mark.parametrize("name", FINETUNE_ROWS)
def test_recipe_fairseq_runs_the_fairseq_yamls(composed_fairseq, name):
    hparams = load_hparams()
    model, split = row_parts(name)
    csv_model = "BASE" if model == "base" else "LARGE (LV-60k)"  # LARGE LS-960 has no yaml: the vox one
    cfg = composed_fairseq[name]
    assert cfg.paper.recipe == "fairseq" and cfg.selection.type == "none"
    assert math.isclose(cfg.model.mask_prob, float(yaml_value(hparams, csv_model, split, "mask_prob")))
    assert math.isclose(cfg.model.mask_channel_prob, float(yaml_value(hparams, csv_model, split, "mask_channel_prob")))
    assert cfg.optimization.max_update == int(yaml_value(hparams, csv_model, split, "max_update"))
    assert math.isclose(cfg.optimization.lr[0], float(yaml_value(hparams, csv_model, split, "lr")))
    freeze, layerdrop, _ = yaml_value(hparams, csv_model, split, "freeze_finetune_updates").split(" / ")
    assert cfg.model.freeze_finetune_updates == int(freeze) and math.isclose(cfg.model.layerdrop, float(layerdrop))
    gpus, _ = yaml_value(hparams, csv_model, split, "world_size x update_freq").split(" / ")
    world, update_freq = (int(part) for part in gpus.split(" x "))
    assert cfg.distributed_training.paper_world_size == world * update_freq
    assert cfg.paper.world_size_source.startswith("fairseq ")  # never called the paper's


@pytest.mark.parametrize("split", SPLITS)
def test_departures_from_the_fairseq_yamls_are_commented(split):
    """Where Table 6 and a fairseq yaml disagree, the split recipe says which is followed."""
    hparams = load_hparams()
    p, channel_p, updates = TABLE_6[split]
    lines = {line.split(":")[0].strip(): line for line in (CONF / "experiment" / "recipes" / f"split_{split}.yaml")
             .read_text().splitlines() if ":" in line and not line.lstrip().startswith("#")}
    for model in ("BASE", "LARGE (LV-60k)"):
        checks = {"mask_prob": (float(yaml_value(hparams, model, split, "mask_prob")), 10 * p),
                  "mask_channel_prob": (float(yaml_value(hparams, model, split, "mask_channel_prob")), 64 * channel_p),
                  "max_update": (float(yaml_value(hparams, model, split, "max_update")), updates)}
        for key, (fairseq_value, paper_value) in checks.items():
            if not math.isclose(fairseq_value, paper_value):
                assert "yaml" in lines[key] and "paper" in lines[key], f"split_{split}.yaml {key}: no comment"


def test_new_rows_large_from_scratch_and_timit(composed):
    scratch = composed["large_960h_scratch"]
    assert scratch.model.no_pretrained_weights and scratch.model.w2v_path is None
    assert scratch.model.encoder_layers == 24 and scratch.model.encoder_embed_dim == 1024  # the LARGE architecture
    assert scratch.model.feature_grad_mult == 1.0  # a random feature encoder trains
    timit = composed["large_timit"]
    p, channel_p, updates = TABLE_6["timit"]
    assert math.isclose(timit.model.mask_prob, 10 * p) and math.isclose(timit.model.mask_channel_prob, 64 * channel_p)
    assert timit.optimization.max_update == updates and timit.task.labels == "phn"
    assert timit.common_eval.post_process == "none" and list(timit.paper.decoding) == ["viterbi"]  # no LM (§5.3)
    assert list(timit.paper.eval_splits) == ["dev", "test"]
    assert timit.selection.type == "grid" and timit.selection.split == "dev" and timit.selection.decoding.type == "viterbi"


def test_cfg_job_of_large_lv60_100h_shows_the_paper_recipe():
    result = subprocess.run([sys.executable, "-m", "repro", "experiment=large_lv60_100h", "--cfg", "job"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job = OmegaConf.create(result.stdout)
    assert job.model.layer_norm_first is True and job.model.extractor_mode == "layer_norm"  # pre-LN LARGE
    assert job.task.normalize is True and job.model.normalize is True
    assert (job.model.mask_prob, job.model.mask_channel_prob) == (0.5, 0.512)  # Table 6 100 h: p 0.05 / 0.008
    assert job.optimization.max_update == 50000
    assert "  layer_norm_first: true\n" in result.stdout and "  mask_prob: 0.5\n" in result.stdout


# --- keys that come from a schema default -----------------------------------------------------------

AUDITED_SECTIONS = ("task", "dataset", "model", "criterion", "optimization", "optimizer", "lr_scheduler", "checkpoint",
                    "distributed_training")


def _perturb(value):
    """A value no yaml sets: a key that keeps it after composition came from the schema's default."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 7919 if math.isfinite(value) else 7919.5
    if isinstance(value, str):
        return value if value == "???" else value + "~schema"
    if value is None:
        return "~schema-none"
    if isinstance(value, list):
        return [*value, "~schema"]
    if isinstance(value, dict):
        return {key: _perturb(item) for key, item in value.items()}
    return value


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def schema_default_keys(composed: dict, names) -> dict[str, dict[str, object]]:
    """Row -> {key: value} for every audited key whose value is the schema's default (no yaml sets it)."""
    normal = {name: OmegaConf.to_container(composed[name], resolve=True) for name in names}
    store = ConfigStore.instance()
    plain = OmegaConf.to_container(OmegaConf.structured(ReproConfig))
    store.store(name="repro_schema", node={key: (_perturb(plain[key]) if key in AUDITED_SECTIONS else plain[key])
                                           for key in plain})
    try:
        perturbed = {name: OmegaConf.to_container(compose_experiment_raw(name), resolve=True) for name in names}
    finally:
        register_configs()  # the real schema again
    found: dict[str, dict[str, object]] = {}
    for name in names:
        other = dict(_leaves({key: perturbed[name][key] for key in AUDITED_SECTIONS}))
        found[name] = {key: value for key, value in _leaves({key: normal[name][key] for key in AUDITED_SECTIONS})
                       if other.get(key) != value}
    return found


def compose_experiment_raw(name: str):
    """Compose with whatever schema is registered now (the perturbed one in schema_default_keys)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}"])


def render_schema_defaults(found: dict[str, dict[str, object]]) -> str:
    """One line per (key, value): the rows that take it from the schema."""
    by_key: dict[tuple[str, str], list[str]] = {}
    for name, keys in found.items():
        for key, value in keys.items():
            by_key.setdefault((key, repr(value)), []).append(name)
    lines = ["# Keys each experiment row takes from the schema defaults (repro/config.py), not from a yaml.",
             "# Regenerate with REPRO_UPDATE_GOLDEN=1 after reviewing that each default is what the paper / fairseq uses."]
    lines += [f"{key} = {value}: {' '.join(sorted(rows))}" for (key, value), rows in sorted(by_key.items())]
    return "\n".join(lines) + "\n"


def test_keys_from_schema_defaults_are_listed_and_reviewed(composed):
    found = schema_default_keys(composed, WAV2VEC2_ROWS)
    # the leaks the audit found, each now set by its row
    assert "model.feature_grad_mult" not in found["large_pretrain"]
    for name in FINETUNE_ROWS + ST_ROWS:
        for key in ("model.layerdrop", "model.freeze_finetune_updates", "optimization.lr",
                    "distributed_training.paper_world_size", "dataset.max_tokens", "model.mask_channel_prob"):
            assert key not in found[name], (name, key)
    for name in PRETRAIN_ROWS:
        assert "checkpoint.best_checkpoint_metric" not in found[name]
        assert "dataset.validate_interval_updates" not in found[name]
    assert found["base_pretrain"]["model.conv_pos"] == 128  # a real default is listed
    text = render_schema_defaults(found)
    if os.environ.get("REPRO_UPDATE_GOLDEN"):
        GOLDEN_SCHEMA_DEFAULTS.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_SCHEMA_DEFAULTS.write_text(text)
    assert text == GOLDEN_SCHEMA_DEFAULTS.read_text(), (
        "the keys rows take from schema defaults changed (a new schema field, or a row that stopped setting a key): "
        "check that each new default is what the paper / fairseq uses, then regenerate with REPRO_UPDATE_GOLDEN=1 "
        "pytest tests/unit/test_experiments.py -k schema_defaults and review the diff of "
        "tests/golden/experiments/schema_defaults.txt")


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
    assert plan.paper_gpu_hours == 64 * 38.4 and plan.estimated_hours == 64 * 38.4 / 8  # §4.2: 1.6 days on 64 V100
    assert plan.estimated_jobs == math.ceil(64 * 38.4 / 8 * 60 / 4320)
    assert (plan.compute_source, plan.world_size_source.split(" (")[0]) == ("paper §4.2", "paper §4.2")
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
    assert ("update_freq: 4  (configured 1; reference world size 64 GPUs [paper §4.2 (64 V100 GPUs x 1.4m samples = "
            "1.6 h of audio per update)]; 16 x 4 here)") in lines
    assert ("effective batch: <= 89,600,000 samples = 5,600.0 s (1.56 h) of audio per update "
            "(max_tokens 1,400,000 x 16 x 4)") in lines
    assert "reference compute [paper §4.2]: 64 x V100 x 38.4 h = 2,458 GPU-hours" in lines
    assert ("estimate here: 153.6 h (6.4 days) on 16 x A100 at the reference run's per-GPU speed; "
            "7 SLURM run(s) of 1440 min (requeued in between)") in lines
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
    # LARGE fine-tunes on 24 GPUs (§4.3): one node of 8 x update_freq 3; the §4.3 grid is announced
    assert "update_freq: 3  (configured 1; reference world size 24 GPUs [paper §4.3" in result.stdout
    assert "selection: 2 lr [2e-05, 3e-05] x 3 seeds = 6 fine-tunings" in result.stdout
    assert not (tmp_path / "run" / "slurm").exists()
    # recipe=fairseq: vox_10m.yaml's 4 GPUs x update_freq 5; 5 of the node's 8 GPUs x 4 keep that batch exactly
    fairseq = subprocess.run([sys.executable, "-m", "repro", "experiment=large_lv60_10m", "cluster=slurm_h100",
                              "recipe=fairseq", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "using 5 of the 8 GPUs per node" in fairseq.stdout
    assert "reference world size 20 GPUs [fairseq vox_10m.yaml (4 GPUs x update_freq 5)]" in fairseq.stdout
    assert "selection:" not in fairseq.stdout.split("resolved config:")[0]


def test_dry_run_refuses_a_world_size_that_cannot_keep_the_batch(composed, v100_cluster):
    five_nodes = OmegaConf.merge(composed["large_lv60_10m"], {"cluster": v100_cluster}, {"cluster": {"nodes": 5}})
    assert "cannot launch: distributed_training.paper_world_size=24 is not a multiple of the world size 40" in (
        slurm.describe_plan(five_nodes))


@pytest.mark.parametrize("recipe", ["paper", "fairseq"])
def test_dry_run_works_for_every_row_and_labels_every_reference_by_its_source(composed, composed_fairseq, v100_cluster,
                                                                              recipe):
    for name, row_cfg in (composed if recipe == "paper" else composed_fairseq).items():
        cfg = OmegaConf.merge(row_cfg, {"cluster": v100_cluster})
        text = slurm.describe_plan(cfg)
        assert "cannot launch" not in text, (name, text[:800])
        plan = plan_launch(cfg, environ={})
        assert plan.world_size in (5, 8) and plan.batch_samples is not None, name  # 5 x 4 keeps fairseq's 4 x 5
        for line in text.split("resolved config:")[0].splitlines():
            if line.startswith(("update_freq:", "reference compute")) and "paper" in line:
                source = line.split("[", 1)[1]  # 'paper' appears only inside a source label that says so
                assert source.startswith("paper §"), (name, line)
        if name in WAV2VEC2_ROWS:
            assert cfg.paper.compute_source and cfg.paper.world_size_source, name
        if (recipe == "fairseq" and name in WAV2VEC2_ROWS
                and cfg.distributed_training.paper_world_size not in (8, 24, 64, 128)):
            assert cfg.paper.world_size_source.startswith("fairseq "), name


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
