"""fairseq-format RoBERTa files and unit corpora made by tests (random weights, released key names).

The 2019 layout is the one `bert_kmeans.tar` was written with (fairseq's RobertaModel of late 2019):
`decoder.sentence_encoder.*` with `emb_layer_norm`, `decoder.lm_head.*` whose weight is the token
embedding matrix saved a second time, and an argparse `args` Namespace (arch roberta_base, task
masked_lm). Today's layout (`cfg`, `encoder.*`, `layernorm_embedding`, a `version` buffer) is written
from the same weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from repro.data.units import synthetic_codes, synthetic_unit_corpus  # noqa: F401  (re-exported for the tests)

DIM, FFN, HEADS, LAYERS, MAX_POSITIONS = 32, 64, 4, 2, 40
GROUP_SIZE = 6  # codes "a-b" with a, b < GROUP_SIZE


def unit_codes(count: int) -> list[str]:
    """`count` distinct vq-wav2vec style code strings, in the order a dict.txt would list them."""
    return synthetic_codes(per_group=GROUP_SIZE, count=count)


def write_unit_dictionary(path: Path, codes: list[str]) -> Path:
    path.write_text("".join(f"{code} {1000 - index}\n" for index, code in enumerate(codes)), encoding="utf-8")
    return path


def roberta_state_2019(vocab: int, seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """Random weights under the 2019 key names (lm_head.weight saved as a copy of embed_tokens)."""
    generator = torch.Generator().manual_seed(seed)

    def matrix(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    def vector(size: int, center: float = 0.0) -> torch.Tensor:
        return center + 0.1 * torch.randn(size, generator=generator)

    prefix = "decoder.sentence_encoder."
    embed = torch.randn(vocab, DIM, generator=generator)
    embed[1] = 0  # the pad row, as nn.Embedding(padding_idx=1) keeps it
    positions = torch.randn(MAX_POSITIONS + 2, DIM, generator=generator)
    positions[1] = 0
    state = {prefix + "embed_tokens.weight": embed, prefix + "embed_positions.weight": positions,
             prefix + "emb_layer_norm.weight": vector(DIM, 1.0), prefix + "emb_layer_norm.bias": vector(DIM)}
    for layer in range(layers):
        block = f"{prefix}layers.{layer}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            state[f"{block}self_attn.{name}.weight"] = matrix(DIM, DIM)
            state[f"{block}self_attn.{name}.bias"] = vector(DIM)
        state[block + "self_attn_layer_norm.weight"] = vector(DIM, 1.0)
        state[block + "self_attn_layer_norm.bias"] = vector(DIM)
        state[block + "fc1.weight"], state[block + "fc1.bias"] = matrix(FFN, DIM), vector(FFN)
        state[block + "fc2.weight"], state[block + "fc2.bias"] = matrix(DIM, FFN), vector(DIM)
        state[block + "final_layer_norm.weight"] = vector(DIM, 1.0)
        state[block + "final_layer_norm.bias"] = vector(DIM)
    state["decoder.lm_head.weight"] = embed  # tied: fairseq saves the shared Parameter under both names
    state["decoder.lm_head.bias"] = vector(vocab)
    state["decoder.lm_head.dense.weight"], state["decoder.lm_head.dense.bias"] = matrix(DIM, DIM), vector(DIM)
    state["decoder.lm_head.layer_norm.weight"] = vector(DIM, 1.0)
    state["decoder.lm_head.layer_norm.bias"] = vector(DIM)
    return state


def args_2019(layers: int = LAYERS, arch: str = "roberta_base") -> argparse.Namespace:
    """The argparse Namespace of a 2019 masked_lm run (the arguments the released file stores)."""
    return argparse.Namespace(
        arch=arch, task="masked_lm", criterion="masked_lm", encoder_layers=layers, encoder_embed_dim=DIM,
        encoder_ffn_embed_dim=FFN, encoder_attention_heads=HEADS, activation_fn="gelu",
        pooler_activation_fn="tanh", dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
        pooler_dropout=0.0, max_positions=MAX_POSITIONS, tokens_per_sample=MAX_POSITIONS,
        sample_break_mode="eos", mask_prob=0.15, leave_unmasked_prob=0.1, random_token_prob=0.1,
        encoder_layerdrop=0.0, encoder_layers_to_keep=None, lr=[1e-05], max_update=250000, seed=1,
    )


def write_2019_checkpoint(directory: Path, codes: list[str], seed: int = 0, name: str = "model.pt") -> Path:
    """A folder like the extracted bert_kmeans.tar: `model.pt` (2019 format) and `dict.txt`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_unit_dictionary(directory / "dict.txt", codes)
    vocab = 4 + len(codes) + 1  # specials, codes, <mask>
    checkpoint = {"args": args_2019(), "model": roberta_state_2019(vocab, seed),
                  "optimizer_history": [{"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam",
                                         "lr_scheduler_state": {"best": None}, "num_updates": 250000}],
                  "extra_state": {"epoch": 20, "val_loss": 3.1}, "last_optimizer_state": None}
    torch.save(checkpoint, directory / name)
    return directory / name


def to_current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under today's keys (what fairseq's upgrade_state_dict_named produces)."""
    current = {"encoder." + key[len("decoder."):].replace(".emb_layer_norm.", ".layernorm_embedding."): value
               for key, value in state.items()}
    current["encoder.sentence_encoder.version"] = torch.tensor([3.0])
    return current
