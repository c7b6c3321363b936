"""featurize throughput: seconds of audio per second, `repro.tools featurize` vs a plain per-file loop.

The baseline is what fairseq's wav2vec_featurize.py does: for each file in turn, soundfile.read,
`feature_extractor` then `feature_aggregator` on that one file (eval, no_grad), write its output.
Ours is the tool: on a GPU, files read ahead by worker processes and batched by length with padding
(exact: the normalizations skip the padding); on CPU one file per call (batching measured 0.54x there),
so the CPU ratio shows the tool's overhead (checkpoint load, bookkeeping) against the bare loop. Both use the same model (the wav2vec_large architecture
of the README, random weights; `--quick`: a narrow one) on the same files, in this process, and write
the same HDF5 files when h5py is installed (otherwise neither writes). One untimed warm-up each; the
best of `--repeats` runs is kept; the last line is the ratio ours / baseline.

    python -m benchmarks.bench_featurize            # 24 files, 2-8 s, wav2vec_large architecture
    python -m benchmarks.bench_featurize --quick    # 12 files, narrow model (smoke run)
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from repro.checkpoints.format import atomic_save, model_file
from repro.config import Wav2VecConfig, stored_model_config
from repro.models.wav2vec import Wav2VecModel
from repro.tools import featurize

LARGE = dict(conv_feature_layers="[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), "
                                 "(512, 1, 1)]",
             conv_aggregator_layers="[" + ", ".join(f"(512, {k}, 1)" for k in range(2, 14)) + "]",
             skip_connections_agg=True, log_compression=True, num_negatives=10)
NARROW = dict(LARGE, conv_feature_layers=LARGE["conv_feature_layers"].replace("512", "64"),
              conv_aggregator_layers=LARGE["conv_aggregator_layers"].replace("512", "64"))


def baseline(model: Wav2VecModel, files: list[Path], out_dir: Path, write: bool) -> None:
    """fairseq's loop: one file at a time, read, extract, write."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        wave, _ = sf.read(str(path), dtype="float32")
        with torch.no_grad():
            c = model.feature_aggregator(model.feature_extractor(torch.from_numpy(wave)[None]))
        if write:
            featurize.write_h5(out_dir / (path.stem + featurize.SUFFIX), c[0].numpy())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 files and a narrow model")
    parser.add_argument("--files", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="audio-reading processes of ours (tool default)")
    args = parser.parse_args()
    count = args.files or (12 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 2)
    write = importlib.util.find_spec("h5py") is not None
    torch.manual_seed(0)
    cfg = Wav2VecConfig(**(NARROW if args.quick else LARGE))
    model = Wav2VecModel(cfg).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_featurize_") as temporary:
        root = Path(temporary)
        (root / "data" / "train").mkdir(parents=True)
        files, seconds = [], 0.0
        for index in range(count):
            samples = int(rng.integers(32_000, 128_000))
            sf.write(root / "data" / "train" / f"utt{index:04d}.wav",
                     (0.3 * rng.standard_normal(samples)).astype(np.float32), 16_000, subtype="FLOAT")
            files.append(root / "data" / "train" / f"utt{index:04d}.wav")
            seconds += samples / 16_000
        checkpoint = root / "model.pt"
        atomic_save(model_file(kind="wav2vec", model_state=model.state_dict(), model_cfg=stored_model_config(cfg),
                               task_cfg={}, dictionary=None), checkpoint)

        def ours() -> None:
            shutil.rmtree(root / "ours", ignore_errors=True)
            if write:
                featurize.featurize_split(checkpoint, root / "data", root / "ours", "train", device="cpu",
                                          num_workers=args.workers, progress=False)
            else:  # the same batched extraction, without the HDF5 files neither side can write
                from repro.tools.audio_units import file_lengths, iterate_batches, run_model, split_files

                items = split_files(root / "data", "train", "wav")
                for _, waves in iterate_batches(items, file_lengths(items), 480_000, args.workers or 0):
                    run_model(model, waves, torch.device("cpu"), aggregate=True, codes=False)

        def plain() -> None:
            shutil.rmtree(root / "plain", ignore_errors=True)
            baseline(model, files, root / "plain", write)

        timings = {}
        for name, function in (("plain loop", plain), ("repro featurize", ours)):
            function()  # warm-up
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                function()
                best = min(best, time.perf_counter() - started)
            timings[name] = best
            print(f"{name:16s} {seconds / best:8.1f} s audio/s  ({best:.2f} s for {seconds:.0f} s of audio, "
                  f"{count} files)")
        if not write:
            print("(h5py not installed: neither side wrote HDF5)")
        print(f"featurize throughput ratio ours/plain-loop: {timings['plain loop'] / timings['repro featurize']:.2f}x "
              f"(CPU, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
