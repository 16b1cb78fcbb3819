"""The published FiT code (github.com/whlzy/FiT) timed on `maskfit bench`'s workload, in the same process.

Nothing of that repository is part of maskfit: the user passes the root of a checkout
(``maskfit bench --published-fit PATH``) and we import its model class ``fit.model.fit_model.FiT``
and its ``create_diffusion`` unchanged. What we add is only what its training script
(``train_fit.py``) does around them, rebuilt from its description:

- inputs as its latent loader makes them: tokens padded to the 256-token budget, then cut to the
  batch's longest image (``N_batch``), laid out (B, C, N); ``grid`` (B, 2, N) holds each token's
  *column* in row 0 and *row* in row 1 (its RoPE reads them in that order), zeros on padding;
  ``mask`` (B, N) is 1 on real tokens; ``size`` (B, 1, 2) is (h, w) in tokens;
- one step: uniform t in [0, 1000), ``diffusion.training_losses`` under bf16 autocast, mean loss,
  backward, gradient clipping at 1.0 (its config's ``max_grad_norm``), ``torch.optim.AdamW`` with
  default (non-fused) kernels, and no ``torch.compile``, as the published script runs;
- FiTv2 presets: the same class with ``configs/fitv2/config_fitv2_xl.yaml``'s network settings
  (``use_sit``: tokens laid out (B, N, C)) and its rectified-flow ``create_transport`` objective
  (imported only for these rows; it needs torchdiffeq).

Two things the checkout lacks are supplied so it imports: ``fit.model.sincos`` (imported by
``fit_model.py`` but absent from the repository; the RoPE model never calls it) becomes a stub that
raises if called. Its other imports (timm, einops, triton, tqdm, safetensors, PIL) must be installed.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

_FITV2 = dict(use_swiglu=True, use_swiglu_large=False, learn_sigma=False, use_sit=True, q_norm="layernorm",
              k_norm="layernorm", qk_norm_weight=False, adaln_type="lora")
# Our presets in the published class's keyword arguments (configs/fit/config_fit_xl.yaml's keys).
# "swiglu_large" = SwiGLU hidden 4d (the papers' FiT); without it the hidden is 2/3 of that (DiT-B-sized).
PUBLISHED_KWARGS: Dict[str, dict] = {
    "FiT-B/2-dit": dict(hidden_size=768, depth=12, num_heads=12, use_swiglu=True, use_swiglu_large=False),
    "FiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, use_swiglu=True, use_swiglu_large=True),
    "FiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, use_swiglu=True, use_swiglu_large=True),
    # FiTv2 (configs/fitv2/config_fitv2_xl.yaml's network_config): SiT-style inputs (B, N, C), no learned sigma,
    # QK LayerNorm without affine, AdaLN-LoRA of rank d/4; trained with the published rectified-flow transport.
    "FiTv2-B/2": dict(hidden_size=768, depth=15, num_heads=12, adaln_lora_dim=192, **_FITV2),
    "FiTv2-XL/2": dict(hidden_size=1152, depth=36, num_heads=16, adaln_lora_dim=288, **_FITV2),
}
COMMON_KWARGS = dict(context_size=256, patch_size=2, in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1,
                     num_classes=1000, learn_sigma=True, rel_pos_embed="rope")


def load_published_fit(repo: Path):
    """Import (FiT class, create_diffusion, create_transport) from a whlzy/FiT checkout at `repo`."""
    repo = Path(repo).resolve()
    if not (repo / "fit" / "model" / "fit_model.py").is_file():
        raise FileNotFoundError(
            f"--published-fit {repo}: no fit/model/fit_model.py there; pass the root of a checkout of "
            "https://github.com/whlzy/FiT (git clone it, or copy it in an ignored folder and carry it)"
        )
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    try:
        importlib.import_module("fit.model.sincos")
    except ModuleNotFoundError:
        sys.modules["fit.model.sincos"] = _sincos_stub()
    fit_model = importlib.import_module("fit.model.fit_model")
    diffusion = importlib.import_module("fit.scheduler.improved_diffusion")
    return fit_model.FiT, diffusion.create_diffusion, _create_transport


def _create_transport(**kwargs):
    """The published rectified-flow objective (FiTv2), imported only when a FiTv2 row asks for it."""
    return importlib.import_module("fit.scheduler.transport").create_transport(**kwargs)


def _sincos_stub() -> types.ModuleType:
    module = types.ModuleType("fit.model.sincos")

    def get_2d_sincos_pos_embed_from_grid(*args, **kwargs):
        raise NotImplementedError("fit.model.sincos is missing from the published repository; "
                                  "maskfit's stub only lets the RoPE model import")

    module.get_2d_sincos_pos_embed_from_grid = get_2d_sincos_pos_embed_from_grid
    return module


def published_inputs(grids: Sequence[Tuple[int, int]], token_dim: int, budget: int = 256, seed: int = 0):
    """The published loader's batch for images of token grids `grids`, cut to the longest image.

    Returns x (B, C, N) float, grid (B, 2, N) long (column, row), mask (B, N) float, size (B, 1, 2) int32.
    """
    lengths = [h * w for h, w in grids]
    if max(lengths) > budget:
        raise ValueError(f"an image has {max(lengths)} tokens, over the budget {budget}")
    n = max(lengths)  # train_fit.py: N_batch = max over the batch of h * w
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(grids), token_dim, n)
    grid = torch.zeros(len(grids), 2, n, dtype=torch.long)
    mask = torch.zeros(len(grids), n)
    size = torch.zeros(len(grids), 1, 2, dtype=torch.int32)
    for b, (h, w) in enumerate(grids):
        idx = torch.arange(h * w)
        x[b, :, : h * w] = torch.randn(token_dim, h * w, generator=g)
        grid[b, 0, : h * w] = idx % w  # column first: the published RoPE reads grid[:, 0] as the width index
        grid[b, 1, : h * w] = idx // w
        mask[b, : h * w] = 1.0
        size[b, 0] = torch.tensor([h, w])
    return x, grid, mask, size


def bench_published_train_step(repo: Path, preset: str, batch_size: int = 256, steps: int = 20, warmup: int = 5,
                               seed: int = 0, device: str = "cuda"):
    """One `maskfit bench` row (mode "published") for the published FiT on the same workload."""
    from maskfit.bench import BenchResult, design_flops, imagenet_like_grids, peak_tflops, time_steps
    from maskfit.models.transformer import count_parameters, model_config

    if preset not in PUBLISHED_KWARGS:
        raise ValueError(f"--published-fit has no settings for preset {preset!r}; use one of {sorted(PUBLISHED_KWARGS)}")
    fit_class, create_diffusion, create_transport = load_published_fit(repo)
    dev = torch.device(device)
    torch.manual_seed(seed)
    kwargs = {**COMMON_KWARGS, **PUBLISHED_KWARGS[preset]}
    model = fit_class(**kwargs).to(dev).train()
    ours = model_config(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grids = imagenet_like_grids(batch_size, seed=seed)
    x, grid, mask, size = (t.to(dev) for t in published_inputs(grids, ours.token_dim, seed=seed))
    y = torch.randint(0, 1000, (batch_size,), generator=torch.Generator().manual_seed(seed)).to(dev)
    model_kwargs = dict(y=y, grid=grid, mask=mask, size=size)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    if kwargs.get("use_sit"):
        # FiTv2: the transport of configs/fitv2/config_fitv2_xl.yaml (linear path, velocity, lognorm t) on (B, N, C).
        transport = create_transport(path_type="Linear", prediction="velocity", snr_type="lognorm")
        x = x.transpose(1, 2).contiguous()

        def losses():
            return transport.training_losses(model, x, model_kwargs)["loss"]
    else:
        diffusion = create_diffusion(timestep_respacing="")

        def losses():
            t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=dev)
            return diffusion.training_losses(model, x, t, model_kwargs)["loss"]

    def step():
        with amp:
            loss = losses().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    elapsed, peak_mem, loss = time_steps(step, warmup, steps, dev)
    n_real: List[int] = [h * w for h, w in grids]
    useful = sum(design_flops(ours, n, n) for n in n_real)  # real tokens only, as for our rows
    tflops = useful / (elapsed / steps) / 1e12
    peak = peak_tflops(dev)
    return BenchResult(
        mode="published", design="plain", model=preset, params_m=count_parameters(model) / 1e6, batch=batch_size,
        attention="SDPA + bool mask (published code)", compiled=False, tokens_real=sum(n_real),
        tokens_backbone=batch_size * x.shape[-1], ms_per_step=round(1000 * elapsed / steps, 2),
        images_per_s=round(batch_size / (elapsed / steps), 1), peak_mem_gib=peak_mem,
        useful_tflops=round(tflops, 1), mfu=None if peak is None else round(tflops / peak, 3), loss=float(loss.detach()),
    )
