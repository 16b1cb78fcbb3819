"""2D rotary position embedding (FiT §3.3) and its resolution extrapolation (FiT §3.4, FiTv2 §IV-F).

Layout (as FiT's released code): a head of dimension D_h is split in two halves of m = D_h/2; the first
half rotates with the token's row, the second with its column. Each half is standard 1D RoPE (Su et al.
2021) over m dimensions: frequencies theta_i = b^(-2i/m), i = 0 .. m/2-1, each applied to an adjacent
(interleaved) pair of channels.

Extrapolation changes the per-axis frequencies with a scale s_a = max(L_a / L_train, 1) where L_a is the
test grid side in patches (decoupled, "Vision" methods) or max(h, w) on both axes (vanilla methods), and
L_train is the training grid side (16 for a 256-token budget):

- ``pi``: position interpolation, theta / s (Chen et al. 2023).
- ``ntk`` / ``vision_ntk``: NTK-aware base change b' = b * s^(m/(m-2)) (FiT eq. 5; Def. 3.1).
- ``yarn`` / ``vision_yarn``: YaRN (Peng et al. 2023; FiT eqs. 6-8, Def. 3.2) with alpha=1, beta=32 and the
  attention temperature sqrt(1/t) = 0.1 ln s + 1 on q and k.
- attention scale (FiTv2 eq. 15): logits times max(1, log_{L_train^2}(h*w)).
- attention scale for masked training (``kept``, ours): the same entropy argument for a model that attended
  over a fraction k of each image's tokens in training (k = mask.keep_ratio): logits times
  ln(n) / ln(k * min(n, L_train^2)) for an n-token image, at least 1. At k = 1 it is FiTv2 eq. 15 (paper
  reading). Why: attention's entropy grows with ln(keys) (Chiang & Cholak 2022; the argument of eq. 15), so a
  model trained on k*n keys spreads its attention wider over the n keys sampling gives it, as when
  extrapolating to a larger image; multiplying the logits by the ratio of the logs restores the training
  entropy to first order.

Where the released code departs from the papers, the paper is the default and the code's behaviour
is an option (``reference/fit.md`` §3.3):
- NTK exponent: the code uses m/(m-2) with m = D_h/2 (the per-axis rotary width). This is the exponent
  for which NTK-aware scaling turns the lowest frequency into exactly theta/s, i.e. the one the NTK
  derivation gives for FiT's per-axis frequencies, so it is our default ("axis"). The FiT paper writes
  |D|/(|D|-2) with |D| read as the head dimension; ``ntk_exponent="head"`` selects that literal reading.
- YaRN ramp: the paper's gamma is linear in the number of rotations r(d) between alpha and beta
  (default ``yarn_ramp="paper"``); the code ramps linearly in dimension index (``"code"``).
- Attention scale: paper reading ln(h*w)/ln(L_train^2) in tokens (``"paper"``); the code's
  ln(2hw)/ln(L_train^2) switched on when 2hw > L_train^2 (``"code"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

EXTRAPOLATION_METHODS = ("none", "pi", "ntk", "yarn", "vision_ntk", "vision_yarn")
# Readings of the paper-vs-code departures above ("paper" first where the papers give one).
# FiTv2 eq. 15: off, the paper's reading, the released code's; then ours for masked training (module docstring)
ATTN_SCALES = ("none", "paper", "code", "kept")
NTK_EXPONENTS = ("axis", "head")
YARN_RAMPS = ("paper", "code")


@dataclass
class RopeExtrapolation:
    """How sampling at a grid larger than the training grid changes the rotary frequencies."""

    method: str = "none"  # one of EXTRAPOLATION_METHODS
    train_grid: tuple[int, int] = (16, 16)  # training grid side per axis (rows, cols), in patches
    attn_scale: str = "none"  # "none" | "paper" | "code" (FiTv2 eq. 15) | "kept" (masked training)
    ntk_exponent: str = "axis"  # "axis": m/(m-2), m = D_h/2 (released code) | "head": D_h/(D_h-2)
    yarn_ramp: str = "paper"  # "paper": linear in rotations r | "code": linear in dimension index
    yarn_alpha: float = 1.0
    yarn_beta: float = 32.0
    # Fraction of an image's tokens the model attended over in training (mask.keep_ratio; 1 unmasked). Only
    # attn_scale "kept" reads it.
    train_keep: float = 1.0

    def __post_init__(self):
        if self.method not in EXTRAPOLATION_METHODS:
            raise ValueError(f"unknown RoPE extrapolation {self.method!r}; choose one of {EXTRAPOLATION_METHODS}")
        for name, value, allowed in (
            ("attn_scale", self.attn_scale, ATTN_SCALES),
            ("ntk_exponent", self.ntk_exponent, NTK_EXPONENTS),
            ("yarn_ramp", self.yarn_ramp, YARN_RAMPS),
        ):
            if value not in allowed:
                raise ValueError(f"RopeExtrapolation.{name}={value!r}; choose one of {allowed}")
        if min(self.train_grid) < 1:
            raise ValueError(f"train_grid {self.train_grid} must be at least 1 patch per side")
        if not 0.0 < self.train_keep <= 1.0:
            raise ValueError(f"RopeExtrapolation.train_keep={self.train_keep}: the fraction of tokens kept in "
                             "training is in (0, 1] (mask.keep_ratio; 1 for an unmasked run)")

    @property
    def decoupled(self) -> bool:
        return self.method.startswith("vision_")


def training_grid(token_budget: int) -> tuple[int, int]:
    """L_train per axis for a run trained at ``token_budget`` tokens: the side of the square budget grid
    (16 x 16 for FiT's 256 tokens, FiT §3.4). Every sampler and sweep measures RoPE scales against it."""
    side = int(round(token_budget**0.5))
    return (side, side)


def base_frequencies(axis_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """(axis_dim/2,) float64 theta_i = b^(-2i/axis_dim), i = 0 .. axis_dim/2 - 1."""
    if axis_dim % 2:
        raise ValueError(f"each RoPE axis needs an even width; got {axis_dim} (head dim must be a multiple of 4)")
    i = torch.arange(axis_dim // 2, dtype=torch.float64, device=device)  # made on the device: no copy, no sync
    return theta ** (-2.0 * i / axis_dim)


def axis_scales(grid: Tensor, cfg: RopeExtrapolation) -> Tensor:
    """(B, 2) float64 per-image scale (s_h, s_w) >= 1 from each image's test grid (B, 2)."""
    g = grid.to(torch.float64)
    if cfg.method == "none":
        return torch.ones_like(g)
    if cfg.decoupled:
        # (B, 2): s_h = h / L_train_h, s_w = w / L_train_w (Python scalars: no host-to-device copy)
        s = torch.stack([g[:, 0] / cfg.train_grid[0], g[:, 1] / cfg.train_grid[1]], dim=1)
    else:
        # Vanilla methods: one scale from the longer side against the training side (FiT §3.4).
        s = (g.max(dim=1, keepdim=True).values / max(cfg.train_grid)).expand_as(g)
    return s.clamp_min(1.0)


def _ntk_frequencies(freqs: Tensor, s: Tensor, axis_dim: int, head_dim: int, theta: float, exponent: str) -> Tensor:
    """NTK-aware base change: b' = b * s^(k/(k-2)), k = axis_dim ("axis") or head_dim ("head")."""
    k = axis_dim if exponent == "axis" else head_dim
    new_base = theta * s ** (k / (k - 2))  # (B,)
    i = torch.arange(freqs.shape[0], dtype=torch.float64, device=s.device)
    return new_base[:, None] ** (-2.0 * i / axis_dim)  # (B, n_f)


def _yarn_frequencies(freqs: Tensor, s: Tensor, train_len: int, cfg: RopeExtrapolation, theta: float) -> Tensor:
    """YaRN "NTK-by-parts" (FiT eqs. 6-7): theta' = (1-gamma) theta/s + gamma theta."""
    n_f = freqs.shape[0]
    if cfg.yarn_ramp == "paper":
        # r(d) = L_train / (2 pi b^(2d/|D|)) = L_train * theta_d / (2 pi): rotations over the training length.
        r = train_len * freqs / (2 * math.pi)  # (n_f,)
        gamma = ((r - cfg.yarn_alpha) / (cfg.yarn_beta - cfg.yarn_alpha)).clamp(0.0, 1.0)
    else:
        # Released code (after jquesnelle/yarn): a ramp in dimension index between the indices where the
        # rotation count crosses beta (fast) and alpha (slow).
        axis_dim = 2 * n_f

        def dim_for(rotations: float) -> float:
            return axis_dim * math.log(train_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_for(cfg.yarn_beta)), 0)
        high = min(math.ceil(dim_for(cfg.yarn_alpha)), axis_dim - 1)
        if low == high:
            high += 1e-3  # avoid a zero-width ramp
        i = torch.arange(n_f, dtype=torch.float64, device=freqs.device)
        gamma = 1.0 - ((i - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - gamma) * freqs[None, :] / s[:, None] + gamma * freqs[None, :]  # (B, n_f)


def axis_frequencies(
    grid: Tensor, head_dim: int, cfg: RopeExtrapolation, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Per-image frequencies for rows and columns: two (B, D_h/4) float64 tensors."""
    # Check here, not only on the axis width: an odd head_dim (e.g. 65) floors to an even axis width and would
    # otherwise give tables one channel short of the heads, failing later in apply_rope with a shape error.
    if head_dim < 4 or head_dim % 4:
        raise ValueError(
            f"head_dim={head_dim}: 2D RoPE needs a positive multiple of 4 (two axes of interleaved pairs); "
            "change hidden_size or num_heads"
        )
    axis_dim = head_dim // 2
    freqs = base_frequencies(axis_dim, theta, device=grid.device)  # (n_f,)
    scales = axis_scales(grid, cfg)  # (B, 2)
    out = []
    for a in range(2):
        s = scales[:, a]  # (B,)
        if cfg.method == "none":
            f = freqs[None].expand(grid.shape[0], -1)
        elif cfg.method == "pi":
            f = freqs[None] / s[:, None]
        elif cfg.method in ("ntk", "vision_ntk"):
            f = _ntk_frequencies(freqs, s, axis_dim, head_dim, theta, cfg.ntk_exponent)
        else:
            f = _yarn_frequencies(freqs, s, cfg.train_grid[a], cfg, theta)
        out.append(f)
    return out[0], out[1]


def yarn_mscale(grid: Tensor, cfg: RopeExtrapolation) -> Tensor:
    """(B,) factor on q and k (logits times its square): 0.1 ln s + 1 for YaRN methods, else 1.

    With decoupled axes the paper does not say which scale; like the released code we use the larger.
    """
    if cfg.method not in ("yarn", "vision_yarn"):
        return torch.ones(grid.shape[0], dtype=torch.float64, device=grid.device)
    s = axis_scales(grid, cfg).max(dim=1).values
    return 0.1 * torch.log(s) + 1.0


def attention_logit_scale(grid: Tensor, cfg: RopeExtrapolation) -> Tensor:
    """(B,) multiplier on attention logits from FiTv2 eq. 15, or its masked-training form (1 when disabled)."""
    g = grid.to(torch.float64)
    n_test = g[:, 0] * g[:, 1]
    n_train = float(cfg.train_grid[0] * cfg.train_grid[1])
    if cfg.attn_scale == "none":
        return torch.ones_like(n_test)
    if cfg.attn_scale == "kept":
        # Keys per image in training: the kept fraction of the image, or of the budget for a larger one; at
        # least 2, so that the log is positive (a 1-token image has one key either way: factor 1).
        n_ref = (cfg.train_keep * n_test.clamp_max(n_train)).clamp_min(2.0)
        return (torch.log(n_test.clamp_min(1.0)) / torch.log(n_ref)).clamp_min(1.0)
    if cfg.attn_scale == "paper":
        return (torch.log(n_test) / math.log(n_train)).clamp_min(1.0)
    # Released code ("ntk-aware-pro2"): ln(2hw)/ln(L0^2) when 2hw > L0^2; note it exceeds 1 at 256 tokens.
    scale = torch.log(2 * n_test) / math.log(n_train)
    return torch.where(2 * n_test > n_train, scale, torch.ones_like(scale))


@dataclass
class RopeTables:
    """Per-token rotation tables shared by every attention layer of one forward pass."""

    cos: Tensor  # (T, D_h) already multiplied by the per-image q/k factor
    sin: Tensor  # (T, D_h)


def rope_tables(
    pos: Tensor,
    seq_id: Tensor,
    grid: Tensor,
    head_dim: int,
    cfg: Optional[RopeExtrapolation] = None,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> RopeTables:
    """cos/sin for every token from its own (row, col): (T, D_h) each.

    The per-image factor yarn_mscale * sqrt(logit scale) is folded into cos and sin. Both q and k are
    rotated, so their dot product carries the factor squared: YaRN's temperature and FiTv2's attention
    scale, with no change to the attention kernel.
    """
    cfg = cfg or RopeExtrapolation()
    f_h, f_w = axis_frequencies(grid, head_dim, cfg, theta)  # (B, D_h/4) each
    factor = yarn_mscale(grid, cfg) * attention_logit_scale(grid, cfg).sqrt()  # (B,): on q and on k
    cos, sin = token_cos_sin(pos, seq_id, f_h, f_w, factor, dtype)  # (T, D_h) each
    return RopeTables(cos=cos, sin=sin)


# An opaque op for torch.compile, so the tables are computed once per forward and saved for the backward.
# Written inline, AOTAutograd's partitioner judged cos/sin cheap to recompute and Inductor fused them
# into every attention layer's RoPE kernel, forward and backward: for a masked stream (whose tables are
# a gather of the full ones), and for FiTv2 (whose QK LayerNorm shares the kernel) even unmasked, that
# recomputed float64 sin and cos per head in every block: 6.0 ms of a 57 ms FiT-B/2-dit step at 50 % kept,
# 16.3 ms of a 179 ms FiTv2-XL/2 step (batch 64) on an H200 (profiled 2026-12-01).
@torch.library.custom_op("maskfit::token_cos_sin", mutates_args=())
def token_cos_sin(
    pos: Tensor, seq_id: Tensor, f_h: Tensor, f_w: Tensor, factor: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin (T, D_h) in ``dtype`` of each token's angles (computed in float64): row * f_h, col * f_w
    of its image, in interleaved pairs, times the image's factor. pos (T, 2); seq_id (T,); f_h, f_w
    (B, D_h/4); factor (B,)."""
    ang_h = pos[:, 0:1].to(torch.float64) * f_h[seq_id]  # (T, D_h/4)
    ang_w = pos[:, 1:2].to(torch.float64) * f_w[seq_id]  # (T, D_h/4)
    angles = torch.cat([ang_h, ang_w], dim=1).repeat_interleave(2, dim=1)  # (T, D_h): interleaved pairs
    scale = factor[seq_id][:, None]  # (T, 1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


@token_cos_sin.register_fake
def _token_cos_sin_shapes(pos, seq_id, f_h, f_w, factor, dtype):
    shape = (pos.shape[0], 4 * f_h.shape[1])
    return pos.new_empty(shape, dtype=dtype), pos.new_empty(shape, dtype=dtype)


def rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplication by i on each interleaved pair."""
    x = x.unflatten(-1, (-1, 2))  # (..., D_h/2, 2)
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """x: (T, H, D_h) queries or keys -> rotated (T, H, D_h)."""
    cos = tables.cos[:, None, :].to(x.dtype)  # (T, 1, D_h)
    sin = tables.sin[:, None, :].to(x.dtype)
    return x * cos + rotate_pairs(x) * sin
