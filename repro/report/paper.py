"""The papers' numbers (`paper_results.csv`, shipped with the package) and their stable row ids.

A row id names one line of a paper table so experiment configs and reports can join on it:
`<paper>-t<table>-<model>-<pretraining data>-<labeled data>-<lm>[-<metric unless WER>]`, each part lower-cased with
runs of other characters folded to one '-', e.g. `w2v2-t1-base-ls-960-10m-4-gram`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

SPLITS = ("dev_clean", "dev_other", "test_clean", "test_other")

# Short names of the sources in the `paper` column (the rest is kept, slugged).
PAPER_KEYS = {
    "wav2vec2.0": "w2v2",
    "self-training": "st",
    "vq-wav2vec": "vqw2v",
    "wav2vec": "w2v",
    "re-eval: torchaudio": "torchaudio",
    "re-eval: HF model card": "hf-card",
    "re-impl: HF (patrickvonplaten)": "hf-reimpl",
    "re-impl: NVIDIA DeepLearningExamples": "nvidia",
}


def slug(text: str) -> str:
    """Lower-case `text`, keep letters and digits, fold everything else into single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def paper_key(paper: str) -> str:
    """'wav2vec2.0 (2006.11477v3)' -> 'w2v2'."""
    name = paper.split(" (")[0] if not paper.startswith("re-") else paper
    return PAPER_KEYS.get(name, slug(name))


@dataclass(frozen=True)
class PaperRow:
    """One line of a paper's results table."""

    row_id: str
    paper: str
    table: str
    model: str
    pretrain_data: str
    labeled_data: str
    lm: str
    metric: str
    values: dict[str, float | None]
    """Per split (dev_clean, dev_other, test_clean, test_other); None where the paper has no number."""
    notes: str


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def make_row_id(record: dict[str, str]) -> str:
    parts = [
        paper_key(record["paper"]),
        "t" + slug(record["table"]),
        slug(record["model"]),
        slug(record["pretrain_data"]),
        slug(record["labeled_data"]),
        slug(record["lm"]),
    ]
    if record["metric"] != "WER":  # LER/PER rows share everything else with their WER row
        parts.append(slug(record["metric"]))
    return "-".join(p for p in parts if p)


@cache
def load_paper_rows() -> dict[str, PaperRow]:
    """All rows of paper_results.csv by row id (ids are unique; duplicates are an error)."""
    text = resources.files("repro.report").joinpath("paper_results.csv").read_text(encoding="utf-8")
    rows: dict[str, PaperRow] = {}
    for line_number, record in enumerate(csv.DictReader(text.splitlines()), start=2):
        row_id = make_row_id(record)
        if row_id in rows:
            raise ValueError(f"paper_results.csv line {line_number}: duplicate row id {row_id!r}")
        rows[row_id] = PaperRow(
            row_id=row_id,
            paper=record["paper"],
            table=record["table"],
            model=record["model"],
            pretrain_data=record["pretrain_data"],
            labeled_data=record["labeled_data"],
            lm=record["lm"],
            metric=record["metric"],
            values={split: _number(record[split]) for split in SPLITS},
            notes=record["notes"],
        )
    return rows
