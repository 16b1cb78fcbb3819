"""Classifier-free guidance (Ho & Salimans 2022) for token-stream denoisers.

Training: ``drop_labels`` replaces each label by the null class with probability p (FiT/FiTv2: p = 0.1,
null id = num_classes = 1000), so one network learns both ε(x, y) and ε(x, ∅).

Sampling: ``guided`` wraps a denoiser so that it returns uncond + w·(cond − uncond) (Ho & Salimans eq. 6,
written in the "w = 1 is the conditional model" form that DiT/FiT use). Cond and uncond run in one model call
on a doubled stream.

Where the published FiT/FiTv2 code departs from the papers (whlzy/FiT ``FiT.forward_with_cfg``,
reference/fit.md §2.6):
- It guides only the first 3 of the 4 latent channels (C_cfg = 3·p², a DiT "exact reproducibility" legacy);
  the 4th channel of ε (v1) or of the velocity (v2) is the conditional prediction. Here that is
  ``GuidanceConfig(channels=3)``; the default ``channels=None`` guides every channel as the papers describe.
- Its power-cos option computes MDT's schedule on ``1 − clamp(t, max=1)``. For the flow time of FiTv2 (t = 0 is
  noise) that is 1 at noise, so the schedule runs backwards (full guidance at noise, none at data); for the
  integer DDPM t of v1 the clamp makes it 0 for every t >= 1 (no guidance at all). Neither is MDT's intent.
  Here the schedule reads a *fraction of generation done* f, defined per time convention by ``t_to_fraction``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from maskfit.distributed import draw

from maskfit.tokens import TokenLayout

ModelFn = Callable[[Tensor, Tensor, Tensor, TokenLayout], Tensor]
FractionFn = Callable[[Tensor], Tensor]

_SCHEDULES = ("constant", "power_cos")


def drop_labels(y: Tensor, prob: float, null_class: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(B,) labels with each one replaced by ``null_class`` independently with probability ``prob``."""
    if not (0.0 <= prob <= 1.0):
        raise ValueError(f"label drop prob={prob} must be in [0, 1] (FiT uses 0.1)")
    if prob == 0.0:
        return y
    device = generator.device if generator is not None else y.device
    # draw: each rank of a many-GPU run keeps its slice of the global batch's draws (maskfit.distributed)
    drop = (draw(torch.rand, y.shape, "segments", generator=generator, device=device) < prob).to(y.device)  # (B,) bool
    return torch.where(drop, torch.full_like(y, null_class), y)


def ddpm_fraction(num_timesteps: int = 1000) -> FractionFn:
    """f = 1 − t/(T−1) for integer DDPM t (T−1 = pure noise, 0 = data): f = 0 at the first sampling step.

    MDT divides by T instead (f = 1 − t/T); the two differ by less than 1/T.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps={num_timesteps}; a fraction of generation needs at least 2 timesteps")

    def fraction(t: Tensor) -> Tensor:
        return 1.0 - t.double() / (num_timesteps - 1)  # (B,)

    return fraction


def flow_fraction(t: Tensor) -> Tensor:
    """f = t for the FiTv2/SiT flow time (0 = noise, 1 = data)."""
    return t.double()  # (B,)


@dataclass
class GuidanceConfig:
    scale: float = 1.0  # w; 1 = the conditional model, no guidance (FiT/FiTv2 report 1.5)
    null_class: int = 1000  # label id of ∅ (= num_classes)
    # None: guide every latent channel (the papers). k: guide only the first k latent channels, i.e. the first
    # k·p² values of each token; the published FiT/FiTv2 code uses 3 (of 4).
    channels: Optional[int] = None
    # "constant": w at every step. "power_cos": MDT's w_f = (w − 1)·½(1 − cos(π·f^power)) + 1, rising from 1 at
    # noise (f = 0) to w at data (f = 1).
    schedule: str = "constant"
    power: float = 4.0  # MDT's s (MDT reports cfg 3.8 with s = 4)

    def __post_init__(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; choose one of {_SCHEDULES}")
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"channels={self.channels}; use None to guide all channels or a positive count")
        if self.power <= 0:
            raise ValueError(f"power={self.power} must be > 0 (MDT uses 4)")


def guidance_scale(config: GuidanceConfig, fraction: Optional[Tensor]) -> Tensor | float:
    """The scale w_f per image ((B,) tensor for power_cos, a float for constant)."""
    if config.schedule == "constant":
        return config.scale
    if fraction is None:
        raise ValueError("schedule='power_cos' needs the fraction of generation done; pass t_to_fraction")
    if bool(((fraction < -1e-6) | (fraction > 1 + 1e-6)).any()):
        raise ValueError(
            f"fraction of generation done must be in [0, 1], got range [{float(fraction.min())}, "
            f"{float(fraction.max())}]; check that t_to_fraction matches the sampler's time convention"
        )
    ramp = 0.5 * (1.0 - torch.cos(math.pi * fraction.clamp(0.0, 1.0) ** config.power))  # (B,) 0 -> 1
    return (config.scale - 1.0) * ramp + 1.0


def guided(
    model_fn: ModelFn,
    config: GuidanceConfig,
    patch_size: int,
    t_to_fraction: Optional[FractionFn] = None,
) -> ModelFn:
    """A denoiser with ``model_fn``'s signature that returns the guided prediction.

    Cond and uncond run in ONE call: x is stacked on itself (2T, D), y with ``null_class`` (2B,), t repeated, and
    ``layout.repeat(2)``. Guidance applies to the first D values of the output (ε for v1, the velocity for v2),
    or to its first ``channels``·p² values; an output of 2·D values (learned Σ) takes its variance half, like any
    unguided value, from the conditional branch (as DiT/FiT). ``t_to_fraction`` maps the model's t (B,) to the
    fraction of generation done (``ddpm_fraction(1000)`` or ``flow_fraction``); only power_cos needs it.
    With scale 1 the model is returned as it is: w = 1 is the conditional model, so the doubling is skipped.
    """
    if config.scale == 1.0:  # w_t = 1 at every step under both schedules
        return model_fn
    if config.schedule == "power_cos" and t_to_fraction is None:
        raise ValueError("schedule='power_cos' needs t_to_fraction (ddpm_fraction(T) or flow_fraction)")
    p2 = patch_size * patch_size

    def guided_fn(x: Tensor, t: Tensor, y: Tensor, layout: TokenLayout) -> Tensor:
        T, D = x.shape
        if D % p2:
            raise ValueError(f"tokens have {D} values, not a multiple of patch_size²={p2}; check patch_size")
        n_guided = D if config.channels is None else config.channels * p2
        if n_guided > D:
            raise ValueError(
                f"channels={config.channels} needs {n_guided} values per token but tokens have {D} "
                f"({D // p2} latent channels); use channels <= {D // p2} or None"
            )
        x2 = torch.cat([x, x])  # (2T, D)
        y2 = torch.cat([y, torch.full_like(y, config.null_class)])  # (2B,)
        out = model_fn(x2, torch.cat([t, t]), y2, layout.repeat(2))  # (2T, D_out)
        if out.shape[0] != 2 * T or out.shape[1] not in (D, 2 * D):
            raise ValueError(f"model output {tuple(out.shape)} for input {(2 * T, D)}: expected (2T, D) or (2T, 2D)")
        cond, uncond = out[:T], out[T:]  # (T, D_out) each
        fraction = t_to_fraction(t) if config.schedule == "power_cos" else None  # (B,)
        w = guidance_scale(config, fraction)  # one host sync per call for the range check (power_cos only)
        if isinstance(w, Tensor):
            w = w.to(cond.dtype)[layout.seq_id][:, None]  # (T, 1) per token from its image
        mixed = uncond[:, :n_guided] + w * (cond[:, :n_guided] - uncond[:, :n_guided])  # (T, n_guided)
        return torch.cat([mixed, cond[:, n_guided:]], dim=1)  # (T, D_out)

    return guided_fn
