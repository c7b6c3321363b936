"""Our wav2vec 2.0 models in Hugging Face transformers' and torchaudio's formats, and back.

* `export_hf`: a `save_pretrained` folder (config.json, model.safetensors; for CTC models vocab.json,
  tokenizer_config.json, special_tokens_map.json; preprocessor_config.json) that
  `transformers.Wav2Vec2ForCTC` / `Wav2Vec2ForPreTraining` / `Wav2Vec2Model.from_pretrained` load.
* `export_torchaudio`: a state dict and the keyword arguments of `torchaudio.models.wav2vec2_model`.
* `load_hf`: an HF folder (ours or a user's HF fine-tuned model) as a `LoadedModel`, so our decoders
  and sweeps evaluate it.

Only files are written here: transformers is never imported (it is a test-only dependency); the
safetensors package writes and reads the weights (it never unpickles). Our keys are fairseq's
(fairseq_spec.md §9.4, §9.5 list the HF / torchaudio names they map to).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from repro.checkpoints.fairseq import LoadedModel, load
from repro.checkpoints.format import CheckpointError
from repro.config import ModelConfig
from repro.data.dictionary import Dictionary, DictionaryError
from repro.models.wav2vec2 import parse_conv_layers

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_LEGACY_WEIGHTS = "pytorch_model.bin"
HF_VOCAB = "vocab.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"
HF_FEATURE_EXTRACTOR = "preprocessor_config.json"
TORCHAUDIO_WEIGHTS = "model.pt"
TORCHAUDIO_KWARGS = "wav2vec2_model_kwargs.json"
WORD_DELIMITER = "|"
# HF's CTC blank is its pad token; fairseq's blank is index 0 (`<s>`). HF's converter keeps the rows
# and renames indices 0 and 1, so our index i is HF id i (fairseq_spec.md §9.5).
HF_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# A CTC output row HF's vocabulary has no use for (e.g. fairseq's <pad>): it must never win the argmax.
NEVER_EMITTED_BIAS = -1e9

CTC_PREFIX = "w2v_encoder.w2v_model."
CTC_HEAD = "w2v_encoder.proj."
PRETRAINING_HEADS = {
    "quantizer.vars": "quantizer.codevectors",
    "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
    "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
    "project_q.weight": "project_q.weight",
    "project_q.bias": "project_q.bias",
    "final_proj.weight": "project_hid.weight",
    "final_proj.bias": "project_hid.bias",
}
CTC_HEADS = {CTC_HEAD + "weight": "lm_head.weight", CTC_HEAD + "bias": "lm_head.bias"}
# Weight-normalised positional convolution: fairseq's names -> torch parametrization names.
WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


# =================================================================================================
# Key mapping (one place: the exporter, the importer and the parity tests use it)
# =================================================================================================


def encoder_key(key: str, style: str) -> str | None:
    """One key of our (fairseq's) Wav2Vec2Model encoder in torchaudio ('ta') or HF ('hf') names.

    None: the key has no counterpart there (the pretraining heads; mask_emb in torchaudio).
    """
    ta = style == "ta"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m[1]}.conv.{m[2]}"
    # group norm (first block, 'default' mode) is `.2`, a layer norm inside TransposeLast is `.2.1`
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.2(?:\.1)?\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m[1]}.layer_norm.{m[2]}"
    projection = "encoder.feature_projection." if ta else "feature_projection."
    encoder = "encoder.transformer." if ta else "encoder."
    m = re.fullmatch(r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias)", key)
    if m:
        return f"{encoder}pos_conv_embed.conv.{WEIGHT_NORM.get(m[1], m[1])}"
    simple = {
        "post_extract_proj.weight": projection + "projection.weight",
        "post_extract_proj.bias": projection + "projection.bias",
        "layer_norm.weight": projection + "layer_norm.weight",
        "layer_norm.bias": projection + "layer_norm.bias",
        "encoder.layer_norm.weight": encoder + "layer_norm.weight",
        "encoder.layer_norm.bias": encoder + "layer_norm.bias",
        "mask_emb": None if ta else "masked_spec_embed",
    }
    if key in simple:
        return simple[key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        rest = m[2]
        for ours, theirs in (("self_attn.", "attention."), ("self_attn_layer_norm.", "layer_norm."),
                             ("fc1.", "feed_forward.intermediate_dense."), ("fc2.", "feed_forward.output_dense.")):
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
        return f"{encoder}layers.{m[1]}.{rest}"
    return None


def to_hf_state(state: dict[str, torch.Tensor], head: str | None = None) -> dict[str, torch.Tensor]:
    """Our state dict in HF names. head None: Wav2Vec2Model; 'pretraining': Wav2Vec2ForPreTraining
    (quantizer and projections kept); 'ctc': Wav2Vec2ForCTC. Keys without a counterpart are dropped."""
    prefix = "" if head is None else "wav2vec2."
    out = {}
    for key, value in state.items():
        top = PRETRAINING_HEADS.get(key) or CTC_HEADS.get(key)
        if top is not None:
            if head is not None:
                out[top] = value
            continue
        mapped = encoder_key(key.removeprefix(CTC_PREFIX), "hf")
        if mapped is not None:
            out[prefix + mapped] = value
    return out


def to_torchaudio_state(state: dict[str, torch.Tensor], ctc: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict in torchaudio's `wav2vec2_model` names (the CTC projection is its `aux`)."""
    out = {}
    for key, value in state.items():
        if ctc and key.startswith(CTC_HEAD):
            out["aux." + key.removeprefix(CTC_HEAD)] = value
            continue
        mapped = encoder_key(key.removeprefix(CTC_PREFIX) if ctc else key, "ta")
        if mapped is not None:
            out[mapped] = value
    return out


# =================================================================================================
# Configurations
# =================================================================================================


def torchaudio_kwargs(cfg: ModelConfig, aux_num_out: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `torchaudio.models.wav2vec2_model` for our architecture (inference: no dropout)."""
    return dict(
        extractor_mode="layer_norm" if cfg.extractor_mode == "layer_norm" else "group_norm",
        extractor_conv_layer_config=[list(layer) for layer in parse_conv_layers(cfg.conv_feature_layers)],
        extractor_conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=cfg.conv_pos,
        encoder_pos_conv_groups=cfg.conv_pos_groups,
        encoder_num_layers=cfg.encoder_layers,
        encoder_num_heads=cfg.encoder_attention_heads,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=cfg.encoder_ffn_embed_dim,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=0.0,
        aux_num_out=aux_num_out,
    )


# HF Wav2Vec2Config field -> (our ModelConfig field, HF's default when config.json omits it).
HF_MODEL_FIELDS: dict[str, tuple[str, Any]] = {
    "hidden_size": ("encoder_embed_dim", 768),
    "num_hidden_layers": ("encoder_layers", 12),
    "num_attention_heads": ("encoder_attention_heads", 12),
    "intermediate_size": ("encoder_ffn_embed_dim", 3072),
    "hidden_dropout": ("dropout", 0.1),
    "attention_dropout": ("attention_dropout", 0.1),
    "activation_dropout": ("activation_dropout", 0.1),
    "feat_proj_dropout": ("dropout_input", 0.0),
    "feat_quantizer_dropout": ("dropout_features", 0.0),
    "final_dropout": ("final_dropout", 0.1),
    "conv_bias": ("conv_bias", False),
    "num_conv_pos_embeddings": ("conv_pos", 128),
    "num_conv_pos_embedding_groups": ("conv_pos_groups", 16),
    "do_stable_layer_norm": ("layer_norm_first", False),
    "mask_time_prob": ("mask_prob", 0.05),
    "mask_time_length": ("mask_length", 10),
    "mask_feature_prob": ("mask_channel_prob", 0.0),
    "mask_feature_length": ("mask_channel_length", 10),
    "num_codevectors_per_group": ("latent_vars", 320),
    "num_codevector_groups": ("latent_groups", 2),
    "codevector_dim": ("latent_dim", 256),
    "proj_codevector_dim": ("final_dim", 256),
    "contrastive_logits_temperature": ("logit_temp", 0.1),
    "num_negatives": ("num_negatives", 100),
}
HF_CONV_DEFAULTS = {"conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2]}
# HF settings our model does not implement: (key, the value we implement, HF's default).
HF_FIXED = (("hidden_act", "gelu", "gelu"), ("feat_extract_activation", "gelu", "gelu"),
            ("layer_norm_eps", 1e-5, 1e-5), ("add_adapter", False, False), ("model_type", "wav2vec2", None))


def hf_architecture(kind: str, cfg: ModelConfig) -> str:
    """The transformers class an export of this model loads into best."""
    if kind == "wav2vec_ctc":
        return "Wav2Vec2ForCTC"
    # HF's pretraining model always quantizes its targets; without a quantizer only the encoder maps.
    return "Wav2Vec2ForPreTraining" if cfg.quantize_targets else "Wav2Vec2Model"


def hf_config_dict(cfg: ModelConfig, kind: str, vocab_size: int | None = None) -> dict[str, Any]:
    """config.json of the HF export: every architecture field stated, as HF's Wav2Vec2Config names it."""
    layers = parse_conv_layers(cfg.conv_feature_layers)
    final_dim = cfg.final_dim or cfg.encoder_embed_dim
    values = {ours: getattr(cfg, ours) for ours, _ in HF_MODEL_FIELDS.values()}
    values["final_dim"] = final_dim
    values["latent_dim"] = cfg.latent_dim or final_dim
    config: dict[str, Any] = {hf: values[ours] for hf, (ours, _) in HF_MODEL_FIELDS.items()}
    config.update(
        architectures=[hf_architecture(kind, cfg)],
        model_type="wav2vec2",
        feat_extract_norm="layer" if cfg.extractor_mode == "layer_norm" else "group",
        feat_extract_activation="gelu",
        hidden_act=cfg.activation_fn,
        layer_norm_eps=1e-5,
        conv_dim=[c for c, _, _ in layers],
        conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers],
        num_feat_extract_layers=len(layers),
        layerdrop=cfg.layerdrop if kind == "wav2vec_ctc" else cfg.encoder_layerdrop,
        # fairseq fine-tunes with masks only when apply_mask is set; pretraining always masks.
        apply_spec_augment=bool(cfg.apply_mask) if kind == "wav2vec_ctc" else True,
        mask_time_min_masks=2,  # fairseq's compute_mask_indices(min_masks=2) in Wav2Vec2Model.apply_mask
        diversity_loss_weight=0.1,  # the papers' loss_weights[0] (Appendix B); not stored in ModelConfig
        # fairseq's ctc criterion sums over the batch and zeroes infinite losses (criterion defaults)
        ctc_loss_reduction="sum",
        ctc_zero_infinity=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


def feature_extractor_dict(cfg: ModelConfig, normalize: bool) -> dict[str, Any]:
    """preprocessor_config.json: raw 16 kHz waveforms, normalized per utterance iff the model was trained so."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 16_000,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": bool(normalize),
        # HF passes attention masks only to layer-norm extractors (what fairseq's LV-60 models were trained with)
        "return_attention_mask": cfg.extractor_mode == "layer_norm",
    }


def model_normalize(loaded: LoadedModel) -> bool:
    """Whether the model expects zero-mean unit-variance waveforms (model.normalize, else task.normalize)."""
    if loaded.model_cfg.normalize is not None:
        return bool(loaded.model_cfg.normalize)
    return bool((loaded.task_cfg or {}).get("normalize", False))


def hf_vocab(dictionary: Dictionary) -> dict[str, int]:
    """vocab.json: our index i is HF id i; indices 0 and 1 are renamed as HF's converter does (blank = <pad>)."""
    tokens = list(HF_SPECIALS) + dictionary.symbols[len(HF_SPECIALS):]
    return {token: index for index, token in enumerate(tokens)}


def tokenizer_files(dictionary: Dictionary) -> dict[str, dict[str, Any]]:
    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {
        HF_VOCAB: hf_vocab(dictionary),
        HF_SPECIAL_TOKENS: specials,
        HF_TOKENIZER_CONFIG: {"tokenizer_class": "Wav2Vec2CTCTokenizer", "processor_class": "Wav2Vec2Processor",
                              "word_delimiter_token": WORD_DELIMITER, "do_lower_case": False,
                              "replace_word_delimiter_char": " ", **specials},
    }


# =================================================================================================
# Export
# =================================================================================================


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError("writing model.safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from None
    save_file({key: value.detach().float().contiguous() for key, value in state.items()}, str(path),
              metadata={"format": "pt"})


def _check_exportable(loaded: LoadedModel) -> None:
    if loaded.kind not in ("wav2vec2", "wav2vec_ctc"):
        raise CheckpointError(f"a {loaded.kind!r} model (wav2vec / vq-wav2vec) has no transformers or torchaudio "
                              "counterpart; only wav2vec 2.0 models (pretrained or CTC) export")


def _export_head(loaded: LoadedModel) -> str | None:
    architecture = hf_architecture(loaded.kind, loaded.model_cfg)
    return {"Wav2Vec2ForCTC": "ctc", "Wav2Vec2ForPreTraining": "pretraining", "Wav2Vec2Model": None}[architecture]


def export_hf(loaded: LoadedModel, out_dir: str | Path) -> list[Path]:
    """Write `loaded` as an HF `save_pretrained` folder; returns the written files.

    A CTC model needs its dictionary (vocab.json): the released fairseq CTC files do not store theirs,
    pass it to `load`'s caller (`export --dict`).
    """
    _check_exportable(loaded)
    out_dir = Path(out_dir)
    cfg, kind = loaded.model_cfg, loaded.kind
    state = loaded.model.state_dict()
    head = _export_head(loaded)
    vocab_size = None
    if kind == "wav2vec_ctc":
        vocab_size = int(state[CTC_HEAD + "weight"].shape[0])
        if loaded.dictionary is None:
            raise CheckpointError("the CTC model carries no dictionary, so vocab.json cannot be written; pass the "
                                  "dict.ltr.txt it was fine-tuned with (--dict)")
        if len(loaded.dictionary) != vocab_size:
            raise CheckpointError(f"dictionary has {len(loaded.dictionary)} symbols, the CTC head {vocab_size}")
        if WORD_DELIMITER not in loaded.dictionary:
            log.warning("dictionary has no word delimiter %r: HF's tokenizer will not split words", WORD_DELIMITER)
    config = hf_config_dict(cfg, kind, vocab_size)
    hf_state = to_hf_state(state, head)
    if config["mask_time_prob"] <= 0 and config["mask_feature_prob"] <= 0:
        # HF builds masked_spec_embed only when it can mask; an unexpected key would only warn, but be exact.
        hf_state.pop(("" if head is None else "wav2vec2.") + "masked_spec_embed", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {HF_CONFIG: config, HF_FEATURE_EXTRACTOR: feature_extractor_dict(cfg, model_normalize(loaded))}
    if kind == "wav2vec_ctc":
        files.update(tokenizer_files(loaded.dictionary))
    for name, content in files.items():
        _write_json(out_dir / name, content)
    _save_safetensors(hf_state, out_dir / HF_WEIGHTS)
    return [out_dir / name for name in (*files, HF_WEIGHTS)]


TORCHAUDIO_README = """\
torchaudio export of a repro wav2vec 2.0 model. Load it without repro:

    model = torchaudio.models.wav2vec2_model(**json.load(open("{kwargs}")))
    model.load_state_dict(torch.load("{weights}", weights_only=True))

Input: 16 kHz mono float waveforms (batch, samples){normalize}. `model(waveforms, lengths)` returns
{returns}
"""


def export_torchaudio(loaded: LoadedModel, out_dir: str | Path) -> list[Path]:
    """Write the state dict (model.pt) and `wav2vec2_model` keyword arguments (JSON) of `loaded`.

    torchaudio's model is the encoder (plus the CTC projection as `aux`); the pretraining quantizer
    and projections have no place in it and are not written.
    """
    _check_exportable(loaded)
    out_dir = Path(out_dir)
    ctc = loaded.kind == "wav2vec_ctc"
    state = loaded.model.state_dict()
    aux = int(state[CTC_HEAD + "weight"].shape[0]) if ctc else None
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, kwargs = out_dir / TORCHAUDIO_WEIGHTS, out_dir / TORCHAUDIO_KWARGS
    torch.save({key: value.detach().float().contiguous() for key, value in to_torchaudio_state(state, ctc).items()},
               weights)
    _write_json(kwargs, torchaudio_kwargs(loaded.model_cfg, aux))
    written = [weights, kwargs]
    if ctc and loaded.dictionary is not None:
        loaded.dictionary.save(out_dir / "dict.ltr.txt")
        written.append(out_dir / "dict.ltr.txt")
    readme = out_dir / "README.txt"
    readme.write_text(TORCHAUDIO_README.format(
        kwargs=kwargs.name, weights=weights.name,
        normalize=", each normalized to zero mean and unit variance first" if model_normalize(loaded) else "",
        returns=(f"CTC logits (batch, frames, {aux}) over dict.ltr.txt with the 4 fairseq specials first "
                 "(index 0 = blank) and valid frame lengths." if ctc else
                 "the last Transformer layer (batch, frames, dim) and valid frame lengths; "
                 "`model.extract_features` returns every layer."),
    ), encoding="utf-8")
    return [*written, readme]


# =================================================================================================
# Import of an HF folder
# =================================================================================================


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read: {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (never unpickled), else pytorch_model.bin with torch's weights-only reader."""
    safetensors_path, legacy_path = folder / HF_WEIGHTS, folder / HF_LEGACY_WEIGHTS
    if safetensors_path.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors is a dependency
            raise CheckpointError(f"{safetensors_path}: reading it needs the 'safetensors' package") from None
        try:
            return load_file(str(safetensors_path))
        except Exception as error:  # safetensors raises its own SafetensorError on damaged files
            raise CheckpointError(f"{safetensors_path}: unreadable safetensors file: {error}") from None
    if legacy_path.is_file():
        try:
            return torch.load(legacy_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{legacy_path}: not a plain state dict (refused or unreadable): {error}") from None
    sharded = sorted(p.name for p in folder.glob("*.index.json"))
    hint = f" (sharded weights {sharded} are not supported)" if sharded else ""
    raise CheckpointError(f"{folder}: no {HF_WEIGHTS} or {HF_LEGACY_WEIGHTS}{hint}")


def model_config_from_hf(config: dict[str, Any], kind: str, normalize: bool | None, path: Path) -> ModelConfig:
    """Our ModelConfig from an HF config.json (HF's defaults for what the file omits)."""
    for key, ours, default in HF_FIXED:
        value = config.get(key, default)
        if value != ours:
            raise CheckpointError(f"{path}: {key}={value!r} is not supported (repro's wav2vec 2.0 implements "
                                  f"{key}={ours!r})")
    values = {ours: config.get(hf, default) for hf, (ours, default) in HF_MODEL_FIELDS.items()}
    conv = {key: list(config.get(key, default)) for key, default in HF_CONV_DEFAULTS.items()}
    if not len(conv["conv_dim"]) == len(conv["conv_kernel"]) == len(conv["conv_stride"]):
        raise CheckpointError(f"{path}: conv_dim, conv_kernel and conv_stride differ in length")
    layers = ", ".join(f"({c}, {k}, {s})" for c, k, s in zip(conv["conv_dim"], conv["conv_kernel"], conv["conv_stride"]))
    extractor_norm = config.get("feat_extract_norm", "group")
    if extractor_norm not in ("group", "layer"):
        raise CheckpointError(f"{path}: feat_extract_norm={extractor_norm!r} is neither 'group' nor 'layer'")
    layerdrop = float(config.get("layerdrop", 0.1))
    values.update(
        _name=kind, conv_feature_layers=f"[{layers}]",
        extractor_mode="layer_norm" if extractor_norm == "layer" else "default",
        quantize_targets=kind == "wav2vec2", normalize=normalize, encoder_layerdrop=layerdrop,
        layerdrop=layerdrop, apply_mask=bool(config.get("apply_spec_augment", True)) and kind == "wav2vec_ctc",
    )
    try:
        return ModelConfig(**values)
    except TypeError as error:  # pragma: no cover - the field table above is checked by the tests
        raise CheckpointError(f"{path}: {error}") from None


def _hf_tokens(folder: Path, config: dict[str, Any], rows: int) -> tuple[list[str], dict[str, Any]]:
    """HF id -> token (from vocab.json) and the tokenizer's special tokens."""
    vocab_path = folder / HF_VOCAB
    if not vocab_path.is_file():
        raise CheckpointError(f"{folder}: a CTC model without {HF_VOCAB}; its outputs cannot be named")
    vocab = _read_json(vocab_path)
    if vocab and all(isinstance(v, dict) for v in vocab.values()):  # multilingual: {lang: {token: id}}
        raise CheckpointError(f"{vocab_path}: a per-language vocabulary (MMS style) is not supported")
    tokens: list[str | None] = [None] * rows
    for token, index in vocab.items():
        if not isinstance(index, int) or not 0 <= index < rows:
            raise CheckpointError(f"{vocab_path}: id {index!r} of {token!r} is outside the {rows} CTC outputs")
        tokens[index] = token
    absent = [i for i, token in enumerate(tokens) if token is None]
    if absent:
        raise CheckpointError(f"{vocab_path}: the CTC head has {rows} outputs but ids {absent[:8]} have no token")
    specials = _read_json(folder / HF_TOKENIZER_CONFIG) if (folder / HF_TOKENIZER_CONFIG).is_file() else {}
    if (folder / HF_SPECIAL_TOKENS).is_file():
        specials = {**_read_json(folder / HF_SPECIAL_TOKENS), **specials}
    specials.setdefault("pad_token", tokens[int(config.get("pad_token_id", 0))])
    return tokens, specials  # type: ignore[return-value]


def _special(specials: dict[str, Any], name: str) -> str | None:
    value = specials.get(name)
    return value.get("content") if isinstance(value, dict) else value


def ctc_rows_from_hf(tokens: list[str], specials: dict[str, Any], path: Path) -> tuple[Dictionary, list[int | None]]:
    """Our Dictionary and, for each of its indices, the HF output row it takes (None: never emitted).

    A vocabulary our exporter (or HF's fairseq converter) wrote maps one to one. Any other (e.g. HF's
    fine-tuning tutorial: letters, then [UNK], [PAD]) is reordered: HF's pad token (its CTC blank)
    becomes our index 0, its unk our <unk>, its word delimiter our '|'.
    """
    if tuple(tokens[:4]) == HF_SPECIALS:
        rows: list[int | None] = list(range(len(tokens)))
        symbols = tokens[4:]
    else:
        pad, unk = _special(specials, "pad_token"), _special(specials, "unk_token")
        bos, eos = _special(specials, "bos_token"), _special(specials, "eos_token")
        index = {token: i for i, token in enumerate(tokens)}
        if pad not in index:
            raise CheckpointError(f"{path}: the pad token {pad!r} (HF's CTC blank) is not in the vocabulary")
        # our 0 <s> = blank, 1 <pad>, 2 </s>, 3 <unk>
        rows = [index[pad], index.get(bos), index.get(eos), index.get(unk)]
        taken = {row for row in rows if row is not None}
        symbols = [token for i, token in enumerate(tokens) if i not in taken]
        rows += [i for i in range(len(tokens)) if i not in taken]
    delimiter = _special(specials, "word_delimiter_token") or WORD_DELIMITER
    symbols = [WORD_DELIMITER if symbol == delimiter else symbol for symbol in symbols]
    try:
        return Dictionary.from_symbols(symbols), rows
    except DictionaryError as error:
        raise CheckpointError(f"{path}: vocabulary cannot be a fairseq dictionary: {error}") from None


def _build_ours(kind: str, cfg: ModelConfig, vocab_size: int | None) -> torch.nn.Module:
    if kind == "wav2vec_ctc":
        from repro.models.ctc import Wav2Vec2CTC

        return Wav2Vec2CTC(cfg, vocab_size or 0)
    from repro.models.wav2vec2 import Wav2Vec2Model

    return Wav2Vec2Model(cfg)


def _hf_tensor(hf_state: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """A tensor by its HF name, also under the legacy weight_g / weight_v names of older HF files."""
    if name in hf_state:
        return hf_state[name]
    for legacy, current in WEIGHT_NORM.items():
        if name.endswith(current):
            return hf_state.get(name[: -len(current)] + legacy)
    return None


def load_hf(folder: str | Path) -> LoadedModel:
    """Load an HF wav2vec 2.0 folder (config.json + model.safetensors [+ vocab.json]) as our model."""
    folder = Path(folder)
    config = _read_json(folder / HF_CONFIG)
    architectures = config.get("architectures") or ["Wav2Vec2Model"]
    kind = "wav2vec_ctc" if "Wav2Vec2ForCTC" in architectures else "wav2vec2"
    unsupported = [a for a in architectures if a not in ("Wav2Vec2ForCTC", "Wav2Vec2ForPreTraining", "Wav2Vec2Model")]
    if unsupported:
        raise CheckpointError(f"{folder / HF_CONFIG}: architectures {unsupported} are not wav2vec 2.0 CTC/pretraining")
    extractor_path = folder / HF_FEATURE_EXTRACTOR
    extractor = _read_json(extractor_path) if extractor_path.is_file() else {}
    extractor = extractor.get("feature_extractor", extractor)  # transformers 5 nests it in processor_config.json
    if not extractor and (folder / "processor_config.json").is_file():
        extractor = _read_json(folder / "processor_config.json").get("feature_extractor", {})
    normalize = extractor.get("do_normalize")
    if extractor.get("sampling_rate", 16_000) != 16_000:
        raise CheckpointError(f"{extractor_path}: sampling_rate {extractor['sampling_rate']} is not 16000")
    hf_state = _read_hf_weights(folder)
    cfg = model_config_from_hf(config, kind, None if normalize is None else bool(normalize), folder / HF_CONFIG)
    prefix = "wav2vec2." if any(key.startswith("wav2vec2.") for key in hf_state) else ""
    dictionary, rows = None, None
    if kind == "wav2vec_ctc":
        if "lm_head.weight" not in hf_state:
            raise CheckpointError(f"{folder}: Wav2Vec2ForCTC weights without lm_head.weight")
        tokens, specials = _hf_tokens(folder, config, int(hf_state["lm_head.weight"].shape[0]))
        dictionary, rows = ctc_rows_from_hf(tokens, specials, folder / HF_VOCAB)
    has_heads = all(key in hf_state for key in PRETRAINING_HEADS.values())
    if kind == "wav2vec2" and not has_heads:
        cfg.quantize_targets = False
    model = _build_ours(kind, cfg, None if dictionary is None else len(dictionary))
    expected = model.state_dict()
    mapping = to_hf_state({key: value for key, value in expected.items()}, "ctc" if kind == "wav2vec_ctc"
                          else "pretraining" if prefix else None)
    hf_name_of = {id(value): name for name, value in mapping.items()}
    state, missing, used = {}, [], set()
    for key, value in expected.items():
        name = hf_name_of.get(id(value))
        tensor = None if name is None else _hf_tensor(hf_state, name)
        if key.startswith(CTC_HEAD) and tensor is not None:
            tensor = _reorder_rows(tensor, rows, bias=key.endswith("bias"))
        if tensor is None:
            if key.endswith("mask_emb") or (kind == "wav2vec2" and not has_heads and key.split(".")[0] in
                                            ("project_q", "final_proj")):
                # masked_spec_embed exists only when HF's config can mask; the pretraining heads of an
                # encoder-only folder: neither is used at inference (random init kept, logged).
                log.info("%s: %s not in the HF weights; left at its initial value", folder, key)
                continue
            missing.append(name or key)
            continue
        if tensor.shape != value.shape:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{tuple(value.shape)}")
        used.add(name)
        state[key] = tensor.float()
    if missing:
        raise CheckpointError(f"{folder}: weights missing for {', '.join(missing[:6])}"
                              + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
    legacy = {n[: -len(c)] + g for n in used for g, c in WEIGHT_NORM.items() if n.endswith(c)}
    ignored = sorted(set(hf_state) - used - legacy)
    if ignored:
        log.warning("%s: %d HF tensors have no place in repro's model and were ignored: %s", folder, len(ignored),
                    ", ".join(ignored[:6]))
    model.load_state_dict(state, strict=False)
    model.eval()
    task_cfg = {"_name": "audio_finetuning" if kind == "wav2vec_ctc" else "audio_pretraining",
                "labels": "ltr" if kind == "wav2vec_ctc" else None, "data": None,
                "sample_rate": 16_000, "normalize": bool(normalize)}
    return LoadedModel(model=model, model_cfg=cfg, task_cfg=task_cfg, dictionary=dictionary, kind=kind)


def _reorder_rows(tensor: torch.Tensor, rows: list[int | None] | None, bias: bool) -> torch.Tensor:
    """lm_head rows in our dictionary's order; a row HF lacks never wins (weight 0, bias very negative)."""
    if rows is None or rows == list(range(tensor.shape[0])):
        return tensor
    out = torch.zeros((len(rows), *tensor.shape[1:]), dtype=tensor.dtype)
    for ours, theirs in enumerate(rows):
        if theirs is not None:
            out[ours] = tensor[theirs]
        elif bias:
            out[ours] = NEVER_EMITTED_BIAS
    return out


# =================================================================================================
# Any checkpoint
# =================================================================================================


def load_any(source: str | Path, dictionary_path: str | Path | None = None) -> LoadedModel:
    """A fairseq file, one of ours or an HF folder, with `dictionary_path` filling in a missing dictionary."""
    source = Path(source)
    loaded = load_hf(source) if is_hf_folder(source) else load(source)
    return attach_dictionary(loaded, dictionary_path, source)


def attach_dictionary(loaded: LoadedModel, dictionary_path: str | Path | None, source: str | Path) -> LoadedModel:
    """`loaded` with the target dictionary of `dictionary_path` (checked against a stored one and the CTC head)."""
    if dictionary_path is not None:
        try:
            given = Dictionary.load(dictionary_path)
        except DictionaryError as error:
            raise CheckpointError(str(error)) from None
        if loaded.dictionary is not None and given.symbols != loaded.dictionary.symbols:
            raise CheckpointError(f"{dictionary_path}: differs from the dictionary stored in {source}")
        loaded.dictionary = given
    if loaded.dictionary is not None and loaded.kind == "wav2vec_ctc":
        outputs = loaded.model.w2v_encoder.proj.out_features
        if len(loaded.dictionary) != outputs:
            raise CheckpointError(f"{dictionary_path or source}: dictionary has {len(loaded.dictionary)} symbols, "
                                  f"the CTC head {outputs}")
    return loaded

