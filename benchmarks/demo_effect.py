"""`python -m benchmarks.demo_effect [--seeds 0,1,2] [--runs runs/demo_effect] [overrides ...]`

Runs `make demo` once per seed (the same corpus; the seed changes initial weights, masks, negatives and
batch order) and prints the demo's effect per seed and on average: pretraining accuracy against chance,
code perplexity, dev-other WER with the 4-gram from the pretrained encoder and from scratch on every
labeled split, the relative gain, the 10 h model on dev-clean and the goal checks of issue 20.

Not part of `python -m benchmarks` nor of `make test`: it trains 3 x 7 runs (about 3 x the demo's
wall time). Finished seeds are reused, so an interrupted run continues where it stopped.
Extra arguments are Hydra overrides passed to every demo (e.g. `demo.pretrain_updates=400`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from repro.report.collect import collect_run_dirs
from repro.report.effect import LABELED_SPLITS, Effect, effect_summary

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, runs: Path, overrides: list[str]) -> float:
    """One demo run for `seed` (a subprocess, as a user runs it); returns its wall seconds."""
    started = time.time()
    command = [sys.executable, "-m", "repro", "experiment=demo", f"common.seed={seed}",
               f"hydra.run.dir={runs / f'seed{seed}'}", f"demo.report_dir={runs / f'seed{seed}' / 'report'}",
               *overrides]
    print(f"== seed {seed}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return time.time() - started


def effect_table(effects: dict[int, Effect]) -> str:
    """Per seed and mean: accuracy, code perplexity, dev-other 4-gram WER pretrained / scratch, gains."""
    header = f"{'seed':>5s} {'acc':>6s} {'chance':>7s} {'codes':>6s}"
    for split in LABELED_SPLITS:
        header += f" {split + ' pre/scr':>14s} {'gain':>6s}"
    header += f" {'10h dev-clean':>14s}"
    lines = [header]

    def row(label: str, values: dict[str, float | None]) -> str:
        def fmt(key: str, spec: str, width: int) -> str:
            value = values.get(key)
            return f"{'-':>{width}s}" if value is None else f"{value:{width}{spec}}"

        text = f"{label:>5s} {fmt('acc', '.3f', 6)} {fmt('chance', '.3f', 7)} {fmt('codes', '.1f', 6)}"
        for split in LABELED_SPLITS:
            pre, scr = values.get(f"{split}/pre"), values.get(f"{split}/scr")
            pair = "-" if pre is None or scr is None else f"{pre:.1f}/{scr:.1f}"
            gain = values.get(f"{split}/gain")
            text += f" {pair:>14s} {'-' if gain is None else f'{gain:+.0%}':>6s}"
        return text + f" {fmt('10h_clean', '.1f', 14)}"

    per_seed = {}
    for seed, effect in sorted(effects.items()):
        values: dict[str, float | None] = {"acc": effect.pretrain_accuracy, "chance": effect.chance_accuracy,
                                           "codes": effect.code_perplexity,
                                           "10h_clean": effect.value("10h", "pretrained", "kenlm_4gram", "dev_clean")}
        for split in LABELED_SPLITS:
            values[f"{split}/pre"] = effect.value(split, "pretrained", "kenlm_4gram", "dev_other")
            values[f"{split}/scr"] = effect.value(split, "scratch", "kenlm_4gram", "dev_other")
            values[f"{split}/gain"] = effect.relative_gain(split)
        per_seed[seed] = values
        lines.append(row(str(seed), values))
    keys = {key for values in per_seed.values() for key in values}
    mean = {}
    for key in keys:
        present = [v[key] for v in per_seed.values() if v.get(key) is not None]
        mean[key] = statistics.fmean(present) if len(present) == len(per_seed) else None
    for split in LABELED_SPLITS:  # the gain of the mean WERs, as the goal states it
        pre, scr = mean.get(f"{split}/pre"), mean.get(f"{split}/scr")
        mean[f"{split}/gain"] = None if pre is None or not scr else (scr - pre) / scr
    lines.append(row("mean", mean))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_effect", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                        help="comma-separated seeds (default 0,1,2, the issue's; 1 is common.seed's default, fairseq's)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "demo_effect")
    parser.add_argument("--report-only", action="store_true", help="only tabulate the seeds already run")
    args, overrides = parser.parse_known_args(argv)
    runs = args.runs.resolve()
    walls = {}
    if not args.report_only:
        for seed in args.seeds:
            walls[seed] = run_seed(seed, runs, overrides)
    effects = {}
    for seed in args.seeds:
        records = [r for r in collect_run_dirs(runs / f"seed{seed}") if r.name.startswith("demo/")]
        if records:
            effects[seed] = effect_summary(records)
    if not effects:
        print(f"no demo runs under {runs}", file=sys.stderr)
        return 2
    print("\ndev-other WER (%) with the 4-gram, pretrained / from scratch; gain = relative WER reduction")
    print(effect_table(effects))
    for seed, effect in sorted(effects.items()):
        wall = f" ({walls[seed] / 60:.1f} min)" if seed in walls else ""
        print(f"\nseed {seed}{wall}:")
        print("\n".join(effect.lines()))
    every = [all(c.met for c in e.checks) for e in effects.values()]
    print(f"\nseeds meeting every goal: {sum(every)} of {len(every)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
