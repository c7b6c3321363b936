"""DDP: two gloo processes (torchrun-style environment, CPU) end with the same parameters as one
process with update_freq=2 on the same batches - masks, negatives, dropout and LayerDrop included,
since every micro-batch is seeded by its slot in the update across processes."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import make_corpus, pretrain_config  # noqa: E402

from repro.models.wav2vec2 import Wav2Vec2Model  # noqa: E402
from repro.train.stages import model_config, run_pretrain  # noqa: E402

OVERRIDES = {"dataset": {"disable_validation": True}, "checkpoint": {"save_interval_updates": 0},
             "common": {"log_format": "none"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world_size: int, port: int, data_dir: str, run_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    cfg = pretrain_config(Path(data_dir), **OVERRIDES, optimization={"max_update": 3, "update_freq": [1]})
    run_pretrain(cfg, Path(run_dir), None)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert state["train_state"]["num_updates"] == 3
    return state["model"]


def test_two_gloo_processes_equal_one_process_with_update_freq_2(tmp_path):
    data_dir = make_corpus(tmp_path / "data")
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    mp.start_processes(worker, args=(2, free_port(), str(data_dir), str(ddp_dir)), nprocs=2, join=True,
                       start_method="spawn")
    assert not any(p.name.startswith(".") for p in (ddp_dir / "checkpoints").iterdir())

    single_cfg = pretrain_config(data_dir, **OVERRIDES, optimization={"max_update": 3, "update_freq": [2]})
    run_pretrain(single_cfg, single_dir, None)

    ddp, single = final_model(ddp_dir), final_model(single_dir)
    torch.manual_seed(int(single_cfg.common.seed))  # the initial weights both runs started from
    initial = Wav2Vec2Model(model_config(single_cfg.model)).state_dict()
    moved = 0
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.allclose(tensor, initial[name]))
    assert moved > len(single) // 2  # most tensors were trained
    ddp_state = torch.load(ddp_dir / "checkpoints" / "checkpoint_last.pt", weights_only=True)["train_state"]
    assert ddp_state["world_size"] == 2 and len(ddp_state["rng"]) == 2  # per-rank RNG states stored
