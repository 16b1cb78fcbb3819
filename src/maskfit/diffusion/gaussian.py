"""FiT v1 objective and samplers: discrete-time Gaussian diffusion on a token stream.

Math sources (equation numbers refer to the arXiv versions):
- Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): forward process eq. 4,
  posterior q(x_{t-1} | x_t, x_0) eqs. 6-7, ε-parametrisation eq. 11, L_simple eq. 14.
- Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (iDDPM): learned variance
  interpolation eq. 15, hybrid loss L_simple + λ·L_vlb eq. 16 (λ = 0.001 there; here, as in ADM/DiT/FiT with
  ``rescale_learned_sigmas=False``, the VB term is added unscaled), stop-gradient on the mean for L_vlb
  (§3.1), timestep respacing (§4).
- Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): eq. 12 update, eq. 16 σ_t(η).

The published FiT (whlzy/FiT) trains exactly this: linear β 1e-4 -> 0.02, T = 1000, learned Σ, MSE + VB,
and samples with 250 respaced ancestral steps, ``clip_denoised=False`` (reference/fit.md §2.2, §2.6).

Timesteps go to the model as the integers 0..T-1 (a (B,) int64 tensor), **unclamped**. The released FiT
``forward`` clamps t to <= 1 (a leftover of the FiTv2 flow time in [0, 1]); for v1 that collapses every
t >= 1 to the same embedding, so the model could not tell noise levels apart (reference/fit.md §4.1). Do not
reintroduce that clamp in front of a v1 model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from maskfit.distributed import draw

from maskfit.objective import AUX_TARGETS, reduce_per_image, token_weights as default_token_weights
from maskfit.tokens import TokenLayout

ModelFn = Callable[[Tensor, Tensor, Tensor, TokenLayout], Tensor]

_SAMPLERS = ("ddpm", "ddim")


@dataclass
class GaussianDiffusionConfig:
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    learn_sigma: bool = True  # model outputs (ε, v): v interpolates log Σ as iDDPM eq. 15

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps={self.num_timesteps}; it must be a positive integer (FiT uses 1000)")
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end} "
                "(FiT uses 1e-4 and 0.02)"
            )


class NoiseSchedule:
    """All per-step constants of a discrete diffusion, derived from its β (float64, on the CPU).

    ``timestep_map[i]`` is the original timestep (0..T-1) that step i stands for; the model is always fed the
    original index, so a respaced schedule reuses the network trained on the full one (iDDPM §4).
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor):
        betas = betas.double().cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must be a 1-D tensor in (0, 1], got shape {tuple(betas.shape)}")
        self.betas = betas  # (S,)
        self.timestep_map = timestep_map.long().cpu()  # (S,)
        self.num_steps = betas.shape[0]
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)  # ᾱ_t, (S,)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])  # ᾱ_{t-1}, ᾱ_{-1}=1
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7: β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so its log is -inf; iDDPM replaces it with β̃_1 (the value only enters the learned-range
        # lower end at t = 0, where the decoder NLL is used).
        clipped = self.posterior_variance.clone()
        if self.num_steps > 1:
            clipped[0] = self.posterior_variance[1]
        else:
            clipped[0] = betas[0]
        self.posterior_log_variance_clipped = clipped.log()
        self.log_betas = betas.log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def linear(cls, config: GaussianDiffusionConfig) -> "NoiseSchedule":
        betas = torch.linspace(config.beta_start, config.beta_end, config.num_timesteps, dtype=torch.float64)
        return cls(betas, torch.arange(config.num_timesteps))

    def respace(self, steps: int) -> "NoiseSchedule":
        """Keep ``steps`` evenly spaced steps and recompute β so that ᾱ is unchanged on them (iDDPM §4).

        The kept indices are round(i·(T-1)/(steps-1)), i = 0..steps-1, as iDDPM's ``space_timesteps`` with one
        section (so they include 0 and T-1); new β_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}}.
        """
        T = self.num_steps
        if not (1 <= steps <= T):
            raise ValueError(f"steps={steps} must be between 1 and the {T} training timesteps")
        if steps == 1:
            kept = [T - 1]  # the one step must start from pure noise
        else:
            stride = (T - 1) / (steps - 1)
            kept = sorted({round(i * stride) for i in range(steps)})
        if len(kept) != steps:  # cannot happen for steps <= T, kept as a guard against a silent change
            raise RuntimeError(f"respacing {T} steps to {steps} kept {len(kept)} distinct steps")
        kept_t = torch.tensor(kept, dtype=torch.long)
        acp = self.alphas_cumprod[kept_t]  # (steps,)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        return NoiseSchedule(1.0 - acp / acp_prev, self.timestep_map[kept_t])


def _gather(values: Tensor, t_tok: Tensor, like: Tensor) -> Tensor:
    """(S,) float64 schedule constants indexed by (T,) step indices -> (T, 1), in at least float32 on like's device."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    # non_blocking: the constants are tiny and a blocking copy would be a host sync in every training step.
    return values.to(device=like.device, non_blocking=True)[t_tok].to(dtype)[:, None]


def _randn(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal draws on the generator's device (so seeded runs match across devices), moved to like's."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (closed form for Gaussians)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) for data on 256 bins in [-1, 1] under N(mean, e^{2 log_scale}) (DDPM §3.3, the L_0 decoder).

    As ADM/DiT/FiT this is applied to latents as they are, even though latents are not 8-bit data; the edge bins
    extend to ±∞. We use the exact normal CDF (log_ndtr for the tails) where ADM uses a tanh approximation;
    the term only enters the loss at t = 0 (1 step in 1000).
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # log P(X <= x + 1/255)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # log P(X > x - 1/255)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    middle = torch.log(cdf_delta.clamp_min(1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, middle))


class GaussianDiffusion:
    """DDPM with learned-range variance (iDDPM) on a (T, D) token stream; t is one integer per image."""

    def __init__(self, config: Optional[GaussianDiffusionConfig] = None):
        self.config = config if config is not None else GaussianDiffusionConfig()
        self.schedule = NoiseSchedule.linear(self.config)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0: Tensor, t_tok: Tensor, noise: Tensor, schedule: Optional[NoiseSchedule] = None) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε (DDPM eq. 4); t_tok (T,) is the step of each token."""
        s = schedule or self.schedule
        a = _gather(s.sqrt_alphas_cumprod, t_tok, x0)  # (T, 1)
        b = _gather(s.sqrt_one_minus_alphas_cumprod, t_tok, x0)  # (T, 1)
        return a * x0 + b * noise

    def q_posterior(
        self, x0: Tensor, x_t: Tensor, t_tok: Tensor, schedule: Optional[NoiseSchedule] = None
    ) -> tuple[Tensor, Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7), each (T, D) / (T, 1)."""
        s = schedule or self.schedule
        mean = _gather(s.posterior_mean_coef1, t_tok, x_t) * x0 + _gather(s.posterior_mean_coef2, t_tok, x_t) * x_t
        return mean, _gather(s.posterior_log_variance_clipped, t_tok, x_t)

    def predict_x0(self, x_t: Tensor, t_tok: Tensor, eps: Tensor, schedule: Optional[NoiseSchedule] = None) -> Tensor:
        """x̂_0 = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t), the inverse of eq. 4."""
        s = schedule or self.schedule
        c1 = _gather(s.sqrt_recip_alphas_cumprod, t_tok, x_t)  # (T, 1)
        c2 = _gather(s.sqrt_recipm1_alphas_cumprod, t_tok, x_t)  # (T, 1)
        return c1 * x_t - c2 * eps

    def split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Model output (T, D_out) -> (ε̂ (T, D), v (T, D) or None), checking D_out against learn_sigma."""
        D = x.shape[1]
        if self.config.learn_sigma:
            if out.shape != (x.shape[0], 2 * D):
                raise ValueError(
                    f"learn_sigma=True needs model output (T, 2*D) = {(x.shape[0], 2 * D)}, got {tuple(out.shape)}; "
                    "build the model with out_channels = 2 * in_channels or set learn_sigma=False"
                )
            return out[:, :D], out[:, D:]
        if out.shape != x.shape:
            raise ValueError(
                f"learn_sigma=False needs model output shaped like x {tuple(x.shape)}, got {tuple(out.shape)}; "
                "set learn_sigma=True for a model that also predicts the variance"
            )
        return out, None

    def p_mean_variance(
        self, eps: Tensor, v: Optional[Tensor], x_t: Tensor, t_tok: Tensor, schedule: Optional[NoiseSchedule] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log variance and x̂_0 of p(x_{t-1} | x_t).

        Variance: learned range log Σ = (v+1)/2 · log β_t + (1-(v+1)/2) · log β̃_t (iDDPM eq. 15; v is the raw
        network output, ~[-1, 1] but not clipped, as iDDPM). Without a learned variance, the fixed "large"
        choice σ² = β_t of DDPM §3.2 (β̃_1 at t = 0), as iDDPM's FIXED_LARGE.
        """
        s = schedule or self.schedule
        if v is None:
            large = torch.cat([s.posterior_variance[1:2], s.betas[1:]]) if s.num_steps > 1 else s.betas
            log_var = _gather(large.log(), t_tok, x_t).expand_as(x_t)  # (T, D)
        else:
            frac = (v + 1.0) / 2.0  # (T, D)
            max_log = _gather(s.log_betas, t_tok, x_t)  # (T, 1) log β_t
            min_log = _gather(s.posterior_log_variance_clipped, t_tok, x_t)  # (T, 1) log β̃_t
            log_var = frac * max_log + (1.0 - frac) * min_log  # (T, D)
        x0 = self.predict_x0(x_t, t_tok, eps, s)
        mean, _ = self.q_posterior(x0, x_t, t_tok, s)
        return mean, log_var, x0

    # ------------------------------------------------------------------ training

    def vb_terms(self, x0: Tensor, x_t: Tensor, t_tok: Tensor, eps: Tensor, v: Tensor) -> Tensor:
        """(T,) per-token L_vlb term in bits, mean over channels (iDDPM eq. 16's L_vlb, DDPM eq. 5).

        t >= 1: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)); t = 0: decoder NLL -log p(x_0|x_1).
        Callers pass ``eps.detach()`` so this term only trains the variance (iDDPM §3.1).
        """
        true_mean, true_log_var = self.q_posterior(x0, x_t, t_tok)
        mean, log_var, _ = self.p_mean_variance(eps, v, x_t, t_tok)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / math.log(2.0)  # (T,)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)  # (T,)
        return torch.where(t_tok == 0, nll, kl)

    def training_loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        y: Tensor,
        layout: TokenLayout,
        generator: Optional[torch.Generator] = None,
        token_weights: Optional[Tensor] = None,
        aux_tokens: Optional[Tensor] = None,
        aux_target: str = "noisy_input",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hybrid loss L_simple + L_vlb (iDDPM eq. 16, VB unscaled as DiT/FiT) over a token stream.

        x0: (T, D) clean tokens; y: (B,) labels (already label-dropped for CFG); one t ~ U{0..T-1} per image.
        Per-token loss = mean over channels; each image = mean over its real tokens (``maskfit.objective``, padding
        excluded); the batch loss = mean over images, so every image weighs the same whatever its length
        (FiT's per-sample N/N_valid normalisation, reference/fit.md §2.3).
        ``token_weights`` (T,) replaces the per-image token mean (masked training counts kept tokens only:
        ``maskfit.objective``).
        ``aux_tokens`` (T,) bool marks the dropped tokens of a full-grid masked design (the model never saw
        their x_t). There the ε channels are fitted to ``aux_target`` ("noisy_input": x_t, MaskDiT; "x0")
        instead of ε, whose conditional mean there is 0, with the weight ``token_weights`` gives them
        (aux / n_dropped); the VB term counts the other tokens only (``maskfit.objective`` says why).
        Returns (loss, {"loss", "mse", "vb", and "aux" with aux_tokens}) with detached terms for logging;
        loss = mse + vb + aux.
        """
        if aux_target not in AUX_TARGETS:
            raise ValueError(f"aux_target={aux_target!r}; choose one of {AUX_TARGETS} (mask.aux_target)")
        B = layout.num_images
        tdev = generator.device if generator is not None else x0.device
        # draw: each rank of a many-GPU run keeps its slice of the global step's draws (maskfit.distributed)
        t = draw(lambda shape, **kw: torch.randint(0, self.num_timesteps, shape, **kw), (B,), "segments",
                 generator=generator, device=tdev).to(x0.device)  # (B,)
        noise = draw(lambda shape: _randn(shape, x0, generator), x0.shape, "tokens")  # (T, D)
        t_tok = t[layout.seq_id]  # (T,)
        x_t = self.q_sample(x0, t_tok, noise)  # (T, D)
        out = model_fn(x_t, t, y, layout)  # (T, D_out); t as integers, unclamped (see module docstring)
        eps, v = self.split_output(out, x0)

        weights = token_weights if token_weights is not None else default_token_weights(layout)
        zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
        # Kept (or all real) tokens: ε target and the VB term; dropped tokens: the auxiliary target only.
        seen_weights = weights if aux_tokens is None else torch.where(aux_tokens, zero, weights)  # (T,)
        per_token = ((noise - eps) ** 2).mean(dim=1)  # (T,) L_simple, DDPM eq. 14
        # images_of=weights: every term divides by the images of the whole loss, so the terms add up to it.
        terms = {"mse": reduce_per_image(per_token, seen_weights, layout, images_of=weights)}
        if v is not None:
            # Stop-gradient on ε for the VB term: it trains Σ only, L_simple trains the mean (iDDPM §3.1).
            vb_tok = self.vb_terms(x0, x_t, t_tok, eps.detach(), v)  # (T,)
            terms["vb"] = reduce_per_image(vb_tok, seen_weights, layout, images_of=weights)
        if aux_tokens is not None:
            target = x_t if aux_target == "noisy_input" else x0  # (T, D)
            aux_tok = ((target - eps) ** 2).mean(dim=1)  # (T,)
            aux_weights = torch.where(aux_tokens, weights, zero)  # (T,) aux / n_dropped
            terms["aux"] = reduce_per_image(aux_tok, aux_weights, layout, images_of=weights)
        loss = sum(terms.values())
        logs = {k: val.detach() for k, val in terms.items()}
        logs["loss"] = loss.detach()
        return loss, logs

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        layout: TokenLayout,
        steps: int = 250,
        method: str = "ddpm",
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
    ) -> Tensor:
        """Generate x_0 tokens (T, D) from x_T = ``noise`` with ``steps`` respaced steps.

        method="ddpm": ancestral sampling (DDPM Alg. 2) with the learned-range variance, ``clip_denoised=False``;
        FiT's reported FIDs use this with steps=250 (reference/fit.md §2.6).
        method="ddim": DDIM eq. 12 with σ_t(η) of eq. 16 (η=0 deterministic, η=1 ≈ DDPM with β̃ variance);
        the variance half of the output is ignored.
        """
        if method not in _SAMPLERS:
            raise ValueError(f"method={method!r}; choose one of {_SAMPLERS}")
        if not (0.0 <= eta <= 1.0):
            # eta > 1 makes σ_t^2 exceed 1 - ᾱ_{t-1} and the eq. 12 direction term imaginary.
            raise ValueError(f"eta={eta} must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)")
        s = self.schedule.respace(steps)
        B, T = layout.num_images, noise.shape[0]
        x = noise
        order = range(steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, total=steps, desc=f"{method} sampling")
        for i in order:
            t_tok = torch.full((T,), i, dtype=torch.long, device=x.device)  # (T,) index into the respaced schedule
            t_model = torch.full((B,), int(s.timestep_map[i]), dtype=torch.long, device=x.device)  # (B,) original t
            eps, v = self.split_output(model_fn(x, t_model, y, layout), x)
            if method == "ddpm":
                mean, log_var, _ = self.p_mean_variance(eps, v, x, t_tok, s)
                x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * _randn(x.shape, x, generator)
            else:
                x = self._ddim_step(x, eps, t_tok, s, eta, generator, last=i == 0)
        return x

    def _ddim_step(
        self, x: Tensor, eps: Tensor, t_tok: Tensor, s: NoiseSchedule, eta: float, generator, last: bool
    ) -> Tensor:
        """One DDIM update (Song et al. 2021 eq. 12) from step t to the previous kept step."""
        a, a_prev = s.alphas_cumprod, s.alphas_cumprod_prev  # (S,) float64: ᾱ_t, ᾱ_{t-1}
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()  # (S,) eq. 16
        # In float64, 1 - ᾱ_{t-1} - σ² >= 0 for η <= 1 (it is exactly 0 at the last step, where ᾱ_{-1} = 1).
        dir_coef = (1 - a_prev - sigma**2).sqrt()  # (S,) weight of the "direction pointing to x_t"
        x0 = self.predict_x0(x, t_tok, eps, s)  # (T, D)
        x = _gather(a_prev.sqrt(), t_tok, x) * x0 + _gather(dir_coef, t_tok, x) * eps  # (T, D)
        if not last and eta > 0:
            x = x + _gather(sigma, t_tok, x) * _randn(x.shape, x, generator)
        return x
