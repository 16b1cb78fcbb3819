"""A training stage that starts from another run's weights: FiTv2's high-resolution post-training
(FiTv2 §IV-D, §V-E). Configured by the ``[finetune]`` section (maskfit.config.FinetuneConfig).

What the published stage does (whlzy/FiT @b22b7b0: configs/fitv2/config_fitv2_hr_xl.yaml, FiT.initialize_weights,
FiT.finetune, fit/utils/eval_utils.py:init_from_ckpt, train_fitv2.py; reference/fit.md §4.2) and what we do:

1. Weights. Its ``pretrain_ckpt`` is the released 256-token model, and the released models are EMA weights
   (the README saves FiTv2_XL/model_ema.safetensors as checkpoints/fitv2_xl.safetensors). So we load the base
   run's EMA weights by default (``init_weights="ema"``; "model" takes the raw weights): they are also the
   weights the base model's results were measured with. It is a new run, not a resume: step 0, a fresh
   optimizer and data order; the EMA starts as a copy of the initialised model (the released script's deepcopy).
2. Trainable subset. ``finetune: partial`` with ``ignore_keys: ['x_embedder', 'bias', 'LN', 'final_layer']``
   trains every parameter whose name contains one of these and freezes the rest (requires_grad False); the
   frozen ones are also left out of our optimizer. In the released module names 'LN' matches the block and
   global ``adaLN_modulation`` layers (its LayerNorms have no weights); ours are named ``adaLN``. For
   FiTv2-XL/2 that is 94,961,680 of 671,045,776 parameters = 14.15 % (FiTv2 §V-E).
3. Initial values of the subset. The released code deletes the same keys from the loaded state dict, so the
   subset keeps its fresh initialisation: zero biases, zero adaLN up-projections, global modulation and
   final layer, xavier x_embedder and LoRA down-projections. Only the frozen matrices, the timestep-MLP
   weights and the label table come from the base model, and the stage starts from blocks that are
   identities and an output of 0. The paper describes fine-tuning the subset and never mentions
   re-initialising it. Default ``hr_subset_init="reinit"``: the released code is the only executable
   statement of the recipe behind the published HR numbers. ``"loaded"`` starts the subset from the base
   model's values (the paper's reading).
4. RoPE. ``custom_freqs: ntk-aware``, ``decouple: true``, ``ori_max_pe_len: 16``, ``online_rope: true``:
   each image's frequencies come from its own (h, w) in tokens: per axis s_a = max(L_a / L0, 1) with
   L0 = 16 (clamped: an axis of at most 16 tokens keeps plain RoPE) and base b_a = b * s_a^(m/(m-2)),
   m = D_h/2 (``VisionRotaryEmbedding.get_1d_rope_freqs``). That is RopeExtrapolation("vision_ntk",
   (L0, L0)) with its default ntk_exponent="axis", and ``rope_tables`` already computes it per image of a
   packed stream (from ``layout.grid`` and ``seq_id``), so we hand it to the model as its default_rope.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from maskfit import checkpoint as ckpt_io
from maskfit.config import FinetuneConfig, RunConfig, config_from_dict
from maskfit.models.rope import RopeExtrapolation, training_grid

# The released ignore_keys, in our module names (substring match, as FiT.finetune).
HR_SUBSET_PATTERNS = ("x_embedder", "bias", "adaLN", "final_layer")


def in_hr_subset(name: str) -> bool:
    """Whether the high-resolution stage trains parameter ``name`` (FiTv2 §IV-D; the released rule)."""
    return any(pattern in name for pattern in HR_SUBSET_PATTERNS)


def select_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze every parameter outside ``trainable`` ("all" | "hr_subset"); return the trained ones in
    module order: the list the optimizer gets, so frozen weights have no optimizer state at all."""
    params = []
    for name, p in model.named_parameters():
        train = trainable == "all" or in_hr_subset(name)
        p.requires_grad_(train)
        if train:
            params.append(p)
    if not params:
        raise ValueError(f"finetune.trainable={trainable!r} selects no parameter of this model")
    return params


def training_rope(fcfg: FinetuneConfig) -> Optional[RopeExtrapolation]:
    """The RoPE scaling every training forward uses: each image's own scale against the base grid L0."""
    if fcfg.rope == "none":
        return None
    return RopeExtrapolation(fcfg.rope, (fcfg.rope_base_grid, fcfg.rope_base_grid))


def rope_train_grid(run_cfg: RunConfig) -> tuple[int, int]:
    """The grid a run's RoPE scales count from: L0 for a stage trained with per-image scaling (the HR
    stage's 16 x 16, not its 1024-token budget's 32 x 32), otherwise the square grid of its token budget."""
    f = run_cfg.finetune
    if f.rope != "none":
        return (f.rope_base_grid, f.rope_base_grid)
    return training_grid(run_cfg.data.token_budget)


def rope_train_keep(run_cfg: RunConfig) -> float:
    """The fraction of an image's tokens a run's backbone attended over in training (RopeExtrapolation.train_keep,
    read by the "kept" attention scale): mask.keep_ratio (the mean of a Beta draw, the value at the reference size
    of a resolution-dependent one), keep_count over the budget in count mode, 1 unmasked. A run whose last phase
    was an unmasked fine-tune still reports its masked phase's fraction: which one to sample with is the user's
    question, and "none" answers the other reading."""
    m = run_cfg.mask
    if m.keep_count is not None:
        return min(1.0, m.keep_count / run_cfg.data.token_budget)
    return float(m.keep_ratio)


def _base_checkpoint(fcfg: FinetuneConfig) -> Path:
    path = Path(fcfg.init_from)
    if not path.exists():
        raise FileNotFoundError(
            f"finetune.init_from={fcfg.init_from!r} does not exist; give the base run's folder or one of its "
            "checkpoint folders (runs/NAME/checkpoints/step_XXXXXXX)"
        )
    return ckpt_io.resolve_checkpoint(path)


def _base_run_config(ckpt: Path) -> RunConfig:
    raw = ckpt_io.load_config_of(ckpt)
    raw.pop("resolved_model", None)
    return config_from_dict(raw)


def check_rope_base_grid(fcfg: FinetuneConfig, base: RunConfig, ckpt: Path) -> None:
    """L0 must be the grid the base model was trained on, or the stage would rescale RoPE from the wrong size."""
    if fcfg.rope == "none":
        return
    base_grid = rope_train_grid(base)
    if base_grid != (fcfg.rope_base_grid, fcfg.rope_base_grid):
        raise ValueError(
            f"finetune.rope_base_grid={fcfg.rope_base_grid}, but the base model {ckpt} was trained on a "
            f"{base_grid[0]}x{base_grid[1]} token grid (data.token_budget={base.data.token_budget}); "
            f"set finetune.rope_base_grid={base_grid[0]}"
        )


def load_init_weights(model: nn.Module, fcfg: FinetuneConfig) -> Path:
    """Load the base run's weights into ``model`` (built and freshly initialised); returns the file read.

    With trainable="hr_subset" and hr_subset_init="reinit" the subset keeps the model's current (fresh)
    values, as the released code, which deletes those keys before loading. The architecture must match
    the base model's in every key and shape, also in the subset: a mismatch is an error naming the keys.
    """
    ckpt = _base_checkpoint(fcfg)
    base = _base_run_config(ckpt)
    check_rope_base_grid(fcfg, base, ckpt)
    file = ckpt / f"{fcfg.init_weights}.safetensors"  # ema.safetensors | model.safetensors
    if not ckpt_io.has_weights(ckpt, fcfg.init_weights):
        raise FileNotFoundError(f"{file} is missing; set finetune.init_weights to the other of 'ema' and 'model'")
    fresh = {}
    if fcfg.trainable == "hr_subset" and fcfg.hr_subset_init == "reinit":
        fresh = {n: p.detach().clone() for n, p in model.named_parameters() if in_hr_subset(n)}
    try:
        ckpt_io.load_weights(model, file)
    except ValueError as err:
        raise ValueError(
            f"finetune.init_from={fcfg.init_from!r}: this stage keeps the base model's architecture; set "
            f"model.preset and model.overrides (and mask.design) as the base run had them (preset "
            f"{base.model.preset!r}, overrides {base.model.overrides}). {err}"
        ) from None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in fresh:
                p.copy_(fresh[name])
    return file


def prepare_model(model: nn.Module, cfg: RunConfig, resuming: bool) -> list[nn.Parameter]:
    """Apply the ``[finetune]`` section to a freshly built model before its EMA copy and optimizer exist.

    Loads the base weights (skipped on resume: the run's own checkpoint replaces them), sets the training
    RoPE and freezes what is not trained. Returns the parameters the optimizer must get.
    """
    fcfg = cfg.finetune
    if fcfg.init_from and not resuming:
        load_init_weights(model, fcfg)
    model.default_rope = training_rope(fcfg)
    return select_trainable(model, fcfg.trainable)
