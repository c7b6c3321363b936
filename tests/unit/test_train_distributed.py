"""Rank/world size from SLURM or torchrun variables; keeping the paper's effective batch."""

from __future__ import annotations

import pickle

import pytest

from repro.data.audio_headers import AudioCheckError
from repro.train.distributed import (
    DistributedContext,
    check_on_master,
    detect_env,
    effective_update_freq,
    first_slurm_host,
)


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


def test_only_rank_zero_checks_and_every_rank_raises_its_refusal():
    """check_on_master: rank 0 runs the check and sends its outcome; the others do not run it and raise what
    rank 0 sent (an AudioCheckError survives the pickling broadcast_object_list does)."""
    refusal = AudioCheckError("/data/valid.tsv", "1 of 3 audio files cannot be used:\n  /data/valid.tsv:4: x.wav: ...")
    sent: list[object] = []

    def rank_zero_sends(obj, context):
        assert context.is_master
        sent.append(pickle.loads(pickle.dumps(obj)))  # what the wire carries
        return obj

    def refuses():
        raise refusal

    master = DistributedContext(rank=0, world_size=4)
    with pytest.raises(AudioCheckError) as raised:
        check_on_master(refuses, master, broadcast=rank_zero_sends)
    assert raised.value is refusal and str(sent[0]) == str(refusal) and isinstance(sent[0], AudioCheckError)

    calls: list[str] = []
    check_on_master(lambda: calls.append("checked"), master, broadcast=rank_zero_sends)
    assert calls == ["checked"] and sent[-1] is None  # a passed check sends None: nobody raises

    def must_not_run():
        raise AssertionError("only rank 0 reads the headers")

    other = DistributedContext(rank=3, world_size=4)
    with pytest.raises(AudioCheckError) as received:
        check_on_master(must_not_run, other, broadcast=lambda obj, context: sent[0])
    assert str(received.value) == str(refusal)
    check_on_master(must_not_run, other, broadcast=lambda obj, context: None)  # rank 0 found nothing wrong

    single = DistributedContext()  # one process: it checks, nothing is sent
    check_on_master(lambda: calls.append("alone"), single, broadcast=lambda obj, context: pytest.fail("sent"))
    assert calls[-1] == "alone"

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def refuses_oddly():
        raise Unpicklable("odd")

    with pytest.raises(Unpicklable):
        check_on_master(refuses_oddly, master, broadcast=rank_zero_sends)
    assert isinstance(sent[-1], RuntimeError) and "Unpicklable: odd" in str(sent[-1])
