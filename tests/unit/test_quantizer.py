"""Gumbel vector quantizer (fairseq_spec.md §1.6)."""

from __future__ import annotations

import math

import torch

from repro.models.quantizers import GumbelVectorQuantizer, perplexity


def make(**kw) -> GumbelVectorQuantizer:
    args = dict(dim=16, num_vars=10, temp=(2.0, 0.5, 0.999995), groups=2, combine_groups=False, vq_dim=12)
    args.update(kw)
    return GumbelVectorQuantizer(**args)


def test_parameters_and_init():
    torch.manual_seed(0)
    q = make(dim=64, num_vars=320, vq_dim=256)
    assert q.vars.shape == (1, 640, 128)
    assert 0.0 <= q.vars.min() and q.vars.max() < 1.0 and abs(q.vars.mean().item() - 0.5) < 0.01
    assert abs(q.weight_proj.weight.std().item() - 1.0) < 0.02 and q.weight_proj.bias.abs().max() == 0
    deep = make(combine_groups=True, weight_proj_depth=2, weight_proj_factor=2)
    assert deep.vars.shape == (1, 10, 6)
    assert sorted(k for k in deep.state_dict()) == [
        "vars",
        "weight_proj.0.0.bias",
        "weight_proj.0.0.weight",
        "weight_proj.1.bias",
        "weight_proj.1.weight",
    ]
    x, idx = deep.eval().forward_idx(torch.randn(2, 5, 16))
    assert x.shape == (2, 5, 12) and idx.shape == (2, 5, 2) and idx.max() < 10


def test_temperature_schedule():
    q = make()
    assert q.curr_temp == 2.0
    for updates in (0, 1, 1000, 100_000, 400_000):
        q.set_num_updates(updates)
        assert math.isclose(q.curr_temp, max(2.0 * 0.999995**updates, 0.5), rel_tol=1e-12)
    assert q.curr_temp == 0.5


def test_perplexity_of_uniform_usage_is_number_of_codes():
    codes = torch.arange(40) % 10
    one_hot = torch.nn.functional.one_hot(
        torch.stack([codes, codes.flip(0)], dim=1), 10
    ).float()  # (40, 2, 10)
    assert abs(perplexity(one_hot).item() - 20.0) < 1e-4
    collapsed = torch.zeros(40, 2, 10)
    collapsed[..., 3] = 1
    assert abs(perplexity(collapsed).item() - 2.0) < 1e-4


def test_eval_is_argmax_and_train_is_straight_through():
    torch.manual_seed(1)
    q = make()
    x = torch.randn(3, 7, 16, requires_grad=True)
    q.eval()
    res = q(x, produce_targets=True)
    logits = q.weight_proj(x).view(3, 7, 2, 10)
    assert torch.equal(res["targets"], logits.argmax(-1))
    codebook = q.vars.view(2, 10, 6)
    expected = torch.cat([codebook[g][res["targets"][..., g]] for g in range(2)], dim=-1)
    assert torch.equal(res["x"], expected)
    assert res["num_vars"] == 20 and res["temp"] == 2.0
    probs = torch.softmax(logits.reshape(-1, 2, 10), -1).mean(0)
    expected_ppl = torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()
    assert torch.allclose(res["prob_perplexity"], expected_ppl)

    q.train()
    torch.manual_seed(5)
    res = q(x, produce_targets=True)
    # Forward values are exact code vectors (one-hot forward) ...
    expected = torch.cat([codebook[g][res["targets"][..., g]] for g in range(2)], dim=-1)
    assert torch.equal(res["x"], expected)
    # ... and the gradient reaches weight_proj through the soft sample (straight-through).
    res["x"].sum().backward()
    assert q.weight_proj.weight.grad is not None and q.weight_proj.weight.grad.abs().sum() > 0
    # Gumbel noise: training codes differ from the argmax codes somewhere at temperature 2.
    assert not torch.equal(res["targets"], logits.argmax(-1))
