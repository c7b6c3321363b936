"""Our own checkpoint files: atomic writes and safe (`weights_only=True`) reads.

A file is a dict (CONTRACTS.md):

    {"format": "repro-checkpoint-v1", "kind": "wav2vec2" | "wav2vec_ctc" | "roberta" | "roberta_ctc",
     "model": state_dict, "model_cfg": dict, "task_cfg": dict,
     "dictionary": list[str] | None,     # Dictionary.symbols, the 4 specials included
     "train_state": ...}                  # trainer files only

It holds only tensors, dicts, lists, strings, numbers, bools and None, so it is read with
`torch.load(weights_only=True)`: reading one of our files never runs pickled code.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import socket
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

FORMAT = "repro-checkpoint-v1"
KINDS = ("wav2vec2", "wav2vec_ctc", "wav2vec", "roberta", "roberta_ctc")
"""Model kinds of our files: wav2vec 2.0 pretrained, CTC fine-tuned, wav2vec / vq-wav2vec, RoBERTa on units."""
PICKLE_PROTOCOL_BYTE = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the allow-list (it could run code); nothing was executed."""


# Our files record a CRC-32 of every tensor payload under this key (fairseq's files carry none).
CHECKSUM_KEY = "tensor_crc32"

# Globals that mark a fairseq file (configs, numpy scalars in extra_state, pickled fairseq objects).
FAIRSEQ_GLOBAL_PREFIXES = ("argparse.", "omegaconf.", "fairseq.", "numpy.", "typing.")
WEIGHTS_ONLY_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any threads start
    os.umask(umask)
    return umask


_UMASK = _read_umask()


# Temporary files carry the writer's host and pid, so that a later start can tell the leftovers
# of a killed writer (each as large as a checkpoint) from a write in progress:
# `.<name>.<host>.<pid>.<random>.tmp` beside the file being written.
TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "localhost"


def temporary_file(path: Path) -> tuple[int, str]:
    """(descriptor, name) of a new temporary file beside `path`, named as TEMPORARY_PATTERN."""
    return tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries of writers on this host that are no longer running; return them.

    Files of another host (a shared file system) or of a live process are left alone.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    host = _host()
    for candidate in directory.iterdir():
        match = TEMPORARY_PATTERN.match(candidate.name)
        if match is None or match.group("host") != host or _process_alive(int(match.group("pid"))):
            continue
        try:
            candidate.unlink()
        except FileNotFoundError:
            continue
        removed.append(candidate)
    return removed


class _RecordingWriter:
    """A binary file for torch.save that remembers the OSError of a failed write.

    torch's zip writer swallows the exception of its write callback and reports a size mismatch
    ("unexpected pos N vs M"); the recorded error says what really happened (ENOSPC, EDQUOT, ...).
    """

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _write_error(path: Path, error: OSError) -> CheckpointError:
    code = errno.errorcode.get(error.errno, "?") if error.errno is not None else "?"
    hint = " (disk full?)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return CheckpointError(
        f"{path}: could not write the checkpoint: {error.strerror or error} [errno {error.errno} {code}]{hint}; "
        "the previous file, if any, is unchanged"
    )


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` so that `path` holds either its old content or the complete new one.

    The bytes go to a temporary file in the same directory (same file system, so the rename is
    atomic), are flushed and fsync'ed, then `os.replace`d over `path`; the directory is fsync'ed
    too so the rename itself survives a crash. One of our checkpoint dicts gets a checksum of each
    tensor payload (`tensor_crc32`), verified by `read_checkpoint`. A failed write raises
    `CheckpointError` naming the file and the errno.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = {**obj, CHECKSUM_KEY: tensor_checksums(obj)}
    handle, tmp_name = temporary_file(path)
    writer = None
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            writer = _RecordingWriter(tmp_file)
            torch.save(obj, writer)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (shared clusters read it)
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        recorded = writer.error if writer is not None and writer.error is not None else None
        if recorded is None and isinstance(error, OSError):
            recorded = error
        if recorded is not None:
            raise _write_error(path, recorded) from error
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --- tensor checksums ----------------------------------------------------------------------------


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and payload bytes."""
    tensor = tensor.detach().cpu().contiguous()
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    payload = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    return zlib.crc32(payload, zlib.crc32(header))


def tensor_checksums(obj: Any) -> dict[str, int]:
    """`{"/model/encoder.layer_norm.weight": crc, ...}` for every tensor inside `obj`."""
    sums: dict[str, int] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, torch.Tensor):
            sums[where] = tensor_crc32(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if not (where == "" and key == CHECKSUM_KEY):
                    walk(value, f"{where}/{key}")
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(obj, "")
    return sums


def verify_checksums(obj: dict[str, Any], path: Path) -> None:
    """Compare the stored tensor checksums with the loaded tensors (files without them pass)."""
    stored = obj.get(CHECKSUM_KEY)
    if stored is None:
        return  # written before checksums existed
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: entry {CHECKSUM_KEY!r} is not a dict")
    actual = tensor_checksums(obj)
    damaged = sorted(key for key in set(stored) | set(actual) if stored.get(key) != actual.get(key))
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" (+{len(damaged) - 5} more)" if len(damaged) > 5 else "")
        raise CheckpointError(
            f"{path}: damaged tensor data: the checksum of {len(damaged)} tensor(s) differs from the one written "
            f"with the file ({shown}); the file was corrupted or altered after it was saved"
        )


# --- reading -------------------------------------------------------------------------------------


def describe_unreadable(path: Path, error: BaseException) -> str:
    """Say why torch could not read `path`: missing, empty, truncated, or not a torch file at all."""
    if not path.exists():
        return f"{path}: no such file"
    size = path.stat().st_size
    if size == 0:
        return f"{path}: empty file (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            return (f"{path}: truncated or corrupt torch checkpoint ({size} bytes; the zip archive has no "
                    f"central directory, e.g. an interrupted download or copy): {error}")
        return f"{path}: corrupt torch checkpoint ({size} bytes): {error}"
    if head[:1] == PICKLE_PROTOCOL_BYTE:
        if isinstance(error, EOFError) or "truncated" in str(error).lower() or "ran out of input" in str(error).lower():
            return f"{path}: truncated legacy torch checkpoint ({size} bytes): {error}"
        return f"{path}: unreadable legacy torch checkpoint ({size} bytes): {error}"
    return (f"{path}: not a torch checkpoint (starts with bytes {head!r}, neither a torch zip archive "
            f"nor a pickle): {error}")


def looks_like_fairseq(obj: Any) -> bool:
    """A fairseq checkpoint dict: a state dict under 'model' plus 'args' and/or 'cfg'."""
    return isinstance(obj, dict) and "model" in obj and ("args" in obj or "cfg" in obj)


def check_repro_checkpoint(obj: Any, path: Path) -> dict[str, Any]:
    """Validate the top level of one of our files (already unpickled) and return it."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a repro checkpoint dict")
    if "format" not in obj:
        if looks_like_fairseq(obj):
            raise CheckpointError(
                f"{path}: is a fairseq checkpoint, not one of ours; load it with "
                "repro.checkpoints.fairseq.load or convert it with `python -m repro.tools import-checkpoint`"
            )
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(f"{path}: not a repro checkpoint (no 'format' key; top-level keys: {keys})")
    if obj["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {obj['format']!r} is not {FORMAT!r}")
    if obj.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: kind {obj.get('kind')!r} is not one of {', '.join(KINDS)}")
    for key in ("model", "model_cfg", "task_cfg"):
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(f"{path}: entry {key!r} is missing or not a dict")
    dictionary = obj.get("dictionary")
    if dictionary is not None and not (isinstance(dictionary, list) and all(isinstance(s, str) for s in dictionary)):
        raise CheckpointError(f"{path}: entry 'dictionary' must be a list of symbols or None")
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of OUR files with `torch.load(weights_only=True)` and check its top level."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    from repro.checkpoints.safe_pickle import scan_container  # it builds on this module's errors

    scan_container(path)  # refuses TorchScript / tar / foreign containers before torch opens them
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = WEIGHTS_ONLY_GLOBAL.search(str(error))
        if refused is None:
            raise CheckpointError(describe_unreadable(path, error)) from error
        name = refused.group(1)
        name = name if "." in name else f"builtins.{name}"  # torch prints builtins without module
        if name.startswith(FAIRSEQ_GLOBAL_PREFIXES):
            raise CheckpointError(
                f"{path}: looks like a fairseq checkpoint (it pickles {name}, which our files never hold); "
                "load it with repro.checkpoints.fairseq.load or convert it with "
                "`python -m repro.tools import-checkpoint`"
            ) from error
        raise UnsafeCheckpointError(
            f"{path}: not a repro checkpoint: it pickles the global '{name}' (refused, nothing was run); "
            "our files hold only tensors, dicts, lists, strings and numbers"
        ) from error
    except Exception as error:  # torch raises RuntimeError / EOFError / KeyError ... on damaged bytes
        raise CheckpointError(describe_unreadable(path, error)) from error
    checked = check_repro_checkpoint(obj, path)
    verify_checksums(checked, path)
    return checked


def model_file(*, kind: str, model_state: dict[str, torch.Tensor], model_cfg: dict[str, Any],
               task_cfg: dict[str, Any], dictionary: list[str] | None) -> dict[str, Any]:
    """The dict of a model-only file of ours (no train_state), e.g. an imported fairseq checkpoint."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return {
        "format": FORMAT,
        "kind": kind,
        "model": {key: value.detach().cpu().contiguous() for key, value in model_state.items()},
        "model_cfg": model_cfg,
        "task_cfg": task_cfg,
        "dictionary": dictionary,
    }
