"""Hostile and damaged checkpoint files: refused before anything runs, named, and never half-loaded.

Every hostile file is built here (never committed). Where a test claims that a file would have
done harm, a positive control shows the harm with an unrestricted loader first (in a subprocess
where it could break the interpreter), so the test fails if the file is not really hostile.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from repro.checkpoints.fairseq import CheckpointError, UnsafeCheckpointError, load, safe_load
from repro.checkpoints.format import (
    CHECKSUM_KEY,
    FORMAT,
    atomic_save,
    model_file,
    read_checkpoint,
    sweep_stale_temporaries,
)
from repro.train.checkpoint import CheckpointManager

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_torch_file(path: Path, object_pickle: bytes) -> Path:
    """A pre-zip torch file (torch < 1.6, the 2019-2020 fairseq releases) around a hand-written pickle."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC, 1001, sys_info):
            handle.write(pickle.dumps(header, protocol=2))
        handle.write(object_pickle)
        handle.write(pickle.dumps([], protocol=2))  # no storages
    return path


# PROTO 2; GLOBAL argparse.Namespace; state (None, {"__init__": object}); BUILD; STOP.
# The slot-state half of BUILD calls setattr on whatever is on the stack: here a class.
PATCH_NAMESPACE_CLASS = (
    b"\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00__init__c__builtin__\nobject\ns\x86b."
)


# --- TorchScript -----------------------------------------------------------------------------------


class _WritesOnLoad(torch.nn.Module):
    """A scripted module whose __setstate__ creates a file: TorchScript code that runs at load time."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        created = torch.from_file(self.target, shared=True, size=8)  # creates the file
        self.training = state[1] and bool(created.sum() == 0)  # used, so the call is not optimised away


def test_a_torchscript_archive_is_refused_before_its_code_runs(tmp_path: Path) -> None:
    marker = tmp_path / "written_by_torchscript"
    archive = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_WritesOnLoad(str(marker))), str(archive))
    torch.jit.load(str(archive))  # positive control: loading it really runs the scripted code
    assert marker.exists()
    marker.unlink()
    for reader in (load, safe_load, read_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match="TorchScript archive") as raised:
            reader(archive)
        assert str(archive) in str(raised.value)
        assert not marker.exists()


# --- BUILD on an allow-listed class ----------------------------------------------------------------


def test_a_refused_file_cannot_patch_an_allowed_class(tmp_path: Path) -> None:
    # positive control, in a subprocess: a plain unpickler lets the file break argparse for the process
    control = subprocess.run(
        [sys.executable, "-c", "import argparse, pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
                               "print(argparse.Namespace.__init__ is object)"],
        input=PATCH_NAMESPACE_CLASS, capture_output=True, check=True,
    )
    assert control.stdout.strip() == b"True"
    path = legacy_torch_file(tmp_path / "patches_argparse.pt", PATCH_NAMESPACE_CLASS)
    original_init = argparse.Namespace.__init__
    with pytest.raises(UnsafeCheckpointError, match="Can only build") as raised:
        load(path)
    assert str(path) in str(raised.value)
    assert argparse.Namespace.__init__ is original_init
    assert argparse.Namespace(a=1).a == 1


# --- code-running globals in every container ----------------------------------------------------


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_code_running_global_is_refused_in_every_torch_container(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"{container}.pt"
    payload = {"args": argparse.Namespace(arch="wav2vec2"), "model": {}, "extra_state": _RunsShell(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|nt)\.system'"):
        load(path)
    assert not marker.exists()


def test_a_tar_container_and_foreign_zips_are_refused(tmp_path: Path) -> None:
    tar_path = tmp_path / "old.pt"
    member = tmp_path / "pickle"
    member.write_bytes(pickle.dumps({"model": {}}, protocol=2))
    with tarfile.open(tar_path, "w") as archive:
        archive.add(member, arcname="pickle")
    with pytest.raises(CheckpointError, match="tar archive"):
        load(tar_path)
    foreign = tmp_path / "notes.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "hello")
    for reader in (load, read_checkpoint):
        with pytest.raises(CheckpointError, match="zip archive that is not a torch checkpoint"):
            reader(foreign)


# --- stored configs that would recurse forever ----------------------------------------------------


def test_a_self_referencing_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    loop: dict = {"arch": "wav2vec2"}
    loop["again"] = loop
    path = tmp_path / "loop.pt"
    torch.save({"cfg": {"model": loop, "task": {}}, "model": {}}, path)
    with pytest.raises(CheckpointError, match="contains itself") as raised:
        load(path)
    assert str(path) in str(raised.value)


def test_a_50000_deep_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    depth = 50_000
    stream = io.BytesIO()
    stream.write(b"\x80\x02}")  # the checkpoint dict
    stream.write(b"X\x03\x00\x00\x00cfg")
    stream.write(b"}")  # root of the nest
    for _ in range(depth):
        stream.write(b"X\x01\x00\x00\x00a}")  # key 'a', a new dict
    stream.write(b"s" * depth)  # each dict goes into the one below it
    stream.write(b"s")  # checkpoint["cfg"] = root
    stream.write(b"X\x05\x00\x00\x00model}s.")
    path = legacy_torch_file(tmp_path / "deep.pt", stream.getvalue())
    with pytest.raises(CheckpointError, match="nests deeper than"):
        load(path)


# --- our own files: checksums, temporaries, write errors -------------------------------------------


def _small_model_file() -> dict:
    state = {"weight": torch.arange(64, dtype=torch.float32).reshape(8, 8), "bias": torch.zeros(8)}
    return model_file(kind="wav2vec2", model_state=state, model_cfg={}, task_cfg={}, dictionary=None)


def test_a_flipped_byte_in_a_tensor_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    atomic_save(_small_model_file(), path)
    checkpoint = read_checkpoint(path)
    assert set(checkpoint[CHECKSUM_KEY]) == {"/model/weight", "/model/bias"}
    with zipfile.ZipFile(path) as archive:  # find the weight's payload: 0.0, 1.0, 2.0 ... as float32
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    needle = torch.arange(64, dtype=torch.float32).numpy().tobytes()
    offset = bytes(data).index(needle)
    data[offset + 4 * 10] ^= 0x01  # one bit of weight[1, 2]
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["model"]["weight"][1, 2] != 10.0  # torch itself loads it
    for reader in (read_checkpoint, load):
        with pytest.raises(CheckpointError, match=r"damaged tensor data.*/model/weight"):
            reader(damaged)


def test_stale_temporaries_of_dead_writers_are_swept_on_start(tmp_path: Path) -> None:
    save_dir = tmp_path / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
                               "from repro.checkpoints.format import temporary_file\n"
                               "from pathlib import Path\n"
                               f"fd, name = temporary_file(Path({str(save_dir / 'checkpoint_last.pt')!r}))\n"
                               "os.write(fd, b'x' * 4096); print(name, flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    save_dir.mkdir()
    try:
        leftover = Path(child.stdout.readline().strip())
        assert leftover.exists()
        assert sweep_stale_temporaries(save_dir) == []  # the writer is alive: its file stays
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    unrelated = save_dir / "notes.tmp"
    unrelated.write_text("mine")
    CheckpointManager(save_dir)  # a (re)started run
    assert not leftover.exists()
    assert unrelated.exists()


def _save_under_file_size_limit(path: Path, limit: int) -> subprocess.CompletedProcess:
    script = (
        "import resource, signal, sys, torch\n"
        "from repro.checkpoints.format import atomic_save, CheckpointError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "try:\n"
        f"    atomic_save({{'weights': torch.zeros(1 << 18)}}, {str(path)!r})\n"
        "except CheckpointError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)


def test_a_failed_write_names_the_file_and_the_errno(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_last.pt"
    atomic_save({"weights": torch.ones(4)}, path)
    before = path.read_bytes()
    result = _save_under_file_size_limit(path, limit=64 * 1024)  # 1 MiB of tensor into a 64 KiB limit
    assert result.returncode == 3, result.stderr
    assert str(path) in result.stdout and "errno 27 EFBIG" in result.stdout, result.stdout
    assert "unexpected pos" not in result.stdout
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_checksums_cover_the_trainer_state_too(tmp_path: Path) -> None:
    checkpoint = {**_small_model_file(), "train_state": {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}}}
    path = tmp_path / "trainer.pt"
    atomic_save(checkpoint, path)
    stored = read_checkpoint(path)[CHECKSUM_KEY]
    assert "/train_state/optimizer/state/0/exp_avg" in stored
    assert stored.keys() >= {"/model/weight", "/model/bias"}
    assert FORMAT == read_checkpoint(path)["format"]
