"""Cost planner of the dry run: what a paper row costs on N GPUs, from a measured training step.

`python -m repro experiment=<row> cluster=<preset> dry_run=true plan.measure=true [plan.gpus=8,16,32]`
times a few real training steps (forward, backward, optimizer) of the row's model at the row's per-GPU
batch (`dataset.max_tokens` samples) on this machine, then for each GPU count N:

    update_freq   = the one the launch derives on N GPUs (the paper's effective batch is kept)
    update time   = update_freq x (forward + backward) + optimizer step   (all N GPUs in parallel;
                    gradient all-reduce and data loading are not included)
    wall time     = max_update x update time,  GPU-hours = wall time x N,  cost = GPU-hours x price

next to the paper's compute (paper.gpus x paper.hours). A step timed on a CPU says nothing about a GPU:
without one the planner says so and extrapolates from the paper's GPU-hours instead.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from repro.launch.plan import derive_update_freq, plan_launch

LETTERS = list("|ETAONIHSRDLUMWCFGYPBVKXJQZ'")
"""The LibriSpeech letter dictionary (32 outputs with fairseq's 4 specials): the CTC head's size."""
FINETUNE_UTTERANCE_SECONDS = 15.0
"""Utterance length of a fine-tuning batch (fairseq batches length-sorted LibriSpeech utterances, most 12-16 s)."""
LETTERS_PER_SECOND = 15.0
"""CTC target length per second of read English speech (LibriSpeech: about 15 characters per second)."""


@dataclass(frozen=True)
class MeasuredStep:
    """One training step at the row's per-GPU batch, as timed here."""

    forward_backward_seconds: float
    optimizer_seconds: float
    device: str
    """'cuda:0 (NVIDIA H100 ...)' or 'cpu'."""
    on_gpu: bool
    utterances: int
    samples_per_utterance: int


@dataclass(frozen=True)
class CostRow:
    gpus: int
    update_freq: int | None
    update_seconds: float | None
    wall_hours: float | None
    gpu_hours: float | None
    cost: float | None
    note: str = ""


def estimate(step: MeasuredStep, gpus: int, update_freq: int, max_update: int,
             usd_per_gpu_hour: float | None) -> CostRow:
    """The row's compute on `gpus` GPUs from one measured step (the arithmetic of the module doc)."""
    update_seconds = update_freq * step.forward_backward_seconds + step.optimizer_seconds
    wall_hours = max_update * update_seconds / 3600
    gpu_hours = wall_hours * gpus
    cost = None if usd_per_gpu_hour is None else gpu_hours * usd_per_gpu_hour
    return CostRow(gpus, update_freq, update_seconds, wall_hours, gpu_hours, cost)


def extrapolate(paper_gpu_hours: float | None, gpus: int, update_freq: int,
                usd_per_gpu_hour: float | None) -> CostRow:
    """Without a GPU to measure on: the paper's GPU-hours spread over `gpus` at the paper's per-GPU speed."""
    if paper_gpu_hours is None:
        return CostRow(gpus, update_freq, None, None, None, None, "the paper gives no hours to extrapolate from")
    cost = None if usd_per_gpu_hour is None else paper_gpu_hours * usd_per_gpu_hour
    return CostRow(gpus, update_freq, None, paper_gpu_hours / gpus, paper_gpu_hours, cost)


# =================================================================================================
# Measuring
# =================================================================================================


def _batch_shape(cfg: DictConfig, kind: str) -> tuple[int, int]:
    """(utterances, samples each) filling dataset.max_tokens as the row's batches do."""
    max_tokens = int(cfg.dataset.max_tokens or 1_400_000)
    crop = cfg.task.get("max_sample_size")
    if kind == "wav2vec2" and crop:  # pretraining crops every utterance to max_sample_size
        length = int(crop)
    else:
        length = int(FINETUNE_UTTERANCE_SECONDS * int(cfg.task.sample_rate))
    length = min(length, max_tokens)
    return max(1, max_tokens // length), length


def build_for_measuring(cfg: DictConfig):
    """(model, hooks, kind) of the row's training task with random weights (the speed is the same)."""
    from repro.data.dictionary import Dictionary
    from repro.tasks import task_module
    from repro.tasks.common import model_config

    task = task_module(cfg)
    if task.KIND == "wav2vec2":
        from repro.models.wav2vec2 import Wav2Vec2Model
        from repro.tasks.wav2vec2_pretraining import pretraining_hooks

        model_cfg = model_config(cfg.model)
        return Wav2Vec2Model(model_cfg), pretraining_hooks(cfg, model_cfg), task.KIND
    if task.KIND == "wav2vec_ctc":
        from repro.tasks.ctc_finetuning import build_ctc_model, finetuning_hooks

        measuring = copy.deepcopy(cfg)
        OmegaConf.update(measuring, "model.w2v_path", None)  # the pretrained file need not exist here
        OmegaConf.update(measuring, "model.no_pretrained_weights", True)
        dictionary = Dictionary.from_symbols(LETTERS)
        model = build_ctc_model(measuring, len(dictionary), None)
        model.set_num_updates(int(cfg.model.freeze_finetune_updates))  # past the frozen phase: the full step
        return model, finetuning_hooks(measuring, model_config(model.cfg), dictionary), task.KIND
    raise ValueError(f"plan.measure: no measuring recipe for a {task.KIND!r} task")


def _synthetic_batch(kind: str, utterances: int, samples: int, sample_rate: int, device: torch.device,
                     generator: torch.Generator) -> dict:
    source = torch.randn(utterances, samples, generator=generator).to(device)
    batch: dict = {"net_input": {"source": source, "padding_mask": None}}
    if kind == "wav2vec_ctc":
        length = max(1, int(samples / sample_rate * LETTERS_PER_SECOND))
        batch["target"] = torch.randint(4, 4 + len(LETTERS), (utterances, length), generator=generator).to(device)
        batch["target_lengths"] = torch.full((utterances,), length, dtype=torch.long, device=device)
    return batch


def measure_step(cfg: DictConfig, steps: int = 3) -> MeasuredStep:
    """Time `steps` training steps (after one warm-up) of the row's model at its per-GPU batch."""
    from repro.train.optim import build_optimizer

    on_gpu = torch.cuda.is_available() and not cfg.common.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(int(cfg.common.seed))
    model, hooks, kind = build_for_measuring(cfg)
    model.to(device).train()
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, float(cfg.optimization.lr[0]))
    utterances, samples = _batch_shape(cfg, kind)
    batch = _synthetic_batch(kind, utterances, samples, int(cfg.task.sample_rate), device,
                             torch.Generator().manual_seed(0))
    dtype = torch.bfloat16 if cfg.common.bf16 else torch.float16 if cfg.common.fp16 else None
    autocast = torch.autocast("cuda", dtype=dtype, enabled=on_gpu and dtype is not None)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    best_forward_backward, best_optimizer = float("inf"), float("inf")
    for index in range(steps + 1):  # step 0 warms up (allocations, kernels, Adam state)
        optimizer.zero_grad(set_to_none=True)
        sync()
        started = time.perf_counter()
        with autocast:
            loss, _ = hooks.compute_loss(model, batch)
        loss.backward()
        sync()
        forward_backward = time.perf_counter() - started
        optimizer.step()
        sync()
        if index:
            best_forward_backward = min(best_forward_backward, forward_backward)
            best_optimizer = min(best_optimizer, time.perf_counter() - started - forward_backward)
    name = f"cuda:0 ({torch.cuda.get_device_name(0)})" if on_gpu else "cpu"
    return MeasuredStep(best_forward_backward, best_optimizer, name, on_gpu, utterances, samples)


# =================================================================================================
# The table
# =================================================================================================


def _hours(hours: float | None) -> str:
    if hours is None:
        return "?"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} days"


def cost_rows(cfg: DictConfig, step: MeasuredStep | None, gpu_counts: list[int]) -> list[CostRow]:
    """One row per GPU count: measured on a GPU, else extrapolated from the paper's compute."""
    plan = plan_launch(cfg)
    configured = int(cfg.optimization.update_freq[0])
    price = cfg.plan.get("usd_per_gpu_hour")
    max_update = int(cfg.optimization.max_update)
    rows = []
    for gpus in gpu_counts:
        try:
            update_freq = derive_update_freq(plan.paper_world_size, gpus, configured)
        except ValueError as error:
            rows.append(CostRow(gpus, None, None, None, None, None, str(error)))
            continue
        if step is not None and step.on_gpu and max_update > 0:
            rows.append(estimate(step, gpus, update_freq, max_update, price))
        else:
            rows.append(extrapolate(plan.paper_gpu_hours, gpus, update_freq, price))
    return rows


def describe_cost(cfg: DictConfig, step: MeasuredStep | None = None) -> str:
    """The planner's part of the dry run (measures first when plan.measure and no `step` is given)."""
    plan = plan_launch(cfg)
    gpu_counts = [int(g) for g in cfg.plan.gpus] or [plan.world_size]
    lines = ["cost plan:"]
    if step is None and cfg.plan.measure:
        step = measure_step(cfg, int(cfg.plan.steps))
    if step is not None:
        lines.append(f"  measured on {step.device}: {step.utterances} x {step.samples_per_utterance:,} samples per "
                     f"step (dataset.max_tokens {int(cfg.dataset.max_tokens or 0):,}): forward+backward "
                     f"{step.forward_backward_seconds:.3f} s, optimizer {step.optimizer_seconds:.3f} s "
                     f"(best of {int(cfg.plan.steps)})")
    measured = step is not None and step.on_gpu and int(cfg.optimization.max_update) > 0
    if not measured:
        why = ("no GPU here: a CPU step says nothing about a GPU's" if step is not None and not step.on_gpu
               else "no measured GPU step (plan.measure=true on a GPU machine measures one)")
        if int(cfg.optimization.max_update) <= 0:
            why = "optimization.max_update is not set"
        source = (f"the paper's compute, {plan.paper_gpus} x {plan.paper_gpu_type or 'GPU'} x "
                  f"{_hours(plan.paper_hours)} = {plan.paper_gpu_hours:,.0f} GPU-hours, at the paper's per-GPU speed"
                  if plan.paper_gpu_hours is not None else "nothing: the paper gives no hours for this row")
        lines.append(f"  {why}; it can only extrapolate, from {source}")
    else:
        lines.append(f"  {int(cfg.optimization.max_update):,} updates; update time = update_freq x forward+backward + "
                     "optimizer (all-reduce and data loading not included)")
    header = f"  {'GPUs':>5} {'update_freq':>11} {'s/update':>9} {'wall time':>11} {'GPU-hours':>10} {'cost':>10}"
    lines.append(header)
    for row in cost_rows(cfg, step, gpu_counts):
        if row.update_freq is None:
            lines.append(f"  {row.gpus:>5} cannot keep the paper's batch: {row.note}")
            continue
        cost = "-" if row.cost is None else f"${row.cost:,.0f}"
        gpu_hours = "?" if row.gpu_hours is None else f"{row.gpu_hours:,.0f}"
        seconds = "-" if row.update_seconds is None else f"{row.update_seconds:.3f}"
        lines.append(f"  {row.gpus:>5} {row.update_freq:>11} {seconds:>9} {_hours(row.wall_hours):>11} "
                     f"{gpu_hours:>10} {cost:>10}" + (f"  ({row.note})" if row.note else ""))
    paper = (f"{plan.paper_gpus} x {plan.paper_gpu_type or 'GPU'} x {_hours(plan.paper_hours)} = "
             f"{plan.paper_gpu_hours:,.0f} GPU-hours" if plan.paper_gpu_hours is not None
             else f"{plan.paper_gpus or '?'} x {plan.paper_gpu_type or 'GPU'}, hours not given in the sources")
    lines.append(f"  paper compute: {paper}")
    if cfg.plan.get("usd_per_gpu_hour") is None:
        lines.append("  cost: set plan.usd_per_gpu_hour=<price of one GPU-hour> for the cost column")
    return "\n".join(lines)
