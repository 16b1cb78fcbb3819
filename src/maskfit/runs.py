"""Building a run from its config: the device, the model config, the diffusion, the patch size the data needs.

One place for what ``maskfit train``, ``sample``, ``sweep``, ``bench`` and ``prepare`` all build from a run
config; the parallel wrapping (train.parallel) is maskfit.distributed's, applied by
:func:`maskfit.train.build_training_run` from outside the model.
"""
from __future__ import annotations

import contextlib

import torch

from maskfit.config import RunConfig
from maskfit.models.transformer import ModelConfig, model_config


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
        decoder_heads=m.decoder_heads, mixer_depth=m.mixer_depth, side_decode_depth=m.side_decode_depth,
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
