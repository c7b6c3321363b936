"""Run doctor: what went wrong in a run directory, with the evidence and the fix.

Reads what a run leaves (`config.yaml`, `metrics.jsonl`, `checkpoints/`, the data and decoding files the
config names) and checks for the failures wav2vec users meet most (fairseq issue tracker): fine-tuning
stuck at WER ~100% with all-blank emissions, pretraining accuracy at chance, codebook collapse, an extra
loss term dominating, dictionary / lexicon / LM mismatches, label files out of step with the manifest, a
learning rate that never leaves warmup, divergence, and a resumed run whose config changed.

Each check is a small function `(RunRecord) -> list[Finding]`; `diagnose` runs them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from repro.track.jsonl import METRICS_FILE, iter_metric_records

# --- thresholds (why each value: in the comment beside it) -------------------------------------------
STUCK_WER = 95.0
"""Validation WER (%) at or above which fine-tuning counts as stuck (a model emitting nothing scores 100)."""
ALL_BLANK_FRAMES = 0.95
"""Fraction of frames whose argmax is the blank above which the emissions count as all blank."""
CHANCE_FACTOR = 1.5
"""Pretraining accuracy below CHANCE_FACTOR x chance after warmup counts as 'at chance'."""
MIN_RECORDS_AFTER_WARMUP = 3
"""Logged updates after warmup needed before accuracy / perplexity trends are judged."""
COLLAPSE_FRACTION = 0.1
"""code_perplexity below this fraction of G x V is a collapsed codebook (BASE keeps ~half of 640 in use)."""
OVERFLOW_HALVINGS = 5
"""fp16 loss-scale decreases that count as repeated overflows."""
BLANK_SAMPLE_UTTERANCES = 8
"""Validation utterances run through the checkpoint to measure the blank posterior."""


@dataclass
class Finding:
    """One problem: a stable code for scripts, a one-line title, the evidence and the fix."""

    code: str
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str = ""


@dataclass
class RunRecord:
    """What a run directory holds, read once."""

    run_dir: Path
    cfg: DictConfig
    records: list[dict[str, Any]]

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("split") == name]

    @property
    def last_update(self) -> int:
        steps = [int(r["step"]) for r in self.records if r.get("split") == "train"]
        return max(steps, default=0)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / str(self.cfg.checkpoint.get("save_dir", "checkpoints"))


class DoctorError(Exception):
    """RUN_DIR is not a run directory (no config.yaml) or its config cannot be read."""


def read_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DoctorError(f"{run_dir}: not a run directory (no config.yaml; `python -m repro` writes one)")
    try:
        cfg = OmegaConf.load(config_path)
    except Exception as error:
        raise DoctorError(f"{config_path}: unreadable config: {error}") from None
    return RunRecord(run_dir, cfg, list(iter_metric_records(run_dir / METRICS_FILE)))


def _get(cfg: DictConfig, dotted: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, dotted, default=default)
    return default if value is None else value


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# =================================================================================================
# Learning-rate schedule
# =================================================================================================


def lr_schedule(cfg: DictConfig) -> tuple[Callable[[int], float], float, int] | None:
    """(lr(update), peak lr, max_update) of the run's scheduler, or None when it cannot be built."""
    from repro.train.optim import make_lr_function

    peak = float(_get(cfg, "optimization.lr", [0.0])[0])
    max_update = int(_get(cfg, "optimization.max_update", 0))
    if max_update <= 0 or peak <= 0:
        return None
    try:
        return make_lr_function(cfg.lr_scheduler, peak, max_update), peak, max_update
    except (ValueError, AttributeError):
        return None


def schedule_peak(lr: Callable[[int], float], max_update: int) -> tuple[float, int]:
    """(highest lr the schedule reaches by max_update, first update reaching it) on a fine grid."""
    points = sorted({0, max_update, *range(0, max_update + 1, max(1, max_update // 2000))})
    best_update = max(points, key=lambda n: (lr(n), -n))
    return lr(best_update), best_update


def warmup_end(cfg: DictConfig) -> int:
    """Update at which the schedule first reaches its peak (0 without a schedule)."""
    schedule = lr_schedule(cfg)
    if schedule is None:
        return int(_get(cfg, "lr_scheduler.warmup_updates", 0))
    lr, _, max_update = schedule
    return schedule_peak(lr, max_update)[1]


def check_warmup(run: RunRecord) -> list[Finding]:
    schedule = lr_schedule(run.cfg)
    if schedule is None:
        return []
    lr, peak, max_update = schedule
    reached, _ = schedule_peak(lr, max_update)
    if reached >= 0.999 * peak:
        return []
    name = _get(run.cfg, "lr_scheduler._name", "?")
    evidence = [f"lr_scheduler={name}, optimization.max_update={max_update}, optimization.lr={peak:g}: the "
                f"schedule peaks at {reached:.3g} ({100 * reached / peak:.1f}% of lr) at update {max_update}"]
    if name in ("polynomial_decay", "cosine", "fixed"):
        evidence.append(f"lr_scheduler.warmup_updates={_get(run.cfg, 'lr_scheduler.warmup_updates')} >= "
                        f"max_update={max_update}")
    logged = [r["lr"] for r in run.split("train") if _finite(r.get("lr"))]
    if logged:
        evidence.append(f"highest logged lr: {max(logged):.3g} over {len(logged)} logged updates")
    return [Finding(
        "lr_never_left_warmup", "the learning rate never left warmup: max_update and the schedule disagree",
        evidence,
        "make the warmup a fraction of the run: lr_scheduler.warmup_updates well below optimization.max_update "
        "(the papers warm up over 8-10% of the updates), or tri_stage phase_ratio such as [0.1, 0.4, 0.5]",
    )]


# =================================================================================================
# Fine-tuning stuck at WER ~100%
# =================================================================================================


def blank_statistics(run: RunRecord) -> tuple[float, float, int] | None:
    """(fraction of frames whose argmax is blank, mean blank posterior, utterances) of checkpoint_last on
    the first validation utterances; None when the checkpoint or the data is missing."""
    from repro.checkpoints.fairseq import load
    from repro.checkpoints.format import CheckpointError
    from repro.data.dataset import FileAudioDataset

    checkpoint = run.checkpoint_dir / "checkpoint_last.pt"
    data = _get(run.cfg, "task.data")
    split = str(_get(run.cfg, "dataset.valid_subset", "valid")).split(",")[0].strip()
    manifest = Path(str(data)) / f"{split}.tsv" if data else None
    if not checkpoint.is_file() or manifest is None or not manifest.is_file():
        return None
    try:
        loaded = load(checkpoint)
        normalize = bool(loaded.model_cfg.normalize if loaded.model_cfg.normalize is not None
                         else _get(run.cfg, "task.normalize", False))
        dataset = FileAudioDataset(manifest, sample_rate=int(_get(run.cfg, "task.sample_rate", 16_000)),
                                   normalize=normalize)
    except (CheckpointError, OSError, ValueError):
        return None
    blank_frames = frames = 0
    posterior = 0.0
    count = min(BLANK_SAMPLE_UTTERANCES, len(dataset))
    with torch.no_grad():
        for index in range(count):
            batch = dataset.collater([dataset[index]])
            logits, _ = loaded.model(batch["net_input"]["source"], None)  # (1, T, V)
            probs = logits.float().softmax(-1)[0]
            blank_frames += int((probs.argmax(-1) == 0).sum())
            posterior += float(probs[:, 0].sum())
            frames += probs.shape[0]
    if frames == 0:
        return None
    return blank_frames / frames, posterior / frames, count


def check_stuck_wer(run: RunRecord) -> list[Finding]:
    valid = [r for r in run.records if _finite(r.get("wer")) and r.get("split") not in ("train",)]
    if not valid or float(valid[-1]["wer"]) < STUCK_WER:
        return []
    last = valid[-1]
    updates = max(run.last_update, int(last["step"]))
    evidence = [f"validation WER {float(last['wer']):.1f}% on {last['split']} at update {int(last['step'])}"]
    fixes = []
    title = "fine-tuning is stuck at WER ~100%"
    blank = blank_statistics(run)
    if blank is not None:
        if blank[0] >= ALL_BLANK_FRAMES:
            title += ": the model emits only blanks"
        fraction, posterior, count = blank
        evidence.append(f"checkpoint_last on {count} validation utterances: argmax is the blank on "
                        f"{100 * fraction:.1f}% of frames, mean blank posterior {posterior:.3f}"
                        + (" (all blank: the model emits nothing)" if fraction >= ALL_BLANK_FRAMES else ""))
    freeze = int(_get(run.cfg, "model.freeze_finetune_updates", 0))
    if freeze > 0:
        evidence.append(f"model.freeze_finetune_updates={freeze}, update count {updates}: the encoder "
                        + ("never trained (only the CTC projection did)" if updates <= freeze
                           else f"trained for {updates - freeze} updates"))
        if updates <= freeze:
            fixes.append("lower model.freeze_finetune_updates below optimization.max_update (the papers freeze "
                         "for 10k of 20k+ updates) or train longer")
    schedule = lr_schedule(run.cfg)
    if schedule is not None:
        lr, peak, _ = schedule
        if lr(updates) < 0.999 * peak and lr(updates + 1) > lr(updates):
            evidence.append(f"the learning rate is still in warmup at update {updates}: lr {lr(updates):.3g} = "
                            f"{100 * lr(updates) / peak:.0f}% of the peak {peak:g}")
            fixes.append("train past the warmup (CTC fine-tuning emits only blanks for its first thousands of "
                         "updates)")
    if not fixes and blank is not None and blank[0] < ALL_BLANK_FRAMES:
        fixes.append("the model emits symbols, but not the right ones: check that the labels match the audio "
                     "and the dictionary (see the other findings), then train longer")
    elif not fixes:
        fixes.append("train longer or with a higher optimization.lr (CTC models emit only blanks until the "
                     "alignment is found); check that the labels match the audio (see the other findings)")
    return [Finding("wer_stuck", title, evidence, "; ".join(fixes))]


# =================================================================================================
# Pretraining: accuracy at chance, codebook collapse, extra losses
# =================================================================================================


def _after_warmup(run: RunRecord, key: str) -> list[dict[str, Any]]:
    start = warmup_end(run.cfg)
    return [r for r in run.split("train") if _finite(r.get(key)) and int(r["step"]) > start]


def check_accuracy_at_chance(run: RunRecord) -> list[Finding]:
    if _get(run.cfg, "criterion._name", "wav2vec") != "wav2vec":
        return []  # chance below is the contrastive task's; a masked LM's accuracy has no such chance level
    records = _after_warmup(run, "accuracy")
    if len(records) < MIN_RECORDS_AFTER_WARMUP:
        return []
    negatives = int(_get(run.cfg, "model.num_negatives", 100)) + int(_get(run.cfg, "model.cross_sample_negatives", 0))
    chance = 1.0 / (1 + negatives)
    best = max(float(r["accuracy"]) for r in records)
    if best >= CHANCE_FACTOR * chance:
        return []
    return [Finding(
        "accuracy_at_chance", "pretraining accuracy stays at chance",
        [f"chance is 1/(1 + {negatives} negatives) = {chance:.4f}; the best accuracy over {len(records)} logged "
         f"updates after warmup (updates {int(records[0]['step'])}-{int(records[-1]['step'])}) is {best:.4f}"],
        "the model finds no signal: check the audio (task.normalize as the model expects, sample rate, silence), "
        "lower optimization.lr, or raise dataset.max_tokens / update_freq to the paper's batch",
    )]


def check_codebook_collapse(run: RunRecord) -> list[Finding]:
    records = _after_warmup(run, "code_perplexity")
    if len(records) < MIN_RECORDS_AFTER_WARMUP or not _get(run.cfg, "model.quantize_targets", False):
        return []
    codes = int(_get(run.cfg, "model.latent_groups", 2)) * int(_get(run.cfg, "model.latent_vars", 320))
    last = float(records[-1]["code_perplexity"])
    if last >= COLLAPSE_FRACTION * codes:
        return []
    weights = _get(run.cfg, "criterion.loss_weights")
    return [Finding(
        "codebook_collapse", "the quantizer's codebook collapsed",
        [f"code_perplexity {last:.1f} at update {int(records[-1]['step'])}, far below G x V = {codes} "
         f"(< {COLLAPSE_FRACTION:.0%})", f"criterion.loss_weights={list(weights) if weights else None}"],
        "raise the diversity weight (criterion.loss_weights[0]; the papers use 0.1), keep model.latent_temp "
        "at [2, 0.5, 0.999995], or lower optimization.lr",
    )]


def check_extra_losses(run: RunRecord) -> list[Finding]:
    records = [r for r in run.split("train") if _finite(r.get("loss_0"))][-MIN_RECORDS_AFTER_WARMUP:]
    if not records:
        return []
    findings = []
    contrastive = sum(float(r["loss_0"]) for r in records) / len(records)
    for key, name, index in (("loss_1", "diversity", 0), ("loss_2", "feature penalty", 1)):
        values = [float(r[key]) for r in records if _finite(r.get(key))]
        if not values:
            continue
        extra = sum(values) / len(values)
        if extra > contrastive:
            weights = _get(run.cfg, "criterion.loss_weights")
            findings.append(Finding(
                "extra_loss_dominates", f"the {name} term dominates the loss",
                [f"mean over the last {len(records)} logged updates: weighted {name} ({key}) {extra:.3g} bits vs "
                 f"contrastive (loss_0) {contrastive:.3g} bits", f"criterion.loss_weights={list(weights) if weights else None}"],
                f"lower criterion.loss_weights[{index}] (the papers: [0.1, 10] for BASE, the feature penalty "
                "applies to unnormalised conv features)",
            ))
    return findings


# =================================================================================================
# Divergence
# =================================================================================================


def check_divergence(run: RunRecord) -> list[Finding]:
    findings = []
    bad = [r for r in run.records if any(isinstance(r.get(k), float) and not math.isfinite(r[k])
                                         for k in ("loss", "nll_loss", "gnorm"))]
    if bad:
        first = bad[0]
        finite_before = [r for r in run.split("train") if int(r["step"]) < int(first["step"]) and _finite(r.get("loss"))]
        evidence = [f"non-finite loss/gnorm first logged at update {int(first['step'])} ({first['split']}), "
                    f"{len(bad)} such records"]
        if finite_before:
            evidence.append(f"last finite train loss {float(finite_before[-1]['loss']):.3g} at update "
                            f"{int(finite_before[-1]['step'])}")
        findings.append(Finding("diverged", "training diverged (NaN / inf)", evidence,
                                "resume from the last finite checkpoint with a lower optimization.lr or "
                                "optimization.clip_norm (e.g. 25); with fp16 try common.bf16=true"))
    scales = [(int(r["step"]), float(r["loss_scale"])) for r in run.split("train") if _finite(r.get("loss_scale"))]
    decreases = sum(1 for (_, a), (_, b) in zip(scales, scales[1:]) if b < a)
    min_scale = float(_get(run.cfg, "common.min_loss_scale", 1e-4))
    if scales and (decreases >= OVERFLOW_HALVINGS or scales[-1][1] <= min_scale):
        findings.append(Finding(
            "fp16_overflows", "repeated fp16 gradient overflows",
            [f"the loss scale fell {decreases} times, from {scales[0][1]:g} (update {scales[0][0]}) to "
             f"{min(s for _, s in scales):g}; common.min_loss_scale={min_scale:g}"],
            "lower optimization.lr, set optimization.clip_norm, or train in bf16 (common.bf16=true)",
        ))
    return findings


# =================================================================================================
# Data: labels, dictionary, lexicon, LM
# =================================================================================================


def _data_dir(run: RunRecord) -> Path | None:
    data = _get(run.cfg, "task.data")
    return Path(str(data)) if data else None


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def check_labels(run: RunRecord) -> list[Finding]:
    data, labels = _data_dir(run), _get(run.cfg, "task.labels")
    if data is None or not labels:
        return []
    splits = [str(_get(run.cfg, "dataset.train_subset", "train"))]
    splits += [s.strip() for s in str(_get(run.cfg, "dataset.valid_subset", "")).split(",") if s.strip()]
    findings = []
    for split in splits:
        manifest, label_file = data / f"{split}.tsv", data / f"{split}.{labels}"
        if not manifest.is_file():
            continue
        rows = _count_lines(manifest) - 1  # the first line is the audio root
        if not label_file.is_file():
            findings.append(Finding("labels_out_of_step", f"{label_file.name} is missing",
                                    [f"{manifest} has {rows} rows, {label_file} does not exist"],
                                    f"python -m repro.tools labels {manifest} --output-dir {data} --output-name {split}"))
            continue
        lines = _count_lines(label_file)
        if lines != rows:
            findings.append(Finding(
                "labels_out_of_step", f"{label_file.name} is out of step with {manifest.name}",
                [f"{manifest}: {rows} utterances; {label_file}: {lines} label lines (line i labels row i, so every "
                 f"utterance after the first missing line gets another's transcript)"],
                f"regenerate the labels from the manifest: python -m repro.tools labels {manifest} "
                f"--output-dir {data} --output-name {split}",
            ))
    return findings


def _dictionary_symbols(run: RunRecord) -> tuple[Path, list[str]] | None:
    data, labels = _data_dir(run), _get(run.cfg, "task.labels") or "ltr"
    if data is None:
        return None
    path = data / f"dict.{labels}.txt"
    if not path.is_file():
        return None
    symbols = [line.rsplit(" ", 1)[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return path, symbols


def _decoding_files(run: RunRecord) -> list[tuple[str, str | None, str | None]]:
    """(setup name, lexicon, lm_model) of `decode` and every `decodings.<name>`."""
    setups = [("decode", _get(run.cfg, "decode.lexicon"), _get(run.cfg, "decode.lm_model"))]
    decodings = run.cfg.get("decodings")
    named = OmegaConf.to_container(decodings, resolve=True) if isinstance(decodings, DictConfig) else {}
    for name, node in named.items():  # type: ignore[union-attr]
        if isinstance(node, dict):
            setups.append((f"decodings.{name}", node.get("lexicon") or setups[0][1],
                           node.get("lm_model") or setups[0][2]))
    return setups


def _lexicon_entries(path: Path, limit: int = 20_000) -> list[tuple[str, list[str]]]:
    entries = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if parts:
                entries.append((parts[0], parts[1:]))
            if len(entries) >= limit:
                break
    return entries


def arpa_unigrams(path: Path) -> set[str] | None:
    """Words of an ARPA file's 1-gram section (None for a binary or unreadable LM)."""
    words: set[str] = set()
    try:
        with path.open(encoding="utf-8") as handle:
            in_unigrams = False
            for line in handle:
                if line.startswith("\\1-grams:"):
                    in_unigrams = True
                    continue
                if in_unigrams:
                    if line.startswith("\\"):
                        break
                    parts = line.split("\t")
                    if len(parts) >= 2:
                        words.add(parts[1].strip())
    except (OSError, UnicodeDecodeError):
        return None
    return words or None


def _case(words: list[str]) -> str:
    letters = [w for w in words if any(ch.isalpha() for ch in w)]
    upper = sum(1 for w in letters if w == w.upper())
    lower = sum(1 for w in letters if w == w.lower())
    return "upper" if upper > 0.9 * len(letters) else "lower" if lower > 0.9 * len(letters) else "mixed"


def check_dictionary(run: RunRecord) -> list[Finding]:
    findings = []
    found = _dictionary_symbols(run)
    if found is not None:
        path, symbols = found
        if "|" not in symbols and _get(run.cfg, "common_eval.post_process", "letter") == "letter":
            findings.append(Finding(
                "dictionary_mismatch", f"{path.name} has no word delimiter '|'",
                [f"{path}: {len(symbols)} symbols ({' '.join(symbols[:12])}...), no '|'; letter labels separate "
                 "words with '|', so the decoders cannot find word boundaries"],
                "rebuild it from the .ltr labels: python -m repro.tools dictionary <data>/train.ltr --dest " + str(path),
            ))
    for setup, lexicon, lm in _decoding_files(run):
        if not lexicon or not Path(lexicon).is_file():
            continue
        entries = _lexicon_entries(Path(lexicon))
        if found is not None:
            symbols = set(found[1])
            unknown = sorted({s for _, spelling in entries for s in spelling} - symbols)
            if unknown:
                findings.append(Finding(
                    "dictionary_mismatch", f"{setup}: the lexicon spells words with symbols the dictionary lacks",
                    [f"{lexicon}: symbols {' '.join(unknown[:12])} are not in {found[0]} (dictionary case "
                     f"{_case(sorted(symbols))}, lexicon spellings {_case(unknown)})"],
                    "write the lexicon in the dictionary's alphabet and case (fairseq's LibriSpeech files are "
                    "upper case: 'HELLO\\tH E L L O |')",
                ))
        vocabulary = arpa_unigrams(Path(lm)) if lm and Path(lm).is_file() else None
        if vocabulary is not None and entries:
            words = [word for word, _ in entries]
            missing = [w for w in words if w not in vocabulary]
            if len(missing) > 0.5 * len(words):
                lm_case, lexicon_case = _case(sorted(vocabulary)[:5000]), _case(words)
                findings.append(Finding(
                    "dictionary_mismatch", f"{setup}: the LM does not know the lexicon's words",
                    [f"{len(missing)} of {len(words)} lexicon words are not in {lm}'s vocabulary (e.g. "
                     f"{', '.join(missing[:5])}); LM words are {lm_case} case, lexicon words {lexicon_case} case"],
                    "build the LM and the lexicon from the same text in the same case (the decoder scores "
                    "lexicon words with the LM: unknown words get unk_weight)",
                ))
    return findings


# =================================================================================================
# Resumed with a changed config
# =================================================================================================


def check_config_changed(run: RunRecord) -> list[Finding]:
    if not run.checkpoint_dir.is_dir():
        return []
    from repro.train.resume import config_changes

    current = OmegaConf.to_container(run.cfg, resolve=True)
    saved_configs = []
    for path in run.checkpoint_dir.glob("checkpoint*.pt"):
        try:  # our own files: weights-only, memory-mapped (the tensors are not read)
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            continue
        train_state = saved.get("train_state") if isinstance(saved, dict) else None
        if isinstance(train_state, dict) and isinstance(train_state.get("config"), dict):
            saved_configs.append((int(train_state.get("num_updates") or 0), path.name, train_state["config"]))
    for updates, name, config in sorted(saved_configs):  # the oldest differing checkpoint tells the story
        changes = config_changes(config, current)  # what repro.train.resume compares when resuming
        if changes:
            return [Finding(
                "config_changed_on_resume", f"the run was resumed with a different config than {name} was "
                "trained with", [f"{name} (update {updates}): {change.describe()}" for change in changes],
                "one run now mixes two configurations (the checkpoint.reset_* flags let it resume): compare "
                "its curve with care, or rerun the change in its own directory (hydra.run.dir=runs/<name>) "
                "starting from checkpoint=<the checkpoint>",
            )]
    return []


CHECKS: tuple[Callable[[RunRecord], list[Finding]], ...] = (
    check_labels, check_dictionary, check_warmup, check_stuck_wer, check_accuracy_at_chance,
    check_codebook_collapse, check_extra_losses, check_divergence, check_config_changed,
)


def diagnose(run_dir: str | Path) -> list[Finding]:
    """Every finding for `run_dir` (empty: nothing wrong found)."""
    run = read_run(run_dir)
    return [finding for check in CHECKS for finding in check(run)]


def findings_json(run_dir: str | Path, findings: list[Finding]) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "healthy": not findings, "findings": [asdict(f) for f in findings]}
