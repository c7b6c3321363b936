"""fairseq transformer_lm: a checkpoint in fairseq's format loads and scores like a direct forward."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repro.data.dictionary import Dictionary
from repro.decode.lexicon import LexiconBeamDecoder, TransformerWordLM, load_transformer_lm
from repro.decode.viterbi import viterbi_decode
from repro.decode.wer import units_to_words
from repro.models.transformer_lm import TransformerLMError

DIM, FFN, HEADS, LAYERS, FACTOR = 16, 32, 2, 2, 2
CUTOFF = [12, 20]  # bands [0, 12), [12, 20), [20, V)
WORDS = ["the", "cat", "sat", "on", "mat", "hat", "a", "red", "dog", "ran", "big", "sun", "hot", "cold",
         "day", "was", "is", "it", "not", "yes"]  # 4 specials + 20 words = 24 symbols


def fairseq_state_dict(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under fairseq's keys, tied adaptive input/softmax as in the wav2letter word LM
    (tie_adaptive_weights=True, tie_adaptive_proj=False): tied tensors saved under both names."""

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    state: dict[str, torch.Tensor] = {"decoder.version": torch.tensor([3.0])}
    bands = CUTOFF + [vocab]
    for band, end in enumerate(bands):
        start = bands[band - 1] if band else 0
        dim = int(DIM // FACTOR**band)
        state[f"decoder.embed_tokens.embeddings.{band}.0.weight"] = rand(end - start, dim)
        state[f"decoder.embed_tokens.embeddings.{band}.1.weight"] = rand(DIM, dim)
    state["decoder.embed_tokens._float_tensor"] = torch.zeros(1)
    state["decoder.embed_positions._float_tensor"] = torch.zeros(1)
    for layer in range(LAYERS):
        prefix = f"decoder.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[prefix + f"self_attn.{proj}.weight"] = rand(DIM, DIM)
            state[prefix + f"self_attn.{proj}.bias"] = rand(DIM)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            state[prefix + f"{norm}.weight"] = 1 + rand(DIM)
            state[prefix + f"{norm}.bias"] = rand(DIM)
        state[prefix + "fc1.weight"], state[prefix + "fc1.bias"] = rand(FFN, DIM), rand(FFN)
        state[prefix + "fc2.weight"], state[prefix + "fc2.bias"] = rand(DIM, FFN), rand(DIM)
    softmax = "decoder.adaptive_softmax."
    state[softmax + "head.word_proj.weight"] = state["decoder.embed_tokens.embeddings.0.0.weight"]
    state[softmax + "head.class_proj.weight"] = rand(len(CUTOFF), DIM)
    state[softmax + "head._float_tensor"] = torch.zeros(1)
    for band in range(len(CUTOFF)):
        dim = int(DIM // FACTOR ** (band + 1))
        state[softmax + f"tail.{band}.0.weight"] = rand(dim, DIM)  # own projection (tie_adaptive_proj False)
        state[softmax + f"tail.{band}.2.weight"] = state[f"decoder.embed_tokens.embeddings.{band + 1}.0.weight"]
    state[softmax + "version"] = torch.tensor([1])
    return state


def fairseq_args() -> argparse.Namespace:
    return argparse.Namespace(
        arch="transformer_lm_gbw", task="language_modeling", decoder_layers=LAYERS, decoder_embed_dim=DIM,
        decoder_input_dim=DIM, decoder_output_dim=DIM, decoder_ffn_embed_dim=FFN,
        decoder_attention_heads=HEADS, adaptive_input=True, adaptive_input_cutoff="12,20",
        adaptive_softmax_cutoff="12,20", adaptive_input_factor=FACTOR, adaptive_softmax_factor=FACTOR,
        tie_adaptive_weights=True, tie_adaptive_proj=False, adaptive_softmax_dropout=0, dropout=0.1,
        tokens_per_sample=256,
    )


def reference_log_probs(state: dict[str, torch.Tensor], tokens: list[int], vocab: int) -> torch.Tensor:
    """Direct forward from the raw tensors: adaptive input, sqrt(d) scale, sinusoids from padding+1,
    pre-LN causal layers, no final norm (transformer_lm_gbw), tied adaptive softmax."""
    pad = 1
    bands = CUTOFF + [vocab]
    rows = []
    for token in tokens:
        band = next(i for i, end in enumerate(bands) if token < end)
        start = bands[band - 1] if band else 0
        emb = state[f"decoder.embed_tokens.embeddings.{band}.0.weight"][token - start]
        rows.append(emb @ state[f"decoder.embed_tokens.embeddings.{band}.1.weight"].T)
    x = torch.stack(rows) * math.sqrt(DIM)
    half = DIM // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angle = (torch.arange(len(tokens), dtype=torch.float) + pad + 1)[:, None] * freq[None]
    x = x + torch.cat([angle.sin(), angle.cos()], dim=1)
    length, head_dim = len(tokens), DIM // HEADS
    for layer in range(LAYERS):
        p = f"decoder.layers.{layer}."

        def linear(h, name, p=p):
            return h @ state[p + name + ".weight"].T + state[p + name + ".bias"]

        h = F.layer_norm(x, (DIM,), state[p + "self_attn_layer_norm.weight"], state[p + "self_attn_layer_norm.bias"])
        q = linear(h, "self_attn.q_proj").view(length, HEADS, head_dim).transpose(0, 1) / math.sqrt(head_dim)
        k = linear(h, "self_attn.k_proj").view(length, HEADS, head_dim).transpose(0, 1)
        v = linear(h, "self_attn.v_proj").view(length, HEADS, head_dim).transpose(0, 1)
        scores = q @ k.transpose(1, 2) + torch.full((length, length), float("-inf")).triu(1)
        context = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, DIM)
        x = x + linear(context, "self_attn.out_proj")
        h = F.layer_norm(x, (DIM,), state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"])
        x = x + linear(torch.relu(linear(h, "fc1")), "fc2")
    softmax = "decoder.adaptive_softmax."
    head = torch.cat([x @ state[softmax + "head.word_proj.weight"].T, x @ state[softmax + "head.class_proj.weight"].T], 1)
    head = head.log_softmax(-1)
    out = [head[:, : CUTOFF[0]]]
    for band in range(len(CUTOFF)):
        tail = (x @ state[softmax + f"tail.{band}.0.weight"].T) @ state[softmax + f"tail.{band}.2.weight"].T
        out.append(tail.log_softmax(-1) + head[:, CUTOFF[0] + band, None])
    return torch.cat(out, dim=1)


def write_lm(directory: Path, state: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dict.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)))
    path = directory / "lm_librispeech_word_transformer.pt"
    torch.save({"args": fairseq_args(), "model": state, "optimizer_history": [], "extra_state": {}}, path)
    return path


@pytest.fixture
def lm_checkpoint(tmp_path):
    vocab = 4 + len(WORDS)
    state = fairseq_state_dict(vocab, torch.Generator().manual_seed(0))
    return write_lm(tmp_path / "lm", state), state, vocab


def test_fairseq_checkpoint_gives_the_direct_forward_log_probs(lm_checkpoint):
    path, state, vocab = lm_checkpoint
    model, dictionary, upper = load_transformer_lm(path)
    assert len(dictionary) == vocab and upper["CAT"] == dictionary.index("cat") == 5
    sentence = [dictionary.eos] + [dictionary.index(w) for w in ["the", "cat", "sat", "on", "cold", "yes", "mat"]]
    with torch.no_grad():
        ours = model(torch.tensor([sentence]))[0]
    expected = reference_log_probs(state, sentence, vocab)
    assert ours.shape == (len(sentence), vocab)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.exp().sum(-1), torch.ones(len(sentence)), atol=1e-5, rtol=0)
    # all three bands are used by the sentence, so the tied tail weights were exercised
    assert {min(2, sum(t >= c for c in CUTOFF)) for t in sentence} == {0, 1, 2}


def test_fused_in_proj_checkpoint_upgrades_to_the_same_model(lm_checkpoint, tmp_path):
    path, state, vocab = lm_checkpoint
    old = dict(state)
    prefix = "decoder.layers.1.self_attn."
    old[prefix + "in_proj_weight"] = torch.cat([old.pop(prefix + f"{p}_proj.weight") for p in "qkv"])
    old[prefix + "in_proj_bias"] = torch.cat([old.pop(prefix + f"{p}_proj.bias") for p in "qkv"])
    old_path = write_lm(tmp_path / "old", old)
    tokens = torch.tensor([[2, 5, 13, 22, 7]])
    with torch.no_grad():
        torch.testing.assert_close(load_transformer_lm(old_path)[0](tokens), load_transformer_lm(path)[0](tokens))


def test_tampered_tied_weight_and_wrong_vocabulary_are_errors(lm_checkpoint, tmp_path):
    path, state, vocab = lm_checkpoint
    tampered = dict(state)
    tampered["decoder.adaptive_softmax.tail.0.2.weight"] = tampered["decoder.adaptive_softmax.tail.0.2.weight"] + 1
    with pytest.raises(ValueError, match="tied parameter decoder.adaptive_softmax.tail.0.2.weight"):
        load_transformer_lm(write_lm(tmp_path / "tampered", tampered))
    short = write_lm(tmp_path / "short", state)
    (short.parent / "dict.txt").write_text("".join(f"{w} 1\n" for w in WORDS[:-3]))
    with pytest.raises((ValueError, TransformerLMError), match="shape|vocabulary"):
        load_transformer_lm(short)


def test_word_lm_state_scores_and_beam_with_transformer_lm(lm_checkpoint, tmp_path):
    path, state, vocab = lm_checkpoint
    model, dictionary, upper = load_transformer_lm(path)
    lm = TransformerWordLM(model, dictionary.eos, dictionary.unk)
    start = lm.start(False)
    after_the, score_the = lm.score(start, upper["THE"])
    _, score_cat = lm.score(after_the, upper["CAT"])
    _, score_unk = lm.score(after_the, dictionary.unk)
    _, score_end = lm.finish(after_the)
    expected = reference_log_probs(state, [dictionary.eos, upper["THE"]], vocab)
    assert score_the == pytest.approx(float(expected[0, upper["THE"]]), abs=1e-5)
    assert score_cat == pytest.approx(float(expected[1, upper["CAT"]]), abs=1e-5)
    assert score_end == pytest.approx(float(expected[1, dictionary.eos]), abs=1e-5)
    assert score_unk == float("-inf")

    letters = Dictionary.from_symbols(list("|ETAOHNSRDLCMG"))
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(f"{w.upper()}\t{' '.join(w.upper())} |\n" for w in ["the", "cat", "sat", "on", "dog"]))
    frames = ["<s>"]
    for word in ["THE", "DOG", "SAT"]:
        for letter in word:
            frames += [letter, "<s>"]
        frames += ["|", "<s>"]
    emissions = torch.full((1, len(frames), len(letters)), -12.0)
    for t, symbol in enumerate(frames):
        emissions[0, t, letters.index(symbol)] = 0.0
    decoder = LexiconBeamDecoder(letters, lexicon, "fairseqlm", path, lm_weight=0.0, word_score=0.0, beam=20)
    best = decoder.decode(emissions)[0][0]
    assert best.words == ["THE", "DOG", "SAT"]
    assert units_to_words(letters.string(viterbi_decode(emissions)[0].tokens)) == "THE DOG SAT"
    # the LM contributes when weighted: total score drops by lm_weight * (LM log-prob of the sentence)
    weighted = LexiconBeamDecoder(letters, lexicon, "fairseqlm", path, lm_weight=1.0, word_score=0.0, beam=20)
    lm_best = weighted.decode(emissions)[0][0]
    sentence = [dictionary.eos] + [upper[w] for w in ["THE", "DOG", "SAT"]]
    log_probs = reference_log_probs(state, sentence, vocab)
    lm_total = sum(float(log_probs[i, sentence[i + 1]]) for i in range(3)) + float(log_probs[3, dictionary.eos])
    assert lm_best.words == ["THE", "DOG", "SAT"]
    assert lm_best.score == pytest.approx(best.score + lm_total, abs=1e-3)
