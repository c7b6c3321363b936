"""Load the wav2vec 2.0 checkpoints fairseq released (and fairseq's trainer writes) without fairseq.

A fairseq file is a pickle (fairseq_spec.md §9.1): besides tensors it holds an `argparse.Namespace`
(2020 releases), a pickled omegaconf `DictConfig` (files saved Nov 2020 - Mar 2021) or a plain dict
(`cfg`, newer files), and sometimes pickled fairseq objects (meters in `extra_state`, the target
`Dictionary` in `task_state`). `safe_load` (repro.checkpoints.safe_pickle) reads them with torch's
weights-only unpickler extended by an allow-list and inert stand-ins for every `fairseq.*` name;
TorchScript archives and anything naming another global are refused before anything is built.

`load(path)` then turns the stored configuration of any era into our `ModelConfig`, builds
`Wav2Vec2Model` (arch `wav2vec2`), `Wav2Vec2CTC` (arch `wav2vec_ctc`) or `Wav2VecModel` (arch `wav2vec`:
wav2vec and vq-wav2vec, §8), and loads the state dict strictly. Our own files (`format.py`) are
accepted too.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from repro.checkpoints.format import (
    FORMAT,
    CheckpointError,
    UnsafeCheckpointError,
    check_repro_checkpoint,
    verify_checksums,
)
from repro.checkpoints.safe_pickle import FairseqDictionary, FairseqObject, safe_load
from repro.config import WAV2VEC_FIELDS, ModelConfig, TaskConfig, Wav2VecConfig
from repro.models.ctc import CTC_FIELDS, FINETUNE_OVERRIDES

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "FairseqDictionary", "FairseqObject", "LoadedModel", "NotWav2Vec2Error",
           "StoredConfig", "UnsafeCheckpointError", "load", "safe_load", "stored_config", "to_plain"]


class NotWav2Vec2Error(CheckpointError):
    """A readable checkpoint that holds something other than a wav2vec 2.0 model."""


@dataclass
class LoadedModel:
    """What `load` returns: the model (eval mode, fp32, CPU) and what it was trained with."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    task_cfg: dict[str, Any]
    dictionary: Any  # repro.data.dictionary.Dictionary | None (CTC files rarely carry it, §9.1)
    kind: str  # "wav2vec2" | "wav2vec_ctc" | "wav2vec" (wav2vec and vq-wav2vec)


# =================================================================================================
# Stored configuration -> plain dicts
# =================================================================================================


INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def resolve_interpolations(tree: Any, root: Any = None, depth: int = 0) -> Any:
    """Replace strings that are exactly `${dotted.path}` by the value at that path of `root`.

    fairseq's configs use only such node references (`II("task.normalize")`). Resolver calls
    (`${oc.env:...}`, `${now:...}`) are left verbatim on purpose: a file must not make us read
    environment variables or call anything.
    """
    root = tree if root is None else root
    if isinstance(tree, dict):
        return {key: resolve_interpolations(value, root, depth) for key, value in tree.items()}
    if isinstance(tree, list):
        return [resolve_interpolations(value, root, depth) for value in tree]
    match = INTERPOLATION.match(tree) if isinstance(tree, str) else None
    if match is None or depth > 8:
        return tree
    target: Any = root
    for part in match.group(1).split("."):
        if not isinstance(target, dict) or part not in target:
            return tree  # dangling reference: keep the text
        target = target[part]
    return resolve_interpolations(target, root, depth + 1)


# fairseq's configs nest a few levels (w2v_args inside the model section inside cfg); anything
# much deeper, or a container that contains itself, is a crafted file, not a config.
MAX_CONFIG_DEPTH = 64


class ConfigStructureError(CheckpointError):
    """A stored config that refers to itself or nests beyond MAX_CONFIG_DEPTH."""


def to_plain(obj: Any, _enclosing: tuple[int, ...] = ()) -> Any:
    """Namespaces, omegaconf containers, OrderedDicts and fairseq stand-ins -> dicts / lists / scalars.

    Raises `ConfigStructureError` for a self-referencing or absurdly deep structure (never RecursionError).
    """
    from omegaconf import DictConfig, ListConfig

    if not isinstance(obj, (dict, list, tuple, argparse.Namespace, DictConfig, ListConfig, FairseqObject)):
        if isinstance(obj, type) and issubclass(obj, FairseqObject):
            return obj.fairseq_name
        return obj
    if id(obj) in _enclosing:
        raise ConfigStructureError(f"stored config contains itself (a {type(obj).__name__} inside its own value)")
    if len(_enclosing) >= MAX_CONFIG_DEPTH:
        raise ConfigStructureError(f"stored config nests deeper than {MAX_CONFIG_DEPTH} levels")
    inner = _enclosing + (id(obj),)
    if isinstance(obj, (DictConfig, ListConfig)):
        try:
            container = OmegaConf.to_container(obj, resolve=False, enum_to_str=True)
        except RecursionError:
            raise ConfigStructureError("stored omegaconf config nests too deep to read") from None
        return resolve_interpolations(to_plain(container, inner))
    if isinstance(obj, argparse.Namespace):
        return {key: to_plain(value, inner) for key, value in vars(obj).items()}
    if isinstance(obj, dict):
        return {key: to_plain(value, inner) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(value, inner) for value in obj)
    # A fairseq ChoiceEnum member pickles as EnumClass(value): keep the value.
    if len(obj.args) == 1 and isinstance(obj.args[0], (str, int, float, bool)):
        return obj.args[0]
    if isinstance(obj.state, dict):
        return to_plain(obj.state, inner)
    return repr(obj)


@dataclass
class StoredConfig:
    """The configuration of a fairseq file, whatever its era, as plain dicts.

    `model` / `task` are the sections of the file's own model (for a fine-tuned file: the CTC
    settings); `pretrain_model` / `pretrain_task` come from `w2v_args` (fine-tuned files only).
    """

    arch: str
    model: dict[str, Any]
    task: dict[str, Any]
    pretrain_model: dict[str, Any] | None
    pretrain_task: dict[str, Any] | None
    era: str  # "args" | "cfg"


def _sections(config: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(model section, task section, era) of an args Namespace / cfg (DictConfig or dict)."""
    plain = to_plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"a {type(config).__name__}")
    if isinstance(plain.get("model"), dict):  # hydra era: sections
        task = plain.get("task") if isinstance(plain.get("task"), dict) else {}
        return plain["model"], task, "cfg"
    # argparse era: one flat namespace; arch + task name + every model/task/trainer argument.
    model = dict(plain)
    if "arch" in model and "_name" not in model:
        model["_name"] = model["arch"]
    task = dict(plain)
    task["_name"] = plain.get("task")
    return model, task, "args"


def stored_config(raw: dict[str, Any], path: Path | str) -> StoredConfig:
    """Normalise `args` (Namespace) / `cfg` (DictConfig or dict) of a fairseq checkpoint (§9.1)."""
    source = raw.get("cfg") if raw.get("cfg") is not None else raw.get("args")
    if source is None:
        raise NotWav2Vec2Error(f"{path}: a fairseq-style file without 'args' or 'cfg'; cannot tell what model it holds")
    try:
        model, task, era = _sections(source)
    except TypeError as error:
        raise CheckpointError(f"{path}: stored config is {error}, expected a Namespace or a dict") from None
    except ConfigStructureError as error:
        raise ConfigStructureError(f"{path}: {error}") from None
    arch = model.get("_name") or model.get("arch")
    if not isinstance(arch, str):
        raise NotWav2Vec2Error(f"{path}: stored config names no model architecture (no 'arch' / 'model._name')")
    pretrain_model = pretrain_task = None
    w2v_args = model.get("w2v_args")
    if w2v_args is not None:
        try:
            pretrain_model, pretrain_task, _ = _sections(w2v_args)
        except TypeError as error:
            raise CheckpointError(f"{path}: w2v_args is {error}, expected a Namespace or a dict") from None
        except ConfigStructureError as error:
            raise ConfigStructureError(f"{path}: w2v_args: {error}") from None
    return StoredConfig(arch=arch, model=model, task=task, pretrain_model=pretrain_model,
                        pretrain_task=pretrain_task, era=era)


# --- what a file holds --------------------------------------------------------------------------------

PRETRAIN_ARCH = "wav2vec2"
CTC_ARCH = "wav2vec_ctc"
WAV2VEC_ARCHS = ("wav2vec", "audio_cpc")  # checkpoint_utils renames audio_cpc to wav2vec (§9.3)
FOREIGN_ARCHS = {
    "wav2vec_seq2seq": "wav2vec 2.0 encoder with a Transformer decoder; repro implements the CTC head only",
    "hubert": "HuBERT",
    "hubert_ctc": "fine-tuned HuBERT",
    "data2vec_audio": "data2vec (audio)",
    "wav2vec2_laser": "wav2vec 2.0 LASER distillation",
}


def describe_arch(arch: str, model_section: dict[str, Any]) -> str:
    """Human name of a non-wav2vec-2.0 architecture."""
    if arch in ("wav2vec", "audio_cpc"):
        vq_type = model_section.get("vq_type")
        return f"vq-wav2vec, {vq_type} quantizer" if vq_type in ("gumbel", "kmeans") else "wav2vec v1"
    if arch.startswith("transformer_lm") or arch.startswith("fconv_lm") or arch == "lstm_lm":
        return "a language model"
    if arch in FOREIGN_ARCHS:
        return FOREIGN_ARCHS[arch]
    if arch.startswith("transformer") or arch.startswith("bart") or arch.startswith("roberta"):
        return "a text model"
    return "unknown to repro"


def check_architecture(stored: StoredConfig, path: Path | str) -> str:
    """The kind ('wav2vec2' / 'wav2vec_ctc') or `NotWav2Vec2Error` saying what the file is."""
    if stored.arch == PRETRAIN_ARCH:
        return "wav2vec2"
    if stored.arch == CTC_ARCH:
        if stored.pretrain_model is None:
            raise CheckpointError(
                f"{path}: fine-tuned (wav2vec_ctc) checkpoint without w2v_args; the pretraining config it "
                "needs is not stored in the file"
            )
        pretrain_arch = stored.pretrain_model.get("_name") or stored.pretrain_model.get("arch")
        if pretrain_arch not in (None, PRETRAIN_ARCH):
            raise NotWav2Vec2Error(
                f"{path}: a CTC model on top of arch {pretrain_arch!r} "
                f"({describe_arch(str(pretrain_arch), stored.pretrain_model)}), not on wav2vec 2.0"
            )
        return "wav2vec_ctc"
    if stored.arch in WAV2VEC_ARCHS:
        return "wav2vec"
    raise NotWav2Vec2Error(
        f"{path}: arch {stored.arch!r} ({describe_arch(stored.arch, stored.model)}) is not a wav2vec 2.0, wav2vec or vq-wav2vec model; "
        f"repro loads arch '{PRETRAIN_ARCH}' (pretrained), '{CTC_ARCH}' (fine-tuned) and 'wav2vec' "
        "(wav2vec, vq-wav2vec) checkpoints"
    )


# --- ModelConfig / task config ----------------------------------------------------------------------

MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
TASK_FIELDS = {f.name for f in dataclasses.fields(TaskConfig)}
# Stored fields that select code paths repro does not implement: field -> the only value we support.
UNSUPPORTED_UNLESS = {
    "layer_type": "transformer",
    "pos_conv_depth": 1,
    "quantize_input": False,
    "target_glu": False,
    "quantizer_depth": 1,
    "negatives_from_everywhere": False,
    "codebook_negatives": 0,
}
def _coerce(name: str, value: Any) -> Any:
    """Argparse-era spellings -> our types: '(2,0.5,0.999995)' -> [2.0, 0.5, 0.999995], ..."""
    if name == "latent_temp":
        if isinstance(value, str):
            value = ast.literal_eval(value)
        return [float(v) for v in value]
    if name == "conv_feature_layers" and not isinstance(value, str):
        return repr([tuple(layer) for layer in value])
    return value


def _model_values(section: dict[str, Any], path: Path | str, what: str) -> dict[str, Any]:
    """The ModelConfig fields present in a stored model section (unknown ones listed at debug level)."""
    for name, supported in UNSUPPORTED_UNLESS.items():
        if name in section and section[name] is not None and section[name] != supported:
            raise CheckpointError(
                f"{path}: {what} uses {name}={section[name]!r}, which repro does not implement "
                f"(only {supported!r})"
            )
    values: dict[str, Any] = {}
    unknown = []
    for name, value in section.items():
        if name not in MODEL_FIELDS or name == "_name":
            unknown.append(name)
            continue
        if value is None and "None" not in str(MODEL_FIELDS[name].type):
            log.debug("%s: %s %s is None; using the default", path, what, name)
            continue
        try:
            values[name] = _coerce(name, value)
        except (ValueError, SyntaxError, TypeError) as error:
            raise CheckpointError(f"{path}: {what} field {name}={value!r} cannot be read: {error}") from None
    if unknown:
        log.debug("%s: %s fields not used by repro: %s", path, what, ", ".join(sorted(unknown)))
    return values


def _as_model_config(values: dict[str, Any], path: Path | str, schema: type = ModelConfig) -> ModelConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except Exception as error:  # omegaconf ValidationError & co: a value of the wrong type
        raise CheckpointError(f"{path}: stored model config does not fit repro's {schema.__name__}: {error}") from None


def _task_normalize(task: dict[str, Any] | None) -> bool | None:
    if task is None or task.get("normalize") is None:
        return None
    return bool(task["normalize"])


def model_config_from_stored(stored: StoredConfig, kind: str, path: Path | str) -> ModelConfig:
    """Our ModelConfig: missing (newer) fields take the dataclass defaults (§9.1, trap 18)."""
    if kind == "wav2vec":
        return wav2vec_config_from_stored(stored, path)
    if kind == "wav2vec2":
        values = _model_values(stored.model, path, "model config")
        values["_name"] = "wav2vec2"
        values["normalize"] = _task_normalize(stored.task)
        return _as_model_config(values, path)
    assert stored.pretrain_model is not None
    values = _model_values(stored.pretrain_model, path, "w2v_args (pretraining) model config")
    finetune = _model_values(stored.model, path, "fine-tuning model config")
    # The fine-tuning settings replace the pretrained model's (fairseq's arg_overrides, §3.1); only
    # those the file states: an argparse-era file lacks the fields added later.
    for name in FINETUNE_OVERRIDES + CTC_FIELDS:
        if name in finetune and name not in ("normalize", "w2v_path"):
            values[name] = finetune[name]
    # w2v_path is where the pretrained model lay on FAIR's machines (§9.1): meaningless here.
    if "layerdrop" in finetune:
        values["encoder_layerdrop"] = finetune["layerdrop"]
    values["_name"] = "wav2vec_ctc"
    normalize = _task_normalize(stored.task)
    pretrain_normalize = _task_normalize(stored.pretrain_task)
    if normalize is None:
        normalize = pretrain_normalize
    elif pretrain_normalize is not None and pretrain_normalize != normalize:
        # fairseq asserts these agree; the fine-tuning data pipeline is what the weights expect.
        log.warning("%s: fine-tuning normalize=%s differs from pretraining normalize=%s; using %s",
                    path, normalize, pretrain_normalize, normalize)
    values["normalize"] = normalize
    return _as_model_config(values, path)


# --- wav2vec / vq-wav2vec (arch `wav2vec`, §8) ------------------------------------------------------

# fairseq's hydra-era Wav2VecConfig defaults where they differ from the 2019 argparse defaults that
# Wav2VecConfig keeps (fairseq 3335de5f base_wav2vec_architecture). A `cfg`-era file normally stores
# every field; one that lacks a field gets what today's fairseq would have used.
HYDRA_ERA_WAV2VEC_DEFAULTS: dict[str, Any] = {
    "num_negatives": 10,
    "skip_connections_agg": True,
    "log_compression": True,
    "conv_feature_layers": "[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), "
                           "(512, 1, 1), (512, 1, 1)]",
    "conv_aggregator_layers": "[" + ", ".join(f"(512, {k}, 1)" for k in range(2, 14)) + "]",
}


def _wav2vec_value(name: str, value: Any) -> Any:
    """Stored spellings -> Wav2VecConfig types: '(2,0.5,0.999995)' -> [2.0, 0.5, 0.999995], layer lists ->
    their literal, offset 3 -> '3', cross_sample_negatives False (2019) -> 0, vq_type None -> 'none'."""
    if name == "vq_temp":
        if isinstance(value, str):
            value = ast.literal_eval(value)
        return [float(v) for v in value]
    if name in ("conv_feature_layers", "conv_aggregator_layers") and not isinstance(value, str):
        return repr([tuple(layer) for layer in value])
    if name == "offset":
        return str(value)
    if name == "cross_sample_negatives":
        return int(value)
    if name == "vq_type" and value is None:
        return "none"
    return value


def wav2vec_config_from_stored(stored: StoredConfig, path: Path | str) -> Wav2VecConfig:
    """Wav2VecConfig from a wav2vec / vq-wav2vec file: every stored field wins; a field the file lacks
    takes the default of its era (2019 argparse for `args`, today's Wav2VecConfig for `cfg`) (§8.1)."""
    section = stored.model
    values: dict[str, Any] = dict(HYDRA_ERA_WAV2VEC_DEFAULTS) if stored.era == "cfg" else {}
    for name in WAV2VEC_FIELDS:
        if name in ("_name", "negatives_as_fairseq") or name not in section:
            continue
        if section[name] is None and name not in ("sample_distance", "vq_type"):
            continue
        try:
            values[name] = _wav2vec_value(name, section[name])
        except (ValueError, SyntaxError, TypeError) as error:
            raise CheckpointError(f"{path}: model field {name}={section[name]!r} cannot be read: {error}") from None
    if section.get("encoder", "cnn") != "cnn":  # 2019 args: the feature encoder type
        raise CheckpointError(f"{path}: encoder={section['encoder']!r}; only the 'cnn' feature encoder exists")
    values["_name"] = "wav2vec"
    return _as_model_config(values, path, Wav2VecConfig)  # type: ignore[return-value]


def task_config_from_stored(stored: StoredConfig) -> dict[str, Any]:
    """TaskConfig fields as a plain dict (defaults for what the file lacks)."""
    task = {name: value for name, value in stored.task.items() if name in TASK_FIELDS}
    name = task.get("_name")
    # checkpoint_utils upgrades (§9.3); an argparse-era 'audio_pretraining' with labels was fine-tuning.
    if name == "speech_pretraining":
        name = "audio_pretraining"
    if name == "audio_pretraining" and task.get("labels"):
        name = "audio_finetuning"
    task["_name"] = name or ("audio_finetuning" if stored.arch == CTC_ARCH else "audio_pretraining")
    result = {f.name: f.default for f in dataclasses.fields(TaskConfig)
              if f.default is not dataclasses.MISSING}
    result["data"] = None
    result.update(task)
    if result["data"] == "???":
        result["data"] = None
    return result


def dictionary_from_task_state(raw: dict[str, Any], path: Path | str) -> Any:
    """Our Dictionary from a pickled fairseq Dictionary under `task_state`, or None (§9.1)."""
    task_state = raw.get("task_state")
    if not isinstance(task_state, dict):
        return None
    candidates = [task_state.get("target_dictionary")] + list(task_state.values())
    for candidate in candidates:
        if isinstance(candidate, FairseqDictionary):
            return candidate.to_dictionary(path)
    return None


# =================================================================================================
# State dict and model
# =================================================================================================

CTC_ENCODER_PREFIX = "w2v_encoder.w2v_model."
CTC_PROJ_WEIGHT = "w2v_encoder.proj.weight"
# Keys of the pretraining model that a fine-tuned model does not have (fairseq drops them, §3.1).
CTC_DROPPED_MODULES = ("quantizer", "project_q", "final_proj", "target_glu", "_ema", "target_proj", "decoder")
WEIGHT_NORM_RENAMES = {"weight_g": "parametrizations.weight.original0",
                       "weight_v": "parametrizations.weight.original1"}


def fp32_state(state: Any, path: Path | str) -> dict[str, torch.Tensor]:
    """The stored state dict with half / bfloat16 tensors cast to float32."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: entry 'model' is not a state dict of tensors")
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def drop_pretraining_keys(state: dict[str, torch.Tensor], path: Path | str) -> dict[str, torch.Tensor]:
    kept, dropped = {}, []
    for key, value in state.items():
        module = key[len(CTC_ENCODER_PREFIX):].split(".", 1)[0] if key.startswith(CTC_ENCODER_PREFIX) else ""
        if module in CTC_DROPPED_MODULES or module.startswith("_ema"):
            dropped.append(key)
        else:
            kept[key] = value
    if dropped:
        log.debug("%s: dropped %d pretraining-only keys (%s, ...)", path, len(dropped), dropped[0])
    return kept


def _match_weight_norm_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """fairseq's `pos_conv.0.weight_g/weight_v` vs newer torch's `parametrizations.weight.original0/1`."""
    renamed = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in list(WEIGHT_NORM_RENAMES.items()) + [(n, o) for o, n in WEIGHT_NORM_RENAMES.items()]:
                if key.endswith("." + old) and key[: -len(old)] + new in expected:
                    key = key[: -len(old)] + new
                    break
        renamed[key] = value
    return renamed


def build_model(kind: str, model_cfg: ModelConfig, state: dict[str, torch.Tensor], path: Path | str
                ) -> tuple[torch.nn.Module, int | None]:
    """Instantiate our model for `kind` and load `state` strictly; returns (model, vocab size or None)."""
    if kind == "wav2vec2":
        from repro.models.wav2vec2 import Wav2Vec2Model

        model: torch.nn.Module = Wav2Vec2Model(model_cfg)
        vocab_size = None
    elif kind == "wav2vec":
        from repro.models.wav2vec import Wav2VecModel

        try:
            model = Wav2VecModel(model_cfg)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        vocab_size = None
    else:
        from repro.models.ctc import Wav2Vec2CTC

        if CTC_PROJ_WEIGHT not in state:
            raise CheckpointError(f"{path}: fine-tuned checkpoint without {CTC_PROJ_WEIGHT!r}")
        vocab_size = int(state[CTC_PROJ_WEIGHT].shape[0])
        model = Wav2Vec2CTC(model_cfg, vocab_size)
    expected = model.state_dict()
    state = _match_weight_norm_names(state, set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                   if key in state and state[key].shape != value.shape]
    if missing or unexpected or wrong_shape:
        def listing(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        problems = [f"{label}: {listing(items)}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", wrong_shape))
                    if items]
        raise CheckpointError(f"{path}: state dict does not match a {kind} model built from its config; "
                              + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, vocab_size


def _load_repro(obj: dict[str, Any], path: Path) -> LoadedModel:
    from repro.data.dictionary import SPECIAL_SYMBOLS, Dictionary

    check_repro_checkpoint(obj, path)
    verify_checksums(obj, path)
    kind = obj["kind"]
    schema = Wav2VecConfig if kind == "wav2vec" else ModelConfig
    known = WAV2VEC_FIELDS if kind == "wav2vec" else MODEL_FIELDS
    unknown = sorted(set(obj["model_cfg"]) - set(known))
    if unknown:
        raise CheckpointError(f"{path}: model_cfg has fields unknown to this repro version: {', '.join(unknown)}")
    model_cfg = _as_model_config(dict(obj["model_cfg"]), path, schema)
    model, vocab_size = build_model(kind, model_cfg, fp32_state(obj["model"], path), path)
    dictionary = None
    if obj.get("dictionary") is not None:
        symbols = list(obj["dictionary"])
        if tuple(symbols[:4]) == SPECIAL_SYMBOLS:
            symbols = symbols[4:]
        dictionary = Dictionary.from_symbols(symbols)
        _check_vocab(dictionary, vocab_size, path)
    return LoadedModel(model=model, model_cfg=model_cfg, task_cfg=dict(obj["task_cfg"]),
                       dictionary=dictionary, kind=kind)


def _check_vocab(dictionary: Any, vocab_size: int | None, path: Path | str) -> None:
    if dictionary is not None and vocab_size is not None and len(dictionary) != vocab_size:
        raise CheckpointError(
            f"{path}: the stored dictionary has {len(dictionary)} symbols but the CTC head has {vocab_size} outputs"
        )


def describe_foreign_dict(raw: dict[str, Any]) -> str:
    """What a torch file that is neither fairseq's nor ours seems to hold."""
    keys = [str(k) for k in raw]
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        if any(k.startswith("wav2vec2.") for k in keys):
            return "a bare state dict with Hugging Face transformers key names (use the HF converter's input instead)"
        return f"a bare state dict of {len(keys)} tensors with no model configuration"
    return "a dict with top-level keys " + ", ".join(sorted(keys)[:8])


def _roberta_loader() -> Any:
    """repro.checkpoints.roberta.load_roberta_raw (imported late: that module builds on this one)."""
    from repro.checkpoints.roberta import load_roberta_raw

    return load_roberta_raw


def load(path: str | Path) -> LoadedModel:
    """Load a wav2vec 2.0 (pretrained or CTC), wav2vec or vq-wav2vec checkpoint: fairseq's (any era) or ours.

    RoBERTa units models (fairseq arch roberta*, our kinds roberta / roberta_ctc) are loaded by
    repro.checkpoints.roberta, with the dict.txt beside the file.
    """
    path = Path(path)
    raw = safe_load(path)
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise CheckpointError(f"{path}: format {raw['format']!r} is not {FORMAT!r}")
        if raw.get("kind") in ("roberta", "roberta_ctc"):  # units models: repro.checkpoints.roberta
            return _roberta_loader()(raw, path)
        return _load_repro(raw, path)
    if "model" not in raw or (raw.get("args") is None and raw.get("cfg") is None):
        raise NotWav2Vec2Error(f"{path}: not a fairseq or repro checkpoint: {describe_foreign_dict(raw)}")
    stored = stored_config(raw, path)
    if stored.arch.startswith("roberta"):
        return _roberta_loader()(raw, path)
    kind = check_architecture(stored, path)
    model_cfg = model_config_from_stored(stored, kind, path)
    task_cfg = task_config_from_stored(stored)
    state = fp32_state(raw["model"], path)
    if kind == "wav2vec_ctc":
        state = drop_pretraining_keys(state, path)
    model, vocab_size = build_model(kind, model_cfg, state, path)
    dictionary = dictionary_from_task_state(raw, path) if kind == "wav2vec_ctc" else None
    _check_vocab(dictionary, vocab_size, path)
    log.info("%s: loaded fairseq %s checkpoint (%s era)%s", path, kind, stored.era,
             "" if dictionary is None else f" with a {len(dictionary)}-symbol dictionary")
    return LoadedModel(model=model, model_cfg=model_cfg, task_cfg=task_cfg, dictionary=dictionary, kind=kind)
