"""GPU checks (`pytest -m cuda`): the only tests allowed to skip for want of hardware (issue 19).

On a CPU-only machine (CI included) they skip; the CPU-checkable parts of the GPU path (kernel
eligibility, bf16 autocast, compile, foreach Adam) are tested in tests/unit.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from repro.losses.contrastive import contrastive_loss
from repro.models.presets import PRESETS
from repro.models.wav2vec2 import Wav2Vec2Model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(**overrides) -> Wav2Vec2Model:
    cfg = OmegaConf.merge(OmegaConf.structured(PRESETS["tiny"]), overrides)
    torch.manual_seed(0)
    return Wav2Vec2Model(OmegaConf.to_object(cfg))


def test_unpadded_batches_run_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model(encoder_embed_dim=64, encoder_attention_heads=4).cuda().eval()
    source = torch.randn(2, 16_000, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        features = model.extract_features(source, None)["x"]  # raises if a mask forced another kernel
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_loss_is_close_to_fp32(dtype):
    model = _model().cuda().train()
    source = torch.randn(2, 16_000, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    losses = []
    for autocast in (False, True):
        model.set_rng_seed(3)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            losses.append(float(contrastive_loss(model(source), None)[0]))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
