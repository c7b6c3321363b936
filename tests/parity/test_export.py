"""Export to HF transformers / torchaudio and import from HF (repro.checkpoints.export, `tools export`).

Each test writes files with our CLI tools, loads them with the other library's own loaders
(`from_pretrained`, the two documented torchaudio lines) and compares outputs with ours: float32,
<= 1e-4 on valid frames, with and without padding. Models are random with the real BASE and LARGE LV-60
widths (conv 512, D 768 / 1024, FFN 3072 / 4096, 12 / 16 heads, positional conv 128) but 2 Transformer
layers instead of 12 / 24, to keep the suite fast: the per-layer computation and every key kind are
exercised, the depth adds only more of the same keys.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchaudio
from safetensors.torch import load_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Processor
from transformers import Wav2Vec2ForCTC as HFForCTC
from transformers import Wav2Vec2ForPreTraining as HFForPreTraining
from transformers import Wav2Vec2Model as HFModel
from w2v_refs import max_diff_valid, waveforms

from repro.checkpoints.export import HF_WEIGHTS, hf_config_dict, load_hf
from repro.checkpoints.format import atomic_save, model_file, read_checkpoint
from repro.config import ModelConfig
from repro.data.dictionary import Dictionary
from repro.decode.viterbi import viterbi_decode
from repro.decode.wer import units_to_words
from repro.models.ctc import Wav2Vec2CTC
from repro.models.wav2vec2 import Wav2Vec2Model
from repro.tools.__main__ import main as tools_main

TOL = 1e-4
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0)
LARGE = dict(encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16)
STYLES = {
    "base": dict(normalize=False),
    "large_lv60": dict(extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True, normalize=True, **LARGE),
}
LETTERS = list("|ETAONIHSRDLUMWCFGYPBVKXJQZ'")  # fairseq's LibriSpeech letter dictionary: 4 + 28 = 32
SMALL = dict(conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2", encoder_layers=2,
             encoder_embed_dim=48, encoder_ffn_embed_dim=96, encoder_attention_heads=4, conv_pos=16,
             conv_pos_groups=4, final_dim=24, latent_vars=8, **NO_DROPOUT)
LENGTHS = {"no_padding": [6000, 6000], "padding": [6000, 3900]}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases so that a wrongly mapped tensor shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "mask_emb" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def save_ours(model: torch.nn.Module, cfg: ModelConfig, kind: str, path: Path,
              dictionary: Dictionary | None = None) -> Path:
    atomic_save(model_file(kind=kind, model_state=model.state_dict(), model_cfg=vars(cfg).copy(),
                           task_cfg={"normalize": bool(cfg.normalize)},
                           dictionary=None if dictionary is None else list(dictionary.symbols)), path)
    return path


def export(source: Path, target: str, out: Path, *extra: str) -> Path:
    assert tools_main(["export", "--to", target, str(source), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module", params=list(STYLES))
def ctc_export(request, tmp_path_factory):
    """A BASE- or LV-60-shaped CTC model of ours, saved as our checkpoint and exported both ways."""
    torch.manual_seed(0)
    cfg = ModelConfig(_name="wav2vec_ctc", encoder_layers=2, mask_prob=0.5, **NO_DROPOUT, **STYLES[request.param])
    dictionary = Dictionary.from_symbols(LETTERS)
    ours = Wav2Vec2CTC(cfg, len(dictionary)).eval()
    perturb(ours, seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    checkpoint = save_ours(ours, cfg, "wav2vec_ctc", directory / "checkpoint.pt", dictionary)
    hf_dir = export(checkpoint, "hf", directory / "hf")
    ta_dir = export(checkpoint, "torchaudio", directory / "torchaudio")
    return cfg, ours, dictionary, checkpoint, hf_dir, ta_dir


@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_hf_ctc_export_gives_our_logits(ctc_export, lengths):
    cfg, ours, _, _, hf_dir, _ = ctc_export
    reference = HFForCTC.from_pretrained(hf_dir).eval()
    source, padding = waveforms(lengths)
    with torch.no_grad():
        logits, frame_padding = ours(source, padding)
        ref = reference(source, attention_mask=None if padding is None else (~padding).long()).logits
    assert ref.shape == logits.shape
    assert (frame_padding is not None) == (padding is not None)
    assert max_diff_valid(logits, ref, frame_padding) <= TOL
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(hf_dir)
    assert extractor.do_normalize == cfg.normalize
    assert extractor.return_attention_mask == (cfg.extractor_mode == "layer_norm")


@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_torchaudio_export_gives_our_logits(ctc_export, lengths):
    _, ours, dictionary, _, _, ta_dir = ctc_export
    # The two lines of README.txt, verbatim.
    readme = (ta_dir / "README.txt").read_text()
    assert 'model = torchaudio.models.wav2vec2_model(**json.load(open("wav2vec2_model_kwargs.json")))' in readme
    assert 'model.load_state_dict(torch.load("model.pt", weights_only=True))' in readme
    model = torchaudio.models.wav2vec2_model(**json.load(open(ta_dir / "wav2vec2_model_kwargs.json")))
    model.load_state_dict(torch.load(ta_dir / "model.pt", weights_only=True))
    model.eval()
    source, padding = waveforms(lengths, seed=1)
    with torch.no_grad():
        logits, frame_padding = ours(source, padding)
        ref, _ = model(source, torch.tensor(lengths))
    assert max_diff_valid(logits, ref, frame_padding) <= TOL
    assert Dictionary.load(ta_dir / "dict.ltr.txt") == dictionary


def test_hf_processor_decodes_like_our_viterbi(ctc_export):
    _, ours, dictionary, _, hf_dir, _ = ctc_export
    processor = Wav2Vec2Processor.from_pretrained(hf_dir)
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<pad>"] == 0 and processor.tokenizer.pad_token_id == 0  # HF's CTC blank = fairseq's index 0
    assert vocab["|"] == dictionary.index("|") and processor.tokenizer.word_delimiter_token == "|"
    source, padding = waveforms([16000, 16000, 16000], seed=2)
    with torch.no_grad():
        logits, _ = ours(source, padding)
    # A random model's argmax is nearly constant: spread it over letters, '|' and blanks (noise), push out
    # fairseq's <pad> / </s> / <unk> (never emitted by a trained model), blank every third frame.
    logits += 10.0 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    logits[..., 1:4] -= 100.0
    logits[:, ::3, 0] += 100.0
    logits[..., dictionary.index("|")] += 15.0  # words of a few letters
    hypotheses = viterbi_decode(logits)
    ours_text = [units_to_words(dictionary.string(h.tokens)) for h in hypotheses]
    hf_text = processor.batch_decode(logits.argmax(-1))
    assert all(len(text.split()) >= 3 for text in ours_text), ours_text  # '|' handling is exercised
    # '| blank |' leaves two spaces in HF's text (and in fairseq's post_process); units_to_words keeps one.
    assert [text.split() for text in hf_text] == [text.split() for text in ours_text]
    assert [" ".join(text.split()) for text in hf_text] == ours_text


def test_released_fairseq_ctc_file_exports(tmp_path):
    """A 2020 args-era fine-tuned file (fp16, no dictionary inside) through the safe importer, --dict given."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    try:
        import test_fairseq_checkpoints as fairseq_files
    finally:
        sys.path.pop(0)
    case = fairseq_files.make_args_finetuned(tmp_path)
    dictionary_path = tmp_path / "dict.ltr.txt"
    Dictionary.from_symbols(fairseq_files.LETTERS).save(dictionary_path)
    assert tools_main(["export", "--to", "hf", str(case.path), "--out", str(tmp_path / "x")]) == 1  # no dict
    hf_dir = export(case.path, "hf", tmp_path / "hf", "--dict", str(dictionary_path))
    loaded = load_hf(hf_dir)
    reference = HFForCTC.from_pretrained(hf_dir).eval()
    source, _ = waveforms([8000, 8000], seed=3)
    with torch.no_grad():
        logits, _ = loaded.model(source)
        ref = reference(source).logits
    assert max_diff_valid(logits, ref, None) <= TOL
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["mask_time_prob"] == 0.5 and config["mask_feature_prob"] == 0.1  # the file's fine-tuning masks
    assert config["layerdrop"] == 0.1


def test_pretrained_export_keeps_quantizer_and_projections(tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(quantize_targets=True, **SMALL)
    ours = Wav2Vec2Model(cfg).eval()
    perturb(ours, seed=4)
    hf_dir = export(save_ours(ours, cfg, "wav2vec2", tmp_path / "pretrained.pt"), "hf", tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Wav2Vec2ForPreTraining"]
    pretraining = HFForPreTraining.from_pretrained(hf_dir).eval()
    encoder = HFModel.from_pretrained(hf_dir).eval()
    source, padding = waveforms([6000, 4100], seed=4)
    with torch.no_grad():
        out = ours.extract_features(source, padding)
        ref = pretraining(source, attention_mask=(~padding).long())
        ref_encoder = encoder(source, attention_mask=(~padding).long()).last_hidden_state
        quantized, _ = ours.quantize(source)
        ours_q = ours.project_q(quantized)
    frame_padding = out["padding_mask"]
    assert max_diff_valid(out["x"], ref_encoder, frame_padding) <= TOL
    assert max_diff_valid(ours.final_proj(out["x"]), ref.projected_states, frame_padding) <= TOL
    assert max_diff_valid(ours_q, ref.projected_quantized_states, frame_padding) <= TOL


def test_hf_round_trip_is_identical(tmp_path):
    """HF's own save_pretrained folder -> import-checkpoint (ours) -> export --to hf: the same tensors, config
    values and vocabulary; our imported model gives HF's logits."""
    torch.manual_seed(5)
    hf_cfg = Wav2Vec2Config(**{**hf_config_dict(ModelConfig(_name="wav2vec_ctc", **SMALL), "wav2vec_ctc", 32),
                               "mask_time_prob": 0.3})
    original = HFForCTC(hf_cfg).eval()
    source_dir, ours_dir = tmp_path / "hf_original", tmp_path / "ours"
    original.save_pretrained(source_dir)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{s: 4 + i for i, s in enumerate(LETTERS)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    from transformers import Wav2Vec2CTCTokenizer

    processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(do_normalize=True),
                                  tokenizer=Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")))
    processor.save_pretrained(source_dir)
    assert tools_main(["import-checkpoint", str(source_dir), "--out", str(ours_dir)]) == 0
    imported = read_checkpoint(ours_dir / "checkpoint.pt")
    assert imported["kind"] == "wav2vec_ctc" and imported["model_cfg"]["normalize"] is True
    assert imported["dictionary"][4:] == LETTERS
    again = export(ours_dir / "checkpoint.pt", "hf", tmp_path / "hf_again")

    first, second = load_file(str(source_dir / HF_WEIGHTS)), load_file(str(again / HF_WEIGHTS))
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[key], second[key]) for key in first)
    written = json.loads((again / "config.json").read_text())
    original_config = original.config.to_dict()
    assert {key: value for key, value in written.items() if key != "architectures"} == {
        key: original_config[key] for key in written if key != "architectures"}
    assert json.loads((again / "vocab.json").read_text()) == processor.tokenizer.get_vocab()
    assert Wav2Vec2FeatureExtractor.from_pretrained(again).do_normalize is True

    loaded = load_hf(source_dir)
    source, padding = waveforms([6000, 4000], seed=6)
    with torch.no_grad():
        logits, frame_padding = loaded.model(source, padding)
        ref = original(source, attention_mask=(~padding).long()).logits
    assert max_diff_valid(logits, ref, frame_padding) <= TOL


def test_hf_tutorial_vocabulary_is_reordered_for_our_decoders(tmp_path):
    """A user's HF fine-tuned model with HF's tutorial vocabulary (letters, then [UNK], [PAD] = blank last):
    our Viterbi over the imported model reads the same words as HF's processor over HF's logits."""
    torch.manual_seed(7)
    letters = list("abcdefgh'") + ["|"]
    vocab = {s: i for i, s in enumerate(letters)} | {"[UNK]": len(letters), "[PAD]": len(letters) + 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    from transformers import Wav2Vec2CTCTokenizer

    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]")
    hf_cfg = Wav2Vec2Config(**{**hf_config_dict(ModelConfig(_name="wav2vec_ctc", **SMALL), "wav2vec_ctc", len(vocab)),
                               "pad_token_id": tokenizer.pad_token_id})
    model = HFForCTC(hf_cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # a varied argmax over letters, '|' and blank from a random encoder
        model.lm_head.bias[vocab["[UNK]"]] -= 1000.0
        model.lm_head.weight[vocab["|"]] = model.lm_head.weight[vocab["e"]]  # '|' ties 'e': words end often
        model.lm_head.bias[vocab["|"]] = model.lm_head.bias[vocab["e"]] + 1.0
    model.save_pretrained(tmp_path / "hf")
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(), tokenizer=tokenizer).save_pretrained(tmp_path / "hf")

    loaded = load_hf(tmp_path / "hf")
    assert loaded.dictionary.symbols[4:] == [s for s in letters]
    source, _ = waveforms([16000, 16000, 16000], seed=8)
    with torch.no_grad():
        logits, _ = loaded.model(source)
        hf_ids = model(source).logits.argmax(-1)
    ours_text = [units_to_words(loaded.dictionary.string(h.tokens)) for h in viterbi_decode(logits)]
    assert all(len(text.split()) >= 2 for text in ours_text), ours_text
    hf_text = Wav2Vec2Processor.from_pretrained(tmp_path / "hf").batch_decode(hf_ids)
    assert ours_text == [" ".join(text.split()) for text in hf_text]


def test_wav2vec_v1_models_are_refused_by_name(tmp_path):
    from repro.checkpoints.export import export_hf, export_torchaudio
    from repro.checkpoints.fairseq import LoadedModel
    from repro.checkpoints.format import CheckpointError

    loaded = LoadedModel(model=torch.nn.Linear(1, 1), model_cfg=ModelConfig(), task_cfg={}, dictionary=None,
                         kind="wav2vec")
    for exporter in (export_hf, export_torchaudio):
        with pytest.raises(CheckpointError, match="vq-wav2vec"):
            exporter(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists()
