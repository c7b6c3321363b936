"""wav2vec (Schneider et al. 2019) and vq-wav2vec (Baevski et al. 2019): fairseq's arch `wav2vec`.

Waveform (B, L) -> feature extractor (strided convs, one-group GroupNorm) -> z (B, C, T)
-> [vq-wav2vec: Gumbel or k-means quantizer] -> aggregator (causal convs) -> c (B, C', T)
-> step-wise predictions of the z `offset + k` frames ahead, scored by dot product against the true
frame and `num_negatives` frames of the same utterance (fairseq_spec.md §8).

Module and parameter names equal fairseq's state-dict keys (§9.3), so the released files load strictly.
Public contract (fairseq README): `model.feature_extractor(wav)` -> (B, C, T),
`model.feature_aggregator(z)` -> (B, C', T), `model.vector_quantizer.forward_idx(z)` -> (_, (B, T, G)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from repro.models.layers import Fp32GroupNorm
from repro.models.quantizers import GumbelVectorQuantizer, KmeansVectorQuantizer
from repro.models.wav2vec2 import ConvLayerSpec, conv_output_lengths, parse_conv_layers

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def receptive_field(conv_layers: ConvLayerSpec) -> tuple[int, int]:
    """(receptive field in samples, total stride) of a conv stack, by fairseq's recurrence (l.226-237)."""
    field, jump = 0, 0
    for _, kernel, stride in conv_layers:
        field = kernel if field == 0 else field + (kernel - 1) * jump
        jump = stride if jump == 0 else jump * stride
    return field, jump


def auto_offset(conv_layers: ConvLayerSpec) -> int:
    """offset='auto': ceil(receptive field / stride); 465 / 160 -> 3 for both README stacks."""
    field, jump = receptive_field(conv_layers)
    return math.ceil(field / jump)


def resolve_offset(offset: Any, conv_layers: ConvLayerSpec) -> int:
    if str(offset) == "auto":
        return auto_offset(conv_layers)
    try:
        return int(offset)
    except ValueError:
        raise ValueError(f"model.offset must be 'auto' or an integer, got {offset!r}") from None


class Wav2VecFeatureExtractor(nn.Module):
    """Waveform (B, L) -> z (B, C, T). Block = Conv1d (no bias) -> Dropout(0) -> GroupNorm(1 group: over
    channels and time) -> activation; optional residuals (where channels match) and log(|z| + 1)."""

    def __init__(self, conv_layers: ConvLayerSpec, log_compression: bool, skip_connections: bool,
                 residual_scale: float, non_affine_group_norm: bool, activation: str) -> None:
        super().__init__()
        blocks = []
        in_channels = 1
        for channels, kernel, stride in conv_layers:
            blocks.append(nn.Sequential(
                nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=False),
                nn.Dropout(p=0.0),
                Fp32GroupNorm(1, channels, affine=not non_affine_group_norm),
                ACTIVATIONS[activation](),
            ))
            in_channels = channels
        self.conv_layers = nn.ModuleList(blocks)
        self.log_compression = log_compression
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """source (B, L); with `lengths` (B,) samples of right-padded utterances, the normalization of
        each utterance ignores its padding, so every row equals the utterance run alone (up to its
        conv_output_lengths frames; later frames are padding)."""
        x = source.unsqueeze(1)  # (B, 1, L)
        for block in self.conv_layers:
            residual = x
            if lengths is None:
                x = block(x)
            else:
                conv, dropout, norm, activation = block
                kernel, stride = conv.kernel_size[0], conv.stride[0]
                lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
                x = conv(x)
                x = activation(masked_group_norm(dropout(x), norm, frame_mask(lengths, x.size(2))))
            if self.skip_connections and x.size(1) == residual.size(1):
                # the residual is subsampled to the block's frame rate, as fairseq does
                frames, residual_frames = x.size(2), residual.size(2)
                residual = residual[..., :: residual_frames // frames][..., :frames]
                x = (x + residual) * self.residual_scale
        if self.log_compression:
            x = (x.abs() + 1).log()
        return x  # (B, C, T)


class ConvAggregator(nn.Module):
    """z (B, C, T) -> c (B, C', T). Each block pads k-1 frames on the left by replicating the first frame
    (zeros with agg_zero_pad), so its convolution is causal; its one-group GroupNorm then normalizes over
    channels and the whole utterance, as fairseq's. Residual: (x + r) * sqrt(residual_scale), r through a
    bias-free 1x1 conv where the width changes."""

    def __init__(self, conv_layers: ConvLayerSpec, embed: int, dropout: float, skip_connections: bool,
                 residual_scale: float, non_affine_group_norm: bool, conv_bias: bool, zero_pad: bool,
                 activation: str) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        projections: list[nn.Module | None] = []
        in_channels = embed
        for channels, kernel, stride in conv_layers:
            if stride != 1:
                raise ValueError(f"model.conv_aggregator_layers: stride must be 1 (causal padding), got {stride}")
            projections.append(nn.Conv1d(in_channels, channels, 1, bias=False)
                               if in_channels != channels and skip_connections else None)
            pad = nn.ConstantPad1d((kernel - 1, 0), 0.0) if zero_pad else nn.ReplicationPad1d((kernel - 1, 0))
            blocks.append(nn.Sequential(
                pad,
                nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=conv_bias),
                nn.Dropout(p=dropout),
                Fp32GroupNorm(1, channels, affine=not non_affine_group_norm),
                ACTIVATIONS[activation](),
            ))
            in_channels = channels
        self.conv_layers = nn.Sequential(*blocks)
        self.residual_proj = nn.ModuleList(projections)
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T); `valid` (B, T) marks real frames of right-padded rows (normalized on their own)."""
        for projection, block in zip(self.residual_proj, self.conv_layers):
            residual = x
            if valid is None:
                x = block(x)
            else:
                pad, conv, dropout, norm, activation = block
                x = activation(masked_group_norm(dropout(conv(pad(x))), norm, valid))
            if self.skip_connections:
                if projection is not None:
                    residual = projection(residual)
                x = (x + residual) * self.residual_scale
        return x


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, valid: torch.Tensor | None) -> torch.Tensor:
    """`norm(x)` with the statistics of each utterance taken over its valid frames only (fp32).

    x (B, C, T), valid (B, T) True on real frames. For an utterance padded on the right this equals
    running `norm` on the utterance alone: what lets a padded batch reproduce per-file features.
    """
    if valid is None:
        return norm(x)
    batch, channels, frames = x.shape
    groups = norm.num_groups
    grouped = x.float().view(batch, groups, channels // groups, frames)
    mask = valid.view(batch, 1, 1, frames).to(grouped.dtype)
    count = mask.sum(dim=(2, 3), keepdim=True) * (channels // groups)
    mean = (grouped * mask).sum(dim=(2, 3), keepdim=True) / count
    var = (((grouped - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / count
    out = ((grouped - mean) / torch.sqrt(var + norm.eps)).view(batch, channels, frames)
    if norm.weight is not None:
        out = out * norm.weight.float().view(1, -1, 1) + norm.bias.float().view(1, -1, 1)
    return out.type_as(x)


def frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, frames) True where the frame index is below the utterance's length."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


def sample_negatives(batch: int, frames: int, num_negatives: int, generator: torch.Generator,
                     as_fairseq: bool) -> torch.Tensor:
    """(B, K, T) frame indices of the negatives of every frame, drawn from the same utterance.

    Intended: for frame t, K draws uniform over the T-1 other frames (draw in [0, T-2], +1 if >= t).
    fairseq's code (wav2vec.py `sample_negatives`, since 3335de5f, which trained vq-wav2vec) differs in
    two ways that `as_fairseq` reproduces: it first draws a (B, K*T) tensor it throws away (advancing the
    generator), and it lays the draws out t-major for the exclusion test (position p excludes frame
    p // K) but reads them back K-major (position p is negative p // T of frame p % T), so the excluded
    frame is rarely the positive: about 1/(T-1) of the negatives equal their positive, unmasked.
    """
    if frames < 2:
        raise ValueError(f"an utterance of {frames} frame(s) has no other frame to draw negatives from")
    if as_fairseq:
        torch.randint(0, frames, (batch, num_negatives * frames), generator=generator)  # discarded draw
        draws = torch.randint(0, frames - 1, (batch, num_negatives * frames), generator=generator)
        excluded = torch.arange(frames).repeat_interleave(num_negatives)  # t-major: p // K
        draws = draws + (draws >= excluded).long()
        return draws.view(batch, num_negatives, frames)  # read back K-major
    draws = torch.randint(0, frames - 1, (batch, num_negatives, frames), generator=generator)
    own = torch.arange(frames).view(1, 1, frames)
    return draws + (draws >= own).long()


class Wav2VecPredictions(nn.Module):
    """Step heads (one ConvTranspose2d producing S predictions per context frame) and their scores.

    For step i (shift = offset + i) the prediction from c_t is scored against z_{t+shift} (label 1) and
    its K negatives (label 0) by dot product, no normalization or temperature (§8.4).
    """

    def __init__(self, in_dim: int, out_dim: int, prediction_steps: int, num_negatives: int, dropout: float,
                 offset: int, balanced_classes: bool) -> None:
        super().__init__()
        self.project_to_steps = nn.ConvTranspose2d(in_dim, out_dim, (1, prediction_steps))
        self.dropout = nn.Dropout(p=dropout)
        self.num_negatives = num_negatives
        self.offset = offset
        self.balanced_classes = balanced_classes

    def forward(self, c: torch.Tensor, z: torch.Tensor, negative_indices: torch.Tensor) -> list[torch.Tensor]:
        """c (B, C', T) context, z (B, C, T) targets, negative_indices (B, K, T).

        Returns one (1+K, B, T - shift) score tensor per step, the positive first (fairseq's `nbt` layout).
        """
        x = self.dropout(self.project_to_steps(c.unsqueeze(-1)))  # (B, C, T, S)
        batch, channels, frames = z.shape
        rows = torch.arange(batch, device=z.device).view(batch, 1, 1)
        negatives = z.transpose(1, 2)[rows, negative_indices.to(z.device)]  # (B, K, T, C)
        targets = torch.cat([z.unsqueeze(0), negatives.permute(1, 0, 3, 2)], dim=0)  # (1+K, B, C, T)
        steps = min(x.size(-1), frames - self.offset)
        scores = []
        for step in range(steps):
            shift = step + self.offset
            scores.append(torch.einsum("bct,nbct->nbt", x[..., :-shift, step], targets[..., shift:]))
        return scores


def _derive_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Wav2VecModel(nn.Module):
    """fairseq's `Wav2VecModel` (cnn aggregator). `cfg` has the fields of repro.config.Wav2VecConfig."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
        if cfg.aggregator != "cnn":
            raise ValueError(f"model.aggregator={cfg.aggregator!r}: only 'cnn' is built (no released model "
                             "uses the GRU aggregator)")
        if cfg.cross_sample_negatives or cfg.sample_distance is not None:
            raise ValueError("model.cross_sample_negatives and model.sample_distance are not supported "
                             "(0 and None in every README command and released file)")
        if cfg.num_negatives < 1:
            raise ValueError(f"model.num_negatives must be >= 1, got {cfg.num_negatives}")
        self.conv_layers_spec = parse_conv_layers(cfg.conv_feature_layers)
        aggregator_spec = parse_conv_layers(cfg.conv_aggregator_layers)
        embed = self.conv_layers_spec[-1][0]
        self.feature_extractor = Wav2VecFeatureExtractor(
            self.conv_layers_spec, cfg.log_compression, cfg.skip_connections_feat, cfg.residual_scale,
            cfg.non_affine_group_norm, cfg.activation,
        )
        vq_dim = cfg.vq_dim if cfg.vq_dim > 0 else embed
        self.vector_quantizer: GumbelVectorQuantizer | KmeansVectorQuantizer | None = None
        if cfg.vq_type == "gumbel":
            self.vector_quantizer = GumbelVectorQuantizer(
                dim=embed, num_vars=cfg.vq_vars, temp=tuple(cfg.vq_temp), groups=cfg.vq_groups,
                combine_groups=cfg.combine_groups, vq_dim=vq_dim, time_first=False,
                activation=ACTIVATIONS[cfg.activation](), weight_proj_depth=cfg.vq_depth, weight_proj_factor=2,
            )
        elif cfg.vq_type == "kmeans":
            self.vector_quantizer = KmeansVectorQuantizer(
                dim=embed, num_vars=cfg.vq_vars, groups=cfg.vq_groups, combine_groups=cfg.combine_groups,
                vq_dim=vq_dim, time_first=False, gamma=cfg.vq_gamma,
            )
        elif cfg.vq_type not in ("none", None):
            raise ValueError(f"model.vq_type must be 'none', 'gumbel' or 'kmeans', got {cfg.vq_type!r}")
        self.offset = resolve_offset(cfg.offset, self.conv_layers_spec)

        def make_aggregator() -> ConvAggregator:
            return ConvAggregator(
                aggregator_spec, embed=embed, dropout=cfg.dropout, skip_connections=cfg.skip_connections_agg,
                residual_scale=cfg.residual_scale, non_affine_group_norm=cfg.non_affine_group_norm,
                conv_bias=not cfg.no_conv_bias, zero_pad=cfg.agg_zero_pad, activation=cfg.activation,
            )

        self.feature_aggregator = make_aggregator()
        self.wav2vec_predictions = Wav2VecPredictions(
            self.feature_aggregator.out_channels, embed, cfg.prediction_steps, cfg.num_negatives, cfg.dropout,
            self.offset, cfg.balanced_classes,
        )
        self.dropout_feats = nn.Dropout(p=cfg.dropout_features)
        self.dropout_agg = nn.Dropout(p=cfg.dropout_agg)
        if cfg.project_features == "none":
            self.project_features: nn.Module | None = None
        elif cfg.project_features == "same":
            self.project_features = self.feature_aggregator
        elif cfg.project_features == "new":
            self.project_features = make_aggregator()
        else:
            raise ValueError(f"model.project_features must be none, same or new, got {cfg.project_features!r}")
        self.negatives_as_fairseq = bool(getattr(cfg, "negatives_as_fairseq", True))
        self.set_rng_seed(0)

    # ------------------------------------------------------------------ training-loop hooks
    def set_num_updates(self, num_updates: int) -> None:
        """Called by the trainer after every optimizer step (Gumbel temperature schedule)."""
        if isinstance(self.vector_quantizer, GumbelVectorQuantizer):
            self.vector_quantizer.set_num_updates(num_updates)

    def set_rng_seed(self, seed: int) -> None:
        """The negatives of the next forwards derive from `seed`."""
        self.negatives_rng = torch.Generator().manual_seed(_derive_seed(seed))

    def feature_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(input_lengths, self.conv_layers_spec)

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def extract(self, source: torch.Tensor, lengths: torch.Tensor | None = None, aggregate: bool = True,
                codes: bool = False) -> dict[str, torch.Tensor]:
        """Inference on a right-padded batch, row by row equal to running each utterance alone.

        source (B, L), lengths (B,) samples (None: no padding, the plain fused normalizations run).
        Returns `frames` (B,) valid frames per row, `z` (B, C, T) features (quantized for vq models),
        `c` (B, C', T) context (if aggregate) and `codes` (B, T, G) (if codes; vq models only). Frames at
        or beyond `frames` are padding.
        """
        z = self.feature_extractor(source, lengths)
        if lengths is None:
            lengths = torch.full((source.size(0),), source.size(1), dtype=torch.long, device=source.device)
            valid = None
        else:
            valid = frame_mask(self.feature_lengths(lengths), z.size(2))
        frames = self.feature_lengths(lengths)
        result = {"frames": frames}
        if self.vector_quantizer is not None:
            quantized, idxs = self.quantized_with_codes(z, valid)
            if codes:
                result["codes"] = idxs
            z = quantized
        elif codes:
            raise ValueError("codes need a vq-wav2vec model (model.vq_type gumbel or kmeans)")
        result["z"] = z
        if aggregate:
            result["c"] = self.feature_aggregator(z, valid)
        return result

    def quantized_with_codes(self, z: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """forward_idx of the quantizer on padded rows (the k-means projection's GroupNorm is masked)."""
        quantizer = self.vector_quantizer
        if isinstance(quantizer, KmeansVectorQuantizer) and valid is not None:
            conv, norm = quantizer.projection
            return quantizer.quantize_projected(masked_group_norm(conv(z), norm, valid))
        return quantizer.forward_idx(z)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(z or its quantized version (B, C, T), the quantizer's logged outputs)."""
        if self.vector_quantizer is None:
            return z, {}
        result = self.vector_quantizer(z)
        return result["x"], {key: value for key, value in result.items() if key not in ("x", "codes")}

    def forward(self, source: torch.Tensor, negative_indices: torch.Tensor | None = None) -> dict[str, Any]:
        """source (B, L) waveform. Returns `cpc_logits` (per step, (1+K, B, T - shift), positive first),
        `negative_indices` (B, K, T) (pass them back to replay a forward) and the quantizer's outputs
        (prob/code perplexity, temp, num_vars, kmeans_loss)."""
        z, result = self.quantize(self.feature_extractor(source))
        c = self.dropout_agg(self.feature_aggregator(self.dropout_feats(z)))
        targets = self.project_features(z) if self.project_features is not None else z
        if negative_indices is None:
            negative_indices = sample_negatives(targets.size(0), targets.size(2), self.wav2vec_predictions.num_negatives,
                                                self.negatives_rng, self.negatives_as_fairseq)
        result["cpc_logits"] = self.wav2vec_predictions(c, targets, negative_indices)
        result["negative_indices"] = negative_indices
        return result
