"""The update loop: fairseq's `Trainer.train_step` semantics in one readable class.

One update = `update_freq` micro-batches per process (DDP gradient sync on the last only), then
(fairseq_spec.md §2, §5):

1. sum `sample_size` and the logging outputs over micro-batches and processes;
2. gradients *= world_size / sample_size (DDP averaged them over processes) and / loss_scale (fp16);
3. gradient norm (fp32), clipped when clip_norm > 0; a non-finite norm is an overflow under fp16
   (skip the update, halve the scale; a scale below min_loss_scale stops the run) and an error otherwise;
4. Adam step; lr_scheduler.step_update(n + 1); model.set_num_updates(n + 1).

Runs replay exactly: before every forward the torch generator and the model's mask/negative
generators are seeded from (seed, update, micro-batch slot) and the crop offsets of a batch from
(seed, epoch, batch position); the data order is a function of (seed, epoch); a checkpoint stores the
position of the next batch. So a resumed run computes the same losses, bit for bit, on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repro.config import PREEMPTED_EXIT_CODE, STOP_REQUEST_FILE
from repro.data.batching import StatefulBatchSampler
from repro.tasks.common import LN2, SplitData, TaskHooks  # noqa: F401  (LN2: re-exported)
from repro.train.checkpoint import CheckpointManager, build_checkpoint, capture_rng_state, restore_rng_state
from repro.train.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    effective_update_freq,
)
from repro.train.optim import build_lr_scheduler, build_optimizer
from repro.train.resume import resets_for_resume

log = logging.getLogger(__name__)

# Logged values that are averaged over logging outputs (micro-batches x processes), not summed (§2).
AVERAGED_LOG_KEYS = ("prob_perplexity", "code_perplexity", "temp", "kmeans_loss")
NUM_OUTPUTS = "_num_outputs"
VALID_SEED_TAG = 2**31 - 1  # stands in for the update number when seeding validation forwards


class TrainingDiverged(RuntimeError):
    """Gradients stayed NaN/Inf: the run cannot go on (the message names the update)."""


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends on every part (seed, update, slot, ...), well mixed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# --- fp16 loss scaling ---------------------------------------------------------------------------


class DynamicLossScaler:
    """fairseq's DynamicLossScaler (tolerance 0): halve on overflow, double after `scale_window` clean updates.

    Pure bookkeeping, so it is tested without a GPU. `check_overflow` returns True on a non-finite
    gradient norm (the caller skips the update) and raises TrainingDiverged when the scale would fall
    below `min_loss_scale`, i.e. when NaN/Inf persists whatever the scale.
    """

    def __init__(self, init_scale: float = 128.0, scale_factor: float = 2.0, scale_window: int = 2000,
                 min_loss_scale: float = 1e-4) -> None:
        self.loss_scale = float(init_scale)
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_loss_scale = min_loss_scale
        self._iter = 0
        self._last_overflow_iter = -1
        self._last_rescale_iter = -1

    def check_overflow(self, grad_norm: float, update: int) -> bool:
        if math.isfinite(grad_norm):
            return False
        previous = self.loss_scale
        self._last_overflow_iter = self._iter
        self.loss_scale /= self.scale_factor
        self._last_rescale_iter = self._iter
        if self.loss_scale <= self.min_loss_scale:
            self.loss_scale = previous
            raise TrainingDiverged(
                f"update {update}: the fp16 loss scale would fall below common.min_loss_scale="
                f"{self.min_loss_scale} (gradient norm {grad_norm}); the loss or gradients are NaN/Inf "
                "whatever the scale, so training stops"
            )
        self._iter += 1
        return True

    def update(self) -> None:
        """After a successful optimizer step."""
        if (self._iter - self._last_overflow_iter) % self.scale_window == 0:
            self.loss_scale *= self.scale_factor
            self._last_rescale_iter = self._iter
        self._iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_scale": self.loss_scale, "iter": self._iter,
            "last_overflow_iter": self._last_overflow_iter, "last_rescale_iter": self._last_rescale_iter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_scale = float(state["loss_scale"])
        self._iter = int(state["iter"])
        self._last_overflow_iter = int(state["last_overflow_iter"])
        self._last_rescale_iter = int(state["last_rescale_iter"])


def add_logs(total: dict[str, float], logs: dict[str, Any], weight: float = 1.0) -> None:
    """Accumulate one logging output (sums for counts, sums + count for averaged keys)."""
    for key, value in logs.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        total[key] = total.get(key, 0.0) + weight * float(value)
    total[NUM_OUTPUTS] = total.get(NUM_OUTPUTS, 0.0) + weight


def average_logged_keys(total: dict[str, float]) -> dict[str, float]:
    """Divide the averaged keys by the number of logging outputs they were summed over."""
    outputs = max(total.get(NUM_OUTPUTS, 1.0), 1.0)
    return {key: total[key] / outputs for key in AVERAGED_LOG_KEYS if key in total}


# --- data ---------------------------------------------------------------------------------------


class _BatchKeys(torch.utils.data.Sampler):
    """Yields (epoch, position, global position, indices) keys of the current epoch from a start position on."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int, tuple[int, ...]]] = []

    def __iter__(self) -> Iterator[tuple[int, int, int, tuple[int, ...]]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class _BatchLoading(torch.utils.data.Dataset):
    """Loads and collates one whole batch per key, crop offsets drawn from (seed, epoch, global position).

    The global position is the batch's place in the epoch's order over all ranks, so a batch is
    cropped the same way whichever rank (and however many ranks) loads it.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __getitem__(self, key: tuple[int, int, int, tuple[int, ...]]) -> tuple[int, int, dict]:
        epoch, position, global_position, indices = key
        samples = [self.dataset[int(i)] for i in indices]
        rng = np.random.default_rng([self.seed, epoch, global_position])
        return epoch, position, self.dataset.collater(samples, rng)

    def __len__(self) -> int:  # not used with a sampler of keys
        return 0


def _pass_through(item: Any) -> Any:
    return item


class BatchStream:
    """Iterates this rank's batches epoch after epoch, resumable at (epoch, next position).

    The order is repro.data.batching.StatefulBatchSampler's: batches shuffled from (seed, epoch),
    every world_size-th one for this rank, short shards filled with empty batches ({} after
    collation; the trainer runs them as zero-weight dummies so that all ranks stay in step).
    DataLoader worker processes (dataset.num_workers, persistent) load and collate whole batches;
    the position in the checkpoint is that of the next batch the *trainer* takes, not how far the
    workers have prefetched.
    """

    def __init__(self, data: SplitData, seed: int, num_workers: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, pin_memory: bool = False) -> None:
        self.data = data
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sampler = StatefulBatchSampler(data.batches, seed, shuffle=shuffle, num_shards=world_size,
                                            shard_id=rank)
        self.epoch = 1
        self.next_position = 0  # index into this rank's batches of the epoch
        self._keys = _BatchKeys()
        self._loader = torch.utils.data.DataLoader(
            _BatchLoading(data.dataset, seed), sampler=self._keys, batch_size=None, collate_fn=_pass_through,
            num_workers=num_workers, persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
            pin_memory=pin_memory,  # page-locked batches: the host-to-GPU copy overlaps compute
        )

    def shard_size(self) -> int:
        return len(self.sampler)

    def iterate_epoch(self) -> Iterator[tuple[int, int, dict]]:
        """Yield (epoch, position, batch) for the rest of the current epoch, then advance the epoch."""
        batches = self.sampler.epoch_batches(self.epoch)
        self._keys.keys = [
            (self.epoch, position, position * self.world_size + self.rank, tuple(batch))
            for position, batch in enumerate(batches) if position >= self.next_position
        ]
        if self._keys.keys:
            for epoch, position, batch in self._loader:
                self.next_position = position + 1
                yield epoch, position, batch
        self.epoch += 1
        self.next_position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.next_position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)  # validates the position against this data
        self.epoch = int(state["epoch"])
        self.next_position = int(state["position"])


def iterate_eval_batches(data: SplitData, seed: int, rank: int = 0,
                         world_size: int = 1) -> Iterator[tuple[int, dict]]:
    """Validation batches in order (this rank's share), crop offsets from (seed, position)."""
    for position in range(rank, len(data.batches), world_size):
        samples = [data.dataset[int(i)] for i in data.batches[position]]
        yield position, data.dataset.collater(samples, np.random.default_rng([seed, 0, position]))


def move_to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(move_to_device(item, device) for item in value)
    return value


# --- progress / logging -------------------------------------------------------------------------


class ProgressReporter:
    """tqdm bar on an interactive terminal, JSON lines on stdout otherwise (common.log_format)."""

    def __init__(self, log_format: str | None, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        if log_format is None:
            log_format = "tqdm" if sys.stderr.isatty() else "json"
        if log_format not in ("tqdm", "json", "none", "simple"):
            raise ValueError(f"common.log_format={log_format!r}; choose tqdm, json, simple or none")
        self.log_format = log_format
        self.bar = None
        if enabled and log_format == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, initial=initial, desc="train", unit="upd", file=sys.stderr,
                            dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rounded = {key: (round(value, 6) if isinstance(value, float) else value) for key, value in metrics.items()}
        if self.bar is not None:
            keys = ("loss", "wer", "accuracy", "lr", "gnorm")
            self.bar.set_postfix({k: f"{rounded[k]:.4g}" for k in keys if k in rounded}, refresh=True)
            if split != "train":
                self.bar.write(f"[{split}] update {step}: " + json.dumps(rounded))
        elif self.log_format in ("json", "simple"):
            print(json.dumps({"split": split, "update": step, **rounded}), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_better(value: float, best: float | None, maximize: bool) -> bool:
    if best is None:
        return True
    return value > best if maximize else value < best


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    """Owns the model, optimizer, scheduler, loss scaler, data streams and checkpoints of one stage."""

    def __init__(self, cfg: DictConfig, model: nn.Module, hooks: TaskHooks, train_data: SplitData | None,
                 valid_data: Sequence[SplitData] = (), run_dir: Path | None = None, tracker: Any = None,
                 context: DistributedContext | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.context = context or DistributedContext()
        self.device = self.context.device
        self.tracker = tracker if self.context.is_master else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = int(cfg.common.seed)

        self.model = model.to(self.device)
        self.ddp_model: nn.Module = self.model
        if self.context.is_distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=hooks.find_unused_parameters,
            )
        if cfg.common.get("compile"):
            # the wrapper shares the parameters; state dicts are still taken from self.model
            self.ddp_model = torch.compile(self.ddp_model, backend=str(cfg.common.compile_backend))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optimizer, float(cfg.optimization.lr[0]))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg)

        self.update_freq = effective_update_freq(
            cfg.distributed_training.get("paper_world_size"), self.context.world_size,
            int(cfg.optimization.update_freq[0]),
        )
        self.fp16 = bool(cfg.common.fp16)
        self.bf16 = bool(cfg.common.bf16)
        if self.fp16 and self.bf16:
            raise ValueError("common.fp16 and common.bf16 are both set; choose one")
        scale_window = cfg.common.fp16_scale_window
        if scale_window is None:
            scale_window = max(1, int(2**14 / self.context.world_size / self.update_freq))
        self.scaler = DynamicLossScaler(
            init_scale=float(cfg.common.fp16_init_scale), scale_window=int(scale_window),
            min_loss_scale=float(cfg.common.min_loss_scale),
        ) if self.fp16 else None
        if self.fp16 and self.device.type != "cuda":
            log.warning("common.fp16 on CPU: computing in float32, loss scaling still applied")

        self.num_updates = 0
        self._dummy_batch: dict | None = None
        self.best_metric: float | None = None
        self.wall_offset = 0.0
        self.train_stream = None
        if train_data is not None:
            self.train_stream = BatchStream(
                train_data, self.seed, int(cfg.dataset.num_workers), self.context.rank, self.context.world_size,
                pin_memory=self.device.type == "cuda",
            )
        self.valid_data = list(valid_data)
        self.checkpoints = None
        if self.run_dir is not None:
            self.checkpoints = CheckpointManager(
                self.run_dir / cfg.checkpoint.save_dir, int(cfg.checkpoint.keep_interval_updates),
                enabled=self.context.is_master and not cfg.checkpoint.no_save,
            )
        self._set_model_updates(0)

    # -- helpers --

    def _set_model_updates(self, num_updates: int) -> None:
        if hasattr(self.model, "set_num_updates"):
            self.model.set_num_updates(num_updates)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and (self.fp16 or self.bf16):
            return torch.autocast("cuda", dtype=torch.float16 if self.fp16 else torch.bfloat16)
        if self.device.type == "cpu" and self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _seed_forward(self, update: int, slot: int) -> None:
        """Dropout/LayerDrop (torch generator) and masks/negatives (model generators) of one micro-batch."""
        seed = derive_seed(self.seed, update, slot)
        torch.manual_seed(seed)
        if hasattr(self.model, "set_rng_seed"):
            self.model.set_rng_seed(seed)

    def get_lr(self) -> float:
        return self.lr_scheduler.get_lr()

    # -- one update --

    def train_step(self, micro_batches: Sequence[dict]) -> dict[str, float] | None:
        """Forward/backward over the micro-batches and one optimizer step.

        Returns the summed logging outputs (plus gnorm, lr, loss_scale), or None when an fp16
        overflow skipped the update.
        """
        self.ddp_model.train()
        update = self.num_updates  # finished updates before this one
        lr = self.get_lr()
        totals: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            is_dummy = not batch  # an empty shard filler: run a real batch with weight 0 (fairseq)
            if is_dummy:
                if self._dummy_batch is None:
                    raise RuntimeError("an empty batch arrived before any real batch (dataset too small?)")
                batch = self._dummy_batch
            elif self._dummy_batch is None:
                self._dummy_batch = batch
            batch = move_to_device(batch, self.device)
            # micro-batch slot within the update, numbered across processes so that (world 2, uf 1)
            # and (world 1, uf 2) draw the same masks for the same global batch
            self._seed_forward(update, index * self.context.world_size + self.context.rank)
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.context.is_distributed else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    loss, logs = self.hooks.compute_loss(self.ddp_model, batch)
                if is_dummy:
                    loss = loss * 0.0
                if self.scaler is not None:
                    loss = loss * self.scaler.loss_scale
                loss.backward()
            # a dummy contributes zeros (same keys on every rank, so the all-reduce below lines up)
            add_logs(totals, logs, weight=0.0 if is_dummy else 1.0)

        keys = sorted(totals)
        totals = dict(zip(keys, all_reduce_sum([totals[k] for k in keys], self.context)))
        sample_size = totals.get("sample_size", 0.0)
        # DDP averaged over processes; undo that and normalize by the summed sample_size (§2, §5).
        multiplier = self.context.world_size / (sample_size or 1.0)
        if self.scaler is not None:
            multiplier /= self.scaler.loss_scale
        grads = [p.grad for p in self.params if p.grad is not None]
        for grad in grads:
            grad.mul_(multiplier)
        grad_norm = clip_grad_norm(grads, float(self.cfg.optimization.clip_norm))

        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                raise TrainingDiverged(f"update {update + 1}: gradients are NaN/Inf (gradient norm {grad_norm})")
            self.scaler.check_overflow(grad_norm, update + 1)
            log.info("update %d: gradient overflow, update skipped, loss scale now %g",
                     update + 1, self.scaler.loss_scale)
            return None

        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates = update + 1
        self.lr_scheduler.step_update(self.num_updates)
        self._set_model_updates(self.num_updates)
        if self.scaler is not None:
            self.scaler.update()
        totals["gnorm"] = grad_norm
        totals["lr"] = lr
        if self.scaler is not None:
            totals["loss_scale"] = self.scaler.loss_scale
        return totals

    # -- validation --

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Metrics over every valid subset summed together (fairseq reports per subset; we use the first
        subset for the best checkpoint and log others under their names)."""
        if not self.valid_data or self.hooks.valid_batch is None or self.hooks.reduce_valid is None:
            return None
        self.model.eval()
        first = None
        for data in self.valid_data:
            totals: dict[str, float] = {}
            for position, batch in iterate_eval_batches(data, self.seed, self.context.rank, self.context.world_size):
                batch = move_to_device(batch, self.device)
                self._seed_forward(VALID_SEED_TAG, position)  # validation masks do not depend on the update
                with self._autocast():
                    add_logs(totals, self.hooks.valid_batch(self.model, batch))
            keys = sorted(totals)
            totals = dict(zip(keys, all_reduce_sum([totals[k] for k in keys], self.context)))
            metrics = self.hooks.reduce_valid(totals)
            metrics.update(average_logged_keys(totals))
            split = "valid" if first is None else f"valid_{data.name}"
            self._log(split, metrics)
            if first is None:
                first = metrics
        self.model.train()
        return first

    # -- checkpoints --

    def state_dict(self) -> dict[str, Any]:
        rng_states = all_gather_objects(capture_rng_state(), self.context)
        train_state = {
            "num_updates": self.num_updates,
            "epoch": self.train_stream.epoch if self.train_stream else 1,
            "sampler": self.train_stream.state_dict() if self.train_stream else {"epoch": 1, "position": 0},
            "optimizer": self.optimizer.state_dict() if self.cfg.checkpoint.save_optimizer_state else None,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_states,
            "best_metric": self.best_metric,
            "best_checkpoint_metric": str(self.cfg.checkpoint.best_checkpoint_metric),
            "wall": self.wall_offset + (time.time() - self._start_time if hasattr(self, "_start_time") else 0.0),
            "world_size": self.context.world_size,
            "tracker_run_ids": dict(self.tracker.run_ids()) if self.tracker is not None else {},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        return build_checkpoint(
            kind=self.hooks.kind, model_state={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            model_cfg=self.hooks.model_cfg, task_cfg=self.hooks.task_cfg, dictionary=self.hooks.dictionary,
            train_state=train_state,
        )

    def load_state_dict(self, checkpoint: dict[str, Any], resets: frozenset[str] = frozenset()) -> None:
        """Restore the model and the training state, except the parts named in `resets` (fairseq's
        checkpoint.reset_* names, decided by repro.train.resume)."""
        self.model.load_state_dict(checkpoint["model"], strict=True)
        state = checkpoint["train_state"]
        if "reset_optimizer" in resets:
            log.warning("checkpoint.reset_optimizer: Adam moments and the loss scale restart")
        elif state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            log.warning("checkpoint has no optimizer state (save_optimizer_state=false): Adam moments restart")
        if self.scaler is not None and state.get("loss_scaler") is not None and "reset_optimizer" not in resets:
            self.scaler.load_state_dict(state["loss_scaler"])
        self.num_updates = int(state["num_updates"])
        if "reset_lr_scheduler" in resets:
            self.lr_scheduler.step_update(self.num_updates)  # the new schedule, from the current update on
        else:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._set_model_updates(self.num_updates)
        if self.train_stream is not None and "reset_dataloader" not in resets:
            self.train_stream.load_state_dict(state["sampler"])
        if "reset_meters" not in resets:
            self.best_metric = state.get("best_metric")
            self.wall_offset = float(state.get("wall", 0.0))
        rng_states = state["rng"]
        if int(state.get("world_size", 1)) == self.context.world_size and len(rng_states) > self.context.rank:
            restore_rng_state(rng_states[self.context.rank])
        else:
            log.warning("checkpoint was written by %s processes, this run has %d: RNG states not restored",
                        state.get("world_size"), self.context.world_size)

    def resume(self, preloaded: tuple[dict[str, Any], Path] | None = None) -> bool:
        """Load the newest usable checkpoint of the run directory, if any (every rank reads it).

        `preloaded` is what CheckpointManager.load_latest returned to a caller that needed the
        checkpoint before building the model (fine-tuning takes the architecture from it).
        """
        if self.run_dir is None:
            return False
        found = preloaded
        if found is None:
            manager = CheckpointManager(self.run_dir / self.cfg.checkpoint.save_dir)
            found = manager.load_latest(expected_kind=self.hooks.kind)
        if found is None:
            return False
        checkpoint, path = found
        resets = resets_for_resume(checkpoint["train_state"].get("config"),
                                   OmegaConf.to_container(self.cfg, resolve=True), str(path))
        self.load_state_dict(checkpoint, resets)
        log.info("resumed from %s at update %d (epoch %d)", path, self.num_updates,
                 checkpoint["train_state"]["epoch"])
        if self.context.is_master:
            print(f"repro: resumed from {path} at update {self.num_updates}", file=sys.stderr, flush=True)
        return True

    def save_checkpoint(self, interval: bool, best: bool) -> None:
        if self.checkpoints is None:
            return
        checkpoint = self.state_dict()  # every rank takes part (RNG states are gathered)
        if self.context.is_master:
            epoch = self.train_stream.epoch if self.train_stream else 1
            self.checkpoints.save(checkpoint, epoch, self.num_updates, interval=interval, best=best)
        self.context.barrier()

    # -- the loop --

    def _log(self, split: str, metrics: dict[str, float]) -> None:
        if not self.context.is_master:
            return
        self.progress.report(split, self.num_updates, metrics)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.num_updates, split=split)

    def _done(self) -> bool:
        max_update = int(self.cfg.optimization.max_update)
        max_epoch = int(self.cfg.optimization.max_epoch)
        if max_update > 0 and self.num_updates >= max_update:
            return True
        if max_epoch > 0 and self.train_stream is not None and self.train_stream.epoch > max_epoch:
            return True
        stop_min_lr = float(self.cfg.optimization.stop_min_lr)
        return self.num_updates > 0 and self.get_lr() <= stop_min_lr

    def _validate_and_save(self, interval: bool, force_validation: bool) -> None:
        dataset_cfg = self.cfg.dataset
        every = int(dataset_cfg.validate_interval_updates)
        validate = not dataset_cfg.disable_validation and self.num_updates >= int(dataset_cfg.validate_after_updates) and (
            force_validation or (every > 0 and self.num_updates % every == 0)
        )
        best = False
        if validate:
            metrics = self.validate()
            metric_name = str(self.cfg.checkpoint.best_checkpoint_metric)
            if metrics is not None:
                if metric_name not in metrics:
                    raise KeyError(f"checkpoint.best_checkpoint_metric={metric_name!r} is not among the "
                                   f"validation metrics {sorted(metrics)}")
                value = float(metrics[metric_name])
                best = _is_better(value, self.best_metric, bool(self.cfg.checkpoint.maximize_best_checkpoint_metric))
                if best:
                    self.best_metric = value
        if interval or validate or force_validation:
            self.save_checkpoint(interval=interval, best=best)

    def fit(self, preloaded: tuple[dict[str, Any], Path] | None = None) -> dict[str, float] | None:
        """Train until max_update / max_epoch / stop_min_lr, resuming from the run directory if possible."""
        if self.train_stream is None:
            raise ValueError("Trainer.fit needs training data")
        max_update = int(self.cfg.optimization.max_update)
        if max_update <= 0 and int(self.cfg.optimization.max_epoch) <= 0:
            raise ValueError("set optimization.max_update or optimization.max_epoch (both are 0)")
        self.resume(preloaded)
        self._start_time = time.time()
        if self._done():
            log.info("training already finished (update %d); nothing to do", self.num_updates)
            if self.checkpoints is not None and self.context.is_master:
                self.checkpoints.ensure_best()
            return None
        self.progress = ProgressReporter(self.cfg.common.log_format, max_update, self.num_updates,
                                         self.context.is_master)
        log_interval = max(1, int(self.cfg.common.log_interval))
        save_interval = int(self.cfg.checkpoint.save_interval_updates)
        interval_totals: dict[str, float] = defaultdict(float)
        interval_updates, interval_start = 0, time.time()
        last_valid = None
        try:
            while not self._done():
                if self.train_stream.shard_size() == 0:
                    raise ValueError(f"no training batches for rank {self.context.rank} (dataset too small for "
                                     f"{self.context.world_size} processes?)")
                pending: list[dict] = []
                epoch_batches = self.train_stream.iterate_epoch()
                for _, position, batch in epoch_batches:
                    pending.append(batch)
                    end_of_epoch = position + 1 == self.train_stream.shard_size()
                    if len(pending) < self.update_freq and not end_of_epoch:
                        continue
                    totals = self.train_step(pending)
                    pending = []
                    if totals is None:  # fp16 overflow: skipped, the next batches retry
                        continue
                    self.progress.advance()
                    for key, value in totals.items():
                        interval_totals[key] += value
                    interval_updates += 1
                    if self.num_updates % log_interval == 0:
                        elapsed = max(time.time() - interval_start, 1e-9)
                        self._log("train", self._train_metrics(interval_totals, interval_updates, elapsed, totals))
                        interval_totals, interval_updates, interval_start = defaultdict(float), 0, time.time()
                    interval = save_interval > 0 and self.num_updates % save_interval == 0
                    if self._done():
                        break
                    self._validate_and_save(interval=interval, force_validation=False)
                    self._stop_if_requested()
                if self._done():
                    epoch_batches.close()
                    break
                # end of an epoch: remember it in checkpoint_last (fairseq saves at every epoch end)
                self.save_checkpoint(interval=False, best=False)
            interval = save_interval > 0 and self.num_updates % save_interval == 0
            last_valid = self._final_validation_and_save(interval)
        finally:
            self.progress.close()
        return last_valid

    def _stop_if_requested(self) -> None:
        """Save checkpoint_last and exit when the job is being preempted.

        The SLURM launcher (repro.launch.preemption) turns the warning signal into the file
        `<run_dir>/STOP_REQUESTED`; every rank agrees on it so all stop after the same update.
        """
        requested = self.run_dir is not None and (self.run_dir / STOP_REQUEST_FILE).exists()
        if all_reduce_sum([float(requested)], self.context)[0] > 0:
            self.save_checkpoint(interval=False, best=False)
            log.warning("stop requested: saved checkpoint_last at update %d; exiting to be requeued", self.num_updates)
            sys.exit(PREEMPTED_EXIT_CODE)

    def _final_validation_and_save(self, interval: bool) -> dict[str, float] | None:
        metrics = None
        best = False
        if not self.cfg.dataset.disable_validation:
            metrics = self.validate()
            if metrics is not None:
                value = float(metrics[str(self.cfg.checkpoint.best_checkpoint_metric)])
                best = _is_better(value, self.best_metric, bool(self.cfg.checkpoint.maximize_best_checkpoint_metric))
                if best:
                    self.best_metric = value
        self.save_checkpoint(interval=interval, best=best)
        if self.checkpoints is not None and self.context.is_master:
            self.checkpoints.ensure_best()
        return metrics

    def _train_metrics(self, totals: dict[str, float], updates: int, elapsed: float,
                       last: dict[str, float]) -> dict[str, float]:
        metrics = self.hooks.reduce_train(totals)
        metrics.update(average_logged_keys(totals))
        metrics["gnorm"] = totals["gnorm"] / max(updates, 1)
        metrics["lr"] = last["lr"]
        if self.scaler is not None:
            metrics["loss_scale"] = self.scaler.loss_scale
        metrics["wps"] = totals.get("ntokens", 0.0) / elapsed
        metrics["ups"] = updates / elapsed
        metrics["wall"] = self.wall_offset + time.time() - self._start_time
        return metrics


def clip_grad_norm(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """L2 norm of all gradients (fp32); scale them down to max_norm when max_norm > 0 (fairseq's
    clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1)."""
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.dtype))
    return float(norm)
