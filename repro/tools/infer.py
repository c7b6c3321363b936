"""`python -m repro.tools infer DATA --gen-subset dev_other --path MODEL --w2l-decoder kenlm ...`

fairseq's `examples/speech_recognition/infer.py` command line (fairseq_spec.md §7.1), same defaults:
`--beam 5` (fairseq's generation default; the README command therefore decodes with beam 5),
`--beam-threshold 25`, `--beam-size-token 100`, `--lm-weight 0.2`, `--word-score 1.0`,
`--unk-weight -inf`, `--sil-weight 0`, `--max-tokens 4000000`. Works on released fairseq
fine-tuned checkpoints and ours (repro.checkpoints.fairseq.load). Prints the corpus-level WER
(and UER) and, with --results-path, writes hypo/ref .word/.units files for sclite.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from repro.checkpoints.fairseq import load
from repro.checkpoints.format import CheckpointError
from repro.config import DecodeConfig
from repro.data.audio import AudioError
from repro.data.audio_headers import check_split_audio
from repro.decode.evaluate import (
    EvaluationError,
    compute_emissions,
    decode_split,
    load_split,
    load_target_dictionary,
    model_vocab_size,
)
from repro.decode.lexicon import LexiconError, build_decoder
from repro.decode.wer import score_results, write_results

log = logging.getLogger("repro.tools.infer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="directory with <subset>.tsv, <subset>.<labels> and dict.<labels>.txt")
    parser.add_argument("--task", default="audio_finetuning", help="accepted for fairseq compatibility")
    parser.add_argument("--path", required=True, help="fine-tuned checkpoint (fairseq's or ours)")
    parser.add_argument("--gen-subset", default="test", help="split to decode (default: test)")
    parser.add_argument("--results-path", default=None, help="write hypo/ref files here")
    parser.add_argument("--w2l-decoder", default="viterbi", choices=["viterbi", "kenlm", "fairseqlm"])
    parser.add_argument("--kenlm-model", "--lm-model", dest="lm_model", default=None,
                        help="KenLM (.arpa/.bin) or fairseq transformer LM checkpoint (dict.txt beside it)")
    parser.add_argument("--lexicon", default=None, help="lexicon: WORD<TAB>W O R D |")
    parser.add_argument("--lm-weight", type=float, default=0.2)
    parser.add_argument("--word-score", type=float, default=1.0)
    parser.add_argument("--unk-weight", type=float, default=float("-inf"))
    parser.add_argument("--sil-weight", type=float, default=0.0)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--beam-threshold", type=float, default=25.0)
    parser.add_argument("--beam-size-token", type=int, default=100)
    parser.add_argument("--nbest", type=int, default=1)
    parser.add_argument("--criterion", default="ctc", choices=["ctc"], help="only CTC models are decoded")
    parser.add_argument("--labels", default="ltr", help="label file extension (default: ltr)")
    parser.add_argument("--max-tokens", type=int, default=4_000_000, help="audio samples per batch")
    parser.add_argument("--post-process", "--remove-bpe", dest="post_process", default="letter",
                        help="how units become words (letter, sentencepiece, wordpiece, none)")
    parser.add_argument("--normalize", action="store_true", default=None,
                        help="force waveform normalization (default: as the checkpoint was trained)")
    parser.add_argument("--cpu", action="store_true", help="run the model on CPU even with a GPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def decode_config_from_args(args: argparse.Namespace) -> DecodeConfig:
    return DecodeConfig(
        type=args.w2l_decoder, lm_model=args.lm_model, lexicon=args.lexicon, lm_weight=args.lm_weight,
        word_score=args.word_score, sil_weight=args.sil_weight, unk_weight=args.unk_weight, beam=args.beam,
        beam_threshold=args.beam_threshold, beam_size_token=args.beam_size_token, nbest=args.nbest,
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.nbest < 1:
        print("infer: --nbest must be >= 1", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    try:
        loaded = load(args.path)
        if loaded.kind != "wav2vec_ctc":
            raise EvaluationError(f"{args.path} holds a {loaded.kind!r} model; infer needs a fine-tuned CTC model")
        dictionary = load_target_dictionary(args.data, args.labels, loaded.dictionary, model_vocab_size(loaded.model))
        normalize = args.normalize
        if normalize is None:
            normalize = bool(loaded.model_cfg.normalize if loaded.model_cfg.normalize is not None
                             else (loaded.task_cfg or {}).get("normalize", False))
        decoder = build_decoder(decode_config_from_args(args), dictionary, device)
        split = load_split(args.data, args.gen_subset, dictionary, args.labels, normalize)
        check_split_audio(split.dataset, progress=not args.quiet)  # bad files named by line, before decoding
    except (CheckpointError, EvaluationError, LexiconError, AudioError, ValueError, OSError) as error:
        print(f"infer: {error}", file=sys.stderr)
        return 1
    emissions = compute_emissions(loaded.model, split.dataset, args.max_tokens, device, progress=not args.quiet)
    results = decode_split(decoder, emissions, split, dictionary, args.post_process, progress=not args.quiet)
    score = score_results(results)
    if args.results_path:
        paths = write_results(args.results_path, args.path, args.gen_subset, results, score)
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    print(f"WER: {score.wer:.4f}")
    print(f"UER: {score.uer:.4f}")
    print(f"{args.gen_subset}: {len(results)} utterances, {score.words.errors} word errors / "
          f"{score.words.reference_length} reference words ({args.w2l_decoder}, beam {args.beam})")
    return 0
