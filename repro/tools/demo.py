"""Stage `demo` (`make demo`): a miniature reproduction of wav2vec 2.0 on the synthetic corpus.

corpus -> manifests and labels -> pretraining -> CTC fine-tuning on the 10 min / 1 h / 10 h
analogues (from the pretrained encoder and, for comparison, from scratch) -> Viterbi and 4-gram
evaluation -> report. Every step is an ordinary run (its own run directory with config.yaml,
status.json, metrics.jsonl and tracker runs) composed from `experiment=demo_pretrain` /
`experiment=demo_finetune`, so an interrupted demo resumes: finished steps are skipped and the
unfinished one continues from its last checkpoint.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from repro.config import CONF_DIR
from repro.data.manifest import write_manifest
from repro.data.synth import make_corpus
from repro.decode.evaluate import run_evaluate
from repro.report.__main__ import write_report
from repro.report.collect import collect_run_dirs
from repro.tools.manifest import build_manifest
from repro.tools.prepare_librispeech import prepare
from repro.track import build_tracker
from repro.track.status import read_status, run_stages
from repro.train.stages import run_finetune, run_pretrain

EVAL_SPLITS = ["dev_clean", "dev_other", "test_clean", "test_other"]


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def compose_experiment(experiment: str, overrides: list[str]) -> DictConfig:
    """Compose `experiment=<name>` plus overrides, inside or outside a running Hydra app."""
    arguments = [f"experiment={experiment}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=arguments)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=arguments)


def run_step(name: str, run_dir: Path, cfg: DictConfig, stages: list[tuple[str, Callable]]) -> None:
    """Run one demo step as a tracked run in `run_dir`, unless it already finished."""
    if read_status(run_dir).get("status") == "finished":
        say(f"{name}: already finished ({run_dir})")
        return
    started = time.time()
    say(f"{name}: running in {run_dir}")
    run_stages(cfg, run_dir, name=name, stages=stages, gpus=0, tracker=build_tracker(cfg, run_dir))
    say(f"{name}: finished in {time.time() - started:.0f} s")


def prepare_data(corpus_dir: Path, hours: float, seed: int) -> Path:
    """The corpus plus fairseq-format manifests and labels for every split; returns the manifest dir."""
    say(f"synthetic corpus: {corpus_dir} ({hours} h, seed {seed})")
    make_corpus(corpus_dir, hours=hours, seed=seed)
    manifests = corpus_dir / "manifests"
    if not (manifests / "pretrain" / "train.tsv").exists():
        pool = build_manifest(corpus_dir / "pretrain", ext="flac", valid_percent=0.05, seed=42)
        (manifests / "pretrain").mkdir(parents=True, exist_ok=True)
        write_manifest(manifests / "pretrain" / "valid.tsv", pool.root, pool.valid)
        write_manifest(manifests / "pretrain" / "train.tsv", pool.root, pool.train)  # written last: marks done
    if not (manifests / "finetune" / "dict.ltr.txt").exists():
        prepare(corpus_dir, manifests / "finetune")
    return manifests


def run_demo(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    demo = cfg.demo
    started = time.time()
    corpus_dir = Path(demo.corpus_dir).resolve()
    manifests = prepare_data(corpus_dir, float(demo.corpus_hours), int(demo.corpus_seed))
    # sub-runs track where the demo itself is configured to (one MLflow store per runs root)
    tracker_override = [
        f"tracker.backends=[{','.join(cfg.tracker.backends)}]",
        f"tracker.mlflow.tracking_uri={cfg.tracker.mlflow.tracking_uri or 'null'}",
        f"tracker.wandb.mode={cfg.tracker.wandb.mode}",
    ]

    pretrain_dir = run_dir / "pretrain"
    pretrain_cfg = compose_experiment(
        "demo_pretrain",
        [
            f"task.data={manifests / 'pretrain'}",
            f"optimization.max_update={demo.pretrain_updates}",
            f"common.seed={cfg.common.seed}",
            *tracker_override,
        ],
    )
    run_step("demo/pretrain", pretrain_dir, pretrain_cfg, [("pretrain", run_pretrain)])
    pretrained = pretrain_dir / "checkpoints" / "checkpoint_last.pt"

    lm_dir = corpus_dir / "lm"
    variants = [("pretrained", False)] + ([("scratch", True)] if demo.from_scratch else [])
    for split in demo.splits:
        for variant, from_scratch in variants:
            overrides = [
                f"task.data={manifests / 'finetune'}",
                f"dataset.train_subset=train_{split}",
                f"optimization.max_update={demo.finetune_updates}",
                f"model.no_pretrained_weights={from_scratch}",
                f"model.w2v_path={'null' if from_scratch else pretrained}",
                f"decodings.kenlm_4gram.lm_model={lm_dir / '4-gram.bin'}",
                f"decodings.kenlm_4gram.lexicon={lm_dir / 'lexicon.txt'}",
                f"paper.labeled_data={split}",
                f"paper.pretrain_data={'synthetic' if not from_scratch else 'none'}",
                f"paper.decoding=[{','.join(demo.decodings)}]",
                f"common.seed={cfg.common.seed}",
                *tracker_override,
            ]
            finetune_cfg = compose_experiment("demo_finetune", overrides)
            run_step(
                f"demo/{variant}_{split}",
                run_dir / f"finetune_{split}_{variant}",
                finetune_cfg,
                [("finetune", run_finetune), ("evaluate", run_evaluate)],
            )

    report_dir = Path(demo.report_dir)
    records = [r for r in collect_run_dirs(run_dir) if r.name.startswith("demo/")]
    written = write_report(records, report_dir, title="repro demo: tiny wav2vec 2.0 on the synthetic corpus")
    summary = _summary(records, written, run_dir, time.time() - started)
    print(summary)
    (run_dir / "summary.txt").write_text(summary)
    return {"report": str(written["html"]), "runs": [r.name for r in records]}


def _summary(records, written: dict[str, Path], run_dir: Path, seconds: float) -> str:
    lines = ["", "=" * 72, f"repro demo finished in {seconds / 60:.1f} min", ""]
    lines.append(f"{'run':28s} {'split':6s} " + " ".join(f"{s:>10s}" for s in EVAL_SPLITS))
    for record in records:
        for decoding, results in sorted(record.results.items()):
            cells = " ".join(
                f"{results[s]['wer']:10.1f}" if s in results and "wer" in results[s] else f"{'-':>10s}" for s in EVAL_SPLITS
            )
            lines.append(f"{record.name:28s} {decoding[:6]:6s} {cells}")
    runs_root = run_dir.resolve().parent
    lines += [
        "",
        "WER (%) per split; 'pretrained' rows start from the demo's pretrained encoder, 'scratch' rows from random weights.",
        f"report:     {written['html'].resolve()}  (also {written['markdown'].name}, .tex, .csv beside it)",
        f"runs:       {run_dir.resolve()}",
        f"MLflow:     mlflow ui --backend-store-uri sqlite:///{runs_root / 'mlflow.db'}",
        f"W&B:        offline runs in {run_dir.resolve()}/*/wandb (upload: wandb sync <dir>/wandb/offline-run-*)",
        "=" * 72,
    ]
    return "\n".join(lines) + "\n"
