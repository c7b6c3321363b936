"""The demo's effect, computed from its runs: does pretraining help, as in wav2vec 2.0's Table 1?

From the demo's run records (`demo/pretrain`, `demo/<pretrained|scratch>_<split>`) this module builds
the Table-1-shaped grid (labeled split x pretrained / from scratch x no LM / 4-gram), the relative
word-error reduction that pretraining buys on dev-other with the 4-gram, and the goal checks of the
demo (issue 20), each a sentence with the numbers it was decided on. Nothing here is written by hand:
the verdict is whatever the numbers say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from repro.report.collect import RunRecord

LABELED_SPLITS = ("10m", "1h", "10h")
DECODINGS = ("viterbi", "kenlm_4gram")
EVAL_SPLITS = ("dev_clean", "dev_other", "test_clean", "test_other")
# Goals of the demo (issue 20)
MIN_RELATIVE_GAIN = 0.25  # pretrained vs scratch, dev-other, 4-gram, on 10m and 1h
MAX_10H_DEV_CLEAN_WER = 25.0
MIN_PRETRAIN_ACCURACY = 0.3
SELF_TRAINING_PREFIX = "self_training_"  # the demo's self-training run: demo/self_training_<labeled split>


@dataclass
class Check:
    """One goal: met or not, and the sentence that says why."""

    met: bool
    text: str


@dataclass
class Effect:
    """The demo's numbers arranged as the paper's Table 1, plus the goal checks."""

    wer: dict[tuple[str, str, str], dict[str, float]] = field(default_factory=dict)
    """(labeled split, 'pretrained'|'scratch', decoding) -> eval split -> WER (%)."""
    uer: dict[tuple[str, str, str], dict[str, float]] = field(default_factory=dict)
    """The same for the letter (unit) error rate: it moves before the WER does at this scale."""
    pretrain_accuracy: float | None = None
    """Final validation contrastive accuracy of the pretraining run."""
    chance_accuracy: float | None = None
    """1 / (1 + distractors)."""
    code_perplexity: float | None = None
    """Final validation code perplexity, and its maximum (groups x entries)."""
    max_code_perplexity: float | None = None
    checks: list[Check] = field(default_factory=list)
    self_training: dict[str, float | str] | None = None
    """The demo's self-training step (Xu et al.): labeled split, pseudo-label WER, its WER and its labeller's."""

    def value(self, labeled: str, variant: str, decoding: str, split: str) -> float | None:
        return self.wer.get((labeled, variant, decoding), {}).get(split)

    def relative_gain(self, labeled: str, split: str = "dev_other", decoding: str = "kenlm_4gram") -> float | None:
        """(scratch - pretrained) / scratch WER; positive when pretraining helps."""
        pretrained = self.value(labeled, "pretrained", decoding, split)
        scratch = self.value(labeled, "scratch", decoding, split)
        if pretrained is None or scratch is None or scratch <= 0:
            return None
        return (scratch - pretrained) / scratch

    @property
    def labeled_splits(self) -> list[str]:
        return [s for s in LABELED_SPLITS if any(key[0] == s for key in self.wer)]

    @property
    def verdict(self) -> str:
        """One line computed from the numbers."""
        gains = [(s, self.relative_gain(s)) for s in self.labeled_splits]
        gains = [(s, g) for s, g in gains if g is not None]
        if not gains and not self.checks:
            return "No fine-tuned runs to compare."
        met = sum(check.met for check in self.checks)
        parts = []
        if gains:
            helped = sum(g > 0 for _, g in gains)
            described = ", ".join(f"{g:+.0%} on {s}" for s, g in gains)
            if helped == len(gains):
                parts.append(f"Pretraining helps on every labeled split (dev-other WER with the 4-gram, relative to "
                             f"from scratch: {described})")
            elif helped:
                parts.append(f"Pretraining helps on {helped} of {len(gains)} labeled splits ({described})")
            else:
                parts.append(f"Pretraining does not help here ({described})")
        letters = [(s, self.uer.get((s, "pretrained", "viterbi"), {}).get("dev_other"),
                    self.uer.get((s, "scratch", "viterbi"), {}).get("dev_other")) for s in self.labeled_splits]
        letters = [(s, p, r) for s, p, r in letters if p is not None and r is not None]
        if letters:
            parts.append("dev-other letter error (Viterbi), pretrained vs scratch: "
                         + ", ".join(f"{p:.1f} vs {r:.1f} on {s}" for s, p, r in letters))
        if self.checks:
            parts.append(f"{met} of {len(self.checks)} demo goals met")
        return "; ".join(parts) + "."

    @property
    def self_training_sentence(self) -> str | None:
        """Whether self-training beat the model that labelled its data (computed, as the verdict is)."""
        st = self.self_training
        if not st or st.get("wer") is None or st.get("labeler_wer") is None:
            return None
        labeled, wer, labeler = st["labeled"], float(st["wer"]), float(st["labeler_wer"])
        outcome = "beat" if wer < labeler else "did not beat"
        pseudo = f" (pseudo-label WER {float(st['pseudo_label_wer']):.1f}%)" if st.get("pseudo_label_wer") is not None else ""
        return (f"Self-training on {labeled} + the unlabeled pool labelled by the {labeled} model{pseudo} {outcome} "
                f"its labeller on dev-other with the 4-gram: {wer:.1f} vs {labeler:.1f}.")

    def check_lines(self, bullet: str) -> list[str]:
        """Each goal check as `<bullet>[x] text` (met) or `<bullet>[ ] text`: the terminal's and Markdown's list."""
        return [f"{bullet}[{'x' if check.met else ' '}] {check.text}" for check in self.checks]

    def lines(self) -> list[str]:
        """The verdict and each check, for the demo's terminal summary."""
        lines = [f"Verdict: {self.verdict}", *self.check_lines("  ")]
        return lines + ([self.self_training_sentence] if self.self_training_sentence else [])


def _variant(record: RunRecord) -> tuple[str, str] | None:
    """('10m', 'pretrained') for `demo/pretrained_10m`."""
    leaf = record.name.rsplit("/", 1)[-1]
    variant, _, labeled = leaf.partition("_")
    if variant in ("pretrained", "scratch") and labeled:
        return labeled, variant
    return None


def _last(record: RunRecord, key: str) -> float | None:
    points = record.curves.get(key)
    return points[-1][1] if points else None


def _model_config(record: RunRecord) -> dict:
    path = Path(record.run_dir) / "config.yaml" if record.run_dir else None
    if path is None or not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("model") or {}


def effect_summary(records: list[RunRecord]) -> Effect:
    """The effect and the goal checks from the demo's run records (missing runs give fewer checks)."""
    effect = Effect()
    for record in records:
        if record.name.endswith("/pretrain") or "pretrain" == record.stage:
            effect.pretrain_accuracy = _last(record, "valid/accuracy")
            effect.code_perplexity = _last(record, "valid/code_perplexity")
            model = _model_config(record)
            if model.get("num_negatives"):
                effect.chance_accuracy = 1.0 / (1 + int(model["num_negatives"]) + int(model.get("cross_sample_negatives") or 0))
            if model.get("latent_vars"):
                effect.max_code_perplexity = float(int(model["latent_vars"]) * int(model.get("latent_groups") or 2))
            continue
        leaf = record.name.rsplit("/", 1)[-1]
        if leaf.startswith(SELF_TRAINING_PREFIX):
            effect.self_training = {
                "labeled": leaf[len(SELF_TRAINING_PREFIX):],
                "wer": record.results.get("kenlm_4gram", {}).get("dev_other", {}).get("wer"),
                "pseudo_label_wer": _last(record, "pseudo_label/wer")}
            continue
        key = _variant(record)
        if key is None:
            continue
        for decoding, results in record.results.items():
            effect.wer[(key[0], key[1], decoding)] = {s: v["wer"] for s, v in results.items() if "wer" in v}
            effect.uer[(key[0], key[1], decoding)] = {s: v["uer"] for s, v in results.items() if "uer" in v}
    if effect.self_training is not None:
        effect.self_training["labeler_wer"] = effect.value(str(effect.self_training["labeled"]), "pretrained",
                                                           "kenlm_4gram", "dev_other")
    effect.checks = _checks(effect)
    return effect


def _checks(effect: Effect) -> list[Check]:
    checks: list[Check] = []
    if effect.pretrain_accuracy is not None:
        chance = f" (chance {effect.chance_accuracy:.3f})" if effect.chance_accuracy else ""
        codes = (f", code perplexity {effect.code_perplexity:.1f} of {effect.max_code_perplexity:.0f}"
                 if effect.code_perplexity is not None and effect.max_code_perplexity else "")
        checks.append(Check(effect.pretrain_accuracy >= MIN_PRETRAIN_ACCURACY,
                            f"pretraining leaves chance: valid accuracy {effect.pretrain_accuracy:.3f}{chance} "
                            f">= {MIN_PRETRAIN_ACCURACY}{codes}"))
    for labeled in ("10m", "1h"):
        gain = effect.relative_gain(labeled)
        if gain is not None:
            checks.append(Check(gain >= MIN_RELATIVE_GAIN,
                                f"{labeled}: pretrained beats scratch on dev-other (4-gram) by {gain:.0%} relative "
                                f"(goal >= {MIN_RELATIVE_GAIN:.0%}): "
                                f"{effect.value(labeled, 'pretrained', 'kenlm_4gram', 'dev_other'):.1f} vs "
                                f"{effect.value(labeled, 'scratch', 'kenlm_4gram', 'dev_other'):.1f}"))
    best = effect.value("10h", "pretrained", "kenlm_4gram", "dev_clean")
    if best is not None:
        checks.append(Check(best <= MAX_10H_DEV_CLEAN_WER,
                            f"10h pretrained, dev-clean, 4-gram: {best:.1f}% WER (goal <= {MAX_10H_DEV_CLEAN_WER:.0f}%)"))
    pairs = [(key, split) for key in effect.wer if key[2] == "viterbi" for split in effect.wer[key]]
    compared = [(effect.wer[key][split], effect.value(key[0], key[1], "kenlm_4gram", split)) for key, split in pairs]
    compared = [(viterbi, lm) for viterbi, lm in compared if lm is not None]
    if compared:
        better = sum(lm < viterbi for viterbi, lm in compared)
        checks.append(Check(better == len(compared),
                            f"the 4-gram beats Viterbi in {better} of {len(compared)} (run, split) cells"))
    order = [(s, effect.value(s, "pretrained", "kenlm_4gram", "dev_other")) for s in LABELED_SPLITS]
    order = [(s, v) for s, v in order if v is not None]
    if len(order) >= 2:
        monotone = all(a[1] > b[1] for a, b in zip(order, order[1:]))
        checks.append(Check(monotone, "more labels help (pretrained, dev-other, 4-gram): "
                            + " > ".join(f"{s} {v:.1f}" for s, v in order)))
    return checks
