"""Self-training (Xu et al. 2021, "Self-training and Pre-training are Complementary", arXiv 2010.11430).

The procedure (v1 §2.2-2.3, as read in conf/experiment/recipes/self_training.yaml's sources): a pretrained
wav2vec 2.0 model fine-tuned on the labeled split labels the unlabeled audio with the 4-gram lexicon beam,
whose 50 best are rescored with the Transformer LM (repro/decode/rescore.py); one round, no filtering;
the final "ctc ft" model fine-tunes the same pretrained checkpoint again on labeled + pseudo-labeled data.

This module holds the pieces, each a plain function over files so that any process can run them:

* `prepare_labeling` checks every input before work starts (audio present, a CTC checkpoint, lexicon
  and LM that fit the dictionary) and returns a picklable `LabelingSetup`;
* `label_shard` labels rows [start, stop) of the manifest: emissions through the evaluate stage's
  cache, the decoder, then `shard-*.{tsv,ltr,wrd,scores.tsv}` written atomically and a `.done.json`
  marker last, so an interrupted shard is simply redone and a finished one never is;
* `merge_shards` concatenates the shards in order, applies the optional filters and scores the labels
  against hidden transcripts where the corpus has them;
* `write_combined_split` adds the labeled split: one manifest and label set, each utterance once.

Running the shards (in-process, a local process pool, or a SLURM job array) is repro/launch/pseudo_label.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import os
import resource
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from repro.checkpoints.fairseq import load as load_checkpoint
from repro.data.batching import batch_by_size, ordered_indices
from repro.data.dataset import FileAudioDataset
from repro.data.dictionary import Dictionary
from repro.data.librispeech import TranscriptError, TranscriptLookup, words_to_letters
from repro.data.manifest import Manifest, ManifestEntry, format_manifest, read_manifest
from repro.decode.evaluate import SplitData as EvalSplit
from repro.decode.evaluate import (
    compute_emissions,
    decode_split,
    decoding_setups,
    emissions_cache_key,
    file_sha256,
    load_cached_emissions,
    load_target_dictionary,
    model_vocab_size,
    save_cached_emissions,
)
from repro.decode.lexicon import (
    build_decoder,
    check_lm_coverage,
    kenlm_vocabulary,
    read_lexicon,
    spelling_ids,
)
from repro.decode.rescore import RescoreWeights, TransformerSentenceScorer, rescore
from repro.decode.wer import ErrorCounts, align_counts, units_to_words

log = logging.getLogger(__name__)

SETUP_FORMAT = "repro-pseudo-label-v1"
SCORES_HEADER = "id\taudio\tframes\tscore\tscore_per_frame"


class PseudoLabelError(ValueError):
    """Pseudo-labelling cannot run as configured (the message names the file, line or key)."""


# ----------------------------------------------------------------------------------------------
# Setup: everything a shard needs, checked before any work


@dataclass(frozen=True)
class LabelingSetup:
    """What labels the unlabeled manifest, in a form any process (local worker, SLURM task) can use."""

    manifest: str
    """Unlabeled manifest (.tsv)."""
    rows: int
    """Rows of the manifest."""
    output_dir: str
    """Pseudo-label directory."""
    checkpoint: str
    """Fine-tuned CTC model that labels."""
    dictionary: tuple[str, ...]
    """Target dictionary symbols (the model's output units)."""
    decode: dict[str, Any]
    """The decoding setup (fields of repro.config.DecodeConfig)."""
    normalize: bool
    """Waveform normalization the model was trained with."""
    sample_rate: int
    """Expected sample rate."""
    max_tokens: int
    """Audio samples per emission batch."""
    post_process: str
    """How label units become words ('letter')."""
    cpu: bool
    """Compute emissions on CPU even when a GPU is visible."""
    fingerprint: str
    """Hash of everything above that changes the labels: a shard made with another one is redone."""
    rescore: dict[str, Any] | None = None
    """Transformer-LM rescoring of the beam's n-best (lm_model, nbest, lm_weight, word_score, ngram_weight), or None
    (in the fingerprint too)."""


@dataclass(frozen=True)
class Shard:
    """Some rows of the unlabeled manifest (ascending row numbers)."""

    index: int
    count: int
    rows: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    @property
    def rows_digest(self) -> str:
        return hashlib.sha256(",".join(map(str, self.rows)).encode()).hexdigest()[:16]


def emission_batch_limit(sizes: np.ndarray, max_tokens: int) -> int:
    """Samples per emission batch: max_tokens, or the longest utterance when it is longer (infer.py drops none)."""
    return max(int(max_tokens), int(sizes.max()) if len(sizes) else 0)


def plan_shards(sizes: Sequence[int] | np.ndarray, num_shards: int, max_tokens: int) -> list[Shard]:
    """Split the manifest into shards made of whole emission batches of the unsharded run.

    Emissions are computed in batches (longest first, grouped under max_tokens, as compute_emissions
    does) and padding changes a batch's outputs (group-norm feature encoder), so a shard takes a run of
    consecutive global batches: re-batching its rows gives the very same batches, and N shards label
    exactly as one does. Batches are dealt in near-equal numbers (each holds about max_tokens samples).
    """
    if num_shards < 1:
        raise PseudoLabelError(f"self_training.num_shards must be >= 1, got {num_shards}")
    sizes = np.asarray(sizes, dtype=np.int64)
    batches = batch_by_size(sizes, emission_batch_limit(sizes, max_tokens), required_batch_size_multiple=1,
                            indices=ordered_indices(sizes))
    groups = [group for group in np.array_split(np.arange(len(batches)), min(num_shards, max(len(batches), 1)))]
    rows = [sorted(int(row) for batch in group for row in batches[batch]) for group in groups]
    return [Shard(index, len(rows), tuple(shard_rows)) for index, shard_rows in enumerate(rows)]


def output_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """`self_training.output_dir`, else `<run dir>/pseudo_labels`."""
    configured = cfg.self_training.output_dir
    return Path(configured) if configured else Path(run_dir) / "pseudo_labels"


def labeling_checkpoint(cfg: DictConfig) -> Path:
    """The labelling model: `self_training.labeling_checkpoint`, which must be set."""
    path = cfg.self_training.labeling_checkpoint
    if not path:
        raise PseudoLabelError("self_training.labeling_checkpoint is not set: the fine-tuned CTC model that labels "
                               "(e.g. runs/<row>/checkpoints/checkpoint_best.pt or a released fairseq file)")
    return Path(path)


def labeling_decode(cfg: DictConfig) -> dict[str, Any]:
    """The `decodings` entry named by `self_training.labeling_decoding`, with `labeling_decode` on top."""
    name = cfg.self_training.labeling_decoding
    named = dict(cfg.get("decodings") or {})
    if name not in named and name != "viterbi":
        raise PseudoLabelError(f"self_training.labeling_decoding={name!r} is not one of decodings "
                               f"({', '.join(sorted(named)) or 'none'})")
    probe = OmegaConf.merge(cfg, {"paper": {"decoding": [name]}})
    setup = decoding_setups(probe)[name]
    try:
        merged = OmegaConf.merge(setup, cfg.self_training.labeling_decode or {})
    except Exception as error:
        raise PseudoLabelError(f"self_training.labeling_decode: {error}") from error
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def labeling_rescore(cfg: DictConfig, decode: dict[str, Any]) -> dict[str, Any] | None:
    """The n-best rescoring of `self_training.rescore_decoding` (a fairseqlm entry of `decodings`), or None."""
    st = cfg.self_training
    name = st.rescore_decoding
    if not name:
        return None
    named = dict(cfg.get("decodings") or {})
    if name not in named:
        raise PseudoLabelError(f"self_training.rescore_decoding={name!r} is not one of decodings "
                               f"({', '.join(sorted(named)) or 'none'})")
    entry = decoding_setups(OmegaConf.merge(cfg, {"paper": {"decoding": [name]}}))[name]
    if entry.type != "fairseqlm":
        raise PseudoLabelError(f"self_training.rescore_decoding={name!r} is a {entry.type!r} decoding; rescoring "
                               "needs a fairseqlm one (its lm_model is the Transformer LM)")
    if decode["type"] == "viterbi":
        raise PseudoLabelError("self_training.rescore_decoding needs a lexicon beam to label with (its n-best), "
                               f"not {cfg.self_training.labeling_decoding!r} (viterbi)")
    ngram_weight = st.rescore_ngram_weight if st.rescore_ngram_weight is not None else decode["lm_weight"]
    return {"decoding": name, "lm_model": entry.lm_model, "nbest": int(st.rescore_nbest),
            "lm_weight": float(entry.lm_weight), "word_score": float(entry.word_score),
            "ngram_weight": float(ngram_weight)}


def check_rescore_inputs(rescore_setup: dict[str, Any], lexicon_path: str) -> None:
    """The rescoring LM and its dict.txt exist and know the lexicon's words (the LM itself loads in each shard)."""
    lm_path = Path(rescore_setup["lm_model"] or "")
    if not rescore_setup["lm_model"] or not lm_path.is_file():
        raise PseudoLabelError(f"decodings.{rescore_setup['decoding']}.lm_model {rescore_setup['lm_model']} "
                               "does not exist (the Transformer LM that rescores the pseudo-labels)")
    lm_dictionary = lm_path.parent / "dict.txt"
    if not lm_dictionary.is_file():
        raise PseudoLabelError(f"{lm_path}: the LM dictionary {lm_dictionary} does not exist (fairseq reads dict.txt "
                               "beside the LM)")
    vocabulary = {line.split(" ")[0].upper() for line in lm_dictionary.read_text(encoding="utf-8").splitlines() if line}
    words = list(read_lexicon(lexicon_path))
    check_lm_coverage(words, [word.upper() in vocabulary for word in words], lexicon_path, lm_path)


def check_audio(manifest: Manifest) -> None:
    """Every row's audio exists and no row repeats: else an error naming the manifest line."""
    missing, seen = [], {}
    for row, entry in enumerate(manifest.entries):
        if entry.rel_path in seen:
            raise PseudoLabelError(f"{manifest.path}:{row + 2}: {entry.rel_path} is listed twice "
                                   f"(also line {seen[entry.rel_path] + 2})")
        seen[entry.rel_path] = row
        if not os.path.isfile(manifest.audio_path(row)):
            missing.append(row)
    if missing:
        first = missing[0]
        raise PseudoLabelError(f"{manifest.path}:{first + 2}: audio {manifest.audio_path(first)} does not exist "
                               f"({len(missing)} of {len(manifest)} rows point at missing files)")


def check_decoder_inputs(decode: dict[str, Any], dictionary: Dictionary) -> None:
    """Lexicon and LM exist and fit the dictionary, without loading a multi-GB n-gram (that is each shard's job)."""
    kind = decode["type"]
    if kind == "viterbi":
        return
    for key in ("lexicon", "lm_model"):
        if not decode.get(key):
            raise PseudoLabelError(f"{kind} labelling needs decode.{key}")
        if not Path(decode[key]).is_file():
            raise PseudoLabelError(f"{key} {decode[key]} does not exist")
    lexicon = read_lexicon(decode["lexicon"])
    spelling_ids(lexicon, dictionary, decode["lexicon"])  # a spelling unit the model cannot emit is an error
    words = list(lexicon)
    if kind == "kenlm":
        vocabulary = kenlm_vocabulary(decode["lm_model"])
        check_lm_coverage(words, [word in vocabulary for word in words], decode["lexicon"], decode["lm_model"])
    else:
        build_decoder(OmegaConf.create(decode), dictionary)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prepare_labeling(cfg: DictConfig, run_dir: Path) -> LabelingSetup:
    """Check the inputs of stage `pseudo_label` and return the setup every shard runs with.

    Raises PseudoLabelError (or the lexicon / checkpoint error) naming the file before any audio is decoded.
    """
    st = cfg.self_training
    if not st.unlabeled_data:
        raise PseudoLabelError("stage pseudo_label needs self_training.unlabeled_data (a manifest .tsv)")
    manifest_path = Path(st.unlabeled_data)
    if not manifest_path.is_file():
        raise PseudoLabelError(f"self_training.unlabeled_data={manifest_path} does not exist")
    manifest = read_manifest(manifest_path)
    sizes = np.array([entry.num_samples for entry in manifest.entries], dtype=np.int64)
    if not manifest.entries:
        raise PseudoLabelError(f"{manifest_path}: the unlabeled manifest has no rows")
    check_audio(manifest)

    checkpoint = labeling_checkpoint(cfg)
    if not checkpoint.is_file():
        raise PseudoLabelError(f"self_training.labeling_checkpoint={checkpoint} does not exist")
    loaded = load_checkpoint(checkpoint)
    if loaded.kind != "wav2vec_ctc":
        raise PseudoLabelError(f"{checkpoint} holds a {loaded.kind!r} model without a CTC head; labelling needs a "
                               "fine-tuned CTC model (self_training.labeling_checkpoint)")
    labels = cfg.task.labels or "ltr"
    dictionary = load_target_dictionary(cfg.task.data, labels, loaded.dictionary, model_vocab_size(loaded.model))
    normalize = bool(loaded.model_cfg.normalize if loaded.model_cfg.normalize is not None
                     else (loaded.task_cfg or {}).get("normalize", cfg.task.normalize))
    decode = labeling_decode(cfg)
    check_decoder_inputs(decode, dictionary)
    rescore_setup = labeling_rescore(cfg, decode)
    if rescore_setup is not None:
        check_rescore_inputs(rescore_setup, decode["lexicon"])
    st_setup = {
        "format": SETUP_FORMAT, "manifest": file_sha256(manifest_path), "checkpoint": file_sha256(checkpoint),
        "dictionary": list(dictionary.symbols), "decode": decode, "normalize": normalize,
        "post_process": cfg.common_eval.post_process,
        **({"rescore": {**rescore_setup, "lm_sha256": file_sha256(rescore_setup["lm_model"])}} if rescore_setup else {}),
    }
    return LabelingSetup(
        manifest=str(manifest_path), rows=len(manifest), output_dir=str(output_dir(cfg, run_dir)),
        checkpoint=str(checkpoint), dictionary=tuple(dictionary.symbols), decode=decode, normalize=normalize,
        sample_rate=int(cfg.task.sample_rate),
        max_tokens=emission_batch_limit(sizes, int(cfg.dataset.max_tokens or 4_000_000)),
        post_process=str(cfg.common_eval.post_process), cpu=bool(cfg.common.cpu), rescore=rescore_setup,
        fingerprint=_fingerprint(st_setup),
    )


# ----------------------------------------------------------------------------------------------
# One shard


def shard_dir(setup: LabelingSetup) -> Path:
    return Path(setup.output_dir) / "shards"


def shard_files(setup: LabelingSetup, shard: Shard) -> dict[str, Path]:
    """The files a finished shard has; `done` is written last."""
    base = shard_dir(setup) / shard.name
    return {kind: base.with_name(f"{shard.name}.{kind}")
            for kind in ("input.tsv", "tsv", "ltr", "wrd", "scores.tsv", "done.json")}


def shard_is_done(setup: LabelingSetup, shard: Shard) -> bool:
    """True when the shard finished with this very setup (a marker from another setup does not count)."""
    marker = shard_files(setup, shard)["done.json"]
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return record.get("fingerprint") == setup.fingerprint and record.get("rows") == shard.rows_digest


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, fsync and rename: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def label_text(words: str) -> str:
    """fairseq letter labels of a word string ('' for no words)."""
    return words_to_letters(words) if words else ""


def _device(setup: LabelingSetup) -> str:
    return "cuda" if torch.cuda.is_available() and not setup.cpu else "cpu"


def label_shard(setup: LabelingSetup, shard: Shard, progress: bool = True) -> dict[str, Any]:
    """Label the shard's rows: emissions (cached), decoding, files written atomically, marker last.

    A shard that finished with the same setup is not redone. Returns the shard's counts.
    """
    files = shard_files(setup, shard)
    if shard_is_done(setup, shard):
        return json.loads(files["done.json"].read_text())
    manifest = read_manifest(setup.manifest)
    entries = [manifest.entries[row] for row in shard.rows]
    write_atomic(files["input.tsv"], format_manifest(manifest.root, entries))

    dictionary = Dictionary.from_symbols(setup.dictionary[4:]) if _has_specials(setup.dictionary) else None
    if dictionary is None or list(dictionary.symbols) != list(setup.dictionary):
        raise PseudoLabelError(f"{setup.checkpoint}: dictionary {setup.dictionary[:6]}... does not start with "
                               "fairseq's <s> <pad> </s> <unk>")
    device = _device(setup)
    dataset = FileAudioDataset(files["input.tsv"], sample_rate=setup.sample_rate, pad=True, normalize=setup.normalize)
    cache_path = Path(setup.output_dir) / "emissions" / f"{shard.name}.pt"
    key = emissions_cache_key(setup.checkpoint, files["input.tsv"], setup.normalize)
    emissions = load_cached_emissions(cache_path, key)
    if emissions is None:
        loaded = load_checkpoint(setup.checkpoint)
        emissions = compute_emissions(loaded.model, dataset, setup.max_tokens, device, progress=progress)
        save_cached_emissions(cache_path, key, emissions)
        del loaded
    if setup.rescore is None:
        decoder = build_decoder(OmegaConf.create(setup.decode), dictionary, device)
        split = EvalSplit(shard.name, dataset, [[] for _ in range(len(dataset))], files["input.tsv"])
        results = decode_split(decoder, emissions, split, dictionary, setup.post_process, progress=progress)
        words, totals = [result.hyp_words for result in results], [result.score for result in results]
    else:
        words, totals = decode_and_rescore(setup, emissions, dictionary, device, progress)

    return write_shard_outputs(setup, shard, manifest.root, entries, words, [len(emission) for emission in emissions],
                               totals)


def write_shard_outputs(setup: LabelingSetup, shard: Shard, root: str | Path, entries: Sequence[ManifestEntry],
                        words: Sequence[str], frames: Sequence[int], totals: Sequence[float]) -> dict[str, Any]:
    """The shard's `.tsv` / `.wrd` / `.ltr` / `.scores.tsv`, each atomically, then its marker; returns the marker."""
    files = shard_files(setup, shard)
    scores = [f"{row}\t{entry.rel_path}\t{count}\t{total:.6f}\t{total / max(count, 1):.6f}"
              for row, entry, count, total in zip(shard.rows, entries, frames, totals)]
    write_atomic(files["tsv"], format_manifest(root, entries))
    write_atomic(files["wrd"], "".join(line + "\n" for line in words))
    write_atomic(files["ltr"], "".join(label_text(line) + "\n" for line in words))
    write_atomic(files["scores.tsv"], SCORES_HEADER + "\n" + "".join(line + "\n" for line in scores))
    record = {"fingerprint": setup.fingerprint, "rows": shard.rows_digest, "utterances": len(words),
              "score_sum": float(sum(totals)), "host": os.uname().nodename,
              "slurm_job": os.environ.get("SLURM_JOB_ID"),
              "slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}
    write_atomic(files["done.json"], json.dumps(record, indent=1) + "\n")  # last: marks the shard finished
    return record


def decode_and_rescore(setup: LabelingSetup, emissions: Sequence[torch.Tensor], dictionary: Dictionary, device: str,
                       progress: bool) -> tuple[list[str], list[float]]:
    """Each utterance's beam n-best rescored with the Transformer LM (Xu et al. v1 §2.2): (words, combined score)."""
    options = setup.rescore
    assert options is not None
    # alignments of one transcription crowd the beam's n-best: read 4x as many to find `nbest` distinct ones
    decode = {**setup.decode, "nbest": max(int(setup.decode.get("nbest") or 1), 4 * int(options["nbest"]))}
    decoder = build_decoder(OmegaConf.create(decode), dictionary, device)
    scorer = TransformerSentenceScorer(options["lm_model"], device)
    weights = RescoreWeights(options["ngram_weight"], options["lm_weight"], options["word_score"])
    words, totals = [], []
    for emission in tqdm(emissions, desc="decode + rescore", unit="utt", file=sys.stderr, disable=not progress):
        best, total = rescore(decoder.decode(emission.unsqueeze(0))[0], scorer, weights, int(options["nbest"]))
        words.append(" ".join(best.words or []))
        totals.append(total)
    return words, totals


def _has_specials(symbols: Sequence[str]) -> bool:
    return list(symbols[:4]) == ["<s>", "<pad>", "</s>", "<unk>"]


def run_shards_in_process(setup: LabelingSetup, shards: Sequence[Shard], progress: bool = True) -> dict[int, str]:
    """Label `shards` one after another here; returns {shard index: error} for the ones that failed."""
    failures: dict[int, str] = {}
    for shard in shards:
        try:
            label_shard(setup, shard, progress)
        except Exception as error:  # one bad shard must not lose the others' work
            log.exception("%s failed", shard.name)
            failures[shard.index] = f"{type(error).__name__}: {error}"
    return failures


# ----------------------------------------------------------------------------------------------
# Merge, filters, scoring


@dataclass(slots=True)
class LabeledRow:
    """One pseudo-labelled utterance as the shards wrote it."""

    row: int
    entry: ManifestEntry
    words: str
    letters: str
    frames: int
    score: float


def _lines(handle: TextIO) -> Iterator[str]:
    for line in handle:
        yield line[:-1] if line.endswith("\n") else line


def iter_shard_rows(setup: LabelingSetup, shard: Shard) -> Iterator[LabeledRow]:
    """The shard's rows in its (ascending) row order, read line by line from its four files."""
    files = shard_files(setup, shard)
    mismatch = PseudoLabelError(f"{files['done.json']}: shard files disagree in length; delete the marker to redo it")
    with ExitStack() as stack:
        tsv, wrd, ltr, scores = (_lines(stack.enter_context(files[kind].open(encoding="utf-8")))
                                 for kind in ("tsv", "wrd", "ltr", "scores.tsv"))
        if next(tsv, None) is None or next(scores, None) is None:  # the root / the header
            raise mismatch
        count = 0
        for entry_line, word_line, letter_line, score_line in zip(tsv, wrd, ltr, scores):
            rel_path, num_samples = entry_line.split("\t")[:2]
            row, _, frames, score, _ = score_line.split("\t")
            yield LabeledRow(int(row), ManifestEntry(rel_path, int(num_samples)), word_line, letter_line, int(frames),
                             float(score))
            count += 1
        if count != len(shard.rows) or next(tsv, None) is not None:
            raise mismatch


RUN_FILE_FIELDS = 7


def _write_run(rows: Iterable[LabeledRow], path: Path) -> None:
    """A merged run of several shards as one file (one descriptor instead of four per shard); repr keeps floats exact."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(f"{row.row}\t{row.entry.rel_path}\t{row.entry.num_samples}\t{row.frames}\t{row.score!r}\t"
                         f"{row.words}\t{row.letters}\n")


def _read_run(path: Path) -> Iterator[LabeledRow]:
    with path.open(encoding="utf-8") as handle:
        for line in _lines(handle):
            row, rel_path, num_samples, frames, score, words, letters = line.split("\t", RUN_FILE_FIELDS - 1)
            yield LabeledRow(int(row), ManifestEntry(rel_path, int(num_samples)), words, letters, int(frames),
                             float(score))


def open_file_budget(wanted: int) -> int:
    """Files the merge may hold open: raise the soft RLIMIT_NOFILE towards `wanted` (+ a margin), within the hard one."""
    margin = 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + margin if hard == resource.RLIM_INFINITY else min(hard, wanted + margin)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return max(soft - margin, 8)


def merged_rows(setup: LabelingSetup, shards: Sequence[Shard], work_dir: Path,
                max_open_files: int | None = None) -> Iterator[LabeledRow]:
    """Every shard's rows in manifest order, streamed: a k-way merge holding one row per shard.

    Shards are runs of global emission batches (longest audio first), so their rows interleave in
    manifest order. Each shard keeps four files open; when that exceeds the open-file budget, groups of
    shards are first merged into one run file each (under `work_dir`), then the runs are merged.
    """
    budget = max_open_files if max_open_files is not None else open_file_budget(4 * len(shards))
    if 4 * len(shards) <= budget:
        yield from heapq.merge(*(iter_shard_rows(setup, shard) for shard in shards), key=attrgetter("row"))
        return
    group = max(budget // 4, 1)
    if -(-len(shards) // group) > budget:
        raise PseudoLabelError(f"{len(shards)} shards need {-(-len(shards) // group)} merge runs open at once, more "
                               f"than the {budget} files this process may open; raise `ulimit -n` or use fewer shards")
    runs = []
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        for start in range(0, len(shards), group):
            runs.append(work_dir / f"run-{start // group:05d}.tsv")
            _write_run(merged_rows(setup, shards[start:start + group], work_dir, budget), runs[-1])
        yield from heapq.merge(*(_read_run(run) for run in runs), key=attrgetter("row"))
    finally:
        for run in runs:
            run.unlink(missing_ok=True)


def keep_row(row: LabeledRow, sample_rate: int, min_score_per_frame: float | None,
             length_ratio: Sequence[float] | None, drop_empty: bool) -> bool:
    """The optional filters (all off by default: Xu et al. describe none, v1 §2.2)."""
    if drop_empty and not row.words.strip():
        return False
    if min_score_per_frame is not None and row.score / max(row.frames, 1) < min_score_per_frame:
        return False
    if length_ratio is not None:
        letters_per_second = len(row.words.replace(" ", "")) / max(row.entry.num_samples / sample_rate, 1e-9)
        if not length_ratio[0] <= letters_per_second <= length_ratio[1]:
            return False
    return True


def manifest_root(path: str | Path) -> str:
    """The root line of a manifest as read_manifest normalises it, without reading the rows."""
    with Path(path).open(encoding="utf-8") as handle:
        return str(Path(handle.readline().strip()))


def iter_hidden_references(manifest_path: str | Path, rows: int, post_process: str = "letter") -> Iterator[str | None] | None:
    """Reference words of the unlabeled audio, row by row, where the corpus has them; else None.

    `<manifest stem>.ltr` beside the manifest (what stage evaluate reads), else `<stem>.wrd`, else the
    LibriSpeech-layout `.trans.txt` files beside the audio (the synthetic corpus' pretraining pool has them;
    a row whose transcript is missing yields None).
    """
    manifest_path = Path(manifest_path)
    for suffix in (".ltr", ".wrd"):
        path = manifest_path.with_suffix(suffix)
        if path.is_file():
            with path.open(encoding="utf-8") as handle:
                lines = sum(1 for _ in handle)
            if lines != rows:
                log.warning("%s has %d lines for %d manifest rows: not used as references", path, lines, rows)
                continue
            return _reference_lines(path, suffix, post_process)
    root = Path(manifest_root(manifest_path))
    lookup = TranscriptLookup()
    with manifest_path.open(encoding="utf-8") as handle:
        handle.readline()
        first = handle.readline().split("\t")[0]
    try:
        lookup.words(root / first)
    except TranscriptError:
        return None
    return _transcripts(manifest_path, root, lookup)


def _reference_lines(path: Path, suffix: str, post_process: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in _lines(handle):
            yield units_to_words(line, post_process) if suffix == ".ltr" else " ".join(line.split())


def _transcripts(manifest_path: Path, root: Path, lookup: TranscriptLookup) -> Iterator[str | None]:
    with manifest_path.open(encoding="utf-8") as handle:
        handle.readline()
        for line in handle:
            if not line.strip():
                continue
            try:
                yield " ".join(lookup.words(root / line.split("\t")[0]).split())
            except TranscriptError:
                yield None


def hidden_references(manifest_path: str | Path, rows: int, post_process: str = "letter") -> list[str] | None:
    """All of iter_hidden_references at once (None when any row has no reference)."""
    references = iter_hidden_references(manifest_path, rows, post_process)
    if references is None:
        return None
    listed = list(references)
    return None if any(reference is None for reference in listed) else listed  # type: ignore[return-value]


class WordErrorCounter:
    """Corpus WER accumulated row by row (repro.decode.wer's counts, aligned in chunks): equal to scoring all at once."""

    CHUNK = 4096

    def __init__(self) -> None:
        self.total = ErrorCounts()
        self.rows = 0
        self._references: list[str] = []
        self._hypotheses: list[str] = []

    def add(self, reference: str, hypothesis: str) -> None:
        self._references.append(reference)
        self._hypotheses.append(hypothesis)
        self.rows += 1
        if len(self._references) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        for counts in align_counts(self._references, self._hypotheses):
            self.total = self.total + counts
        self._references, self._hypotheses = [], []

    @property
    def wer(self) -> float:
        self._flush()
        return self.total.rate if self.rows else float("nan")


class _AtomicLines:
    """Output files written as rows come, renamed into place together once all are complete."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.temporaries = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in self.paths]
        self.handles = [temporary.open("w", encoding="utf-8") for temporary in self.temporaries]

    def commit(self) -> None:
        for handle in self.handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for temporary, path in zip(self.temporaries, self.paths):
            os.replace(temporary, path)

    def discard(self) -> None:
        for handle, temporary in zip(self.handles, self.temporaries):
            handle.close()
            temporary.unlink(missing_ok=True)


def merge_shards(setup: LabelingSetup, shards: Sequence[Shard], name: str, min_score_per_frame: float | None = None,
                 length_ratio: Sequence[float] | None = None, drop_empty: bool = False,
                 max_open_files: int | None = None) -> dict[str, Any]:
    """Gather the finished shards, in manifest order, into `<output>/<name>.{tsv,ltr,wrd,scores.tsv}`; return the summary.

    Streams: rows go from the shards' files to the output as they are merged, so memory does not grow
    with the number of utterances (LV-60k has millions). The summary holds the counts, the mean decoder
    score and, when the unlabeled audio has hidden transcripts, the pseudo-label WER over every labelled
    utterance (the number stage evaluate reports for the same model and decoder) and over the kept ones.
    """
    unfinished = [shard.name for shard in shards if not shard_is_done(setup, shard)]
    if unfinished:
        raise PseudoLabelError(f"cannot merge: {len(unfinished)} shard(s) not finished ({', '.join(unfinished[:5])})")
    out = Path(setup.output_dir)
    references = iter_hidden_references(setup.manifest, setup.rows, setup.post_process)
    all_errors, kept_errors = WordErrorCounter(), WordErrorCounter()
    counts = {"utterances": 0, "kept": 0, "empty": 0, "samples": 0, "kept_samples": 0}
    score_sum = score_per_frame_sum = 0.0
    writer = _AtomicLines([out / f"{name}.{suffix}" for suffix in ("tsv", "wrd", "ltr", "scores.tsv")])
    tsv, wrd, ltr, scores = writer.handles
    try:
        tsv.write(manifest_root(setup.manifest) + "\n")
        scores.write(SCORES_HEADER + "\tkept\n")
        for row in merged_rows(setup, shards, out / "merge_runs", max_open_files):
            if row.row != counts["utterances"]:  # the shards cover rows 0..N-1 once each (plan_shards)
                raise PseudoLabelError(f"{out}: the shards' rows are not the manifest's rows in order "
                                       f"(row {row.row} where {counts['utterances']} was due); re-plan the shards")
            flag = keep_row(row, setup.sample_rate, min_score_per_frame, length_ratio, drop_empty)
            per_frame = row.score / max(row.frames, 1)
            if flag:
                tsv.write(f"{row.entry.rel_path}\t{row.entry.num_samples}\n")
                wrd.write(row.words + "\n")
                ltr.write(row.letters + "\n")
                counts["kept"] += 1
                counts["kept_samples"] += row.entry.num_samples
            scores.write(f"{row.row}\t{row.entry.rel_path}\t{row.frames}\t{row.score:.6f}\t{per_frame:.6f}\t{int(flag)}\n")
            counts["utterances"] += 1
            counts["samples"] += row.entry.num_samples
            counts["empty"] += not row.words.strip()
            score_sum += row.score
            score_per_frame_sum += per_frame
            if references is not None:
                reference = next(references, None)
                if reference is None:  # a row without a transcript: no WER for this set
                    references = None
                    continue
                all_errors.add(reference, row.words)
                if flag:
                    kept_errors.add(reference, row.words)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    Dictionary.from_symbols(setup.dictionary[4:]).save(out / "dict.ltr.txt")  # task.data=<output> works alone

    utterances = counts["utterances"]
    summary: dict[str, Any] = {
        "utterances": utterances, "kept": counts["kept"],
        "hours": counts["samples"] / setup.sample_rate / 3600,
        "kept_hours": counts["kept_samples"] / setup.sample_rate / 3600,
        "mean_score": score_sum / max(utterances, 1),
        "mean_score_per_frame": score_per_frame_sum / max(utterances, 1),
        "empty": counts["empty"], "shards": len(shards),
        "decode": setup.decode, "rescore": setup.rescore, "checkpoint": setup.checkpoint,
        "fingerprint": setup.fingerprint,
    }
    if references is not None:
        summary["wer"] = all_errors.wer
        summary["kept_wer"] = kept_errors.wer
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------
# The combined training set


def utterance_key(path: str | Path) -> str:
    """Utterance identity: the file name up to its first dot (LibriSpeech / Libri-light / LibriVox ids are unique)."""
    return Path(path).name.split(".")[0]


def write_combined_split(labeled_dir: Path, labeled_subset: str, pseudo_dir: Path, pseudo_name: str,
                         combined_name: str, include_labeled: bool = True) -> dict[str, int]:
    """`<pseudo_dir>/<combined_name>.{tsv,ltr,wrd}`: the labeled split, then the pseudo-labels, each utterance once.

    A pseudo-labelled utterance that is also in the labeled split (same utterance id, e.g. LS-960 audio
    labelled while Libri-light's copy is labeled) keeps its human label. The manifest root is the
    deepest directory holding both roots.
    """
    parts: list[tuple[Manifest, list[str], list[str]]] = []
    sources = ([(labeled_dir, labeled_subset)] if include_labeled else []) + [(pseudo_dir, pseudo_name)]
    for directory, split in sources:
        manifest = read_manifest(Path(directory) / f"{split}.tsv")
        labels = []
        for suffix in ("ltr", "wrd"):
            path = Path(directory) / f"{split}.{suffix}"
            lines = path.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            if len(lines) != len(manifest):
                raise PseudoLabelError(f"{path} has {len(lines)} lines but {manifest.path} has {len(manifest)} rows")
            labels.append(lines)
        parts.append((manifest, labels[0], labels[1]))
    root = Path(os.path.commonpath([str(Path(manifest.root).absolute()) for manifest, _, _ in parts]))
    entries, letters, words, seen = [], [], [], set()
    counts = {"labeled": 0, "pseudo": 0, "duplicates_dropped": 0}
    for part_index, (manifest, ltr, wrd) in enumerate(parts):
        kind = "pseudo" if part_index == len(parts) - 1 else "labeled"
        for row, entry in enumerate(manifest.entries):
            key = utterance_key(entry.rel_path)
            if key in seen:
                if kind == "labeled":
                    raise PseudoLabelError(f"{manifest.path}:{row + 2}: utterance {key} appears twice in the labeled split")
                counts["duplicates_dropped"] += 1
                continue
            seen.add(key)
            audio = Path(manifest.root).absolute() / entry.rel_path
            entries.append(ManifestEntry(os.path.relpath(audio, root), entry.num_samples))
            letters.append(ltr[row])
            words.append(wrd[row])
            counts[kind] += 1
    write_atomic(pseudo_dir / f"{combined_name}.tsv", format_manifest(root, entries))
    write_atomic(pseudo_dir / f"{combined_name}.ltr", "".join(line + "\n" for line in letters))
    write_atomic(pseudo_dir / f"{combined_name}.wrd", "".join(line + "\n" for line in words))
    return counts


def describe_setup(setup: LabelingSetup) -> dict[str, Any]:
    """The setup as plain data (for status lines and the tracker's params)."""
    values = dataclasses.asdict(setup)
    values.pop("dictionary")
    return values


def say(message: str) -> None:
    print(f"repro pseudo_label: {message}", file=sys.stderr, flush=True)


def retraining_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config stage `finetune` trains a self-training row with: the combined split as training data.

    Xu et al.'s "ctc ft" model (§2.3) fine-tunes the same pretrained checkpoint (`model.w2v_path`) on
    labeled + pseudo-labeled data; validation and the dictionary stay those of `task.data`. The split
    is given as a path (`<pseudo_labels>/<combined_subset>`), which the data loaders join onto task.data.
    """
    combined = output_dir(cfg, run_dir) / cfg.self_training.combined_subset
    if not combined.with_suffix(".tsv").is_file():
        raise PseudoLabelError(f"{combined}.tsv does not exist: self-training rows fine-tune on the pseudo-labels, "
                               "run stage pseudo_label first (the row's `stages` do)")
    return OmegaConf.merge(cfg, {"dataset": {"train_subset": str(combined.absolute())}})


# ----------------------------------------------------------------------------------------------
# Did self-training help?


def labeler_results_path(checkpoint: str | Path) -> Path:
    """`<run>/eval/results.json` of the run that wrote `<run>/checkpoints/<file>` (our layout)."""
    return Path(checkpoint).absolute().parent.parent / "eval" / "results.json"


def compare_with_labeler(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """WER of this run's evaluation beside its labelling model's, per split and decoding (`self_training.json`)."""
    ours_path = Path(run_dir) / "eval" / "results.json"
    theirs_path = labeler_results_path(labeling_checkpoint(cfg))
    for path, what in ((ours_path, "this run"), (theirs_path, "the labelling model's run")):
        if not path.is_file():
            raise PseudoLabelError(f"{path} does not exist: stage evaluate has not run for {what}")
    ours, theirs = (json.loads(path.read_text())["results"] for path in (ours_path, theirs_path))
    rows = []
    for split in sorted(set(ours) & set(theirs)):
        for decoding in sorted(set(ours[split]) & set(theirs[split])):
            before, after = float(theirs[split][decoding]["wer"]), float(ours[split][decoding]["wer"])
            rows.append({"split": split, "decoding": decoding, "labeler_wer": before, "self_trained_wer": after,
                         "better": after < before})
    summary = {"labeler": str(labeling_checkpoint(cfg)), "rows": rows,
               "better_in": sum(row["better"] for row in rows), "compared": len(rows)}
    write_atomic(Path(run_dir) / "self_training.json", json.dumps(summary, indent=1) + "\n")
    return summary


def run_compare(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `st_compare`: did the self-trained model beat the model that labelled its data?"""
    summary = compare_with_labeler(cfg, run_dir)
    print(f"{'split':12s} {'decoding':12s} {'labeler WER':>12s} {'self-trained':>13s}")
    for row in summary["rows"]:
        print(f"{row['split']:12s} {row['decoding']:12s} {row['labeler_wer']:12.2f} {row['self_trained_wer']:13.2f}"
              f"  {'better' if row['better'] else 'not better'}")
    print(f"self-training beat its labelling model in {summary['better_in']} of {summary['compared']} "
          "(split, decoding) pairs")
    if tracker is not None:
        tracker.log_metrics({"better_in": summary["better_in"], "compared": summary["compared"]}, step=0,
                            split="self_training")
    return summary
