"""FiT v1 Gaussian diffusion: schedule algebra, samplers with oracle denoisers, loss weighting, learning."""
import math

import pytest
import torch
from torch import nn

from maskfit.diffusion.gaussian import (
    GaussianDiffusion,
    GaussianDiffusionConfig,
    discretized_gaussian_log_likelihood,
)
from maskfit.tokens import pack, to_padded

D = 8  # values per token (p=2, C=2), small to keep the tests fast


def stream(lengths, d=D, seed=0, dtype=torch.float64):
    """A packed batch of images with the given token counts (1 x n grids), random tokens."""
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(n, d, generator=g, dtype=dtype) for n in lengths]
    return pack(toks, [(1, n) for n in lengths], torch.arange(len(lengths)))


def alpha_bar_reference(t: int) -> float:
    """ᾱ_t straight from the definition (product of 1 - β over 0..t), with linear β 1e-4..0.02, T=1000."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    return math.prod(1 - b for b in betas[: t + 1])


# ------------------------------------------------------------------------------------------ schedule


def test_q_sample_matches_closed_form():
    diff = GaussianDiffusion()
    x0 = torch.randn(3, D, dtype=torch.float64)
    noise = torch.randn(3, D, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    got = diff.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = alpha_bar_reference(ti)
        want = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)
    assert alpha_bar_reference(999) < 1e-4  # the last step is (nearly) pure noise


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule(t):
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): precision-weighted combination of two Gaussians."""
    diff = GaussianDiffusion()
    x0 = torch.randn(2, D, dtype=torch.float64)
    xt = torch.randn(2, D, dtype=torch.float64)
    beta = 1e-4 + (0.02 - 1e-4) * t / 999
    ab_prev = alpha_bar_reference(t - 1)
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    var = 1 / precision
    mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta)
    got_mean, got_logvar = diff.q_posterior(x0, xt, torch.full((2,), t))
    torch.testing.assert_close(got_mean, mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got_logvar, torch.full((2, 1), math.log(var), dtype=torch.float64))


def test_respacing_all_steps_is_identity():
    s = GaussianDiffusion().schedule
    r = s.respace(1000)
    torch.testing.assert_close(r.betas, s.betas, rtol=1e-10, atol=1e-12)
    assert torch.equal(r.timestep_map, torch.arange(1000))


def test_respacing_250_keeps_alpha_bar_on_kept_steps():
    s = GaussianDiffusion().schedule
    r = s.respace(250)
    kept = r.timestep_map
    assert kept.shape == (250,) and kept[0] == 0 and kept[-1] == 999
    assert bool((kept[1:] > kept[:-1]).all())
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-10, atol=0)
    assert s.respace(1).timestep_map.tolist() == [999]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            s.respace(bad)


def test_config_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusionConfig(beta_start=0.03, beta_end=0.02)


# ------------------------------------------------------------------------------------------ VB term


def test_vb_is_zero_for_true_mean_and_posterior_variance():
    """With ε exact and v = -1 (log Σ = log β̃_t, the true posterior variance) the KL vanishes for t >= 1."""
    diff = GaussianDiffusion()
    x0 = torch.randn(5, D, dtype=torch.float64)
    noise = torch.randn(5, D, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 700, 999])
    xt = diff.q_sample(x0, t, noise)
    vb = diff.vb_terms(x0, xt, t, noise, -torch.ones_like(x0))
    torch.testing.assert_close(vb, torch.zeros(5, dtype=torch.float64), atol=1e-8, rtol=0)
    # log Σ = log β_t differs most from log β̃_t at small t (β̃_1 ≈ β_1 / 2)
    vb_wrong_var = diff.vb_terms(x0, xt, t, noise, torch.ones_like(x0))
    assert bool((vb_wrong_var[:2] > 0.05).all())
    vb_wrong_mean = diff.vb_terms(x0, xt, t, noise + 0.1, -torch.ones_like(x0))
    assert bool((vb_wrong_mean > 1e-6).all())


def test_decoder_nll_at_t0_is_bin_probability():
    diff = GaussianDiffusion()
    x0 = torch.full((1, D), 0.3, dtype=torch.float64)
    noise = torch.zeros(1, D, dtype=torch.float64)
    t = torch.zeros(1, dtype=torch.long)
    xt = diff.q_sample(x0, t, noise)  # = sqrt(1-β_0)·x0
    v = torch.zeros_like(x0)
    mean, logvar, _ = diff.p_mean_variance(noise, v, xt, t)
    std = math.exp(0.5 * logvar[0, 0].item())
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    m = mean[0, 0].item()
    p_bin = cdf((0.3 + 1 / 255 - m) / std) - cdf((0.3 - 1 / 255 - m) / std)
    got = diff.vb_terms(x0, xt, t, noise, v)
    torch.testing.assert_close(got, torch.tensor([-math.log(p_bin) / math.log(2)], dtype=torch.float64))
    # edge bins extend to infinity: far above the top bin the likelihood is ~1
    ll = discretized_gaussian_log_likelihood(torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([0.0]))
    assert abs(ll.item()) < 1e-4


# ------------------------------------------------------------------------------------------ loss weighting


def oracle_eps(diff, data, image_error):
    """A denoiser that knows the clean tokens: returns the exact ε plus a constant error per image."""

    def model(x, t, y, layout):
        ab = diff.schedule.alphas_cumprod[t[layout.seq_id]][:, None]  # (T, 1)
        eps = (x - ab.sqrt() * data) / (1 - ab).sqrt()
        return eps + image_error[layout.seq_id][:, None]

    return model


def test_each_image_counts_once_whatever_its_length():
    diff = GaussianDiffusion(GaussianDiffusionConfig(learn_sigma=False))
    batch = stream([2, 10])
    err = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loss, logs = diff.training_loss(oracle_eps(diff, batch.tokens, err), batch.tokens, batch.y, batch.layout)
    # per image mean squared error is err_b^2; token-weighting would give (2*1 + 10*9) / 12 = 7.67
    torch.testing.assert_close(loss, torch.tensor(5.0, dtype=torch.float64))
    assert set(logs) == {"loss", "mse"}


def test_padding_tokens_are_ignored_even_with_garbage_outputs():
    diff = GaussianDiffusion(GaussianDiffusionConfig(learn_sigma=False))
    packed = stream([3, 7])
    padded = to_padded(packed, seq_len=9)
    assert not bool(padded.layout.valid.all())
    err = torch.tensor([0.5, 2.0], dtype=torch.float64)
    base = oracle_eps(diff, padded.tokens, err)

    def garbage_at_padding(x, t, y, layout):
        out = base(x, t, y, layout)
        return torch.where(layout.valid[:, None], out, torch.full_like(out, 1e6))

    loss, _ = diff.training_loss(garbage_at_padding, padded.tokens, padded.y, padded.layout)
    torch.testing.assert_close(loss, (err**2).mean())


def test_hybrid_loss_is_mse_plus_vb_and_vb_does_not_train_the_mean():
    diff = GaussianDiffusion()
    batch = stream([4, 6])
    eps_param = torch.randn(10, D, dtype=torch.float64, requires_grad=True)
    v_param = torch.zeros(10, D, dtype=torch.float64, requires_grad=True)
    seen = []

    def model(x, t, y, layout):
        seen.append((x.detach(), t))
        return torch.cat([eps_param, v_param], dim=1)

    g = torch.Generator().manual_seed(3)
    loss, logs = diff.training_loss(model, batch.tokens, batch.y, batch.layout, generator=g)
    torch.testing.assert_close(loss.detach(), logs["mse"] + logs["vb"])
    x_t, t = seen[0]
    assert t.dtype == torch.long and t.shape == (2,)
    # recover the drawn noise from x_t, then the L_simple gradient by hand:
    # dL/dε_i = 2 (ε_i - noise_i) / (B · n_b · D) for token i of image b (per-image mean, then batch mean)
    ab = diff.schedule.alphas_cumprod[t[batch.layout.seq_id]][:, None]
    noise = (x_t - ab.sqrt() * batch.tokens) / (1 - ab).sqrt()
    n_b = batch.layout.seqlens()[batch.layout.seq_id].double()[:, None]  # (T, 1)
    want = 2 * (eps_param.detach() - noise) / (2 * n_b * D)
    g_eps, g_v = torch.autograd.grad(loss, [eps_param, v_param])
    torch.testing.assert_close(g_eps, want)  # nothing from the VB term reaches ε
    assert g_v.abs().sum() > 0  # the VB term trains the variance


def test_model_sees_unclamped_integer_timesteps():
    diff = GaussianDiffusion()
    batch = stream([1] * 64)
    seen = []

    def model(x, t, y, layout):
        seen.append(t)
        return torch.zeros(x.shape[0], 2 * D, dtype=x.dtype)

    diff.training_loss(model, batch.tokens, batch.y, batch.layout, generator=torch.Generator().manual_seed(0))
    assert seen[0].dtype == torch.long and int(seen[0].max()) > 100  # not squashed into [0, 1]
    seen.clear()
    diff.sample(model, torch.randn(64, D), batch.y, batch.layout, steps=3)
    assert [int(t[0]) for t in seen] == [999, 500, 0]  # original indices of the respaced steps


def test_wrong_output_width_is_reported():
    diff = GaussianDiffusion()
    batch = stream([2])
    with pytest.raises(ValueError, match="2\\*D"):
        diff.training_loss(lambda x, t, y, lay: x, batch.tokens, batch.y, batch.layout)


# ------------------------------------------------------------------------------------------ samplers


def point_mass_oracle(diff, target):
    """The exact ε for data that is a single known point (then E[ε | x_t] is a deterministic function)."""

    def model(x, t, y, layout):
        ab = diff.schedule.alphas_cumprod[t[layout.seq_id]][:, None].to(x.dtype)  # (T, 1)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # v = 0: mid-range variance

    return model


@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_samplers_recover_a_point_mass(method, eta):
    diff = GaussianDiffusion()
    batch = stream([3, 5], seed=1)
    target = batch.tokens
    noise = torch.randn(target.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = diff.sample(point_mass_oracle(diff, target), noise, batch.y, batch.layout, steps=25, method=method, eta=eta)
    torch.testing.assert_close(out, target, atol=1e-6, rtol=0)


def gaussian_oracle(diff, mu, s, v=-1.0):
    """E[ε | x_t] for data ~ N(mu, s^2) per value: x_t = a·x0 + b·ε is Gaussian, so the regression is linear."""

    def model(x, t, y, layout):
        ab = diff.schedule.alphas_cumprod[t[layout.seq_id]][:, None].to(x.dtype)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        eps = b * (x - a * mu) / (a**2 * s**2 + b**2)
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def test_ddim_converges_to_the_exact_probability_flow_map():
    """For Gaussian data the probability-flow ODE is affine: x_T ~ N(a_T mu, a_T^2 s^2 + b_T^2) -> mu + s·z.
    DDIM (eta=0) is a first-order solver of that ODE, so its error halves when the step count doubles."""
    diff = GaussianDiffusion()
    mu, s = 0.7, 0.4
    batch = stream([256], d=4)
    noise = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a_T = diff.schedule.alphas_cumprod[-1]
    exact = mu + s * (noise - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    errors = []
    for steps in (50, 100, 200):
        out = diff.sample(gaussian_oracle(diff, mu, s), noise, batch.y, batch.layout, steps=steps, method="ddim")
        errors.append((out - exact).abs().max().item())
    assert errors[2] < 0.03, errors
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.7 < coarse / fine < 2.3, errors


def test_ddpm_reproduces_a_gaussian():
    """Ancestral sampling with the oracle ε and the upper variance β_t (v = +1) at FiT's 250 steps."""
    diff = GaussianDiffusion()
    mu, s = 0.7, 0.4
    model = gaussian_oracle(diff, mu, s, v=1.0)
    batch = stream([1024], d=4)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1024, 4, dtype=torch.float64, generator=g)
    out = diff.sample(model, noise, batch.y, batch.layout, steps=250, generator=g)
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() - s) < 0.015


def test_ddpm_noise_follows_the_generator():
    diff = GaussianDiffusion()
    model = gaussian_oracle(diff, 0.7, 0.4, v=1.0)
    batch = stream([8], d=4)
    noise = torch.randn(8, 4, dtype=torch.float64)
    runs = [
        diff.sample(model, noise, batch.y, batch.layout, steps=20, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_sampler_arguments_are_checked():
    diff = GaussianDiffusion()
    batch = stream([2])
    model = point_mass_oracle(diff, batch.tokens)
    with pytest.raises(ValueError, match="method"):
        diff.sample(model, batch.tokens, batch.y, batch.layout, method="plms")
    with pytest.raises(ValueError, match="eta"):
        diff.sample(model, batch.tokens, batch.y, batch.layout, method="ddim", eta=1.5)


# ------------------------------------------------------------------------------------------ learning


class TinyDenoiser(nn.Module):
    def __init__(self, d: int, d_out: int, num_classes: int = 4):
        super().__init__()
        self.label = nn.Embedding(num_classes, 32)
        self.net = nn.Sequential(nn.Linear(d + 2 + 32, 64), nn.SiLU(), nn.Linear(64, d_out))

    def forward(self, x, t, y, layout):
        tt = t[layout.seq_id].float()[:, None] / 1000.0  # (T, 1)
        feats = [x.float(), torch.sin(3 * tt), torch.cos(3 * tt), self.label(y[layout.seq_id])]
        return self.net(torch.cat(feats, dim=1))


def test_training_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    diff = GaussianDiffusion()
    batch = stream([4, 6], dtype=torch.float32)
    model = TinyDenoiser(D, 2 * D)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss():
        with torch.no_grad():
            return sum(
                diff.training_loss(model, batch.tokens, batch.y, batch.layout, torch.Generator().manual_seed(k))[0]
                for k in range(8)
            ) / 8

    before = eval_loss()
    for step in range(40):
        g = torch.Generator().manual_seed(100 + step)
        loss, _ = diff.training_loss(model, batch.tokens, batch.y, batch.layout, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
