"""Sampling at any height x width: token grids, classifier-free guidance, PNG grids and ADM ``.npz`` files.

Sampling never masks: a model trained on token subsets samples every token of the grid with the same
sampler as FiT. Images of several resolutions can share one call (one packed stream).

Precision: the network may run under bf16 autocast (``SamplerOptions.precision``; FlashAttention needs it),
but its output is cast to fp32 before guidance and the sampler see it, so the ODE/SDE state, the sampler's
arithmetic, the CFG combination and the decode are fp32 whatever the network ran in.

Recipes (``recipe_choices``): the sampling choices that produced the published tables, either as the
papers write them ("paper") or as the released code whlzy/FiT runs them ("released"), from
``reference/fit.md`` §2.6 (samplers, guidance) and §3.3/§3.6 (RoPE readings).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskfit.diffusion.flow import _SAMPLERS as FLOW_SAMPLERS
from maskfit.diffusion.gaussian import _SAMPLERS as DDPM_SAMPLERS
from maskfit.diffusion.guidance import GuidanceConfig, guided
from maskfit.models.rope import RopeExtrapolation
from maskfit.models.transformer import FiT
from maskfit.tokens import MaskedView, pack, split_images, subset_cover, subset_windows, unpatchify
from maskfit.runs import autocast_for

# The samplers of each objective: "ddpm" = FiT v1 (gaussian.py), "flow" = FiTv2 (flow.py).
SAMPLERS = {"ddpm": DDPM_SAMPLERS, "flow": FLOW_SAMPLERS}
PRECISIONS = ("bf16", "fp32")  # the network's forward; everything around it is fp32
RECIPES = ("paper", "released")
# FiTv2's published ODE solve: torchdiffeq dopri5 with these tolerances (reference/fit.md §2.6).
DOPRI5_ATOL, DOPRI5_RTOL = 1e-6, 1e-3


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
    steps: Optional[int] = 50  # unused by the adaptive dopri5 (None there)
    cfg_scale: float = 1.0
    guidance_channels: Optional[int] = None  # None: all latent channels (papers); 3: the released code
    guidance_schedule: str = "constant"
    rope: Optional[RopeExtrapolation] = None
    atol: Optional[float] = None  # dopri5 only; None: flow.py's defaults (FiTv2's 1e-6 and 1e-3)
    rtol: Optional[float] = None
    precision: str = "fp32"  # the network's forward: "bf16" autocast or "fp32" (see the module docstring)
    # Subset sampling (ours, for masked models): below 1, every network call sees random subsets of this fraction
    # of each image's tokens through the masked forward, as in training, instead of the full grid (``subset_denoiser``).
    subset_keep: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.subset_keep <= 1.0:
            raise ValueError(f"SamplerOptions.subset_keep={self.subset_keep}: the fraction of tokens each network "
                             "call sees is in (0, 1]; 1 samples on the full grid, a masked run's keep ratio as trained")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SamplerOptions.precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.method != "dopri5" and (self.atol is not None or self.rtol is not None):
            raise ValueError(f"atol/rtol apply to the adaptive dopri5 only, not to {self.method!r}; leave them None")


def recipe_choices(recipe: Optional[str], objective: str) -> dict:
    """The sampling choices of ``recipe`` for a run trained with ``objective`` ("ddpm" = FiT v1, "flow" = FiTv2).

    Keys: sampler, steps, atol, rtol (dopri5 only), guidance_channels (None = all), yarn_ramp, ntk_exponent,
    attn_scale (the readings in ``maskfit.models.rope``).

    - ``None``, the project's defaults: the papers' YaRN ramp, the derived NTK exponent m/(m-2), no attention
      scale, guidance on every channel; 250 DDPM steps (v1) or 50 Euler steps (v2, a quick default).
    - ``"paper"``: what FiT (arXiv 2402.12376) and FiTv2 (arXiv 2410.13925) write: YaRN ramp linear in rotations
      (FiT eqs. 6-8), NTK exponent |D|/(|D|-2) with |D| the head dim (FiT eq. 5), FiTv2 eq. 15's attention scale
      for v2 (FiT v1 has none), every channel guided.
    - ``"released"``: what whlzy/FiT's sampling scripts do: YaRN ramp in dimension index, exponent m/(m-2),
      the ``ntkpro2`` attention scale ln(2hw)/ln(L^2) for v2 (the v1 script has none), guidance on the first 3
      latent channels (reference/fit.md §2.6, §3.2-3.3).

    Both recipes use the sampler of the published tables: 250 DDPM steps with the learned variance for v1
    (FiT §4.1), dopri5 with atol 1e-6 and rtol 1e-3 for v2 (FiTv2 §V-A). Which tables used an extrapolation
    method, and which the attention scale, is per table (fit.md §3.6): ``--extrapolation`` and ``--attn-scale``.
    """
    if objective not in SAMPLERS:
        raise ValueError(f"objective {objective!r} has no samplers; use 'ddpm' (FiT v1) or 'flow' (FiTv2)")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not known; choose one of {RECIPES} (or None for the defaults)")
    v1, released = objective == "ddpm", recipe == "released"
    if v1:
        sampler = {"sampler": "ddpm", "steps": 250, "atol": None, "rtol": None}
    elif recipe is None:
        sampler = {"sampler": "euler", "steps": 50, "atol": None, "rtol": None}
    else:
        sampler = {"sampler": "dopri5", "steps": None, "atol": DOPRI5_ATOL, "rtol": DOPRI5_RTOL}
    return {
        **sampler,
        "guidance_channels": 3 if released else None,
        "yarn_ramp": "code" if released else "paper",
        "ntk_exponent": "head" if recipe == "paper" else "axis",
        "attn_scale": "none" if recipe is None or v1 else ("code" if released else "paper"),
    }


def t_to_fraction_for(diffusion):
    """Fraction of generation done, 0 at pure noise and 1 at data (for guidance schedules)."""
    from maskfit.diffusion.flow import RectifiedFlow
    from maskfit.diffusion.guidance import ddpm_fraction, flow_fraction

    if isinstance(diffusion, RectifiedFlow):
        return flow_fraction
    return ddpm_fraction(diffusion.num_timesteps)


def subset_denoiser(model_fn, keep_ratio: float, generator: Optional[torch.Generator] = None):
    """A denoiser that runs ``model_fn`` as masked training ran the network: on random subsets of each image's tokens.

    ``model_fn(x, t, y, layout, mask=None)`` is the network (``FiT.forward``'s arguments). Each call cuts every image
    into m = ceil(1/keep_ratio) random subsets of round(keep_ratio * n) tokens that together cover it
    (``maskfit.tokens.subset_cover``) and runs the network's *masked* forward once on m copies of the stream, copy i
    keeping subset i: each design meets exactly its training view (plain: the backbone on the kept tokens only;
    decoder, side-interpolator: the encoder on them, mask tokens elsewhere, the full grid after; mixer: its dense
    blocks first). Each token's prediction is the one from the copy that kept it (the mean where two did), as the
    training loss reads it. A model trained at keep ratio k thus meets, at every step, the k·n keys it learnt on
    rather than n (the mismatch REPORT.md's "washed out" finding is about); new subsets are drawn every call.
    keep_ratio 1 returns ``model_fn`` itself (the full grid, no mask).
    """
    if keep_ratio == 1.0:
        return model_fn
    last: list = [None, None]  # (layout, its subset_windows): a sampler covers one layout at every step

    def fn(x: Tensor, t: Tensor, y: Tensor, layout) -> Tensor:
        T, B = x.shape[0], layout.num_images
        if last[0] is not layout:  # read the layout's offsets once (a host sync), not at every network call
            last[:] = [layout, subset_windows(layout, keep_ratio)]
        cover = subset_cover(layout, keep_ratio, generator, windows=last[1])
        m = cover.subsets
        # Segment i*B + b of the cover is subset i of image b, i.e. image i*B + b of the stream repeated m times,
        # and its tokens sit at cover.index + i*T there: the cover's own layout is that stream's kept layout.
        copy = torch.div(cover.layout.seq_id, B, rounding_mode="floor")  # (T_s,) which copy holds each subset token
        view = MaskedView(cover.index + copy * T, cover.layout)
        out = model_fn(x.repeat(m, 1), t.repeat(m), y.repeat(m), layout.repeat(m), mask=view)  # (m*T, D_out)
        kept = out[view.index]  # (T_s, D_out): each copy's prediction at the tokens it kept
        total = kept.new_zeros(T, kept.shape[1]).index_add_(0, cover.index, kept)  # (T, D_out)
        return total / cover.coverage[:, None].to(kept.dtype)  # (T, D_out)

    return fn


def guided_denoiser(model: FiT, diffusion, options: SamplerOptions, generator: Optional[torch.Generator] = None):
    """The sampling denoiser: RoPE extrapolation, classifier-free guidance, and the full grid unless
    ``options.subset_keep`` < 1 (then each network call on random token subsets drawn from ``generator``)."""
    rope = options.rope

    def model_fn(x, t, y, lay, mask=None):
        # The network in options.precision (bf16 autocast: FlashAttention's dtype, the GPU's fast path); its output
        # back in fp32 before guidance and the sampler use it, so their state and arithmetic never drop to bf16.
        with autocast_for(options.precision, x.device):
            out = model(x, t, y, lay, rope=rope, mask=mask)  # (T, D_out), bf16 under autocast
        return out.float()  # (T, D_out)

    guidance = GuidanceConfig(
        scale=options.cfg_scale, null_class=model.null_class, channels=options.guidance_channels,
        schedule=options.guidance_schedule,
    )
    # Subsets below guidance: the conditional and unconditional halves each get their own draw.
    network = subset_denoiser(model_fn, options.subset_keep, generator)
    return guided(network, guidance, model.cfg.patch_size, t_to_fraction_for(diffusion))


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
    if cfg.attention == "varlen" and options.precision != "bf16":
        # Fail here, naming the fix, not inside the first FlashAttention call.
        raise ValueError(
            f"the model's attention is 'varlen' (FlashAttention, bf16 only) but precision={options.precision!r}; "
            "sample with SamplerOptions(precision='bf16'), or load the model with attention 'dense' for fp32"
        )
    dummy = [torch.empty(h * w, 0) for h, w in grids]
    layout = pack(dummy, list(grids), labels.cpu()).layout.to(device)
    noise = torch.randn(layout.num_tokens, cfg.token_dim, generator=generator, device=device)
    # Subset draws from their own generator (seeded from the sampler's), so the noise stays that of a full-grid run.
    subset_generator = torch.Generator(device=device).manual_seed(generator.initial_seed() + 1)
    fn = guided_denoiser(model, diffusion, options, subset_generator)
    # Tolerances exist for dopri5 only (flow.py); the other samplers take no such arguments.
    tolerances = {k: v for k, v in (("atol", options.atol), ("rtol", options.rtol)) if v is not None}
    tokens = diffusion.sample(
        fn, noise, labels.to(device), layout, steps=options.steps, method=options.method,
        generator=generator, progress=progress, **tolerances,
    )  # (T, D) fp32
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


def grid_cells(grid: Image.Image, height: int, width: int, pad: int = 2) -> np.ndarray:
    """The images of an ``image_grid`` of same-size (height, width) images, in order: (N, height, width, 3) uint8.

    Cells that are all background (a last row that is not full) are left out."""
    canvas = np.asarray(grid.convert("RGB"))
    rows, columns = (canvas.shape[0] - pad) // (height + pad), (canvas.shape[1] - pad) // (width + pad)
    if rows < 1 or columns < 1:
        raise ValueError(f"a {grid.width}x{grid.height} grid holds no {width}x{height} cell with {pad}-pixel borders")
    cells = [canvas[pad + i * (height + pad):][:height, pad + j * (width + pad):][:, :width]
             for i in range(rows) for j in range(columns)]
    background = canvas[0, 0]
    return np.stack([c for c in cells if not (c == background).all()])


def save_adm_npz(path: Path, images: Sequence[np.ndarray], labels: Optional[np.ndarray] = None) -> None:
    """ADM sample format: arr_0 uint8 (N, H, W, 3) (all of one size), arr_1 labels when given."""
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"an ADM .npz holds images of one size; got {sorted(sizes)}: write one file per resolution")
    arrays = {"arr_0": np.stack(images)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    from maskfit.evaluate.adm_npz import _atomic_savez

    _atomic_savez(path, arrays)  # a unique temporary name beside it, then rename
