"""Our own checkpoint files: atomic writes and safe (`weights_only=True`) reads.

A file is a dict (CONTRACTS.md):

    {"format": "repro-checkpoint-v1", "kind": "wav2vec2" | "wav2vec_ctc",
     "model": state_dict, "model_cfg": dict, "task_cfg": dict,
     "dictionary": list[str] | None,     # Dictionary.symbols, the 4 specials included
     "train_state": ...}                  # trainer files only

It holds only tensors, dicts, lists, strings, numbers, bools and None, so it is read with
`torch.load(weights_only=True)`: reading one of our files never runs pickled code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "repro-checkpoint-v1"
KINDS = ("wav2vec2", "wav2vec_ctc")
PICKLE_PROTOCOL_BYTE = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the allow-list (it could run code); nothing was executed."""


# Globals that mark a fairseq file (configs, numpy scalars in extra_state, pickled fairseq objects).
FAIRSEQ_GLOBAL_PREFIXES = ("argparse.", "omegaconf.", "fairseq.", "numpy.", "typing.")
WEIGHTS_ONLY_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any threads start
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` so that `path` holds either its old content or the complete new one.

    The bytes go to a temporary file in the same directory (same file system, so the rename is
    atomic), are flushed and fsync'ed, then `os.replace`d over `path`; the directory is fsync'ed
    too so the rename itself survives a crash.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            torch.save(obj, tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (shared clusters read it)
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
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
    return check_repro_checkpoint(obj, path)


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
