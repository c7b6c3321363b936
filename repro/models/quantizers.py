"""Gumbel-softmax product quantizer (fairseq_spec.md §1.6; vq-wav2vec variant §8.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
            result["code_perplexity"] = perplexity(hard.float())
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
