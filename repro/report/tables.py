"""Join runs with the paper's numbers into tables laid out like wav2vec 2.0's Tables 1, 2 and 3 and
Xu et al.'s self-training tables.

Rows are model x pretraining data x labeled data x LM (no LM, 4-gram and Transformer for every row we
re-run: Tables 1/2 with their Appendix C twins 9/10); columns are the four LibriSpeech splits; each cell
carries ours, the paper's and the difference. A row that chose its run by §4.3's grid says which run
and how the seeds spread. Runs on the synthetic corpus go
to their own table and are never joined with LibriSpeech numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from repro.report.collect import DECODING_LM, RunRecord
from repro.report.paper import SPLITS, PaperRow, paper_key
from repro.report.selection import selection_summary

LABELED_ORDER = {"10m": 0, "1h": 1, "10h": 2, "100h": 3, "960h": 4}
LM_ORDER = {"None": 0, "4-gram": 1, "Transf.": 2}
# The synthetic corpus uses LibriSpeech's directory names (dev-clean); results use fairseq's (dev_clean).
SPLIT_TITLES = {"dev_clean": "dev-clean", "dev_other": "dev-other", "test_clean": "test-clean", "test_other": "test-other"}


@dataclass
class TableRow:
    """One line of a results table."""

    model: str
    pretrain_data: str
    labeled_data: str
    lm: str
    status: str
    """'finished', 'running', 'failed' or 'not run'."""
    ours: dict[str, float | None] = field(default_factory=dict)
    paper: dict[str, float | None] = field(default_factory=dict)
    run: str = ""
    row_id: str = ""

    def delta(self, split: str) -> float | None:
        ours, paper = self.ours.get(split), self.paper.get(split)
        return None if ours is None or paper is None else ours - paper

    @property
    def sort_key(self):
        return (
            self.model,
            self.pretrain_data,
            LABELED_ORDER.get(self.labeled_data, 99),
            LM_ORDER.get(self.lm, 99),
        )


@dataclass
class Table:
    title: str
    rows: list[TableRow]
    synthetic: bool = False


def _lm_to_decoding(lm: str) -> str | None:
    return {label: name for name, label in DECODING_LM.items()}.get(lm)


def _split_values(results: dict[str, dict[str, float]], metric: str = "wer",
                  aliases: dict[str, str] | None = None) -> dict[str, float | None]:
    """Our number per paper column; `aliases` names the split a column holds when it is not the column's own
    (TIMIT: the paper's csv keeps dev PER in dev_clean and test PER in test_clean)."""
    values: dict[str, float | None] = {}
    for split in SPLITS:
        name = (aliases or {}).get(split, split)
        cell = results.get(name) or results.get(SPLIT_TITLES.get(name, name))
        values[split] = None if cell is None or metric not in cell else float(cell[metric])
    return values


def _reproduced_w2v2(model: str) -> bool:
    return model.startswith(("BASE", "LARGE"))  # the baselines of other papers are context we do not re-run


@dataclass(frozen=True)
class PaperTable:
    """A report table: the paper tables it joins (a main table and its Appendix C twin) and which rows we re-run."""

    paper: str
    tables: tuple[str, ...]
    title: str
    reproduced: Callable[[str], bool]
    """Which of the tables' rows (by model name) our rows reproduce."""
    metric: str = "wer"
    aliases: tuple[tuple[str, str], ...] = ()


# Each wav2vec 2.0 row we re-run appears with every decoding the paper reports for it: no LM and 4-gram
# (Appendix C Tables 9 and 10) and the Transformer LM (Tables 1 and 2).
PAPER_TABLES = (
    PaperTable("w2v2", ("1", "9"), "Table 1 (+ Appendix C Table 9): low-resource labeled data", _reproduced_w2v2),
    PaperTable("w2v2", ("2", "10"), "Table 2 (+ Appendix C Table 10): 960 h labeled data", _reproduced_w2v2),
    PaperTable("w2v2", ("3",), "Table 3: TIMIT phoneme error rate (PER %; dev-clean column = TIMIT dev, "
               "test-clean column = TIMIT test)", _reproduced_w2v2, metric="per",
               aliases=(("dev_clean", "dev"), ("test_clean", "test"))),
    PaperTable("st", ("1",), "Xu et al. 2021 Table 1: self-training (ST, ctc ft)", lambda model: "ST (ctc ft)" in model),
    PaperTable("st", ("2 (cross-quoted)",), "Xu et al. 2021: self-training on 960 h labeled data",
               lambda model: "self-training" in model),
)
# Xu et al.'s rows are "with LM" (Table 1 caption): the 4-gram beam re-scored with the Transformer LM
# (§3.4); our closest decodings, best first.
UNSPECIFIED_LM_DECODINGS = ("transformer", "kenlm_4gram")


def _row_decoding(lm: str, record: RunRecord | None) -> tuple[str | None, str]:
    """(our decoding to show, the LM column) for a paper row's LM label."""
    decoding = _lm_to_decoding(lm)
    if decoding is not None or record is None:
        return decoding, lm
    for name in UNSPECIFIED_LM_DECODINGS:
        if name in record.results:
            return name, f"{lm}: ours {DECODING_LM.get(name, name)}"
    return None, lm


def run_status(record: RunRecord) -> str:
    """The run's status, the recipe when it is not the paper's, and the §4.3 selection it made (the winning lr
    and seed, the spread over seeds)."""
    status = record.status if record.recipe == "paper" else f"{record.status} [{record.recipe} recipe]"
    if not record.selection:
        return status
    return f"{status}; {selection_summary(record.selection)}"


def build_tables(records: list[RunRecord], paper_rows: dict[str, PaperRow]) -> list[Table]:
    """wav2vec 2.0's Tables 1 (low-resource), 2 (960 h) and 3 (TIMIT), each row we re-run with its no-LM,
    4-gram and Transformer-LM lines, and Xu et al.'s self-training rows, with our runs joined in; plus one
    table of synthetic-corpus runs."""
    runs_by_row: dict[str, RunRecord] = {}
    for record in records:
        if record.synthetic:
            continue
        for row_id in record.rows:
            runs_by_row[row_id] = record  # later (sorted) runs of the same row win

    tables: list[Table] = []
    for paper_table in PAPER_TABLES:
        rows: list[TableRow] = []
        for row_id, paper_row in paper_rows.items():
            if paper_key(paper_row.paper) != paper_table.paper or paper_row.table not in paper_table.tables:
                continue
            if not paper_table.reproduced(paper_row.model):
                continue
            record = runs_by_row.get(row_id)
            decoding, lm = _row_decoding(paper_row.lm, record)
            ours = (_split_values(record.results.get(decoding, {}), paper_table.metric, dict(paper_table.aliases))
                    if record and decoding else {})
            rows.append(
                TableRow(
                    model=paper_row.model,
                    pretrain_data=paper_row.pretrain_data,
                    labeled_data=paper_row.labeled_data,
                    lm=lm,
                    status=run_status(record) if record else "not run",
                    ours=ours,
                    paper=dict(paper_row.values),
                    run=record.name if record else "",
                    row_id=row_id,
                )
            )
        if rows:
            tables.append(Table(title=paper_table.title, rows=sorted(rows, key=lambda r: r.sort_key)))

    synthetic_rows: list[TableRow] = []
    for record in records:
        if not record.synthetic or (not record.results and "finetune" not in record.stage):
            continue  # pretraining runs have curves, not table rows
        decodings = record.results or {"viterbi": {}}
        for decoding, results in decodings.items():
            synthetic_rows.append(
                TableRow(
                    model=record.model,
                    pretrain_data=record.pretrain_data if record.pretrained else "none (from scratch)",
                    labeled_data=record.labeled_data,
                    lm=DECODING_LM.get(decoding, decoding),
                    status=record.status,
                    ours=_split_values(results),
                    paper={},
                    run=record.name,
                )
            )
    if synthetic_rows:
        tables.append(
            Table(
                title="Synthetic corpus (demo; not comparable with LibriSpeech numbers)",
                rows=sorted(synthetic_rows, key=lambda r: r.sort_key),
                synthetic=True,
            )
        )
    return tables


def format_cell(row: TableRow, split: str, synthetic: bool) -> str:
    """'ours / paper / delta', with '-' for what is missing."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    ours, paper = row.ours.get(split), row.paper.get(split)
    if synthetic:
        return number(ours)
    delta = row.delta(split)
    delta_text = "" if delta is None else f" / {delta:+.1f}"
    return f"{number(ours)} / {number(paper)}{delta_text}"


@dataclass
class ComputeRow:
    run: str
    status: str
    gpus: int
    wall_hours: float | None
    gpu_hours: float | None
    paper_gpu_hours: float | None


def compute_rows(records: list[RunRecord]) -> list[ComputeRow]:
    """GPU-hours used per run beside the original run's (GPUs x hours from the experiment's paper block)."""
    return [
        ComputeRow(
            run=r.name,
            status=r.status,
            gpus=r.gpus,
            wall_hours=None if r.wall_seconds is None else r.wall_seconds / 3600.0,
            gpu_hours=r.gpu_hours,
            paper_gpu_hours=r.paper_gpu_hours,
        )
        for r in records
    ]
