"""Headless matplotlib plots for the report, returned as PNG bytes.

Every figure is about 1000 px wide, has one title, labelled axes and a legend naming the runs.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

from repro.report.collect import RunRecord  # noqa: E402
from repro.report.tables import Table  # noqa: E402

LABELED_HOURS = {"10m": 1 / 6, "1h": 1.0, "10h": 10.0, "100h": 100.0, "960h": 960.0}
FIGURE_SIZE = (10, 4.8)  # inches at DPI: 1000 x 480 px before tight cropping
DPI = 100
_SPLIT_COLOURS = {"10m": "tab:red", "1h": "tab:orange", "10h": "tab:blue", "100h": "tab:green", "960h": "tab:purple"}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _figure(title: str, xlabel: str, ylabel: str):
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    return figure, axis


def wer_vs_labeled_data(tables: list[Table], split: str = "test_other") -> bytes | None:
    """WER against hours of labeled data (log axis), one line per (model, pretraining, LM), ours solid
    and the paper's dashed."""
    series: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    for table in tables:
        for row in table.rows:
            hours = LABELED_HOURS.get(row.labeled_data)
            if hours is None:
                continue
            key = (f"{row.model} {row.pretrain_data}".strip(), row.lm)
            entry = series.setdefault(key, {"ours": [], "paper": []})
            if row.ours.get(split) is not None:
                entry["ours"].append((hours, row.ours[split]))
            if row.paper.get(split) is not None:
                entry["paper"].append((hours, row.paper[split]))
    if not any(v["ours"] or v["paper"] for v in series.values()):
        return None
    pretty = split.replace("_", "-")
    figure, axis = _figure(f"Word error rate on {pretty} against labeled data", "labeled data (hours, log scale)",
                           f"WER on {pretty} (%)")
    for (model, lm), points in sorted(series.items()):
        for source, style in (("ours", "-o"), ("paper", "--x")):
            if points[source]:
                xs, ys = zip(*sorted(points[source]))
                axis.plot(xs, ys, style, label=f"{model}, LM {lm} ({source})")
    axis.set_xscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=9)
    return _png(figure)


def _plot_runs(axis, records: list[RunRecord], key: str) -> bool:
    drawn = False
    for record in records:
        points = record.curves.get(key)
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, "-o", markersize=3, label=record.name)
            drawn = True
    return drawn


def pretraining_accuracy(records: list[RunRecord], chance: float | None) -> bytes | None:
    """Validation contrastive accuracy against updates, with the chance level 1 / (1 + distractors)."""
    if not any("valid/accuracy" in r.curves for r in records):
        return None
    figure, axis = _figure("Pretraining: contrastive accuracy on held-out audio", "update",
                           "accuracy (true target ranked first)")
    _plot_runs(axis, records, "valid/accuracy")
    if chance:
        axis.axhline(chance, color="grey", linestyle="--", label=f"chance = {chance:.3f}")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=9)
    return _png(figure)


def code_usage(records: list[RunRecord], maximum: float | None) -> bytes | None:
    """Codebook perplexity (validation: hard codes; training: softmax) against updates, and its maximum."""
    keys = [("valid/code_perplexity", "validation, chosen codes"), ("train/prob_perplexity", "training, softmax")]
    if not any(key in r.curves for r in records for key, _ in keys):
        return None
    figure, axis = _figure("Pretraining: codebook usage", "update", "perplexity (codes in use, summed over groups)")
    for record in records:
        for key, what in keys:
            points = record.curves.get(key)
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, "-" if key.startswith("valid") else ":", label=f"{record.name} ({what})")
    if maximum:
        axis.axhline(maximum, color="grey", linestyle="--", label=f"all codes used equally = {maximum:.0f}")
        axis.set_ylim(0, maximum * 1.1)
    axis.legend(fontsize=9)
    return _png(figure)


def pretraining_loss(records: list[RunRecord]) -> bytes | None:
    if not _has(records, "train/loss"):
        return None
    figure, axis = _figure("Pretraining: loss", "update", "loss (bits per masked frame)")
    _plot_runs(axis, records, "train/loss")
    _plot_runs_styled(axis, records, "valid/loss", ":", " (validation)")
    axis.legend(fontsize=9)
    return _png(figure)


def _has(records: list[RunRecord], key: str) -> bool:
    return any(key in r.curves for r in records)


def _plot_runs_styled(axis, records: list[RunRecord], key: str, style: str, suffix: str) -> None:
    for record in records:
        points = record.curves.get(key)
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, style, label=record.name + suffix)


def finetuning_error(records: list[RunRecord]) -> bytes | None:
    """Validation unit (letter) error rate against updates: one colour per labeled split, solid from the
    pretrained encoder, dashed from scratch. Falls back to WER for runs that logged no UER."""
    metric = "uer" if any("valid/uer" in r.curves for r in records) else "wer"
    if not _has(records, f"valid/{metric}"):
        return None
    figure, axis = _figure(f"Fine-tuning: validation {metric.upper()}", "update",
                           f"{'letter' if metric == 'uer' else 'word'} error rate (%)")
    for record in records:
        points = record.curves.get(f"valid/{metric}")
        if not points:
            continue
        xs, ys = zip(*points)
        axis.plot(xs, ys, "-o" if record.pretrained else "--x", markersize=4,
                  color=_SPLIT_COLOURS.get(record.labeled_data), label=record.name)
    axis.legend(fontsize=9, ncol=2)
    return _png(figure)


def all_plots(tables: list[Table], records: list[RunRecord], chance: float | None = None,
              max_code_perplexity: float | None = None) -> dict[str, bytes]:
    """Every plot that has data, by file stem, in reading order."""
    pretraining = [r for r in records if "train/prob_perplexity" in r.curves or "valid/accuracy" in r.curves]
    finetuning = [r for r in records if r not in pretraining]
    only_synthetic = all(table.synthetic or not any(row.ours for row in table.rows) for table in tables)
    candidates = {
        "pretraining_accuracy": pretraining_accuracy(pretraining, chance),
        "code_usage": code_usage(pretraining, max_code_perplexity),
        "finetuning_error": finetuning_error(finetuning),
        # the demo's synthetic numbers are never drawn beside LibriSpeech's
        "wer_vs_labeled_data": (wer_vs_labeled_data([t for t in tables if t.synthetic], "dev_other") if only_synthetic
                                else wer_vs_labeled_data([t for t in tables if not t.synthetic])),
        "pretraining_loss": pretraining_loss(pretraining),
    }
    return {name: png for name, png in candidates.items() if png is not None}


PLOT_CAPTIONS = {
    "pretraining_accuracy": "Pretraining leaves chance when the accuracy rises above the dashed line.",
    "code_usage": "Codes in use: collapse shows as a perplexity far below the dashed maximum.",
    "finetuning_error": "Fine-tuning: solid lines start from the pretrained encoder, dashed from scratch.",
    "wer_vs_labeled_data": "More labels, fewer errors: WER against labeled hours.",
    "pretraining_loss": "Pretraining loss (contrastive + diversity + feature penalty).",
}
