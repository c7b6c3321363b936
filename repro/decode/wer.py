"""Word and unit error rates as fairseq computes them, and the result files infer.py writes.

fairseq_spec.md §7.1 / §3.2: the word error rate is corpus level, the word edit distance summed
over utterances divided by the number of reference words (not a mean of per-utterance rates);
the unit error rate is the same over unit tokens, word boundaries `|` included. Counts come from
jiwer's alignments; `edit_distance` is the textbook definition the tests check them against.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer


def post_process(sentence: str, mode: str | None) -> str:
    """fairseq's `post_process`: how a space-separated unit string becomes words."""
    if mode in (None, "none"):
        return sentence.strip()
    if mode == "letter":
        return sentence.replace(" ", "").replace("|", " ").strip()
    if mode in ("sentencepiece", "wordpiece"):
        return sentence.replace(" ", "").replace("\u2581", " ").strip()
    if mode == "_EOW":
        return sentence.replace(" ", "").replace("_EOW", " ").strip()
    raise ValueError(f"unknown post_process {mode!r}; choose letter, sentencepiece, wordpiece, _EOW or none")


def units_to_words(unit_string: str, mode: str | None = "letter") -> str:
    """'H I | T H E R E |' -> 'HI THERE' (letter mode), whitespace normalized."""
    return " ".join(post_process(unit_string, mode).split())


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (unit costs) between two token sequences."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_token in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_token in enumerate(hypothesis, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_token != hyp_token))
        previous = current
    return previous[-1]


@dataclass
class UtteranceResult:
    """Reference and hypothesis of one utterance, in units and words."""

    id: int
    """Row of the manifest (fairseq's sample id)."""
    ref_units: str
    """Reference units, space separated ('H I | T H E R E |')."""
    hyp_units: str
    """Hypothesis units, space separated."""
    ref_words: str
    """Reference words ('HI THERE')."""
    hyp_words: str
    """Hypothesis words."""
    audio: str = ""
    """Audio path relative to the manifest root (for the error table)."""
    score: float = 0.0
    """Decoder score of the hypothesis."""


@dataclass
class ErrorCounts:
    """Edit operations summed over a set of utterances, for one token level (words or units)."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """100 * errors / reference tokens (fairseq's corpus-level definition); 0 reference -> inf if errors."""
        if self.reference_length == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return 100.0 * self.errors / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


def align_counts(references: Sequence[str], hypotheses: Sequence[str]) -> list[ErrorCounts]:
    """Per-pair edit operations over whitespace tokens, from jiwer's alignments.

    jiwer refuses nothing here: empty references are counted directly (every hypothesis token
    is an insertion), the rest go through one `jiwer.process_words` call.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    counts = [ErrorCounts() for _ in references]
    scored = [i for i, ref in enumerate(references) if ref.split()]
    for i, ref in enumerate(references):
        if not ref.split():
            counts[i] = ErrorCounts(insertions=len(hypotheses[i].split()))
    if scored:
        output = jiwer.process_words([references[i] for i in scored], [hypotheses[i] for i in scored])
        for i, chunks in zip(scored, output.alignments):
            count = counts[i]
            count.reference_length = len(references[i].split())
            for chunk in chunks:
                ref_span = chunk.ref_end_idx - chunk.ref_start_idx
                hyp_span = chunk.hyp_end_idx - chunk.hyp_start_idx
                if chunk.type == "substitute":
                    count.substitutions += ref_span
                elif chunk.type == "delete":
                    count.deletions += ref_span
                elif chunk.type == "insert":
                    count.insertions += hyp_span
    return counts


@dataclass
class CorpusScore:
    """Corpus-level word and unit error counts plus the per-utterance breakdown."""

    words: ErrorCounts
    units: ErrorCounts
    per_utterance_words: list[ErrorCounts]
    per_utterance_units: list[ErrorCounts]

    @property
    def wer(self) -> float:
        return self.words.rate

    @property
    def uer(self) -> float:
        return self.units.rate


def _total(counts: Iterable[ErrorCounts]) -> ErrorCounts:
    total = ErrorCounts()
    for count in counts:
        total = total + count
    return total


def score_results(results: Sequence[UtteranceResult]) -> CorpusScore:
    """WER over words and UER over units (letters incl. '|'), summed over utterances."""
    word_counts = align_counts([r.ref_words for r in results], [r.hyp_words for r in results])
    unit_counts = align_counts([r.ref_units for r in results], [r.hyp_units for r in results])
    return CorpusScore(_total(word_counts), _total(unit_counts), word_counts, unit_counts)


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """100 * sum of word edit distances / sum of reference words."""
    return _total(align_counts(references, hypotheses)).rate


# ----------------------------------------------------------------------------------------------
# Result files (fairseq infer.py --results-path)


def result_file_name(prefix: str, checkpoint_path: str | Path, subset: str) -> str:
    """`<prefix>-<basename of --path>-<subset>.txt`, as infer.py names them (basename keeps '.pt')."""
    return f"{prefix}-{Path(checkpoint_path).name}-{subset}.txt"


def utterance_key(sample_id: int) -> str:
    """sclite utterance label `(speaker-id)`; infer.py has no speaker and writes `None`."""
    return f"(None-{sample_id})"


def write_results(
    results_dir: str | Path,
    checkpoint_path: str | Path,
    subset: str,
    results: Sequence[UtteranceResult],
    score: CorpusScore | None = None,
) -> dict[str, Path]:
    """Write hypo/ref .units/.word files in sclite trn form (`text (None-id)`) and an error table.

    Rows are written in sample-id order. Returns the written paths by kind.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    score = score if score is not None else score_results(results)
    ordered = sorted(range(len(results)), key=lambda i: results[i].id)
    columns = {
        "hypo.units": lambda r: r.hyp_units,
        "hypo.word": lambda r: r.hyp_words,
        "ref.units": lambda r: r.ref_units,
        "ref.word": lambda r: r.ref_words,
    }
    paths: dict[str, Path] = {}
    for prefix, text_of in columns.items():
        path = results_dir / result_file_name(prefix, checkpoint_path, subset)
        with path.open("w", encoding="utf-8") as handle:
            for i in ordered:
                handle.write(f"{text_of(results[i])} {utterance_key(results[i].id)}\n")
        paths[prefix] = path
    table = results_dir / f"errors-{Path(checkpoint_path).name}-{subset}.tsv"
    with table.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(
            ["id", "audio", "ref_words", "word_errors", "substitutions", "deletions", "insertions",
             "wer", "ref_units", "unit_errors", "uer", "reference", "hypothesis"]
        )
        for i in ordered:
            result, words, units = results[i], score.per_utterance_words[i], score.per_utterance_units[i]
            writer.writerow(
                [result.id, result.audio, words.reference_length, words.errors, words.substitutions,
                 words.deletions, words.insertions, f"{words.rate:.2f}", units.reference_length,
                 units.errors, f"{units.rate:.2f}", result.ref_words, result.hyp_words]
            )
    paths["errors"] = table
    return paths
