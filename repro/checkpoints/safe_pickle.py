"""Read torch files we did not write (fairseq's releases, a user's download) without running their code.

Two gates, both before any object is built:

1. The container is identified from its bytes before torch sees it. A torch zip archive
   (`<archive>/data.pkl`, torch >= 1.6) and a legacy stream (a pickle of torch's magic number
   first, torch < 1.6; the 2019-2020 fairseq releases) are read. A TorchScript archive
   (`constants.pkl` / `code/`) is refused: `torch.load` would hand it to `torch.jit.load`, whose
   scripted `__setstate__` methods run while loading. The tar container of torch < 0.4, and
   anything else, is refused too.
2. The objects are built by torch's own weights-only unpickler (`torch.load(weights_only=True)`),
   extended through `torch.serialization.safe_globals` with the allow-list below. That unpickler
   calls only allow-listed callables, builds (BUILD) only instances of allow-listed classes (never
   a class object: a file cannot patch `argparse.Namespace.__init__`), and appends / sets items
   only on real lists and dicts. Every global the pickle names is listed first by scanning its
   opcodes (`pickletools`, which executes nothing), so a refused file is refused with the
   offending name, and each `fairseq.*` name gets an inert stand-in (`FairseqObject`).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import pickletools
import tarfile
import typing
import zipfile
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from repro.checkpoints.format import CheckpointError, UnsafeCheckpointError, describe_unreadable

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_BYTE = b"\x80"
# A legacy (pre-zip) torch file is 5 pickles in a row: magic number, protocol version, sys info,
# the object, the storage keys; the raw storage bytes follow.
LEGACY_PICKLE_COUNT = 5
TORCHSCRIPT_RECORDS = ("constants.pkl", "code/")


# =================================================================================================
# Inert stand-ins for fairseq's pickled objects
# =================================================================================================


class FairseqObject:
    """Inert stand-in for any pickled `fairseq.*` global (class, enum, function).

    It records what the pickle hands it (constructor arguments, `__setstate__` state) and never
    runs fairseq code. `fairseq_name` is the dotted name the file referenced.
    """

    fairseq_name: ClassVar[str] = "fairseq"

    def __new__(cls, *args: Any, **kwargs: Any) -> FairseqObject:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.fairseq_name} args={self.args!r}>"


class FairseqDictionary(FairseqObject):
    """Stand-in for `fairseq.data.dictionary.Dictionary`; `to_dictionary` rebuilds ours."""

    fairseq_name = "fairseq.data.dictionary.Dictionary"

    def to_dictionary(self, path: Path | str = "<checkpoint>") -> Any:
        """Our Dictionary with the same symbols at the same indices (and the same counts)."""
        from repro.data.dictionary import SPECIAL_SYMBOLS, Dictionary

        state = self.state if isinstance(self.state, dict) else {}
        symbols = state.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise CheckpointError(f"{path}: pickled fairseq Dictionary has no symbol list")
        specials = {name: state.get(f"{name}_index") for name in ("bos", "pad", "eos", "unk")}
        if tuple(symbols[:4]) != SPECIAL_SYMBOLS or specials != {"bos": 0, "pad": 1, "eos": 2, "unk": 3}:
            raise CheckpointError(
                f"{path}: pickled fairseq Dictionary has specials {symbols[:4]} at {specials}; repro expects "
                f"{list(SPECIAL_SYMBOLS)} at indices 0..3"
            )
        indices = state.get("indices")
        if isinstance(indices, dict) and any(indices.get(s) != i for i, s in enumerate(symbols)):
            raise CheckpointError(f"{path}: pickled fairseq Dictionary: 'indices' disagrees with 'symbols'")
        dictionary = Dictionary.from_symbols(symbols[4:])
        counts = state.get("count")
        if isinstance(counts, list) and len(counts) == len(symbols):
            dictionary.counts = [int(c) for c in counts]
        return dictionary


def is_fairseq_name(dotted: str) -> bool:
    return dotted == "fairseq" or dotted.startswith("fairseq.")


@cache
def fairseq_stub(name: str) -> type:
    """One stand-in class per referenced fairseq name (cached, so identity checks in a file hold)."""
    if name == FairseqDictionary.fairseq_name:
        return FairseqDictionary
    short = name.rsplit(".", 1)[-1]
    return type(short, (FairseqObject,), {"fairseq_name": name, "__module__": __name__})


# =================================================================================================
# The allow-list
# =================================================================================================


def _numpy_globals() -> dict[str, Any]:
    """numpy's array / scalar / dtype reconstruction, under both its 1.x and 2.x module names."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar
    found: dict[str, Any] = {}
    for package in ("numpy.core", "numpy._core"):
        found[f"{package}.multiarray._reconstruct"] = reconstruct
        found[f"{package}.multiarray.scalar"] = scalar
    found["numpy.ndarray"] = np.ndarray
    found["numpy.dtype"] = np.dtype
    # numpy >= 1.25 builds each dtype as an instance of its own class (numpy.dtypes.Float64DType);
    # BUILD then restores its state, which the unpickler allows only for allow-listed types.
    dtype_classes = getattr(np, "dtypes", None)
    for name in dir(dtype_classes) if dtype_classes is not None else ():
        value = getattr(dtype_classes, name)
        if isinstance(value, type) and issubclass(value, np.dtype):
            found[f"numpy.dtypes.{name}"] = value
    return found


def _torch_globals() -> dict[str, Any]:
    """Tensor / storage rebuilding: what `torch.save` of a state dict emits (any torch version)."""
    found: dict[str, Any] = {
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy"):
        if hasattr(torch._utils, name):
            found[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout)):
            found[f"torch.{name}"] = value
        elif name.endswith("Storage") and isinstance(value, type):  # legacy typed storages (old files)
            found[f"torch.{name}"] = value
    return found


def _omegaconf_globals() -> dict[str, Any]:
    """The classes a pickled omegaconf DictConfig references (fairseq_spec.md §9.2)."""
    from omegaconf import base, dictconfig, listconfig, nodes

    found: dict[str, Any] = {
        "omegaconf.dictconfig.DictConfig": dictconfig.DictConfig,
        "omegaconf.listconfig.ListConfig": listconfig.ListConfig,
        "omegaconf.base.Metadata": base.Metadata,
        "omegaconf.base.ContainerMetadata": base.ContainerMetadata,
    }
    for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode",
                 "BytesNode", "PathNode"):
        if hasattr(nodes, name):
            found[f"omegaconf.nodes.{name}"] = getattr(nodes, name)
    return found


@lru_cache(maxsize=1)
def allowed_globals() -> dict[str, Any]:
    """Every global a checkpoint may name, as "module.qualname" -> object (fairseq.* aside)."""
    import builtins
    import codecs

    found: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "collections.Counter": collections.Counter,
        "argparse.Namespace": argparse.Namespace,
        "typing.Any": typing.Any,
        # bytes objects in protocol-2 pickles are written as _codecs.encode(str, "latin1").
        "_codecs.encode": codecs.encode,
    }
    # Types as values (omegaconf's Metadata.key_type / object_type) and small constructors (bytes()
    # is how protocol 2 writes b"").
    for name in ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "dict", "list",
                 "tuple", "str", "int", "float", "bool", "object"):
        found[f"builtins.{name}"] = getattr(builtins, name)
    found.update(_torch_globals())
    found.update(_numpy_globals())
    found.update(_omegaconf_globals())
    return found


def _torch_default_globals() -> set[str]:
    """What torch's weights-only unpickler admits without being told (tensor rebuilding, ...)."""
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


# =================================================================================================
# Container recognition and the opcode scan
# =================================================================================================


def _canonical(module: str, name: str) -> str:
    """Python 2 names that protocol-2 pickles use (__builtin__, copy_reg) -> today's, as torch does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def pickle_globals(stream: typing.BinaryIO, count: int = 1) -> set[str]:
    """The globals named by the next `count` pickles of `stream`, read as opcodes (nothing is built)."""
    names: set[str] = set()
    for _ in range(count):
        for opcode, argument, _position in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                module, _, name = str(argument).partition(" ")
                names.add(_canonical(module, name))
    return names


def _refuse_torchscript(path: Path, records: list[str]) -> None:
    inner = [record.split("/", 1)[1] if "/" in record else record for record in records]
    if any(record == "constants.pkl" or record.startswith("code/") for record in inner):
        raise UnsafeCheckpointError(
            f"{path}: is a TorchScript archive (torch.jit.save), not a checkpoint: it carries compiled code "
            "that torch.load would run while loading it, so it is refused unread. Nothing was executed."
        )


def scan_container(path: Path) -> set[str]:
    """Identify the torch container of `path` and return the globals its object pickle names.

    Raises `UnsafeCheckpointError` for a TorchScript archive and `CheckpointError` for a tar
    container, an archive without `data.pkl`, damaged bytes, or a file that is not torch's.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head == ZIP_MAGIC:
            try:
                archive = zipfile.ZipFile(handle)
            except (zipfile.BadZipFile, OSError) as error:
                raise CheckpointError(describe_unreadable(path, error)) from None
            with archive:
                records = archive.namelist()
                _refuse_torchscript(path, records)
                data = [record for record in records if record.count("/") == 1 and record.endswith("/data.pkl")]
                if len(data) != 1:
                    raise CheckpointError(
                        f"{path}: a zip archive that is not a torch checkpoint (no '<archive>/data.pkl' record; "
                        f"records: {', '.join(records[:5])}{' ...' if len(records) > 5 else ''})"
                    )
                try:
                    payload = archive.read(data[0])
                except (zipfile.BadZipFile, OSError, EOFError) as error:
                    raise CheckpointError(describe_unreadable(path, error)) from None
            stream, count = io.BytesIO(payload), 1
            return _scan(path, stream, count)
        if head[:1] == PICKLE_PROTOCOL_BYTE:
            handle.seek(0)
            return _scan(path, handle, LEGACY_PICKLE_COUNT)
    if tarfile.is_tarfile(path):
        raise CheckpointError(
            f"{path}: a tar archive (torch < 0.4's checkpoint container, or not a checkpoint at all); "
            "torch's weights-only loader cannot read that container safely, so repro does not load it. "
            "Re-save it with a current torch in a trusted environment."
        )
    raise CheckpointError(describe_unreadable(path, ValueError("unknown container")))


def _scan(path: Path, stream: typing.BinaryIO, count: int) -> set[str]:
    try:
        return pickle_globals(stream, count)
    except (ValueError, EOFError, pickle.UnpicklingError) as error:
        text = str(error)
        # pickletools says "pickle exhausted before seeing STOP" for a cut-off stream
        reason: BaseException = EOFError(text) if "exhausted" in text or "truncated" in text else error
        raise CheckpointError(describe_unreadable(path, reason)) from None


def _core_reason(error: BaseException) -> str:
    """torch wraps the unpickler's reason in paragraphs of advice (re-run with weights_only=False...)
    that would be wrong here; keep the reason."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split("\n\n", 1)[0].strip()
    return text


def refusal_message(path: Path, dotted: str) -> str:
    return (
        f"{path}: refused to unpickle global '{dotted}': it is not on the allow-list of a model checkpoint "
        "(tensors, argparse/omegaconf configs, numpy scalars, fairseq objects), so the file could run "
        "arbitrary code or is not a model checkpoint. Nothing it names was called."
    )


# =================================================================================================
# Loading
# =================================================================================================


def safe_load(path: str | Path) -> dict[str, Any]:
    """Unpickle a torch checkpoint (fairseq's or ours) through torch's weights-only unpickler.

    Namespaces, omegaconf containers and `FairseqObject` stand-ins are returned as unpickled; use
    `repro.checkpoints.fairseq.stored_config` / `to_plain` to read the configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    names = scan_container(path)
    allowed = allowed_globals()
    known = _torch_default_globals()
    for dotted in sorted(names):
        if not (dotted in allowed or dotted in known or is_fairseq_name(dotted)):
            raise UnsafeCheckpointError(refusal_message(path, dotted))
    entries: list[Any] = [(value, name) for name, value in allowed.items()]
    entries += [(fairseq_stub(name), name) for name in sorted(names) if is_fairseq_name(name)]
    try:
        with torch.serialization.safe_globals(entries):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: torch's weights-only unpickler refused it ({_core_reason(error)}); nothing it names was called"
        ) from None
    except CheckpointError:
        raise
    except Exception as error:  # damaged bytes surface as RuntimeError / EOFError / KeyError / ...
        raise CheckpointError(describe_unreadable(path, error)) from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj
