"""RoBERTa over discrete speech units (Baevski, Auli, Mohamed 2019, arXiv 1911.03912), fairseq's `roberta`.

The encoder is fairseq's TransformerSentenceEncoder as RoBERTa configures it (2019 code, unchanged in
behaviour by the 2021 port to TransformerEncoder):

    x = embed_tokens(tokens) + embed_positions(tokens)        # no sqrt(dim) scaling
    x = dropout(layernorm_embedding(x)); x[pad] = 0
    x = post-LN Transformer layers (LN after each residual)     # no final encoder LN

Positions are learned and offset by the padding index as fairseq's `make_positions` does: the first
real token gets position `pad + 1` = 2, pads get `pad` (whose row is zero), so the table has
`max_positions + pad + 1` rows. The masked-LM head is dense -> gelu -> LayerNorm -> a projection whose
weight IS the token embedding matrix (tied) plus a bias.

Submodule names follow today's fairseq checkpoints (`encoder.sentence_encoder.*`, `encoder.lm_head.*`);
repro.checkpoints.roberta renames the 2019 ones (`decoder.*`, `emb_layer_norm`).

`RobertaCTC` is the fine-tuning model of the paper (§3.3 there): the pretrained encoder, a random
linear projection to the letter vocabulary, CTC over the unit frames.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repro.models.masking import compute_mask_indices
from repro.models.wav2vec2 import TransformerSentenceEncoderLayer, init_bert_params

# fairseq Dictionary indices (repro.data.dictionary, specials first)
BOS_INDEX, PAD_INDEX, EOS_INDEX = 0, 1, 2
MASK_SYMBOL = "<mask>"


def make_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq's make_positions: non-pad tokens numbered padding_idx+1, padding_idx+2, ...; pads padding_idx."""
    not_pad = tokens.ne(padding_idx).int()
    return (torch.cumsum(not_pad, dim=1).type_as(not_pad) * not_pad).long() + padding_idx


def init_roberta_params(module: nn.Module) -> None:
    """fairseq's init_bert_params: Linear and Embedding weights N(0, 0.02), biases 0, padding row 0."""
    init_bert_params(module)
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


class RobertaSentenceEncoder(nn.Module):
    """Token + learned position embeddings, embedding LayerNorm, post-LN layers (`sentence_encoder`)."""

    def __init__(self, cfg: Any, vocab_size: int, padding_idx: int = PAD_INDEX) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.padding_idx = padding_idx
        self.max_positions = cfg.max_positions
        self.dropout = cfg.dropout
        self.layerdrop = cfg.encoder_layerdrop
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx)
        self.embed_positions = nn.Embedding(cfg.max_positions + padding_idx + 1, dim, padding_idx)
        self.layernorm_embedding = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            TransformerSentenceEncoderLayer(
                dim, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads, cfg.dropout, cfg.attention_dropout,
                cfg.activation_dropout, layer_norm_first=False, activation_fn=cfg.activation_fn,
            )
            for _ in range(cfg.encoder_layers)
        )

    def check_length(self, tokens: torch.Tensor) -> None:
        if tokens.size(1) > self.max_positions:
            raise ValueError(
                f"sequence of {tokens.size(1)} tokens (<s> and </s> included) is longer than the model's "
                f"max_positions={self.max_positions}"
            )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> embedded and normalised input of the first layer (B, T, D), before dropout."""
        self.check_length(tokens)
        x = self.embed_tokens(tokens) + self.embed_positions(make_positions(tokens, self.padding_idx))
        return self.layernorm_embedding(x)

    def encode(self, x: torch.Tensor, padding_mask: torch.Tensor | None,
               return_all_hiddens: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedded x (B, T, D) -> last layer (B, T, D) and [input, layer 1, ..., layer L] when asked."""
        x = F.dropout(x, p=self.dropout, training=self.training)
        attn_mask = None
        if padding_mask is not None and padding_mask.any():
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            attn_mask = (~padding_mask)[:, None, None, :]  # (B, 1, 1, T), True = may attend
        inner_states = [x] if return_all_hiddens else []
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop:
                continue  # LayerDrop (Fan et al. 2019), as fairseq: skip when U[0,1) < p
            x = layer(x, attn_mask)
            if return_all_hiddens:
                inner_states.append(x)
        return x, inner_states

    def forward(self, tokens: torch.Tensor, return_all_hiddens: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encode(self.embed(tokens), tokens.eq(self.padding_idx), return_all_hiddens)


class RobertaLMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> features @ weight^T + bias, `weight` shared with the token embeddings."""

    def __init__(self, embed_dim: int, weight: nn.Parameter) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.weight = weight  # (V, D): the same Parameter as embed_tokens.weight
        self.bias = nn.Parameter(torch.zeros(weight.size(0)))

    def forward(self, features: torch.Tensor, masked_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if masked_tokens is not None:
            features = features[masked_tokens]  # (N, D): only the predicted positions (fairseq saves memory so)
        x = self.layer_norm(F.gelu(self.dense(features).float()).type_as(features))
        return F.linear(x, self.weight) + self.bias


class RobertaEncoder(nn.Module):
    """fairseq's RobertaEncoder: `sentence_encoder` and the tied `lm_head`."""

    def __init__(self, cfg: Any, vocab_size: int) -> None:
        super().__init__()
        self.sentence_encoder = RobertaSentenceEncoder(cfg, vocab_size)
        self.lm_head = RobertaLMHead(cfg.encoder_embed_dim, self.sentence_encoder.embed_tokens.weight)


class RobertaModel(nn.Module):
    """RoBERTa masked LM over a unit vocabulary (specials, codes, `<mask>` last)."""

    def __init__(self, cfg: Any, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = RobertaEncoder(cfg, vocab_size)
        self.apply(init_roberta_params)

    @property
    def sentence_encoder(self) -> RobertaSentenceEncoder:
        return self.encoder.sentence_encoder

    def extract_features(self, tokens: torch.Tensor, return_all_hiddens: bool = False
                         ) -> torch.Tensor | list[torch.Tensor]:
        """tokens (B, T) -> last layer (B, T, D), or every layer's (B, T, D) (embeddings first) when asked.

        Like fairseq's hub interface: tokens are dictionary indices, `<s>` first and `</s>` last.
        """
        features, inner_states = self.sentence_encoder(tokens, return_all_hiddens)
        return inner_states if return_all_hiddens else features

    def forward(self, src_tokens: torch.Tensor, masked_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """LM logits (B, T, V), or (N, V) for the N positions of `masked_tokens` (B, T) bool."""
        features, _ = self.sentence_encoder(src_tokens)
        return self.encoder.lm_head(features, masked_tokens)


class RobertaCTC(nn.Module):
    """RoBERTa encoder + random linear projection to the letter vocabulary, trained with CTC (arXiv 1911.03912).

    Input `<s> units </s>`; the logits of the unit positions are the CTC frames (one per 10 ms code).
    With `apply_mask`, training masks spans of input units (they become `<mask>`, which the model
    learned in pretraining) and spans of embedding channels: the paper applies SpecAugment-style
    masking while fine-tuning; how it did so on discrete input is not stated, this is our choice.
    """

    def __init__(self, cfg: Any, vocab_size: int, output_size: int, mask_index: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.sentence_encoder = RobertaSentenceEncoder(cfg, vocab_size)
        self.sentence_encoder.layerdrop = cfg.layerdrop
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.proj = nn.Linear(cfg.encoder_embed_dim, output_size)
        self.mask_index = mask_index
        self.num_updates = 0
        self.mask_rng = np.random.default_rng(0)
        self.apply(init_roberta_params)
        nn.init.xavier_uniform_(self.proj.weight)  # fairseq's Linear() for the CTC projection
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def from_pretrained(cls, pretrained: RobertaModel | None, cfg: Any, vocab_size: int, output_size: int,
                        mask_index: int | None) -> RobertaCTC:
        model = cls(cfg, vocab_size, output_size, mask_index)
        if pretrained is not None:
            model.sentence_encoder.load_state_dict(pretrained.sentence_encoder.state_dict(), strict=True)
        return model

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def set_rng_seed(self, seed: int) -> None:
        self.mask_rng = np.random.default_rng(seed)

    def _mask_units(self, tokens: torch.Tensor, frame_padding: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.mask_prob <= 0 or self.mask_index is None:
            return tokens
        mask = compute_mask_indices(
            (tokens.size(0), tokens.size(1) - 1), frame_padding.cpu().numpy(), cfg.mask_prob, cfg.mask_length,
            min_masks=2, require_same_masks=False, rng=self.mask_rng,
        )  # (B, T-1) over the unit positions (bos excluded)
        mask = torch.from_numpy(np.concatenate([np.zeros((tokens.size(0), 1), bool), mask], 1)).to(tokens.device)
        return tokens.masked_fill(mask, self.mask_index)

    def _mask_channels(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.mask_channel_prob <= 0:
            return x
        mask = compute_mask_indices(
            (x.size(0), x.size(2)), None, cfg.mask_channel_prob, cfg.mask_channel_length,
            require_same_masks=False, rng=self.mask_rng,
        )  # (B, D)
        return x.masked_fill(torch.from_numpy(mask).to(x.device).unsqueeze(1), 0.0)

    def forward(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src_tokens (B, T) -> CTC logits (B, T-1, V) and their padding mask (B, T-1), True = no frame."""
        tokens_after_bos = src_tokens[:, 1:]
        # </s> closes every row: as a padded frame the unit frames stay contiguous.
        frame_padding = tokens_after_bos.eq(PAD_INDEX) | tokens_after_bos.eq(EOS_INDEX)  # (B, T-1)
        encoder = self.sentence_encoder
        frozen = self.training and self.num_updates < self.cfg.freeze_finetune_updates
        with torch.no_grad() if frozen else contextlib.nullcontext():
            masking = self.training and self.cfg.apply_mask
            tokens = self._mask_units(src_tokens, frame_padding) if masking else src_tokens
            x = encoder.embed(tokens)
            if masking:
                x = self._mask_channels(x)
            x, _ = encoder.encode(x, src_tokens.eq(PAD_INDEX))
        logits = self.proj(self.final_dropout(x[:, 1:]))  # (B, T-1, V)
        return logits, frame_padding
