"""wav2vec 2.0 pretraining model (fairseq_spec.md §1).

Module and parameter names equal fairseq's state-dict keys (§9.3), so a fairseq `model` state dict loads
with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import ast
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from repro.models.layers import Fp32GroupNorm, Fp32LayerNorm, TransposeLast
from repro.models.masking import compute_mask_indices, sample_cross_negatives, sample_negatives
from repro.models.quantizers import GumbelVectorQuantizer

ConvLayerSpec = list[tuple[int, int, int]]


def parse_conv_layers(spec: str) -> ConvLayerSpec:
    """fairseq's `conv_feature_layers` string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", as tuples.

    Evaluated on a parsed AST restricted to list/tuple literals, `+` and `*` (no eval of arbitrary code).
    """

    def evaluate(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(evaluate(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [evaluate(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = evaluate(node.left), evaluate(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"model.conv_feature_layers: unsupported syntax in {spec!r}")

    try:
        layers = evaluate(ast.parse(spec.strip(), mode="eval"))
    except SyntaxError as err:
        raise ValueError(f"model.conv_feature_layers: cannot parse {spec!r}: {err}") from err
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t) for t in layers
    ):
        raise ValueError(f"model.conv_feature_layers must be a list of (channels, kernel, stride): {spec!r}")
    return layers


def conv_output_lengths(input_lengths: torch.Tensor, conv_layers: ConvLayerSpec) -> torch.Tensor:
    """Frames produced from `input_lengths` samples: floor((len - k) / s) + 1 per layer (§1.2)."""
    lengths = input_lengths
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.to(torch.long)


def frame_padding_mask(
    sample_padding_mask: torch.Tensor | None, num_frames: int, conv_layers: ConvLayerSpec
) -> torch.Tensor | None:
    """Frame-level padding mask (B, T) from a sample-level one (B, L), HEAD rule (§1.3 step 4).

    Frame t is padding iff t >= conv_output_length(#non-padded samples); None when nothing is padded.
    """
    if sample_padding_mask is None or not bool(sample_padding_mask.any()):
        return None
    input_lengths = (~sample_padding_mask).long().sum(-1)
    output_lengths = conv_output_lengths(input_lengths, conv_layers)
    frames = torch.arange(num_frames, device=sample_padding_mask.device)
    return frames[None, :] >= output_lengths[:, None]


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` backward (fairseq's feature_grad_mult)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class ConvFeatureExtractionModel(nn.Module):
    """Waveform (B, L) -> features (B, C, T) (§1.2). `conv_layers.{i}` = Sequential(conv, dropout, [norm], GELU)."""

    def __init__(self, conv_layers: ConvLayerSpec, mode: str = "default", conv_bias: bool = False) -> None:
        super().__init__()
        if mode not in ("default", "layer_norm"):
            raise ValueError(f"model.extractor_mode must be 'default' or 'layer_norm', got {mode!r}")
        blocks = []
        in_channels = 1
        for index, (channels, kernel, stride) in enumerate(conv_layers):
            conv = nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            modules: list[nn.Module] = [conv, nn.Dropout(p=0.0)]
            if mode == "layer_norm":
                modules.append(
                    nn.Sequential(
                        TransposeLast(), Fp32LayerNorm(channels, elementwise_affine=True), TransposeLast()
                    )
                )
            elif index == 0:
                # One group per channel: each channel normalised over time (padding included, Trap 8).
                modules.append(Fp32GroupNorm(channels, channels, affine=True))
            modules.append(nn.GELU())
            blocks.append(nn.Sequential(*modules))
            in_channels = channels
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = source.unsqueeze(1)  # (B, 1, L)
        for block in self.conv_layers:
            x = block(x)
        return x  # (B, C, T)


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over dim=2 (one norm per kernel tap), fairseq's pos_conv.

    Parameters are named like `torch.nn.utils.weight_norm`'s (`weight_g` (1, 1, K), `weight_v`), the
    keys of fairseq checkpoints. Without autograd (inference) the normalised weight is computed once and
    reused until a parameter changes (in place, e.g. load_state_dict, or replaced, e.g. `.to()`).
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        if channels % groups != 0:
            raise ValueError(f"encoder_embed_dim {channels} must be divisible by conv_pos_groups {groups}")
        self.kernel_size = kernel_size
        self.groups = groups
        weight = torch.empty(channels, channels // groups, kernel_size)
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * channels)))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(self._norm(weight.detach()))
        self.bias = nn.Parameter(torch.zeros(channels))
        self._inference_weight: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @staticmethod
    def _norm(v: torch.Tensor) -> torch.Tensor:
        return v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()  # (1, 1, K)

    def _weight(self) -> torch.Tensor:
        """g * v / ||v||, (C, C / groups, K); the same expression whether cached or not."""
        if torch.is_grad_enabled():
            return self.weight_v * (self.weight_g / self._norm(self.weight_v))
        # _version counts in-place writes; data_ptr / device / dtype catch replaced storage
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in (self.weight_v, self.weight_g))
        if self._inference_weight is None or self._inference_weight[0] != key:
            self._inference_weight = (key, self.weight_v * (self.weight_g / self._norm(self.weight_v)))
        return self._inference_weight[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self._weight(), self.bias, padding=self.kernel_size // 2, groups=self.groups)


class SamePad(nn.Module):
    """Drop the extra trailing frame an even kernel with padding k//2 produces."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class MultiheadSelfAttention(nn.Module):
    """Self-attention with fairseq's projection names, computed by scaled_dot_product_attention."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"encoder_embed_dim {embed_dim} not divisible by encoder_attention_heads {num_heads}"
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, D); attn_mask: (B, 1, 1, T) bool, True = may attend (or None)."""
        batch, frames, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, frames, self.num_heads, -1).transpose(1, 2)  # (B, H, T, d)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, dim))


class TransformerSentenceEncoderLayer(nn.Module):
    """Post-LN (BASE/LARGE) or pre-LN (LV-60) Transformer layer (§1.5)."""

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layer_norm_first: bool,
        activation_fn: str = "gelu",
    ) -> None:
        super().__init__()
        if activation_fn != "gelu":
            raise ValueError(f"model.activation_fn={activation_fn!r} not supported (wav2vec 2.0 uses 'gelu')")
        self.self_attn = MultiheadSelfAttention(embed_dim, num_heads, attention_dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(activation_dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.layer_norm_first = layer_norm_first
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc1(x).float()).type_as(x)  # fairseq's gelu runs in fp32
        return self.dropout3(self.fc2(self.dropout2(hidden)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(self.self_attn_layer_norm(x), attn_mask))
            return x + self._feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout1(self.self_attn(x, attn_mask)))
        return self.final_layer_norm(x + self._feed_forward(x))


def init_bert_params(module: nn.Module) -> None:
    """fairseq's init_bert_params for Linear layers: weight N(0, 0.02), bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TransformerEncoder(nn.Module):
    """Positional conv + Transformer layers (§1.5). `layer_drop_rng` decides LayerDrop skips."""

    pad_to_required_multiple = False
    """Apply fairseq's required_seq_len_multiple padding (tests check it is numerically neutral).

    fairseq pads T for its fp16 kernels; scaled_dot_product_attention needs no such padding, and the
    key mask that padding brings rules out the flash / memory-efficient kernels on GPU, so it is off."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.dropout = cfg.dropout
        self.embedding_dim = dim
        self.required_seq_len_multiple = cfg.required_seq_len_multiple
        self.layer_norm_first = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop
        self.checkpoint_activations = bool(getattr(cfg, "checkpoint_activations", False))
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(
            TransformerSentenceEncoderLayer(
                embed_dim=dim,
                ffn_dim=cfg.encoder_ffn_embed_dim,
                num_heads=cfg.encoder_attention_heads,
                dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout,
                activation_dropout=cfg.activation_dropout,
                layer_norm_first=cfg.layer_norm_first,
                activation_fn=cfg.activation_fn,
            )
            for _ in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.apply(init_bert_params)  # Linear layers only; pos_conv keeps its own init
        self.layer_drop_rng: torch.Generator | None = None

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, layer: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, T, D) -> (B, T, D) and the output of every layer that ran (B, T, D)."""
        x, layer_results = self.extract_features(x, padding_mask, layer)
        if self.layer_norm_first and layer is None:
            x = self.layer_norm(x)  # pre-LN: encoder LN after the last layer only
        return x, layer_results

    def extract_features(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, layer: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)  # post-LN: encoder LN before the layers

        # fairseq pads T to a multiple (masked keys, removed at the end): numerically neutral, and off
        # here (see pad_to_required_multiple).
        frames = x.size(1)
        multiple = self.required_seq_len_multiple if self.pad_to_required_multiple else 1
        pad_length = (-frames) % multiple if multiple > 1 else 0
        if pad_length:
            x = F.pad(x, (0, 0, 0, pad_length))
            if padding_mask is None:
                padding_mask = torch.zeros(x.size(0), frames, dtype=torch.bool, device=x.device)
            padding_mask = F.pad(padding_mask, (0, pad_length), value=True)
        attn_mask = None if padding_mask is None else (~padding_mask)[:, None, None, :]

        x = F.dropout(x, p=self.dropout, training=self.training)
        skip = self._layers_to_skip()
        layer_results: list[torch.Tensor] = []
        for index, block in enumerate(self.layers):
            if skip[index]:
                continue
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                # recompute the layer in the backward pass instead of storing its activations
                # (fairseq's checkpoint_activations); dropout replays the same RNG draws
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
            layer_results.append(x[:, :frames] if pad_length else x)
            if layer is not None and index == layer:
                break
        if pad_length:
            x = x[:, :frames]
        return x, layer_results

    def _layers_to_skip(self) -> list[bool]:
        """LayerDrop: in training a layer is skipped when its U[0,1) draw is <= encoder_layerdrop."""
        if not self.training or self.layerdrop <= 0:
            return [False] * len(self.layers)
        draws = torch.rand(len(self.layers), generator=self.layer_drop_rng)
        return (draws <= self.layerdrop).tolist()


def _derive_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Wav2Vec2Model(nn.Module):
    """wav2vec 2.0 (§1): conv features -> (mask) -> Transformer; quantized targets and contrastive logits."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        for unsupported in ("codebook_negatives",):
            if getattr(cfg, unsupported, 0):
                raise ValueError(f"model.{unsupported} is not supported (unused by the wav2vec 2.0 recipes)")
        if getattr(cfg, "negatives_from_everywhere", False):
            raise ValueError("model.negatives_from_everywhere is not supported (unused by the recipes)")
        self.conv_layers_spec = parse_conv_layers(cfg.conv_feature_layers)
        self.embed = self.conv_layers_spec[-1][0]
        dim = cfg.encoder_embed_dim
        self.feature_extractor = ConvFeatureExtractionModel(
            self.conv_layers_spec, mode=cfg.extractor_mode, conv_bias=cfg.conv_bias
        )
        self.post_extract_proj = nn.Linear(self.embed, dim) if self.embed != dim else None
        self.feature_grad_mult = cfg.feature_grad_mult
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        self.final_dim = cfg.final_dim if cfg.final_dim > 0 else dim
        self.logit_temp = cfg.logit_temp
        self.n_negatives = cfg.num_negatives
        self.cross_sample_negatives = cfg.cross_sample_negatives

        self.quantizer: GumbelVectorQuantizer | None = None
        if cfg.quantize_targets:
            vq_dim = cfg.latent_dim if cfg.latent_dim > 0 else self.final_dim
            self.quantizer = GumbelVectorQuantizer(
                dim=self.embed,
                num_vars=cfg.latent_vars,
                temp=tuple(cfg.latent_temp),
                groups=cfg.latent_groups,
                combine_groups=False,
                vq_dim=vq_dim,
                time_first=True,
            )
            self.project_q: nn.Linear | None = nn.Linear(vq_dim, self.final_dim)
        else:
            self.project_q = nn.Linear(self.embed, self.final_dim)

        self.mask_emb = nn.Parameter(torch.empty(dim).uniform_())
        self.encoder = TransformerEncoder(cfg)
        self.layer_norm = nn.LayerNorm(self.embed)
        self.final_proj: nn.Linear | None = nn.Linear(dim, self.final_dim)
        self.num_updates = 0
        self.set_rng_seed(0)

    # ------------------------------------------------------------------ training-loop hooks
    def set_num_updates(self, num_updates: int) -> None:
        """Called by the trainer after every optimizer step (Gumbel temperature schedule)."""
        self.num_updates = num_updates
        if self.quantizer is not None:
            self.quantizer.set_num_updates(num_updates)

    def set_rng_seed(self, seed: int) -> None:
        """Masks (numpy), negatives and LayerDrop (torch) of the next forwards derive from `seed`."""
        self.mask_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
        self.negatives_rng = torch.Generator().manual_seed(_derive_seed(seed, 1))
        layer_drop_rng = torch.Generator().manual_seed(_derive_seed(seed, 2))
        self.encoder.layer_drop_rng = layer_drop_rng

    def remove_pretraining_modules(self) -> None:
        """Drop quantizer / project_q / final_proj (fine-tuning, §1.3)."""
        self.quantizer = None
        self.project_q = None
        self.final_proj = None

    # ------------------------------------------------------------------ pieces of the forward
    def feature_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(input_lengths, self.conv_layers_spec)

    def _extract_conv_features(self, source: torch.Tensor) -> torch.Tensor:
        if self.feature_grad_mult > 0:
            features = self.feature_extractor(source)
            if self.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.feature_grad_mult)
            return features
        with torch.no_grad():
            return self.feature_extractor(source)

    def compute_time_mask(self, shape: tuple[int, int], padding_mask: torch.Tensor | None) -> np.ndarray:
        cfg = self.cfg
        return compute_mask_indices(
            shape,
            padding_mask,
            cfg.mask_prob,
            cfg.mask_length,
            mask_selection=cfg.mask_selection,
            mask_other=cfg.mask_other,
            min_masks=2,
            no_overlap=cfg.no_mask_overlap,
            min_space=cfg.mask_min_space,
            require_same_masks=cfg.require_same_masks,
            mask_dropout=cfg.mask_dropout,
            rng=self.mask_rng,
        )

    def _channel_mask(self, batch: int, channels: int, device: torch.device) -> torch.Tensor:
        cfg = self.cfg
        indices = compute_mask_indices(
            (batch, channels),
            None,
            cfg.mask_channel_prob,
            cfg.mask_channel_length,
            mask_selection=cfg.mask_channel_selection,
            mask_other=cfg.mask_channel_other,
            no_overlap=cfg.no_mask_channel_overlap,
            rng=self.mask_rng,
        )
        return torch.from_numpy(indices).to(device)  # (B, C)

    def apply_mask(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, mask_indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Time mask -> mask_emb (in D-space), channel mask -> 0, in fairseq's order (§1.4)."""
        batch, frames, channels = x.shape
        cfg = self.cfg
        if cfg.mask_channel_prob > 0 and cfg.mask_channel_before:
            x = x.masked_fill(self._channel_mask(batch, channels, x.device)[:, None, :], 0.0)
        if cfg.mask_prob > 0 or mask_indices is not None:
            if mask_indices is None:
                mask_indices = torch.from_numpy(self.compute_time_mask((batch, frames), padding_mask))
            mask_indices = mask_indices.to(device=x.device, dtype=torch.bool)
            if mask_indices.shape != (batch, frames):
                raise ValueError(
                    f"mask_indices has shape {tuple(mask_indices.shape)}, expected {(batch, frames)}"
                )
            x = torch.where(mask_indices.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        else:
            mask_indices = None
        if cfg.mask_channel_prob > 0 and not cfg.mask_channel_before:
            x = x.masked_fill(self._channel_mask(batch, channels, x.device)[:, None, :], 0.0)
        return x, mask_indices

    def compute_logits(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        negative_indices: torch.Tensor,
        codes: torch.Tensor | None,
        cross_negative_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cosine logits / logit_temp in fp32, (1+K, B, M); positive at index 0 (§1.9).

        x, y: (B, M, F) predictions and targets; negative_indices (B, M, K) row-local indices into y.
        Instead of gathering (K, B, M, F) negatives, the (B, M, M) cosine matrix of each row is computed
        once and indexed. A negative identical to its positive gets -inf: with quantized targets identity
        is decided on the code indices (equal codes <=> bit-equal targets), otherwise on the vectors.
        """
        batch, num, _ = y.shape
        xn = F.normalize(x.float(), dim=-1, eps=1e-8)
        yn = F.normalize(y.float(), dim=-1, eps=1e-8)
        positive = (xn * yn).sum(-1)  # (B, M)
        similarity = torch.bmm(xn, yn.transpose(1, 2))  # (B, M, M)
        negative_indices = negative_indices.to(device=y.device, dtype=torch.long)
        negative = similarity.gather(2, negative_indices)  # (B, M, K)
        if codes is not None:
            flat_codes = codes.reshape(batch, num, -1)
            picked = torch.gather(
                flat_codes.unsqueeze(1).expand(batch, num, num, flat_codes.size(-1)),
                2,
                negative_indices.unsqueeze(-1).expand(-1, -1, -1, flat_codes.size(-1)),
            )
            neg_is_pos = (picked == flat_codes.unsqueeze(2)).all(-1)
        else:
            rows = torch.arange(batch, device=y.device)[:, None, None]
            neg_is_pos = (y[rows, negative_indices] == y.unsqueeze(2)).all(-1)
        if cross_negative_indices is not None and cross_negative_indices.size(-1) > 0:
            cross_negative_indices = cross_negative_indices.to(device=y.device, dtype=torch.long)
            y_flat, yn_flat = y.reshape(batch * num, -1), yn.reshape(batch * num, -1)
            cross = torch.einsum("bmf,bmkf->bmk", xn, yn_flat[cross_negative_indices])
            cross_is_pos = (y_flat[cross_negative_indices] == y.unsqueeze(2)).all(-1)
            negative = torch.cat([negative, cross], dim=-1)
            neg_is_pos = torch.cat([neg_is_pos, cross_is_pos], dim=-1)
        negative = negative.masked_fill(neg_is_pos, float("-inf"))
        logits = torch.cat([positive.unsqueeze(-1), negative], dim=-1) / self.logit_temp  # (B, M, 1+K)
        return logits.permute(2, 0, 1).type_as(x)

    # ------------------------------------------------------------------ public forwards
    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: bool = True,
        mask_indices: torch.Tensor | None = None,
        negative_indices: torch.Tensor | None = None,
        features_only: bool = False,
        layer: int | None = None,
        cross_negative_indices: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """source (B, L) waveform, padding_mask (B, L) True = pad. Pretraining output (§1.3 step 14):
        x (1+K, B, M) logits, padding_mask, features_pen, prob/code perplexity, num_vars, temp,
        mask_indices (B, T) and the negative indices used (replay them to reproduce a forward)."""
        features = self._extract_conv_features(source)  # (B, C, T)
        features_pen = features.float().pow(2).mean()  # on the raw conv output (Trap 6)
        features = self.layer_norm(features.transpose(1, 2))  # (B, T, C)
        unmasked_features = features
        frame_mask = frame_padding_mask(padding_mask, features.size(1), self.conv_layers_spec)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        features = self.dropout_input(features)
        unmasked_features = self.dropout_features(unmasked_features)

        if mask:
            x, mask_indices = self.apply_mask(features, frame_mask, mask_indices)
        else:
            x, mask_indices = features, None
        x, layer_results = self.encoder(x, frame_mask, layer=layer)
        if features_only:
            return {
                "x": x,
                "padding_mask": frame_mask,
                "features": unmasked_features,
                "layer_results": layer_results,
                "mask_indices": mask_indices,
            }
        if mask_indices is None:
            raise ValueError(
                "the pretraining forward needs masked frames: call with mask=True and mask_prob > 0"
            )
        if self.project_q is None or self.final_proj is None:
            raise RuntimeError(
                "pretraining modules were removed (remove_pretraining_modules); use features_only"
            )

        batch = x.size(0)
        counts = mask_indices.sum(-1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every row needs the same number of masked frames (require_same_masks), got {counts.tolist()}"
            )
        num = int(counts[0])
        y = unmasked_features[mask_indices].view(batch, num, -1)  # (B, M, C)
        result: dict[str, Any] = {"padding_mask": frame_mask, "features_pen": features_pen}
        codes = None
        if self.quantizer is not None:
            q = self.quantizer(y)
            y = q["x"]
            codes = q["codes"]
            result.update(
                num_vars=q["num_vars"],
                prob_perplexity=q["prob_perplexity"],
                code_perplexity=q["code_perplexity"],
                temp=q["temp"],
            )
        y = self.project_q(y)  # (B, M, final_dim)
        if negative_indices is None:
            negative_indices = sample_negatives(num, batch, self.n_negatives, self.negatives_rng)
        if cross_negative_indices is None and self.cross_sample_negatives > 0:
            cross_negative_indices = sample_cross_negatives(
                num, batch, self.cross_sample_negatives, self.negatives_rng
            )
        x = self.final_proj(x[mask_indices].view(batch, num, -1))  # (B, M, final_dim)
        result["x"] = self.compute_logits(x, y, negative_indices, codes, cross_negative_indices)
        result["mask_indices"] = mask_indices
        result["negative_indices"] = negative_indices
        result["cross_negative_indices"] = cross_negative_indices
        return result

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: bool = False,
        layer: int | None = None,
    ) -> dict[str, Any]:
        """{x (B, T, D), padding_mask (B, T) or None, layer_results [(B, T, D)], ...} (§1.3 step 11)."""
        return self.forward(source, padding_mask, mask=mask, features_only=True, layer=layer)

    def quantize(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized features (B, T, vq_dim), group-local codes (B, T, G)) of a waveform (§1.3)."""
        if self.quantizer is None:
            raise RuntimeError("this model has no quantizer (quantize_targets=False or modules removed)")
        features = self.layer_norm(self.feature_extractor(source).transpose(1, 2))
        return self.quantizer.forward_idx(features)

    def get_extra_losses(self, net_output: dict[str, Any]) -> list[torch.Tensor]:
        """[(G*V - prob_ppl) / (G*V), features_pen] (§1.7); the first only with a quantizer."""
        extra = []
        if "prob_perplexity" in net_output:
            extra.append((net_output["num_vars"] - net_output["prob_perplexity"]) / net_output["num_vars"])
        if "features_pen" in net_output:
            extra.append(net_output["features_pen"])
        return extra
