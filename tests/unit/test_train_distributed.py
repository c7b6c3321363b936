"""Rank/world size from SLURM or torchrun variables; keeping the paper's effective batch."""

from __future__ import annotations

import pytest

from repro.train.distributed import detect_env, effective_update_freq, first_slurm_host


def test_slurm_variables_as_submitit_sets_them():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 8, 1, "gpu003", "slurm")
    assert 10000 <= env.master_port < 30000
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "head",
                       "MASTER_PORT": "1234"}).master_addr == "head"


def test_torchrun_variables_win_over_slurm():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1",
                      "MASTER_PORT": "29501", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 4, 3, "10.0.0.1", 29501, "torchrun")
    assert detect_env({}).world_size == 1


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("a[1-3],b2", "a1"), ("gpu[07,09]", "gpu07"),
                                            ("x-1,x-2", "x-1")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_effective_update_freq_keeps_the_paper_batch():
    assert effective_update_freq(64, 8, 1) == 8
    assert effective_update_freq(8, 2, 1) == 4
    assert effective_update_freq(2, 2, 4) == 4
    assert effective_update_freq(None, 3, 2) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        effective_update_freq(64, 3, 1)
