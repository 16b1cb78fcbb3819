"""FiT (Lu et al. 2024) and FiTv2 (Wang et al. 2024) diffusion transformers over a token stream.

The backbone maps (tokens, t, y, layout) -> tokens; the diffusion parameterisation lives outside
(``maskfit.diffusion``). Tokens of many images travel as one stream (``maskfit.tokens``); per-image
conditioning (timestep, label, adaLN modulation) is computed once per image and gathered per token.

FiT v1: 2D RoPE, SwiGLU (hidden 4d, with biases as in the released code), adaLN-Zero (DiT), learned
sigma. FiTv2 adds QK LayerNorm (no affine), AdaLN-LoRA (per block SiLU -> d->r->6d, plus one global
d->6d modulation added to every block, FiTv2 eq. 11) and SwiGLU of hidden (int(4d)*2)//3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from maskfit.models.attention import ATTENTION_BACKENDS, AttentionPlan, attention, prepare_attention
from maskfit.models.rope import RopeExtrapolation, RopeTables, apply_rope, rope_tables
from maskfit.models.segments import TokensOfImages
from maskfit.models.swiglu_backward import swiglu
from maskfit.tokens import MaskedView, TokenLayout


MASK_DESIGNS = ("plain", "decoder", "mixer", "side_interp")


@dataclass
class ModelConfig:
    """Architecture of a FiT/FiTv2 backbone. Presets below reproduce the papers' size tables."""

    version: int = 1  # 1: FiT, 2: FiTv2
    depth: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    ffn_hidden: int = 3072  # SwiGLU hidden width
    patch_size: int = 2
    in_channels: int = 4  # latent channels (3 in pixel space)
    num_classes: int = 1000  # one extra embedding row is the null class for guidance
    learn_sigma: bool = True  # FiT v1 predicts eps and the variance interpolation (2x channels)
    qk_norm: bool = False  # FiTv2: parameter-free LayerNorm on each head's q and k
    adaln: str = "full"  # "full": per block d->6d | "lora": per block d->r->6d plus a global d->6d
    adaln_lora_rank: int = 0
    rope_theta: float = 10000.0
    attention: str = "dense"  # "dense" | "varlen" | "flex"
    # Masked training designs (reference/masked.md). "plain" adds no module: the backbone runs on the kept
    # tokens and predicts only them. The others add modules that see the full grid:
    #   "decoder": MaskDiT light decoder on the full grid with a learnable mask token (Zheng et al. 2023 §3);
    #   "mixer": MicroDiT dense patch-mixer blocks on all tokens before dropping (Sehwag et al. 2024 §3);
    #   "side_interp": MDT side-interpolator before the last blocks, which run on the full grid (Gao et al. 2023 §3.2).
    mask_design: str = "plain"
    # MaskDiT's decoder is 8 blocks x 512 (16 heads) behind a 28 x 1152 encoder (DiT-XL): per token it
    # costs ~5.6 % of the encoder. Scaled to a 12 x 768 backbone that is 1.5 blocks of 512; we default to
    # 1 block with head dim 64 (FlashAttention's efficient size). Set XL's 8 x 512 x 16 explicitly.
    decoder_depth: int = 1
    decoder_hidden: int = 512
    decoder_heads: int = 8
    # MaskDiT adds a fixed 2D sin-cos position embedding to the decoder's input, after the mask tokens are put
    # in (its `decoder_pos_embed`), so dropped positions differ by more than their RoPE rotation. Off by default:
    # the study's decoder runs before 2026-12-02 had none.
    decoder_pos_embed: bool = False
    mixer_depth: int = 2
    side_decode_depth: int = 2  # backbone blocks after the side-interpolator (MDT's decode_layer)

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"ModelConfig.version={self.version}; use 1 (FiT) or 2 (FiTv2)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"head dim {self.hidden_size // self.num_heads} must be a multiple of 4 for 2D RoPE; "
                "change hidden_size or num_heads"
            )
        if self.adaln not in ("full", "lora"):
            raise ValueError(f"ModelConfig.adaln={self.adaln!r}; use 'full' or 'lora'")
        if self.adaln == "lora" and self.adaln_lora_rank <= 0:
            raise ValueError("adaln='lora' needs adaln_lora_rank > 0 (FiTv2 uses hidden_size // 4)")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}; choose one of {ATTENTION_BACKENDS}")
        if self.mask_design not in MASK_DESIGNS:
            raise ValueError(f"ModelConfig.mask_design={self.mask_design!r}; choose one of {MASK_DESIGNS}")
        if self.mask_design == "decoder" and (self.decoder_hidden // self.decoder_heads) % 4:
            raise ValueError(
                f"decoder head dim {self.decoder_hidden}/{self.decoder_heads} must be a multiple of 4 for 2D RoPE"
            )
        if self.decoder_pos_embed and self.mask_design != "decoder":
            raise ValueError(
                f"decoder_pos_embed=True applies to mask_design='decoder' (got {self.mask_design!r}); "
                "set mask.design='decoder' or leave mask.decoder_pos_embed off"
            )
        if self.mask_design == "side_interp" and not 0 < self.side_decode_depth < self.depth:
            raise ValueError(f"side_decode_depth={self.side_decode_depth} must be in 1..depth-1 ({self.depth - 1})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_dim(self) -> int:
        return self.patch_size**2 * self.in_channels

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


def _fit_v1(depth: int, hidden: int, heads: int, ffn_hidden: Optional[int] = None) -> ModelConfig:
    # FiT v1: "use_swiglu_large" -> hidden int(4d) unless given.
    return ModelConfig(1, depth, hidden, heads, ffn_hidden or 4 * hidden, learn_sigma=True)


def _fit_v2(depth: int, hidden: int, heads: int) -> ModelConfig:
    return ModelConfig(
        2, depth, hidden, heads, ffn_hidden=(4 * hidden * 2) // 3, learn_sigma=False, qk_norm=True,
        adaln="lora", adaln_lora_rank=hidden // 4,
    )


# Size registry. v1 sizes follow FiT Tab.5/6 (S, L from mindone's registry; B, XL from the papers);
# v2 sizes follow FiTv2 Tab.I. Counts for 4 latent channels and 1000 classes are pinned by tests.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "FiT-S/2": _fit_v1(12, 384, 6),
    "FiT-B/2": _fit_v1(12, 768, 12),  # the papers' 159M
    "FiT-B/2-dit": _fit_v1(12, 768, 12, ffn_hidden=2048),  # DiT-B-sized SwiGLU 2048 (130.3M), for speed figures
    "FiT-L/2": _fit_v1(24, 1024, 16),
    "FiT-XL/2": _fit_v1(28, 1152, 16),
    "FiTv2-B/2": _fit_v2(15, 768, 12),
    "FiTv2-XL/2": _fit_v2(36, 1152, 16),
    "FiTv2-3B/2": _fit_v2(40, 2304, 24),
    # Tiny models for tests and the CPU demo.
    "FiT-tiny": ModelConfig(1, 2, 64, 4, 128, learn_sigma=True),
    "FiTv2-tiny": ModelConfig(2, 2, 64, 4, 128, learn_sigma=False, qk_norm=True, adaln="lora", adaln_lora_rank=16),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. in_channels=3 for pixel space)."""
    if name not in MODEL_PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features [cos, sin] (DiT; Vaswani et al. 2017 §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, d)


class SwiGLU(nn.Module):
    """W2 (SiLU(W_g x) * W_x x) (Shazeer 2020); biases as in FiT's released code.

    W_g and W_x are stored as one (2h, d) matrix so both run as one matmul; the parameter count is
    that of two separate layers, and initialize_weights() initialises each half like its own layer.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden)  # rows [0, h): gate W_g, rows [h, 2h): value W_x
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(swiglu(self.fc1(x)))  # (T, 2h) -> (T, h) -> (T, d)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm

    def forward(self, x: Tensor, rope: RopeTables, plan: AttentionPlan) -> Tensor:
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads).unbind(1)  # (T, H, D_h) each
        if self.qk_norm:
            # FiTv2: LayerNorm without affine over each head's dimension, before RoPE.
            q = F.layer_norm(q, q.shape[-1:], eps=1e-6)
            k = F.layer_norm(k, k.shape[-1:], eps=1e-6)
        # Under autocast layer_norm returns fp32; FlashAttention kernels take bf16/fp16 only.
        q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)  # (T, H, D_h)
        out = attention(q, k, v, plan)  # (T, H, D_h)
        return self.proj(out.reshape(T, D))  # (T, d)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class FiTBlock(nn.Module):
    """Pre-norm block with adaLN-Zero modulation (DiT §3.2), per-image modulation gathered per token."""

    def __init__(
        self, width: int, num_heads: int, ffn_hidden: int, cond_dim: int, qk_norm: bool,
        adaln: str = "full", adaln_lora_rank: int = 0,
    ):
        super().__init__()
        self.attn = Attention(width, num_heads, qk_norm)
        self.ffn = SwiGLU(width, ffn_hidden)
        if adaln == "full":
            self.adaLN = nn.Linear(cond_dim, 6 * width)
        else:
            # AdaLN-LoRA (FiTv2 eq. 11): W2_i W1_i (c) with rank r, no nonlinearity in between.
            self.adaLN = nn.Sequential(nn.Linear(cond_dim, adaln_lora_rank), nn.Linear(adaln_lora_rank, 6 * width))

    @classmethod
    def backbone(cls, cfg: ModelConfig) -> "FiTBlock":
        return cls(cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden, cfg.hidden_size, cfg.qk_norm, cfg.adaln, cfg.adaln_lora_rank)

    def forward(self, x: Tensor, cond: Tensor, global_mod: Optional[Tensor], stream: "_Stream") -> Tensor:
        """x: (T, w) tokens of the stream; cond: (B, d); global_mod: (B, 6w) or None -> (T, w)."""
        mod = self.adaLN(cond)  # (B, 6w), cond is SiLU(c)
        if global_mod is not None:
            mod = mod + global_mod
        # Each chunk repeated on its own, so the backward's per-image sums stay six reductions of products
        # Inductor fuses, not one reduction of a (T, 6w) gradient it would first write out (segments.py).
        shift1, scale1, gate1, shift2, scale2, gate2 = (stream.per_token(m) for m in mod.chunk(6, dim=-1))  # (T, w)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine: adaLN supplies scale and shift
        x = x + gate1 * self.attn(modulate(h, shift1, scale1), stream.tables, stream.plan)  # (T, w)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        x = x + gate2 * self.ffn(modulate(h, shift2, scale2))  # (T, w)
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.adaLN = nn.Linear(cond_dim, 2 * width)  # plain adaLN also in FiTv2 (no global term)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, cond: Tensor, stream: "_Stream") -> Tensor:
        shift, scale = (stream.per_token(m) for m in self.adaLN(cond).chunk(2, dim=-1))  # (T, w) each
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))  # (T, p*p*C_out)


def sincos_2d_embedding(pos: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Fixed 2D sin-cos position embedding (MAE, He et al. 2022; MaskDiT's decoder_pos_embed): (T, 2) (row, col)
    -> (T, dim), the first half the row's 1D embedding, the second the column's, each [sin(p w_i), cos(p w_i)]
    with w_i = max_period^(-i / (dim/4)) (Vaswani et al. 2017 §3.5). Defined at any position, so it needs no
    table and follows a grid to sizes never trained on."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = max_period ** (-torch.arange(quarter, dtype=torch.float32, device=pos.device) / quarter)  # (dim/4,)
    angles = pos.float()[:, :, None] * omega  # (T, 2, dim/4)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (T, 2 * dim/2): row half, then column half


def with_mask_tokens(mask_token: Tensor, kept: Tensor, index: Tensor, num_tokens: int) -> Tensor:
    """The full stream for a full-grid decoder (MaskDiT §3, MDT §3.2): ``kept`` (T_k, w) rows at ``index`` (T_k,),
    the learnable ``mask_token`` (w,) at every dropped position -> (T, w).

    The token is repeated into a buffer of its own, not expanded: with an expanded (stride-0) view of the
    autocast copy of the token, Inductor (PyTorch 2.11 on CUDA, 2.13 on CPU) wrote index_copy's rows into that
    one-row buffer, so under torch.compile with bf16 autocast every row came out as the last kept row (eager
    was right; tests/test_masked_model.py has the case)."""
    return mask_token.to(kept.dtype).repeat(num_tokens, 1).index_copy(0, index, kept)


class _Stream:
    """A layout with its RoPE tables, attention plan and per-token repeat of per-image tensors, computed
    once and shared by every layer."""

    def __init__(self, layout: TokenLayout, head_dim: int, rope_cfg, theta: float, backend: str, tables=None):
        self.layout = layout
        self.per_token = TokensOfImages(layout)
        self.rope_cfg = rope_cfg
        self.tables = tables if tables is not None else rope_tables(
            layout.pos, layout.seq_id, layout.grid, head_dim, rope_cfg, theta
        )  # cos/sin (T, D_h)
        self.plan = prepare_attention(layout, backend)

    def subset(self, view: MaskedView, backend: str) -> "_Stream":
        # RoPE is relative, so kept tokens keep their full-grid rotations: gather, no renumbering.
        tables = RopeTables(self.tables.cos[view.index], self.tables.sin[view.index])
        return _Stream(view.layout, 0, self.rope_cfg, 0.0, backend, tables=tables)


class FiT(nn.Module):
    """FiT / FiTv2 backbone on a token stream, with optional modules for masked training."""

    # RoPE scaling used when forward() is given none (None: plain RoPE). The high-resolution stage sets
    # per-image VisionNTK here (maskfit.finetune), so every training forward scales RoPE without the loop
    # passing it; a RopeExtrapolation given to forward() (as samplers do) overrides it.
    default_rope: Optional[RopeExtrapolation] = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        out_dim = cfg.patch_size**2 * cfg.out_channels
        self.x_embedder = nn.Linear(cfg.token_dim, d)  # patch embedding on pre-patchified tokens
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)  # row num_classes = null label
        self.global_adaLN = nn.Linear(d, 6 * d) if cfg.adaln == "lora" else None
        self.blocks = nn.ModuleList(FiTBlock.backbone(cfg) for _ in range(cfg.depth))
        design = cfg.mask_design
        # The decoder design predicts through its decoder's own final layer; a backbone final layer would sit unused,
        # and DDP needs every parameter in every step's graph.
        self.final_layer = FinalLayer(d, d, out_dim) if design != "decoder" else None
        if design in ("decoder", "side_interp"):
            width = cfg.decoder_hidden if design == "decoder" else d
            self.mask_token = nn.Parameter(torch.zeros(width))  # fills dropped positions (MaskDiT, MDT)
        if design == "decoder":
            dd, dh = cfg.decoder_hidden, cfg.decoder_heads
            self.decoder_in = nn.Linear(d, dd)
            self.decoder_blocks = nn.ModuleList(
                FiTBlock(dd, dh, (4 * dd * 2) // 3, d, cfg.qk_norm) for _ in range(cfg.decoder_depth)
            )
            self.decoder_final = FinalLayer(dd, d, out_dim)
        elif design == "mixer":
            self.mixer_blocks = nn.ModuleList(FiTBlock.backbone(cfg) for _ in range(cfg.mixer_depth))
        elif design == "side_interp":
            self.side_interpolator = FiTBlock.backbone(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):  # xavier weights, zero biases (DiT, FiT)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # A second pass, after every Linear: modules() visits a SwiGLU before its child fc1, so halves set in
        # the first pass would be overwritten by a whole-matrix (2h, d) Xavier, 0.745x the published std at
        # d=768. The published code has W_g, W_x as two nn.Linear(d, h) (timm SwiGLU fc1_g / fc1_x), each
        # Xavier-uniform with bound sqrt(6 / (d + h)) and a zero bias (already zeroed above).
        for m in self.modules():
            if isinstance(m, SwiGLU):
                for half in m.fc1.weight.data.chunk(2, dim=0):  # (h, d) views: fans d and h
                    nn.init.xavier_uniform_(half)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero the last modulation layer so every block starts as the identity (adaLN-Zero).
        for block in self.modules():
            if isinstance(block, FiTBlock):
                last = block.adaLN if isinstance(block.adaLN, nn.Linear) else block.adaLN[-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        if self.global_adaLN is not None:
            nn.init.zeros_(self.global_adaLN.weight)
            nn.init.zeros_(self.global_adaLN.bias)
        # Zero output layers: the network starts by predicting 0.
        for final in (self.final_layer, getattr(self, "decoder_final", None)):  # either may be absent
            if final is not None:
                for m in (final.adaLN, final.linear):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)  # MaskDiT and MDT initialise it N(0, 0.02)

    def upgrade_state_dict(self, state: dict) -> dict:
        """Weights saved by older code, as this model names them (``maskfit.checkpoint.load_weights`` calls it).

        Decoder-design checkpoints written before 2026-12-02 carry a backbone final layer the design never used
        (removed then: DDP needs every parameter in every step's graph); its weights never reached an output."""
        if self.final_layer is None:
            return {k: v for k, v in state.items() if not k.startswith("final_layer.")}
        return state

    def upgrade_optimizer_state(self, state: dict, names: list[str]) -> dict:
        """An index-keyed optimizer state saved by older code, as this model's optimizer holds it.

        ``names``: the optimizer's parameters' names in its order. A decoder checkpoint written before
        2026-12-02 also holds the four parameters of the backbone final layer, registered after the blocks and
        before ``decoder_in`` (named_parameters lists the mask token, a direct parameter, first), so every later index
        is shifted by four; those four entries are dropped and the rest renumbered, one group holding them all as
        ``maskfit train`` builds it. Any other state is returned unchanged."""
        groups = state.get("param_groups", [])
        saved = sum(len(g["params"]) for g in groups)
        if (self.final_layer is not None or len(groups) != 1 or saved != len(names) + 4
                or "decoder_in.weight" not in names):
            return state
        at = names.index("decoder_in.weight")
        legacy = set(range(at, at + 4))
        renumber = {old: new for new, old in enumerate(i for i in range(saved) if i not in legacy)}
        return {"state": {renumber[i]: v for i, v in state["state"].items() if i not in legacy},
                "param_groups": [{**groups[0], "params": list(range(len(names)))}]}

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def condition(self, t: Tensor, y: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Per-image conditioning: SiLU(t_emb + y_emb) (B, d) and the FiTv2 global modulation (B, 6d)."""
        cond = F.silu(self.t_embedder(t) + self.y_embedder(y))  # (B, d)
        global_mod = self.global_adaLN(cond) if self.global_adaLN is not None else None
        return cond, global_mod

    def predicts_dropped_tokens(self) -> bool:
        """Whether a masked forward also outputs the dropped tokens (full-grid decoders)."""
        return self.cfg.mask_design in ("decoder", "side_interp")

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        layout: TokenLayout,
        rope: Optional[RopeExtrapolation] = None,
        mask: Optional[MaskedView] = None,
    ) -> Tensor:
        """x: (T, p*p*C) noisy tokens of the full stream; t, y: (B,) -> (T, p*p*C_out).

        With ``mask`` the backbone runs on the kept tokens only; outputs at dropped positions are 0
        unless the design has a full-grid decoder. Padding slots output 0 (as FiT).
        """
        cfg = self.cfg
        if x.shape[-1] != cfg.token_dim:
            raise ValueError(
                f"tokens have {x.shape[-1]} values but the model expects patch^2 x channels = "
                f"{cfg.patch_size}^2 x {cfg.in_channels} = {cfg.token_dim}"
            )
        cond, global_mod = self.condition(t, y)  # (B, d), (B, 6d) or None
        rope = rope if rope is not None else self.default_rope
        full = _Stream(layout, cfg.head_dim, rope, cfg.rope_theta, cfg.attention)
        if mask is not None and cfg.mask_design != "mixer":
            h = self.x_embedder(x[mask.index])  # (T_k, d): dropped tokens are never embedded
        else:
            h = self.x_embedder(x)  # (T, d)
        if cfg.mask_design == "mixer":
            for block in self.mixer_blocks:  # dense context on every token before dropping (MicroDiT)
                h = block(h, cond, global_mod, full)  # (T, d)
        if mask is None:
            out = self._unmasked(h, cond, global_mod, full)
            if self.training and hasattr(self, "mask_token"):
                out = out + 0.0 * self._masked_only_parameters_sum()
        else:
            out = self._masked(h, cond, global_mod, full, mask)
        if layout.valid is not None:
            out = out * layout.valid[:, None].to(out.dtype)
        return out

    def _masked_only_parameters_sum(self) -> Tensor:
        """The sum of the parameters only a masked step uses (mask token; MDT's side-interpolator), for a zero-weighted
        term in an unmasked training step (the unmasked fine-tune): DDP must see a gradient for every parameter in
        every step, and MaskDiT's loss adds 0 * mask_token.sum() in its fine-tune for the same reason."""
        total = self.mask_token.sum()
        if self.cfg.mask_design == "side_interp":
            total = total + sum(p.sum() for p in self.side_interpolator.parameters())
        return total

    def _run_blocks(self, h, cond, global_mod, stream: _Stream, blocks) -> Tensor:
        for block in blocks:
            h = block(h, cond, global_mod, stream)
        return h

    def _decode(self, h: Tensor, cond: Tensor, full: _Stream) -> Tensor:
        """MaskDiT decoder on the full stream: (T, dd) -> (T, p*p*C_out)."""
        cfg = self.cfg
        if cfg.decoder_pos_embed:
            h = h + sincos_2d_embedding(full.layout.pos, cfg.decoder_hidden).to(h.dtype)  # (T, dd)
        dec_head_dim = cfg.decoder_hidden // cfg.decoder_heads
        dec = full if dec_head_dim == cfg.head_dim else _Stream(
            full.layout, dec_head_dim, full.rope_cfg, cfg.rope_theta, cfg.attention
        )
        h = self._run_blocks(h, cond, None, dec, self.decoder_blocks)  # (T, dd)
        return self.decoder_final(h, cond, full)

    def _unmasked(self, h, cond, global_mod, full: _Stream) -> Tensor:
        h = self._run_blocks(h, cond, global_mod, full, self.blocks)  # (T, d); no side-interpolator at sampling (MDT)
        if self.cfg.mask_design == "decoder":
            return self._decode(self.decoder_in(h), cond, full)
        return self.final_layer(h, cond, full)  # (T, p*p*C_out)

    def _masked(self, h, cond, global_mod, full: _Stream, mask: MaskedView) -> Tensor:
        cfg = self.cfg
        kept = full.subset(mask, cfg.attention)
        hk = h[mask.index] if cfg.mask_design == "mixer" else h  # (T_k, d): only these reach the backbone
        T = full.layout.num_tokens
        if cfg.mask_design in ("plain", "mixer"):
            hk = self._run_blocks(hk, cond, global_mod, kept, self.blocks)  # (T_k, d)
            out_k = self.final_layer(hk, cond, kept)  # (T_k, p*p*C_out)
            return out_k.new_zeros(T, out_k.shape[1]).index_copy(0, mask.index, out_k)
        if cfg.mask_design == "decoder":
            hk = self._run_blocks(hk, cond, global_mod, kept, self.blocks)  # (T_k, d)
            hk = self.decoder_in(hk)  # (T_k, dd)
            hf = with_mask_tokens(self.mask_token, hk, mask.index, T)  # (T, dd)
            return self._decode(hf, cond, full)
        # side_interp: encoder blocks on kept tokens, the interpolator fills dropped positions from the
        # visible ones, then the last blocks run on the full grid (MDT §3.2).
        n_enc = cfg.depth - cfg.side_decode_depth
        hk = self._run_blocks(hk, cond, global_mod, kept, self.blocks[:n_enc])  # (T_k, d)
        hf = with_mask_tokens(self.mask_token, hk, mask.index, T)  # (T, d)
        interp = self.side_interpolator(hf, cond, global_mod, full)
        # Masked shortcut: visible tokens pass through unchanged; only dropped ones take the interpolation.
        hf = interp.index_copy(0, mask.index, hk)  # (T, d)
        hf = self._run_blocks(hf, cond, global_mod, full, self.blocks[n_enc:])
        return self.final_layer(hf, cond, full)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(cfg: ModelConfig, n_tokens: int, training: bool = False) -> float:
    """Real FLOPs (2 per multiply-accumulate) of one image of n_tokens through the backbone.

    Convention (written down once, used by ``maskfit bench`` for MFU):
    - every matrix multiply counts 2*M*N*K; elementwise ops, norms, softmax and RoPE are not counted;
    - attention is counted: q.k^T and attn.v are 2 * (2 * n^2 * d) per layer;
    - per-image work (timestep MLP, adaLN modulation) is counted once per image, not per token;
    - training = 3 x forward (backward costs twice the forward).
    """
    d, n = cfg.hidden_size, n_tokens
    per_token = 2 * (cfg.token_dim * d)  # patch embedding
    per_block_token = 2 * (3 * d * d + d * d + 3 * d * cfg.ffn_hidden)  # qkv, proj, SwiGLU
    per_block_attn = 2 * 2 * n * n * d  # q.k^T and attn.v
    if cfg.adaln == "full":
        per_block_image = 2 * 6 * d * d
    else:
        per_block_image = 2 * (d * cfg.adaln_lora_rank + cfg.adaln_lora_rank * 6 * d)
    per_image = 2 * (256 * d + d * d)  # timestep MLP
    per_image += 2 * 6 * d * d if cfg.adaln == "lora" else 0  # global modulation
    per_image += 2 * 2 * d * d  # final adaLN
    per_token += 2 * d * cfg.patch_size**2 * cfg.out_channels  # final linear
    forward = n * per_token + cfg.depth * (n * per_block_token + per_block_attn + per_block_image) + per_image
    return float(3 * forward if training else forward)
