"""Stage `demo` (`make demo`): a miniature reproduction of wav2vec 2.0 on the synthetic corpus.

corpus -> manifests and labels -> pretraining -> CTC fine-tuning on the 10 min / 1 h / 10 h
analogues (from the pretrained encoder and, for comparison, from scratch) -> Viterbi and 4-gram
evaluation -> report. Every step is an ordinary run (its own run directory with config.yaml,
status.json, metrics.jsonl and tracker runs) composed from `experiment=demo_pretrain` /
`experiment=demo_finetune`, so an interrupted demo resumes: finished steps are skipped and the
unfinished one continues from its last checkpoint.

Each step prints its wall time and the process's peak resident memory during that step
(`steps.json` in the demo's run directory keeps them). On a CUDA machine `demo.auto_size` swaps
in the larger `demo.cuda` size.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from repro.config import CONF_DIR, ConfigError
from repro.data.manifest import write_manifest
from repro.data.synth import make_corpus
from repro.report.__main__ import write_report
from repro.report.collect import collect_run_dirs
from repro.report.effect import effect_summary
from repro.stages import resolve_stage
from repro.tools.manifest import build_manifest
from repro.tools.prepare_librispeech import prepare
from repro.track import build_tracker
from repro.track.status import read_status, run_stages

EVAL_SPLITS = ["dev_clean", "dev_other", "test_clean", "test_other"]
STEPS_FILE = "steps.json"


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# --- memory ---------------------------------------------------------------------------------------


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 1 << 20


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: nothing to tune


def bound_heap() -> None:
    """Serve allocations of 1 MiB and more (activations, audio batches) with mmap, so that freeing them
    returns the memory to the system (`demo.low_memory`). glibc's default raises this threshold on every
    large free, after which freed activations stay in the heap for reuse: a pretraining step process peaks
    at ~2.4 GB instead of ~1.2 GB, but each update is ~40% faster (100 updates of the demo pretraining,
    two side by side: 57 s vs 80 s), since mmap'd tensors cost a page fault per 4 KiB on every allocation.
    Each step runs in its own process, so the default heap's memory is returned when the step ends."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Give freed heap pages back to the system between steps (garbage first, then glibc's trim)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (`VmRSS`, `VmHWM`) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    return _proc_status_mb("VmRSS") or 0.0


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter of this process (Linux: `5` into clear_refs), so that the
    next `peak_rss_mb` is the peak of one step rather than of the whole process so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_rss_mb then reports the process-wide peak


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last `reset_peak_rss` (VmHWM), else since the start."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


@dataclass
class StepRecord:
    """Wall time and peak memory of one demo step."""

    name: str
    seconds: float
    peak_rss_mb: float
    reused: bool = False
    started: float = 0.0
    """Wall-clock start (epoch seconds): shows which steps ran side by side."""


# --- composition ----------------------------------------------------------------------------------


def compose_experiment(experiment: str, overrides: list[str]) -> DictConfig:
    """Compose `experiment=<name>` plus overrides, inside or outside a running Hydra app."""
    arguments = [f"experiment={experiment}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=arguments)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=arguments)


@dataclass
class DemoSize:
    """What one demo run trains: the CPU defaults of `demo`, or `demo.cuda` on a CUDA machine."""

    label: str
    corpus_dir: str
    corpus_hours: float
    pretrain_updates: int
    finetune_updates: dict[str, int]
    model_overrides: list[str]


def choose_size(demo: DictConfig, cuda_available: bool) -> DemoSize:
    """The CUDA size when `demo.auto_size` is on and a GPU is visible, the configured CPU size otherwise."""
    if demo.auto_size and cuda_available:
        big = demo.cuda
        return DemoSize("cuda", str(big.corpus_dir), float(big.corpus_hours), int(big.pretrain_updates),
                        _updates_per_split(big.finetune_updates), list(big.model_overrides))
    return DemoSize("cpu", str(demo.corpus_dir), float(demo.corpus_hours), int(demo.pretrain_updates),
                    _updates_per_split(demo.finetune_updates), [])


def _updates_per_split(updates: Any) -> dict[str, int]:
    """{split: updates} as plain types (the schema already refuses anything but a mapping)."""
    return {str(split): int(count) for split, count in updates.items()}


def run_step(name: str, run_dir: Path, cfg: DictConfig, stages: list[tuple[str, Callable]],
             earlier: dict[str, StepRecord] | None = None) -> StepRecord:
    """Run one demo step as a tracked run in `run_dir`, unless it already finished (then the wall time and
    memory recorded when it ran, from `earlier`, are kept)."""
    if read_status(run_dir).get("status") == "finished":
        say(f"{name}: already finished ({run_dir})")
        before = (earlier or {}).get(name)
        return StepRecord(name, before.seconds if before else 0.0, before.peak_rss_mb if before else peak_rss_mb(),
                          reused=True, started=before.started if before else 0.0)
    reset_peak_rss()
    started = time.time()
    say(f"{name}: running in {run_dir}")
    run_stages(cfg, run_dir, name=name, stages=stages, gpus=0, tracker=build_tracker(cfg, run_dir))
    record = StepRecord(name, time.time() - started, peak_rss_mb(), started=started)
    release_memory()
    say(f"{name}: finished in {record.seconds:.0f} s, peak RSS {record.peak_rss_mb:.0f} MiB "
        f"({current_rss_mb():.0f} MiB after it)")
    return record


@dataclass
class StepPlan:
    """One demo step to run: a name, its run directory, its composed config and its stages (by name)."""

    name: str
    run_dir: Path
    cfg: DictConfig
    stages: list[str]


def _start_worker(threads: int, low_memory: bool, log_file: str | None) -> None:
    """Initialise a spawned step process: the demo's thread count, heap policy and log destinations."""
    torch.set_num_threads(threads)
    if low_memory:
        bound_heap()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))  # the demo's cli.log, as in the parent process
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def _run_planned_step(plan: StepPlan, earlier: dict[str, StepRecord]) -> StepRecord:
    return run_step(plan.name, plan.run_dir, plan.cfg, [(s, resolve_stage(s)) for s in plan.stages], earlier)


def _log_file() -> str | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def run_steps(plans: list[tuple[StepPlan, str | None]], earlier: dict[str, StepRecord], processes: int,
              threads: int, low_memory: bool = False) -> list[StepRecord]:
    """Run `plans` (`(plan, name of the step it needs finished or None)`), `processes` steps at a time.

    Fine-tuning from scratch needs nothing, so it runs beside the pretraining; fine-tuning from the
    encoder waits for the pretraining, self-training for the model that labels its data. Each step is
    its own process of `threads` torch threads: on a 2-core CPU two 1-thread steps side by side finish
    ~1.9x sooner than one after the other, and slow down evenly (not collapse) when another job shares
    the cores. With one process the steps run in plan order here. Records come back in plan order.
    """
    names = {plan.name for plan, _ in plans}
    unknown = [after for _, after in plans if after is not None and after not in names]
    if unknown:
        raise ValueError(f"demo steps wait for steps that are not planned: {', '.join(unknown)}")
    if processes <= 1:
        return [_run_planned_step(plan, earlier) for plan, _ in plans]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                             initargs=(threads, low_memory, _log_file())) as pool:
        futures: dict[str, Future] = {}
        waiting = list(plans)
        while waiting:
            for plan, after in list(waiting):  # submitted in plan order: the pool runs them first come, first served
                if after is None or (after in futures and futures[after].done()):
                    if after is not None:
                        futures[after].result()  # a failed step raises here: the steps after it do not start
                    futures[plan.name] = pool.submit(_run_planned_step, plan, earlier)
                    waiting.remove((plan, after))
            running = [future for future in futures.values() if not future.done()]
            if waiting and running:
                wait(running, return_when=FIRST_COMPLETED)
        return [futures[plan.name].result() for plan, _ in plans]


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
    torch.set_num_threads(max(1, int(demo.threads)))
    if demo.low_memory:
        bound_heap()
    size = choose_size(demo, torch.cuda.is_available())
    if demo.self_training_split and demo.self_training_split not in demo.splits:
        raise ConfigError(f"demo.self_training_split={demo.self_training_split} is not one of demo.splits "
                          f"({', '.join(demo.splits)}): its pretrained model labels the pool")
    missing = [split for split in demo.splits if split not in size.finetune_updates]
    if missing:
        raise ConfigError(f"demo.finetune_updates has no entry for labeled split(s) {', '.join(missing)} "
                          f"(it has {', '.join(size.finetune_updates) or 'none'})")
    say(f"size: {size.label} ({size.corpus_hours} h corpus, {size.pretrain_updates} pretraining and "
        f"{', '.join(f'{n} ({s})' for s, n in size.finetune_updates.items())} fine-tuning updates, "
        f"{torch.get_num_threads()} torch thread(s)"
        + (f", {' '.join(size.model_overrides)}" if size.model_overrides else "") + ")")
    steps: list[StepRecord] = []
    earlier = _earlier_steps(run_dir / STEPS_FILE)
    reset_peak_rss()
    corpus_dir = Path(size.corpus_dir).resolve()
    manifests = prepare_data(corpus_dir, size.corpus_hours, int(demo.corpus_seed))
    steps.append(StepRecord("corpus + manifests", time.time() - started, peak_rss_mb()))
    # sub-runs track where the demo itself is configured to (one MLflow store per runs root)
    common = [
        f"common.seed={cfg.common.seed}",
        f"tracker.backends=[{','.join(cfg.tracker.backends)}]",
        f"tracker.mlflow.tracking_uri={cfg.tracker.mlflow.tracking_uri or 'null'}",
        f"tracker.wandb.mode={cfg.tracker.wandb.mode}",
        *size.model_overrides,
    ]

    pretrain_dir = run_dir / "pretrain"
    pretrain = StepPlan("demo/pretrain", pretrain_dir, compose_experiment(
        "demo_pretrain",
        [f"task.data={manifests / 'pretrain'}", f"optimization.max_update={size.pretrain_updates}", *common],
    ), ["pretrain"])
    pretrained = pretrain_dir / "checkpoints" / "checkpoint_last.pt"

    lm_dir = corpus_dir / "lm"

    def labeled_split(split: str) -> list[str]:
        """Overrides every fine-tuning step on `split` shares: data, updates, the 4-gram's files, the report."""
        return [
            f"task.data={manifests / 'finetune'}",
            f"dataset.train_subset=train_{split}",
            f"optimization.max_update={size.finetune_updates[split]}",
            f"decodings.kenlm_4gram.lm_model={lm_dir / '4-gram.bin'}",
            f"decodings.kenlm_4gram.lexicon={lm_dir / 'lexicon.txt'}",
            f"paper.labeled_data={split}",
            f"paper.decoding=[{','.join(demo.decodings)}]",
            *common,
        ]

    variants = [("pretrained", False)] + ([("scratch", True)] if demo.from_scratch else [])
    plans: list[tuple[StepPlan, str | None]] = [(pretrain, None)]
    for split in demo.splits:
        for variant, from_scratch in variants:
            overrides = [
                *labeled_split(split),
                f"model.no_pretrained_weights={from_scratch}",
                f"model.w2v_path={'null' if from_scratch else pretrained}",
                f"paper.pretrain_data={'synthetic' if not from_scratch else 'none'}",
            ]
            # the MLflow run name is the run directory: demo/pretrained_10m
            plans.append((StepPlan(f"demo/{variant}_{split}", run_dir / f"{variant}_{split}",
                                   compose_experiment("demo_finetune", overrides), ["finetune", "evaluate"]),
                          None if from_scratch else pretrain.name))
    st_split = demo.self_training_split
    if st_split:  # Xu et al. in miniature: the split's model labels the pool; fine-tune again on both
        labeler = f"pretrained_{st_split}"
        st_cfg = compose_experiment("demo_st", [
            *labeled_split(st_split),
            f"model.w2v_path={pretrained}",
            f"self_training.unlabeled_data={manifests / 'pretrain' / 'train.tsv'}",
            f"self_training.labeling_checkpoint={run_dir / labeler / 'checkpoints' / 'checkpoint_best.pt'}",
        ])
        plans.append((StepPlan(f"demo/self_training_{st_split}", run_dir / f"self_training_{st_split}", st_cfg,
                               list(st_cfg.stages)), f"demo/{labeler}"))
    steps += run_steps(plans, earlier, processes=min(int(demo.processes), os.cpu_count() or 1),
                       threads=int(demo.threads), low_memory=bool(demo.low_memory))

    reset_peak_rss()
    report_started = time.time()
    report_dir = Path(demo.report_dir)
    records = [r for r in collect_run_dirs(run_dir) if r.name.startswith("demo/")]
    title = "repro demo: tiny wav2vec 2.0 on the synthetic corpus"
    written = write_report(records, report_dir, title=title,
                           context={"size": size.label, "threads": torch.get_num_threads(),
                                    "corpus_hours": size.corpus_hours, "steps": [asdict(s) for s in steps]})
    steps.append(StepRecord("report", time.time() - report_started, peak_rss_mb()))
    (run_dir / STEPS_FILE).write_text(json.dumps([asdict(s) for s in steps], indent=1) + "\n")
    summary = _summary(records, written, run_dir, time.time() - started, steps)
    print(summary)
    (run_dir / "summary.txt").write_text(summary)
    return {"report": str(written["html"]), "runs": [r.name for r in records], "size": size.label}


def _earlier_steps(path: Path) -> dict[str, StepRecord]:
    """The steps recorded by an earlier run of this demo (to report a resumed demo's original timings)."""
    try:
        return {row["name"]: StepRecord(**row) for row in json.loads(path.read_text())}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _summary(records, written: dict[str, Path], run_dir: Path, seconds: float, steps: list[StepRecord]) -> str:
    lines = ["", "=" * 72, f"repro demo finished in {seconds / 60:.1f} min", ""]
    lines += [f"{'step':28s} {'wall (s)':>14s} {'peak RSS (MiB)':>15s}"]
    for step in steps:
        wall = f"{step.seconds:.0f}" + (" (earlier)" if step.reused else "")
        lines.append(f"{step.name:28s} {wall:>14s} {step.peak_rss_mb:15.0f}")
    lines += ["", f"{'run':28s} {'decoding':8s} " + " ".join(f"{s:>10s}" for s in EVAL_SPLITS)]
    for record in records:
        for decoding, results in sorted(record.results.items()):
            cells = " ".join(
                f"{results[s]['wer']:10.1f}" if s in results and "wer" in results[s] else f"{'-':>10s}" for s in EVAL_SPLITS
            )
            lines.append(f"{record.name:28s} {decoding[:8]:8s} {cells}")
    runs_root = run_dir.resolve().parent
    lines += [
        "",
        "WER (%) per split; 'pretrained' rows start from the demo's pretrained encoder, 'scratch' rows from random weights.",
        *effect_summary(records).lines(),
        "",
        f"report:     {written['html'].resolve()}  (also {written['markdown'].name}, .tex, .csv beside it)",
        f"runs:       {run_dir.resolve()}",
        f"MLflow:     mlflow ui --backend-store-uri sqlite:///{runs_root / 'mlflow.db'}",
        f"W&B:        offline runs in {run_dir.resolve()}/*/wandb (upload: wandb sync <dir>/wandb/offline-run-*)",
        "=" * 72,
    ]
    return "\n".join(lines) + "\n"
