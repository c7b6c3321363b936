"""fairseq's Adam and learning-rate schedules (fairseq_spec.md §5).

The schedules are pure functions of the update number so that tests can compare them with
closed-form values and a resumed run needs nothing but the update count to continue the curve.
`LrScheduler` is the small stateful wrapper the trainer steps: update k (1-based) runs with
lr(k - 1), because fairseq calls `step_update(0)` when it builds the optimizer and
`step_update(n + 1)` after every successful update (Trap 13).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from omegaconf import DictConfig


class FairseqAdam(torch.optim.Optimizer):
    """Adam as fairseq implements it (`fairseq/optim/adam.py`).

    Differences from `torch.optim.AdamW`, all kept on purpose:
    - eps is added to sqrt(v) *before* the bias correction of the step size, so the effective eps
      is eps / sqrt(1 - beta2^t) in AdamW's terms;
    - weight decay is decoupled (`p -= weight_decay * lr * p`) and applies to every parameter,
      biases, LayerNorm and codebooks included (the caller passes all parameters in one group);
    - moments are kept in float32 whatever the parameter dtype.

    `foreach=True` runs each op over all parameters at once (torch._foreach_*), `False` parameter by
    parameter, `None` (default) picks foreach on CUDA: there it saves a kernel launch per op and
    parameter; on CPU the loop keeps each tensor in cache across its ops and measured as fast or
    faster (benchmarks/bench_adam.py).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"FairseqAdam: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FairseqAdam: betas must lie in [0, 1) (got {betas})")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if any(param.grad.is_sparse for param in params):
                raise RuntimeError("FairseqAdam does not support sparse gradients")
            for param in params:
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
            if not params:
                continue
            foreach = self.foreach if self.foreach is not None else params[0].is_cuda
            if foreach:
                self._update_foreach(group, params)
            else:
                for param in params:
                    self._update_one(group, param)
        return loss

    def _step_size(self, group: dict[str, Any], step: int) -> float:
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)

    def _update_one(self, group: dict[str, Any], param: torch.Tensor) -> None:
        """The reference update of one parameter (fairseq/optim/adam.py), one op at a time."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[param]
        grad = param.grad.float()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        param_fp32 = param.float() if param.dtype != torch.float32 else param
        if weight_decay != 0:
            param_fp32.add_(param_fp32, alpha=-weight_decay * lr)
        param_fp32.addcdiv_(exp_avg, denom, value=-self._step_size(group, state["step"]))
        if param_fp32 is not param:
            param.copy_(param_fp32)

    def _update_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The same update as `_update_one`, op for op, over all parameters at once (torch._foreach_*):
        one kernel launch per op instead of one per op and parameter."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        states = [self.state[param] for param in params]
        grads = [param.grad.float() for param in params]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        params_fp32 = [param.float() if param.dtype != torch.float32 else param for param in params]
        if weight_decay != 0:
            torch._foreach_add_(params_fp32, params_fp32, alpha=-weight_decay * lr)
        step_sizes = [-self._step_size(group, state["step"]) for state in states]
        torch._foreach_addcdiv_(params_fp32, exp_avgs, denoms, step_sizes)
        for param, param_fp32 in zip(params, params_fp32):
            if param_fp32 is not param:
                param.copy_(param_fp32)


def build_optimizer(params: Iterable[torch.Tensor], optimizer_cfg: DictConfig, lr: float) -> FairseqAdam:
    """Adam from the `optimizer` config group (only fairseq's Adam is used by the papers)."""
    if optimizer_cfg._name != "adam":
        raise ValueError(f"optimizer._name={optimizer_cfg._name!r} is not supported (only 'adam')")
    betas = tuple(float(b) for b in optimizer_cfg.adam_betas)
    if len(betas) != 2:
        raise ValueError(f"optimizer.adam_betas must have two values, got {list(betas)}")
    return FairseqAdam(
        params, lr=lr, betas=betas, eps=float(optimizer_cfg.adam_eps), weight_decay=float(optimizer_cfg.weight_decay),
        foreach=None if optimizer_cfg.foreach is None else bool(optimizer_cfg.foreach),
    )


# --- schedules: pure functions of the number of finished updates ---------------------------------


def polynomial_decay_lr(
    num_updates: int, peak_lr: float, warmup_updates: int, total_num_update: int,
    end_learning_rate: float = 0.0, power: float = 1.0,
) -> float:
    """Linear warmup from 0, then polynomial decay to `end_learning_rate` at `total_num_update`."""
    if warmup_updates > 0 and num_updates <= warmup_updates:
        return peak_lr * num_updates / warmup_updates
    if num_updates >= total_num_update:
        return end_learning_rate
    remaining = 1.0 - (num_updates - warmup_updates) / (total_num_update - warmup_updates)
    return (peak_lr - end_learning_rate) * remaining**power + end_learning_rate


def tri_stage_phases(max_update: int, phase_ratio: list[float]) -> tuple[int, int, int]:
    """(warmup, hold, decay) update counts: fractions of max_update, truncated as fairseq does."""
    if len(phase_ratio) != 3 or abs(sum(phase_ratio) - 1.0) > 1e-6:
        raise ValueError(f"lr_scheduler.phase_ratio must be three fractions summing to 1, got {list(phase_ratio)}")
    warmup, hold, decay = (int(max_update * ratio) for ratio in phase_ratio)
    return warmup, hold, decay


def tri_stage_lr(
    num_updates: int, peak_lr: float, warmup_steps: int, hold_steps: int, decay_steps: int,
    init_lr_scale: float = 0.01, final_lr_scale: float = 0.05,
) -> float:
    """Linear warmup from init_lr_scale*peak, hold, exponential decay to final_lr_scale*peak, constant."""
    init_lr = init_lr_scale * peak_lr
    final_lr = final_lr_scale * peak_lr
    if num_updates < warmup_steps:
        return init_lr + (peak_lr - init_lr) / warmup_steps * num_updates
    offset = warmup_steps
    if num_updates < offset + hold_steps:
        return peak_lr
    offset += hold_steps
    if num_updates <= offset + decay_steps:
        decay_factor = -math.log(final_lr_scale) / decay_steps if decay_steps > 0 else 0.0
        return peak_lr * math.exp(-decay_factor * (num_updates - offset))
    return final_lr


def cosine_lr(
    num_updates: int, max_lr: float, min_lr: float, warmup_updates: int, warmup_init_lr: float,
    period_updates: int, lr_shrink: float = 0.1,
) -> float:
    """wav2vec v1's schedule: linear warmup_init_lr -> max_lr, then cosine periods shrunk by lr_shrink^i."""
    if num_updates < warmup_updates:
        return warmup_init_lr + num_updates * (max_lr - warmup_init_lr) / warmup_updates
    since_warmup = num_updates - warmup_updates
    period_index = math.floor(since_warmup / period_updates)
    in_period = since_warmup - period_updates * period_index
    shrink = lr_shrink**period_index
    low, high = min_lr * shrink, max_lr * shrink
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * in_period / period_updates))


def fixed_lr(num_updates: int, peak_lr: float, warmup_updates: int = 0) -> float:
    """Constant learning rate, with fairseq's optional linear warmup from 0."""
    if warmup_updates > 0 and num_updates <= warmup_updates:
        return peak_lr * num_updates / warmup_updates
    return peak_lr


def make_lr_function(scheduler_cfg: DictConfig, peak_lr: float, max_update: int) -> Callable[[int], float]:
    """Bind the `lr_scheduler` config group to one of the pure schedules above."""
    name = scheduler_cfg._name
    if name == "polynomial_decay":
        total = scheduler_cfg.total_num_update or max_update
        if total <= 0:
            raise ValueError("polynomial_decay needs lr_scheduler.total_num_update or optimization.max_update > 0")
        return lambda n: polynomial_decay_lr(
            n, peak_lr, int(scheduler_cfg.warmup_updates), int(total),
            float(scheduler_cfg.end_learning_rate), float(scheduler_cfg.power),
        )
    if name == "tri_stage":
        if scheduler_cfg.phase_ratio is None:
            raise ValueError("tri_stage needs lr_scheduler.phase_ratio (three fractions of max_update)")
        if max_update <= 0:
            raise ValueError("tri_stage needs optimization.max_update > 0")
        warmup, hold, decay = tri_stage_phases(max_update, list(scheduler_cfg.phase_ratio))
        return lambda n: tri_stage_lr(
            n, peak_lr, warmup, hold, decay, float(scheduler_cfg.init_lr_scale), float(scheduler_cfg.final_lr_scale)
        )
    if name == "cosine":
        warmup = int(scheduler_cfg.warmup_updates)
        period = scheduler_cfg.lr_period_updates or (max_update - warmup)
        if period <= 0:
            raise ValueError("cosine needs lr_scheduler.lr_period_updates or max_update > warmup_updates")
        min_lr = float(scheduler_cfg.min_lr)
        warmup_init_lr = float(scheduler_cfg.warmup_init_lr)
        if warmup_init_lr < 0:
            warmup_init_lr = min_lr  # fairseq: a negative warmup_init_lr means "start from min_lr"
        return lambda n: cosine_lr(
            n, peak_lr, min_lr, warmup, warmup_init_lr, int(period), float(scheduler_cfg.lr_shrink)
        )
    if name == "fixed":
        return lambda n: fixed_lr(n, peak_lr, int(scheduler_cfg.warmup_updates))
    raise ValueError(
        f"lr_scheduler._name={name!r} is not supported; choose polynomial_decay, tri_stage, cosine or fixed"
    )


class LrScheduler:
    """Sets the optimizer's learning rate from a pure schedule; its only state is the update count."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_function: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.lr_function = lr_function
        self.num_updates = 0
        self.step_update(0)

    def step_update(self, num_updates: int) -> float:
        """Called with the number of finished updates; the next update runs with the returned lr."""
        self.num_updates = num_updates
        lr = self.lr_function(num_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_update(int(state["num_updates"]))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> LrScheduler:
    """Scheduler for the whole config (`lr_scheduler`, `optimization.lr`, `optimization.max_update`)."""
    peak_lr = float(cfg.optimization.lr[0])
    lr_function = make_lr_function(cfg.lr_scheduler, peak_lr, int(cfg.optimization.max_update))
    return LrScheduler(optimizer, lr_function)
