"""What a launch will look like: world size, update_freq, effective batch and compute (pure functions).

The paper's effective batch is kept on any cluster (fairseq README: "simulate N GPUs with
distributed_world_size=k and update_freq=N/k"): `nodes x gpus_per_node` processes train together,
and update_freq is multiplied by `paper_world_size / world_size`. The multiplication itself is
`repro.train.distributed.effective_update_freq`, the very function the trainer applies at run
time, so the plan printed here and the run cannot disagree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig

from repro.train.distributed import effective_update_freq


def world_size(nodes: int, gpus_per_node: int) -> int:
    """Processes of a job: one per GPU; a CPU-only allocation (gpus_per_node 0) runs one per node."""
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"cluster.nodes must be >= 1 and cluster.gpus_per_node >= 0 (got {nodes}, {gpus_per_node})")
    return nodes * max(gpus_per_node, 1)


def derive_update_freq(paper_world_size: int | None, processes: int, update_freq: int) -> int:
    """update_freq that keeps the paper's effective batch on `processes` GPUs (64 paper GPUs on 8 -> x8).

    Raises ValueError when the paper's GPU count is not a multiple of ours: the batch could then not be
    kept exactly (pick a world size that divides it, e.g. cluster.nodes).
    """
    return effective_update_freq(paper_world_size, processes, update_freq)


def usable_gpus_per_node(paper_world_size: int | None, nodes: int, gpus_per_node: int) -> int:
    """GPUs per node to use so that the job's world size divides the paper's GPU count.

    The vox fine-tuning rows ran on 20 effective GPUs (fairseq: 4 x update_freq 5); a node of 8 cannot
    keep that batch exactly, 5 of its GPUs can (x update_freq 4). Returns the largest such count
    <= gpus_per_node, or gpus_per_node itself when no paper world size is set or nothing divides it
    (derive_update_freq then says why it cannot launch).
    """
    if paper_world_size is None or gpus_per_node <= 0:
        return gpus_per_node
    for gpus in range(gpus_per_node, 0, -1):
        if paper_world_size % (nodes * gpus) == 0:
            return gpus
    return gpus_per_node


def effective_batch_samples(max_tokens: int, processes: int, update_freq: int) -> int:
    """Upper bound of audio samples per update: max_tokens per process x processes x update_freq."""
    return max_tokens * processes * update_freq


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the dry run prints and the launcher uses, derived from one composed config."""

    cluster: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    requested_gpus_per_node: int | None
    """GPUs per node the cluster config offers (gpus_per_node may use fewer to keep the paper's batch)."""
    world_size: int
    paper_world_size: int | None
    configured_update_freq: int
    update_freq: int
    max_tokens: int | None
    sample_rate: int
    batch_samples: int | None
    paper_gpus: int | None
    paper_gpu_type: str | None
    paper_hours: float | None
    compute_source: str | None
    """Where paper_gpus / paper_hours come from (paper.compute_source); None = no source given."""
    world_size_source: str | None
    """Where paper_world_size comes from (paper.world_size_source); None = no source given."""
    gpu_type: str | None
    timeout_min: int
    max_num_timeout: int

    @property
    def batch_seconds(self) -> float | None:
        """Seconds of audio in one update (upper bound, from max_tokens)."""
        return None if self.batch_samples is None else self.batch_samples / self.sample_rate

    @property
    def paper_gpu_hours(self) -> float | None:
        """GPU-hours of the original run (paper.gpus x paper.hours)."""
        if self.paper_gpus is None or self.paper_hours is None:
            return None
        return self.paper_gpus * self.paper_hours

    @property
    def estimated_hours(self) -> float | None:
        """Wall-clock hours here if each of our GPUs were as fast as one of the paper's."""
        gpu_hours = self.paper_gpu_hours
        return None if gpu_hours is None else gpu_hours / self.world_size

    @property
    def estimated_jobs(self) -> int | None:
        """SLURM runs needed at timeout_min each (the job checkpoints and requeues between them)."""
        hours = self.estimated_hours
        if hours is None or self.timeout_min <= 0:
            return None
        return max(1, math.ceil(hours * 60 / self.timeout_min))


def plan_launch(cfg: DictConfig, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Derive the plan of `cfg` (the whole composed ReproConfig) on its `cluster`.

    On SLURM the allocation decides the world size; locally it is torchrun's WORLD_SIZE (or 1).
    """
    env = os.environ if environ is None else environ
    cluster = cfg.cluster
    paper_world_size = cfg.distributed_training.get("paper_world_size")
    requested_gpus_per_node = None
    if cluster.name == "slurm":
        nodes, requested_gpus_per_node = int(cluster.nodes), int(cluster.gpus_per_node)
        gpus_per_node = usable_gpus_per_node(paper_world_size, nodes, requested_gpus_per_node)
        processes = world_size(nodes, gpus_per_node)
        tasks_per_node = processes // nodes
    else:
        processes = int(env.get("WORLD_SIZE", "1"))
        nodes, gpus_per_node, tasks_per_node = 1, 0, processes
    configured = int(cfg.optimization.update_freq[0])
    update_freq = derive_update_freq(paper_world_size, processes, configured)
    max_tokens = cfg.dataset.get("max_tokens")
    paper = cfg.paper
    return LaunchPlan(
        cluster=str(cluster.name),
        nodes=nodes,
        tasks_per_node=tasks_per_node,
        gpus_per_node=gpus_per_node,
        requested_gpus_per_node=requested_gpus_per_node,
        world_size=processes,
        paper_world_size=None if paper_world_size is None else int(paper_world_size),
        configured_update_freq=configured,
        update_freq=update_freq,
        max_tokens=None if max_tokens is None else int(max_tokens),
        sample_rate=int(cfg.task.sample_rate),
        batch_samples=None if max_tokens is None else effective_batch_samples(int(max_tokens), processes, update_freq),
        paper_gpus=None if paper.gpus is None else int(paper.gpus),
        paper_gpu_type=paper.gpu_type,
        paper_hours=None if paper.hours is None else float(paper.hours),
        compute_source=paper.get("compute_source"),
        world_size_source=paper.get("world_size_source"),
        gpu_type=cluster.get("gpu_type"),
        timeout_min=int(cluster.timeout_min),
        max_num_timeout=int(cluster.max_num_timeout),
    )


def executor_parameters(cfg: DictConfig, plan: LaunchPlan) -> dict[str, object]:
    """`submitit.AutoExecutor.update_parameters` keywords for the plan: one task per GPU."""
    cluster = cfg.cluster
    params: dict[str, object] = {
        "name": str(cfg.experiment),
        "timeout_min": plan.timeout_min,
        "nodes": plan.nodes,
        "tasks_per_node": plan.tasks_per_node,
        "cpus_per_task": int(cluster.cpus_per_task),
        # Time to save a checkpoint between the time-limit signal and the kill (submitit's default is 90).
        "slurm_signal_delay_s": 120,
    }
    if plan.gpus_per_node > 0:
        params["gpus_per_node"] = plan.gpus_per_node
    params.update(placement_parameters(cluster))
    return params


def placement_parameters(cluster: DictConfig) -> dict[str, object]:
    """Memory, partition, account, QOS and constraint of `cluster` as submitit keywords (those that are set)."""
    params: dict[str, object] = {}
    if cluster.mem_gb is not None:
        params["mem_gb"] = int(cluster.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        if cluster.get(key) is not None:
            params[f"slurm_{key}"] = str(cluster[key])
    return params


# --- wav2vec 2.0 §4.3's learning-rate x seed grid (run by repro.report.selection) -------------------------


@dataclass(frozen=True)
class GridPoint:
    """One fine-tuning of the grid: its peak learning rate and seed."""

    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}_seed{self.seed}"


def grid_points(selection: DictConfig) -> list[GridPoint]:
    """Every (learning rate, seed) of the grid, learning rates outermost (the order ties are broken in)."""
    return [GridPoint(float(lr), int(seed)) for lr in selection.lrs for seed in selection.seeds]


def describe_selection(cfg: DictConfig) -> str | None:
    """One line for the dry run: how many fine-tunings the grid runs and how the winner is chosen."""
    selection = cfg.get("selection")
    if selection is None or selection.type != "grid":
        return None
    points = grid_points(selection)
    decoding = selection.decoding
    return (f"selection: {len(selection.lrs)} lr {list(selection.lrs)} x {len(selection.seeds)} seeds = {len(points)} "
            f"fine-tunings (the plan above is per fine-tuning), winner by {selection.split} WER with {decoding.type} "
            f"beam {decoding.beam} lm_weight {decoding.lm_weight} word_score {decoding.word_score}; "
            f"`selection=none lr=...` runs one")
