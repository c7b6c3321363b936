"""Pseudo-labelling throughput on CPU against torchaudio's `ctc_decoder`, measured in one run.

Ours: `repro.train.self_training.label_shard` on a shard whose emissions are already in the cache (as
after the GPU pass): decoder construction (binary 4-gram, lexicon trie), lexicon beam search, then the
shard's `.tsv` / `.ltr` / `.wrd` / scores files and its marker written atomically. Peer: torchaudio's
`ctc_decoder` (flashlight, same lexicon, LM, weights and beam) built and run on the same emissions,
nothing written. Reported: utterances/s and real-time
factor (decoding seconds / audio seconds, 50 emission frames per second) of each, and their ratio.
Timings are the best of `--repeats` runs, the two contenders alternating.

    python -m benchmarks.bench_pseudo_label            # 3000-word lexicon, 40 utterances, beam 500
    python -m benchmarks.bench_pseudo_label --quick    # 300 words, 8 utterances, beam 50 (smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_decode import (
    LETTERS,
    best_of_rounds,
    noisy_emissions,
    synthetic_lexicon_and_lm,
    torchaudio_lexicon_decoder,
)
from repro.checkpoints.format import atomic_save, model_file
from repro.data.dictionary import Dictionary
from repro.data.manifest import ManifestEntry, format_manifest
from repro.decode.evaluate import emissions_cache_key, save_cached_emissions
from repro.models.ctc import Wav2Vec2CTC
from repro.models.presets import PRESETS
from repro.train.self_training import LabelingSetup, Shard, label_shard, shard_files

FRAMES_PER_SECOND = 50
SAMPLES_PER_FRAME = 320


def bench(num_words: int, utterances: int, beam: int, repeats: int) -> float:
    rng = np.random.default_rng(2)
    dictionary = Dictionary.from_symbols(LETTERS)
    with tempfile.TemporaryDirectory(prefix="bench-pseudo-label-") as tmp:
        root = Path(tmp)
        lexicon, arpa, sentence = synthetic_lexicon_and_lm(root, num_words, rng)
        binary = root / "lm.bin"  # what a labelling job loads (fast to open)
        subprocess.run([str(Path(sys.executable).parent / "build_binary"), str(arpa), str(binary)], check=True,
                       capture_output=True)
        emissions = [noisy_emissions(sentence(), dictionary, rng) for _ in range(utterances)]
        audio_seconds = sum(e.shape[0] for e in emissions) / FRAMES_PER_SECOND

        # a labelling setup whose shard finds its emissions in the cache (the checkpoint only keys the cache)
        checkpoint = root / "labeler.pt"
        model_cfg = dataclasses.replace(PRESETS["tiny"], _name="wav2vec_ctc")
        atomic_save(model_file(kind="wav2vec_ctc", model_state=Wav2Vec2CTC(model_cfg, len(dictionary)).state_dict(),
                               model_cfg=dataclasses.asdict(model_cfg), task_cfg={"normalize": False},
                               dictionary=dictionary.symbols), checkpoint)
        entries = [ManifestEntry(f"utt{i:04d}.flac", e.shape[0] * SAMPLES_PER_FRAME) for i, e in enumerate(emissions)]
        manifest = root / "unlabeled.tsv"
        manifest.write_text(format_manifest(root / "audio", entries))
        decode = {"type": "kenlm", "name": "kenlm_4gram", "lm_model": str(binary), "lexicon": str(lexicon),
                  "lm_weight": 2.0, "word_score": -1.0, "sil_weight": 0.0, "unk_weight": float("-inf"), "beam": beam,
                  "beam_threshold": 25.0, "beam_size_token": len(dictionary), "nbest": 1}
        shard = Shard(0, 1, tuple(range(utterances)))
        attempt = [0]

        def fresh_setup() -> LabelingSetup:
            attempt[0] += 1
            out = root / f"labels{attempt[0]}"
            setup = LabelingSetup(manifest=str(manifest), rows=utterances, output_dir=str(out), checkpoint=str(checkpoint),
                                  dictionary=tuple(dictionary.symbols), decode=decode, normalize=False, sample_rate=16000,
                                  max_tokens=10**9, post_process="letter", cpu=True, fingerprint=f"bench{attempt[0]}")
            files = shard_files(setup, shard)
            files["input.tsv"].parent.mkdir(parents=True)
            files["input.tsv"].write_text(format_manifest(root / "audio", entries))
            key = emissions_cache_key(checkpoint, files["input.tsv"], False)
            save_cached_emissions(out / "emissions" / f"{shard.name}.pt", key, emissions)
            return setup

        def run_ours(setup: LabelingSetup) -> list[str]:
            label_shard(setup, shard, progress=False)
            return (Path(setup.output_dir) / "shards" / f"{shard.name}.wrd").read_text().split("\n")[:-1]

        def run_theirs() -> list[str]:  # a labelling job builds its decoder too: construction is timed
            decoder = torchaudio_lexicon_decoder(lexicon, binary, dictionary, beam)
            return [" ".join(decoder(emission[None])[0][0].words) for emission in emissions]

        ours_time, theirs_time, ours_words, theirs_words = best_of_rounds(run_ours, run_theirs, repeats,
                                                                          prepare_ours=fresh_setup)
    agree = sum(a == b for a, b in zip(ours_words, theirs_words)) / utterances
    print(f"pseudo-labelling, 4-gram lexicon beam on CPU ({torch.get_num_threads()} threads): {num_words} words, "
          f"{utterances} utterances ({audio_seconds:.0f} s of audio at {FRAMES_PER_SECOND} frames/s), beam {beam}")
    print(f"    ours (decode + shard files)  {utterances / ours_time:.1f} utt/s  RTF {ours_time / audio_seconds:.4f}")
    print(f"    torchaudio ctc_decoder       {utterances / theirs_time:.1f} utt/s  RTF {theirs_time / audio_seconds:.4f}   "
          f"same transcript {100 * agree:.0f}%")
    ratio = theirs_time / ours_time
    print(f"ratios: pseudo_label_throughput_vs_torchaudio={ratio:.2f} (>1: ours faster)")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not a measurement)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        bench(num_words=300, utterances=8, beam=50, repeats=repeats)
    else:
        bench(num_words=3000, utterances=40, beam=500, repeats=repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
