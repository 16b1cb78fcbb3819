"""FiTv2 objective and samplers: rectified flow on SiT's "Linear" interpolant, on a token stream.

Convention (FiTv2 / SiT, reference/fit.md §2.2): **t = 0 is noise, t = 1 is data**.
    x_t = t·x1 + (1 − t)·x0,   x1 = data tokens, x0 ~ N(0, I)
    u   = dx_t/dt = x1 − x0      (the velocity target)
This is SiT's "Linear" interpolant (Ma et al. 2024) as its code writes it (α_t = t, σ_t = 1 − t); the SiT paper
runs time the other way (α_t = 1 − t, σ_t = t, t = 0 data), so flip t when reading its formulas.
The model gets t ∈ [0, 1] as it is (no ×1000), one value per image, and predicts u.

Training time: FiTv2 §IV-C draws t from a logit-normal, t = sigmoid(z), z ~ N(m, s) (SD3, Esser et al. 2024,
eq. 19; FiTv2 uses m = 0, s = 1). "uniform" is SiT's U[0, 1].

Samplers integrate dx/dt = v(x, t) from t = 0 to 1: fixed-step Euler and Heun, adaptive dopri5 (what the
published FiTv2 uses for its FIDs: torchdiffeq dopri5, atol 1e-6, rtol 1e-3, reference/fit.md §2.6), and
SiT's Euler–Maruyama SDE sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from maskfit.distributed import draw

from maskfit.objective import reduce_per_image, token_weights as default_token_weights
from maskfit.tokens import TokenLayout

ModelFn = Callable[[Tensor, Tensor, Tensor, TokenLayout], Tensor]

_T_SAMPLING = ("logit_normal", "uniform")
_SAMPLERS = ("euler", "heun", "dopri5", "sde")


@dataclass
class FlowConfig:
    t_sampling: str = "logit_normal"  # FiTv2 §IV-C; "uniform" is SiT's
    # m of t = sigmoid(N(m, s)). Here m > 0 favours the data end; SD3 runs time the other way (t = 1 noise),
    # so an SD3 m carries over with its sign flipped. FiTv2 uses m = 0, where the two agree.
    logit_mean: float = 0.0
    logit_std: float = 1.0  # s
    # SDE sampler (SiT's sampling defaults, ``parse_sde_args``): diffusion w_t = norm·σ_t = norm·(1 − t)
    # ("sigma" form) and a last deterministic step of this size, since the score is singular at t = 1.
    sde_diffusion_norm: float = 1.0
    sde_last_step: float = 0.04

    def __post_init__(self) -> None:
        if self.t_sampling not in _T_SAMPLING:
            raise ValueError(f"t_sampling={self.t_sampling!r}; choose one of {_T_SAMPLING}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std={self.logit_std} must be > 0 (FiTv2 uses 1.0)")
        if self.sde_diffusion_norm < 0:
            raise ValueError(f"sde_diffusion_norm={self.sde_diffusion_norm} must be >= 0 (SiT uses 1.0)")
        if not (0.0 < self.sde_last_step < 1.0):
            raise ValueError(f"sde_last_step={self.sde_last_step} must be in (0, 1) (SiT uses 0.04)")


def _randn(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal draws on the generator's device (so seeded runs match across devices), moved to like's."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class RectifiedFlow:
    """Linear-path flow matching with velocity prediction on a (T, D) token stream; t is one float per image."""

    def __init__(self, config: Optional[FlowConfig] = None):
        self.config = config if config is not None else FlowConfig()

    # ------------------------------------------------------------------ path

    def sample_t(self, num_images: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """(B,) training times in (0, 1): logit-normal (SD3 eq. 19) or uniform."""
        c = self.config
        dtype = torch.promote_types(like.dtype, torch.float32)  # a bf16 t would only have 8 bits of mantissa
        device = generator.device if generator is not None else like.device
        if c.t_sampling == "uniform":
            u = draw(torch.rand, (num_images,), "segments", generator=generator, device=device, dtype=dtype)  # (B,)
            return u.to(like.device)
        z = draw(torch.randn, (num_images,), "segments", generator=generator, device=device, dtype=dtype).to(like.device)
        return torch.sigmoid(c.logit_mean + c.logit_std * z)

    @staticmethod
    def interpolate(x0: Tensor, x1: Tensor, t_tok: Tensor) -> Tensor:
        """x_t = t·x1 + (1 − t)·x0 with t_tok (T,) the time of each token."""
        t = t_tok[:, None].to(x1.dtype)  # (T, 1)
        return t * x1 + (1.0 - t) * x0

    @staticmethod
    def score_from_velocity(v: Tensor, x: Tensor, t_tok: Tensor) -> Tensor:
        """∇ log p_t(x) from the velocity for the linear path (SiT's score-velocity relation).

        x = t·x1 + (1−t)·x0 and v = E[x1 − x0 | x] give E[x0 | x] = x − t·v, and the Gaussian x0 gives
        score = −E[x0 | x] / σ_t = (t·v − x) / (1 − t). Singular at t = 1.
        """
        t = t_tok[:, None].to(x.dtype)  # (T, 1)
        return (t * v - x) / (1.0 - t)

    # ------------------------------------------------------------------ training

    def training_loss(
        self,
        model_fn: ModelFn,
        x1: Tensor,
        y: Tensor,
        layout: TokenLayout,
        generator: Optional[torch.Generator] = None,
        token_weights: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Velocity MSE ‖v̂(x_t, t) − (x1 − x0)‖², one t per image.

        Per-token loss = mean over channels; each image = mean over its real tokens (padding excluded); the
        batch loss = mean over images (FiTv2's per-sample normalisation, reference/fit.md §2.3; no loss weight,
        as FiTv2's ``loss_weight: null``). ``token_weights`` (T,) replaces the per-image token mean (masked
        training counts kept tokens only: ``maskfit.objective``). Dropped tokens of a full-grid masked design
        keep the velocity target (unlike DDPM's ε, its mean given the visible tokens is not 0:
        ``maskfit.objective``). Returns (loss, {"loss"}).
        """
        t = self.sample_t(layout.num_images, x1, generator)  # (B,)
        # draw: each rank of a many-GPU run keeps its slice of the global step's draws (maskfit.distributed)
        x0 = draw(lambda shape: _randn(shape, x1, generator), x1.shape, "tokens")  # (T, D) noise
        t_tok = t[layout.seq_id]  # (T,)
        x_t = self.interpolate(x0, x1, t_tok)  # (T, D)
        v = model_fn(x_t, t, y, layout)  # (T, D)
        if v.shape != x1.shape:
            raise ValueError(
                f"the flow model must output one velocity per input value, shape {tuple(x1.shape)}, got "
                f"{tuple(v.shape)}; FiTv2 models have learn_sigma=False (out_channels = in_channels)"
            )
        dtype = torch.promote_types(torch.promote_types(v.dtype, x1.dtype), torch.float32)  # at least fp32 under bf16
        per_token = ((v.to(dtype) - (x1 - x0).to(dtype)) ** 2).mean(dim=1)  # (T,)
        weights = token_weights if token_weights is not None else default_token_weights(layout)
        loss = reduce_per_image(per_token, weights, layout)
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        layout: TokenLayout,
        steps: int = 50,
        method: str = "euler",
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        atol: float = 1e-6,
        rtol: float = 1e-3,
    ) -> Tensor:
        """Integrate from x_0 = ``noise`` (t = 0) to data (t = 1); returns (T, D) tokens.

        - "euler": ``steps`` Euler steps on a uniform grid (``steps`` model calls).
        - "heun": ``steps`` Heun (explicit trapezoid) steps (2·``steps`` calls); 2nd order.
        - "dopri5": adaptive Dormand–Prince through torchdiffeq with ``atol``/``rtol``; ``steps`` is unused (the
          published FiTv2 passes 250 as the size of the output grid, which an adaptive solver only interpolates).
          This is the published FiTv2 protocol: dopri5, atol 1e-6, rtol 1e-3.
        - "sde": SiT's Euler–Maruyama sampler, dx = [v + w_t·s(x, t)] dt + sqrt(2 w_t) dW with the score s from
          the velocity and w_t = norm·(1 − t): ``steps``−1 stochastic steps over [0, 1 − h], then one
          deterministic step of size h = ``config.sde_last_step`` (SiT's "Mean" last step); ``steps`` calls.
          Adding w_t·s to the drift and 2w_t to the diffusion leaves every marginal p_t unchanged (Fokker–Planck).
        """
        if method not in _SAMPLERS:
            raise ValueError(f"method={method!r}; choose one of {_SAMPLERS}")
        B = layout.num_images

        def velocity(x: Tensor, t: float) -> Tensor:
            t_img = torch.full((B,), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)  # (B,)
            return model_fn(x, t_img, y, layout)  # (T, D)

        if method == "dopri5":
            return self._dopri5(velocity, noise, progress, atol, rtol)
        if method == "sde":
            return self._sde(velocity, noise, steps, generator, progress)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1 for the {method} sampler")
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()  # python floats: no host syncs
        order = range(steps)
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc=f"{method} sampling")
        x = noise
        for i in order:
            t, t_next = grid[i], grid[i + 1]
            dt = t_next - t
            v = velocity(x, t)
            if method == "euler":
                x = x + dt * v
            else:
                x_pred = x + dt * v  # Euler predictor
                x = x + 0.5 * dt * (v + velocity(x_pred, t_next))  # trapezoid corrector
        return x

    @staticmethod
    def _dopri5(velocity, noise: Tensor, progress: bool, atol: float, rtol: float) -> Tensor:
        from maskfit.extras import require

        odeint = require("torchdiffeq", "method='dopri5'", otherwise="or use method='heun'").odeint  # optional
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="dopri5 (model calls)", unit="nfe")

        def rhs(t: Tensor, x: Tensor) -> Tensor:
            if bar is not None:
                bar.update(1)
            return velocity(x, float(t))

        times = torch.tensor([0.0, 1.0], dtype=noise.dtype, device=noise.device)  # t: noise -> data
        # torchdiffeq lets an adaptive step run past the last output time and interpolates back, so the model
        # would be called at t > 1, outside its training range. step_t=[1] shortens the step that would cross
        # t = 1 to end there, so every stage stays in [0, 1]. (The published FiT instead clamps t <= 1 inside the
        # model's forward; that feeds t = 1 with an overshot x, which we avoid.)
        try:
            path = odeint(
                rhs, noise, times, method="dopri5", atol=atol, rtol=rtol, options={"step_t": [1.0]}
            )  # (2, T, D)
        finally:
            if bar is not None:
                bar.close()
        return path[-1]

    def _sde(self, velocity, noise: Tensor, steps: int, generator, progress: bool) -> Tensor:
        c = self.config
        if steps < 2:
            raise ValueError(f"steps={steps}: the SDE sampler needs >= 2 (stochastic steps plus the final mean step)")
        h = c.sde_last_step
        grid = torch.linspace(0.0, 1.0 - h, steps, dtype=torch.float64).tolist()  # (steps,) stops at 1 − h
        T = noise.shape[0]

        def drift(x: Tensor, t: float) -> tuple[Tensor, float]:
            v = velocity(x, t)
            t_tok = torch.full((T,), t, dtype=x.dtype, device=x.device)  # (T,)
            w = c.sde_diffusion_norm * (1.0 - t)  # "sigma" diffusion form
            return v + w * self.score_from_velocity(v, x, t_tok), w

        order = range(steps - 1)
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc="sde sampling")
        x = noise
        for i in order:
            t, dt = grid[i], grid[i + 1] - grid[i]
            f, w = drift(x, t)
            x = x + f * dt + math.sqrt(2.0 * w * dt) * _randn(x.shape, x, generator)  # Euler–Maruyama
        f, _ = drift(x, grid[-1])
        return x + f * h  # last step: the mean of the update, no noise (SiT's "Mean")
