"""HF export of a BASE-sized CTC model (12 layers, 95 M parameters): ours vs transformers' save_pretrained.

`repro.checkpoints.export.export_hf` (our model -> HF key names -> model.safetensors + config and processor
JSON) against `Wav2Vec2ForCTC.save_pretrained` + `Wav2Vec2Processor.save_pretrained` of the same weights
already held by an HF model (HF's converter for fairseq files needs fairseq, so the peer is HF's own save).
Both run in this process on the same weights, alternating, after an untimed warm-up each; the best wall
time of `--repeats` and the largest peak RSS during the call (sampled every millisecond; the resident models
included, and their growth above it) are reported, with the ratios on the last lines. The two weight files must hold
the same tensors.

    python -m benchmarks.bench_export [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from repro.checkpoints.export import export_hf, hf_config_dict, to_hf_state
from repro.checkpoints.fairseq import LoadedModel
from repro.config import ModelConfig
from repro.data.dictionary import Dictionary
from repro.models.ctc import Wav2Vec2CTC

LETTERS = list("|ETAONIHSRDLUMWCFGYPBVKXJQZ'")


def build(layers: int) -> tuple[LoadedModel, torch.nn.Module, object]:
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    cfg = ModelConfig(_name="wav2vec_ctc", encoder_layers=layers, mask_prob=0.65, apply_mask=True)
    dictionary = Dictionary.from_symbols(LETTERS)
    ours = Wav2Vec2CTC(cfg, len(dictionary)).eval()
    loaded = LoadedModel(model=ours, model_cfg=cfg, task_cfg={"normalize": False}, dictionary=dictionary,
                         kind="wav2vec_ctc")
    config = hf_config_dict(cfg, "wav2vec_ctc", len(dictionary))
    config.pop("model_type")
    with torch.device("meta"):
        hf = Wav2Vec2ForCTC(Wav2Vec2Config(**config))
    hf.load_state_dict(to_hf_state(ours.state_dict(), head="ctc"), strict=True, assign=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        vocab.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3,
                                     **{s: 4 + i for i, s in enumerate(LETTERS)}}))
        processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(do_normalize=False),
                                      tokenizer=Wav2Vec2CTCTokenizer(str(vocab)))
    return loaded, hf.eval(), processor


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(function, *args) -> tuple[float, float, float]:
    """(wall seconds, MiB of peak RSS above the RSS before the call, that RSS), RSS sampled every millisecond
    (the kernel's VmHWM cannot be reset in every container)."""
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    function(*args)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    return wall, max(peak[0], _rss_mib()) - before, before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 Transformer layers instead of BASE's 12")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = 2 if args.quick else 12
    loaded, hf, processor = build(layers)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    print(f"HF export of a BASE-width CTC model, {layers} layers, {parameters / 1e6:.1f} M parameters, "
          f"best of {args.repeats}", file=sys.stderr)

    def hf_save(out: Path) -> None:
        hf.save_pretrained(out)
        processor.save_pretrained(out)

    runs = {"ours": lambda out: export_hf(loaded, out), "hf": hf_save}
    best: dict[str, list[float]] = {name: [float("inf"), 0.0, 0.0] for name in runs}
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for repeat in range(args.repeats + 1):  # round 0 is the warm-up
            for name in runs if repeat % 2 == 0 else reversed(list(runs)):
                out = Path(tmp) / f"{name}{repeat}"
                wall, growth, resident = measure(runs[name], out)
                print(f"  round {repeat} {name}: wall {wall:.3f} s, RSS growth {growth:.1f} MiB", file=sys.stderr)
                if repeat:
                    best[name] = [min(best[name][0], wall), max(best[name][1], growth), resident]
        from safetensors.torch import load_file

        ours_file, hf_file = load_file(str(Path(tmp) / "ours1/model.safetensors")), load_file(
            str(Path(tmp) / "hf1/model.safetensors"))
        if sorted(ours_file) != sorted(hf_file) or not all(torch.equal(ours_file[k], hf_file[k]) for k in ours_file):
            print("error: the two model.safetensors files hold different tensors", file=sys.stderr)
            return 1
    for name, (wall, growth, resident) in best.items():
        print(f"{name:5s} export wall {wall:.3f} s  peak RSS {resident + growth:.0f} MiB "
              f"({growth:+.1f} MiB above the resident models)")
    ours, hf_result = best["ours"], best["hf"]
    print(f"wall time ratio (hf / ours): {hf_result[0] / ours[0]:.2f}x")
    print(f"peak RSS ratio (hf / ours): {(hf_result[2] + hf_result[1]) / (ours[2] + ours[1]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
