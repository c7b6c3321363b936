"""The update step on a toy regression model: accumulation, loss scaling, overflow handling, divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from repro.config import ReproConfig
from repro.train.trainer import LN2, DynamicLossScaler, SplitData, TaskHooks, Trainer, TrainingDiverged


class ToyDataset:
    def __init__(self, count: int = 64, dim: int = 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = torch.tensor(rng.standard_normal((count, dim)), dtype=torch.float32)
        self.y = self.x @ torch.arange(1.0, dim + 1.0) + 0.1 * torch.tensor(rng.standard_normal(count),
                                                                             dtype=torch.float32)

    def __getitem__(self, index: int) -> dict:
        return {"id": index, "x": self.x[index], "y": self.y[index]}

    def collater(self, samples, rng) -> dict:
        if not samples:
            return {}
        return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples])}


class ToyModel(nn.Module):
    """Linear regression; `poison_from` makes the output NaN from that many finished updates on."""

    def __init__(self, dim: int = 6, poison_from: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(dim, 1)
        self.poison_from = poison_from
        self.num_updates = 0

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x).squeeze(-1)
        if self.poison_from is not None and self.num_updates >= self.poison_from:
            out = out * float("nan")
        return out


def squared_error(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).sum()
    return loss, {"loss": float(loss.detach()), "sample_size": float(len(batch["y"])), "ntokens": float(len(batch["y"]))}


HOOKS = TaskHooks(kind="wav2vec2", compute_loss=squared_error,
                  reduce_train=lambda t: {"loss": t["loss"] / t["sample_size"] / LN2})


def toy_cfg(**overrides):
    base = {
        "common": {"seed": 1, "cpu": True, "log_interval": 1, "log_format": "none"},
        "optimization": {"lr": [0.05], "max_update": 10, "clip_norm": 1.0},
        "optimizer": {"weight_decay": 0.01, "adam_eps": 1e-8},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 2},
        "dataset": {"num_workers": 0, "disable_validation": True},
        "tracker": {"backends": []},
    }
    return OmegaConf.merge(OmegaConf.structured(ReproConfig), base, overrides)


def batches_of(dataset, size):
    return [dataset.collater([dataset[i] for i in range(start, start + size)], None)
            for start in range(0, 64, size)]


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_update_freq_4_equals_a_4x_batch():
    dataset = ToyDataset()
    accumulated = Trainer(toy_cfg(optimization={"update_freq": [4]}), ToyModel(), HOOKS, None)
    big = Trainer(toy_cfg(), ToyModel(), HOOKS, None)
    small_batches, big_batches = batches_of(dataset, 4), batches_of(dataset, 16)
    for update in range(4):
        logs_small = accumulated.train_step(small_batches[4 * update: 4 * update + 4])
        logs_big = big.train_step([big_batches[update]])
        assert logs_small["sample_size"] == logs_big["sample_size"] == 16
        assert logs_small["gnorm"] == pytest.approx(logs_big["gnorm"], rel=1e-5)
    torch.testing.assert_close(params(accumulated.model), params(big.model), rtol=1e-5, atol=1e-6)
    assert accumulated.num_updates == big.num_updates == 4
    assert not torch.allclose(params(big.model), params(ToyModel()))  # something was learned


def test_clip_norm_limits_the_gradient():
    dataset = ToyDataset()
    trainer = Trainer(toy_cfg(optimization={"clip_norm": 0.5, "lr": [0.05]}), ToyModel(), HOOKS, None)
    batch = batches_of(dataset, 16)[0]
    loss, _ = squared_error(trainer.model, batch)
    (loss / 16).backward()
    raw_norm = float(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm())
    trainer.optimizer.zero_grad()
    logs = trainer.train_step([batch])
    assert logs["gnorm"] == pytest.approx(raw_norm, rel=1e-5)  # the logged norm is before clipping
    assert raw_norm > 0.5


def test_fp16_scaling_is_exact_and_an_inf_gradient_skips_the_update():
    dataset = ToyDataset()
    batches = batches_of(dataset, 8)
    plain = Trainer(toy_cfg(), ToyModel(), HOOKS, None)
    scaled = Trainer(toy_cfg(common={"fp16": True, "fp16_init_scale": 128}), ToyModel(), HOOKS, None)
    plain.train_step([batches[0]])
    scaled.train_step([batches[0]])
    torch.testing.assert_close(params(plain.model), params(scaled.model), rtol=0, atol=0)  # scale = 2^7

    before = params(scaled.model).clone()
    hook = scaled.model.linear.weight.register_hook(lambda grad: grad * float("inf"))
    assert scaled.train_step([batches[1]]) is None
    hook.remove()
    assert scaled.scaler.loss_scale == 64.0
    assert scaled.num_updates == 1
    torch.testing.assert_close(params(scaled.model), before, rtol=0, atol=0)
    assert all(p.grad is None for p in scaled.model.parameters())
    logs = scaled.train_step([batches[2]])
    assert logs is not None and logs["loss_scale"] == 64.0 and scaled.num_updates == 2


def test_loss_scaler_window_and_floor():
    scaler = DynamicLossScaler(init_scale=8.0, scale_window=3, min_loss_scale=1.0)
    for _ in range(2):
        scaler.update()
    assert scaler.loss_scale == 8.0
    scaler.update()  # third clean update in a row
    assert scaler.loss_scale == 16.0
    assert scaler.check_overflow(float("nan"), update=7)
    assert scaler.loss_scale == 8.0
    for _ in range(2):
        scaler.update()
    assert scaler.loss_scale == 8.0  # the window restarts after an overflow
    scaler.update()
    assert scaler.loss_scale == 16.0
    assert not scaler.check_overflow(3.0, update=8)
    state = scaler.state_dict()
    for _ in range(3):
        scaler.check_overflow(float("inf"), update=9)
    assert scaler.loss_scale == 2.0
    with pytest.raises(TrainingDiverged, match="update 9"):
        scaler.check_overflow(float("inf"), update=9)
    restored = DynamicLossScaler()
    restored.load_state_dict(state)
    assert restored.loss_scale == 16.0


def test_persisting_nan_stops_the_run_naming_the_update(tmp_path):
    dataset = ToyDataset()
    data = SplitData("train", dataset, [np.arange(i, i + 8) for i in range(0, 64, 8)])
    cfg = toy_cfg(common={"fp16": True}, optimization={"max_update": 50})
    trainer = Trainer(cfg, ToyModel(poison_from=3), HOOKS, data, run_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match=r"update 4\b") as error:
        trainer.fit()
    assert "min_loss_scale" in str(error.value)
    assert trainer.num_updates == 3
    # 128 halved until the next halving would reach min_loss_scale=1e-4
    assert trainer.scaler.loss_scale == pytest.approx(128 / 2**20)
    assert math.isfinite(float(params(trainer.model).sum()))


def test_nan_without_fp16_stops_at_once():
    trainer = Trainer(toy_cfg(), ToyModel(poison_from=0), HOOKS, None)
    with pytest.raises(TrainingDiverged, match="update 1: gradients are NaN/Inf"):
        trainer.train_step(batches_of(ToyDataset(), 8)[:1])


def test_compiled_model_trains_like_the_eager_one():
    """common.compile wraps the model with torch.compile; the updates are the same (aot_eager traces the
    same graph without generating kernels, so the check stays fast on CPU)."""
    dataset = ToyDataset()
    compiled = Trainer(toy_cfg(common={"compile": True, "compile_backend": "aot_eager"}), ToyModel(), HOOKS, None)
    eager = Trainer(toy_cfg(), ToyModel(), HOOKS, None)
    assert compiled.ddp_model is not compiled.model and eager.ddp_model is eager.model
    for batch in batches_of(dataset, 16)[:3]:
        logs_compiled, logs_eager = compiled.train_step([batch]), eager.train_step([batch])
        assert logs_compiled["loss"] == pytest.approx(logs_eager["loss"], rel=1e-6)
    torch.testing.assert_close(params(compiled.model), params(eager.model), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(params(compiled.model), params(ToyModel()))
