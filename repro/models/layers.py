"""Small layers shared by the wav2vec family: fp32 normalization, transposition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fairseq's Fp32GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(
            x.float(),
            self.num_groups,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        )
        return out.type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (fairseq's Fp32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(
            x.float(),
            self.normalized_shape,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        )
        return out.type_as(x)


class TransposeLast(nn.Module):
    """Swap the last two dimensions (lets a LayerNorm over channels sit inside a conv block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)
