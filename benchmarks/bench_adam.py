"""fairseq's Adam update over the parameters of wav2vec 2.0 BASE: multi-tensor (`torch._foreach_*`,
the default) against the per-parameter loop, in one process on the same gradients.

Both variants are checked equal (max |difference| printed) before they are timed. On a GPU the
multi-tensor form saves a kernel launch per op and parameter; on a CPU the ops run tensor by tensor
in C++ either way, so the gain there is the Python dispatch only.

    python -m benchmarks.bench_adam [--quick] [--steps N] [--threads T] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from repro.models.presets import PRESETS
from repro.models.wav2vec2 import Wav2Vec2Model
from repro.train.optim import FairseqAdam


def _parameters(quick: bool, device: str) -> list[torch.Tensor]:
    preset = OmegaConf.structured(PRESETS["base"])
    if quick:
        preset.encoder_layers = 2
    torch.manual_seed(0)
    model = Wav2Vec2Model(OmegaConf.to_object(preset)).to(device)
    return [p.detach().clone() for p in model.parameters()]


def _time(params0: list[torch.Tensor], grads: list[torch.Tensor], foreach: bool, steps: int,
          device: str) -> tuple[float, list[torch.Tensor]]:
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer = FairseqAdam(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, foreach=foreach)
    optimizer.step()  # allocates the moments
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps, [p.detach() for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 10)
    params0 = _parameters(args.quick, args.device)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator).to(args.device) * 1e-3 for p in params0]
    count = sum(p.numel() for p in params0)
    loop_time, loop_params = _time(params0, grads, False, steps, args.device)
    foreach_time, foreach_params = _time(params0, grads, True, steps, args.device)
    difference = max(float((a - b).abs().max()) for a, b in zip(loop_params, foreach_params))
    print(f"Adam over {len(params0)} tensors ({count / 1e6:.1f}M parameters) on {args.device}, {steps} steps, "
          f"{args.threads} thread(s): max |foreach - loop| = {difference:.2e}")
    print(f"  per-parameter loop: {loop_time * 1e3:.1f} ms/step; foreach: {foreach_time * 1e3:.1f} ms/step")
    print(f"RATIO adam_step foreach_vs_loop speedup = {loop_time / foreach_time:.2f}x")


if __name__ == "__main__":
    main()
