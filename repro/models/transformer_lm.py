"""fairseq's `transformer_lm` (decoder-only Transformer language model), for decoding only.

The word LM of the wav2letter sota/2019 LibriSpeech recipe, used by wav2vec 2.0's "Transformer LM"
rows, is `--arch transformer_lm_gbw` with 20 layers, dim 1280, FFN 6144, 16 heads, adaptive input
and adaptive softmax (cutoffs 60000,160000, factor 4, tied weights, untied projections),
pre-LN and no final layer norm. This module reproduces the forward pass of that family:

* token embeddings scaled by sqrt(decoder_embed_dim) unless `no_scale_embedding`;
* sinusoidal positions (sin half, then cos half; position = padding_idx + 1 + t, padded tokens get
  the zero row) or learned ones, added after the optional input projection;
* causal self-attention layers, pre-LN or post-LN per `decoder_normalize_before` (fairseq's
  `base_lm_architecture` forces pre-LN for every `transformer_lm` checkpoint);
* adaptive input (bands of shrinking dimension projected to the model dimension) and adaptive
  softmax (head over the first band + one class per tail band; tail log-probs add the class prior).

Parameter names equal fairseq's state-dict keys (`decoder.embed_tokens.embeddings.0.0.weight`,
`decoder.layers.3.self_attn.q_proj.weight`, `decoder.adaptive_softmax.tail.0.0.weight`, ...), so a
released checkpoint loads with `load_fairseq_state_dict` (which also drops tied duplicates and
upgrades pre-2019 key layouts). Training pieces (dropout, LayerDrop, quant-noise) are not built.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TransformerLMError(ValueError):
    """A checkpoint or configuration this module cannot reproduce (the message says what)."""


@dataclass
class TransformerLMConfig:
    """The architecture fields of fairseq's TransformerLanguageModelConfig that change the forward."""

    decoder_embed_dim: int = 512
    decoder_input_dim: int | None = None
    """Embedding dimension before `project_in_dim` (None = decoder_embed_dim)."""
    decoder_output_dim: int | None = None
    """Feature dimension fed to the output layer (None = decoder_embed_dim)."""
    decoder_ffn_embed_dim: int = 2048
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_normalize_before: bool = True
    """Pre-LN layers (fairseq forces this for transformer_lm)."""
    no_decoder_final_norm: bool = False
    """No layer norm after the last layer (only meaningful with pre-LN)."""
    activation_fn: str = "relu"
    adaptive_input: bool = False
    adaptive_input_factor: float = 4.0
    adaptive_input_cutoff: list[int] | None = None
    adaptive_softmax_cutoff: list[int] | None = None
    adaptive_softmax_factor: float = 4.0
    tie_adaptive_weights: bool = False
    """Adaptive softmax reuses the adaptive-input embeddings of each band."""
    tie_adaptive_proj: bool = False
    """... and the band projections too (transposed)."""
    share_decoder_input_output_embed: bool = False
    no_scale_embedding: bool = False
    no_token_positional_embeddings: bool = False
    decoder_learned_pos: bool = False
    layernorm_embedding: bool = False
    max_target_positions: int = 1024

    @property
    def input_dim(self) -> int:
        return self.decoder_input_dim or self.decoder_embed_dim

    @property
    def output_dim(self) -> int:
        return self.decoder_output_dim or self.decoder_embed_dim


# Named architectures (fairseq transformer_lm.py register_model_architecture); explicit args win.
_BIG = {"decoder_layers": 12, "decoder_embed_dim": 1024, "decoder_ffn_embed_dim": 4096, "decoder_attention_heads": 16}
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer_lm": {},
    "transformer_lm_big": _BIG,
    "transformer_lm_gbw": {**_BIG, "decoder_embed_dim": 512, "no_decoder_final_norm": True},
    "transformer_lm_baevski_gbw": {**_BIG, "decoder_embed_dim": 512, "no_decoder_final_norm": True},
    "transformer_lm_wiki103": {
        **_BIG, "decoder_layers": 16, "decoder_attention_heads": 8, "adaptive_input": True,
        "tie_adaptive_weights": True, "adaptive_input_cutoff": "20000,60000",
        "adaptive_softmax_cutoff": "20000,60000", "no_decoder_final_norm": True, "tie_adaptive_proj": True,
    },
    "transformer_lm_gpt": {
        "decoder_embed_dim": 768, "decoder_ffn_embed_dim": 3072, "decoder_layers": 12,
        "decoder_attention_heads": 12, "activation_fn": "gelu",
    },
}
ARCHITECTURE_DEFAULTS["transformer_lm_baevski_wiki103"] = ARCHITECTURE_DEFAULTS["transformer_lm_wiki103"]


def _int_list(value: Any, key: str) -> list[int] | None:
    """fairseq's eval_str_list: '60000,160000' / '[60000, 160000]' / list -> [60000, 160000]."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise TransformerLMError(f"{key}={value!r} is not a comma-separated list of integers") from None
        value = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    if isinstance(value, int):
        value = [value]
    return [int(v) for v in value]


def config_from_fairseq_args(args: Mapping[str, Any]) -> TransformerLMConfig:
    """TransformerLMConfig from a checkpoint's `args` (argparse era) or `cfg.model` (hydra era)."""
    args = dict(args)
    arch = args.get("arch") or args.get("_name") or "transformer_lm"
    if arch not in ARCHITECTURE_DEFAULTS:
        raise TransformerLMError(
            f"architecture {arch!r} is not a supported transformer_lm variant ({', '.join(ARCHITECTURE_DEFAULTS)})"
        )
    if args.get("character_embeddings"):
        raise TransformerLMError("character_embeddings language models are not supported")
    if args.get("decoder_layers_to_keep"):
        raise TransformerLMError("decoder_layers_to_keep (pruned models) is not supported")
    if args.get("base_layers") or args.get("decoder_layerdrop_keep"):
        raise TransformerLMError("base_layers models are not supported")
    merged: dict[str, Any] = dict(ARCHITECTURE_DEFAULTS[arch])
    known = {f.name for f in fields(TransformerLMConfig)}
    merged.update({key: value for key, value in args.items() if key in known})
    # Backward compatibility exactly as base_lm_architecture applies it.
    if "no_tie_adaptive_proj" in args:
        merged["no_decoder_final_norm"] = True
        if args["no_tie_adaptive_proj"] is False:
            merged["tie_adaptive_proj"] = True
    if "decoder_final_norm" in args:
        merged["no_decoder_final_norm"] = not args["decoder_final_norm"]
    merged["decoder_normalize_before"] = True  # "Model training is not stable without this" (fairseq)
    if merged.get("max_target_positions") is None:
        merged["max_target_positions"] = args.get("tokens_per_sample") or 1024
    merged["adaptive_input_cutoff"] = _int_list(merged.get("adaptive_input_cutoff"), "adaptive_input_cutoff")
    merged["adaptive_softmax_cutoff"] = _int_list(merged.get("adaptive_softmax_cutoff"), "adaptive_softmax_cutoff")
    config = TransformerLMConfig(**merged)
    if config.tie_adaptive_weights:
        if not config.adaptive_input:
            raise TransformerLMError("tie_adaptive_weights needs adaptive_input")
        if config.adaptive_input_cutoff != config.adaptive_softmax_cutoff:
            raise TransformerLMError(
                f"tied adaptive weights need equal cutoffs: {config.adaptive_input_cutoff} != "
                f"{config.adaptive_softmax_cutoff}"
            )
        if config.adaptive_input_factor != config.adaptive_softmax_factor:
            raise TransformerLMError("tied adaptive weights need adaptive_input_factor == adaptive_softmax_factor")
    return config


# ----------------------------------------------------------------------------------------------
# Building blocks


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_fast", "gelu_accurate"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    if name == "swish":
        return F.silu
    raise TransformerLMError(f"unknown activation_fn {name!r}")


def _bands(cutoff: list[int], vocab_size: int) -> list[int]:
    """Cutoffs completed with the vocabulary size (fairseq appends it when larger)."""
    if vocab_size > cutoff[-1]:
        return cutoff + [vocab_size]
    if vocab_size != cutoff[-1]:
        raise TransformerLMError(f"adaptive cutoff {cutoff} exceeds the vocabulary size {vocab_size}")
    return list(cutoff)


def make_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Position ids padding_idx+1, padding_idx+2, ... for real tokens and padding_idx for padding."""
    real = tokens.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int | None) -> torch.Tensor:
    """(num_positions, dim) table: sin of all frequencies then cos (tensor2tensor layout)."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float) * -step)
    angles = torch.arange(num_positions, dtype=torch.float).unsqueeze(1) * frequencies.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx] = 0
    return table


class AdaptiveInput(nn.Module):
    """Embeddings in frequency bands: band i has dim initial_dim // factor**i, projected to output_dim."""

    def __init__(self, vocab_size: int, padding_idx: int, initial_dim: int, factor: float, output_dim: int,
                 cutoff: list[int]) -> None:
        super().__init__()
        self.cutoff = _bands(cutoff, vocab_size)
        self.embedding_dim = output_dim
        self.padding_idx = padding_idx
        self.embeddings = nn.ModuleList()
        for band, end in enumerate(self.cutoff):
            start = self.cutoff[band - 1] if band > 0 else 0
            dim = int(initial_dim // (factor**band))
            self.embeddings.append(nn.Sequential(nn.Embedding(end - start, dim), nn.Linear(dim, output_dim, bias=False)))

    def band_weights(self, band: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (size, dim), projection (output_dim, dim)) of one band, for tied softmax."""
        return self.embeddings[band][0].weight, self.embeddings[band][1].weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = tokens.new_zeros(tokens.shape + (self.embedding_dim,), dtype=self.embeddings[0][1].weight.dtype)
        start = 0
        for band, end in enumerate(self.cutoff):
            in_band = (tokens >= start) & (tokens < end)
            if in_band.any():
                out[in_band] = self.embeddings[band](tokens[in_band] - start)
            start = end
        return out


class _TiedHead(nn.Module):
    """Head of a tied adaptive softmax: band-0 embedding as output matrix, plus one logit per tail."""

    def __init__(self, input_dim: int, embedding_dim: int, num_tails: int) -> None:
        super().__init__()
        # fairseq: word_proj = Sequential(Linear, TiedLinear) only when the dimensions differ.
        self.word_proj = (
            nn.Sequential(nn.Linear(input_dim, embedding_dim, bias=False)) if input_dim != embedding_dim else None
        )
        self.class_proj = nn.Linear(input_dim, num_tails, bias=False)

    def forward(self, features: torch.Tensor, band0_embedding: torch.Tensor) -> torch.Tensor:
        words = self.word_proj(features) if self.word_proj is not None else features
        return torch.cat([F.linear(words, band0_embedding), self.class_proj(features)], dim=-1)


class _TailBand(nn.Module):
    """One tail cluster: projection to a smaller dim ('0'), then to the band's words ('2')."""

    def __init__(self, projection: nn.Linear | None, output: nn.Linear | None) -> None:
        super().__init__()
        if projection is not None:
            self.add_module("0", projection)
        if output is not None:
            self.add_module("2", output)

    def forward(self, features: torch.Tensor, tied_projection: torch.Tensor | None,
                tied_embedding: torch.Tensor | None) -> torch.Tensor:
        hidden = F.linear(features, tied_projection.t()) if tied_projection is not None else self._modules["0"](features)
        return F.linear(hidden, tied_embedding) if tied_embedding is not None else self._modules["2"](hidden)


class AdaptiveSoftmax(nn.Module):
    """Log-probabilities over the full vocabulary from the head and tail clusters (fairseq get_log_prob)."""

    def __init__(self, vocab_size: int, input_dim: int, cutoff: list[int], factor: float,
                 adaptive_input: AdaptiveInput | None = None, tie_proj: bool = False) -> None:
        super().__init__()
        self.cutoff = _bands(cutoff, vocab_size)
        self.vocab_size = vocab_size
        num_tails = len(self.cutoff) - 1
        self.tied = adaptive_input is not None
        self.tie_proj = tie_proj and self.tied
        # A list keeps the adaptive input out of this module's parameters (it lives in embed_tokens).
        self._adaptive_input = [adaptive_input] if adaptive_input is not None else []
        if self.tied:
            self.head = _TiedHead(input_dim, adaptive_input.band_weights(0)[0].shape[1], num_tails)
        else:
            self.head = nn.Linear(input_dim, self.cutoff[0] + num_tails, bias=False)
        self.tail = nn.ModuleList()
        for band in range(num_tails):
            size = self.cutoff[band + 1] - self.cutoff[band]
            if self.tied:
                embedding, projection = adaptive_input.band_weights(band + 1)
                own_projection = None if self.tie_proj else nn.Linear(projection.shape[0], projection.shape[1], bias=False)
                self.tail.append(_TailBand(own_projection, None))
            else:
                dim = int(input_dim // factor ** (band + 1))
                self.tail.append(_TailBand(nn.Linear(input_dim, dim, bias=False), nn.Linear(dim, size, bias=False)))

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, D) -> log-probabilities (N, V)."""
        adaptive_input = self._adaptive_input[0] if self.tied else None
        if adaptive_input is not None:
            head_logits = self.head(features, adaptive_input.band_weights(0)[0])
        else:
            head_logits = self.head(features)
        head_size = self.cutoff[0] + len(self.tail)
        head_log_probs = head_logits.float().log_softmax(-1)
        out = head_log_probs.new_empty(features.shape[0], self.vocab_size)
        out[:, : self.cutoff[0]] = head_log_probs[:, : self.cutoff[0]]
        class_priors = head_log_probs[:, self.cutoff[0] : head_size]  # log P(word in tail band i)
        for band, tail in enumerate(self.tail):
            start, end = self.cutoff[band], self.cutoff[band + 1]
            tied_embedding = tied_projection = None
            if adaptive_input is not None:
                tied_embedding, projection = adaptive_input.band_weights(band + 1)
                tied_projection = projection if self.tie_proj else None
            tail_logits = tail(features, tied_projection, tied_embedding)
            out[:, start:end] = tail_logits.float().log_softmax(-1) + class_priors[:, band, None]
        return out


class MultiheadSelfAttention(nn.Module):
    """fairseq MultiheadAttention restricted to causal self-attention (q scaled by head_dim**-0.5)."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise TransformerLMError(f"decoder_embed_dim {embed_dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        # x: (B, S, D); attention_bias: (B, 1, S, S) additive, -inf where attention is forbidden
        batch, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = split(self.q_proj(x) * self.head_dim**-0.5)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)).float() + attention_bias
        weights = scores.softmax(-1).nan_to_num(0.0).to(v.dtype)  # fully masked (padding) rows -> 0
        context = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(context)


class DecoderLayer(nn.Module):
    """Self-attention + FFN block, layer norm before (pre-LN) or after (post-LN) each residual."""

    def __init__(self, cfg: TransformerLMConfig) -> None:
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.normalize_before = cfg.decoder_normalize_before
        self.self_attn = MultiheadSelfAttention(dim, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.decoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _activation(cfg.activation_fn)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = residual + self.self_attn(x, attention_bias)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(self.activation(self.fc1(x)))
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


class TransformerDecoder(nn.Module):
    """Embeddings, positions, layers, final norm and output layer of the language model."""

    def __init__(self, cfg: TransformerLMConfig, vocab_size: int, padding_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.padding_idx = padding_idx
        embed_dim = cfg.decoder_embed_dim
        if cfg.adaptive_input:
            if not cfg.adaptive_input_cutoff:
                raise TransformerLMError("adaptive_input needs adaptive_input_cutoff")
            self.embed_tokens: nn.Module = AdaptiveInput(
                vocab_size, padding_idx, cfg.input_dim, cfg.adaptive_input_factor, embed_dim, cfg.adaptive_input_cutoff
            )
            token_dim = embed_dim
        else:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.input_dim, padding_idx=padding_idx)
            token_dim = cfg.input_dim
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(embed_dim)
        self.project_in_dim = nn.Linear(token_dim, embed_dim, bias=False) if token_dim != embed_dim else None
        self.embed_positions = None
        if not cfg.no_token_positional_embeddings and cfg.decoder_learned_pos:
            self.embed_positions = nn.Embedding(cfg.max_target_positions + padding_idx + 1, embed_dim)
        self.layernorm_embedding = nn.LayerNorm(embed_dim) if cfg.layernorm_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = (
            nn.LayerNorm(embed_dim) if cfg.decoder_normalize_before and not cfg.no_decoder_final_norm else None
        )
        self.project_out_dim = (
            nn.Linear(embed_dim, cfg.output_dim, bias=False)
            if embed_dim != cfg.output_dim and not cfg.tie_adaptive_weights
            else None
        )
        self.adaptive_softmax = None
        self.output_projection = None
        if cfg.adaptive_softmax_cutoff:
            self.adaptive_softmax = AdaptiveSoftmax(
                vocab_size, cfg.output_dim, cfg.adaptive_softmax_cutoff, cfg.adaptive_softmax_factor,
                adaptive_input=self.embed_tokens if cfg.tie_adaptive_weights else None,
                tie_proj=cfg.tie_adaptive_proj,
            )
        elif not cfg.share_decoder_input_output_embed:
            self.output_projection = nn.Linear(cfg.output_dim, vocab_size, bias=False)

    def positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.no_token_positional_embeddings:
            return None
        ids = make_positions(tokens, self.padding_idx)
        if self.embed_positions is not None:
            return self.embed_positions(ids)
        table = sinusoidal_table(int(ids.max()) + 1, self.cfg.decoder_embed_dim, self.padding_idx)
        return table.to(tokens.device)[ids]

    def extract_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) -> features (B, S, output_dim) before the output layer."""
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        positions = self.positions(tokens)
        if positions is not None:
            x = x + positions.to(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        length = tokens.shape[1]
        causal = torch.full((length, length), float("-inf"), device=tokens.device).triu(1)
        bias = causal.expand(tokens.shape[0], 1, length, length).clone()
        padding = tokens.eq(self.padding_idx)
        if padding.any():
            bias = bias.masked_fill(padding[:, None, None, :], float("-inf"))
        for layer in self.layers:
            x = layer(x, bias)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, S, D) -> log-probabilities (B, S, V) in float32."""
        batch, length, dim = features.shape
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.log_probs(features.reshape(-1, dim)).view(batch, length, -1)
        if self.output_projection is not None:
            logits = self.output_projection(features)
        else:
            logits = F.linear(features, self.embed_tokens.weight)
        return logits.float().log_softmax(-1)


class TransformerLanguageModel(nn.Module):
    """fairseq `transformer_lm`: `log_probs(tokens)` gives log P(next token | prefix) at each position."""

    def __init__(self, cfg: TransformerLMConfig, vocab_size: int, padding_idx: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.decoder = TransformerDecoder(cfg, vocab_size, padding_idx)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) -> log-probabilities (B, S, V)."""
        return self.decoder.log_probs(self.decoder.extract_features(tokens))

    log_probs = forward


# ----------------------------------------------------------------------------------------------
# Loading fairseq state dicts

_IGNORED_SUFFIXES = ("_float_tensor", "embed_positions.weights", "adaptive_softmax.version")


def _tied_duplicates(cfg: TransformerLMConfig, num_tails: int, head_dims_differ: bool) -> dict[str, str]:
    """fairseq saves tied parameters under both names: duplicate key -> source key."""
    prefix = "decoder."
    duplicates: dict[str, str] = {}
    if cfg.adaptive_softmax_cutoff and cfg.tie_adaptive_weights:
        word_proj = "word_proj.1.weight" if head_dims_differ else "word_proj.weight"
        duplicates[f"{prefix}adaptive_softmax.head.{word_proj}"] = f"{prefix}embed_tokens.embeddings.0.0.weight"
        for band in range(num_tails):
            duplicates[f"{prefix}adaptive_softmax.tail.{band}.2.weight"] = (
                f"{prefix}embed_tokens.embeddings.{band + 1}.0.weight"
            )
            if cfg.tie_adaptive_proj:
                duplicates[f"{prefix}adaptive_softmax.tail.{band}.0.weight"] = (
                    f"{prefix}embed_tokens.embeddings.{band + 1}.1.weight"
                )
    if not cfg.adaptive_softmax_cutoff and cfg.share_decoder_input_output_embed:
        duplicates[f"{prefix}output_projection.weight"] = f"{prefix}embed_tokens.weight"
    return duplicates


def upgrade_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply fairseq's key upgrades: fused `in_proj_*` -> q/k/v, `layer_norms.N` -> named norms,
    `embed_out` -> `output_projection.weight`."""
    upgraded: dict[str, torch.Tensor] = {}
    layer_norm_names = {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}
    for key, value in state.items():
        if key.endswith(("self_attn.in_proj_weight", "self_attn.in_proj_bias")):
            base, kind = key.rsplit(".in_proj_", 1)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                upgraded[f"{base}.{name}.{kind}"] = part
            continue
        parts = key.split(".")
        if len(parts) >= 6 and parts[-3] == "layer_norms" and parts[-2] in layer_norm_names:
            key = ".".join(parts[:-3] + [layer_norm_names[parts[-2]], parts[-1]])
        if key == "decoder.embed_out":
            key = "decoder.output_projection.weight"
        upgraded[key] = value
    return upgraded


def build_from_fairseq(args: Mapping[str, Any], state: Mapping[str, torch.Tensor], vocab_size: int,
                       padding_idx: int = 1) -> TransformerLanguageModel:
    """Model from a fairseq checkpoint's args/cfg.model and `model` state dict (strict key check)."""
    cfg = config_from_fairseq_args(args)
    state = upgrade_state_dict(state)
    version = state.get("decoder.version")
    if version is not None and float(version.flatten()[0]) <= 2:
        cfg.no_decoder_final_norm = True  # "earlier checkpoints did not normalize after the stack of layers"
    model = TransformerLanguageModel(cfg, vocab_size, padding_idx)
    softmax = model.decoder.adaptive_softmax
    num_tails = len(softmax.tail) if softmax is not None else 0
    head_dims_differ = bool(softmax is not None and softmax.tied and softmax.head.word_proj is not None)
    duplicates = _tied_duplicates(cfg, num_tails, head_dims_differ)
    kept: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES) or key == "decoder.version":
            continue
        if key in duplicates:
            source = state.get(duplicates[key])
            if source is not None and (source.shape != value.shape or not torch.equal(source, value)):
                raise TransformerLMError(f"tied parameter {key} differs from {duplicates[key]}")
            continue
        kept[key] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    if missing or unexpected:
        raise TransformerLMError(
            f"state dict does not match the configured architecture: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, value in kept.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise TransformerLMError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(expected[key].shape)} "
                f"(vocabulary of {vocab_size} symbols?)"
            )
    model.load_state_dict({k: v.float() for k, v in kept.items()}, strict=True)
    return model.eval()
