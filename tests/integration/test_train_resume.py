"""Exact resume: a tiny run killed with SIGKILL between two checkpoints and started again logs the
same per-update losses, bit for bit, as the run that was never interrupted (pretraining and
fine-tuning from it). The restarted pretraining run also finds its checkpoint_last truncated and
must fall back to the newest interval checkpoint instead of starting over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import make_corpus  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "train_driver.py"
TIMING_KEYS = {"time", "wps", "ups", "wall"}


def start(args: list[str], run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "driver.log", "ab")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    code = process.wait(timeout=timeout)
    assert code == 0, (run_dir / "driver.log").read_text()[-3000:]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    return out


def kill_after_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """SIGKILL the run as soon as update `step` is logged; return the last logged train step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = [r["step"] for r in records(run_dir) if r["split"] == "train"]
        if logged and max(logged) >= step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return max(r["step"] for r in records(run_dir) if r["split"] == "train")
        assert process.poll() is None, (run_dir / "driver.log").read_text()[-3000:]
        time.sleep(0.01)
    process.kill()
    raise AssertionError("the run did not reach the kill point in time")


def by_step(run_records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    grouped: dict[tuple[str, int], list[dict]] = {}
    for record in run_records:
        values = {k: v for k, v in record.items() if k not in TIMING_KEYS}
        grouped.setdefault((record["split"], record["step"]), []).append(values)
    return grouped


def assert_same_curves(reference_dir: Path, resumed_dir: Path, max_update: int) -> int:
    reference = by_step(records(reference_dir))
    resumed = by_step(records(resumed_dir))
    assert sorted(k for k in reference if k[0] == "train") == [("train", s) for s in range(1, max_update + 1)]
    assert set(resumed) == set(reference)
    replayed = 0
    for key, runs in resumed.items():
        (expected,) = reference[key]
        for values in runs:  # the updates replayed after the restart were logged twice: both must match
            assert values == expected, f"{key}: {values} != {expected}"
        replayed += len(runs) - 1
    return replayed


def last_checkpoint_update(run_dir: Path) -> int:
    state = torch.load(run_dir / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    return int(state["train_state"]["num_updates"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    """The uninterrupted pretraining run (reference curve, and the model fine-tuning starts from)."""
    run_dir = tmp_path_factory.mktemp("pretrain_reference")
    finish(start(["pretrain", str(corpus), str(run_dir), "dataset.num_workers=1"], run_dir), run_dir)
    return run_dir


def test_pretraining_resumes_exactly_after_sigkill_and_a_truncated_checkpoint(corpus, pretrained, tmp_path):
    run_dir = tmp_path / "pretrain"
    args = ["pretrain", str(corpus), str(run_dir), "dataset.num_workers=1"]
    killed_at = kill_after_step(start(args, run_dir), run_dir, step=3)
    checkpoint_update = last_checkpoint_update(run_dir)
    assert checkpoint_update < killed_at, "the kill should land between two checkpoints"
    # checkpoint_last is cut short, as if the disk had filled while it was copied
    last = run_dir / "checkpoints" / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    finish(start(args, run_dir), run_dir)
    log = (run_dir / "driver.log").read_text()
    assert "truncated" in log and "checkpoint_last.pt" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'checkpoint_1_{checkpoint_update}.pt'}" in log
    replayed = assert_same_curves(pretrained, run_dir, max_update=6)
    assert replayed >= killed_at - checkpoint_update
    # the model files the decoder reads
    best = torch.load(run_dir / "checkpoints" / "checkpoint_best.pt", weights_only=True)
    assert best["kind"] == "wav2vec2" and best["format"] == "repro-checkpoint-v1"
    assert best["train_state"]["num_updates"] == 6
    reference = torch.load(pretrained / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, best["model"][name]), name


def test_finetuning_resumes_exactly_after_sigkill(corpus, pretrained, tmp_path):
    w2v = str(pretrained / "checkpoints" / "checkpoint_best.pt")
    reference_dir = tmp_path / "reference"
    finish(start(["finetune", str(corpus), str(reference_dir), w2v], reference_dir), reference_dir)
    run_dir = tmp_path / "finetune"
    args = ["finetune", str(corpus), str(run_dir), w2v]
    killed_at = kill_after_step(start(args, run_dir), run_dir, step=5)
    assert last_checkpoint_update(run_dir) < killed_at
    finish(start(args, run_dir), run_dir)
    assert_same_curves(reference_dir, run_dir, max_update=6)
    valid = [r for r in records(reference_dir) if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [4, 6] and all({"wer", "uer", "loss"} <= set(r) for r in valid)
    best = torch.load(run_dir / "checkpoints" / "checkpoint_best.pt", weights_only=True)
    assert best["kind"] == "wav2vec_ctc" and best["dictionary"][:5] == ["<s>", "<pad>", "</s>", "<unk>", "|"]
    assert best["train_state"]["best_metric"] == min(r["wer"] for r in valid)


def test_stop_request_saves_at_the_current_update_and_resumes_exactly(corpus, pretrained, tmp_path):
    """A preempted SLURM job (repro.launch.preemption) asks the trainer to save and stop: it must save
    checkpoint_last at the update it reached (not the last interval) and exit with status 75."""
    run_dir = tmp_path / "pretrain"
    args = ["pretrain", str(corpus), str(run_dir), "dataset.num_workers=1"]
    process = start(args, run_dir)
    deadline = time.time() + 240
    while not [r for r in records(run_dir) if r["split"] == "train"]:
        assert process.poll() is None and time.time() < deadline, (run_dir / "driver.log").read_text()[-3000:]
        time.sleep(0.01)
    (run_dir / "STOP_REQUESTED").write_text("SIGUSR2 (test)\n")
    assert process.wait(timeout=240) == 75, (run_dir / "driver.log").read_text()[-3000:]
    stopped_at = max(r["step"] for r in records(run_dir) if r["split"] == "train")
    assert last_checkpoint_update(run_dir) == stopped_at < 6
    (run_dir / "STOP_REQUESTED").unlink()  # the requeued job clears it
    finish(start(args, run_dir), run_dir)
    assert assert_same_curves(pretrained, run_dir, max_update=6) == 0  # nothing recomputed
