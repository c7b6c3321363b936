"""fairseq's Adam and the learning-rate schedules (fairseq_spec.md §5, Trap 13)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from repro.config import ReproConfig
from repro.train.optim import (
    FairseqAdam,
    LrScheduler,
    build_lr_scheduler,
    cosine_lr,
    make_lr_function,
    polynomial_decay_lr,
    tri_stage_lr,
    tri_stage_phases,
)


def reference_fairseq_adam(params, grads, lr, betas, eps, weight_decay):
    """fairseq/optim/adam.py written out in float64 numpy, step by step."""
    p = params.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    history = []
    for step, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        denom = np.sqrt(v) + eps
        step_size = lr * math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)
        p = p - weight_decay * lr * p
        p = p - step_size * m / denom
        history.append(p.copy())
    return history


def run_torch_optimizer(optimizer_cls, params0, grads, **kwargs):
    param = torch.nn.Parameter(torch.tensor(params0, dtype=torch.float32))
    optimizer = optimizer_cls([param], **kwargs)
    history = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float32)
        optimizer.step()
        history.append(param.detach().double().numpy().copy())
    return history


def test_adam_matches_handwritten_fairseq_formula():
    rng = np.random.default_rng(0)
    params0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) * 10.0 ** rng.uniform(-4, 0) for _ in range(6)]
    kwargs = {"lr": 5e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01}
    ours = run_torch_optimizer(FairseqAdam, params0, grads, **kwargs)
    reference = reference_fairseq_adam(params0, grads, **kwargs)
    for step, (got, want) in enumerate(zip(ours, reference), start=1):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    # the parameters did move (the test is not vacuous)
    assert np.abs(ours[-1] - params0).max() > 1e-3


def test_adam_differs_from_torch_adamw_where_eps_matters():
    # tiny gradients: sqrt(v) is comparable to eps, so where eps enters the formula shows
    params0 = np.ones(8)
    grads = [np.full(8, 1e-4)] * 3
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-4, "weight_decay": 0.0}
    ours = run_torch_optimizer(FairseqAdam, params0, grads, **kwargs)
    adamw = run_torch_optimizer(torch.optim.AdamW, params0, grads, **kwargs)
    reference = reference_fairseq_adam(params0, grads, **kwargs)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-6)
    # first step: fairseq's update is lr * sqrt(bc2)/bc1 * m/(sqrt(v)+eps); AdamW's lr/bc1 * m/(sqrt(v/bc2)+eps)
    fairseq_step = 1 - ours[0][0]
    adamw_step = 1 - adamw[0][0]
    bc2 = 1 - 0.98
    expected_fairseq = 1e-2 * math.sqrt(bc2) / 0.1 * (0.1 * 1e-4) / (math.sqrt(bc2) * 1e-4 + 1e-4)
    assert fairseq_step == pytest.approx(expected_fairseq, rel=1e-5)
    assert abs(fairseq_step - adamw_step) > 0.5 * adamw_step  # several-fold different effective eps


def test_weight_decay_is_decoupled_and_applies_with_zero_gradient():
    params0 = np.full(4, 2.0)
    ours = run_torch_optimizer(FairseqAdam, params0, [np.zeros(4)], lr=0.1, weight_decay=0.5, eps=1e-8)
    np.testing.assert_allclose(ours[0], params0 * (1 - 0.1 * 0.5), rtol=1e-6)


def test_polynomial_decay_boundaries():
    peak, warmup, total = 5e-4, 10, 110
    assert polynomial_decay_lr(0, peak, warmup, total) == 0.0
    assert polynomial_decay_lr(5, peak, warmup, total) == pytest.approx(peak / 2)
    assert polynomial_decay_lr(warmup, peak, warmup, total) == pytest.approx(peak)
    assert polynomial_decay_lr(60, peak, warmup, total) == pytest.approx(peak / 2)
    assert polynomial_decay_lr(total, peak, warmup, total, end_learning_rate=1e-6) == 1e-6
    assert polynomial_decay_lr(500, peak, warmup, total) == 0.0
    assert polynomial_decay_lr(60, peak, warmup, total, power=2.0) == pytest.approx(peak / 4)


def test_tri_stage_boundaries():
    peak, max_update = 1e-3, 1000
    warmup, hold, decay = tri_stage_phases(max_update, [0.1, 0.4, 0.5])
    assert (warmup, hold, decay) == (100, 400, 500)

    def lr(n):
        return tri_stage_lr(n, peak, warmup, hold, decay, init_lr_scale=0.01, final_lr_scale=0.05)

    assert lr(0) == pytest.approx(0.01 * peak)
    assert lr(50) == pytest.approx(0.01 * peak + (peak - 0.01 * peak) * 0.5)
    assert lr(100) == pytest.approx(peak)
    assert lr(499) == pytest.approx(peak)
    assert lr(500) == pytest.approx(peak)  # first decay step: exp(0)
    assert lr(750) == pytest.approx(peak * math.sqrt(0.05))
    assert lr(1000) == pytest.approx(0.05 * peak)
    assert lr(5000) == pytest.approx(0.05 * peak)
    # int truncation of the phases, as fairseq
    assert tri_stage_phases(13, [0.1, 0.4, 0.5]) == (1, 5, 6)


def test_cosine_boundaries():
    max_lr, min_lr, warmup, init, period = 5e-3, 1e-6, 500, 1e-7, 1000

    def lr(n):
        return cosine_lr(n, max_lr, min_lr, warmup, init, period, lr_shrink=0.1)

    assert lr(0) == pytest.approx(init)
    assert lr(250) == pytest.approx(init + (max_lr - init) / 2)
    assert lr(500) == pytest.approx(max_lr)
    assert lr(1000) == pytest.approx((max_lr + min_lr) / 2)
    assert lr(1499) == pytest.approx(min_lr, abs=1e-7)
    # second period restarts at the shrunk maximum
    assert lr(1500) == pytest.approx(0.1 * max_lr)
    assert lr(2000) == pytest.approx(0.1 * (max_lr + min_lr) / 2)


def _cfg(**scheduler):
    cfg = OmegaConf.structured(ReproConfig)
    return OmegaConf.merge(cfg, {"optimization": {"lr": [2e-3], "max_update": 100}, "lr_scheduler": scheduler})


@pytest.mark.parametrize("name", ["polynomial_decay", "tri_stage", "cosine", "fixed"])
def test_update_k_runs_with_lr_of_k_minus_1(name):
    cfg = _cfg(_name=name, warmup_updates=10)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = FairseqAdam([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, cfg)
    function = make_lr_function(cfg.lr_scheduler, 2e-3, 100)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(function(0))  # update 1 uses lr(0)
    for finished in range(1, 30):
        scheduler.step_update(finished)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(function(finished))
    restored = LrScheduler(FairseqAdam([param], lr=1.0), function)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_lr() == scheduler.get_lr()


def test_fixed_warmup_and_unknown_scheduler():
    assert make_lr_function(_cfg(_name="fixed", warmup_updates=0).lr_scheduler, 1e-3, 100)(0) == 1e-3
    with pytest.raises(ValueError, match="inverse_sqrt"):
        make_lr_function(_cfg(_name="inverse_sqrt").lr_scheduler, 1e-3, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_adam_equals_the_per_parameter_loop(dtype):
    """The multi-tensor update is the same arithmetic: equal to the loop (to 1e-6) on every step,
    with weight decay, a parameter without gradient, one that joins late, and low-precision params."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 5), (1,), (128,)]
    initial = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    runs = {}
    for foreach in (False, True):
        params = [torch.nn.Parameter(value.clone()) for value in initial]
        optimizer = FairseqAdam(params, lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, foreach=foreach)
        grads_generator = torch.Generator().manual_seed(1)
        history = []
        for step in range(5):
            for index, param in enumerate(params):
                skipped = index == 3 and step < 2  # no gradient at first, then it joins (its own step count)
                grad = torch.randn(param.shape, generator=grads_generator).to(dtype)
                param.grad = None if skipped else grad
            optimizer.step()
            history.append([param.detach().float().clone() for param in params])
        runs[foreach] = (history, optimizer)
    for step, (loop_params, foreach_params) in enumerate(zip(runs[False][0], runs[True][0])):
        for index, (a, b) in enumerate(zip(loop_params, foreach_params)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"step {step} param {index}")
    moved = (runs[True][0][-1][0] - initial[0].float()).abs().max()
    assert moved > 1e-3  # not vacuous
    loop_state, foreach_state = runs[False][1].state_dict(), runs[True][1].state_dict()
    assert [s["step"] for s in loop_state["state"].values()] == [s["step"] for s in foreach_state["state"].values()]
    assert loop_state["state"][3]["step"] == 3
