"""Sampling at any height x width: token grids, classifier-free guidance, PNG grids and ADM ``.npz`` files.

Sampling never masks: a model trained on token subsets samples every token of the grid with the same
sampler as FiT. Images of several resolutions can share one call (one packed stream).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskfit.diffusion.guidance import GuidanceConfig, guided
from maskfit.models.rope import RopeExtrapolation
from maskfit.models.transformer import FiT
from maskfit.tokens import pack, split_images, unpatchify


def check_resolution(height: int, width: int, multiple: int) -> None:
    """Raise naming the nearest valid sizes when the autoencoder factor x patch size does not divide."""
    if height > 0 and width > 0 and height % multiple == 0 and width % multiple == 0:
        return

    def nearest(v: int) -> str:
        lo = max(multiple, (v // multiple) * multiple)
        hi = lo + multiple if lo < v else lo
        return f"{lo}" if lo == hi else f"{lo} or {hi}"

    raise ValueError(
        f"cannot sample {height}x{width}: height and width must be positive multiples of {multiple} "
        f"(autoencoder factor x patch size); nearest valid: height {nearest(height)}, width {nearest(width)}"
    )


def parse_resolution(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '160x320' -> (160, 320) (height x width)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise ValueError(f"resolution {text!r} must look like 256 or 160x320 (height x width)")


@dataclass
class SamplerOptions:
    method: str = "euler"  # ddpm: "ddpm" | "ddim"; flow: "euler" | "heun" | "dopri5" | "sde"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_channels: Optional[int] = None  # None: all latent channels (papers); 3: the released code
    guidance_schedule: str = "constant"
    rope: Optional[RopeExtrapolation] = None


def t_to_fraction_for(diffusion):
    """Fraction of generation done, 0 at pure noise and 1 at data (for guidance schedules)."""
    from maskfit.diffusion.flow import RectifiedFlow
    from maskfit.diffusion.guidance import ddpm_fraction, flow_fraction

    if isinstance(diffusion, RectifiedFlow):
        return flow_fraction
    return ddpm_fraction(diffusion.num_timesteps)


def guided_denoiser(model: FiT, diffusion, options: SamplerOptions):
    """The sampling denoiser: the full grid (never masked), RoPE extrapolation, classifier-free guidance."""
    rope = options.rope

    def model_fn(x, t, y, lay):
        return model(x, t, y, lay, rope=rope)

    guidance = GuidanceConfig(
        scale=options.cfg_scale, null_class=model.null_class, channels=options.guidance_channels,
        schedule=options.guidance_schedule,
    )
    return guided(model_fn, guidance, model.cfg.patch_size, t_to_fraction_for(diffusion))


@torch.no_grad()
def sample_tokens(
    model: FiT,
    diffusion,
    grids: Sequence[tuple[int, int]],
    labels: Tensor,
    options: SamplerOptions,
    generator: torch.Generator,
    device: torch.device,
    progress: bool = False,
) -> list[Tensor]:
    """Draw one image per (grid, label) in one packed stream: list of (h*w, p*p*C) token tensors."""
    cfg = model.cfg
    dummy = [torch.empty(h * w, 0) for h, w in grids]
    layout = pack(dummy, list(grids), labels.cpu()).layout.to(device)
    noise = torch.randn(layout.num_tokens, cfg.token_dim, generator=generator, device=device)
    fn = guided_denoiser(model, diffusion, options)
    tokens = diffusion.sample(
        fn, noise, labels.to(device), layout, steps=options.steps, method=options.method,
        generator=generator, progress=progress,
    )
    return split_images(tokens, layout)


def tokens_to_images(
    tokens: list[Tensor], grids, patch_size: int, autoencoder, batch_size: int = 32
) -> list[np.ndarray]:
    """Decode token sets to uint8 HxWx3 images (ADM convention: clamp(127.5 x + 128)).

    Latents of one size are decoded together (batches of ``batch_size``), not one image at a time.
    """
    from maskfit.data.latents import decode_by_size

    latents = [unpatchify(x.float(), grid, patch_size) for x, grid in zip(tokens, grids)]  # (C, h*p, w*p) each
    pixels = decode_by_size(autoencoder, latents, batch_size)  # (3, H, W) each, in [-1, 1]
    return [(x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy() for x in pixels]


def image_grid(images: Sequence[np.ndarray], columns: int, pad: int = 2, background: int = 255) -> Image.Image:
    """Lay out images of any sizes in rows of ``columns``; each cell as large as its row's largest image."""
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    widths = [sum(im.shape[1] for im in row) + pad * (len(row) + 1) for row in rows]
    heights = [max(im.shape[0] for im in row) + pad for row in rows]
    canvas = Image.new("RGB", (max(widths), sum(heights) + pad), (background,) * 3)
    y = pad
    for row, h in zip(rows, heights):
        x = pad
        for im in row:
            canvas.paste(Image.fromarray(im), (x, y))
            x += im.shape[1] + pad
        y += h
    return canvas


def save_adm_npz(path: Path, images: Sequence[np.ndarray], labels: Optional[np.ndarray] = None) -> None:
    """ADM sample format: arr_0 uint8 (N, H, W, 3) (all of one size), arr_1 labels when given."""
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"an ADM .npz holds images of one size; got {sorted(sizes)}: write one file per resolution")
    arrays = {"arr_0": np.stack(images)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
