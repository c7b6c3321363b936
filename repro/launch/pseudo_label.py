"""Stage `pseudo_label`: shard the unlabeled manifest, label every shard, merge, build the combined split.

Where the shards run (repro/train/self_training.py does the labelling itself):

* `cluster=local`: here, one after another (`self_training.workers=1`), or in a pool of that many
  processes;
* `cluster=slurm*`: one SLURM job array through submitit's `executor.map_array`, one array task per
  shard (`self_training.shard_gpus` GPUs each, at most `array_parallelism` at once). Each task is
  checkpointable in submitit's sense, so a preempted or timed-out shard is requeued alone; a shard
  that fails is submitted again alone, up to `self_training.max_retries` times. From the submitting
  host (repro/launch/slurm.py `submit_self_training`) the array is submitted with a merge job that
  depends on it, and the command returns; with `self_training.wait=true`, or inside a SLURM job, the
  stage waits for the array, then merges.

Every shard writes its files atomically and a marker last, so re-running the same command (after a
crash, a `scancel`, a node failure) labels only the shards without a marker, then merges.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig

from repro.data.manifest import read_manifest
from repro.launch.plan import placement_parameters
from repro.train.self_training import (
    LabelingSetup,
    PseudoLabelError,
    Shard,
    describe_setup,
    label_shard,
    labeling_decode,
    labeling_rescore,
    merge_shards,
    plan_shards,
    prepare_labeling,
    run_shards_in_process,
    say,
    shard_is_done,
    write_atomic,
    write_combined_split,
)

ARRAY_POLL_S = 5.0

# Emission cost of a wav2vec 2.0 model per second of audio, for the dry run's GPU-hour estimate:
# feature encoder ~5 GFLOP (7 convolutions of 512 channels over 16 kHz) plus 2 FLOPs per weight of
# each Transformer layer per frame at 50 frames/s; attention over the frames is left out.
FEATURE_ENCODER_GFLOP_PER_S = 5.0
FRAMES_PER_SECOND = 50
# Hours of the unlabeled sets, for the estimate when the manifest is not on this machine (Xu et al. §3.1).
UNLABELED_HOURS = {"LV-60k": 53_200.0, "LS-960": 960.0}
ASSUMED_SUSTAINED_TFLOPS = 8.0
"""Assumed float32 inference throughput of one GPU (about half a V100's fp32 peak); an estimate, not a measurement."""


# ----------------------------------------------------------------------------------------------
# Local execution


def _pool_worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_shards_in_pool(setup: LabelingSetup, shards: Sequence[Shard], workers: int) -> dict[int, str]:
    """Label `shards` in `workers` processes (spawned: no forked torch state); {index: error} of failures."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    failures: dict[int, str] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_pool_worker_init,
                                                initargs=(threads,)) as pool:
        futures = {pool.submit(label_shard, setup, shard, False): shard for shard in shards}
        for finished, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            shard = futures[future]
            try:
                future.result()
                say(f"{shard.name} done ({finished}/{len(shards)})")
            except Exception as error:  # a dead worker or a failed shard: only that shard is redone
                failures[shard.index] = f"{type(error).__name__}: {error}"
                say(f"{shard.name} failed: {failures[shard.index]}")
    return failures


# ----------------------------------------------------------------------------------------------
# SLURM job array


class ShardJob(submitit.helpers.Checkpointable):
    """One array task: label one shard. Checkpointable: preemption / time limit requeues it with the same shard."""

    def __init__(self, setup: LabelingSetup) -> None:
        self.setup = setup

    def __call__(self, shard: Shard) -> dict[str, Any]:
        return label_shard(self.setup, shard, progress=False)


def array_parameters(cfg: DictConfig, jobs: int) -> dict[str, object]:
    """submitit keywords of the labelling array: one task per shard, one node each."""
    cluster, st = cfg.cluster, cfg.self_training
    params: dict[str, object] = {
        "name": f"{cfg.experiment}-pseudo_label",
        "timeout_min": int(cluster.timeout_min),
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": int(cluster.cpus_per_task),
        "slurm_array_parallelism": max(1, min(int(st.array_parallelism), jobs)),
    }
    if int(cluster.gpus_per_node) > 0 and int(st.shard_gpus) > 0:
        params["gpus_per_node"] = int(st.shard_gpus)
    params.update(placement_parameters(cluster))
    return params


def submit_shard_array(cfg: DictConfig, setup: LabelingSetup, shards: Sequence[Shard],
                       backend: str = "slurm") -> list[submitit.Job]:
    """Submit `shards` as one job array (one task each); their ids are appended to `<output>/slurm/job_ids`."""
    folder = Path(setup.output_dir) / "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=backend, slurm_max_num_timeout=int(cfg.cluster.max_num_timeout))
    executor.update_parameters(**array_parameters(cfg, len(shards)))
    jobs = executor.map_array(ShardJob(setup), list(shards))
    with (folder / "job_ids").open("a") as ids:
        ids.write(" ".join(job.job_id for job in jobs) + "\n")
    say(f"submitted {len(jobs)} shard(s) as SLURM job array {jobs[0].job_id.split('_')[0]}; logs in {folder}")
    return jobs


def run_shards_on_slurm(cfg: DictConfig, setup: LabelingSetup, shards: Sequence[Shard],
                        backend: str = "slurm") -> dict[int, str]:
    """Submit `shards` as one job array, wait for every task; {index: error} of the failed ones.

    `backend` is submitit's cluster: "slurm", or "local" (submitit's own process executor) to run the
    same array machinery on a machine without SLURM.
    """
    jobs = submit_shard_array(cfg, setup, shards, backend)
    reported = -1
    while (finished := sum(job.done() for job in jobs)) < len(jobs):
        if finished != reported:
            say(f"{finished}/{len(jobs)} array task(s) finished")
            reported = finished
        time.sleep(ARRAY_POLL_S)
    failures: dict[int, str] = {}
    for shard, job in zip(shards, jobs):
        try:
            job.result()
        except Exception as error:  # submitit raises the task's exception (or the job's failure state)
            failures[shard.index] = f"job {job.job_id}: {str(error).strip()[-500:]}"
    return failures


# ----------------------------------------------------------------------------------------------
# The stage


def run_shards(cfg: DictConfig, setup: LabelingSetup, shards: Sequence[Shard]) -> dict[int, str]:
    if cfg.cluster.name == "slurm":
        return run_shards_on_slurm(cfg, setup, shards)
    workers = int(cfg.self_training.workers)
    if workers > 1 and len(shards) > 1:
        return run_shards_in_pool(setup, shards, min(workers, len(shards)))
    return run_shards_in_process(setup, shards)


def label_all(cfg: DictConfig, setup: LabelingSetup, shards: Sequence[Shard]) -> None:
    """Label every unfinished shard; failed shards are retried alone up to `self_training.max_retries` times."""
    todo = [shard for shard in shards if not shard_is_done(setup, shard)]
    say(f"{len(shards)} shard(s) of {setup.manifest}: {len(shards) - len(todo)} already done, {len(todo)} to label")
    retries = int(cfg.self_training.max_retries)
    for attempt in range(retries + 1):
        if not todo:
            return
        failures = run_shards(cfg, setup, todo)
        todo = [shard for shard in todo if shard.index in failures or not shard_is_done(setup, shard)]
        if todo and attempt < retries:
            say(f"retrying {len(todo)} failed shard(s) alone: {', '.join(shard.name for shard in todo[:5])}")
    if todo:
        details = "; ".join(f"{shard.name}: {failures.get(shard.index, 'no marker written')}" for shard in todo[:3])
        raise PseudoLabelError(f"{len(todo)} shard(s) failed after {retries + 1} attempt(s) ({details}); "
                               "re-run the same command to retry only these")


def planned_labelling(cfg: DictConfig, run_dir: Path) -> tuple[LabelingSetup, list[Shard]]:
    """The checked setup (every input checked before any work) and its shards; writes `<output>/setup.json`."""
    setup = prepare_labeling(cfg, Path(run_dir))
    sizes = [entry.num_samples for entry in read_manifest(setup.manifest).entries]
    shards = plan_shards(sizes, int(cfg.self_training.num_shards), setup.max_tokens)
    write_atomic(Path(setup.output_dir) / "setup.json",
                 json.dumps(describe_setup(setup), indent=1, sort_keys=True, default=str) + "\n")
    return setup, shards


def submit_labelling(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """cluster=slurm, not waiting: submit the unfinished shards as one job array and return at once.

    Returns {"array": its job id (None when every shard is done), "shards", "todo", "folder", "output_dir"}.
    """
    setup, shards = planned_labelling(cfg, run_dir)
    todo = [shard for shard in shards if not shard_is_done(setup, shard)]
    say(f"{len(shards)} shard(s) of {setup.manifest}: {len(shards) - len(todo)} already done, {len(todo)} to label")
    jobs = submit_shard_array(cfg, setup, todo) if todo else []
    return {"array": jobs[0].job_id.split("_")[0] if jobs else None, "shards": len(shards), "todo": len(todo),
            "folder": str(Path(setup.output_dir) / "slurm"), "output_dir": setup.output_dir}


def run_pseudo_label(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `pseudo_label` (Xu et al. 2021): label `self_training.unlabeled_data`, write the combined split."""
    st = cfg.self_training
    setup, shards = planned_labelling(cfg, run_dir)
    out = Path(setup.output_dir)
    if tracker is not None:
        tracker.log_params({"pseudo_label/shards": len(shards), "pseudo_label/checkpoint": setup.checkpoint,
                            "pseudo_label/decoder": setup.decode.get("name") or setup.decode["type"],
                            "pseudo_label/rescore": setup.rescore["decoding"] if setup.rescore else "none"})
    started = time.time()
    label_all(cfg, setup, shards)
    summary = merge_shards(setup, shards, st.name, st.min_score_per_frame,
                           list(st.length_ratio) if st.length_ratio is not None else None, bool(st.drop_empty))
    summary["combined"] = write_combined_split(Path(cfg.task.data), cfg.dataset.train_subset, out, st.name,
                                               st.combined_subset, bool(st.include_labeled))
    summary["seconds"] = time.time() - started
    summary["merged_in_slurm_job"] = os.environ.get("SLURM_JOB_ID")  # the merge job, when submitted without waiting
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
    wer = f", pseudo-label WER {summary['wer']:.2f}" if "wer" in summary else ""
    say(f"{summary['utterances']} utterance(s) labelled ({summary['hours']:.2f} h), {summary['kept']} kept, mean "
        f"decoder score {summary['mean_score']:.2f}{wer}; combined split {out / st.combined_subset}.tsv: "
        f"{summary['combined']['labeled']} labeled + {summary['combined']['pseudo']} pseudo-labeled")
    if tracker is not None:
        metrics = {key: float(summary[key]) for key in ("utterances", "kept", "hours", "mean_score",
                                                         "mean_score_per_frame", "empty", "wer", "kept_wer")
                   if key in summary}
        metrics.update({f"combined_{key}": float(value) for key, value in summary["combined"].items()})
        tracker.log_metrics(metrics, step=0, split="pseudo_label")
        tracker.log_artifact(out / "summary.json")
    return summary


# ----------------------------------------------------------------------------------------------
# Dry run


def emission_gflop_per_second(model: DictConfig) -> float:
    """Rough forward cost of the CTC model per second of audio (see FEATURE_ENCODER_GFLOP_PER_S)."""
    dim, ffn, layers = int(model.encoder_embed_dim), int(model.encoder_ffn_embed_dim), int(model.encoder_layers)
    per_frame = 2 * layers * (4 * dim * dim + 2 * dim * ffn)
    return FEATURE_ENCODER_GFLOP_PER_S + per_frame * FRAMES_PER_SECOND / 1e9


def describe_pseudo_label(cfg: DictConfig) -> list[str]:
    """The labelling plan for `dry_run=true`: data, shards, model, decoder, where it runs, GPU-hours."""
    st = cfg.self_training
    lines = ["stage pseudo_label (Xu et al. 2021 self-training):"]
    if not st.unlabeled_data:
        return lines + ["  self_training.unlabeled_data is not set: nothing to label"]
    path = Path(st.unlabeled_data)
    if path.is_file():
        manifest = read_manifest(path)
        sizes = [entry.num_samples for entry in manifest.entries]
        hours = sum(sizes) / cfg.task.sample_rate / 3600
        data = f"{len(sizes):,} utterances, {hours:,.1f} h"
    else:
        sizes, hours = [], UNLABELED_HOURS.get(str(cfg.paper.pretrain_data))
        data = "manifest not found here (checked again when the stage runs)"
        if hours is not None:
            data += f"; {cfg.paper.pretrain_data} is {hours:,.0f} h"
    lines.append(f"  unlabeled: {path} ({data})")
    lines.append(f"  labelling model: {st.labeling_checkpoint or '(self_training.labeling_checkpoint not set)'}")
    try:
        decode = labeling_decode(cfg)
        lines.append(f"  decoder: {decode.get('name') or decode['type']} ({decode['type']}, beam {decode['beam']}, "
                     f"lm_weight {decode['lm_weight']}, word_score {decode['word_score']}, lm {decode.get('lm_model')})")
        rescoring = labeling_rescore(cfg, decode)
        lines.append("  rescoring: none (the beam's best hypothesis is the label)" if rescoring is None else
                     f"  rescoring: {rescoring['nbest']} best with {rescoring['decoding']} ({rescoring['lm_model']}; "
                     f"lm_weight {rescoring['lm_weight']}, word_score {rescoring['word_score']}, 4-gram weight "
                     f"{rescoring['ngram_weight']})")
    except PseudoLabelError as error:
        lines.append(f"  decoder: {error}")
    shards = plan_shards(sizes, int(st.num_shards), int(cfg.dataset.max_tokens or 4_000_000)) if sizes else []
    num_shards = len(shards) or int(st.num_shards)
    then = ("this host waits, then merges" if st.wait else
            "then a merge job after it (afterok) and the row's other stages after the merge; the command returns")
    where = (f"SLURM job array of {len(shards) or st.num_shards} task(s), {st.shard_gpus} GPU(s) each, at most "
             f"{st.array_parallelism} at once; {then}" if cfg.cluster.name == "slurm"
             else f"this machine, {st.workers} process(es)")
    lines.append(f"  shards: {len(shards) or st.num_shards} ({where}); retries per shard: {st.max_retries}")
    lines.append(f"  output: {st.output_dir or '<run_dir>/pseudo_labels'}/{st.name}.{{tsv,ltr,wrd,scores.tsv}}, "
                 f"combined split {st.combined_subset} = "
                 f"{cfg.dataset.train_subset + ' + ' if st.include_labeled else ''}pseudo-labels")
    if hours is not None:
        gpu_hours = hours * 3600 * emission_gflop_per_second(cfg.model) / (ASSUMED_SUSTAINED_TFLOPS * 1e3) / 3600
        lines.append(f"  emissions: ~{gpu_hours:,.1f} GPU-hours (~{gpu_hours / num_shards:,.2f} per shard) at "
                     f"an assumed {ASSUMED_SUSTAINED_TFLOPS:g} TFLOP/s; the beam search adds CPU time on each task "
                     "(benchmarks/bench_pseudo_label.py measures it)")
    filters = [f"{key}={st[key]}" for key in ("min_score_per_frame", "length_ratio") if st[key] is not None]
    filters += ["drop_empty"] if st.drop_empty else []
    lines.append(f"  filters: {', '.join(filters) or 'none (Xu et al. keep every pseudo-label)'}")
    return lines
