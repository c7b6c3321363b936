"""Typed configuration schemas, registered in Hydra's ConfigStore.

Group and key names follow fairseq's hydra configs (`common`, `dataset`, `optimization`,
`checkpoint`, `distributed_training`, `task`, `model`, `criterion`, `optimizer`,
`lr_scheduler`), so a fairseq wav2vec yaml translates line for line. Our own groups sit
beside them: `stage`, `cluster`, `tracker`, `decode`, `paper`. The YAML under `conf/` only
composes these schemas; every field is declared (and documented) here, so an unknown key is
an error, not a silent no-op.

Defaults are fairseq's dataclass defaults (`fairseq_spec.md` §1.1, §3.1, §5) unless a comment
says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

# Feature-extractor stacks, written as fairseq writes them (a Python list literal of tuples).
WAV2VEC2_CONV_LAYERS = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"


class ConfigError(ValueError):
    """A configuration value the run cannot use; the message names the key(s)."""


# --- value ranges ---------------------------------------------------------------------------------
# Fields declare their valid range beside their default; `check_ranges` enforces them on the
# composed config before anything runs (OmegaConf checks types only). None (= unset) always passes.


@dataclass(frozen=True)
class Range:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def _ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with `default` (a list default gets a factory) and its valid range."""
    metadata = {"range": valid}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def probability(default: Any) -> Any:
    """A rate in [0, 1] (dropout, masking probability, phase fraction)."""
    return _ranged(default, Range(0.0, 1.0))


def fraction(default: Any) -> Any:
    """In [0, 1) (Adam betas)."""
    return _ranged(default, Range(0.0, 1.0, high_open=True))


def positive(default: Any) -> Any:
    """> 0 (sizes, counts of at least one, learning rates)."""
    return _ranged(default, Range(0.0, low_open=True))


def non_negative(default: Any) -> Any:
    """>= 0 (counts that may be zero, weights)."""
    return _ranged(default, Range(0.0))


def range_violations(schema: type, node: Any, prefix: str = "") -> list[str]:
    """'key=value: must be <range>' for every value of `node` outside its field's declared range.

    Walks nested dataclass fields; list values are checked element by element.
    """
    problems = []
    hints = get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        key = f"{prefix}{spec.name}"
        if spec.name not in node or OmegaConf.is_missing(node, spec.name):
            continue
        value = node[spec.name]
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(hints[spec.name]):
            problems += range_violations(hints[spec.name], value, key + ".")
            continue
        valid = spec.metadata.get("range")
        if valid is None or value is None:
            continue
        for index, item in enumerate(value if isinstance(value, ListConfig | list) else [value]):
            if isinstance(item, int | float) and not isinstance(item, bool) and item not in valid:
                where = f"{key}[{index}]" if isinstance(value, ListConfig | list) else key
                problems.append(f"{where}={item}: must be {valid}")
    return problems


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigError listing every out-of-range value of the composed config (decodings too)."""
    problems = range_violations(ReproConfig, cfg)
    for name, setup in (cfg.get("decodings") or {}).items():  # overrides of `decode`, one per setup
        if isinstance(setup, DictConfig):
            problems += range_violations(DecodeConfig, setup, f"decodings.{name}.")
    if problems:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(problems))


@dataclass
class CommonConfig:
    seed: int= non_negative(1)
    """Global seed; masks and negatives derive theirs from it, the update count and the rank."""
    cpu: bool = False
    """Run on CPU even when a GPU is visible."""
    fp16: bool = False
    """Mixed precision with float16 and dynamic loss scaling (fairseq's FP16Optimizer semantics)."""
    bf16: bool = False
    """Mixed precision with bfloat16 (no loss scaling needed)."""
    compile: bool = False
    """torch.compile the model for training (off until measured faster on the target GPU)."""
    compile_backend: str = "inductor"
    """torch.compile backend ('inductor'; 'aot_eager' traces without generating kernels, for checks)."""
    fp16_init_scale: int= positive(128)
    """Initial loss scale for fp16 (fairseq: 2**7)."""
    fp16_scale_window: int | None= positive(None)
    """Updates without overflow before the scale doubles; None = 2**14 / world_size / update_freq."""
    min_loss_scale: float= positive(1e-4)
    """Stop training when the fp16 loss scale falls below this (persistent overflow / NaN)."""
    log_interval: int= positive(100)
    """Log training metrics every N updates."""
    log_format: str | None = None
    """'tqdm' (progress bar), 'json' (JSON lines) or None (tqdm on a terminal, json otherwise)."""


@dataclass
class CommonEvalConfig:
    path: str | None = None
    """Checkpoint to evaluate or start from (ours or a released fairseq file). `checkpoint=PATH` on
    the command line is shorthand for this key."""
    post_process: str = "letter"
    """How label units become words: 'letter' removes spaces and turns '|' into word boundaries."""
    results_path: str | None = None
    """Directory for hypo/ref files; None = `<run dir>/results`."""
    emissions_cache: str | None = None
    """Directory of cached CTC emissions (keyed by checkpoint hash); None = `<run dir>/eval/emissions`."""


@dataclass
class DatasetConfig:
    num_workers: int= non_negative(1)
    """DataLoader worker processes (the 2-core default keeps one core for the model)."""
    max_tokens: int | None= positive(1_400_000)
    """Max audio samples per GPU batch (sum over the batch of the padded/cropped length)."""
    batch_size: int | None= positive(None)
    """Max utterances per batch (None = bounded by max_tokens only)."""
    required_batch_size_multiple: int= positive(8)
    """Batch sizes are rounded down to a multiple of this when possible (fairseq batch_by_size)."""
    train_subset: str = "train"
    """Manifest split used for training (`<task.data>/<train_subset>.tsv`)."""
    valid_subset: str = "valid"
    """Comma-separated manifest splits used for validation."""
    validate_interval_updates: int= non_negative(0)
    """Validate every N updates (0 = only at the end)."""
    validate_after_updates: int= non_negative(0)
    """Do not validate before this many updates."""
    disable_validation: bool = False
    """Skip validation entirely."""
    skip_invalid_size_inputs_valid_test: bool = False
    """Drop validation/test utterances that do not fit max_tokens instead of raising."""


@dataclass
class TaskConfig:
    _name: str = "audio_pretraining"
    """'audio_pretraining' (unlabeled manifests) or 'audio_finetuning' (manifest + labels)."""
    data: str = MISSING
    """Directory holding `<split>.tsv` manifests (and `<split>.ltr`, `dict.ltr.txt` for fine-tuning)."""
    labels: str | None = None
    """Label file extension for fine-tuning ('ltr'); None for pretraining."""
    sample_rate: int= positive(16_000)
    """Expected sample rate; other rates are an error (fairseq does not resample)."""
    normalize: bool = False
    """Zero-mean unit-variance normalize each waveform (True for LARGE LV-60 / layer_norm extractors)."""
    enable_padding: bool = False
    """Pad instead of crop in pretraining batches."""
    max_sample_size: int | None= positive(None)
    """Crop longer utterances to this many samples (random offset)."""
    min_sample_size: int | None= non_negative(None)
    """Drop utterances shorter than this many samples (labels skip the same rows)."""
    eval_wer: bool = False
    """Compute WER during validation (fine-tuning)."""
    # --- masked_lm (RoBERTa on discrete units; fairseq's masked_lm task) ------------------------
    tokens_per_sample: int = 512
    """masked_lm: longest sample in tokens, <s> and </s> included (fairseq tokens_per_sample)."""
    mask_prob: float = 0.15
    """masked_lm: tokens masked per sample = mask_prob * len / mask_multiple_length span starts."""
    leave_unmasked_prob: float = 0.1
    """masked_lm: fraction of the masked positions left unchanged (still predicted)."""
    random_token_prob: float = 0.1
    """masked_lm: fraction of the masked positions replaced by a random non-special symbol."""
    mask_multiple_length: int = 1
    """masked_lm: mean span length of a mask (vq-wav2vec BERT: 10)."""
    mask_stdev: float = 0.0
    """masked_lm: standard deviation of the span length (0 = every span mask_multiple_length long)."""
    source_ext: str = "src"
    """Extension of the unit files `<split>.<source_ext>` (one utterance per line, tokenize's output)."""


@dataclass
class ModelConfig:
    """wav2vec 2.0 pretraining model (`wav2vec2`) and its CTC fine-tuning wrapper (`wav2vec_ctc`).

    One schema for both: the CTC fields are ignored by the pretraining model and, as in fairseq's
    `Wav2VecEncoder`, replace the matching fields of the pretrained config when fine-tuning.
    """

    _name: str = "wav2vec2"
    """'wav2vec2' (pretraining), 'wav2vec_ctc' (fine-tuning with a CTC head), 'roberta' / 'roberta_ctc' (units)."""
    # --- feature extractor ------------------------------------------------------------------
    extractor_mode: str = "default"
    """'default': GroupNorm on the first conv block only; 'layer_norm': LayerNorm in every block."""
    conv_feature_layers: str = WAV2VEC2_CONV_LAYERS
    """Conv blocks as a list of (channels, kernel, stride)."""
    conv_bias: bool = False
    """Bias in the feature-extractor convolutions."""
    feature_grad_mult: float= non_negative(1.0)
    """Scale of gradients into the feature extractor (0 = frozen, run under no_grad)."""
    # --- transformer ----------------------------------------------------------------------
    encoder_layers: int= positive(12)
    """Number of Transformer layers."""
    encoder_embed_dim: int= positive(768)
    """Transformer model dimension D."""
    encoder_ffn_embed_dim: int= positive(3072)
    """Feed-forward inner dimension."""
    encoder_attention_heads: int= positive(12)
    """Attention heads."""
    activation_fn: str = "gelu"
    """Feed-forward activation."""
    layer_norm_first: bool = False
    """Pre-LN Transformer (LARGE LV-60); False = post-LN (BASE, LARGE)."""
    conv_pos: int= positive(128)
    """Kernel size of the convolutional relative positional embedding."""
    conv_pos_groups: int= positive(16)
    """Groups of the positional convolution."""
    required_seq_len_multiple: int= positive(2)
    """Pad the frame sequence to a multiple of this inside the encoder (numerically neutral)."""
    # --- dropouts ---------------------------------------------------------------------------
    dropout: float= probability(0.1)
    """Dropout in the Transformer (residual branches and encoder input)."""
    attention_dropout: float= probability(0.1)
    """Dropout on attention probabilities."""
    activation_dropout: float= probability(0.0)
    """Dropout after the feed-forward activation."""
    encoder_layerdrop: float= probability(0.0)
    """LayerDrop probability (pretraining name)."""
    checkpoint_activations: bool = False
    """Recompute each Transformer layer in the backward pass instead of storing its activations (fairseq's key)."""
    dropout_input: float= probability(0.0)
    """Dropout on the projected features before masking."""
    dropout_features: float= probability(0.0)
    """Dropout on the unmasked features used as targets."""
    # --- quantizer and contrastive task ----------------------------------------------------
    final_dim: int= non_negative(0)
    """Dimension of the contrastive space (0 = encoder_embed_dim)."""
    logit_temp: float= positive(0.1)
    """Temperature kappa of the cosine logits."""
    quantize_targets: bool = False
    """Quantize the targets with the Gumbel product quantizer."""
    latent_vars: int= positive(320)
    """Codebook entries per group (V)."""
    latent_groups: int= positive(2)
    """Codebook groups (G)."""
    latent_dim: int= non_negative(0)
    """Quantized vector dimension (0 = final_dim)."""
    latent_temp: list[float] = positive([2.0, 0.5, 0.999995])
    """Gumbel temperature (start, end, decay per update)."""
    num_negatives: int= non_negative(100)
    """Distractors drawn from other masked frames of the same utterance."""
    cross_sample_negatives: int= non_negative(0)
    """Distractors drawn from any masked frame of the batch."""
    codebook_negatives: int= non_negative(0)
    """Distractors drawn from the codebook (unused by the papers)."""
    negatives_from_everywhere: bool = False
    """Draw negatives from all frames, not only masked ones (unused by the papers)."""
    # --- masking ------------------------------------------------------------------------------
    mask_length: int= positive(10)
    """Span length M of time masks."""
    mask_prob: float= probability(0.65)
    """Span-start rate times mask_length (fairseq semantics: about 49% of frames at 0.65)."""
    mask_selection: str = "static"
    """Span length distribution (only 'static' is used by the papers)."""
    mask_other: float= non_negative(0.0)
    """Secondary parameter of non-static span length distributions."""
    no_mask_overlap: bool = False
    """Forbid overlapping spans (unused by the papers)."""
    mask_min_space: int= non_negative(1)
    """Minimum space between spans when no_mask_overlap."""
    require_same_masks: bool = True
    """Cut every row down to the batch minimum number of masked frames."""
    mask_dropout: float= probability(0.0)
    """Fraction of masked frames un-masked again at random."""
    mask_channel_length: int= positive(10)
    """Span length of channel masks."""
    mask_channel_prob: float= probability(0.0)
    """Channel-mask span-start rate times mask_channel_length."""
    mask_channel_before: bool = False
    """Apply the channel mask before the time mask."""
    mask_channel_selection: str = "static"
    """Channel-mask span length distribution."""
    mask_channel_other: float= non_negative(0.0)
    """Secondary parameter of the channel-mask distribution."""
    no_mask_channel_overlap: bool = False
    """Forbid overlapping channel spans."""
    # --- CTC fine-tuning (wav2vec_ctc) ----------------------------------------------------------
    w2v_path: str | None = None
    """Pretrained checkpoint (ours or fairseq's) whose encoder the CTC model starts from."""
    no_pretrained_weights: bool = False
    """Start the CTC encoder from random weights (the 'no pretraining' baseline)."""
    apply_mask: bool = False
    """Apply time/channel masks while fine-tuning (SpecAugment-like)."""
    final_dropout: float= probability(0.0)
    """Dropout before the CTC projection."""
    layerdrop: float= probability(0.0)
    """LayerDrop while fine-tuning (replaces encoder_layerdrop of the pretrained config)."""
    freeze_finetune_updates: int= non_negative(0)
    """Only the CTC projection trains for this many updates."""
    normalize: bool | None = None
    """Waveform normalization of the pretrained model (None = take task.normalize)."""
    # --- RoBERTa on discrete units (roberta, roberta_ctc) ---------------------------------------
    max_positions: int = 512
    """RoBERTa: learned positional embeddings, tokens per sequence including <s> and </s>."""


# The 2019 wav2vec stacks (Schneider et al. §2; fairseq examples/wav2vec/README.md).
WAV2VEC_CONV_LAYERS_2019 = "[(512, 10, 5)] + [(512, 8, 4)] + [(512, 4, 2)] * 3"
WAV2VEC_AGGREGATOR_LAYERS_2019 = "[(512, 3, 1)] * 9"


@dataclass
class Wav2VecConfig(ModelConfig):
    """wav2vec (Schneider et al. 2019) and vq-wav2vec (Baevski et al. 2019): fairseq arch `wav2vec`.

    Defaults are those of the 2019 code that trained the released files (fairseq 3335de5f,
    `base_wav2vec_architecture`), not today's `Wav2VecConfig`, which turned `skip_connections_agg` and
    `log_compression` on, `num_negatives` to 10 and lengthened both conv stacks; the experiment rows
    set every README value explicitly. Only the fields declared here belong to the model
    (`WAV2VEC_FIELDS`); it subclasses ModelConfig solely because OmegaConf merges only a subclass into
    the typed `model` node, and the inherited wav2vec 2.0 fields are ignored.
    """

    _name: str = "wav2vec"
    """Always 'wav2vec' (wav2vec and vq-wav2vec share fairseq's arch)."""
    prediction_steps: int = 12
    """Number of future frames predicted (one ConvTranspose2d output per step)."""
    sample_distance: int | None = None
    """Negatives only from the first `sample_distance` frames (unsupported: only None)."""
    cross_sample_negatives: int = 0
    """Negatives from other utterances of the batch (unsupported: only 0, as every release)."""
    num_negatives: int = 1
    """Negatives per prediction, drawn from the same utterance (README commands: 10)."""
    conv_feature_layers: str = WAV2VEC_CONV_LAYERS_2019
    """Feature-extractor conv blocks (channels, kernel, stride)."""
    conv_aggregator_layers: str = WAV2VEC_AGGREGATOR_LAYERS_2019
    """Context-network conv blocks (channels, kernel, stride=1), causally padded."""
    dropout: float = 0.0
    """Dropout inside the aggregator blocks and on the step predictions."""
    dropout_features: float = 0.0
    """Dropout on the features before the aggregator."""
    dropout_agg: float = 0.0
    """Dropout on the aggregator output."""
    aggregator: str = "cnn"
    """'cnn' (the GRU variant is not built: no released file uses it)."""
    gru_dim: int = 512
    """GRU aggregator width (unused: aggregator must be 'cnn')."""
    no_conv_bias: bool = False
    """No bias in the aggregator convolutions."""
    agg_zero_pad: bool = False
    """Pad the aggregator with zeros instead of replicating the first frame."""
    skip_connections_feat: bool = False
    """Residual connections in the feature extractor (where channels match)."""
    skip_connections_agg: bool = False
    """Residual connections in the aggregator (README commands: on)."""
    residual_scale: float = 0.5
    """Residual sums are scaled by sqrt(residual_scale)."""
    log_compression: bool = False
    """log(|z| + 1) on the features (wav2vec_large: on; vq-wav2vec: off, the README command omits it)."""
    balanced_classes: bool = False
    """Weight negatives 1/num_negatives in the BCE loss."""
    project_features: str = "none"
    """Targets through the aggregator: 'none', 'same' (shared) or 'new' (a second aggregator)."""
    non_affine_group_norm: bool = False
    """GroupNorm without learned scale and shift."""
    offset: str = "auto"
    """Frames between a context frame and its first target; 'auto' = ceil(receptive field / stride)."""
    activation: str = "relu"
    """'relu' (wav2vec) or 'gelu' (vq-wav2vec README)."""
    vq_type: str = "none"
    """'none' (wav2vec), 'gumbel' or 'kmeans' (vq-wav2vec)."""
    vq_vars: int = 320
    """Code vectors per group."""
    vq_groups: int = 2
    """Groups of code vectors (one index per group and frame)."""
    vq_dim: int = 0
    """Quantized vector dimension; 0 = the feature dimension."""
    vq_depth: int = 1
    """Layers of the Gumbel logit projection (README: 2)."""
    combine_groups: bool = False
    """Groups share one set of code vectors (README: on)."""
    vq_temp: list[float] = field(default_factory=lambda: [2.0, 0.5, 0.999995])
    """Gumbel temperature (start, end, decay per update): max(start * decay**update, end)."""
    vq_gamma: float = 0.25
    """k-means commitment weight: kmeans_loss = MSE(zq, sg(ze)) + gamma * MSE(ze, sg(zq))."""
    negatives_as_fairseq: bool = True
    """Ours: sample negatives as fairseq's code does (its exclusion of the positive is misaligned, so about
    1/T of them equal the positive; the released models were trained so). False = the intended sampling."""


WAV2VEC_FIELDS = tuple(name for name in Wav2VecConfig.__annotations__)
"""The fields of the wav2vec / vq-wav2vec model (what its checkpoints store)."""


def stored_model_config(model_cfg: Any) -> dict[str, Any]:
    """The model config a checkpoint stores: every ModelConfig field, or only the WAV2VEC_FIELDS of a
    Wav2VecConfig (its inherited wav2vec 2.0 fields are not part of the model)."""
    import dataclasses

    values = dataclasses.asdict(model_cfg)
    if isinstance(model_cfg, Wav2VecConfig):
        return {name: values[name] for name in WAV2VEC_FIELDS}
    return values


@dataclass
class CriterionConfig:
    _name: str = "wav2vec"
    """'wav2vec' (contrastive), 'ctc' or 'masked_lm' (RoBERTa on units)."""
    infonce: bool = True
    """Cross-entropy over (positive, distractors) instead of binary cross-entropy (wav2vec v1)."""
    loss_weights: list[float] | None= non_negative(None)
    """Weights of the extra losses: [diversity, feature penalty]."""
    log_keys: list[str] = field(default_factory=lambda: ["prob_perplexity", "code_perplexity", "temp"])
    """Model outputs copied into the logged metrics."""
    zero_infinity: bool = True
    """CTC: zero infinite losses (utterances shorter than their label)."""
    post_process: str = "letter"
    """CTC: label post-processing for WER during validation."""


@dataclass
class OptimizationConfig:
    max_update: int= non_negative(0)
    """Stop after this many updates (0 = no limit)."""
    max_epoch: int= non_negative(0)
    """Stop after this many epochs (0 = no limit)."""
    lr: list[float] = positive([0.0005])
    """Peak learning rate (a list, as fairseq stores it)."""
    update_freq: list[int] = positive([1])
    """Gradient accumulation steps per update."""
    clip_norm: float= non_negative(0.0)
    """Gradient-norm clipping threshold (0 = off, fairseq's default)."""
    sentence_avg: bool = False
    """Normalize the loss per utterance instead of per token (CTC recipes: True)."""
    stop_min_lr: float = -1.0
    """Stop when the learning rate falls below this (wav2vec v1's min_lr)."""


@dataclass
class OptimizerConfig:
    _name: str = "adam"
    """Optimizer; only fairseq's Adam (decoupled weight decay) is used by the papers."""
    adam_betas: list[float] = fraction([0.9, 0.98])
    """Adam (beta1, beta2)."""
    adam_eps: float= non_negative(1e-6)
    """Adam epsilon, added to sqrt(v) before bias correction (fairseq)."""
    weight_decay: float= non_negative(0.01)
    """Decoupled weight decay applied to every parameter."""
    foreach: bool | None = None
    """Multi-tensor (torch._foreach_*) Adam update, same arithmetic as the loop; None = on CUDA only (faster there, not on CPU)."""


@dataclass
class LrSchedulerConfig:
    _name: str = "polynomial_decay"
    """'polynomial_decay', 'tri_stage', 'cosine' or 'fixed'."""
    warmup_updates: int= non_negative(32_000)
    """Linear warmup updates (polynomial_decay, cosine)."""
    end_learning_rate: float= non_negative(0.0)
    """polynomial_decay: learning rate at total_num_update."""
    power: float= positive(1.0)
    """polynomial_decay: decay exponent."""
    total_num_update: int | None= positive(None)
    """polynomial_decay: updates to reach end_learning_rate (None = optimization.max_update)."""
    phase_ratio: list[float] | None= probability([0.1, 0.4, 0.5])
    """tri_stage: warmup / hold / decay fractions of max_update."""
    init_lr_scale: float= non_negative(0.01)
    """tri_stage: initial learning rate as a fraction of the peak."""
    final_lr_scale: float= non_negative(0.05)
    """tri_stage: final learning rate as a fraction of the peak."""
    warmup_init_lr: float = 1e-7
    """cosine: learning rate at update 0."""
    min_lr: float= non_negative(1e-6)
    """cosine: floor of the cosine."""
    lr_period_updates: int | None= positive(None)
    """cosine: period (None = max_update - warmup_updates)."""
    lr_shrink: float= positive(0.1)
    """cosine: factor applied to the amplitude after each period."""


@dataclass
class CheckpointConfig:
    save_dir: str = "checkpoints"
    """Directory (relative to the run directory) for checkpoints."""
    save_interval_updates: int= non_negative(0)
    """Save an interval checkpoint every N updates (0 = only last/best at validation)."""
    keep_interval_updates: int = 3
    """Keep the last k interval checkpoints (-1 = all)."""
    best_checkpoint_metric: str = "loss"
    """Validation metric that selects checkpoint_best ('wer' for fine-tuning)."""
    maximize_best_checkpoint_metric: bool = False
    """Higher is better for best_checkpoint_metric."""
    no_save: bool = False
    """Never write checkpoints."""
    save_optimizer_state: bool = True
    """Include the optimizer state (needed for exact resume)."""
    # Resuming under a changed config (repro/train/resume.py): fairseq's reset flags say which
    # training state to drop, and thereby which changes are accepted; without them a change refuses.
    reset_optimizer: bool = False
    """Resume without the optimizer and loss-scaler state (accepts optimizer / clip_norm / fp16 changes)."""
    reset_lr_scheduler: bool = False
    """Resume without the lr-scheduler state (accepts lr / lr_scheduler / schedule-length changes)."""
    reset_dataloader: bool = False
    """Resume at epoch 1 of the data order (accepts batching, data and update_freq changes)."""
    reset_meters: bool = False
    """Resume without the best metric and wall time (accepts a new best_checkpoint_metric / valid_subset)."""


@dataclass
class DistributedTrainingConfig:
    distributed_world_size: int= positive(1)
    """Number of processes (GPUs) training together."""
    distributed_backend: str | None = None
    """'nccl' or 'gloo' (None = nccl on GPU, gloo on CPU)."""
    paper_world_size: int | None= positive(None)
    """GPUs of the original run; update_freq is scaled so that the effective batch is the paper's."""


@dataclass
class ClusterConfig:
    name: str = "local"
    """'local' or 'slurm'."""
    partition: str | None = None
    """SLURM partition (env SLURM_PARTITION when unset)."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM quality of service."""
    constraint: str | None = None
    """SLURM node constraint (e.g. 'volta32gb')."""
    timeout_min: int= positive(4320)
    """Job time limit in minutes; the job checkpoints and requeues before it."""
    nodes: int= positive(1)
    """Nodes per job."""
    gpus_per_node: int= non_negative(0)
    """GPUs per node (one task per GPU)."""
    cpus_per_task: int= positive(2)
    """CPUs per task."""
    mem_gb: int | None= positive(None)
    """Memory per node in GB."""
    gpu_type: str | None = None
    """Informational GPU type for compute accounting ('V100', 'A100', 'H100')."""
    max_num_timeout: int= non_negative(20)
    """How many times a preempted or timed-out job is requeued."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """MLflow store or server; None = sqlite:///<runs root>/mlflow.db (embedded, nothing to start)."""
    experiment_name: str | None = None
    """MLflow experiment; None = the paper table of the experiment row."""
    log_checkpoints: bool = False
    """Upload checkpoints as artifacts."""


@dataclass
class WandbConfig:
    project: str = "repro"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    mode: str = "offline"
    """'offline' (no account needed; `wandb sync` later) or 'online'."""


@dataclass
class TrackerConfig:
    backends: list[str] = field(default_factory=lambda: ["mlflow"])
    """Trackers besides the always-on JSONL log: any of 'mlflow', 'wandb'."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """MLflow settings."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B settings."""


@dataclass
class DecodeConfig:
    type: str = "viterbi"
    """'viterbi', 'kenlm' (lexicon beam + n-gram) or 'fairseqlm' (lexicon beam + Transformer LM)."""
    name: str | None = None
    """Label of this decoding setup in metrics and reports (None = type)."""
    lm_model: str | None = None
    """KenLM model (.arpa/.bin) or Transformer LM checkpoint."""
    lexicon: str | None = None
    """Lexicon file: `WORD<TAB>W O R D |`."""
    lm_weight: float = 2.0
    """LM weight."""
    word_score: float = -1.0
    """Word insertion score."""
    sil_weight: float = 0.0
    """Silence insertion score."""
    unk_weight: float = float("-inf")
    """Unknown-word score."""
    beam: int= positive(500)
    """Beam size."""
    beam_threshold: float= non_negative(25.0)
    """Prune hypotheses scoring this much below the best."""
    beam_size_token: int= positive(100)
    """Tokens considered per frame."""
    nbest: int= positive(1)
    """Hypotheses returned."""


@dataclass
class PaperConfig:
    rows: list[str] = field(default_factory=list)
    """Row ids in paper_results.csv this experiment reproduces."""
    table: str | None = None
    """Paper table the rows belong to (the MLflow experiment name)."""
    gpus: int | None = None
    """GPUs of the original run."""
    gpu_type: str | None = None
    """GPU type of the original run."""
    hours: float | None = None
    """Wall-clock hours of the original run."""
    compute_source: str | None = None
    """Where gpus / hours come from ('paper §4.2', 'author survey', ...); None = not given anywhere."""
    world_size_source: str | None = None
    """Where distributed_training.paper_world_size comes from ('paper §4.3', 'fairseq vox_10m.yaml: 4 x 5')."""
    recipe: str = "paper"
    """Whose values the row runs: 'paper' (the paper's text, fairseq's yaml only where the paper is silent)
    or 'fairseq' (fairseq's own yamls; `recipe=fairseq`)."""
    decoding: list[str] = field(default_factory=list)
    """Decoding setups evaluated for the rows: 'viterbi', 'kenlm_4gram', 'transformer'."""
    eval_splits: list[str] = field(default_factory=lambda: ["dev_clean", "dev_other", "test_clean", "test_other"])
    """Splits evaluated."""
    synthetic: bool = False
    """Rows measured on the synthetic corpus, never mixed with LibriSpeech numbers."""
    model_label: str | None = None
    """Model column of the report ('BASE', 'LARGE', 'tiny'); None = model._name."""
    pretrain_data: str | None = None
    """Unlabeled data column of the report ('LS-960', 'LV-60k', 'synthetic')."""
    labeled_data: str | None = None
    """Labeled data column of the report ('10m', '1h', '10h', '100h', '960h')."""


@dataclass
class PlanConfig:
    """The cost planner of `dry_run=true` (repro.launch.cost)."""

    measure: bool = False
    """Time a few real training steps of the row's model at its per-GPU batch on this machine."""
    gpus: list[int] = field(default_factory=list)
    """GPU counts to tabulate (`plan.gpus=8,16,32`); empty = the cluster's world size."""
    steps: int = 3
    """Timed training steps (after one untimed warm-up step); the fastest is used."""
    usd_per_gpu_hour: float | None = None
    """Price of one GPU-hour for the cost column; None prints no cost."""


@dataclass
class SelfTrainingConfig:
    """Self-training (Xu et al. 2021, arXiv 2010.11430): pseudo-label unlabeled audio, then re-fine-tune.

    Stage `pseudo_label` decodes `unlabeled_data` with a fine-tuned CTC model and an LM and writes
    fairseq `.tsv` / `.ltr` / `.wrd` files plus the combined labeled + pseudo-labeled training split,
    which stage `finetune` then trains on (the paper's "ctc ft" model, §2.3).
    """

    unlabeled_data: str | None = None
    """Manifest (.tsv) of the audio to pseudo-label (Xu et al. §3.1: LV-60k or LS-960); None = not a self-training run."""
    labeling_checkpoint: str | None = None
    """Fine-tuned CTC model that labels (Xu et al. §2.3: the pretrained model fine-tuned on the labeled split)."""
    labeling_decoding: str = "kenlm_4gram"
    """Entry of `decodings` that labels (Xu et al. §3.3: lexicon beam search with the 4-gram LM)."""
    labeling_decode: dict[str, Any] = field(default_factory=dict)
    """Overrides of that entry for labelling only (e.g. a smaller beam for speed)."""
    output_dir: str | None = None
    """Where the pseudo-labels and the combined split are written; None = `<run dir>/pseudo_labels`."""
    name: str = "pseudo"
    """Base name of the pseudo-label files: `<name>.tsv`, `<name>.ltr`, `<name>.wrd`, `<name>.scores.tsv`."""
    combined_subset: str = "train_st"
    """Name of the labeled + pseudo-labeled training split that `finetune` trains on."""
    include_labeled: bool = True
    """Add the labeled split (`dataset.train_subset`) to the pseudo-labels (Xu et al. §2.3); false = pseudo-labels only."""
    num_shards: int = positive(1)
    """Shards of the unlabeled manifest; each is labelled by one job (SLURM array task) or local process."""
    workers: int = positive(1)
    """Local processes labelling shards at once (cluster=local)."""
    max_retries: int = non_negative(2)
    """How many times a failed shard is re-run alone before the stage gives up."""
    shard_gpus: int = non_negative(1)
    """GPUs per SLURM array task (emissions run on the GPU, the beam search on the task's CPUs)."""
    array_parallelism: int = positive(64)
    """At most this many array tasks run at once on SLURM."""
    min_score_per_frame: float | None = None
    """Drop pseudo-labels whose decoder score per emission frame is lower; None = keep all (Xu et al. do not filter, §2.2)."""
    length_ratio: list[float] | None = None
    """[min, max] letters per second of audio a pseudo-label must have; None = no length filter (Xu et al. §2.2)."""
    drop_empty: bool = False
    """Drop utterances whose pseudo-label has no word (off: the paper keeps every label)."""
    rescore_decoding: str | None = None
    """Entry of `decodings` (a `fairseqlm` one) whose Transformer LM rescores the labelling beam's n-best, weighted
    by its lm_weight / word_score (Xu et al. v1 §2.2: 50 best rescored with the Transformer LM); None = the beam's best."""
    rescore_nbest: int = positive(50)
    """Distinct transcriptions of the labelling beam that are rescored (Xu et al. v1: 50; 4x as many beam results are read)."""
    rescore_ngram_weight: float | None = None
    """Weight of the beam's 4-gram score in the rescored total; None = the labelling beam's lm_weight."""
    wait: bool = False
    """cluster=slurm: wait here for the shard array, retry failed shards and merge here; false = submit the array
    and a merge job that depends on it, and return."""


@dataclass
class DemoSizeConfig:
    """A larger demo for a CUDA machine (`demo.auto_size`): replaces the CPU sizes of `demo`."""

    corpus_dir: str = "data/synthetic-cuda"
    """Corpus directory of this size (a corpus of another size cannot share a directory)."""
    corpus_hours: float = positive(4.0)
    """Total hours of synthetic speech over all splits."""
    pretrain_updates: int = positive(4000)
    """Pretraining updates."""
    finetune_updates: dict[str, int] = field(default_factory=lambda: {"10m": 1000, "1h": 1600, "10h": 2000})
    """Fine-tuning updates per labeled split."""
    model_overrides: list[str] = field(default_factory=list)
    """Hydra overrides applied to the pretraining and fine-tuning runs (e.g. `model.encoder_layers=6`)."""


@dataclass
class SelectionConfig:
    """How a fine-tuning row picks its run (wav2vec 2.0 §4.3): one run, or a learning-rate x seed grid
    whose winner is the lowest `split` WER under the fixed selection `decoding`."""

    type: str = "none"
    """'grid' (the paper's procedure for the Libri-light splits) or 'none' (one run at optimization.lr)."""
    lrs: list[float] = field(default_factory=lambda: [2e-5, 3e-5])
    """Peak learning rates of the grid (§4.3: 2e-5 and 3e-5)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds of the grid (§4.3: three; the paper does not give their values)."""
    split: str = "dev_other"
    """Split whose WER selects the winner (§4.3: dev-other)."""
    decoding: DecodeConfig = field(default_factory=lambda: DecodeConfig(
        type="kenlm", name="selection", beam=50, lm_weight=2.0, word_score=-1.0))
    """Decoding that scores the grid (§4.3: official 4-gram, beam 50, LM weight 2, word insertion -1)."""


@dataclass
class DemoConfig:
    """The miniature end-to-end reproduction of `make demo` (stage `demo`)."""

    corpus_dir: str = "data/synthetic"
    """Where the synthetic corpus is written (reused when it already exists with the same size/seed)."""
    corpus_hours: float= positive(1.0)
    """Total hours of synthetic speech over all splits."""
    corpus_seed: int= non_negative(0)
    """Seed of the synthetic corpus (same seed, same bytes)."""
    pretrain_updates: int= positive(1000)
    """Pretraining updates of the tiny model."""
    finetune_updates: dict[str, int] = field(default_factory=lambda: {"10m": 500, "1h": 800, "10h": 1500})
    """Fine-tuning updates per labeled split (`{10m: 500, ...}`): fewer labels overfit sooner."""
    splits: list[str] = field(default_factory=lambda: ["10m", "1h", "10h"])
    """Labeled splits fine-tuned (Libri-light analogues)."""
    from_scratch: bool = True
    """Also fine-tune each split from a randomly initialised encoder (what pretraining buys)."""
    decodings: list[str] = field(default_factory=lambda: ["viterbi", "kenlm_4gram"])
    """Decoding setups evaluated on every dev/test split."""
    self_training_split: str | None = "10m"
    """Self-training step (Xu et al., `experiment=demo_st`): this split's pretrained model labels the unlabeled
    pool, and the pretrained encoder is fine-tuned again on the split + pseudo-labels; null skips it."""
    report_dir: str = "reports/demo"
    """Where the report is written."""
    threads: int = positive(1)
    """torch threads of every step (1: shares a 2-core machine with another job without collapsing)."""
    processes: int = positive(2)
    """Steps run side by side, each in its own process (capped at the CPU count; 1 = one after another
    in the demo's process). From-scratch fine-tuning runs beside the pretraining."""
    low_memory: bool = False
    """Serve allocations of 1 MiB and more with mmap: about half the peak RSS of a step (1.2 vs 2.4 GB for the
    pretraining) for about 40% more time per update (a page fault per large tensor)."""
    auto_size: bool = True
    """On a CUDA machine, run the `cuda` size instead of the CPU one."""
    cuda: DemoSizeConfig = field(default_factory=DemoSizeConfig)
    """The size run on a CUDA machine when `auto_size` is on."""


@dataclass
class ReproConfig:
    """The whole composed configuration of one run."""

    experiment: str = "none"
    """Name of the experiment row (set by the experiment file)."""
    stage: str | None = None
    """Run only this stage; None = the experiment's `stages` in order."""
    stages: list[str] = field(default_factory=lambda: ["pretrain"])
    """Default stage list: pretrain, finetune, evaluate, pseudo_label, st_compare, featurize, tokenize, demo."""
    dry_run: bool = False
    """Print what would run (sbatch parameters, world size, update_freq, config) and exit."""
    sweep_objective: str | None = None
    """For Bayesian sweeps: the value to minimise in the last stage's result, e.g. 'dev_other/lm_sweep/wer'."""
    common: CommonConfig = field(default_factory=CommonConfig)
    common_eval: CommonEvalConfig = field(default_factory=CommonEvalConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed_training: DistributedTrainingConfig = field(default_factory=DistributedTrainingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    decodings: dict[str, Any] = field(default_factory=dict)
    """Named decoding setups (overrides of `decode`) evaluated by stage=evaluate."""
    paper: PaperConfig = field(default_factory=PaperConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)


CONF_DIR = Path(__file__).resolve().parent / "conf"
"""Hydra's config tree: `repro/conf` links to the repository's `conf/` and ships inside the wheel."""


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` and every group file are validated against it."""
    cs = ConfigStore.instance()
    cs.store(name="repro_schema", node=ReproConfig)
    # conf/model/<wav2vec row>.yaml lists `wav2vec_schema` in its defaults, so its `model` node is a
    # Wav2VecConfig (the wav2vec / vq-wav2vec fields and their 2019 defaults), not a ModelConfig.
    cs.store(group="model", name="wav2vec_schema", node=Wav2VecConfig)


STAGES = ("pretrain", "finetune", "evaluate", "pseudo_label", "st_compare", "featurize", "tokenize", "demo")

# Preemption hand-off between repro.launch (writes the request on SLURM's warning signal), repro.train
# (saves checkpoint_last at the current update and exits) and the run bookkeeping (records "preempted").
STOP_REQUEST_FILE = "STOP_REQUESTED"
"""File in the run directory that asks the trainer to save and stop."""
PREEMPTED_EXIT_CODE = 75
"""Exit status of a trainer that saved on request (EX_TEMPFAIL: resumable, requeue me)."""
