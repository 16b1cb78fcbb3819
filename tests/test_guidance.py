"""Classifier-free guidance: label dropout, one doubled model call, channel subsets, learned Σ, power-cos."""
import math

import pytest
import torch

from maskfit.diffusion.guidance import (
    GuidanceConfig,
    ddpm_fraction,
    drop_labels,
    flow_fraction,
    guidance_scale,
    guided,
)
from maskfit.tokens import pack, to_padded

P = 2  # patch size
C = 4  # latent channels
D = C * P * P  # 16 values per token
NULL = 1000


def stream(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in lengths]
    return pack(toks, [(1, n) for n in lengths], torch.tensor([3, 7, 11][: len(lengths)]))


class Recorder:
    """A denoiser whose output depends on x, t and y (so cond != uncond) and that logs its calls."""

    def __init__(self, d_out=D):
        self.calls = []
        self.d_out = d_out

    def __call__(self, x, t, y, layout):
        self.calls.append((x.shape[0], t.clone(), y.clone(), layout.num_images))
        yy = y[layout.seq_id].double()[:, None]  # (T, 1)
        tt = t[layout.seq_id].double()[:, None]
        base = torch.sin(x * (1 + yy / 500)) + tt  # (T, D)
        return torch.cat([base, 2 * base + yy], dim=1)[:, : self.d_out]


def cond_uncond(model, x, t, y, layout):
    """Reference: the two branches as separate calls."""
    return model(x, t, y, layout), model(x, t, torch.full_like(y, NULL), layout)


# ------------------------------------------------------------------------------------------ label dropout


def test_drop_labels_rate_and_values():
    y = torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, 0.1, NULL, torch.Generator().manual_seed(1))
    dropped = out == NULL
    assert abs(dropped.double().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~dropped], y[~dropped])  # kept labels are untouched
    assert torch.equal(drop_labels(y, 0.0, NULL), y)
    assert bool((drop_labels(y, 1.0, NULL) == NULL).all())
    with pytest.raises(ValueError, match="prob=1.5"):
        drop_labels(y, 1.5, NULL)


# ------------------------------------------------------------------------------------------ guided model


def test_scale_one_is_the_conditional_model_with_no_doubling():
    model = Recorder()
    assert guided(model, GuidanceConfig(scale=1.0), P) is model
    assert guided(model, GuidanceConfig(scale=1.0, schedule="power_cos"), P) is model


def test_one_call_on_a_doubled_batch_and_the_cfg_formula():
    batch = stream([3, 5])
    t = torch.tensor([10, 900])
    model = Recorder()
    fn = guided(model, GuidanceConfig(scale=4.0), P)
    out = fn(batch.tokens, t, batch.y, batch.layout)
    assert len(model.calls) == 1
    T2, t2, y2, B2 = model.calls[0]
    assert (T2, B2) == (16, 4)
    assert torch.equal(t2, torch.cat([t, t]))
    assert torch.equal(y2, torch.tensor([3, 7, NULL, NULL]))
    cond, uncond = cond_uncond(Recorder(), batch.tokens, t, batch.y, batch.layout)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    assert (cond - uncond).abs().max() > 1e-3  # the check above is not vacuous


def test_three_channels_leave_the_fourth_conditional():
    batch = stream([4, 2])
    t = torch.tensor([5, 5])
    fn = guided(Recorder(), GuidanceConfig(scale=3.0, channels=3), P)
    out = fn(batch.tokens, t, batch.y, batch.layout)
    cond, uncond = cond_uncond(Recorder(), batch.tokens, t, batch.y, batch.layout)
    k = 3 * P * P
    torch.testing.assert_close(out[:, :k], uncond[:, :k] + 3.0 * (cond[:, :k] - uncond[:, :k]))
    torch.testing.assert_close(out[:, k:], cond[:, k:])  # latent channel 4 = values 12..15
    assert (out[:, :k] - cond[:, :k]).abs().max() > 1e-3


@pytest.mark.parametrize("channels", [None, 3])
def test_learned_sigma_takes_the_variance_from_the_conditional_branch(channels):
    batch = stream([3])
    t = torch.tensor([500])
    fn = guided(Recorder(d_out=2 * D), GuidanceConfig(scale=2.0, channels=channels), P)
    out = fn(batch.tokens, t, batch.y, batch.layout)
    cond, uncond = cond_uncond(Recorder(d_out=2 * D), batch.tokens, t, batch.y, batch.layout)
    k = D if channels is None else channels * P * P
    assert out.shape == (3, 2 * D)
    torch.testing.assert_close(out[:, :k], uncond[:, :k] + 2.0 * (cond[:, :k] - uncond[:, :k]))
    torch.testing.assert_close(out[:, k:], cond[:, k:])  # the whole variance half (and unguided ε) is cond
    assert (cond[:, D:] - uncond[:, D:]).abs().max() > 1e-3


def test_guided_call_on_a_padded_layout():
    padded = to_padded(stream([2, 5]), seq_len=6)
    t = torch.tensor([0.2, 0.8], dtype=torch.float64)
    fn = guided(Recorder(), GuidanceConfig(scale=1.5), P)
    out = fn(padded.tokens, t, padded.y, padded.layout)
    cond, uncond = cond_uncond(Recorder(), padded.tokens, t, padded.y, padded.layout)
    torch.testing.assert_close(out, uncond + 1.5 * (cond - uncond))


# ------------------------------------------------------------------------------------------ power-cos schedule


def test_fraction_conventions():
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)  # (noise, data)
    torch.testing.assert_close(ddpm_fraction(1000)(torch.tensor([999, 0])), ends)
    torch.testing.assert_close(flow_fraction(torch.tensor([0.0, 1.0])), ends)
    torch.testing.assert_close(ddpm_fraction(1000)(torch.tensor([333])), torch.tensor([2 / 3], dtype=torch.float64))


def test_power_cos_scale_rises_from_one_at_noise_to_w_at_data():
    cfg = GuidanceConfig(scale=4.0, schedule="power_cos", power=4.0)
    f = torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64)
    w = guidance_scale(cfg, f)
    want = [3.0 * 0.5 * (1 - math.cos(math.pi * x**4)) + 1 for x in (0.0, 0.5, 0.9, 1.0)]
    assert want[0] == 1.0 and abs(want[-1] - 4.0) < 1e-12
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="t_to_fraction"):
        guidance_scale(cfg, torch.tensor([1.5]))


@pytest.mark.parametrize(
    "t,to_fraction",
    [(torch.tensor([0.0, 1.0], dtype=torch.float64), flow_fraction), (torch.tensor([999, 0]), ddpm_fraction(1000))],
)
def test_power_cos_per_image_in_one_call(t, to_fraction):
    """Image 0 sits at pure noise (w = 1: conditional), image 1 at data (w = full scale)."""
    batch = stream([3, 4])
    fn = guided(Recorder(), GuidanceConfig(scale=2.5, schedule="power_cos"), P, to_fraction)
    out = fn(batch.tokens, t, batch.y, batch.layout)
    cond, uncond = cond_uncond(Recorder(), batch.tokens, t, batch.y, batch.layout)
    torch.testing.assert_close(out[:3], cond[:3])
    torch.testing.assert_close(out[3:], uncond[3:] + 2.5 * (cond[3:] - uncond[3:]))


def test_configuration_errors():
    batch = stream([2])
    with pytest.raises(ValueError, match="t_to_fraction"):
        guided(Recorder(), GuidanceConfig(scale=2.0, schedule="power_cos"), P)
    with pytest.raises(ValueError, match="channels=5"):
        fn = guided(Recorder(), GuidanceConfig(scale=2.0, channels=5), P)
        fn(batch.tokens, torch.tensor([1]), batch.y, batch.layout)
    with pytest.raises(ValueError, match="schedule"):
        GuidanceConfig(schedule="linear")
