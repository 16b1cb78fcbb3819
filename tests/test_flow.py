"""FiTv2 rectified flow: time sampling, loss weighting, ODE/SDE samplers against analytic flows, learning."""
import math
import sys

import pytest
import torch
from torch import nn

from maskfit.diffusion.flow import FlowConfig, RectifiedFlow
from maskfit.tokens import pack, to_padded

D = 8


def stream(lengths, d=D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(n, d, generator=g, dtype=dtype) for n in lengths]
    return pack(toks, [(1, n) for n in lengths], torch.arange(len(lengths)))


# ------------------------------------------------------------------------------------------ time sampling


def test_logit_normal_t_has_median_half_and_stays_inside_the_interval():
    flow = RectifiedFlow(FlowConfig(t_sampling="logit_normal"))
    like = torch.zeros(1)
    t = flow.sample_t(20000, like, torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert bool(((t > 0) & (t < 1)).all())
    assert abs(t.median().item() - 0.5) < 0.02
    # logit(t) ~ N(0, 1): P(t < sigmoid(1)) = Φ(1) = 0.841
    assert abs((t < 1 / (1 + math.exp(-1))).double().mean().item() - 0.8413) < 0.01
    shifted = RectifiedFlow(FlowConfig(logit_mean=1.0)).sample_t(20000, like, torch.Generator().manual_seed(0))
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1))) < 0.02  # m > 0 leans to the data end


def test_uniform_t():
    flow = RectifiedFlow(FlowConfig(t_sampling="uniform"))
    t = flow.sample_t(20000, torch.zeros(1), torch.Generator().manual_seed(0))
    assert bool(((t >= 0) & (t < 1)).all())
    assert abs(t.mean().item() - 0.5) < 0.01 and abs((t < 0.25).double().mean().item() - 0.25) < 0.01


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="cosine"):
        FlowConfig(t_sampling="cosine")
    with pytest.raises(ValueError, match="logit_std"):
        FlowConfig(logit_std=0.0)


# ------------------------------------------------------------------------------------------ loss


def oracle_velocity(data, image_error):
    """Knows the data tokens x1: from x_t = t x1 + (1-t) x0 it recovers x0 and returns u = x1 - x0 + error_b."""

    def model(x, t, y, layout):
        tt = t[layout.seq_id][:, None]  # (T, 1)
        x0 = (x - tt * data) / (1 - tt)
        return data - x0 + image_error[layout.seq_id][:, None]

    return model


def test_each_image_counts_once_whatever_its_length():
    flow = RectifiedFlow()
    batch = stream([2, 10])
    err = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loss, logs = flow.training_loss(oracle_velocity(batch.tokens, err), batch.tokens, batch.y, batch.layout)
    torch.testing.assert_close(loss, torch.tensor(5.0, dtype=torch.float64))  # token weighting: 7.67
    torch.testing.assert_close(logs["loss"], loss.detach())
    # the same image three times as long (duplicated tokens) keeps the same weight
    longer = pack([batch.tokens[:2], batch.tokens[2:].repeat(3, 1)], [(1, 2), (1, 30)], batch.y)
    loss_long, _ = flow.training_loss(oracle_velocity(longer.tokens, err), longer.tokens, longer.y, longer.layout)
    torch.testing.assert_close(loss_long, loss)


def test_padding_tokens_are_ignored_even_with_garbage_outputs():
    flow = RectifiedFlow()
    padded = to_padded(stream([3, 7]), seq_len=9)
    err = torch.tensor([0.5, 2.0], dtype=torch.float64)
    base = oracle_velocity(padded.tokens, err)

    def garbage(x, t, y, layout):
        out = base(x, t, y, layout)
        return torch.where(layout.valid[:, None], out, torch.full_like(out, float("nan")))

    loss, _ = flow.training_loss(garbage, padded.tokens, padded.y, padded.layout)
    torch.testing.assert_close(loss, (err**2).mean())


def test_model_gets_one_float_time_per_image_in_unit_interval():
    flow = RectifiedFlow()
    batch = stream([3, 1, 2])
    seen = []

    def model(x, t, y, layout):
        seen.append(t)
        return torch.zeros_like(x)

    flow.training_loss(model, batch.tokens, batch.y, batch.layout)
    assert seen[0].shape == (3,) and seen[0].is_floating_point()
    assert bool(((seen[0] > 0) & (seen[0] < 1)).all())
    with pytest.raises(ValueError, match="learn_sigma"):
        flow.training_loss(lambda x, t, y, lay: torch.cat([x, x], 1), batch.tokens, batch.y, batch.layout)


# ------------------------------------------------------------------------------------------ samplers


def point_mass_velocity(target):
    """Exact velocity when all data is one point c: x = t c + (1-t) x0 gives u = (c - x) / (1 - t)."""

    def model(x, t, y, layout):
        return (target - x) / (1 - t[layout.seq_id][:, None])

    return model


def test_euler_lands_on_a_point_mass():
    flow = RectifiedFlow()
    batch = stream([3, 5], seed=1)
    noise = torch.randn(batch.tokens.shape, dtype=torch.float64)
    out = flow.sample(point_mass_velocity(batch.tokens), noise, batch.y, batch.layout, steps=7, method="euler")
    torch.testing.assert_close(out, batch.tokens, atol=1e-10, rtol=0)


MU, S = 0.7, 0.4  # Gaussian data N(MU, S^2) per value


def gaussian_velocity(x, t, y, layout):
    """E[x1 - x0 | x_t] for x1 ~ N(MU, S^2), x0 ~ N(0, 1): var_t = t^2 S^2 + (1-t)^2, linear regression."""
    tt = t[layout.seq_id][:, None].to(x.dtype)
    var = tt**2 * S**2 + (1 - tt) ** 2
    return MU + (tt * S**2 - (1 - tt)) * (x - tt * MU) / var


def exact_endpoint(noise):
    """The ODE's flow map is affine for Gaussians: x(t) = t MU + sqrt(var_t) z, so x(1) = MU + S z."""
    return MU + S * noise


def test_heun_is_more_accurate_than_euler_and_second_order():
    flow = RectifiedFlow()
    batch = stream([64], d=4)
    noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_endpoint(noise)
    err = {}
    for method in ("euler", "heun"):
        for steps in (8, 16, 32):
            out = flow.sample(gaussian_velocity, noise, batch.y, batch.layout, steps=steps, method=method)
            err[method, steps] = (out - exact).abs().max().item()
    assert err["heun", 8] < err["euler", 8] / 10, err
    assert 1.6 < err["euler", 8] / err["euler", 16] < 2.4, err  # first order
    assert 3.2 < err["heun", 16] / err["heun", 32] < 4.8, err  # second order


def test_dopri5_matches_the_analytic_flow():
    flow = RectifiedFlow()
    batch = stream([64], d=4)
    noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = flow.sample(gaussian_velocity, noise, batch.y, batch.layout, method="dopri5", atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(out, exact_endpoint(noise), atol=1e-6, rtol=0)


def test_dopri5_never_calls_the_model_outside_the_unit_interval():
    """An adaptive step may overshoot the end time; the model must still only see t in [0, 1]."""
    batch = stream([16], d=4)
    seen = []

    def model(x, t, y, layout):
        seen.append(float(t[0]))
        return gaussian_velocity(x, t, y, layout)

    noise = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = RectifiedFlow().sample(model, noise, batch.y, batch.layout, method="dopri5")  # FiTv2's tolerances
    assert min(seen) == 0.0 and 0.999 < max(seen) <= 1.0, (min(seen), max(seen))
    torch.testing.assert_close(out, exact_endpoint(noise), atol=1e-2, rtol=0)


def test_dopri5_without_torchdiffeq_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` raise ImportError
    batch = stream([2])
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        RectifiedFlow().sample(gaussian_velocity, batch.tokens, batch.y, batch.layout, method="dopri5")


def test_score_from_velocity_is_the_gaussian_score():
    batch = stream([16], d=4)
    x = torch.randn(16, 4, dtype=torch.float64)
    for t in (0.0, 0.3, 0.9):
        t_img = torch.full((1,), t, dtype=torch.float64)
        v = gaussian_velocity(x, t_img, batch.y, batch.layout)
        want = -(x - t * MU) / (t**2 * S**2 + (1 - t) ** 2)  # ∇ log N(t MU, var_t)
        got = RectifiedFlow.score_from_velocity(v, x, torch.full((16,), t, dtype=torch.float64))
        torch.testing.assert_close(got, want)


def test_sde_sampler_reproduces_a_gaussian():
    flow = RectifiedFlow()
    batch = stream([2048], d=4)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2048, 4, dtype=torch.float64, generator=g)
    out = flow.sample(gaussian_velocity, noise, batch.y, batch.layout, steps=100, method="sde", generator=g)
    assert abs(out.mean().item() - MU) < 0.02
    assert abs(out.std().item() - S) < 0.02
    # the sampler is stochastic: it is not the ODE's deterministic map of the same noise
    assert (out - exact_endpoint(noise)).abs().mean() > 0.05


def test_sampler_arguments_are_checked():
    batch = stream([2])
    flow = RectifiedFlow()
    with pytest.raises(ValueError, match="method"):
        flow.sample(gaussian_velocity, batch.tokens, batch.y, batch.layout, method="rk4")
    with pytest.raises(ValueError, match="steps"):
        flow.sample(gaussian_velocity, batch.tokens, batch.y, batch.layout, method="sde", steps=1)


def test_sampler_time_runs_from_noise_to_data():
    flow = RectifiedFlow()
    batch = stream([2, 3])
    seen = []

    def model(x, t, y, layout):
        seen.append(t)
        return torch.zeros_like(x)

    flow.sample(model, batch.tokens, batch.y, batch.layout, steps=4, method="euler")
    assert [float(t[0]) for t in seen] == [0.0, 0.25, 0.5, 0.75]
    assert all(t.shape == (2,) for t in seen)


# ------------------------------------------------------------------------------------------ learning


class TinyVelocity(nn.Module):
    def __init__(self, d: int, num_classes: int = 4):
        super().__init__()
        self.label = nn.Embedding(num_classes, 32)
        self.net = nn.Sequential(nn.Linear(d + 2 + 32, 64), nn.SiLU(), nn.Linear(64, d))

    def forward(self, x, t, y, layout):
        tt = t[layout.seq_id].float()[:, None]
        feats = [x.float(), torch.sin(3 * tt), torch.cos(3 * tt), self.label(y[layout.seq_id])]
        return self.net(torch.cat(feats, dim=1))


def test_training_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    flow = RectifiedFlow()
    batch = stream([4, 6], dtype=torch.float32)
    model = TinyVelocity(D)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss():
        with torch.no_grad():
            gens = [torch.Generator().manual_seed(k) for k in range(8)]
            return sum(flow.training_loss(model, batch.tokens, batch.y, batch.layout, g)[0] for g in gens) / 8

    before = eval_loss()
    for step in range(40):
        g = torch.Generator().manual_seed(100 + step)
        loss, _ = flow.training_loss(model, batch.tokens, batch.y, batch.layout, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
