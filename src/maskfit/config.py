"""Run configuration: typed dataclasses, one per concern, loaded from JSON or TOML and saved with each run.

A config file holds sections named after the fields of :class:`RunConfig` (``[model]``, ``[data]``, ...).
Unknown keys are errors that name the key and list the known ones: a typo never falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union, get_args, get_origin, get_type_hints


@dataclass
class ModelSection:
    preset: str = "FiT-B/2"  # a name from `maskfit models`
    overrides: dict = field(default_factory=dict)  # ModelConfig fields to change, e.g. {"in_channels": 3}
    attention: str = "dense"  # "dense" | "varlen" | "flex" (models/attention.py)

    def __post_init__(self):
        from maskfit.models.transformer import ModelConfig

        hints = get_type_hints(ModelConfig)
        # Set from other sections by the trainer, which would overwrite an override here without a word.
        owned = {"attention": "model.attention", "mask_design": "mask.design", **{
            k: f"mask.{k}" for k in ("decoder_depth", "decoder_hidden", "decoder_heads", "decoder_pos_embed",
                                     "mixer_depth", "side_decode_depth")}}
        for key, value in self.overrides.items():
            if key in owned:
                raise ValueError(f"model.overrides.{key}={value!r} is set from {owned[key]}; set {owned[key]} instead")
            if key not in hints:
                raise ValueError(
                    f"unknown model override {key!r} (model.overrides.{key}); ModelConfig fields: {', '.join(sorted(hints))}"
                )
            self.overrides[key] = _typed(f"model.overrides.{key}", value, hints[key])


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" | "folder" | "latents" (a cache made by `maskfit prepare`)
    root: str = ""  # image folder (ImageNet layout) or latent-cache folder
    num_images: int = 2048  # synthetic set size
    num_classes: int = 8  # synthetic classes
    token_budget: int = 256  # max tokens per image: H*W/(f*p)^2 <= budget, aspect ratio kept (FiT)
    random_aspect_crop: bool = False  # for square-only sets (e.g. Imagenette): random crops of ratio 1:3..3:1
    # "flexible" (FiT): resize to the budget, never crop | "mixed" (FiTv2 §IV-C, Alg. 1): an image with both
    # sides above the square side sqrt(token_budget) x patch px is its resize or its centre crop, 50/50 per sample
    preprocess: str = "flexible"
    hflip: bool = True
    autoencoder: str = "sd-vae"  # "sd-vae" (sd-vae-ft-ema from vae_path) | "identity" (pixel space)
    vae_path: str = ""  # local folder of stabilityai/sd-vae-ft-ema (no hub access)
    layout: str = "padded"  # "padded" (FiT) | "packed" (no padding)
    num_workers: int = 0
    # What is constant per step: "images" = train.batch_size images (FiT) | "tokens" = tokens_per_step
    # backbone tokens (the kept tokens when masking), as many whole images as fit plus padding segments
    # (each at most token_budget long), so every step has the same shape (NaViT packing; needs layout="packed").
    batching: str = "images"
    tokens_per_step: int = 0  # batching="tokens": backbone tokens per step (e.g. 16 x token_budget)
    max_images_per_step: Optional[int] = None  # batching="tokens": cap on images per step (static segment count)
    # Our own held-out split of an image folder (maskfit.data.split: a fixed fraction of each class, chosen
    # by a hash of the file name): "all" | "train" (never the held-out files) | "holdout"
    split: str = "all"
    holdout_fraction: float = 0.1
    # Image folders only: decode every image once into memory before the workers start; bit-identical items,
    # faster workers; ~50 KiB per 128-px image (limit: datasets.DECODE_ONCE_MAX_BYTES)
    decode_once: bool = False

    def __post_init__(self):
        _check_choice("data.source", self.source, ("synthetic", "folder", "latents"))
        self._check_split()
        _check_choice("data.autoencoder", self.autoencoder, ("sd-vae", "identity"))
        _check_choice("data.layout", self.layout, ("padded", "packed"))
        _check_choice("data.batching", self.batching, ("images", "tokens"))
        from maskfit.data.resize import PREPROCESS_MODES

        _check_choice("data.preprocess", self.preprocess, PREPROCESS_MODES)
        if self.token_budget < 1:
            raise ValueError(f"data.token_budget={self.token_budget}; it must hold at least one patch token")
        if self.decode_once and self.source != "folder":
            raise ValueError(
                f"data.decode_once=true decodes an image folder (data.source='folder'), not data.source="
                f"{self.source!r}: there are no image files to decode; set data.decode_once=false"
            )
        if self.batching == "tokens":
            self._check_token_batching()
        elif self.max_images_per_step is not None:
            raise ValueError(
                f"data.max_images_per_step={self.max_images_per_step} only applies to data.batching='tokens'; "
                f"with batching='images' every step has train.batch_size images: remove max_images_per_step"
            )

    def _check_split(self) -> None:
        from maskfit.data.split import SPLITS

        _check_choice("data.split", self.split, SPLITS)
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"data.holdout_fraction={self.holdout_fraction} must lie in (0, 1), e.g. 0.1")
        if self.split != "all" and self.source != "folder":
            raise ValueError(
                f"data.split={self.split!r} splits an image folder (data.source='folder'), not data.source="
                f"{self.source!r}; a latent cache made by `maskfit prepare` from a config with data.split='train' "
                "already holds only the training split: set data.split='all' here"
            )

    def _check_token_batching(self) -> None:
        if self.tokens_per_step < 1:
            raise ValueError(
                f"data.batching='tokens' needs data.tokens_per_step > 0 (got {self.tokens_per_step}): set the "
                f"backbone tokens per step, e.g. {16 * self.token_budget} (16 images of the full token budget)"
            )
        if self.layout != "packed":
            raise ValueError(
                f"data.batching='tokens' packs whole images into one stream with no per-image padding; it needs "
                f"data.layout='packed' (got {self.layout!r})"
            )
        if self.tokens_per_step < self.token_budget:
            raise ValueError(
                f"data.tokens_per_step={self.tokens_per_step} is below data.token_budget={self.token_budget}: an "
                f"image of the full budget would not fit in one step; raise tokens_per_step to at least "
                f"{self.token_budget} (e.g. {16 * self.token_budget})"
            )
        if self.max_images_per_step is not None and self.max_images_per_step < 1:
            raise ValueError(
                f"data.max_images_per_step={self.max_images_per_step} must be at least 1 (or null for no cap)"
            )


@dataclass
class DiffusionConfig:
    objective: str = "ddpm"  # "ddpm" (FiT v1: eps + learned sigma) | "flow" (FiTv2: rectified flow, velocity)
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    t_sampling: str = "logit_normal"  # flow only: "logit_normal" | "uniform"
    label_dropout: float = 0.1  # classifier-free guidance training (Ho & Salimans 2022)

    def __post_init__(self):
        _check_choice("diffusion.objective", self.objective, ("ddpm", "flow"))
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"diffusion.label_dropout={self.label_dropout}; use a probability in [0, 1)")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # FiT: constant 1e-4 at batch 256, AdamW, no weight decay
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear warm-up (FiTv2 paper: 5000 steps)
    ema_decay: float = 0.9999
    # EMA warm-up for short runs: decay min(ema_decay, (1 + step) / (10 + step)) (maskfit.train.ema_decay_at)
    ema_warmup: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"optim.lr={self.lr}; a learning rate is a finite number >= 0 (FiT: 1e-4)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}; AdamW takes two numbers in [0, 1), e.g. [0.9, 0.999]")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"optim.eps={self.eps}; use a small positive number, e.g. 1e-8")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optim.weight_decay={self.weight_decay}; use a number >= 0 (FiT: 0)")
        if not self.grad_clip > 0:  # inf is fine: no clipping
            raise ValueError(
                f"optim.grad_clip={self.grad_clip}; it is the largest gradient norm kept, so it must be > 0 (FiT: 1.0): "
                "0 zeroes every gradient and a negative one reverses it (gradient ascent); for no clipping use e.g. 1e9"
            )
        if not 0.0 <= self.ema_decay <= 1.0:  # NaN fails too
            raise ValueError(
                f"optim.ema_decay={self.ema_decay}; the EMA keeps this fraction of its weights per step: use a number in "
                "[0, 1] (FiT: 0.9999; 0 copies the model)"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}; use 0 (no warm-up) or a positive step count")


@dataclass
class MaskSection:
    """Masked training: the backbone sees a subset of each image's tokens (maskfit.masking has the details).

    keep_ratio 1 and no keep_count = no masking (the FiT baseline, or packed training without padding).
    """

    strategy: str = "uniform"  # "uniform" | "block" | "crop" | "strided"
    keep_ratio: float = 1.0  # mean fraction of each image's tokens the backbone sees
    keep_count: Optional[int] = None  # constant kept count K per image (equal lengths) instead of a ratio
    ratio_distribution: str = "constant"  # "constant" | "beta" (per image, NaViT)
    resolution_dependent: bool = False  # larger images drop a larger fraction (NaViT)
    min_keep: int = 1
    block_size: int = 4  # "block" strategy cell side, in tokens
    schedule: str = "constant"  # "constant" | "linear" | "cosine": masking decays over train.steps
    final_unmasked_steps: int = 0  # unmasked fine-tune: the last steps keep every token
    unmasked_every: int = 0  # every N-th step keeps every token, throughout training (0: never; a diagnostic)
    # Model design for masking (ModelConfig.mask_design): "plain" | "decoder" | "mixer" | "side_interp"
    design: str = "plain"
    # MaskDiT's decoder is 8 blocks x 512 (16 heads) behind a 28 x 1152 encoder (DiT-XL): per token it
    # costs ~5.6 % of the encoder. Scaled to a 12 x 768 backbone that is 1.5 blocks of 512; we default to
    # 1 block with head dim 64 (FlashAttention's efficient size). Set XL's 8 x 512 x 16 explicitly.
    decoder_depth: int = 1
    decoder_hidden: int = 512
    decoder_heads: int = 8
    decoder_pos_embed: bool = False  # MaskDiT's fixed 2D sin-cos embedding added to the decoder's input
    mixer_depth: int = 2
    side_decode_depth: int = 2
    aux_loss_weight: float = 0.1  # weight of the loss on dropped tokens for full-grid designs (MaskDiT: 0.1)
    # DDPM target on those dropped tokens: "noisy_input" (x_t, MaskDiT) | "x0". Flow keeps its velocity
    # target there (maskfit.objective says why each is sound).
    aux_target: str = "noisy_input"

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"mask.keep_ratio={self.keep_ratio} is outside (0, 1]; 1 keeps every token")
        if self.keep_count is not None and self.keep_count < 1:
            raise ValueError(f"mask.keep_count={self.keep_count} must be a positive number of tokens")
        if self.keep_count is not None and self.keep_ratio != 1.0:
            raise ValueError(
                f"mask.keep_count={self.keep_count} and mask.keep_ratio={self.keep_ratio} are both set; the kept "
                "count replaces the ratio: remove one of them"
            )
        if self.aux_loss_weight < 0:
            raise ValueError(f"mask.aux_loss_weight={self.aux_loss_weight} must be >= 0")
        from maskfit.objective import AUX_TARGETS

        _check_choice("mask.aux_target", self.aux_target, AUX_TARGETS)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 400_000
    # Images per step (global) with data.batching="images"; None there means FiT's 256. With "tokens" the
    # images per step follow the token budget and the mask: setting a batch size is an error.
    batch_size: Optional[int] = None
    max_images: Optional[int] = None  # stop once this many images were trained on (compare runs by images seen)
    max_seconds: Optional[float] = None  # stop after this much wall-clock time in one call (a checkpoint is written)
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "fp32" | "bf16"
    compile: bool = False
    # torch.compile's mode under compile=true: "default" | "reduce-overhead" (CUDA graphs: for launch-bound
    # steps such as small models or few kept tokens; needs one shape every step, see RunConfig) |
    # "max-autotune-no-cudagraphs" (longer compile, searched kernels)
    compile_mode: str = "default"
    log_every: int = 100
    ckpt_every: int = 10_000
    sample_every: int = 0  # 0: never write sample grids during training
    device: str = "auto"
    # Stop after this many steps in a row with a non-finite loss or gradient norm (each is skipped: no
    # update). On CUDA the count is read at log lines, so the stop comes at most log_every - 1 steps later.
    max_bad_steps: int = 20
    ckpt_at_images: tuple = ()  # also checkpoint when images seen cross each of these counts (maskfit experiment)
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 keeps every one (the image-count marks are evaluated later)
    # Many GPUs (maskfit.distributed; start with torchrun): "none" | "ddp" (DistributedDataParallel) | "fsdp"
    # (FSDP2 fully_shard). batch_size stays the global batch; each rank trains on batch_size / world size.
    parallel: str = "none"
    # DDP's all-reduce bucket size. Under train.compile Dynamo splits the compiled graph at every bucket boundary
    # (so the all-reduces overlap the backward), and each split costs fusion: FiT-B/2 on one H200 under torchrun
    # trained at 0.946x the plain loop with PyTorch's 25 MB, 0.978x with 100 MB (torchtitan's choice), and 0.991x
    # with no splitting at all, which gives up the overlap that many GPUs need (BENCHMARKS.md, 2026-12-01).
    ddp_bucket_mb: int = 100
    # "full": rank 0 writes the one-process files (FSDP gathers the whole model and optimizer onto it);
    # "sharded": every rank writes its own shards with torch.distributed.checkpoint (nothing gathered; read back
    # by any number of processes); "auto": sharded under FSDP, full otherwise. Both resume on any world size.
    checkpoint_format: str = "auto"

    def __post_init__(self):
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("train.parallel", self.parallel, ("none", "ddp", "fsdp"))
        _check_choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("train.checkpoint_format", self.checkpoint_format, ("auto", "full", "sharded"))
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(
                f"train.compile_mode={self.compile_mode!r} applies under train.compile=true; set train.compile=true "
                "or remove train.compile_mode"
            )
        if self.ddp_bucket_mb < 1:
            raise ValueError(f"train.ddp_bucket_mb={self.ddp_bucket_mb} must be a size in MB >= 1 (default 100)")
        if self.steps < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError(f"train.steps={self.steps} and train.batch_size={self.batch_size} must be >= 1")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"train.max_images={self.max_images} must be a positive number of images (or null)")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"train.max_seconds={self.max_seconds} must be a positive number of seconds (or null)")
        for key in ("log_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)}; it is a period in steps: use a whole number >= 1")
        if self.sample_every < 0:
            raise ValueError(f"train.sample_every={self.sample_every}; use 0 (never) or a period in steps >= 1")
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps={self.max_bad_steps} must be >= 1 (non-finite steps in a row before the run stops)")
        bad = [m for m in self.ckpt_at_images if isinstance(m, bool) or not isinstance(m, int) or m < 1]
        if bad:
            raise ValueError(f"train.ckpt_at_images={list(self.ckpt_at_images)} has {bad}: give positive whole image counts")
        if self.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints={self.keep_checkpoints}; use 0 to keep every checkpoint, or >= 1")


@dataclass
class FinetuneConfig:
    """A stage that starts from another run's weights (maskfit.finetune), e.g. FiTv2's high-resolution
    post-training (FiTv2 §IV-D, §V-E). The defaults train from scratch with every weight."""

    init_from: str = ""  # base run folder (its latest checkpoint) or checkpoint folder; "" = from scratch
    init_weights: str = "ema"  # which of its weights: "ema" (the published HR stage starts from model_ema) | "model"
    trainable: str = "all"  # "all" | "hr_subset": x_embedder, biases, adaLN modulations, final layer only
    hr_subset_init: str = "reinit"  # hr_subset: "reinit" keeps a fresh init (released code) | "loaded" (paper)
    rope: str = "none"  # RoPE scaling at training, per image from its own grid (a maskfit.models.rope method)
    rope_base_grid: int = 16  # L0: the base model's training grid side, in tokens (16 for 256 tokens)

    def __post_init__(self):
        from maskfit.models.rope import EXTRAPOLATION_METHODS

        _check_choice("finetune.init_weights", self.init_weights, ("ema", "model"))
        _check_choice("finetune.trainable", self.trainable, ("all", "hr_subset"))
        _check_choice("finetune.hr_subset_init", self.hr_subset_init, ("reinit", "loaded"))
        _check_choice("finetune.rope", self.rope, EXTRAPOLATION_METHODS)
        if self.rope_base_grid < 1:
            raise ValueError(f"finetune.rope_base_grid={self.rope_base_grid}; it is a grid side in tokens (>= 1)")
        if self.trainable == "hr_subset" and not self.init_from:
            raise ValueError(
                "finetune.trainable='hr_subset' trains ~14 % of the weights and freezes the rest, which must come "
                "from a trained model: set finetune.init_from to the base run (or its checkpoint folder)"
            )


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mask: MaskSection = field(default_factory=MaskSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        from maskfit.models.attention import ATTENTION_BACKENDS

        if self.data.batching == "tokens" and self.train.batch_size is not None:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} has no effect with data.batching='tokens': each step "
                f"holds as many images as fit in data.tokens_per_step={self.data.tokens_per_step} backbone tokens "
                "(more when masking). Remove train.batch_size; to compare runs at equal images seen, set "
                "train.max_images (images seen are logged and checkpointed)"
            )
        if self.data.batching == "images" and self.train.batch_size is None:
            self.train.batch_size = 256  # FiT's global batch

        _check_choice("model.attention", self.model.attention, ATTENTION_BACKENDS)
        if self.diffusion.objective == "flow" and self.mask.aux_target != "noisy_input":
            raise ValueError(
                f"mask.aux_target={self.mask.aux_target!r} applies to diffusion.objective='ddpm' only: the flow "
                "objective keeps its velocity target on dropped tokens (sound there, see maskfit.objective); "
                "remove mask.aux_target"
            )
        static_stream = self.data.batching == "tokens" and self.mask.design == "plain"
        if self.model.attention == "flex" and not static_stream:
            # FlexAttention is compiled for one stream length: every new length recompiles it (seconds each,
            # then an eager fallback that materialises T x T scores), and compiled with dynamic shapes its
            # block mask failed inside Inductor on an H100 (BENCHMARKS.md). Only token batching with the
            # plain design gives the backbone one stream length every step.
            raise ValueError(
                f"model.attention='flex' needs one stream length every step; got data.batching="
                f"{self.data.batching!r}, mask.design={self.mask.design!r}. Set data.batching='tokens' (with "
                "mask.design='plain'), or use model.attention='varlen' (faster on GPU) or 'dense'"
            )
        if self.train.compile_mode == "reduce-overhead":
            # A CUDA graph replays one recording: every step must bring the same shapes (a new stream length or
            # image count records another graph, each holding its own memory), and DDP/FSDP hooks cannot run
            # inside a recording.
            from maskfit.masking import kept_counts_are_drawn

            problems = []
            if self.data.batching != "tokens":
                problems.append(f"data.batching='tokens' (got {self.data.batching!r})")
            elif self.mask.design != "plain" and kept_counts_are_drawn(self.mask):
                # Token batching pads a full-grid design's full stream to a bound computed from k(n); Beta draws
                # have none (maskfit.data.pipeline.static_full_stream).
                problems.append(f"kept counts that are a function of image size for mask.design={self.mask.design!r} "
                                "(got mask.ratio_distribution='beta'; use 'constant', or mask.design='plain')")
            if self.data.max_images_per_step is None:
                problems.append("data.max_images_per_step set (the same number of segments every step)")
            if self.train.parallel != "none":
                problems.append(f"train.parallel='none' (got {self.train.parallel!r})")
            if problems:
                raise ValueError(
                    "train.compile_mode='reduce-overhead' (CUDA graphs) needs one shape every step: "
                    + "; ".join(problems) + ". Set those, or use train.compile_mode='default'"
                )


def _check_choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               tuple: "a list", dict: "a table/object"}


def _typed(path: str, value, hint):
    """``value`` as the annotation ``hint`` wants it (an int for a float becomes a float, a list for a tuple a
    tuple), or one ValueError naming the key, the value and the expected type."""
    origin = get_origin(hint)
    if origin is Union:
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _typed(path, value, option)
                except ValueError:
                    pass
        expected = " or ".join(_TYPE_NAMES.get(o, getattr(o, "__name__", str(o))) if o is not type(None) else "null"
                               for o in options)
    else:
        base = origin or hint
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if base is dict and isinstance(value, dict):
            return value
        if base not in _TYPE_NAMES:
            return value  # an annotation this checker does not know: the dataclass checks it
        expected = _TYPE_NAMES[base]
    hint_text = ""
    if isinstance(value, float) and value.is_integer() and "whole number" in expected:
        hint_text = f"; write {int(value)}"
    elif isinstance(value, str) and expected != "a string":
        hint_text = " (on the command line, --set parses JSON: a bare word is a string)"
    raise ValueError(f"config key {path}={value!r} ({type(value).__name__}): expected {expected}{hint_text}")


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise with the list of known ones, and each
    value is checked against its field's annotation (:func:`_typed`)."""
    if not isinstance(data, dict):
        raise ValueError(f"config section [{where or 'root'}] must be a table/object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ValueError(f"unknown config key {path!r}; known keys here: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, path)
        else:
            kwargs[key] = _typed(path, value, hint)
    return cls(**kwargs)


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a JSON or TOML config, then apply ``section.key=value`` overrides (values parsed as JSON)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ImportError(
                    f"reading {path} needs Python >= 3.11 or `pip install tomli`; or write the config as JSON"
                ) from None
        raw = tomllib.loads(text)
    elif path.suffix == ".json":
        raw = json.loads(text)
    else:
        raise ValueError(f"config {path} must end in .toml or .json")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> RunConfig:
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string
        node = raw
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                key = ".".join(parents[: i + 1])
                raise ValueError(
                    f"override {item!r}: {key} is a value ({node!r}), not a section with keys; "
                    f"set it with --set {key}=VALUE"
                )
        node[leaf] = parsed
    return from_dict(RunConfig, raw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Union[str, os.PathLike]) -> None:
    from maskfit.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_dict(cfg), indent=2, sort_keys=True))
