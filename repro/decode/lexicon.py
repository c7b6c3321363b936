"""Lexicon-constrained CTC beam search with an n-gram (KenLM) or Transformer word LM.

This is fairseq's `W2lKenLMDecoder` / `W2lFairseqLMDecoder` (fairseq_spec.md §7.2) on
flashlight-text's `LexiconDecoder`:

* the blank is `<s>` (index 0), the silence/word boundary is `|` (else `</s>`);
* lexicon lines are `WORD<TAB>W O R D |` (several lines per word = several spellings); every
  spelling goes into a trie with score = the word's LM score from the start state, then the trie
  is smeared with MAX so partial spellings carry their best completion;
* emissions are the model's raw logits for wav2vec_ctc (Trap 12: fairseq feeds `get_logits`, not
  log-probabilities), float32, one (T, V) matrix per utterance;
* `LexiconDecoderOptions(beam, beam_size_token, beam_threshold, lm_weight, word_score,
  unk_score=unk_weight, sil_score=sil_weight, log_add=False, CTC)`.

The Transformer LM is wrapped as a flashlight `LM` whose state is the word prefix (starting with
`</s>`, fairseq's sentence start); `score` is the LM log-probability of the next word, `<unk>`
scores -inf, `finish` scores `</s>`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flashlight.lib.text.decoder import (
    LM,
    CriterionType,
    LexiconDecoder,
    LexiconDecoderOptions,
    LexiconFreeDecoder,
    LexiconFreeDecoderOptions,
    LMState,
    SmearingMode,
    Trie,
    ZeroLM,
)
from flashlight.lib.text.dictionary import Dictionary as WordDictionary

from repro.data.dictionary import Dictionary
from repro.decode.viterbi import Hypothesis, ViterbiDecoder, frame_lengths
from repro.models.transformer_lm import TransformerLanguageModel, build_from_fairseq

log = logging.getLogger(__name__)

UNK_WORD = "<unk>"
# More than this fraction of lexicon words unknown to the LM means the two do not belong together
# (typically a lower-case LM with an upper-case lexicon); fewer are ordinary OOVs, scored as <unk>.
MAX_LEXICON_OOV_FRACTION = 0.5


class LexiconError(ValueError):
    """A lexicon that cannot be used with this dictionary or LM (the message names file, line, word)."""


# ----------------------------------------------------------------------------------------------
# Lexicon


def read_lexicon(path: str | Path) -> OrderedDict[str, list[list[str]]]:
    """`WORD<TAB>s p e l l |` lines -> word -> spellings, in file order (flashlight's load_words)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise LexiconError(f"{path}: cannot read lexicon: {error}") from error
    lexicon: OrderedDict[str, list[list[str]]] = OrderedDict()
    for line_number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise LexiconError(f"{path}:{line_number}: expected 'WORD<TAB>t o k e n s', got {line!r}")
        lexicon.setdefault(fields[0], []).append(fields[1:])
    if not lexicon:
        raise LexiconError(f"{path}: the lexicon is empty")
    return lexicon


def spelling_ids(lexicon: Mapping[str, list[list[str]]], dictionary: Dictionary, lexicon_path: str | Path) -> dict[str, list[list[int]]]:
    """Token ids of every spelling; a token missing from the model's dictionary is an error."""
    ids: dict[str, list[list[int]]] = {}
    for word, spellings in lexicon.items():
        ids[word] = []
        for spelling in spellings:
            missing = [token for token in spelling if token not in dictionary]
            if missing:
                raise LexiconError(
                    f"{lexicon_path}: word {word!r} is spelled with {missing[0]!r} ({' '.join(spelling)}), "
                    f"which is not in the model's dictionary of {len(dictionary)} symbols"
                )
            ids[word].append([dictionary.index(token) for token in spelling])
    return ids


def check_lm_coverage(words: Sequence[str], known: Sequence[bool], lexicon_path: str | Path, lm_path: str | Path) -> None:
    """Raise when the LM does not know most lexicon words; log the ordinary OOVs."""
    unknown = [word for word, ok in zip(words, known) if not ok]
    if not unknown:
        return
    examples = ", ".join(repr(w) for w in unknown[:5])
    if len(unknown) > MAX_LEXICON_OOV_FRACTION * len(words):
        hint = ""
        if all(w.upper() == w for w in unknown[:5]):
            hint = " (is the LM vocabulary lower-case? the lexicon is upper-case)"
        raise LexiconError(
            f"lexicon {lexicon_path} and LM {lm_path} do not match: {len(unknown)} of {len(words)} lexicon "
            f"words are not in the LM vocabulary, e.g. {examples}{hint}"
        )
    log.warning("%d of %d lexicon words are not in the LM %s (scored as <unk>), e.g. %s",
                len(unknown), len(words), lm_path, examples)


def kenlm_vocabulary(lm_path: str | Path) -> set[str] | _BinaryVocabulary:
    """Words of a KenLM model without loading it twice: the 1-gram section of an ARPA file (at its
    top), or a lazily memory-mapped binary model (only the vocabulary pages are touched)."""
    lm_path = Path(lm_path)
    with lm_path.open("rb") as handle:
        is_arpa = handle.read(64).lstrip().startswith(b"\\data\\")
    if not is_arpa:
        import kenlm

        config = kenlm.Config()
        config.load_method = kenlm.LoadMethod.LAZY
        return _BinaryVocabulary(kenlm.Model(str(lm_path), config))
    words: set[str] = set()
    with lm_path.open(encoding="utf-8", errors="replace") as handle:
        in_unigrams = False
        for line in handle:
            if line.startswith("\\1-grams:"):
                in_unigrams = True
            elif in_unigrams and line.startswith("\\"):
                break
            elif in_unigrams and line.strip():
                fields = line.split("\t")
                if len(fields) >= 2:
                    words.add(fields[1].strip())
    return words


class _BinaryVocabulary:
    def __init__(self, model) -> None:
        self.model = model

    def __contains__(self, word: str) -> bool:
        return word in self.model


# ----------------------------------------------------------------------------------------------
# Transformer word LM as a flashlight LM


def _safe_checkpoint(path: Path) -> tuple[Any, dict[str, Any]]:
    """(raw checkpoint dict, model args as a plain dict) through repro.checkpoints.fairseq's
    restricted unpickler (argparse Namespaces and omegaconf configs of every fairseq era)."""
    from repro.checkpoints.fairseq import safe_load, to_plain

    checkpoint = safe_load(path)
    if "model" not in checkpoint:
        raise LexiconError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    cfg = to_plain(checkpoint.get("cfg")) or {}
    args = cfg.get("model") if isinstance(cfg, Mapping) and cfg.get("model") else to_plain(checkpoint.get("args"))
    if not isinstance(args, Mapping) or not args:
        raise LexiconError(f"{path}: checkpoint has neither cfg.model nor args")
    return checkpoint, dict(args)


def load_transformer_lm(
    path: str | Path, dictionary_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[TransformerLanguageModel, Dictionary, dict[str, int]]:
    """Load a fairseq `transformer_lm` checkpoint and its `dict.txt` (next to it by default).

    Returns the model, the LM dictionary and an upper-cased word -> index map (fairseq's README:
    upper-case the LM vocabulary to match the upper-case LibriSpeech lexicon).
    """
    path = Path(path)
    checkpoint, args = _safe_checkpoint(path)
    dictionary_path = Path(dictionary_path) if dictionary_path else path.parent / "dict.txt"
    if not dictionary_path.exists():
        raise LexiconError(f"{path}: the LM dictionary {dictionary_path} does not exist (fairseq reads dict.txt beside the LM)")
    lm_dictionary = Dictionary.load(dictionary_path)
    try:
        model = build_from_fairseq(args, checkpoint["model"], len(lm_dictionary), padding_idx=lm_dictionary.pad)
    except ValueError as error:
        raise LexiconError(f"{path}: {error}") from error
    upper: dict[str, int] = {}
    for index, symbol in enumerate(lm_dictionary.symbols):
        upper.setdefault(symbol if index < lm_dictionary.nspecial else symbol.upper(), index)
    return model.to(device), lm_dictionary, upper


@dataclass
class _Prefix:
    words: tuple[int, ...]
    log_probs: torch.Tensor | None = None  # (V,) log P(next word | words), filled on first use


class TransformerWordLM(LM):
    """flashlight LM over a word-level Transformer: state = word prefix, score = next-word log-prob."""

    def __init__(self, model: TransformerLanguageModel, eos: int, unk: int, device: str | torch.device = "cpu",
                 max_cached_distributions: int = 20_000) -> None:
        LM.__init__(self)
        self.model = model.eval()
        self.eos, self.unk = eos, unk
        self.device = torch.device(device)
        self.max_cached = max_cached_distributions
        self._prefixes: dict[LMState, _Prefix] = {}
        self._computed: OrderedDict[LMState, None] = OrderedDict()  # states holding a distribution, oldest first

    @torch.no_grad()
    def next_word_log_probs(self, words: Sequence[int]) -> torch.Tensor:
        tokens = torch.tensor([list(words)], dtype=torch.long, device=self.device)
        return self.model(tokens)[0, -1].float().cpu()

    def start(self, start_with_nothing: bool) -> LMState:
        state = LMState()
        self._prefixes[state] = _Prefix((self.eos,))
        return state

    def score(self, state: LMState, word: int) -> tuple[LMState, float]:
        prefix = self._prefixes[state]
        if prefix.log_probs is None:
            prefix.log_probs = self.next_word_log_probs(prefix.words)
            self._computed[state] = None
            while len(self._computed) > self.max_cached:
                old_state, _ = self._computed.popitem(last=False)
                self._prefixes[old_state].log_probs = None
        value = float(prefix.log_probs[word]) if word != self.unk else float("-inf")
        child = state.child(word)
        if child not in self._prefixes:
            self._prefixes[child] = _Prefix(prefix.words + (word,))
        return child, value

    def finish(self, state: LMState) -> tuple[LMState, float]:
        return self.score(state, self.eos)

    def empty_cache(self) -> None:
        self._prefixes.clear()
        self._computed.clear()


# ----------------------------------------------------------------------------------------------
# Decoders


def _emission_rows(emissions: torch.Tensor | Sequence[torch.Tensor], lengths) -> list[torch.Tensor]:
    """A (B, T, V) batch with lengths, or a list of (T_i, V) -> list of contiguous float32 (T_i, V)."""
    if torch.is_tensor(emissions):
        if emissions.dim() != 3:
            raise ValueError(f"emissions must be (batch, frames, vocab), got {tuple(emissions.shape)}")
        valid = frame_lengths(emissions, lengths)
        return [emissions[b, :n].detach().float().cpu().contiguous() for b, n in enumerate(valid)]
    return [e.detach().float().cpu().contiguous() for e in emissions]


def _hypothesis(result, blank: int, words: list[str] | None) -> Hypothesis:
    # flashlight pads the path with the start and final silence states: frames are [1:-1].
    frames = list(result.tokens)[1:-1]
    tokens, timesteps, previous = [], [], None
    for t, token in enumerate(frames):
        if token != previous and token != blank and token >= 0:
            tokens.append(int(token))
            timesteps.append(t)
        previous = token
    return Hypothesis(tokens=tokens, score=float(result.score), words=words, timesteps=timesteps,
                      am_score=float(result.emittingModelScore), lm_score=float(result.lmScore))


class LexiconBeamDecoder:
    """flashlight LexiconDecoder with a KenLM n-gram, a Transformer word LM, or no LM (ZeroLM)."""

    def __init__(
        self,
        dictionary: Dictionary,
        lexicon_path: str | Path,
        lm_type: str = "kenlm",
        lm_path: str | Path | None = None,
        lm_weight: float = 2.0,
        word_score: float = -1.0,
        sil_weight: float = 0.0,
        unk_weight: float = float("-inf"),
        beam: int = 500,
        beam_threshold: float = 25.0,
        beam_size_token: int | None = 100,
        nbest: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        self.dictionary = dictionary
        self.blank = dictionary.bos
        self.silence = dictionary.index("|") if "|" in dictionary else dictionary.eos
        self.nbest = nbest
        lexicon = read_lexicon(lexicon_path)
        spellings = spelling_ids(lexicon, dictionary, lexicon_path)
        words = list(lexicon)

        if lm_type == "kenlm":
            if lm_path is None:
                raise LexiconError("kenlm decoding needs lm_model (an .arpa or .bin KenLM file)")
            self.word_dict = WordDictionary()
            for word in words:
                self.word_dict.add_entry(word)
            if UNK_WORD not in lexicon:
                self.word_dict.add_entry(UNK_WORD)
            self.word_dict.set_default_index(self.word_dict.get_index(UNK_WORD))
            self.unk_word = self.word_dict.get_index(UNK_WORD)
            self.lm = self._load_kenlm(lm_path)
            check_lm_coverage(words, self._kenlm_known(lm_path, words), lexicon_path, lm_path)
            word_index = {word: self.word_dict.get_index(word) for word in words}
            self._index_to_word = self.word_dict.get_entry
        elif lm_type == "fairseqlm":
            if lm_path is None:
                raise LexiconError("fairseqlm decoding needs lm_model (a fairseq transformer_lm checkpoint)")
            model, lm_dictionary, upper_index = load_transformer_lm(lm_path, device=device)
            check_lm_coverage(words, [w in upper_index for w in words], lexicon_path, lm_path)
            self.unk_word = lm_dictionary.unk
            self.lm = TransformerWordLM(model, lm_dictionary.eos, lm_dictionary.unk, device)
            word_index = {word: upper_index.get(word, lm_dictionary.unk) for word in words}
            symbols = lm_dictionary.symbols
            self._index_to_word = lambda i: symbols[i].upper()
        elif lm_type == "none":
            self.lm = ZeroLM()
            self.unk_word = len(words)
            word_index = {word: i for i, word in enumerate(words)}
            self._index_to_word = words.__getitem__
        else:
            raise ValueError(f"unknown lm_type {lm_type!r}; choose kenlm, fairseqlm or none")

        self.trie = Trie(len(dictionary), self.silence)
        start_state = self.lm.start(False)
        for word in words:
            _, unigram = self.lm.score(start_state, word_index[word])
            for spelling in spellings[word]:
                self.trie.insert(spelling, word_index[word], unigram)
        self.trie.smear(SmearingMode.MAX)
        if isinstance(self.lm, TransformerWordLM):
            self.lm.empty_cache()
        self.options = LexiconDecoderOptions(
            beam_size=beam,
            beam_size_token=int(beam_size_token or len(dictionary)),
            beam_threshold=beam_threshold,
            lm_weight=lm_weight,
            word_score=word_score,
            unk_score=unk_weight,
            sil_score=sil_weight,
            log_add=False,
            criterion_type=CriterionType.CTC,
        )
        self.decoder = LexiconDecoder(self.options, self.trie, self.lm, self.silence, self.blank, self.unk_word, [], False)

    def _load_kenlm(self, lm_path: str | Path):
        from flashlight.lib.text.decoder.kenlm import KenLM

        if not Path(lm_path).exists():
            raise LexiconError(f"KenLM model {lm_path} does not exist")
        try:
            return KenLM(str(lm_path), self.word_dict)
        except Exception as error:  # flashlight raises a bare RuntimeError from C++
            raise LexiconError(f"{lm_path}: cannot load KenLM model: {error}") from error

    @staticmethod
    def _kenlm_known(lm_path: str | Path, words: Sequence[str]) -> list[bool]:
        vocabulary = kenlm_vocabulary(lm_path)
        return [word in vocabulary for word in words]

    def decode(self, emissions, lengths=None) -> list[list[Hypothesis]]:
        """emissions (B, T, V) raw logits + lengths, or a list of (T_i, V) -> n-best lists."""
        out = []
        for rows in _emission_rows(emissions, lengths):
            frames, vocab = rows.shape
            if vocab != len(self.dictionary):
                raise ValueError(f"emissions have {vocab} outputs but the dictionary has {len(self.dictionary)}")
            results = self.decoder.decode(rows.data_ptr(), frames, vocab)[: self.nbest]
            out.append(
                [_hypothesis(r, self.blank, [self._index_to_word(w) for w in r.words if w >= 0]) for r in results]
            )
            if isinstance(self.lm, TransformerWordLM):
                self.lm.empty_cache()
        return out


class LexiconFreeBeamDecoder:
    """flashlight LexiconFreeDecoder without an LM: a CTC prefix beam over units (max, not log-add)."""

    def __init__(self, dictionary: Dictionary, beam: int = 50, beam_threshold: float = 25.0,
                 beam_size_token: int | None = None, sil_weight: float = 0.0, nbest: int = 1) -> None:
        self.dictionary = dictionary
        self.blank = dictionary.bos
        self.silence = dictionary.index("|") if "|" in dictionary else dictionary.eos
        self.nbest = nbest
        self.lm = ZeroLM()
        options = LexiconFreeDecoderOptions(
            beam_size=beam, beam_size_token=int(beam_size_token or len(dictionary)), beam_threshold=beam_threshold,
            lm_weight=0.0, sil_score=sil_weight, log_add=False, criterion_type=CriterionType.CTC,
        )
        self.decoder = LexiconFreeDecoder(options, self.lm, self.silence, self.blank, [])

    def decode(self, emissions, lengths=None) -> list[list[Hypothesis]]:
        out = []
        for rows in _emission_rows(emissions, lengths):
            results = self.decoder.decode(rows.data_ptr(), rows.shape[0], rows.shape[1])[: self.nbest]
            out.append([_hypothesis(r, self.blank, None) for r in results])
        return out


DECODER_TYPES = ("viterbi", "kenlm", "fairseqlm")


def build_decoder(decode_cfg: Any, dictionary: Dictionary, device: str | torch.device = "cpu"):
    """Decoder for a DecodeConfig-like object (fields of repro.config.DecodeConfig)."""
    kind = decode_cfg.type
    if kind == "viterbi":
        return ViterbiDecoder(blank=dictionary.bos)
    if kind not in DECODER_TYPES:
        raise ValueError(f"unknown decoder type {kind!r}; choose one of {', '.join(DECODER_TYPES)}")
    if not decode_cfg.lexicon:
        raise LexiconError(f"{kind} decoding needs a lexicon (fairseq allows lexicon-free decoding only with a unit LM)")
    return LexiconBeamDecoder(
        dictionary,
        decode_cfg.lexicon,
        lm_type=kind,
        lm_path=decode_cfg.lm_model,
        lm_weight=float(decode_cfg.lm_weight),
        word_score=float(decode_cfg.word_score),
        sil_weight=float(decode_cfg.sil_weight),
        unk_weight=float(decode_cfg.unk_weight),
        beam=int(decode_cfg.beam),
        beam_threshold=float(decode_cfg.beam_threshold),
        beam_size_token=int(decode_cfg.beam_size_token) if decode_cfg.beam_size_token else None,
        nbest=int(decode_cfg.nbest),
        device=device,
    )
