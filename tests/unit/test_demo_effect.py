"""The demo's size choice, its effect summary (the verdict is computed, never written) and its memory probes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from repro.report.collect import RunRecord
from repro.report.effect import effect_summary
from repro.tools.demo import choose_size


def _demo_cfg(auto_size: bool):
    return OmegaConf.create({
        "corpus_dir": "data/synthetic", "corpus_hours": 1.0, "pretrain_updates": 800, "finetune_updates": {"10m": 600},
        "auto_size": auto_size,
        "cuda": {"corpus_dir": "data/synthetic-cuda", "corpus_hours": 4.0, "pretrain_updates": 4000,
                 "finetune_updates": {"10m": 2000}, "model_overrides": ["model.encoder_layers=6"]},
    })


def test_cuda_size_only_with_a_gpu_and_auto_size_on():
    assert choose_size(_demo_cfg(True), cuda_available=False).label == "cpu"
    assert choose_size(_demo_cfg(False), cuda_available=True).label == "cpu"
    big = choose_size(_demo_cfg(True), cuda_available=True)
    assert (big.label, big.corpus_dir, big.pretrain_updates, big.model_overrides) == (
        "cuda", "data/synthetic-cuda", 4000, ["model.encoder_layers=6"])


def _finetune(variant: str, labeled: str, dev_other: float, dev_clean: float, viterbi_offset: float = 10.0):
    return RunRecord(
        name=f"demo/{variant}_{labeled}", run_dir="", status="finished", stage="finetune,evaluate",
        synthetic=True, labeled_data=labeled, pretrained=variant == "pretrained",
        results={"kenlm_4gram": {"dev_other": {"wer": dev_other}, "dev_clean": {"wer": dev_clean}},
                 "viterbi": {"dev_other": {"wer": dev_other + viterbi_offset},
                             "dev_clean": {"wer": dev_clean + viterbi_offset}}},
    )


def test_effect_verdict_and_checks_follow_the_numbers():
    pretrain = RunRecord(name="demo/pretrain", run_dir="", status="finished", stage="pretrain", synthetic=True,
                         curves={"valid/accuracy": [(100, 0.1), (800, 0.45)], "valid/code_perplexity": [(800, 7.5)]})
    records = [pretrain,
               _finetune("pretrained", "10m", 60.0, 50.0), _finetune("scratch", "10m", 100.0, 95.0),
               _finetune("pretrained", "1h", 40.0, 30.0), _finetune("scratch", "1h", 80.0, 70.0),
               _finetune("pretrained", "10h", 30.0, 20.0), _finetune("scratch", "10h", 35.0, 25.0)]
    effect = effect_summary(records)
    assert effect.relative_gain("10m") == 0.4 and effect.relative_gain("1h") == 0.5
    assert effect.pretrain_accuracy == 0.45
    assert [c.met for c in effect.checks] == [True, True, True, True, True, True]
    assert effect.verdict.startswith("Pretraining helps on every labeled split")
    assert "6 of 6 demo goals met" in effect.verdict

    worse = records[:1] + [_finetune("pretrained", "10m", 100.0, 90.0), _finetune("scratch", "10m", 90.0, 95.0)]
    effect = effect_summary(worse)
    assert effect.relative_gain("10m") < 0
    assert "does not help" in effect.verdict
    assert not next(c for c in effect.checks if c.text.startswith("10m")).met


def test_self_training_sentence_says_whether_it_beat_its_labeller():
    labeller = _finetune("pretrained", "10m", 60.0, 50.0)
    st = RunRecord(name="demo/self_training_10m", run_dir="", status="finished",
                   stage="pseudo_label,finetune,evaluate,st_compare", synthetic=True,
                   results={"kenlm_4gram": {"dev_other": {"wer": 55.0}}}, curves={"pseudo_label/wer": [(0, 42.0)]})
    effect = effect_summary([labeller, st])
    assert effect.self_training == {"labeled": "10m", "wer": 55.0, "pseudo_label_wer": 42.0, "labeler_wer": 60.0}
    assert effect.self_training_sentence == (
        "Self-training on 10m + the unlabeled pool labelled by the 10m model (pseudo-label WER 42.0%) beat its "
        "labeller on dev-other with the 4-gram: 55.0 vs 60.0.")
    assert effect.lines()[-1] == effect.self_training_sentence
    st.results["kenlm_4gram"]["dev_other"]["wer"] = 61.0
    assert "did not beat its labeller" in effect_summary([labeller, st]).self_training_sentence
    assert effect_summary([st]).self_training_sentence is None  # no labeller to compare with


def test_peak_rss_is_measured_per_step():
    # In a fresh process: in this one, earlier tests may have tuned malloc (demo.low_memory fixes glibc's mmap
    # threshold), so 64 MiB could come from heap pages that are already resident and move no counter.
    script = (
        "from repro.tools.demo import peak_rss_mb, reset_peak_rss\n"
        "reset_peak_rss(); before = peak_rss_mb()\n"
        "block = bytearray(64 * 1024 * 1024); block[::4096] = b'x' * len(block[::4096])  # touch 64 MiB\n"
        "print(before, peak_rss_mb())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=120)
    before, after = map(float, result.stdout.split())
    assert after >= before + 48


def test_low_memory_returns_freed_blocks_to_the_system():
    # A freed 8 MiB block raises glibc's mmap threshold, so the next 4 MiB block comes from heap pages that stay
    # resident after free (the fast default); demo.low_memory serves it with mmap, which returns it at free.
    script = (
        "import ctypes, sys\n"
        "from repro.tools.demo import _start_worker, current_rss_mb\n"
        "_start_worker(1, sys.argv[1] == 'low', None)\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.free(libc.malloc(8 << 20))\n"
        "block = libc.malloc(4 << 20); ctypes.memset(block, 1, 4 << 20)\n"
        "with_block = current_rss_mb(); libc.free(block)\n"
        "print(with_block - current_rss_mb())\n"
    )
    returned = {}
    for mode in ("low", "default"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[2], timeout=120)
        returned[mode] = float(result.stdout.split()[-1])
    assert returned["low"] >= 3.5, returned
    assert returned["default"] < 1.0, returned
