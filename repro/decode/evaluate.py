"""`stage=evaluate`: a fine-tuned CTC model -> WER/UER per decoding setup and split.

Emissions (raw CTC logits, fairseq_spec.md §7.2) are computed once per (checkpoint, split) and
cached on disk keyed by the checkpoint's and the manifest's content hashes, so a decoding sweep
(lm_weight x word_score) only re-runs the decoder. The shared pieces (`load_split`,
`compute_emissions`, `decode_split`) also serve `python -m repro.tools infer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from repro.config import DecodeConfig
from repro.data.audio_headers import check_split_audio
from repro.data.batching import batch_by_size, ordered_indices
from repro.data.dataset import FileAudioDataset, load_labels
from repro.data.dictionary import Dictionary
from repro.data.units import LabeledUnitDataset, unit_labels_path
from repro.decode.lexicon import build_decoder
from repro.decode.viterbi import lengths_from_padding_mask
from repro.decode.wer import CorpusScore, UtteranceResult, score_results, units_to_words, write_results

log = logging.getLogger(__name__)

CACHE_FORMAT = "repro-emissions-v1"
PHONE_LABELS = "phn"
"""Label extension of phone targets (TIMIT, `python -m repro.tools prepare-timit`): scored as PER."""


class EvaluationError(RuntimeError):
    """Evaluation cannot run as configured (the message names the file or key)."""


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class SplitData:
    """A manifest split with its reference labels, ready for inference."""

    name: str
    dataset: FileAudioDataset
    references: list[list[int]]
    """Reference unit ids per dataset item (empty lists when the split has no labels)."""
    manifest_path: Path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_split(data_dir: str | Path, split: str, dictionary: Dictionary, labels: str | None = "ltr",
               normalize: bool = False, sample_rate: int = 16_000) -> SplitData:
    """`<data>/<split>.tsv` (+ `<split>.<labels>`) as a padded, unshuffled dataset (fairseq infer.py)."""
    data_dir = Path(data_dir)
    manifest = data_dir / f"{split}.tsv"
    if not manifest.exists():
        raise EvaluationError(f"manifest {manifest} does not exist (split {split!r} of {data_dir})")
    dataset = FileAudioDataset(manifest, sample_rate=sample_rate, pad=True, normalize=normalize)
    references: list[list[int]] = [[] for _ in range(len(dataset))]
    if labels:
        label_path = data_dir / f"{split}.{labels}"
        if not label_path.exists():
            raise EvaluationError(f"label file {label_path} does not exist (needed to score split {split!r})")
        references = load_labels(label_path, dictionary, dataset.skipped_indices, dataset.manifest_rows, manifest)
    return SplitData(split, dataset, references, manifest)


def load_unit_split(data_dir: str | Path, split: str, units: Dictionary, dictionary: Dictionary,
                    labels: str | None, source_ext: str) -> SplitData:
    """`<data>/<split>.<source_ext>` units (RoBERTa CTC models) with their `<split>.<labels>` references."""
    source = Path(data_dir) / f"{split}.{source_ext}"
    try:
        label_path = unit_labels_path(data_dir, split, labels or "ltr")
    except FileNotFoundError as error:
        raise EvaluationError(f"{error} (needed to score split {split!r})") from None
    line_count = sum(1 for _ in source.open(encoding="utf-8"))
    references = load_labels(label_path, dictionary, set(), line_count, source)
    dataset = LabeledUnitDataset(source, units, references, dictionary.pad)
    return SplitData(split, dataset, dataset.labels, source)  # type: ignore[arg-type]


def load_target_dictionary(data_dir: str | Path, labels: str | None, checkpoint_dictionary: Dictionary | None,
                           vocab_size: int | None = None) -> Dictionary:
    """`<data>/dict.<labels>.txt` as fairseq's task reads it, else the dictionary stored in the checkpoint."""
    path = Path(data_dir) / f"dict.{labels or 'ltr'}.txt"
    dictionary = Dictionary.load(path) if path.exists() else checkpoint_dictionary
    if dictionary is None:
        raise EvaluationError(f"no target dictionary: {path} does not exist and the checkpoint stores none")
    if vocab_size is not None and len(dictionary) != vocab_size:
        source = path if path.exists() else "the checkpoint's dictionary"
        raise EvaluationError(f"{source} has {len(dictionary)} symbols but the model outputs {vocab_size}")
    return dictionary


# ----------------------------------------------------------------------------------------------
# Emissions


def model_vocab_size(model: torch.nn.Module) -> int | None:
    proj = getattr(getattr(model, "w2v_encoder", None), "proj", None) or getattr(model, "proj", None)
    return int(proj.out_features) if proj is not None else None


@torch.no_grad()
def compute_emissions(model: torch.nn.Module, dataset: FileAudioDataset, max_tokens: int | None = 4_000_000,
                      device: str | torch.device = "cpu", progress: bool = True) -> list[torch.Tensor]:
    """Raw CTC logits (T_i, V) float32 on CPU for every dataset item, in item order.

    Batches follow fairseq: items sorted longest first, grouped under max_tokens samples.
    """
    model.eval().to(device)
    sizes = dataset.num_tokens_vec()
    if max_tokens is not None and len(sizes) and int(sizes.max()) > max_tokens:
        max_tokens = int(sizes.max())  # infer.py runs with unlimited max_positions: never drop a row
    batches = batch_by_size(sizes, max_tokens, required_batch_size_multiple=1, indices=ordered_indices(sizes))
    emissions: list[torch.Tensor | None] = [None] * len(dataset)
    for batch_indices in tqdm(batches, desc=f"emissions {dataset.manifest_path.stem}", unit="batch",
                              file=sys.stderr, disable=not progress):
        batch = dataset.collater([dataset[int(i)] for i in batch_indices])
        net_input = {key: value.to(device) for key, value in batch["net_input"].items() if value is not None}
        if "padding_mask" in net_input and not net_input["padding_mask"].any():
            del net_input["padding_mask"]  # no padding: the unmasked fast path
        logits, frame_padding = model(**net_input)  # (B, T, V), (B, T)
        lengths = lengths_from_padding_mask(frame_padding, logits.shape[0], logits.shape[1])
        logits = logits.float().cpu()
        for row, item in enumerate(batch["id"].tolist()):
            emissions[item] = logits[row, : int(lengths[row])].clone()
    return emissions  # type: ignore[return-value]


def emissions_cache_key(checkpoint_path: str | Path, manifest_path: str | Path, normalize: bool) -> str:
    parts = [file_sha256(checkpoint_path), file_sha256(manifest_path), f"normalize={bool(normalize)}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def load_cached_emissions(path: Path, key: str) -> list[torch.Tensor] | None:
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated cache is recomputed, not fatal
        log.warning("ignoring unreadable emission cache %s: %s", path, error)
        return None
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT or cached.get("key") != key:
        return None
    return list(cached["emissions"])


def save_cached_emissions(path: Path, key: str, emissions: Sequence[torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"format": CACHE_FORMAT, "key": key, "emissions": list(emissions)}, temporary)
    temporary.replace(path)


# ----------------------------------------------------------------------------------------------
# Decoding and scoring


def decode_split(decoder: Any, emissions: Sequence[torch.Tensor], split: SplitData, dictionary: Dictionary,
                 post_process: str = "letter", progress: bool = True) -> list[UtteranceResult]:
    """Best hypothesis per utterance as UtteranceResult (words from the lexicon decoder when it gives them)."""
    results = []
    for item, emission in enumerate(tqdm(emissions, desc=f"decode {split.name}", unit="utt", file=sys.stderr,
                                         disable=not progress)):
        best = decoder.decode(emission.unsqueeze(0))[0][0]
        hyp_units = dictionary.string(best.tokens)
        hyp_words = " ".join(best.words) if best.words is not None else units_to_words(hyp_units, post_process)
        ref_units = dictionary.string(split.references[item])
        results.append(
            UtteranceResult(
                id=item, ref_units=ref_units, hyp_units=hyp_units, ref_words=units_to_words(ref_units, post_process),
                hyp_words=hyp_words, audio=split.dataset.rel_paths[item], score=best.score,
            )
        )
    return results


def decoding_setups(cfg: DictConfig) -> dict[str, DecodeConfig]:
    """Name -> DecodeConfig: `decodings` entries (overrides of `decode`), restricted to `paper.decoding`
    when that lists names; `decode` alone when there are no named setups."""
    base = cfg.decode
    named = dict(cfg.get("decodings") or {})
    wanted = list(cfg.paper.decoding) if cfg.get("paper") is not None and cfg.paper.decoding else list(named)
    if not named:
        return {base.name or base.type: base}
    setups: dict[str, DecodeConfig] = {}
    for name in wanted:
        if name not in named:
            if name == "viterbi":
                setups[name] = OmegaConf.merge(base, {"type": "viterbi", "name": "viterbi"})
                continue
            raise EvaluationError(f"paper.decoding names {name!r} but decodings has only {sorted(named)}")
        try:
            setups[name] = OmegaConf.merge(base, named[name] or {}, {"name": name})
        except Exception as error:
            raise EvaluationError(f"decodings.{name}: {error}") from error
    return setups


def _metrics_text(metrics: dict[str, float]) -> str:
    """'WER 12.30 UER 4.10' (+ ' PER 4.10' for phone labels)."""
    return " ".join(f"{name.upper()} {value:.2f}" for name, value in metrics.items())


def _json_safe(value: Any) -> Any:
    """JSON has no infinities: inf / nan become strings ('-inf' for fairseq's default unk_weight)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_evaluate(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate every decoding setup on every configured split; returns {split: {setup: {wer, uer}}}."""
    from repro.checkpoints.fairseq import load  # checkpoints sit above decode in the layer order

    run_dir = Path(run_dir)
    checkpoint_path = Path(cfg.common_eval.path) if cfg.common_eval.path else run_dir / "checkpoints" / "checkpoint_best.pt"
    if not checkpoint_path.exists():
        raise EvaluationError(f"checkpoint {checkpoint_path} does not exist (set common_eval.path / checkpoint=PATH)")
    loaded = load(checkpoint_path)
    if loaded.kind not in ("wav2vec_ctc", "roberta_ctc"):
        raise EvaluationError(f"{checkpoint_path} holds a {loaded.kind!r} model; evaluation needs a fine-tuned CTC model")
    # RoBERTa CTC models read units (`<split>.<task.source_ext>`, their pretraining dictionary), not audio
    unit_symbols = loaded.task_cfg.get("unit_symbols") if loaded.kind == "roberta_ctc" else None
    units = Dictionary.from_symbols(unit_symbols[4:]) if unit_symbols else None
    device = "cuda" if torch.cuda.is_available() and not cfg.common.cpu else "cpu"
    labels = cfg.task.labels or "ltr"
    dictionary = load_target_dictionary(cfg.task.data, labels, loaded.dictionary, model_vocab_size(loaded.model))
    normalize = bool(loaded.model_cfg.normalize if loaded.model_cfg.normalize is not None
                     else (loaded.task_cfg or {}).get("normalize", cfg.task.normalize))
    setups = decoding_setups(cfg)
    decoders = {name: build_decoder(setup, dictionary, device) for name, setup in setups.items()}
    eval_dir = run_dir / "eval"
    cache_dir = Path(cfg.common_eval.emissions_cache or eval_dir / "emissions")
    post_process = cfg.common_eval.post_process
    summary: dict[str, dict[str, dict[str, float]]] = {}
    splits: list[SplitData] = []
    for split_name in cfg.paper.eval_splits:
        extension = "tsv" if units is None else cfg.task.source_ext
        if not (Path(cfg.task.data) / f"{split_name}.{extension}").exists():
            log.warning("split %s has no %s file in %s; skipped", split_name, extension, cfg.task.data)
            continue
        if units is None:
            splits.append(load_split(cfg.task.data, split_name, dictionary, labels, normalize, cfg.task.sample_rate))
        else:
            splits.append(load_unit_split(cfg.task.data, split_name, units, dictionary, labels, cfg.task.source_ext))
    for split in splits:  # every bad audio file named by manifest line before any emission is computed
        if isinstance(split.dataset, FileAudioDataset):
            check_split_audio(split.dataset)
    for split in splits:
        split_name = split.name
        key = emissions_cache_key(checkpoint_path, split.manifest_path, normalize)
        cache_path = cache_dir / f"{split_name}.pt"
        emissions = load_cached_emissions(cache_path, key)
        if emissions is None:
            emissions = compute_emissions(loaded.model, split.dataset, cfg.dataset.max_tokens or 4_000_000, device)
            save_cached_emissions(cache_path, key, emissions)
        else:
            log.info("emissions of %s from cache %s", split_name, cache_path)
        for name, decoder in decoders.items():
            results = decode_split(decoder, emissions, split, dictionary, post_process)
            score: CorpusScore = score_results(results)
            write_results(eval_dir / split_name / name, checkpoint_path, split_name, results, score)
            metrics = {"wer": score.wer, "uer": score.uer}
            if labels == PHONE_LABELS:  # TIMIT: the units are phones, their error rate is the PER (Table 3)
                metrics["per"] = score.uer
            summary.setdefault(split_name, {})[name] = metrics
            # once, through logging: the app's handlers put it on the terminal and in the run's log file
            # (a print beside it showed every line twice)
            log.info("%s/%s: %s", split_name, name, _metrics_text(metrics))
            if tracker is not None:
                tracker.log_metrics(metrics, step=0, split=f"{split_name}/{name}")
    eval_dir.mkdir(parents=True, exist_ok=True)
    results_json = {
        "checkpoint": str(checkpoint_path),
        "decodings": {name: OmegaConf.to_container(OmegaConf.structured(setup), resolve=True)
                      for name, setup in setups.items()},
        "results": summary,
    }
    (eval_dir / "results.json").write_text(json.dumps(_json_safe(results_json), indent=2) + "\n")
    if tracker is not None:
        tracker.log_artifact(eval_dir / "results.json")
    return summary

