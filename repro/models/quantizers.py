"""Product quantizers: Gumbel softmax (wav2vec 2.0 §1.6, vq-wav2vec §8.5) and k-means (vq-wav2vec §8.5).

Both map features to G groups of V code vectors, expose `forward_idx(x) -> (quantized, codes (B, T, G))`
and log `code_perplexity` (the perplexity of the hard code choices, summed over groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.layers import Fp32GroupNorm


def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """Sum over groups of exp(entropy) of the mean distribution; probs: (frames, groups, vars).

    The 1e-7 inside the log is fairseq's; uniform use of V codes in each of G groups gives G * V.
    """
    avg = probs.mean(dim=0)  # (groups, vars)
    return torch.exp(-torch.sum(avg * torch.log(avg + 1e-7), dim=-1)).sum()


def hard_gumbel_straight_through(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """One-hot of argmax(logits + gumbel noise) forward, gradient of the soft gumbel sample backward.

    `F.gumbel_softmax(hard=True)` returns `hard - soft.detach() + soft`, whose forward values are only
    one-hot up to rounding; re-adding the exact one-hot keeps the gradient and makes equal codes give
    bit-identical code vectors (so identical negatives are detected reliably, §1.9).
    """
    sample = F.gumbel_softmax(logits, tau=tau, hard=True)
    exact = F.one_hot(sample.detach().argmax(-1), logits.size(-1)).to(sample.dtype)
    return exact + (sample - sample.detach())


class GumbelVectorQuantizer(nn.Module):
    """G groups of V learned code vectors chosen by (straight-through) Gumbel softmax.

    Parameters are fairseq's: `vars` (1, G*V or V if combine_groups, vq_dim/G) ~ U[0,1) and
    `weight_proj` (Linear N(0,1), bias 0 at depth 1; a GELU MLP at depth > 1 for vq-wav2vec).
    """

    def __init__(
        self,
        dim: int,
        num_vars: int,
        temp: tuple[float, float, float] | list[float],
        groups: int,
        combine_groups: bool,
        vq_dim: int,
        time_first: bool = True,
        activation: nn.Module | None = None,
        weight_proj_depth: int = 1,
        weight_proj_factor: int = 1,
    ) -> None:
        super().__init__()
        if vq_dim % groups != 0:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by groups {groups} for concatenation")
        if len(temp) != 3:
            raise ValueError(f"temp must be (start, end, decay), got {temp!r}")
        self.groups = groups
        self.input_dim = dim
        self.num_vars = num_vars
        self.time_first = time_first
        self.combine_groups = combine_groups
        var_dim = vq_dim // groups
        num_groups = 1 if combine_groups else groups
        self.vars = nn.Parameter(torch.empty(1, num_groups * num_vars, var_dim))
        nn.init.uniform_(self.vars)
        if weight_proj_depth > 1:
            act = activation if activation is not None else nn.GELU()
            inner_dim = dim * weight_proj_factor
            blocks: list[nn.Module] = [
                nn.Sequential(nn.Linear(dim if i == 0 else inner_dim, inner_dim), act)
                for i in range(weight_proj_depth - 1)
            ]
            self.weight_proj: nn.Module = nn.Sequential(*blocks, nn.Linear(inner_dim, groups * num_vars))
        else:
            self.weight_proj = nn.Linear(dim, groups * num_vars)
            nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.curr_temp = self.max_temp

    def set_num_updates(self, num_updates: int) -> None:
        """Gumbel temperature for the next forwards: max(start * decay**n, end) (§1.6)."""
        self.curr_temp = max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def codebook(self) -> torch.Tensor:
        """(groups, vars, vq_dim/groups) code vectors (shared over groups when combine_groups)."""
        vars_ = self.vars
        if self.combine_groups:
            vars_ = vars_.repeat(1, self.groups, 1)
        return vars_.view(self.groups, self.num_vars, -1)

    def forward(
        self, x: torch.Tensor, produce_targets: bool = False
    ) -> dict[str, torch.Tensor | float | int]:
        """x: (B, T, dim) if time_first else (B, dim, T). Returns x (same layout, vq_dim), perplexities,
        num_vars (G*V), temp and, with produce_targets, group-local code indices (B, T, G)."""
        result: dict[str, torch.Tensor | float | int] = {"num_vars": self.num_vars * self.groups}
        if not self.time_first:
            x = x.transpose(1, 2)
        batch, frames, feat = x.shape
        logits = self.weight_proj(x.reshape(-1, feat)).view(batch * frames, self.groups, self.num_vars)

        with torch.no_grad():
            codes = logits.argmax(dim=-1)  # (B*T, G)
            hard = F.one_hot(codes, self.num_vars).to(logits.dtype)
            result["code_perplexity"] = one_hot_perplexity(codes, self.num_vars)
        result["prob_perplexity"] = perplexity(torch.softmax(logits.float(), dim=-1))
        result["temp"] = self.curr_temp

        if self.training:
            onehot = hard_gumbel_straight_through(logits.float(), self.curr_temp).type_as(logits)
            codes = onehot.detach().argmax(dim=-1)
        else:
            onehot = hard
        if produce_targets:
            result["targets"] = codes.view(batch, frames, self.groups)
        result["codes"] = codes.view(batch, frames, self.groups)
        # (G, B*T, V) @ (G, V, d) -> (G, B*T, d): one matmul per group instead of materialising
        # (B*T, G*V, d) products; identical values (a single non-zero term per sum).
        quantized = torch.bmm(onehot.transpose(0, 1), self.codebook().to(onehot.dtype))
        out = quantized.transpose(0, 1).reshape(batch, frames, -1)
        if not self.time_first:
            out = out.transpose(1, 2)
        result["x"] = out
        return result

    def forward_idx(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized x, group-local code indices (B, T, G)) — used for vq-wav2vec tokenization."""
        res = self.forward(x, produce_targets=True)
        return res["x"], res["targets"]  # type: ignore[return-value]


def one_hot_perplexity(codes: torch.Tensor, num_vars: int) -> torch.Tensor:
    """`perplexity` of hard choices; codes: (frames, groups) indices in [0, num_vars)."""
    return perplexity(F.one_hot(codes, num_vars).float())


class KmeansVectorQuantizer(nn.Module):
    """vq-wav2vec's k-means quantizer (Baevski et al. 2019 §3.2; fairseq kmeans_vector_quantizer.py).

    ze = GroupNorm(G groups)(grouped 1x1 conv(z)); per group the nearest of V code vectors (Euclidean)
    replaces it. The output carries zq forward and the gradient of ze backward (straight-through), and
    `kmeans_loss = MSE(zq, sg(ze)) + gamma * MSE(ze, sg(zq))`, which equals (1 + gamma) * MSE(ze, zq) in
    value. Parameters are fairseq's: `embedding` (V, G or 1, vq_dim/G) ~ 0.01 N(0, 1) and `projection`
    = Sequential(Conv1d(dim, dim, 1, groups=G, bias=False), Fp32GroupNorm(G, dim)).
    """

    def __init__(self, dim: int, num_vars: int, groups: int, combine_groups: bool, vq_dim: int,
                 time_first: bool = False, gamma: float = 0.25) -> None:
        super().__init__()
        if vq_dim % groups != 0:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by groups {groups} for concatenation")
        if vq_dim != dim:
            # fairseq views the projected (dim) features as (groups, vq_dim/groups): they must agree.
            raise ValueError(f"the k-means quantizer needs vq_dim == feature dim, got {vq_dim} vs {dim}")
        self.groups = groups
        self.combine_groups = combine_groups
        self.input_dim = dim
        self.num_vars = num_vars
        self.vq_dim = vq_dim
        self.time_first = time_first
        self.var_dim = vq_dim // groups
        self.gamma = gamma
        self.embedding = nn.Parameter(0.01 * torch.randn(num_vars, 1 if combine_groups else groups, self.var_dim))
        self.projection = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=groups, bias=False), Fp32GroupNorm(groups, dim)
        )

    def codebook(self) -> torch.Tensor:
        """(groups, vars, vq_dim/groups) code vectors (shared over groups when combine_groups)."""
        return self.embedding.expand(self.num_vars, self.groups, self.var_dim).transpose(0, 1)

    def nearest_codes(self, ze: torch.Tensor) -> torch.Tensor:
        """ze (B, G, d, T) -> (B, T, G) index of the nearest code vector of each group (L2)."""
        batch, _, _, frames = ze.shape
        points = ze.permute(1, 0, 3, 2).reshape(self.groups, batch * frames, self.var_dim).float()
        # exact pairwise distances (no |a|^2 - 2ab + |b|^2 shortcut, which can flip near ties)
        distances = torch.cdist(points, self.codebook().float(), compute_mode="donot_use_mm_for_euclid_dist")
        return distances.argmin(dim=-1).view(self.groups, batch, frames).permute(1, 2, 0)

    def forward(self, x: torch.Tensor, produce_targets: bool = False) -> dict[str, torch.Tensor | float | int]:
        """x: (B, dim, T), or (B, T, dim) if time_first. Returns x (quantized, same layout), kmeans_loss,
        code_perplexity, num_vars (V, as fairseq) and, with produce_targets, codes (B, T, G)."""
        result: dict[str, torch.Tensor | float | int] = {"num_vars": self.num_vars}
        if self.time_first:
            x = x.transpose(1, 2)
        ze = self.projection(x)  # (B, dim, T)
        codes, zq = self.nearest(ze)
        out = zq.detach() + (ze - ze.detach())  # straight-through: gradient of ze, value of zq
        with torch.no_grad():
            result["code_perplexity"] = one_hot_perplexity(codes.reshape(-1, self.groups), self.num_vars)
        if produce_targets:
            result["targets"] = codes
        result["codes"] = codes
        latent_loss = F.mse_loss(zq.float(), ze.detach().float())  # moves the code vectors
        commitment_loss = F.mse_loss(ze.float(), zq.detach().float())  # keeps the encoder near them
        result["kmeans_loss"] = latent_loss + self.gamma * commitment_loss
        result["x"] = out.transpose(1, 2) if self.time_first else out
        return result

    def forward_idx(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized x, group-local code indices (B, T, G)) — used for vq-wav2vec tokenization."""
        res = self.forward(x, produce_targets=True)
        return res["x"], res["targets"]  # type: ignore[return-value]

    def nearest(self, ze: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ze (B, dim, T) projected features -> (codes (B, T, G), zq (B, dim, T) their code vectors)."""
        batch, _, frames = ze.shape
        codes = self.nearest_codes(ze.view(batch, self.groups, self.var_dim, frames))  # (B, T, G)
        codebook = self.codebook()  # (G, V, d)
        zq = torch.stack([codebook[group][codes[..., group]] for group in range(self.groups)], dim=-2)
        return codes, zq.reshape(batch, frames, self.vq_dim).transpose(1, 2).to(ze.dtype)

    def quantize_projected(self, ze: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zq (B, dim, T), codes (B, T, G)) of already projected features (batched tokenization)."""
        codes, zq = self.nearest(ze)
        return zq, codes
