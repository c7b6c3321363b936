"""Headless matplotlib plots for the report, returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

from repro.report.collect import RunRecord  # noqa: E402
from repro.report.tables import Table  # noqa: E402

LABELED_HOURS = {"10m": 1 / 6, "1h": 1.0, "10h": 10.0, "100h": 100.0, "960h": 960.0}
PRETRAIN_CURVES = ("loss", "prob_perplexity", "code_perplexity", "temp")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def wer_vs_labeled_data(tables: list[Table], split: str = "test_other") -> bytes | None:
    """WER against hours of labeled data (log axis), one line per (table, model, LM), ours solid and
    the paper's dashed."""
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
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (model, lm), points in sorted(series.items()):
        for source, style in (("ours", "-o"), ("paper", "--x")):
            if points[source]:
                xs, ys = zip(*sorted(points[source]))
                axis.plot(xs, ys, style, label=f"{model}, LM {lm} ({source})")
    axis.set_xscale("log")
    axis.set_xlabel("labeled data (hours, log scale)")
    axis.set_ylabel(f"WER on {split.replace('_', '-')} (%)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    return _png(figure)


def curves(records: list[RunRecord], split: str, names: tuple[str, ...], title: str) -> bytes | None:
    """One panel per metric; one line per run that logged it."""
    present = [n for n in names if any(f"{split}/{n}" in r.curves for r in records)]
    if not present:
        return None
    figure, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for axis, name in zip(axes[0], present):
        for record in records:
            points = record.curves.get(f"{split}/{name}")
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, label=record.name)
        axis.set_title(name)
        axis.set_xlabel("update")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title)
    return _png(figure)


def all_plots(tables: list[Table], records: list[RunRecord]) -> dict[str, bytes]:
    """Every plot that has data, by file stem."""
    pretraining = [r for r in records if any(k == "train/prob_perplexity" for k in r.curves)]
    finetuning = [r for r in records if r not in pretraining]
    candidates = {
        "wer_vs_labeled_data": wer_vs_labeled_data(tables),
        "pretraining_curves": curves(pretraining, "train", PRETRAIN_CURVES, "Pretraining"),
        "finetuning_loss": curves(finetuning, "train", ("loss",), "Fine-tuning loss"),
        "finetuning_dev_wer": curves(finetuning, "valid", ("wer",), "Fine-tuning dev WER"),
    }
    return {name: png for name, png in candidates.items() if png is not None}
