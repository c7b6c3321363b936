"""One wav2vec 2.0 BASE pretraining step (forward, backward, Adam) on CPU: ours vs HF Wav2Vec2ForPreTraining.

Both models get the same weights, batch, mask and negatives; each runs in its own subprocess so that memory
is measured separately: the tensors autograd saves for backward, the step's peak RSS above the resident model + Adam state (VmHWM reset through
/proc/self/clear_refs) and the process peak RSS. Prints the time and memory ratios.

    python benchmarks/bench_pretrain_step.py [--quick] [--steps N] [--threads T] [--rounds R]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))


def _build(impl: str, batch: int, samples: int, seed: int):
    import w2v_refs
    from omegaconf import OmegaConf

    from repro.models.presets import PRESETS
    from repro.models.wav2vec2 import Wav2Vec2Model

    # BASE with LayerDrop off so both models run all 12 layers.
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(PRESETS["base"]), {"encoder_layerdrop": 0.0})
    )
    torch.manual_seed(seed)
    ours = Wav2Vec2Model(cfg)
    ours.set_rng_seed(seed)
    source = torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))
    frames = int(ours.feature_lengths(torch.tensor(samples)))
    mask = torch.from_numpy(ours.compute_time_mask((batch, frames), None))
    num = int(mask[0].sum())
    negatives = torch.randint(
        0, num, (batch, num, cfg.num_negatives), generator=torch.Generator().manual_seed(seed)
    )
    if impl == "ours":
        return ours, source, mask, negatives
    from transformers import Wav2Vec2ForPreTraining

    hf_cfg = w2v_refs.hf_config(
        cfg,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        feat_proj_dropout=cfg.dropout_input,
        feat_quantizer_dropout=cfg.dropout_features,
        mask_time_prob=cfg.mask_prob,
        attn_implementation="sdpa",
    )
    hf = Wav2Vec2ForPreTraining(hf_cfg)
    hf.load_state_dict(w2v_refs.to_hf_state(ours.state_dict(), head="pretraining"), strict=True)
    from test_wav2vec2_parity import _to_hf_negatives

    return hf, source, mask, _to_hf_negatives(mask, negatives)


def _worker(impl: str, batch: int, samples: int, steps: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    from repro.losses.contrastive import contrastive_loss

    model, source, mask, negatives = _build(impl, batch, samples, seed=0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)

    def forward() -> torch.Tensor:
        if impl == "ours":
            out = model(source, mask_indices=mask, negative_indices=negatives)
            return contrastive_loss(out, [0.1, 10.0])[0]
        return model(source, mask_time_indices=mask, sampled_negative_indices=negatives).loss

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step()  # warm-up (allocates Adam state)
    wall, cpu, growth = [], [], []
    for _ in range(steps):
        rss_before = _reset_peak_rss()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
        growth.append(_status_kib("VmHWM") - rss_before)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "wall": min(wall),
            "cpu": min(cpu),
            "peak_rss_mb": peak / 1024,
            "step_mb": max(growth) / 1024,
            "saved_mb": _saved_activation_mb(forward),
        }
    )


def _saved_activation_mb(forward) -> float:
    """MiB of distinct tensor storages autograd keeps for the backward of one forward (deterministic)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    del loss
    return sum(storages.values()) / 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (VmHWM) and return the current RSS, both in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def run(impl: str, batch: int, samples: int, steps: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(impl, batch, samples, steps, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch of 2 x 4 s instead of 4 x 15.6 s")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per implementation (min is kept)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best of rounds is kept)")
    args = parser.parse_args()
    batch, samples = (2, 64_000) if args.quick else (4, 250_000)
    steps = args.steps or (2 if args.quick else 3)
    print(
        f"BASE pretraining step on CPU, batch {batch} x {samples} samples, {steps} timed steps, "
        f"{args.threads} threads",
        file=sys.stderr,
    )
    # Alternate the implementations (other processes may share the CPU) and keep each one's best run.
    # CPU time of the process is the headline: it is much less sensitive to other load than wall time.
    results: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for impl in ("ours", "hf") if round_index % 2 == 0 else ("hf", "ours"):
            res = run(impl, batch, samples, steps, args.threads)
            print(
                f"  round {round_index} {impl}: cpu {res['cpu']:.3f} s wall {res['wall']:.3f} s",
                file=sys.stderr,
            )
            best = results.setdefault(impl, res)
            for key in ("cpu", "wall"):
                best[key] = min(best[key], res[key])
    for impl, res in results.items():
        print(
            f"{impl:5s} step cpu {res['cpu']:.3f} s  wall {res['wall']:.3f} s  saved activations "
            f"{res['saved_mb']:.0f} MiB  step RSS peak {res['step_mb']:.0f} MiB above model+optimizer  "
            f"process peak RSS {res['peak_rss_mb']:.0f} MiB"
        )
    ours, hf = results["ours"], results["hf"]
    print(
        f"speedup (hf / ours): cpu time {hf['cpu'] / ours['cpu']:.2f}x  wall time {hf['wall'] / ours['wall']:.2f}x"
    )
    print(
        f"memory (hf / ours): saved activations {hf['saved_mb'] / ours['saved_mb']:.2f}x  step RSS peak "
        f"{hf['step_mb'] / ours['step_mb']:.2f}x  process peak RSS {hf['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
