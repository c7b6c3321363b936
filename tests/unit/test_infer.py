"""infer tool and stage=evaluate end to end on a tiny random CTC model and a tiny manifest."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from omegaconf import OmegaConf

from repro.checkpoints.format import atomic_save, model_file
from repro.config import ReproConfig
from repro.data.audio_headers import AudioCheckError
from repro.data.dictionary import Dictionary
from repro.decode import evaluate
from repro.decode.viterbi import viterbi_decode
from repro.decode.wer import corpus_wer, edit_distance, units_to_words
from repro.models.ctc import Wav2Vec2CTC
from repro.models.presets import PRESETS
from repro.tools import infer

REPO = Path(__file__).resolve().parents[2]
LETTERS = list("|EOTAHNS")
TRANSCRIPTS = ["THE HAT", "NO", "A HOT SEA", "TEN HENS"]
LEXICON_WORDS = ["THE", "HAT", "NO", "A", "HOT", "SEA", "TEN", "HENS", "ON", "SET"]


def spell(sentence: str) -> str:
    return " ".join(" ".join(word) + " |" for word in sentence.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("infer")
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir()
    rows = []
    for i in range(len(TRANSCRIPTS)):
        samples = int(16000 * (0.4 + 0.15 * i))
        soundfile.write(audio / f"utt{i}.wav", (0.1 * rng.standard_normal(samples)).astype(np.float32), 16000)
        rows.append(f"utt{i}.wav\t{samples}")
    data = root / "data"
    data.mkdir()
    (data / "dev_other.tsv").write_text(f"{audio}\n" + "\n".join(rows) + "\n")
    (data / "dev_other.ltr").write_text("".join(spell(t) + "\n" for t in TRANSCRIPTS))
    dictionary = Dictionary.from_symbols(LETTERS)
    dictionary.save(data / "dict.ltr.txt")

    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], _name="wav2vec_ctc")
    model = Wav2Vec2CTC(cfg, len(dictionary)).eval()
    with torch.no_grad():  # peaked, varied outputs so decoding has something to do
        model.w2v_encoder.proj.weight.mul_(20.0)
    checkpoint = root / "checkpoint_best.pt"
    atomic_save(
        model_file(kind="wav2vec_ctc", model_state=model.state_dict(), model_cfg=dataclasses.asdict(cfg),
                   task_cfg={"normalize": False, "labels": "ltr"}, dictionary=dictionary.symbols),
        checkpoint,
    )
    lexicon = root / "lexicon.txt"
    lexicon.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in LEXICON_WORDS))
    lm_text = root / "lm.txt"
    lm_text.write_text("\n".join(TRANSCRIPTS * 5 + ["THE HOT SEA", "SET TEN HENS ON A HAT", "NO"]) + "\n")
    arpa = root / "lm.arpa"
    subprocess.run([str(Path(sys.executable).parent / "lmplz"), "-o", "4", "-S", "100M", "-T", str(root),
                    "--discount_fallback", "--text", str(lm_text), "--arpa", str(arpa)], check=True, capture_output=True)
    return {"data": data, "checkpoint": checkpoint, "lexicon": lexicon, "arpa": arpa, "root": root}


def run_infer(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    return infer.main(parser.parse_args(argv))


def read_trn(path: Path) -> list[str]:
    return [line.rsplit(" (", 1)[0] for line in path.read_text().splitlines()]


def test_infer_viterbi_matches_direct_greedy_and_reports_fairseq_wer(corpus, tmp_path, capsys):
    results = tmp_path / "results"
    code = run_infer([str(corpus["data"]), "--task", "audio_finetuning", "--path", str(corpus["checkpoint"]),
                      "--gen-subset", "dev_other", "--w2l-decoder", "viterbi", "--results-path", str(results),
                      "--labels", "ltr", "--max-tokens", "4000000", "--post-process", "letter", "--quiet"])
    assert code == 0
    name = corpus["checkpoint"].name
    hyp_units = read_trn(results / f"hypo.units-{name}-dev_other.txt")
    hyp_words = read_trn(results / f"hypo.word-{name}-dev_other.txt")
    ref_words = read_trn(results / f"ref.word-{name}-dev_other.txt")
    assert ref_words == TRANSCRIPTS
    assert (results / f"ref.units-{name}-dev_other.txt").read_text().splitlines()[1] == "N O | (None-1)"

    # the same batch (4 x <= 1 s fits in 4M samples) through the model directly, then greedy
    from repro.checkpoints.fairseq import load

    loaded = load(corpus["checkpoint"])
    split = evaluate.load_split(corpus["data"], "dev_other", loaded.dictionary, "ltr")
    batch = split.dataset.collater([split.dataset[i] for i in range(len(split.dataset))])
    with torch.no_grad():
        logits, frame_padding = loaded.model.eval()(batch["net_input"]["source"], batch["net_input"]["padding_mask"])
    lengths = (~frame_padding).sum(-1) if frame_padding is not None else None
    direct = [loaded.dictionary.string(h.tokens) for h in viterbi_decode(logits, lengths)]
    assert hyp_units == direct
    assert hyp_words == [units_to_words(u) for u in direct]
    assert any(hyp_units)  # the scaled head emits letters, not only blanks

    expected_wer = 100.0 * sum(edit_distance(r.split(), h.split()) for r, h in zip(ref_words, hyp_words)) / sum(
        len(r.split()) for r in ref_words)
    printed = capsys.readouterr().out
    assert f"WER: {expected_wer:.4f}" in printed
    assert corpus_wer(ref_words, hyp_words) == pytest.approx(expected_wer)


def test_infer_kenlm_outputs_lexicon_words_and_missing_lexicon_is_an_error(corpus, tmp_path, capsys):
    results = tmp_path / "results"
    code = run_infer([str(corpus["data"]), "--path", str(corpus["checkpoint"]), "--gen-subset", "dev_other",
                      "--w2l-decoder", "kenlm", "--lm-model", str(corpus["arpa"]), "--lexicon", str(corpus["lexicon"]),
                      "--lm-weight", "2", "--word-score", "-1", "--sil-weight", "0", "--beam", "20",
                      "--results-path", str(results), "--quiet"])
    assert code == 0
    words = " ".join(read_trn(results / f"hypo.word-{corpus['checkpoint'].name}-dev_other.txt")).split()
    assert set(words) <= set(LEXICON_WORDS)
    code = run_infer([str(corpus["data"]), "--path", str(corpus["checkpoint"]), "--gen-subset", "dev_other",
                      "--w2l-decoder", "kenlm", "--lm-model", str(corpus["arpa"]), "--quiet"])
    assert code == 1
    assert "needs a lexicon" in capsys.readouterr().err


class RecordingTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[str, dict]] = []
        self.artifacts: list[Path] = []

    def log_metrics(self, metrics, step, split="train"):
        self.metrics.append((split, dict(metrics)))

    def log_artifact(self, path):
        self.artifacts.append(Path(path))


def test_run_evaluate_logs_every_setup_and_reuses_cached_emissions(corpus, tmp_path, monkeypatch):
    cfg = OmegaConf.structured(ReproConfig)
    cfg.task.data = str(corpus["data"])
    cfg.task.labels = "ltr"
    cfg.common.cpu = True
    cfg.common_eval.path = str(corpus["checkpoint"])
    cfg.paper.eval_splits = ["dev_other", "test_clean"]  # test_clean has no manifest: skipped
    cfg.decodings = {
        "viterbi": {"type": "viterbi"},
        "kenlm_4gram": {"type": "kenlm", "lm_model": str(corpus["arpa"]), "lexicon": str(corpus["lexicon"]),
                        "beam": 20, "lm_weight": 1.0, "word_score": 0.0},
    }
    tracker = RecordingTracker()
    summary = evaluate.run_evaluate(cfg, tmp_path / "run", tracker)
    assert [split for split, _ in tracker.metrics] == ["dev_other/viterbi", "dev_other/kenlm_4gram"]
    assert set(summary) == {"dev_other"}
    written = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert written["results"]["dev_other"]["kenlm_4gram"]["wer"] == pytest.approx(summary["dev_other"]["kenlm_4gram"]["wer"])
    assert written["decodings"]["kenlm_4gram"]["unk_weight"] == "-inf"
    run_eval = tmp_path / "run" / "eval"
    assert (run_eval / "emissions" / "dev_other.pt").exists()
    name = corpus["checkpoint"].name
    refs = read_trn(run_eval / "dev_other" / "viterbi" / f"ref.word-{name}-dev_other.txt")
    hyps = read_trn(run_eval / "dev_other" / "viterbi" / f"hypo.word-{name}-dev_other.txt")
    assert summary["dev_other"]["viterbi"]["wer"] == pytest.approx(corpus_wer(refs, hyps))

    def must_not_run(*args, **kwargs):
        raise AssertionError("emissions should come from the cache")

    monkeypatch.setattr(evaluate, "compute_emissions", must_not_run)
    cfg.decodings["kenlm_4gram"]["lm_weight"] = 0.0
    again = evaluate.run_evaluate(cfg, tmp_path / "run", RecordingTracker())
    assert again["dev_other"]["viterbi"] == summary["dev_other"]["viterbi"]


def test_the_app_shows_each_evaluation_line_once(corpus, tmp_path):
    """Under the Hydra app the WER line reaches the terminal once (it used to be logged and printed)."""
    result = subprocess.run(
        [sys.executable, "-m", "repro", "experiment=demo_finetune", "stage=evaluate", "tracker=none",
         f"checkpoint={corpus['checkpoint']}", f"task.data={corpus['data']}", "paper.eval_splits=[dev_other]",
         f"decodings.kenlm_4gram.lm_model={corpus['arpa']}", f"decodings.kenlm_4gram.lexicon={corpus['lexicon']}",
         "decodings.kenlm_4gram.beam=20", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = (result.stdout + result.stderr).splitlines()
    for decoding in ("viterbi", "kenlm_4gram"):
        assert sum(f"dev_other/{decoding}: WER " in line for line in terminal) == 1, "\n".join(terminal)
    logged = (tmp_path / "run" / "cli.log").read_text()  # and the run's log file keeps it
    assert logged.count("dev_other/viterbi: WER ") == 1


def test_evaluation_checks_the_audio_of_every_split_before_any_emission(corpus, tmp_path, monkeypatch, capsys):
    """A file at another rate in the second split stops evaluation, named by manifest line, before the first
    split's emissions are computed; `infer` names it the same way."""
    data = tmp_path / "data"
    shutil.copytree(corpus["data"], data)
    audio = Path((data / "dev_other.tsv").read_text().splitlines()[0])
    bad = tmp_path / "bad_audio"
    shutil.copytree(audio, bad)
    manifest_rows = (data / "dev_other.tsv").read_text().splitlines()
    (data / "test_other.tsv").write_text("\n".join([str(bad), *manifest_rows[1:]]) + "\n")
    shutil.copy(data / "dev_other.ltr", data / "test_other.ltr")
    frames = soundfile.info(str(bad / "utt2.wav")).frames
    soundfile.write(bad / "utt2.wav", np.zeros(frames, np.float32), 8000)  # same length, another rate
    cfg = OmegaConf.structured(ReproConfig)
    cfg.task.data, cfg.task.labels, cfg.common.cpu = str(data), "ltr", True
    cfg.common_eval.path = str(corpus["checkpoint"])
    cfg.paper.eval_splits = ["dev_other", "test_other"]
    cfg.decodings = {"viterbi": {"type": "viterbi"}}

    def must_not_run(*args, **kwargs):
        raise AssertionError("emissions computed before the audio check")

    monkeypatch.setattr(evaluate, "compute_emissions", must_not_run)
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path / "cache"))
    named = f"{data / 'test_other.tsv'}:4: {bad / 'utt2.wav'}: sample rate 8000 Hz, expected 16000 Hz"
    with pytest.raises(AudioCheckError) as refused:
        evaluate.run_evaluate(cfg, tmp_path / "run", RecordingTracker())
    assert named in str(refused.value)
    assert not (tmp_path / "run" / "eval" / "emissions").exists()
    monkeypatch.setattr(infer, "compute_emissions", must_not_run)
    assert run_infer([str(data), "--path", str(corpus["checkpoint"]), "--gen-subset", "test_other", "--cpu"]) == 1
    assert named in capsys.readouterr().err
