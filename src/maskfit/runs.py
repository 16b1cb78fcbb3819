"""Building a run from its config: the device, the model config, the diffusion, the patch size the data needs,
the model with its EMA, optimizer and parallel wrapping (:func:`build_training_run`), and a trained model
back from a checkpoint (:func:`load_model_from_checkpoint`).

One place for what ``maskfit train``, ``sample``, ``sweep``, ``bench`` and ``prepare`` all build from a run
config. The parallel wrapping (train.parallel) is maskfit.distributed's, applied here from outside the model
(as torchtitan does), so the training loop (maskfit.train) knows nothing about how the model is wrapped.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from maskfit import checkpoint as ckpt_io
from maskfit.config import RunConfig
from maskfit.distributed import Parallel, load_optimizer, load_sharded_optimizer, param_names, parallelize, rank_device
from maskfit.divergence import BadSteps
from maskfit.finetune import prepare_model
from maskfit.models.transformer import FiT, ModelConfig, model_config
from maskfit.tokens import TokenLayout


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(name)


def check_attention_device(attention: str, device: torch.device, fix: str) -> None:
    """varlen_attn is FlashAttention (CUDA only): fail before the first step, naming the fix."""
    if attention == "varlen" and device.type != "cuda":
        raise ValueError(f"attention 'varlen' needs a CUDA device (FlashAttention has no {device.type} kernel); {fix}")


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on GPU ('auto'), fp32 on CPU: CPU bf16 is slow and tests compare fp32 values."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_patch_size(cfg: RunConfig) -> int:
    """The patch size a run's model will have (its preset's, unless overridden): the data needs it first."""
    return cfg.model.overrides.get("patch_size", model_config(cfg.model.preset).patch_size)


def resolved_model_config(cfg: RunConfig, data_channels: int) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", data_channels)
    overrides["attention"] = cfg.model.attention
    m = cfg.mask
    overrides.update(
        mask_design=m.design, decoder_depth=m.decoder_depth, decoder_hidden=m.decoder_hidden,
        decoder_heads=m.decoder_heads, decoder_pos_embed=m.decoder_pos_embed, mixer_depth=m.mixer_depth,
        side_decode_depth=m.side_decode_depth,
    )
    mcfg = model_config(cfg.model.preset, **overrides)
    objective = cfg.diffusion.objective
    if objective == "ddpm" and not mcfg.learn_sigma:
        raise ValueError(
            f"diffusion.objective='ddpm' trains FiT v1's learned variance but model {cfg.model.preset} has "
            "learn_sigma=False; use a FiT (v1) preset or set model.overrides.learn_sigma=true"
        )
    if objective == "flow" and mcfg.learn_sigma:
        raise ValueError(
            f"diffusion.objective='flow' predicts a velocity but model {cfg.model.preset} has learn_sigma=True; "
            "use a FiTv2 preset or set model.overrides.learn_sigma=false"
        )
    return mcfg


def build_diffusion(cfg: RunConfig):
    d = cfg.diffusion
    if d.objective == "ddpm":
        from maskfit.diffusion.gaussian import GaussianDiffusion, GaussianDiffusionConfig

        return GaussianDiffusion(
            GaussianDiffusionConfig(num_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
        )
    from maskfit.diffusion.flow import FlowConfig, RectifiedFlow

    return RectifiedFlow(FlowConfig(t_sampling=d.t_sampling))


@dataclass
class TrainingRun:
    """Everything one optimisation step touches, built from a run config (:func:`build_training_run`)."""

    cfg: RunConfig
    mcfg: ModelConfig
    device: torch.device
    model: FiT
    ema: FiT
    forward: Callable  # the model, compiled under train.compile (stream lengths marked dynamic: see below)
    diffusion: object
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # t, noise and label dropout (the same stream on every rank)
    bad_steps: BadSteps  # non-finite steps (skipped), counted on the device
    parallel: Parallel = dataclasses.field(default_factory=Parallel)  # rank, world size, collectives


def build_training_run(
    cfg: RunConfig, data_channels: int, dynamic_stream: bool = False, resuming: bool = False,
    parallel: Optional[Parallel] = None, checkpoint: Optional[Path] = None,
) -> TrainingRun:
    """Model, EMA, optimizer, diffusion and generator of a run (weights from ``train.seed``).

    dynamic_stream: the stream length changes between steps (image batching of packed or masked
    streams). Under ``train.compile`` the stream dimension of every input is then marked dynamic before
    the first call, so Dynamo compiles one graph for every length instead of specialising on the first
    one and recompiling at the second (token batching has one length and stays static).
    resuming: a checkpoint will be loaded over the weights, so ``[finetune]`` loads no base weights.
    parallel: the run's ranks (``train.parallel``); the model is wrapped here, from outside, after its
    weights are loaded (FSDP shards what it is given) and before the optimizer sees its parameters.
    checkpoint: a checkpoint folder to load the weights, EMA and optimizer state from (every rank reads it;
    the files are the single-process ones, so any world size resumes any checkpoint).
    """
    tcfg = cfg.train
    parallel = parallel or Parallel()
    device = rank_device(parallel, resolve_device(tcfg.device))
    check_attention_device(cfg.model.attention, device, "set model.attention='dense' to train on the CPU")
    torch.manual_seed(tcfg.seed)
    mcfg = resolved_model_config(cfg, data_channels)
    model = FiT(mcfg).to(device)
    # [finetune]: base weights (fresh starts only), training RoPE, frozen weights; before the EMA copies the model.
    trainable = prepare_model(model, cfg, resuming=resuming)
    ema = copy.deepcopy(model).requires_grad_(False)
    if checkpoint is not None:
        ckpt_io.load_weights(model, checkpoint / "model.safetensors")
        ckpt_io.load_weights(ema, checkpoint / "ema.safetensors")
    bf16 = not isinstance(autocast_for(tcfg.precision, device), contextlib.nullcontext)
    wrapped = parallelize(model, parallel, device, bf16, ddp_bucket_mb=tcfg.ddp_bucket_mb)
    parallelize(ema, parallel, device, bf16, shard_only=True)
    if parallel.mode == "fsdp":  # fully_shard replaced the parameters: hand the optimizer the new ones
        trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda",
    )
    if checkpoint is not None and ckpt_io.is_sharded(checkpoint):
        load_sharded_optimizer(model, optimizer, checkpoint, parallel)
    elif checkpoint is not None:
        names = param_names(model, optimizer)
        state = model.upgrade_optimizer_state(ckpt_io.load_optimizer_state(checkpoint, map_location=device), names)
        try:
            load_optimizer(model, optimizer, state, parallel)
        except ValueError as err:  # torch: "loaded state dict contains a parameter group that doesn't match..."
            raise ValueError(
                f"{checkpoint}/optimizer.pt holds AdamW state for {sum(len(g['params']) for g in state['param_groups'])} "
                f"parameters, this model's optimizer {len(names)} ({err}): the checkpoint was "
                "written by a different model config or code; resume it with the config it saved (config.json beside "
                "it), or start from its weights instead (finetune.init_from) to leave its optimizer state behind"
            ) from err
    forward = wrapped
    if tcfg.compile:
        compiled = torch.compile(wrapped, mode=None if tcfg.compile_mode == "default" else tcfg.compile_mode)
        forward = _with_dynamic_stream(compiled) if dynamic_stream else compiled
    generator = torch.Generator(device=device).manual_seed(tcfg.seed + 1)
    return TrainingRun(cfg, mcfg, device, model, ema, forward, build_diffusion(cfg), optimizer, generator,
                       BadSteps(device), parallel)


def _with_dynamic_stream(compiled: Callable) -> Callable:
    """Mark dim 0 (the token stream) of the stream tensors dynamic before each compiled call."""
    from torch._dynamo import maybe_mark_dynamic

    def mark(layout: TokenLayout) -> None:
        for t in (layout.pos, layout.seq_id, layout.valid, layout.keep):
            if t is not None:
                maybe_mark_dynamic(t, 0)

    def forward(x, t, y, layout, mask=None):
        maybe_mark_dynamic(x, 0)
        mark(layout)
        if mask is not None:
            maybe_mark_dynamic(mask.index, 0)
            mark(mask.layout)
        return compiled(x, t, y, layout, mask=mask)

    forward._orig_mod = getattr(compiled, "_orig_mod", compiled)  # training_loss reads the model's config
    return forward


def load_model_from_checkpoint(
    path: Path, use_ema: bool = True, device: Optional[torch.device] = None, attention: Optional[str] = None
):
    """(model, run config) from a checkpoint folder or a run folder.

    attention: the backend to run with instead of the one the run trained with (same math: a varlen-trained
    model samples on a CPU with "dense").
    """
    from maskfit.config import config_from_dict

    ckpt = ckpt_io.resolve_checkpoint(path)
    raw = ckpt_io.load_config_of(ckpt)
    resolved = raw.pop("resolved_model")
    run_cfg = config_from_dict(raw)
    if attention is not None:
        resolved["attention"] = attention
    mcfg = ModelConfig(**resolved)
    model = FiT(mcfg)
    ckpt_io.load_weights(model, ckpt / ("ema.safetensors" if use_ema else "model.safetensors"))
    model.eval().requires_grad_(False)
    return model.to(device or torch.device("cpu")), run_cfg
