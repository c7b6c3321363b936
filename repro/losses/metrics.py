"""What every criterion's logged metrics share: fairseq logs losses in bits per sample_size unit,
accuracy as correct / count, and passes the batch counts through unchanged."""

from __future__ import annotations

import math

LN2 = math.log(2)
"""fairseq logs losses in bits: summed nats / sample_size / ln 2."""

PASSED_THROUGH = ("ntokens", "nsentences", "sample_size")
"""Summed batch counts fairseq logs as they are."""


def in_bits(summed_nats: float, denominator: float) -> float:
    """A summed loss in nats as bits per denominator unit (an empty denominator counts as 1, as fairseq)."""
    return summed_nats / (denominator or 1.0) / LN2


def with_counts(metrics: dict[str, float], totals: dict[str, float]) -> dict[str, float]:
    """`metrics` plus the accuracy (when `totals` counted predictions) and the passed-through batch counts."""
    if totals.get("count"):
        metrics["accuracy"] = totals["correct"] / totals["count"]
    for key in PASSED_THROUGH:
        if key in totals:
            metrics[key] = totals[key]
    return metrics
