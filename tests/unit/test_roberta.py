"""RoBERTa on vq-wav2vec units: the released file's layout loads strictly, matches an independent
RoBERTa (Hugging Face transformers, test-only), keeps fairseq's dictionary indices, ties its LM head,
and its features train a CTC head; fairseq's span masking and masked-LM loss; bad input."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from roberta_files import (
    DIM,
    FFN,
    HEADS,
    LAYERS,
    MAX_POSITIONS,
    args_2019,
    roberta_state_2019,
    synthetic_unit_corpus,
    to_current_layout,
    unit_codes,
    write_2019_checkpoint,
    write_unit_dictionary,
)

from repro.checkpoints.format import CheckpointError, read_checkpoint
from repro.checkpoints.roberta import NotRobertaError, load_roberta
from repro.config import ModelConfig
from repro.data.dictionary import Dictionary
from repro.data.units import (
    LabeledUnitDataset,
    MaskedUnitDataset,
    MaskingConfig,
    UnitFileError,
    encode_units,
    load_unit_dictionary,
    mask_units,
    span_mask,
)
from repro.losses.ctc import ctc_loss
from repro.losses.masked_lm import masked_lm_loss, reduce_masked_lm
from repro.models.roberta import RobertaCTC, RobertaModel, make_positions
from repro.tools import import_checkpoint as import_tool

CODES = unit_codes(20)
VOCAB = 4 + len(CODES) + 1


@pytest.fixture()
def released(tmp_path):
    """The extracted bert_kmeans folder, built from random weights."""
    write_2019_checkpoint(tmp_path / "bert_kmeans", CODES)
    return tmp_path / "bert_kmeans"


def padded_batch(dictionary: Dictionary) -> torch.Tensor:
    lines = ["0-1 0-1 2-3 1-5 1-0", "3-1 0-2"]
    rows = [[dictionary.bos, *encode_units(line, dictionary, "test").tolist(), dictionary.eos] for line in lines]
    width = max(map(len, rows))
    return torch.tensor([row + [dictionary.pad] * (width - len(row)) for row in rows])


def hf_roberta(model: RobertaModel):
    """transformers' RobertaForMaskedLM holding the same weights (the key map of HF's fairseq converter)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hf = transformers.RobertaForMaskedLM(config).eval()
    ours = model.state_dict()
    enc = "encoder.sentence_encoder."
    mapping = {"roberta.embeddings.word_embeddings.weight": enc + "embed_tokens.weight",
               "roberta.embeddings.position_embeddings.weight": enc + "embed_positions.weight",
               "roberta.embeddings.LayerNorm.weight": enc + "layernorm_embedding.weight",
               "roberta.embeddings.LayerNorm.bias": enc + "layernorm_embedding.bias",
               "lm_head.dense.weight": "encoder.lm_head.dense.weight", "lm_head.dense.bias": "encoder.lm_head.dense.bias",
               "lm_head.layer_norm.weight": "encoder.lm_head.layer_norm.weight",
               "lm_head.layer_norm.bias": "encoder.lm_head.layer_norm.bias",
               "lm_head.decoder.weight": "encoder.lm_head.weight", "lm_head.bias": "encoder.lm_head.bias",
               "lm_head.decoder.bias": "encoder.lm_head.bias"}
    names = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
             "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
             "attention.output.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1",
             "output.dense": "fc2", "output.LayerNorm": "final_layer_norm"}
    for layer in range(LAYERS):
        for theirs, mine in names.items():
            for kind in ("weight", "bias"):
                mapping[f"roberta.encoder.layer.{layer}.{theirs}.{kind}"] = f"{enc}layers.{layer}.{mine}.{kind}"
    state = {key: ours[value] for key, value in mapping.items()}
    state["roberta.embeddings.token_type_embeddings.weight"] = torch.zeros(1, DIM)
    missing, _ = hf.load_state_dict(state, strict=False)
    assert not [key for key in missing if "position_ids" not in key]
    return hf


# --- loading the released layout ----------------------------------------------------------------


def test_released_folder_loads_strictly_and_matches_hugging_face_roberta(released):
    loaded = load_roberta(released)
    assert loaded.kind == "roberta" and loaded.model_cfg.encoder_layers == LAYERS
    assert loaded.model_cfg.max_positions == MAX_POSITIONS
    tokens = padded_batch(loaded.dictionary)
    hf = hf_roberta(loaded.model)
    attention = tokens.ne(1).long()
    with torch.no_grad():
        reference = hf(input_ids=tokens, attention_mask=attention, output_hidden_states=True)
        logits = loaded.model(tokens)
        layers = loaded.model.extract_features(tokens, return_all_hiddens=True)
    real = tokens.ne(1)
    assert len(layers) == LAYERS + 1
    for ours, theirs in zip(layers, reference.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[real], reference.logits[real], atol=1e-4, rtol=1e-4)
    assert loaded.model.extract_features(tokens).shape == (2, tokens.size(1), DIM)  # (batch, tokens, dim)


def test_file_keys_are_exactly_the_model_keys(released, tmp_path):
    state = roberta_state_2019(VOCAB)
    state["decoder.sentence_encoder.layers.0.extra.weight"] = torch.zeros(1)
    torch.save({"args": args_2019(), "model": state}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected: encoder.sentence_encoder.layers.0.extra.weight"):
        load_roberta(tmp_path / "extra.pt", released / "dict.txt")
    state = roberta_state_2019(VOCAB)
    del state["decoder.sentence_encoder.layers.1.fc2.bias"]
    torch.save({"args": args_2019(), "model": state}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing: encoder.sentence_encoder.layers.1.fc2.bias"):
        load_roberta(tmp_path / "missing.pt", released / "dict.txt")


def test_cfg_era_and_packed_attention_files_give_the_same_model(released, tmp_path):
    state = roberta_state_2019(VOCAB)
    tokens = padded_batch(load_unit_dictionary(released / "dict.txt")[0])
    reference = load_roberta(released).model(tokens)

    model_section = argparse.Namespace(**vars(args_2019()), _name="roberta_base", layernorm_embedding=True,
                                       encoder_normalize_before=False, untie_weights_roberta=False)
    cfg = {"common": {"seed": 1}, "model": model_section,
           "task": {"_name": "masked_lm", "data": "/data", "tokens_per_sample": MAX_POSITIONS}}
    torch.save({"cfg": cfg, "model": to_current_layout(state)}, tmp_path / "cfg.pt")
    torch.testing.assert_close(load_roberta(tmp_path / "cfg.pt", released / "dict.txt").model(tokens), reference)

    packed = dict(state)
    for layer in range(LAYERS):
        prefix = f"decoder.sentence_encoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            packed[prefix + f"in_proj_{kind}"] = torch.cat([packed.pop(prefix + f"{p}_proj.{kind}") for p in "qkv"])
    torch.save({"args": args_2019(), "model": packed}, tmp_path / "packed.pt")
    torch.testing.assert_close(load_roberta(tmp_path / "packed.pt", released / "dict.txt").model(tokens), reference)


def test_options_repro_does_not_implement_are_refused_by_name(released, tmp_path):
    section = argparse.Namespace(**{**vars(args_2019(arch="roberta_prenorm")), "_name": "roberta_prenorm",
                                    "layernorm_embedding": False, "encoder_normalize_before": True})
    torch.save({"cfg": {"model": section, "task": {"_name": "masked_lm"}},
                "model": to_current_layout(roberta_state_2019(VOCAB))}, tmp_path / "prenorm.pt")
    with pytest.raises(CheckpointError, match="encoder_normalize_before=True is not implemented"):
        load_roberta(tmp_path / "prenorm.pt", released / "dict.txt")


def test_positions_are_offset_by_the_padding_index():
    tokens = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1]])
    assert make_positions(tokens, 1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]
    loaded_cfg = ModelConfig(_name="roberta", encoder_layers=1, encoder_embed_dim=8, encoder_ffn_embed_dim=16,
                             encoder_attention_heads=2, max_positions=5)
    model = RobertaModel(loaded_cfg, 12)
    assert model.sentence_encoder.embed_positions.weight.shape == (5 + 2, 8)
    with pytest.raises(ValueError, match="longer than the model's max_positions=5"):
        model.extract_features(tokens)


# --- dictionary ---------------------------------------------------------------------------------


def test_dictionary_indices_are_fairseqs(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("12-304 900\n7-1 800\n0-0 700\n7-1 5 #fairseq:overwrite\n", encoding="utf-8")
    dictionary, mask_index = load_unit_dictionary(path)
    # fairseq: <s> <pad> </s> <unk> = 0..3, then the file's symbols in order, then the task's <mask>
    assert dictionary.symbols == ["<s>", "<pad>", "</s>", "<unk>", "12-304", "7-1", "0-0", "<mask>"]
    assert mask_index == 7 and dictionary.counts[5] == 5
    # line number in dict.txt != index: the first code is index 4 (the bert_kmeans pitfall, fairseq#3088)
    assert encode_units("0-0 12-304 7-1", dictionary, "x").tolist() == [6, 4, 5]


def test_loaded_dictionary_must_fit_the_embeddings(released, tmp_path):
    write_unit_dictionary(tmp_path / "dict.txt", CODES[:-2])
    with pytest.raises(CheckpointError, match="does not belong to the checkpoint"):
        load_roberta(released / "model.pt", tmp_path / "dict.txt")


# --- LM head --------------------------------------------------------------------------------------


def test_lm_head_is_tied_to_the_token_embeddings(released, tmp_path):
    model = load_roberta(released).model
    head, embed = model.encoder.lm_head.weight, model.sentence_encoder.embed_tokens.weight
    assert head is embed
    model.train()
    model(torch.tensor([[0, 5, 6, 2]])).sum().backward()
    assert embed.grad is not None and embed.grad[6].abs().sum() > 0  # input and output paths share one matrix

    state = roberta_state_2019(VOCAB)
    state["decoder.lm_head.weight"] = state["decoder.lm_head.weight"] + 1.0
    torch.save({"args": args_2019(), "model": state}, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match="differs from the token embeddings"):
        load_roberta(tmp_path / "untied.pt", released / "dict.txt")


# --- masking and loss -----------------------------------------------------------------------------


def test_masked_lm_loss_is_the_hand_computed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([0, 1, 2])
    loss, logs = masked_lm_loss(logits, targets, pad=9)
    by_hand = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))) - (0.5 - math.log(2 * math.exp(0.5) + math.exp(3))) \
        + math.log(3)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert logs["sample_size"] == 3 and logs["correct"] == 1  # row 0 right, row 1 wrong, row 2 a tie -> index 0
    metrics = reduce_masked_lm(logs)
    assert metrics["loss"] == pytest.approx(by_hand / 3 / math.log(2))
    assert metrics["ppl"] == pytest.approx(2 ** metrics["loss"]) and metrics["accuracy"] == pytest.approx(1 / 3)
    loss, logs = masked_lm_loss(logits, torch.tensor([0, 9, 9]), pad=9)  # pad targets are not predicted
    assert logs["count"] == 1 and loss.item() == pytest.approx(-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))))


def test_span_masking_has_the_papers_statistics():
    # vq-wav2vec / 1911.03912: 5% of tokens start a span of N(10, 10) tokens; fairseq: mask_prob 0.5 / length 10
    cfg = MaskingConfig(mask_prob=0.5, mask_multiple_length=10, mask_stdev=10.0)
    rng = np.random.default_rng(0)
    masks = [span_mask(1000, cfg, rng) for _ in range(200)]
    fraction = float(np.mean([mask.mean() for mask in masks]))
    assert 0.25 < fraction < 0.45  # overlapping spans of mean length ~10.4 (lengths clipped at 0)
    fixed = span_mask(100, MaskingConfig(mask_prob=0.3, mask_multiple_length=3), np.random.default_rng(1))
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], fixed.astype(int), [0]]))))[::2]
    assert len(runs) and all(run >= 3 for run in runs)  # stdev 0: every span 3 long (overlapping ones merge)


def test_mask_units_keeps_fairseqs_replacement_rules():
    cfg = MaskingConfig(mask_prob=0.15, leave_unmasked_prob=0.1, random_token_prob=0.1)
    weights = np.ones(30)
    weights[:4] = 0
    weights /= weights.sum()
    rng = np.random.default_rng(0)
    item = np.concatenate([[0], rng.integers(4, 29, 20000), [2]])
    source, target = mask_units(item, cfg, 29, weights, 1, rng)
    selected = target != 1
    assert (target[selected] == item[selected]).all() and (source[~selected] == item[~selected]).all()
    share = selected.mean()
    assert 0.14 < share < 0.16
    masked = (source == 29) & selected
    assert 0.77 < masked.sum() / selected.sum() < 0.83  # 80% <mask>, 10% kept, 10% random
    assert not np.isin(source[selected & ~masked], [0, 1, 2, 3]).any()  # random symbols are never specials


def test_masked_batches_pad_and_replay(tmp_path):
    dictionary_path = write_unit_dictionary(tmp_path / "dict.txt", CODES)
    dictionary, mask_index = load_unit_dictionary(dictionary_path)
    (tmp_path / "train.src").write_text("\n".join(synthetic_unit_corpus(6, np.random.default_rng(0), CODES)) + "\n")
    dataset = MaskedUnitDataset(tmp_path / "train.src", dictionary, mask_index, MaskingConfig(mask_prob=0.3))
    samples = [dataset[i] for i in range(4)]
    batch = dataset.collater(samples, np.random.default_rng(5))
    again = dataset.collater(samples, np.random.default_rng(5))
    tokens = batch["net_input"]["src_tokens"]
    assert torch.equal(tokens, again["net_input"]["src_tokens"]) and torch.equal(batch["target"], again["target"])
    assert tokens.shape == batch["target"].shape == (4, int(dataset.sizes[:4].max()))
    assert batch["ntokens"] == int(dataset.sizes[:4].sum()) and (batch["target"] != 1).any()


# --- fine-tuning ----------------------------------------------------------------------------------


def test_features_of_a_tokenized_utterance_train_a_ctc_head(released, tmp_path):
    loaded = load_roberta(released)
    units, mask_index = loaded.dictionary, loaded.dictionary.index("<mask>")
    letters = Dictionary.from_symbols(["|", "A", "B", "C"])
    cfg = ModelConfig(**{**loaded.model_cfg.__dict__, "_name": "roberta_ctc", "apply_mask": True, "mask_prob": 0.2,
                         "mask_length": 2, "mask_channel_prob": 0.1, "mask_channel_length": 4})
    model = RobertaCTC.from_pretrained(loaded.model, cfg, len(units), len(letters), mask_index)
    torch.testing.assert_close(model.sentence_encoder.layers[1].fc1.weight,
                               loaded.model.sentence_encoder.layers[1].fc1.weight)
    source = tmp_path / "train.src"
    source.write_text("0-1 0-1 0-2 0-3 0-3 0-4 0-4 0-5\n1-1 1-2 1-2 1-3 1-4\n", encoding="utf-8")
    labels = [letters.encode_line("A B | C"), letters.encode_line("C A")]
    dataset = LabeledUnitDataset(source, units, labels, letters.pad, max_positions=MAX_POSITIONS)
    batch = dataset.collater([dataset[0], dataset[1]])
    model.train()
    logits, frame_padding = model(**batch["net_input"])
    assert logits.shape == (2, 9, len(letters)) and frame_padding.sum(1).tolist() == [1, 4]  # </s> + pads
    loss, logs = ctc_loss(logits, frame_padding, batch["target"], batch["target_lengths"])
    loss.backward()
    assert math.isfinite(loss.item()) and logs["nsentences"] == 2
    assert model.sentence_encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.set_num_updates(0)
    model.cfg.freeze_finetune_updates = 5
    model.zero_grad()
    logits, frame_padding = model(**batch["net_input"])
    ctc_loss(logits, frame_padding, batch["target"], batch["target_lengths"])[0].backward()
    assert model.sentence_encoder.layers[0].self_attn.q_proj.weight.grad is None  # frozen: only proj trains
    assert model.proj.weight.grad is not None


# --- bad input ------------------------------------------------------------------------------------


def test_code_missing_from_the_dictionary_names_file_line_and_code(tmp_path):
    dictionary, mask_index = load_unit_dictionary(write_unit_dictionary(tmp_path / "dict.txt", CODES))
    (tmp_path / "train.src").write_text("0-1 0-2\n0-1 9-9 0-3\n", encoding="utf-8")
    with pytest.raises(UnitFileError, match=r"train\.src:2: code '9-9' \(token 2\) is not in the unit dictionary"):
        MaskedUnitDataset(tmp_path / "train.src", dictionary, mask_index, MaskingConfig())


def test_vq_wav2vec_checkpoint_where_roberta_belongs_is_a_clear_error(tmp_path):
    args = argparse.Namespace(arch="wav2vec", task="audio_pretraining", vq_type="kmeans", vq_groups=2, vq_vars=320)
    torch.save({"args": args, "model": {"feature_extractor.conv_layers.0.0.weight": torch.zeros(512, 1, 10)}},
               tmp_path / "vq-wav2vec_kmeans.pt")
    with pytest.raises(NotRobertaError, match=r"vq-wav2vec model \(kmeans quantizer\), not a RoBERTa model"):
        load_roberta(tmp_path / "vq-wav2vec_kmeans.pt")


# --- import-checkpoint ------------------------------------------------------------------------------


def test_import_checkpoint_accepts_the_extracted_folder(released, tmp_path):
    out = tmp_path / "imported"
    assert import_tool.main(argparse.Namespace(checkpoint=released, out=out, dict=None)) == 0
    stored = read_checkpoint(out / "checkpoint.pt")  # ours: weights_only=True reads it
    assert stored["kind"] == "roberta" and stored["dictionary"][-1] == "<mask>"
    assert (out / "dict.txt").read_text().splitlines()[0].startswith("0-0 ")
    original, imported = load_roberta(released), load_roberta(out / "checkpoint.pt")
    tokens = padded_batch(original.dictionary)
    torch.testing.assert_close(imported.model(tokens), original.model(tokens))
    assert imported.dictionary.symbols == original.dictionary.symbols
    assert imported.model.encoder.lm_head.weight is imported.model.sentence_encoder.embed_tokens.weight

    alone = tmp_path / "alone"  # the .pt without its folder: --dict names the unit dictionary
    alone.mkdir()
    (released / "model.pt").rename(alone / "model.pt")
    assert import_tool.main(argparse.Namespace(checkpoint=alone / "model.pt", out=tmp_path / "again",
                                               dict=released / "dict.txt")) == 0
    assert read_checkpoint(tmp_path / "again" / "checkpoint.pt")["dictionary"] == stored["dictionary"]
