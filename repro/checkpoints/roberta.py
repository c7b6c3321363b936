"""Load fairseq RoBERTa checkpoints (the released `bert_kmeans` units model) without fairseq.

`bert_kmeans.tar` (examples/wav2vec/README.md, "Roberta on K-means codes") extracts to a folder with
the checkpoint and its `dict.txt` of vq-wav2vec k-means code strings (`12-304`). The checkpoint is a
fairseq pickle read through the allow-list (`repro.checkpoints.fairseq.safe_load`); its config is the
2019 argparse `args` or today's `cfg`, normalised by `stored_config`.

Key layouts (fairseq's RobertaModel.upgrade_state_dict_named does the same renames):
* 2019-2020: `decoder.sentence_encoder.*`, `decoder.sentence_encoder.emb_layer_norm.*`, `decoder.lm_head.*`;
  files from before fairseq split the attention projections hold `self_attn.in_proj_weight/bias`;
* 2021 on: `encoder.sentence_encoder.*`, `...layernorm_embedding.*`, `encoder.lm_head.*`, a `version` buffer.

The vocabulary is the file's symbols after the 4 specials plus `<mask>`, which fairseq's masked_lm task
appends at load time; its size must equal the rows of `embed_tokens`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from repro.checkpoints.fairseq import LoadedModel, safe_load, stored_config
from repro.checkpoints.format import FORMAT, CheckpointError, check_repro_checkpoint
from repro.config import ModelConfig
from repro.data.dictionary import SPECIAL_SYMBOLS, Dictionary, DictionaryError
from repro.data.units import MASK_SYMBOL, load_unit_dictionary
from repro.models.roberta import RobertaCTC, RobertaModel

log = logging.getLogger(__name__)

ROBERTA_ARCHS = ("roberta", "roberta_base", "roberta_large")
KINDS = ("roberta", "roberta_ctc")
DICTIONARY_NAME = "dict.txt"
SENTENCE_ENCODER = "encoder.sentence_encoder."
EMBED_TOKENS = SENTENCE_ENCODER + "embed_tokens.weight"
EMBED_POSITIONS = SENTENCE_ENCODER + "embed_positions.weight"
LM_HEAD_WEIGHT = "encoder.lm_head.weight"
PADDING_INDEX = 1

# fairseq base_architecture defaults (roberta_base) and the roberta_large overrides.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "roberta": {"encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
                "encoder_attention_heads": 12},
    "roberta_large": {"encoder_layers": 24, "encoder_embed_dim": 1024, "encoder_ffn_embed_dim": 4096,
                      "encoder_attention_heads": 16},
}
COMMON_DEFAULTS = {"activation_fn": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
                   "encoder_layerdrop": 0.0}
# Options of today's RobertaModel that select code paths repro does not implement -> the supported value.
UNSUPPORTED_UNLESS = {"encoder_normalize_before": False, "layernorm_embedding": True, "no_scale_embedding": True,
                      "untie_weights_roberta": False, "encoder_learned_pos": True,
                      "no_token_positional_embeddings": False, "adaptive_input": False}


class NotRobertaError(CheckpointError):
    """A readable checkpoint that holds something other than a RoBERTa model."""


# --- what the file is ---------------------------------------------------------------------------------


def describe_model(arch: str, section: dict[str, Any]) -> str:
    if arch in ("wav2vec", "audio_cpc"):
        vq_type = section.get("vq_type")
        return f"a vq-wav2vec model ({vq_type} quantizer)" if vq_type in ("gumbel", "kmeans") else "a wav2vec model"
    if arch.startswith("wav2vec"):
        return "a wav2vec 2.0 model"
    return f"arch {arch!r}"


def check_roberta_arch(arch: str, section: dict[str, Any], path: Path | str) -> str:
    """The arch name, or NotRobertaError saying what the file holds instead.

    Any `roberta*` encoder arch is accepted here; options repro does not implement (pre-LN
    `roberta_prenorm`, untied heads, ...) are refused by name in `model_config_from_stored`.
    """
    if arch in ROBERTA_ARCHS or (arch.startswith("roberta") and arch != "roberta_enc_dec"):
        return arch
    hint = ""
    if arch in ("wav2vec", "audio_cpc"):
        hint = ("; the vq-wav2vec model tokenizes audio into the units (`python -m repro.tools tokenize`), "
                "the RoBERTa model (bert_kmeans) is trained on them: pass the RoBERTa checkpoint here")
    raise NotRobertaError(
        f"{path}: holds {describe_model(arch, section)}, not a RoBERTa model "
        f"(arch one of {', '.join(ROBERTA_ARCHS)}){hint}"
    )


# --- state dict ---------------------------------------------------------------------------------------


def upgrade_state_dict(state: dict[str, torch.Tensor], path: Path | str) -> dict[str, torch.Tensor]:
    """Any era's keys -> today's (`encoder.*`, `layernorm_embedding`, q/k/v projections); fp32; heads dropped."""
    upgraded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry 'model' is not a state dict of tensors ({key!r})")
        if key.startswith("decoder."):
            key = "encoder." + key[len("decoder."):]
        key = key.replace(".emb_layer_norm.", ".layernorm_embedding.")
        if key.endswith(".version") or key.startswith("classification_heads."):
            continue  # fairseq's format-version buffers; sentence-classification heads (none for units)
        value = value.float() if value.is_floating_point() else value
        if ".self_attn.in_proj_" in key:  # pre-Oct-2019 MultiheadAttention: one packed q/k/v projection
            prefix, kind = key.split(".self_attn.in_proj_")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                upgraded[f"{prefix}.self_attn.{name}.{kind}"] = part.contiguous()
            continue
        upgraded[key] = value
    if EMBED_TOKENS not in upgraded:
        raise CheckpointError(f"{path}: no token embeddings ({EMBED_TOKENS!r} or the 2019 'decoder.' name)")
    head = upgraded.get(LM_HEAD_WEIGHT)
    if head is not None and not torch.equal(head, upgraded[EMBED_TOKENS]):
        raise CheckpointError(
            f"{path}: {LM_HEAD_WEIGHT} differs from the token embeddings; repro's RoBERTa ties them as fairseq "
            "does unless untie_weights_roberta (not supported)"
        )
    upgraded.setdefault(LM_HEAD_WEIGHT, upgraded[EMBED_TOKENS])
    return upgraded


def model_config_from_stored(arch: str, section: dict[str, Any], state: dict[str, torch.Tensor],
                             path: Path | str) -> ModelConfig:
    """ModelConfig of a RoBERTa file: the stored fields, fairseq's arch defaults for the missing ones."""
    for name, supported in UNSUPPORTED_UNLESS.items():
        # The 2019 RobertaEncoder ignored encoder_normalize_before (it always meant "embedding LayerNorm").
        legacy = name == "encoder_normalize_before" and "layernorm_embedding" not in section
        if not legacy and section.get(name) is not None and bool(section[name]) != supported:
            raise CheckpointError(f"{path}: RoBERTa with {name}={section[name]!r} is not implemented "
                                  f"(repro supports {supported!r})")
    values = dict(COMMON_DEFAULTS)
    values.update(ARCH_DEFAULTS["roberta_large" if "large" in arch else "roberta"])
    for name in list(values) + ["encoder_layers"]:
        if section.get(name) is not None:
            values[name] = section[name]
    rows = int(state[EMBED_POSITIONS].shape[0]) if EMBED_POSITIONS in state else None
    stored_positions = section.get("max_positions") or section.get("tokens_per_sample")
    if rows is not None:
        values["max_positions"] = rows - PADDING_INDEX - 1
        if stored_positions is not None and int(stored_positions) != values["max_positions"]:
            raise CheckpointError(f"{path}: max_positions={stored_positions} but embed_positions has {rows} rows "
                                  f"(expected max_positions + 2)")
    values["_name"] = "roberta"
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))  # type: ignore[return-value]
    except Exception as error:
        raise CheckpointError(f"{path}: stored RoBERTa config does not fit repro's ModelConfig: {error}") from None


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str, what: str) -> None:
    """load_state_dict(strict=True) with an error that lists missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
              if key in state and state[key].shape != value.shape]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("shape mismatch (file vs model)", shapes)) if items]
        raise CheckpointError(f"{path}: state dict does not match a {what} built from its config; "
                              + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    model.eval()


# --- dictionary -----------------------------------------------------------------------------------------


def unit_dictionary(path: Path, vocab_rows: int, checkpoint: Path | str) -> Dictionary:
    """dict.txt + `<mask>`, checked against the embedding rows (fairseq indexes would be off otherwise)."""
    try:
        dictionary, _ = load_unit_dictionary(path)
    except DictionaryError as error:
        raise CheckpointError(str(error)) from None
    if len(dictionary) != vocab_rows:
        raise CheckpointError(
            f"{path}: {len(dictionary) - 5} codes give {len(dictionary)} symbols with the 4 specials and <mask>, "
            f"but {checkpoint} embeds {vocab_rows}; this dict.txt does not belong to the checkpoint"
        )
    return dictionary


def resolve_paths(source: Path, dictionary_path: Path | None) -> tuple[Path, Path | None]:
    """(checkpoint file, dict.txt or None): a folder like the extracted bert_kmeans.tar, or a file."""
    if source.is_dir():
        candidates = sorted(source.glob("*.pt"))
        if not candidates:
            raise CheckpointError(f"{source}: folder without a .pt checkpoint (expected the extracted bert_kmeans.tar)")
        if len(candidates) > 1:
            preferred = [c for c in candidates if c.name in ("model.pt", "checkpoint_best.pt")]
            if not preferred:
                raise CheckpointError(f"{source}: several checkpoints ({', '.join(c.name for c in candidates)}); "
                                      "pass the file")
            candidates = preferred[:1]
        source = candidates[0]
    if dictionary_path is None and (source.parent / DICTIONARY_NAME).is_file():
        dictionary_path = source.parent / DICTIONARY_NAME
    return source, dictionary_path


# --- loading --------------------------------------------------------------------------------------------


def build_roberta(kind: str, model_cfg: ModelConfig, state: dict[str, torch.Tensor], path: Path | str,
                  mask_index: int | None = None) -> torch.nn.Module:
    vocab_rows = int(state[EMBED_TOKENS if kind == "roberta" else "sentence_encoder.embed_tokens.weight"].shape[0])
    if kind == "roberta":
        model: torch.nn.Module = RobertaModel(model_cfg, vocab_rows)
    else:
        model = RobertaCTC(model_cfg, vocab_rows, int(state["proj.weight"].shape[0]), mask_index)
    load_state_strict(model, state, path, f"{kind} model")
    return model


def symbols_dictionary(symbols: list[str] | None) -> Dictionary | None:
    """Our Dictionary from a stored symbol list (with or without the 4 specials)."""
    if symbols is None:
        return None
    symbols = list(symbols)
    return Dictionary.from_symbols(symbols[4:] if tuple(symbols[:4]) == SPECIAL_SYMBOLS else symbols)


def _load_repro(raw: dict[str, Any], path: Path) -> LoadedModel:
    """One of our RoBERTa files (format.py layout, kind roberta / roberta_ctc).

    `dictionary` holds the units for `roberta` and the letters for `roberta_ctc` (whose units are
    `task_cfg["unit_symbols"]`), so a fine-tuned file reads like a wav2vec_ctc one.
    """
    check_repro_checkpoint(raw, path)
    kind = raw["kind"]
    if kind not in KINDS:
        raise NotRobertaError(f"{path}: a repro {kind!r} checkpoint, not a RoBERTa model ({', '.join(KINDS)})")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw["model_cfg"]))
    dictionary = symbols_dictionary(raw.get("dictionary"))
    units = dictionary if kind == "roberta" else symbols_dictionary(raw["task_cfg"].get("unit_symbols"))
    mask_index = units.index(MASK_SYMBOL) if units is not None and MASK_SYMBOL in units else None
    model = build_roberta(kind, model_cfg, dict(raw["model"]), path, mask_index)  # type: ignore[arg-type]
    return LoadedModel(model=model, model_cfg=model_cfg, task_cfg=dict(raw["task_cfg"]),  # type: ignore[arg-type]
                       dictionary=dictionary, kind=kind)


def load_roberta(source: str | Path, dictionary_path: str | Path | None = None) -> LoadedModel:
    """A fairseq RoBERTa checkpoint (file, or folder with the file and dict.txt) or one of our RoBERTa files.

    For fairseq files `dictionary` is the unit Dictionary (`dict.txt` beside the checkpoint, or
    `dictionary_path`, with `<mask>` appended); None when no dict.txt is found.
    """
    path, dict_path = resolve_paths(Path(source), Path(dictionary_path) if dictionary_path else None)
    return load_roberta_raw(safe_load(path), path, dict_path)


def load_roberta_raw(raw: dict[str, Any], path: Path, dict_path: Path | None = None) -> LoadedModel:
    """`load_roberta` on an already unpickled file (repro.checkpoints.fairseq.load hands RoBERTa files here)."""
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise CheckpointError(f"{path}: format {raw['format']!r} is not {FORMAT!r}")
        return _load_repro(raw, path)
    if "model" not in raw:
        raise NotRobertaError(f"{path}: not a fairseq checkpoint (no 'model' entry; keys {sorted(map(str, raw))[:8]})")
    stored = stored_config(raw, path)
    arch = check_roberta_arch(stored.arch, stored.model, path)
    state = upgrade_state_dict(raw["model"], path)
    model_cfg = model_config_from_stored(arch, stored.model, state, path)
    model = build_roberta("roberta", model_cfg, state, path)
    vocab_rows = int(state[EMBED_TOKENS].shape[0])
    if dict_path is None and (path.parent / DICTIONARY_NAME).is_file():
        dict_path = path.parent / DICTIONARY_NAME
    dictionary = unit_dictionary(dict_path, vocab_rows, path) if dict_path is not None else None
    if dictionary is None:
        log.warning("%s: no dict.txt beside the checkpoint; unit strings cannot be mapped to indices", path)
    task = {key: stored.task.get(key) for key in ("tokens_per_sample", "sample_break_mode", "mask_prob",
                                                   "leave_unmasked_prob", "random_token_prob") if key in stored.task}
    task["_name"] = "masked_lm"
    log.info("%s: loaded fairseq RoBERTa (%s era, %d layers, %d symbols)", path, stored.era,
             model_cfg.encoder_layers, vocab_rows)
    return LoadedModel(model=model, model_cfg=model_cfg, task_cfg=task, dictionary=dictionary, kind="roberta")
