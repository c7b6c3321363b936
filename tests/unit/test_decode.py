"""Decoding: Viterbi, WER/UER, lexicon beam with KenLM, errors on bad lexicons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.data.dictionary import Dictionary
from repro.decode.lexicon import (
    LexiconBeamDecoder,
    LexiconError,
    LexiconFreeBeamDecoder,
    kenlm_vocabulary,
    read_lexicon,
)
from repro.decode.viterbi import collapse_ctc, viterbi_decode
from repro.decode.wer import (
    UtteranceResult,
    corpus_wer,
    edit_distance,
    score_results,
    units_to_words,
    write_results,
)

LETTERS = list("|ETAOHNSRDLCM")
PEAK, OFF = 0.0, -12.0  # raw logits, as fairseq feeds the flashlight decoder (Trap 12)


def letter_dictionary() -> Dictionary:
    return Dictionary.from_symbols(LETTERS)


def spell(words: list[str]) -> str:
    return " ".join(" ".join(word) + " |" for word in words)


def emissions_for(frames: list[dict[str, float] | str], dictionary: Dictionary) -> torch.Tensor:
    """(1, T, V) logits: each frame is a symbol (peaked) or {symbol: logit} (others at OFF)."""
    logits = torch.full((1, len(frames), len(dictionary)), OFF)
    for t, frame in enumerate(frames):
        for symbol, value in ({frame: PEAK} if isinstance(frame, str) else frame).items():
            logits[0, t, dictionary.index(symbol)] = value
    return logits


def frames_for_words(words: list[str]) -> list[str]:
    """letter, blank, letter, blank, ..., '|', blank: a clean CTC path for the words."""
    frames = ["<s>"]
    for word in words:
        for letter in word:
            frames += [letter, letter, "<s>"]
        frames += ["|", "<s>"]
    return frames


def write_lexicon(path: Path, words: list[str]) -> Path:
    path.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in words))
    return path


# ----------------------------------------------------------------------------------------------
# Viterbi


def test_collapse_and_viterbi_hand_computed():
    assert collapse_ctc([5, 5, 0, 5, 6, 6, 0, 0, 4, 4], blank=0) == [5, 5, 6, 4]
    # V = 5: blank 0, then 1..4. Frame argmaxes: 1 1 0 1 2 2 4 | padded frames beyond length 7.
    logits = torch.tensor(
        [[[0.1, 2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0],
          [0.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 2.5, 0.0, 0.0],
          [0.0, 0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 9.0, 0.0]],
         [[0.0, 0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0],
          [5.0, 0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0],
          [0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]]
    )
    hyps = viterbi_decode(logits, lengths=torch.tensor([7, 6]))
    assert hyps[0].tokens == [1, 1, 2, 4]
    assert hyps[1].tokens == [3, 4, 4]
    expected_score = float(logits[1, :6].log_softmax(-1).max(-1).values.sum())
    assert hyps[1].score == pytest.approx(expected_score)


def test_units_to_words_letter_post_process():
    dictionary = letter_dictionary()
    ids = dictionary.encode_line("H E | T H E R E |")
    assert units_to_words(dictionary.string(ids), "letter") == "HE THERE"


# ----------------------------------------------------------------------------------------------
# WER


def test_corpus_wer_is_summed_edit_distance_not_mean_of_rates():
    import jiwer

    refs = ["the cat sat on the mat", "hello", "a b c d"]
    hyps = ["the cat sat on a mat", "yellow", "a c d e f"]
    # per-utterance errors 1/6, 1/1, 3/4 -> corpus 5/11 = 45.45%, mean of rates = 63.89%
    errors = [edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)]
    assert errors == [1, 1, 3]
    fairseq_wer = 100.0 * sum(errors) / sum(len(r.split()) for r in refs)
    mean_of_rates = 100.0 * sum(e / len(r.split()) for e, r in zip(errors, refs)) / len(refs)
    assert fairseq_wer == pytest.approx(500 / 11)
    assert abs(mean_of_rates - fairseq_wer) > 10
    assert corpus_wer(refs, hyps) == pytest.approx(fairseq_wer)
    assert corpus_wer(refs, hyps) == pytest.approx(100.0 * jiwer.wer(refs, hyps))


def test_score_results_uer_counts_word_boundaries_and_files(tmp_path):
    results = [
        UtteranceResult(0, "H E | T H E R E |", "H E | T H E R |", "HE THERE", "HE THER"),
        UtteranceResult(1, "O N |", "O N | A |", "ON", "ON A"),
        UtteranceResult(2, "A |", "", "A", ""),
    ]
    score = score_results(results)
    assert score.words.errors == 1 + 1 + 1 and score.words.reference_length == 4
    assert score.wer == pytest.approx(75.0)
    unit_errors = sum(edit_distance(r.ref_units.split(), r.hyp_units.split()) for r in results)
    assert unit_errors == 1 + 2 + 2
    assert score.units.errors == unit_errors and score.units.reference_length == 9 + 3 + 2
    paths = write_results(tmp_path, "/x/checkpoint_best.pt", "dev_other", results, score)
    assert paths["hypo.word"].name == "hypo.word-checkpoint_best.pt-dev_other.txt"
    assert paths["ref.units"].read_text().splitlines()[1] == "O N | (None-1)"
    assert paths["hypo.word"].read_text().splitlines() == ["HE THER (None-0)", "ON A (None-1)", " (None-2)"]
    table = paths["errors"].read_text().splitlines()
    assert table[0].split("\t")[:4] == ["id", "audio", "ref_words", "word_errors"]
    assert table[2].split("\t")[3:7] == ["1", "0", "0", "1"]  # one insertion in utterance 1


# ----------------------------------------------------------------------------------------------
# Lexicon beam


def test_beam_without_lm_equals_viterbi_on_peaked_emissions(tmp_path):
    dictionary = letter_dictionary()
    words = ["THE", "CAT", "SAT", "ON", "MAT", "HAT"]
    lexicon = write_lexicon(tmp_path / "lexicon.txt", words)
    sentence = ["THE", "CAT", "SAT", "ON", "THE", "MAT"]
    emissions = emissions_for(frames_for_words(sentence), dictionary)
    greedy = viterbi_decode(emissions)[0]
    assert units_to_words(dictionary.string(greedy.tokens)) == " ".join(sentence)

    decoder = LexiconBeamDecoder(dictionary, lexicon, lm_type="none", lm_weight=0.0, word_score=0.0, beam=20)
    best = decoder.decode(emissions)[0][0]
    assert best.words == sentence
    assert best.tokens == greedy.tokens

    free = LexiconFreeBeamDecoder(dictionary, beam=20).decode(emissions)[0][0]
    assert free.tokens == greedy.tokens


def build_kenlm(tmp_path: Path, sentences: list[str], order: int = 4) -> Path:
    lmplz = Path(sys.executable).parent / "lmplz"
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(sentences) + "\n")
    arpa = tmp_path / "lm.arpa"
    subprocess.run(
        [str(lmplz), "-o", str(order), "-S", "100M", "-T", str(tmp_path), "--discount_fallback",
         "--text", str(text), "--arpa", str(arpa)],
        check=True, capture_output=True,
    )
    return arpa


def test_kenlm_beam_fixes_an_ambiguous_word(tmp_path):
    dictionary = letter_dictionary()
    words = ["THE", "CAT", "SAT", "ON", "MAT", "HAT", "A", "RED", "HAS"]
    lexicon = write_lexicon(tmp_path / "lexicon.txt", words)
    arpa = build_kenlm(tmp_path, ["THE CAT SAT ON THE MAT"] * 20 + ["A HAT", "THE HAT HAS A CAT", "A RED HAT"] * 3)
    frames = frames_for_words(["THE", "CAT", "SAT", "ON", "THE", "MAT"])
    first_letter_of_mat = max(i for i, f in enumerate(frames) if f == "M") - 1
    frames[first_letter_of_mat] = {"H": PEAK, "M": PEAK - 0.3}
    frames[first_letter_of_mat + 1] = {"H": PEAK, "M": PEAK - 0.3}
    emissions = emissions_for(frames, dictionary)

    greedy = units_to_words(dictionary.string(viterbi_decode(emissions)[0].tokens))
    assert greedy == "THE CAT SAT ON THE HAT"
    no_lm = LexiconBeamDecoder(dictionary, lexicon, "kenlm", arpa, lm_weight=0.0, word_score=0.0, beam=50)
    assert no_lm.decode(emissions)[0][0].words == greedy.split()
    binary = tmp_path / "lm.bin"
    subprocess.run([str(Path(sys.executable).parent / "build_binary"), "trie", str(arpa), str(binary)],
                   check=True, capture_output=True)
    for lm_file in (arpa, binary):
        with_lm = LexiconBeamDecoder(dictionary, lexicon, "kenlm", lm_file, lm_weight=1.0, word_score=0.0, beam=50)
        assert with_lm.decode(emissions)[0][0].words == ["THE", "CAT", "SAT", "ON", "THE", "MAT"]
    assert corpus_wer(["THE CAT SAT ON THE MAT"], [greedy]) > 0


def test_lexicon_token_missing_from_dictionary_is_named(tmp_path):
    dictionary = letter_dictionary()
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("CAT\tC A T |\nZOO\tZ O O |\n")
    with pytest.raises(LexiconError, match=r"'ZOO' is spelled with 'Z'"):
        LexiconBeamDecoder(dictionary, lexicon, lm_type="none")
    bad = tmp_path / "bad.txt"
    bad.write_text("CAT\tC A T |\nDOG\n")
    with pytest.raises(LexiconError, match=r"bad.txt:2"):
        read_lexicon(bad)


def test_lowercase_lm_with_uppercase_lexicon_is_a_mismatch(tmp_path):
    dictionary = letter_dictionary()
    lexicon = write_lexicon(tmp_path / "lexicon.txt", ["THE", "CAT", "SAT"])
    arpa = build_kenlm(tmp_path, ["the cat sat"] * 5)
    with pytest.raises(LexiconError, match=r"do not match: 3 of 3 lexicon words.*lower-case"):
        LexiconBeamDecoder(dictionary, lexicon, "kenlm", arpa)
    assert kenlm_vocabulary(arpa) >= {"the", "cat", "sat", "<s>", "</s>", "<unk>"}
