"""Self-training (Xu et al. 2021) on the synthetic corpus: pseudo-labels, shards, resume, combined split, bad input.

The labelling model is a tiny random CTC model over the corpus' letters (sharpened so that decoding has
something to do); the decoder is the corpus' own 4-gram lexicon beam. Nothing here needs the model to
be good: the tests check files, equalities and errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from repro.checkpoints.format import atomic_save, model_file
from repro.config import ReproConfig
from repro.data.dataset import FileAudioDataset, load_labels
from repro.data.dictionary import Dictionary
from repro.data.librispeech import TranscriptLookup, words_to_letters
from repro.data.manifest import ManifestEntry, format_manifest, read_manifest, write_manifest
from repro.data.synth import make_corpus
from repro.decode.evaluate import run_evaluate
from repro.decode.lexicon import LexiconError
from repro.decode.wer import corpus_wer
from repro.launch.pseudo_label import describe_pseudo_label, run_pseudo_label, run_shards_on_slurm
from repro.models.ctc import Wav2Vec2CTC
from repro.models.presets import PRESETS
from repro.tasks import task_module
from repro.tools.manifest import build_manifest
from repro.tools.prepare_librispeech import prepare
from repro.train import self_training
from repro.train.self_training import PseudoLabelError, plan_shards
from repro.train.stages import run_finetune

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st")
    corpus_dir = root / "corpus"
    make_corpus(corpus_dir, hours=0.02, seed=0, progress=False)
    data = root / "data"
    prepare(corpus_dir, data)
    pool = build_manifest(corpus_dir / "pretrain", ext="flac", valid_percent=0.0, seed=0)
    (root / "unlabeled").mkdir()
    write_manifest(root / "unlabeled" / "train.tsv", pool.root, pool.train)  # transcripts stay hidden in .trans.txt
    dictionary = Dictionary.load(data / "dict.ltr.txt")
    torch.manual_seed(0)
    model_cfg = dataclasses.replace(PRESETS["tiny"], _name="wav2vec_ctc")
    model = Wav2Vec2CTC(model_cfg, len(dictionary)).eval()
    with torch.no_grad():
        model.w2v_encoder.proj.weight.mul_(20.0)
    checkpoint = root / "labeler.pt"
    atomic_save(model_file(kind="wav2vec_ctc", model_state=model.state_dict(), model_cfg=dataclasses.asdict(model_cfg),
                           task_cfg={"normalize": False, "labels": "ltr"}, dictionary=dictionary.symbols), checkpoint)
    return {"root": root, "corpus": corpus_dir, "data": data, "unlabeled": root / "unlabeled" / "train.tsv",
            "checkpoint": checkpoint, "lm": corpus_dir / "lm"}


def st_config(corpus: dict[str, Path], out: Path, **self_training):
    cfg = OmegaConf.structured(ReproConfig)
    cfg.experiment = "st_test"
    cfg.common.cpu = True
    cfg.task.data = str(corpus["data"])
    cfg.task.labels = "ltr"
    cfg.dataset.train_subset = "train_10m"
    cfg.dataset.max_tokens = 160_000  # 10 s: several emission batches
    cfg.decodings = {"kenlm_4gram": {"type": "kenlm", "name": "kenlm_4gram", "lm_model": str(corpus["lm"] / "4-gram.bin"),
                                     "lexicon": str(corpus["lm"] / "lexicon.txt"), "beam": 20, "lm_weight": 1.0,
                                     "word_score": 0.5}}
    cfg.self_training = OmegaConf.merge(cfg.self_training, {
        "unlabeled_data": str(corpus["unlabeled"]), "labeling_checkpoint": str(corpus["checkpoint"]),
        "output_dir": str(out), **self_training})
    return cfg


def label_files(out: Path, name: str = "pseudo") -> dict[str, str]:
    return {suffix: (out / f"{name}.{suffix}").read_text() for suffix in ("tsv", "ltr", "wrd", "scores.tsv")}


class RecordingTracker:
    def __init__(self) -> None:
        self.metrics, self.params, self.artifacts = [], {}, []

    def log_metrics(self, metrics, step, split="train"):
        self.metrics.append((split, dict(metrics)))

    def log_params(self, params):
        self.params.update(params)

    def log_artifact(self, path):
        self.artifacts.append(Path(path))


@pytest.fixture(scope="module")
def unsharded(corpus, tmp_path_factory) -> tuple[Path, dict, RecordingTracker]:
    out = tmp_path_factory.mktemp("unsharded")
    tracker = RecordingTracker()
    summary = run_pseudo_label(st_config(corpus, out), out, tracker)
    return out, summary, tracker


def test_pseudo_labels_are_fairseq_files_that_finetuning_reads(corpus, unsharded):
    out, summary, _ = unsharded
    manifest = read_manifest(out / "pseudo.tsv")
    unlabeled = read_manifest(corpus["unlabeled"])
    assert [e.rel_path for e in manifest.entries] == [e.rel_path for e in unlabeled.entries]  # no filter: every row
    words = (out / "pseudo.wrd").read_text().split("\n")[:-1]
    letters = (out / "pseudo.ltr").read_text().split("\n")[:-1]
    assert len(words) == len(letters) == len(manifest) == summary["utterances"] == summary["kept"]
    assert any(words), "the decoder produced no word at all"
    for word_line, letter_line in zip(words, letters):  # libri_labels.py's letter format
        assert letter_line == (words_to_letters(word_line) if word_line else "")
    dictionary = Dictionary.load(corpus["data"] / "dict.ltr.txt")
    for split_dir, split in ((out, "pseudo"), (out, "train_st")):  # what stage finetune loads
        dataset = FileAudioDataset(split_dir / f"{split}.tsv", pad=True)
        labels = load_labels(split_dir / f"{split}.ltr", dictionary, dataset.skipped_indices, dataset.manifest_rows)
        assert len(labels) == len(dataset) and dataset[0]["source"].numel() > 0
    scores = (out / "pseudo.scores.tsv").read_text().splitlines()
    assert scores[0].split("\t") == ["id", "audio", "frames", "score", "score_per_frame", "kept"]
    mean = sum(float(line.split("\t")[3]) for line in scores[1:]) / (len(scores) - 1)
    assert summary["mean_score"] == pytest.approx(mean, abs=1e-5)


def test_combined_split_has_labeled_and_pseudo_labeled_utterances_once(corpus, unsharded, tmp_path):
    out, summary, _ = unsharded
    combined = read_manifest(out / "train_st.tsv")
    labeled = read_manifest(corpus["data"] / "train_10m.tsv")
    assert summary["combined"] == {"labeled": len(labeled), "pseudo": summary["kept"], "duplicates_dropped": 0}
    paths = [str(combined.audio_path(i).resolve()) for i in range(len(combined))]
    assert len(paths) == len(set(paths)) == len(labeled) + summary["kept"]
    assert paths[: len(labeled)] == [str(labeled.audio_path(i).resolve()) for i in range(len(labeled))]
    combined_ltr = (out / "train_st.ltr").read_text().split("\n")[:-1]
    assert combined_ltr[: len(labeled)] == (corpus["data"] / "train_10m.ltr").read_text().split("\n")[:-1]
    # an utterance in both sets keeps its human label, once
    overlap = tmp_path / "overlap"
    overlap.mkdir()
    for suffix in ("tsv", "ltr", "wrd"):
        (overlap / f"pseudo.{suffix}").write_text((out / f"pseudo.{suffix}").read_text())
    pseudo = read_manifest(out / "pseudo.tsv")
    write_manifest(overlap / "labeled.tsv", pseudo.root, pseudo.entries[:3])
    for suffix in ("ltr", "wrd"):
        lines = (corpus["data"] / f"train_10m.{suffix}").read_text().split("\n")[:3]
        (overlap / f"labeled.{suffix}").write_text("".join(line + "\n" for line in lines))
    counts = self_training.write_combined_split(overlap, "labeled", overlap, "pseudo", "both")
    assert counts == {"labeled": 3, "pseudo": len(pseudo) - 3, "duplicates_dropped": 3}
    both = read_manifest(overlap / "both.tsv")
    assert len({both.audio_path(i).name for i in range(len(both))}) == len(both)


def test_pseudo_label_wer_equals_what_evaluate_reports(corpus, tmp_path):
    # the hidden transcripts as a labeled split, so that stage evaluate can score the same audio
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    unlabeled = read_manifest(corpus["unlabeled"])
    write_manifest(split_dir / "pool.tsv", unlabeled.root, unlabeled.entries)
    lookup = TranscriptLookup()
    (split_dir / "pool.ltr").write_text("".join(words_to_letters(lookup.words(unlabeled.audio_path(i))) + "\n"
                                                for i in range(len(unlabeled))))
    (split_dir / "dict.ltr.txt").write_text((corpus["data"] / "dict.ltr.txt").read_text())
    out = tmp_path / "labels"
    cfg = st_config(corpus, out, unlabeled_data=str(split_dir / "pool.tsv"), num_shards=2)
    summary = run_pseudo_label(cfg, tmp_path / "run")
    cfg.task.data = str(split_dir)
    cfg.common_eval.path = str(corpus["checkpoint"])
    cfg.paper.eval_splits = ["pool"]
    cfg.paper.decoding = ["kenlm_4gram"]
    evaluated = run_evaluate(cfg, tmp_path / "eval_run")
    assert 0 < summary["wer"] == pytest.approx(evaluated["pool"]["kenlm_4gram"]["wer"], abs=1e-9)
    # the .trans.txt files beside the audio give the same references when no .ltr is there
    assert self_training.hidden_references(corpus["unlabeled"], len(unlabeled)) == \
        self_training.hidden_references(split_dir / "pool.tsv", len(unlabeled))


def test_three_shards_write_the_same_files_as_one(corpus, unsharded, tmp_path):
    out, _, _ = unsharded
    sharded = tmp_path / "sharded"
    summary = run_pseudo_label(st_config(corpus, sharded, num_shards=3, workers=2), tmp_path)
    assert summary["shards"] == 3
    assert label_files(sharded) == label_files(out)
    assert (sharded / "train_st.tsv").read_text() == (out / "train_st.tsv").read_text()


def test_shards_are_whole_emission_batches_and_cover_every_row():
    sizes = [16000 * (1 + i % 7) for i in range(50)]
    for num_shards in (1, 3, 7, 100):
        shards = plan_shards(sizes, num_shards, max_tokens=200_000)
        rows = sorted(row for shard in shards for row in shard.rows)
        assert rows == list(range(50))
        assert len(shards) == min(num_shards, len(shards)) and all(shard.rows for shard in shards)
    with pytest.raises(PseudoLabelError, match="num_shards"):
        plan_shards(sizes, 0, 200_000)


def stage_command(corpus: dict[str, Path], out: Path, num_shards: int = 3) -> list[str]:
    lm = corpus["lm"]
    return [
        sys.executable, "-m", "repro", "stage=pseudo_label", "tracker=none", "common.cpu=true",
        f"task.data={corpus['data']}", "task.labels=ltr", "dataset.train_subset=train_10m", "dataset.max_tokens=160000",
        f"hydra.run.dir={out / 'run'}", f"self_training.unlabeled_data={corpus['unlabeled']}",
        f"self_training.labeling_checkpoint={corpus['checkpoint']}", f"self_training.output_dir={out}",
        f"self_training.num_shards={num_shards}", "+decodings.kenlm_4gram.type=kenlm",
        f"+decodings.kenlm_4gram.lm_model={lm / '4-gram.bin'}", f"+decodings.kenlm_4gram.lexicon={lm / 'lexicon.txt'}",
        "+decodings.kenlm_4gram.beam=20", "+decodings.kenlm_4gram.lm_weight=1.0", "+decodings.kenlm_4gram.word_score=0.5",
    ]


def test_a_shard_killed_mid_way_is_redone_alone(corpus, unsharded, tmp_path):
    out = tmp_path / "killed"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(stage_command(corpus, out), cwd=REPO, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    first = out / "shards" / "shard-00000-of-00003.done.json"
    deadline = time.time() + 120
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.exists(), process.stdout.read().decode()[-3000:] if process.poll() is not None else "timeout"
    os.killpg(process.pid, signal.SIGKILL)  # in the middle of shard 1
    process.wait()
    markers = sorted(path.name for path in (out / "shards").glob("*.done.json"))
    assert markers == ["shard-00000-of-00003.done.json"], "shard 1 finished before the kill: no mid-way state to test"
    first_marker = first.read_text()
    first_mtime = first.stat().st_mtime_ns
    result = subprocess.run(stage_command(corpus, out), cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 already done, 2 to label" in result.stderr
    assert first.stat().st_mtime_ns == first_mtime and first.read_text() == first_marker  # not redone
    assert label_files(out) == label_files(unsharded[0])


def test_dry_run_describes_the_labelling_plan(corpus, tmp_path):
    cfg = st_config(corpus, tmp_path, num_shards=4)
    lines = "\n".join(describe_pseudo_label(cfg))
    rows = len(read_manifest(corpus["unlabeled"]))
    assert f"{rows:,} utterances" in lines and "shards: 4 (this machine" in lines
    assert "GPU-hours" in lines and "kenlm_4gram (kenlm, beam 20" in lines
    assert "filters: none" in lines
    # a manifest that lives on the cluster only: the paper's size of the set gives the estimate
    remote = OmegaConf.merge(cfg, {"self_training": {"unlabeled_data": "/cluster/lv60k/train.tsv"},
                                   "paper": {"pretrain_data": "LV-60k"}, "cluster": {"name": "slurm"}})
    lines = "\n".join(describe_pseudo_label(remote))
    assert "LV-60k is 53,200 h" in lines and "SLURM job array of 4 task(s)" in lines and "GPU-hours" in lines
    assert "then a merge job after it (afterok)" in lines


# --- bad input: a clear error before any work -----------------------------------------------------


def _no_work_done(out: Path) -> bool:
    return not (out / "shards").exists() and not (out / "emissions").exists()


def test_missing_audio_is_named_before_any_work(corpus, tmp_path):
    unlabeled = read_manifest(corpus["unlabeled"])
    broken = tmp_path / "broken.tsv"
    write_manifest(broken, unlabeled.root, [*unlabeled.entries[:2], dataclasses.replace(unlabeled.entries[2], rel_path="gone/x.flac")])
    out = tmp_path / "out"
    with pytest.raises(PseudoLabelError, match=r"broken\.tsv:4: audio .*gone/x\.flac does not exist"):
        run_pseudo_label(st_config(corpus, out, unlabeled_data=str(broken)), tmp_path)
    assert _no_work_done(out)


def test_missing_or_foreign_lm_is_an_error_before_any_work(corpus, tmp_path):
    out = tmp_path / "out"
    cfg = st_config(corpus, out)
    cfg.decodings.kenlm_4gram.lm_model = str(tmp_path / "nope.bin")
    with pytest.raises(PseudoLabelError, match="lm_model .*nope.bin does not exist"):
        run_pseudo_label(cfg, tmp_path)
    foreign_text = tmp_path / "foreign.txt"
    foreign_text.write_text("zebra quantum lorem ipsum\n" * 20)
    foreign = tmp_path / "foreign.arpa"
    subprocess.run([str(Path(sys.executable).parent / "lmplz"), "-o", "2", "-S", "50M", "-T", str(tmp_path),
                    "--discount_fallback", "--text", str(foreign_text), "--arpa", str(foreign)], check=True,
                   capture_output=True)
    cfg.decodings.kenlm_4gram.lm_model = str(foreign)
    with pytest.raises(LexiconError, match="do not match"):
        run_pseudo_label(cfg, tmp_path)
    assert _no_work_done(out)


def test_a_labelling_checkpoint_without_ctc_head_is_refused(corpus, tmp_path):
    pretrained = tmp_path / "pretrained.pt"
    cfg_model = PRESETS["tiny"]
    from repro.models.wav2vec2 import Wav2Vec2Model

    atomic_save(model_file(kind="wav2vec2", model_state=Wav2Vec2Model(cfg_model).state_dict(),
                           model_cfg=dataclasses.asdict(cfg_model), task_cfg={"normalize": False}, dictionary=None),
                pretrained)
    out = tmp_path / "out"
    with pytest.raises(PseudoLabelError, match="without a CTC head"):
        run_pseudo_label(st_config(corpus, out, labeling_checkpoint=str(pretrained)), tmp_path)
    assert _no_work_done(out)


def test_labelling_is_tracked_with_counts_score_and_hidden_transcript_wer(unsharded):
    out, summary, tracker = unsharded
    [(split, metrics)] = tracker.metrics
    assert split == "pseudo_label"
    assert metrics["utterances"] == summary["utterances"] > 0
    assert metrics["mean_score"] == pytest.approx(summary["mean_score"])
    assert metrics["wer"] == pytest.approx(summary["wer"]) and summary["wer"] > 0  # from the hidden .trans.txt
    assert tracker.params["pseudo_label/shards"] == 1 and out / "summary.json" in tracker.artifacts
    assert json.loads((out / "summary.json").read_text())["utterances"] == summary["utterances"]


def test_finetune_stage_of_a_self_training_row_trains_on_the_combined_split(corpus, unsharded, tmp_path):
    out, summary, _ = unsharded
    cfg = st_config(corpus, out)
    cfg = OmegaConf.merge(cfg, {
        "stages": ["pseudo_label", "finetune", "evaluate"],
        "task": {"_name": "audio_finetuning"},
        "dataset": {"max_tokens": 400_000, "num_workers": 0, "valid_subset": "dev_other",
                    "required_batch_size_multiple": 1, "validate_interval_updates": 2},
        "model": {**OmegaConf.to_container(OmegaConf.structured(PRESETS["tiny"])), "_name": "wav2vec_ctc",
                  "no_pretrained_weights": True, "mask_prob": 0.3, "mask_length": 3},
        "criterion": {"_name": "ctc"},
        "optimization": {"max_update": 2, "lr": [1e-3], "sentence_avg": True},
        "lr_scheduler": {"_name": "tri_stage", "phase_ratio": [0.25, 0.25, 0.5]},
        "checkpoint": {"best_checkpoint_metric": "wer"},
        "tracker": {"backends": []},
    })
    retrain = self_training.retraining_config(cfg, tmp_path)
    setup = task_module(retrain).build(retrain, None)
    assert len(setup.train.dataset) == summary["combined"]["labeled"] + summary["combined"]["pseudo"]
    assert [split.name for split in setup.valid] == ["dev_other"]  # validation stays on task.data
    result = run_finetune(cfg, tmp_path / "run")
    assert result["num_updates"] == 2 and (tmp_path / "run" / "checkpoints" / "checkpoint_last.pt").exists()
    with pytest.raises(PseudoLabelError, match="run stage pseudo_label first"):
        self_training.retraining_config(OmegaConf.merge(cfg, {"self_training": {"output_dir": str(tmp_path / "x")}}),
                                        tmp_path)


def transformer_lm_for_lexicon(corpus: dict[str, Path], directory: Path) -> Path:
    """A tiny random Transformer LM in fairseq's checkpoint format whose dict.txt holds the corpus lexicon's words."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_transformer_lm import fairseq_args, fairseq_state_dict

    words = [line.split("\t")[0] for line in (corpus["lm"] / "lexicon.txt").read_text().splitlines() if line]
    state = fairseq_state_dict(4 + len(words), torch.Generator().manual_seed(3))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dict.txt").write_text("".join(f"{word.lower()} {len(words) - i}\n" for i, word in enumerate(words)))
    path = directory / "lm.pt"
    torch.save({"args": fairseq_args(), "model": state}, path)
    return path


def rescoring_config(corpus, out: Path, lm: Path, lm_weight: float, word_score: float):
    cfg = st_config(corpus, out, rescore_decoding="transformer", rescore_nbest=20)
    cfg.decodings.transformer = {"type": "fairseqlm", "name": "transformer", "lm_model": str(lm),
                                 "lexicon": str(corpus["lm"] / "lexicon.txt"), "lm_weight": lm_weight,
                                 "word_score": word_score}
    return cfg


def test_transformer_lm_rescoring_of_the_beam_nbest_chooses_the_labels(corpus, unsharded, tmp_path):
    """Rescoring with a zero LM weight and the beam's own weights keeps the beam's labels and scores, byte for
    byte; a weighted random Transformer LM changes some labels (tests/unit/test_rescore.py checks the choice)."""
    lm = transformer_lm_for_lexicon(corpus, tmp_path / "lm")
    neutral = run_pseudo_label(rescoring_config(corpus, tmp_path / "neutral", lm, 0.0, 0.5), tmp_path)
    assert label_files(tmp_path / "neutral") == label_files(unsharded[0])
    assert neutral["rescore"]["ngram_weight"] == 1.0 and neutral["rescore"]["nbest"] == 20
    weighted = run_pseudo_label(rescoring_config(corpus, tmp_path / "weighted", lm, 3.0, 0.5), tmp_path)
    before = (unsharded[0] / "pseudo.wrd").read_text().splitlines()
    after = (tmp_path / "weighted" / "pseudo.wrd").read_text().splitlines()
    assert len(before) == len(after) and before != after
    assert weighted["rescore"]["lm_weight"] == 3.0
    lines = "\n".join(describe_pseudo_label(rescoring_config(corpus, tmp_path / "x", lm, 3.0, 0.5)))
    assert "rescoring: 20 best with transformer" in lines
    # bad input, before any work: a rescoring entry that is not a Transformer LM, a missing LM
    cfg = rescoring_config(corpus, tmp_path / "bad", lm, 1.0, 0.0)
    cfg.self_training.rescore_decoding = "kenlm_4gram"
    with pytest.raises(PseudoLabelError, match="rescoring needs a fairseqlm one"):
        run_pseudo_label(cfg, tmp_path)
    cfg = rescoring_config(corpus, tmp_path / "bad", tmp_path / "missing.pt", 1.0, 0.0)
    with pytest.raises(PseudoLabelError, match="missing.pt does not exist"):
        run_pseudo_label(cfg, tmp_path)
    assert _no_work_done(tmp_path / "bad")


def test_array_submission_runs_each_shard_in_its_own_job_and_reports_a_failed_one(corpus, unsharded, tmp_path):
    """The map_array path with submitit's local process backend (the real-SLURM run is tests/integration)."""
    out = tmp_path / "array"
    cfg = st_config(corpus, out, num_shards=2)
    setup = self_training.prepare_labeling(cfg, tmp_path)
    sizes = [entry.num_samples for entry in read_manifest(corpus["unlabeled"]).entries]
    shards = plan_shards(sizes, 2, setup.max_tokens)
    assert run_shards_on_slurm(cfg, setup, shards, backend="local") == {}
    assert all(self_training.shard_is_done(setup, shard) for shard in shards)
    ids = (out / "slurm" / "job_ids").read_text().split()
    assert len(ids) == 2 and len(set(ids)) == 2
    self_training.merge_shards(setup, shards, "pseudo")
    assert (out / "pseudo.ltr").read_text() == (unsharded[0] / "pseudo.ltr").read_text()
    # a shard whose audio turned unreadable fails alone; the other one is not redone
    broken = dataclasses.replace(setup, output_dir=str(tmp_path / "broken"), manifest=str(tmp_path / "bad.tsv"))
    unlabeled = read_manifest(corpus["unlabeled"])
    (tmp_path / "garbage.flac").write_bytes(b"not audio")
    bad_row = shards[1].rows[0]
    entries = list(unlabeled.entries)
    entries[bad_row] = dataclasses.replace(entries[bad_row], rel_path=str(tmp_path / "garbage.flac"))
    write_manifest(tmp_path / "bad.tsv", unlabeled.root, entries)
    failures = run_shards_on_slurm(cfg, broken, shards, backend="local")
    assert list(failures) == [1] and "garbage.flac" in failures[1]
    assert self_training.shard_is_done(broken, shards[0]) and not self_training.shard_is_done(broken, shards[1])


def test_st_compare_records_whether_self_training_beat_the_labelling_model(tmp_path, capsys):
    labeler_run, st_run = tmp_path / "runs" / "demo_10m", tmp_path / "runs" / "demo_st"
    (labeler_run / "checkpoints").mkdir(parents=True)
    (labeler_run / "checkpoints" / "checkpoint_best.pt").write_bytes(b"")
    for run, results in ((labeler_run, {"dev_other": {"viterbi": {"wer": 80.0}, "kenlm_4gram": {"wer": 60.0}}}),
                         (st_run, {"dev_other": {"viterbi": {"wer": 70.0}, "kenlm_4gram": {"wer": 65.0}}})):
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps({"results": results}))
    cfg = OmegaConf.structured(ReproConfig)
    cfg.self_training.labeling_checkpoint = str(labeler_run / "checkpoints" / "checkpoint_best.pt")
    tracker = RecordingTracker()
    summary = self_training.run_compare(cfg, st_run, tracker)
    assert [(row["decoding"], row["better"]) for row in summary["rows"]] == [("kenlm_4gram", False), ("viterbi", True)]
    assert summary["better_in"] == 1 and summary["compared"] == 2
    assert json.loads((st_run / "self_training.json").read_text()) == summary
    assert "beat its labelling model in 1 of 2" in capsys.readouterr().out
    assert tracker.metrics == [("self_training", {"better_in": 1, "compared": 2})]
    (labeler_run / "eval" / "results.json").unlink()
    with pytest.raises(PseudoLabelError, match="labelling model's run"):
        self_training.run_compare(cfg, st_run)


# --- the merge streams ---------------------------------------------------------------------------


def written_labelling(tmp_path: Path, rows: int = 400, num_shards: int = 9):
    """Shards written by the stage's own writer for a manifest of `rows` utterances (no audio needed to merge)."""
    sizes = [1600 * (1 + (row * 7) % 13) for row in range(rows)]
    entries = [ManifestEntry(f"spk/{row}.flac", size) for row, size in enumerate(sizes)]
    write_manifest(tmp_path / "pool.tsv", tmp_path / "audio", entries)
    words = [f"W{row % 17} X{row % 5}" if row % 11 else "" for row in range(rows)]
    (tmp_path / "pool.wrd").write_text("".join(f"W{row % 17} Y\n" for row in range(rows)))  # hidden references
    dictionary = Dictionary.from_symbols(list("|WXY0123456789"))
    setup = self_training.LabelingSetup(
        manifest=str(tmp_path / "pool.tsv"), rows=rows, output_dir=str(tmp_path / "out"), checkpoint="labeler.pt",
        dictionary=tuple(dictionary.symbols), decode={"type": "kenlm"}, normalize=False, sample_rate=16000,
        max_tokens=20_000, post_process="letter", cpu=True, rescore=None, fingerprint="f")
    shards = plan_shards(sizes, num_shards, setup.max_tokens)
    for shard in shards:
        self_training.write_shard_outputs(setup, shard, tmp_path / "audio", [entries[row] for row in shard.rows],
                                          [words[row] for row in shard.rows], [sizes[row] // 320 for row in shard.rows],
                                          [-0.37 * row for row in shard.rows])
    return setup, shards, entries, words


def test_merge_streams_one_row_per_shard_and_writes_the_manifest_order(tmp_path, monkeypatch):
    setup, shards, entries, words = written_labelling(tmp_path)
    assert len(shards) == 9 and any(min(shard.rows) < max(other.rows) for shard in shards for other in shards
                                    if other is not shard)  # shards interleave in manifest order
    read, ahead = [0], []
    original_rows, original_keep = self_training.iter_shard_rows, self_training.keep_row

    def counting_rows(*args):
        for row in original_rows(*args):
            read[0] += 1
            yield row

    def watching_keep(row, *args):
        ahead.append(read[0] - row.row)  # rows read but not yet written
        return original_keep(row, *args)

    monkeypatch.setattr(self_training, "iter_shard_rows", counting_rows)
    monkeypatch.setattr(self_training, "keep_row", watching_keep)
    summary = self_training.merge_shards(setup, shards, "pseudo", drop_empty=True)
    assert read[0] == len(entries) and max(ahead) <= len(shards)  # never more than one row per shard held
    out = Path(setup.output_dir)
    kept = [row for row in range(len(entries)) if words[row]]
    assert (out / "pseudo.tsv").read_text() == format_manifest(tmp_path / "audio", [entries[row] for row in kept])
    assert (out / "pseudo.wrd").read_text() == "".join(words[row] + "\n" for row in kept)
    assert summary["utterances"] == len(entries) and summary["kept"] == len(kept)
    references = [f"W{row % 17} Y" for row in range(len(entries))]
    assert summary["wer"] == pytest.approx(corpus_wer(references, words), abs=1e-9)
    assert summary["kept_wer"] == pytest.approx(corpus_wer([references[r] for r in kept], [words[r] for r in kept]))
    assert summary["mean_score"] == pytest.approx(-0.37 * (len(entries) - 1) / 2, abs=1e-6)


def test_merge_beyond_the_open_file_budget_goes_through_run_files_to_the_same_bytes(tmp_path):
    setup, shards, _, _ = written_labelling(tmp_path, rows=300, num_shards=12)
    out = Path(setup.output_dir)
    direct = self_training.merge_shards(setup, shards, "direct")
    grouped = self_training.merge_shards(setup, shards, "grouped", max_open_files=12)  # 3 shards a run, 4 runs
    for suffix in ("tsv", "ltr", "wrd", "scores.tsv"):
        assert (out / f"direct.{suffix}").read_bytes() == (out / f"grouped.{suffix}").read_bytes()
    assert direct == grouped and not list((out / "merge_runs").glob("*"))
    with pytest.raises(PseudoLabelError, match="raise `ulimit -n`"):
        self_training.merge_shards(setup, shards, "tiny", max_open_files=4)  # 12 runs of one shard > 4 files
    assert not (out / "tiny.tsv").exists()


def test_slurm_submission_chains_array_merge_and_row_jobs_without_waiting(monkeypatch, tmp_path, capsys):
    """The job chain of a self-training row on SLURM (tests/integration runs the array and merge for real)."""
    from repro.launch import slurm

    submitted = []
    monkeypatch.setattr(slurm, "submit_labelling", lambda cfg, run_dir: {
        "array": "41", "shards": 3, "todo": 2, "folder": "pl/slurm", "output_dir": "pl"})

    def fake_submit_job(cfg, run_dir, after=(), config_name=slurm.FROZEN_CONFIG_NAME, cancel_with_dependency=False):
        submitted.append({"stage": cfg.stage, "stages": list(cfg.stages), "gpus": cfg.cluster.gpus_per_node,
                          "after": list(after), "config": config_name, "cancel": cancel_with_dependency})
        return str(42 + len(submitted) - 1)

    monkeypatch.setattr(slurm, "submit_job", fake_submit_job)
    cfg = OmegaConf.structured(ReproConfig)
    cfg.experiment = "large_lv60_10m_st"
    cfg.stages = ["pseudo_label", "finetune", "evaluate"]
    cfg.cluster = OmegaConf.merge(cfg.cluster, {"name": "slurm", "gpus_per_node": 8})
    assert slurm.submit_self_training(cfg, tmp_path, list(cfg.stages)) == 0
    merge, row = submitted
    assert merge == {"stage": "pseudo_label", "stages": ["pseudo_label", "finetune", "evaluate"], "gpus": 0,
                     "after": ["41"], "config": slurm.MERGE_CONFIG_NAME, "cancel": True}
    assert row == {"stage": None, "stages": ["finetune", "evaluate"], "gpus": 8, "after": ["42"],
                   "config": slurm.FROZEN_CONFIG_NAME, "cancel": True}
    said = capsys.readouterr().out
    assert "shard array 41 (2 of 3 shard(s)), merge job 42 after it, then finetune, evaluate as job 43" in said
    assert "squeue -j 41,42,43" in said


def test_demo_st_row_runs_its_stages_on_the_synthetic_corpus(corpus, tmp_path):
    """experiment=demo_st as `make demo` runs it (2 shards in 2 processes, the 4-gram beam, re-fine-tuning from
    the pretrained model, evaluate, st_compare), at toy size: its files point at this test's corpus and models."""
    from repro.models.wav2vec2 import Wav2Vec2Model

    runs = tmp_path / "runs"
    labeler = runs / "demo" / "pretrained_10m"
    (labeler / "checkpoints").mkdir(parents=True)
    (labeler / "checkpoints" / "checkpoint_best.pt").write_bytes(corpus["checkpoint"].read_bytes())
    splits, decodings = ["dev_clean", "dev_other", "test_clean", "test_other"], ["viterbi", "kenlm_4gram"]
    (labeler / "eval").mkdir()
    (labeler / "eval" / "results.json").write_text(json.dumps(
        {"results": {split: {decoding: {"wer": 100.0} for decoding in decodings} for split in splits}}))
    pretrained = runs / "demo" / "pretrain" / "checkpoints" / "checkpoint_last.pt"
    pretrained.parent.mkdir(parents=True)
    torch.manual_seed(1)
    atomic_save(model_file(kind="wav2vec2", model_state=Wav2Vec2Model(PRESETS["tiny"]).state_dict(),
                           model_cfg=dataclasses.asdict(PRESETS["tiny"]), task_cfg={"normalize": False},
                           dictionary=None), pretrained)
    lm, run_dir = corpus["lm"], tmp_path / "demo_st"
    command = [
        sys.executable, "-m", "repro", "experiment=demo_st", "tracker=none", "common.cpu=true",
        f"hydra.run.dir={run_dir}", f"task.data={corpus['data']}", f"model.w2v_path={pretrained}",
        f"self_training.unlabeled_data={corpus['unlabeled']}",
        f"self_training.labeling_checkpoint={labeler / 'checkpoints' / 'checkpoint_best.pt'}",
        f"decodings.kenlm_4gram.lm_model={lm / '4-gram.bin'}", f"decodings.kenlm_4gram.lexicon={lm / 'lexicon.txt'}",
        "decodings.kenlm_4gram.beam=20", "optimization.max_update=2", "dataset.max_tokens=160000",
        "dataset.validate_interval_updates=2", "checkpoint.save_interval_updates=2",
    ]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "pseudo_labels" / "summary.json").read_text())
    assert summary["shards"] == 2 and summary["rescore"] is None and summary["decode"]["name"] == "kenlm_4gram"
    assert summary["combined"]["pseudo"] == len(read_manifest(corpus["unlabeled"])) and "wer" in summary
    status = json.loads((run_dir / "status.json").read_text())
    assert status["completed_stages"] == ["pseudo_label", "finetune", "evaluate", "st_compare"]
    compared = json.loads((run_dir / "self_training.json").read_text())
    assert compared["compared"] == len(splits) * len(decodings)
