"""wav2vec 2.0 BASE on a GPU: our training steps against HF transformers on the same batch and dtype.

For each of pretraining (Wav2Vec2ForPreTraining) and CTC fine-tuning (Wav2Vec2ForCTC): forward +
backward + Adam at the paper's per-GPU batch (BASE: 1.4M samples per GPU, §4.2 / Appendix B, as
crops of 250k samples), in bf16 autocast (or fp16 with `--dtype fp16`). Printed per model: seconds
of audio per second, step time, peak GPU memory, and model FLOPs utilisation (benchmarks/flops.py
holds the FLOP count; MFU = FLOPs per step / step time / the device's dense peak). Then greedy
inference (real-time factor) of the CTC model. Without a CUDA device it says so and exits 0.

    python -m benchmarks.bench_gpu [--quick] [--steps N] [--dtype bf16|fp16] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))

from benchmarks.flops import peak_flops, training_flops  # noqa: E402

SAMPLE_RATE = 16_000
VOCAB = 32


def base_config():
    from repro.models.presets import PRESETS

    # LayerDrop off so that both implementations run all 12 layers.
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PRESETS["base"]), {"encoder_layerdrop": 0.0}))


def _autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _adam(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """The same optimizer for both implementations (torch's fused Adam on CUDA): only the models differ."""
    return torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=device == "cuda")


def time_steps(step, steps: int, device: str) -> tuple[float, float]:
    """(best step seconds, peak memory GiB) of `steps` calls after one warm-up."""
    step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(steps):
        started = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return best, peak


def step_closures(forwards: dict, device: str) -> dict:
    """{name: (model, loss_of(model))} -> {name: (forward, optimizer)}: each model on `device` in train mode
    with its own Adam; `forward()` returns that model's loss on the shared batch."""
    closures = {}
    for name, (model, loss_of) in forwards.items():
        model.to(device).train()
        closures[name] = (functools.partial(loss_of, model), _adam(model, device))
    return closures


def pretraining_pair(cfg, batch: int, samples: int, device: str):
    """(ours, hf) step closures on the same weights, batch, mask and negatives."""
    from benchmarks.bench_pretrain_step import _build
    from repro.losses.contrastive import contrastive_loss

    ours, source, mask, negatives = _build("ours", batch, samples, seed=0)
    hf, _, hf_mask, hf_negatives = _build("hf", batch, samples, seed=0)
    source, mask, negatives = source.to(device), mask.to(device), negatives.to(device)
    hf_mask, hf_negatives = hf_mask.to(device), hf_negatives.to(device)

    def ours_loss(model):
        return contrastive_loss(model(source, mask_indices=mask, negative_indices=negatives), [0.1, 10.0])[0]

    def hf_loss(model):
        return model(source, mask_time_indices=hf_mask, sampled_negative_indices=hf_negatives).loss

    return step_closures({"ours": (ours, ours_loss), "hf": (hf, hf_loss)}, device)


def finetuning_pair(cfg, batch: int, samples: int, device: str):
    """(ours, hf) CTC step closures on the same weights and batch (random letters as targets)."""
    import w2v_refs
    from transformers import Wav2Vec2ForCTC

    from repro.losses.ctc import ctc_loss
    from repro.models.ctc import Wav2Vec2CTC

    torch.manual_seed(0)
    finetune_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), {
        "_name": "wav2vec_ctc", "mask_prob": 0.0, "mask_channel_prob": 0.0, "layerdrop": 0.0}))
    ours = Wav2Vec2CTC(finetune_cfg, VOCAB)
    hf = Wav2Vec2ForCTC(w2v_refs.hf_config(cfg, vocab_size=VOCAB, mask_time_prob=0.0, attn_implementation="sdpa",
                                           ctc_loss_reduction="sum", ctc_zero_infinity=True))
    hf.load_state_dict(w2v_refs.to_hf_state(ours.state_dict(), head="ctc"), strict=False)
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(batch, samples, generator=generator).to(device)
    target_length = samples // SAMPLE_RATE * 15  # ~15 letters per second of speech
    targets = torch.randint(5, VOCAB, (batch, target_length), generator=generator).to(device)
    target_lengths = torch.full((batch,), target_length, device=device)

    def ours_loss(model):
        logits, padding = model(source)
        return ctc_loss(logits, padding, targets, target_lengths, blank=0, pad=1, eos=2, zero_infinity=True,
                        sentence_avg=False)[0]

    def hf_loss(model):
        return model(source, labels=targets).loss

    return step_closures({"ours": (ours, ours_loss), "hf": (hf, hf_loss)}, device), ours, hf, source


def run_pair(title: str, closures: dict, flops_per_step: float, steps: int, device: str, dtype: str,
             audio_seconds: float) -> None:
    peak = peak_flops(torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype)
    results = {}
    for name, (forward, optimizer) in closures.items():
        def step(forward=forward, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = forward()
            loss.float().backward()
            optimizer.step()

        seconds, memory = time_steps(step, steps, device)
        mfu = flops_per_step / seconds / peak if peak else float("nan")
        results[name] = seconds
        print(f"{title} {name:4s}: {seconds * 1e3:8.1f} ms/step  {audio_seconds / seconds:8.1f} s audio/s  "
              f"peak {memory:6.2f} GiB  MFU {100 * mfu:5.1f}%")
    print(f"RATIO {title} step throughput ours/hf = {results['hf'] / results['ours']:.2f}x")


def greedy_rtf(ours, hf, source: torch.Tensor, device: str, dtype: str) -> None:
    results = {}
    for name, model in (("ours", ours), ("hf", hf)):
        model.eval()

        def infer(model=model, name=name):
            with torch.inference_mode(), _autocast(device, dtype):
                logits = model(source)[0] if name == "ours" else model(source).logits
                return logits.argmax(-1)

        seconds, _ = time_steps(infer, 3, device)
        results[name] = seconds / (source.numel() / SAMPLE_RATE)
        print(f"greedy inference {name:4s}: real-time factor {results[name]:.5f}")
    print(f"RATIO greedy_inference speed ours/hf = {results['hf'] / results['ours']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 crops of 4 s and 2 layers (a smoke run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    cfg = base_config()
    if args.quick:
        cfg.encoder_layers = 2
    # BASE: 1.4M samples per GPU (Appendix B); as crops of 250k samples (fairseq's max_sample_size)
    batch, samples = (2, 64_000) if args.quick else (5, 250_000)
    steps = args.steps or (2 if args.quick else 10)
    audio_seconds = batch * samples / SAMPLE_RATE
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"BASE{' (2 layers)' if args.quick else ''} on {name}, {args.dtype}, batch {batch} x {samples} samples "
          f"({audio_seconds:.1f} s of audio), best of {steps} steps")
    flops = batch * training_flops(cfg, samples)
    run_pair("pretrain_step", pretraining_pair(cfg, batch, samples, args.device), flops, steps, args.device,
             args.dtype, audio_seconds)
    closures, ours, hf, source = finetuning_pair(cfg, batch, samples, args.device)
    run_pair("finetune_step", closures, batch * training_flops(cfg, samples, VOCAB), steps, args.device,
             args.dtype, audio_seconds)
    greedy_rtf(ours, hf, source, args.device, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
