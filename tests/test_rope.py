"""2D RoPE and its resolution extrapolation (FiT §3.3-3.4, FiTv2 §IV-F; reference/fit.md §3).

What is pinned here:
- every method, under every option, is the identity when the test grid fits in the training grid;
- each method matches its published formula on values worked by hand (fit.md §3.5 table, FiT eqs. 5-8,
  FiTv2 eq. 15), including the released code's variants (NTK exponent, YaRN ramp, attention scale);
- vanilla methods use one scale from max(h, w); Vision* methods scale height and width independently;
- scales are clamped at 1, frequencies are per image inside one packed stream, bad options raise.

Notation as fit.md §3.1: D_h head dim, m = D_h/2 per-axis width, n_f = m/2 frequencies, b = 10000, L0 = 16.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from maskfit.models.rope import (
    EXTRAPOLATION_METHODS,
    RopeExtrapolation,
    apply_rope,
    attention_logit_scale,
    axis_frequencies,
    axis_scales,
    base_frequencies,
    rope_tables,
    yarn_mscale,
)

B = 10000.0
L0 = 16

# fit.md §3.5: (grid h, w) -> (s_h, s_w decoupled, s vanilla, YaRN mscale, ntkpro2 logit x, paper eq.15 s)
FIT_TABLE = {
    (16, 16): (1.0, 1.0, 1.0, 1.0, 1.1250, 1.0),
    (10, 20): (1.0, 1.25, 1.25, 1.0223, 1.0805, 1.0),
    (8, 24): (1.0, 1.5, 1.5, 1.0405, 1.0731, 1.0),
    (20, 20): (1.25, 1.25, 1.25, 1.0223, 1.2055, 1.0805),
    (14, 28): (1.0, 1.75, 1.75, 1.0560, 1.2018, 1.0768),
    (10, 30): (1.0, 1.875, 1.875, 1.0629, 1.1536, 1.0286),
    (32, 32): (2.0, 2.0, 2.0, 1.0693, 1.3750, 1.25),
    (20, 40): (1.25, 2.5, 2.5, 1.0916, 1.3305, 1.2055),
    (16, 48): (1.0, 3.0, 3.0, 1.1099, 1.3231, 1.1981),
}
# fit.md §3.5, VisionNTK bases b_h / b_w for XL (m = 36), rounded as printed there.
XL_NTK_BASES = {
    (16, 16): (10000, 10000),
    (10, 20): (10000, 12665),
    (8, 24): (10000, 15362),
    (20, 20): (12665, 12665),
    (14, 28): (10000, 18086),
    (10, 30): (10000, 19456),
    (32, 32): (20832, 20832),
    (20, 40): (12665, 26384),  # fit.md prints 26,385, but 10000 * 2.5^(18/17) = 26,384.46 rounds to 26,384
    (16, 48): (10000, 32003),
}


def _grid(*hw: tuple[int, int]) -> torch.Tensor:
    return torch.tensor([list(g) for g in hw], dtype=torch.long)


def _all_positions(h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (h*w, 2)


def _tables(h: int, w: int, head_dim: int, cfg: RopeExtrapolation):
    pos = _all_positions(h, w)
    seq = torch.zeros(pos.shape[0], dtype=torch.long)
    return rope_tables(pos, seq, _grid((h, w)), head_dim, cfg, dtype=torch.float64)


def _all_configs(attn_scales=("none", "paper")):
    for method, exp, ramp, attn in itertools.product(
        EXTRAPOLATION_METHODS, ("axis", "head"), ("paper", "code"), attn_scales
    ):
        yield RopeExtrapolation(method=method, ntk_exponent=exp, yarn_ramp=ramp, attn_scale=attn)


def _gamma(f_new: torch.Tensor, freqs: torch.Tensor, s: float) -> torch.Tensor:
    """Invert theta' = (1-gamma) theta/s + gamma theta (FiT eq. 7) for gamma, the weight on extrapolation."""
    return (f_new / freqs - 1.0 / s) / (1.0 - 1.0 / s)


# --------------------------------------------------------------------------------------------------------
# Base 2D RoPE
# --------------------------------------------------------------------------------------------------------


def test_plain_tables_match_hand_built_angles():
    # D_h = 8: m = 4, theta = (1, b^(-1/2)) = (1, 0.01). Token (row 3, col 5):
    # angles = [3, 3, 0.03, 0.03, 5, 5, 0.05, 0.05]: rows in the first half, columns in the second, pairs repeated.
    pos = torch.tensor([[3, 5]])
    t = rope_tables(pos, torch.zeros(1, dtype=torch.long), _grid((4, 6)), 8, dtype=torch.float64)
    ang = torch.tensor([3, 3, 0.03, 0.03, 5, 5, 0.05, 0.05], dtype=torch.float64)
    torch.testing.assert_close(t.cos[0], ang.cos())
    torch.testing.assert_close(t.sin[0], ang.sin())


def test_apply_rope_rotates_pairs_and_is_relative():
    torch.manual_seed(0)
    head_dim = 16
    pos = torch.tensor([[2, 7], [5, 1], [4, 9], [7, 3]])  # second pair = first pair shifted by (2, 2)
    t = rope_tables(pos, torch.zeros(4, dtype=torch.long), _grid((8, 10)), head_dim, dtype=torch.float64)
    q = torch.randn(1, 1, head_dim, dtype=torch.float64).expand(4, 1, head_dim)
    k = torch.randn(1, 1, head_dim, dtype=torch.float64).expand(4, 1, head_dim)
    rq, rk = apply_rope(q, t), apply_rope(k, t)
    # Each interleaved pair is a complex number multiplied by e^{i angle}.
    ang = torch.atan2(t.sin[0], t.cos[0])
    z = torch.view_as_complex(q[0, 0].reshape(-1, 2).contiguous()) * torch.exp(1j * ang[::2])
    torch.testing.assert_close(rq[0, 0], torch.view_as_real(z).flatten())
    # The q.k logit depends only on the offset: (2,7)-(5,1) and (4,9)-(7,3) are both (-3, 6).
    torch.testing.assert_close((rq[0] * rk[1]).sum(), (rq[2] * rk[3]).sum())


# --------------------------------------------------------------------------------------------------------
# Identity at scale 1
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(16, 16), (10, 12), (16, 4), (1, 1)])
def test_every_method_and_option_is_identity_within_training_grid(hw):
    plain = _tables(*hw, 16, RopeExtrapolation())
    for cfg in _all_configs():
        t = _tables(*hw, 16, cfg)
        torch.testing.assert_close(t.cos, plain.cos, rtol=0, atol=1e-12, msg=lambda m: f"{cfg}: {m}")
        torch.testing.assert_close(t.sin, plain.sin, rtol=0, atol=1e-12, msg=lambda m: f"{cfg}: {m}")
        assert yarn_mscale(_grid(hw), cfg).item() == 1.0
        assert attention_logit_scale(_grid(hw), cfg).item() == 1.0


def test_code_attention_scale_is_not_one_at_training_size():
    # Released ntkpro2 multiplies logits by ln(2hw)/ln(L0^2) when 2hw > L0^2: at 16x16, ln 512 / ln 256 = 9/8.
    g = _grid((16, 16))
    assert attention_logit_scale(g, RopeExtrapolation(attn_scale="code")).item() == pytest.approx(1.125, abs=1e-12)
    assert attention_logit_scale(g, RopeExtrapolation(attn_scale="paper")).item() == 1.0
    # Folded into the tables as sqrt on q and on k: the frequencies are untouched, the amplitude is sqrt(9/8).
    plain = _tables(16, 16, 16, RopeExtrapolation())
    t = _tables(16, 16, 16, RopeExtrapolation(method="vision_ntk", attn_scale="code"))
    torch.testing.assert_close(t.cos, plain.cos * math.sqrt(1.125))
    torch.testing.assert_close(t.sin, plain.sin * math.sqrt(1.125))
    # It switches on only when 2hw > 256: 8x16 (2hw = 256) stays at 1.
    assert attention_logit_scale(_grid((8, 16)), RopeExtrapolation(attn_scale="code")).item() == 1.0


# --------------------------------------------------------------------------------------------------------
# Scales: vanilla vs decoupled, clamping
# --------------------------------------------------------------------------------------------------------


def test_axis_scales_match_fit_table():
    grids = list(FIT_TABLE)
    g = _grid(*grids)
    vis = axis_scales(g, RopeExtrapolation(method="vision_ntk"))
    van = axis_scales(g, RopeExtrapolation(method="ntk"))
    for b, hw in enumerate(grids):
        s_h, s_w, s, *_ = FIT_TABLE[hw]
        assert vis[b].tolist() == pytest.approx([s_h, s_w]), hw
        assert van[b].tolist() == pytest.approx([s, s]), hw
    assert torch.equal(axis_scales(g, RopeExtrapolation()), torch.ones_like(vis))


def test_scales_clamp_at_one_so_small_grids_never_compress():
    g = _grid((8, 8), (4, 12), (8, 32), (2, 1))
    for method in EXTRAPOLATION_METHODS:
        s = axis_scales(g, RopeExtrapolation(method=method))
        assert (s >= 1).all(), method
    vis = axis_scales(g, RopeExtrapolation(method="vision_yarn"))
    assert vis[2].tolist() == [1.0, 2.0]  # 8/16 = 0.5 on rows is clamped to 1, not a compression
    # And the 8x32 row frequencies are the plain ones under every Vision* option.
    plain_h, _ = axis_frequencies(g[2:3], 16, RopeExtrapolation())
    for cfg in _all_configs(("none",)):
        if cfg.decoupled:
            f_h, _ = axis_frequencies(g[2:3], 16, cfg)
            torch.testing.assert_close(f_h, plain_h, rtol=0, atol=0)


@pytest.mark.parametrize("vanilla, vision", [("ntk", "vision_ntk"), ("yarn", "vision_yarn")])
def test_vision_methods_scale_each_axis_alone_vanilla_use_the_longer_side(vanilla, vision):
    head_dim = 72
    plain_h, plain_w = axis_frequencies(_grid((16, 32)), head_dim, RopeExtrapolation())
    # 16 x 32: only the width exceeds the training side.
    v_h, v_w = axis_frequencies(_grid((16, 32)), head_dim, RopeExtrapolation(method=vision))
    torch.testing.assert_close(v_h, plain_h, rtol=0, atol=0)  # rows untouched
    assert not torch.allclose(v_w, plain_w)
    n_h, n_w = axis_frequencies(_grid((16, 32)), head_dim, RopeExtrapolation(method=vanilla))
    assert not torch.allclose(n_h, plain_h)  # vanilla: s = max(16, 32)/16 = 2 on both axes
    torch.testing.assert_close(n_h, n_w, rtol=0, atol=0)
    torch.testing.assert_close(n_w, v_w)  # the width sees s = 2 in both readings
    # Transposed grid: the roles swap.
    t_h, t_w = axis_frequencies(_grid((32, 16)), head_dim, RopeExtrapolation(method=vision))
    torch.testing.assert_close(t_w, plain_w, rtol=0, atol=0)
    torch.testing.assert_close(t_h, v_w)
    # Each axis depends on its own side only: the width frequencies are the same for any height.
    w_only = [axis_frequencies(_grid((h, 20)), head_dim, RopeExtrapolation(method=vision))[1] for h in (4, 16, 30)]
    torch.testing.assert_close(w_only[0], w_only[1], rtol=0, atol=0)
    torch.testing.assert_close(w_only[0], w_only[2], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# Each method against its formula
# --------------------------------------------------------------------------------------------------------


def test_pi_divides_frequencies_by_s():
    head_dim = 16
    freqs = base_frequencies(head_dim // 2)
    # 16 x 24: vanilla s = 24/16 = 1.5 on both axes (PI has no decoupled variant).
    f_h, f_w = axis_frequencies(_grid((16, 24)), head_dim, RopeExtrapolation(method="pi"))
    torch.testing.assert_close(f_h[0], freqs / 1.5)
    torch.testing.assert_close(f_w[0], freqs / 1.5)
    # Equivalently, a position p under PI rotates like position p/s without extrapolation.
    t = _tables(16, 24, head_dim, RopeExtrapolation(method="pi"))
    pos = _all_positions(16, 24)
    ref = rope_tables(pos.double() / 1.5, torch.zeros(len(pos), dtype=torch.long), _grid((16, 24)), head_dim,
                      dtype=torch.float64)
    torch.testing.assert_close(t.cos, ref.cos)


def test_base_frequencies_are_per_axis_rope():
    # theta_i = b^(-2i/m) with m = D_h/2 (fit.md §3.1): m = 36 -> theta_1 = 10000^(-1/18) = 0.599484...
    f = base_frequencies(36)
    assert f.shape == (18,)
    assert f[0].item() == 1.0
    assert f[1].item() == pytest.approx(0.5994842503, rel=1e-9)
    assert f[-1].item() == pytest.approx(10000 ** (-34 / 36), rel=1e-12)


@pytest.mark.parametrize("method", ["vision_ntk", "ntk"])
def test_ntk_bases_match_fit_table_for_xl(method):
    # XL: D_h = 72, m = 36; b' = b * s^(36/34) (released code, FiT eq. 5 with |D| read as m).
    # The base is recovered from the frequencies the code produces: theta'_1 = b'^(-2/m) -> b' = theta'_1^(-m/2).
    grids = list(XL_NTK_BASES)
    f_h, f_w = axis_frequencies(_grid(*grids), 72, RopeExtrapolation(method=method))
    for b, hw in enumerate(grids):
        b_h = f_h[b, 1].item() ** -18
        b_w = f_w[b, 1].item() ** -18
        if method == "vision_ntk":
            want_h, want_w = XL_NTK_BASES[hw]
        else:
            s = FIT_TABLE[hw][2]
            want_h = want_w = B * s ** (36 / 34)
        assert b_h == pytest.approx(want_h, abs=0.5), (hw, b_h)
        assert b_w == pytest.approx(want_w, abs=0.5), (hw, b_w)
        # Every frequency is that base to the standard power, not only theta_1.
        i = torch.arange(18, dtype=torch.float64)
        torch.testing.assert_close(f_w[b], torch.tensor(b_w, dtype=torch.float64) ** (-2 * i / 36))
    # Four more digits than the table: 10000 * 1.25^(18/17) = 12665.158; 10000 * 2^(18/17) = 20832.320.
    assert f_w[1, 1].item() ** -18 == pytest.approx(12665.1577, abs=1e-3)
    assert f_w[6, 1].item() ** -18 == pytest.approx(20832.3202, abs=1e-3)


def test_ntk_base_for_b2_head_dim_64():
    # B/2: m = 32, exponent 32/30: b_w = 10000 * 1.25^(16/15) = 12,687.34 (fit.md §3.5).
    _, f_w = axis_frequencies(_grid((10, 20)), 64, RopeExtrapolation(method="vision_ntk"))
    assert f_w[0, 1].item() ** -16 == pytest.approx(12687.343, abs=1e-2)


def test_ntk_axis_exponent_maps_lowest_frequency_to_theta_over_s():
    # With b' = b s^(m/(m-2)), theta'_{n_f-1} = b'^(-(m-2)/m) = theta_{n_f-1} / s exactly: the reason the code
    # (and our default) uses the per-axis width m in the exponent.
    for head_dim in (64, 72, 96):
        m = head_dim // 2
        freqs = base_frequencies(m)
        _, f_w = axis_frequencies(_grid((16, 40)), head_dim, RopeExtrapolation(method="vision_ntk"))
        assert f_w[0, -1].item() == pytest.approx(freqs[-1].item() / 2.5, rel=1e-12)
        assert f_w[0, 0].item() == 1.0  # the fastest frequency is never changed by a base change


def test_ntk_head_exponent_is_the_literal_paper_reading():
    # ntk_exponent="head": b' = b * s^(D_h/(D_h-2)).
    # XL at s = 1.25: 10000 * 1.25^(72/70) = 12,579.95; at s = 2: 10000 * 2^(72/70) = 20,400.03.
    # B/2 at s = 1.25: 10000 * 1.25^(64/62) = 12,590.30.
    cfg = RopeExtrapolation(method="vision_ntk", ntk_exponent="head")
    _, f_w = axis_frequencies(_grid((10, 20), (16, 32)), 72, cfg)
    assert f_w[0, 1].item() ** -18 == pytest.approx(12579.949, abs=1e-2)
    assert f_w[1, 1].item() ** -18 == pytest.approx(20400.032, abs=1e-2)
    _, f_w = axis_frequencies(_grid((10, 20)), 64, cfg)
    assert f_w[0, 1].item() ** -16 == pytest.approx(12590.302, abs=1e-2)
    # The spacing stays per-axis (m), only the base exponent changes.
    i = torch.arange(16, dtype=torch.float64)
    torch.testing.assert_close(f_w[0], torch.tensor(12590.301852981, dtype=torch.float64) ** (-2 * i / 32))


@pytest.mark.parametrize(
    "head_dim, weights",
    [(64, [1.0, 0.5, 0.0, 0.0]), (72, [1.0, 0.5, 0.0, 0.0]), (96, [1.0, 2 / 3, 1 / 3, 0.0])],
)
def test_yarn_code_ramp_weights_match_fit_table(head_dim, weights):
    # fit.md §3.2: d(r) = m ln(L0/(2 pi r)) / (2 ln b); ramp between floor(d(32)) = 0 and ceil(d(1)):
    # m = 32, 36 -> d(1) = 1.62, 1.83 -> high 2; m = 48 -> d(1) = 2.44 -> high 3. gamma_i = 1 - i/high.
    s = 2.0
    freqs = base_frequencies(head_dim // 2)
    cfg = RopeExtrapolation(method="vision_yarn", yarn_ramp="code")
    _, f_w = axis_frequencies(_grid((16, 32)), head_dim, cfg)
    gamma = _gamma(f_w[0], freqs, s)
    want = torch.tensor(weights + [0.0] * (len(freqs) - 4), dtype=torch.float64)
    torch.testing.assert_close(gamma, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "head_dim, gammas",
    [
        # r_i = L0 theta_i / (2 pi) (FiT eq. 6 with theta_i = b^(-2i/m)); gamma = clip((r - 1)/(32 - 1), 0, 1) (eq. 8).
        # r_0 = 16/(2 pi) = 2.546479 -> gamma_0 = 1.546479/31 = 0.0498864 for every head dim.
        # m = 32: r_1 = 2.546479 * 10000^(-1/16) = 1.431990 -> 0.0139352; r_2 = 0.805 < 1 -> 0.
        (64, [0.0498864222, 0.0139351750, 0.0, 0.0]),
        # m = 36: r_1 = 2.546479 * 10000^(-1/18) = 1.526574 -> 0.0169863; r_2 = 0.915 -> 0.
        (72, [0.0498864222, 0.0169862615, 0.0, 0.0]),
        # m = 48: r_1 = 1.734896 -> 0.0237063; r_2 = 2.546479 * 10000^(-1/6) = 1.181971 -> 0.0058700; r_3 = 0.805.
        (96, [0.0498864222, 0.0237063228, 0.0058700287, 0.0]),
    ],
)
def test_yarn_paper_ramp_gamma_hand_computed(head_dim, gammas):
    s = 2.5
    freqs = base_frequencies(head_dim // 2)
    _, f_w = axis_frequencies(_grid((16, 40)), head_dim, RopeExtrapolation(method="vision_yarn"))
    gamma = _gamma(f_w[0], freqs, s)
    want = torch.tensor(gammas + [0.0] * (len(freqs) - 4), dtype=torch.float64)
    torch.testing.assert_close(gamma, want, rtol=0, atol=1e-9)
    # So paper-ramp YaRN at L0 = 16 is close to PI: every frequency moves at least 95% of the way to theta/s.
    assert (f_w[0] <= freqs * (0.05 + 0.95 / s) + 1e-12).all()


def test_yarn_mscale_matches_fit_table():
    # 1/sqrt(t) = 0.1 ln s + 1 on q and k (FiT §3.1), s = the larger axis scale even when decoupled (released code).
    grids = list(FIT_TABLE)
    for method in ("yarn", "vision_yarn"):
        ms = yarn_mscale(_grid(*grids), RopeExtrapolation(method=method))
        for b, hw in enumerate(grids):
            assert ms[b].item() == pytest.approx(FIT_TABLE[hw][3], abs=5e-5), (method, hw)
    # More digits: 0.1 ln 1.25 + 1 = 1.02231436; logits x 1.0451 (fit.md's "logit x" column).
    assert yarn_mscale(_grid((20, 20)), RopeExtrapolation(method="yarn")).item() == pytest.approx(1.0223143551)
    assert yarn_mscale(_grid((20, 20)), RopeExtrapolation(method="yarn")).item() ** 2 == pytest.approx(1.0451, abs=5e-5)
    # Non-YaRN methods have no temperature.
    for method in ("none", "pi", "ntk", "vision_ntk"):
        assert (yarn_mscale(_grid(*grids), RopeExtrapolation(method=method)) == 1).all()


@pytest.mark.parametrize("reading, col", [("code", 4), ("paper", 5)])
def test_attention_scale_matches_fit_table(reading, col):
    # code (ntkpro2): ln(2hw)/ln(256) when 2hw > 256; paper eq. 15: max(1, log_256(hw)). E.g. at 20x20:
    # ln 800 / ln 256 = 1.20548 and ln 400 / ln 256 = 1.08048 (fit.md §3.3 item 4).
    grids = list(FIT_TABLE)
    sc = attention_logit_scale(_grid(*grids), RopeExtrapolation(attn_scale=reading))
    for b, hw in enumerate(grids):
        assert sc[b].item() == pytest.approx(FIT_TABLE[hw][col], abs=5e-5), (reading, hw)
    assert sc[grids.index((20, 20))].item() == pytest.approx(
        math.log(800 if reading == "code" else 400) / math.log(256), rel=1e-12
    )


def test_factor_on_logits_is_mscale_squared_times_attention_scale():
    # rope_tables folds yarn_mscale * sqrt(logit scale) into cos and sin; q and k both carry it, so the logit
    # of a query and key at the same position is multiplied by mscale^2 * scale. At 20x40 (s = 2.5, 800 tokens):
    # mscale = 0.1 ln 2.5 + 1 = 1.0916291, paper eq. 15 = ln 800 / ln 256 = 1.2054820.
    torch.manual_seed(0)
    head_dim = 16
    cfg = RopeExtrapolation(method="vision_yarn", attn_scale="paper")
    t = _tables(20, 40, head_dim, cfg)
    factor = (0.1 * math.log(2.5) + 1) * math.sqrt(math.log(800) / math.log(256))
    torch.testing.assert_close(t.cos**2 + t.sin**2, torch.full_like(t.cos, factor**2))
    q = torch.randn(t.cos.shape[0], 2, head_dim, dtype=torch.float64)
    k = torch.randn(t.cos.shape[0], 2, head_dim, dtype=torch.float64)
    logits = (apply_rope(q, t) * apply_rope(k, t)).sum(-1)
    want = (q * k).sum(-1) * (1.0916290731874 ** 2 * 1.2054820237218)
    torch.testing.assert_close(logits, want)


# --------------------------------------------------------------------------------------------------------
# Packed streams
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vision_ntk", "vision_yarn", "ntk", "yarn", "pi"])
def test_per_image_tables_in_one_packed_stream(method):
    head_dim = 16
    cfg = RopeExtrapolation(method=method, attn_scale="paper")
    grids = [(16, 16), (20, 40), (12, 24)]
    pos = torch.cat([_all_positions(h, w) for h, w in grids])
    seq = torch.cat([torch.full((h * w,), b, dtype=torch.long) for b, (h, w) in enumerate(grids)])
    packed = rope_tables(pos, seq, _grid(*grids), head_dim, cfg, dtype=torch.float64)
    start = 0
    for h, w in grids:
        alone = _tables(h, w, head_dim, cfg)
        torch.testing.assert_close(packed.cos[start : start + h * w], alone.cos, rtol=0, atol=0)
        torch.testing.assert_close(packed.sin[start : start + h * w], alone.sin, rtol=0, atol=0)
        start += h * w
    # The same (row, col) gets different rotations in different images: (3, 5) in image 0 vs image 1.
    i0 = 3 * 16 + 5
    i1 = 16 * 16 + 3 * 40 + 5
    assert torch.equal(pos[i0], pos[i1])
    assert not torch.allclose(packed.cos[i0], packed.cos[i1])


def test_keeps_only_a_subset_of_tokens():
    # Masked training keeps a subset of each grid: the tables follow pos, not the stream index.
    cfg = RopeExtrapolation(method="vision_ntk")
    full = _tables(20, 40, 16, cfg)
    keep = torch.tensor([0, 7, 41, 799])
    pos = _all_positions(20, 40)[keep]
    sub = rope_tables(pos, torch.zeros(4, dtype=torch.long), _grid((20, 40)), 16, cfg, dtype=torch.float64)
    torch.testing.assert_close(sub.cos, full.cos[keep], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"method": "dynntk"}, "dynntk"),
        ({"method": "linear"}, "linear"),
        ({"attn_scale": "ntkpro2"}, "ntkpro2"),
        ({"ntk_exponent": "dim"}, "dim"),
        ({"yarn_ramp": "linear"}, "linear"),
        ({"train_grid": (0, 16)}, r"\(0, 16\)"),
    ],
)
def test_invalid_options_raise_naming_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        RopeExtrapolation(**kwargs)


@pytest.mark.parametrize("head_dim", [70, 66, 65, 2, 0])
def test_head_dim_not_multiple_of_four_raises(head_dim):
    with pytest.raises(ValueError, match=str(head_dim)):
        axis_frequencies(_grid((16, 16)), head_dim, RopeExtrapolation())


def test_token_cos_sin_is_a_well_formed_custom_op_equal_to_the_inline_formula():
    # The tables are computed in an opaque op (so torch.compile saves them for the backward instead of fusing
    # float64 sin/cos into every layer's RoPE kernel); its shapes-only implementation must agree with the real
    # one, and its values with the formula written inline.
    from maskfit.models.rope import token_cos_sin

    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 20, (11, 2), generator=g)
    seq_id = torch.tensor([0] * 5 + [1] * 6)
    f_h, f_w = torch.rand(2, 4, generator=g, dtype=torch.float64), torch.rand(2, 4, generator=g, dtype=torch.float64)
    factor = torch.tensor([1.0, 1.3], dtype=torch.float64)
    torch.library.opcheck(token_cos_sin, (pos, seq_id, f_h, f_w, factor, torch.float32))
    cos, sin = token_cos_sin(pos, seq_id, f_h, f_w, factor, torch.float64)
    angles = torch.cat([pos[:, :1] * f_h[seq_id], pos[:, 1:] * f_w[seq_id]], dim=1).repeat_interleave(2, dim=1)
    torch.testing.assert_close(cos, angles.cos() * factor[seq_id, None])
    torch.testing.assert_close(sin, angles.sin() * factor[seq_id, None])
    assert cos.shape == (11, 16) and token_cos_sin(pos, seq_id, f_h, f_w, factor, torch.float32)[0].dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# The attention scale of masked training ("kept")
# --------------------------------------------------------------------------------------------------------


def test_kept_attention_scale_known_values():
    # ln n / ln(k * min(n, 256)), at least 1: 16x16 at k = 0.5 attended 128 keys in training, so ln 256 / ln 128
    # = 8/7; at k = 0.25, 8/6; 32x32 (1024 tokens, beyond the budget) at k = 0.5: ln 1024 / ln 128 = 10/7;
    # 8x8 at k = 0.5: ln 64 / ln 32 = 6/5; one token: 1.
    grids = _grid((16, 16), (32, 32), (8, 8), (1, 1))
    half = attention_logit_scale(grids, RopeExtrapolation(attn_scale="kept", train_keep=0.5))
    torch.testing.assert_close(half, torch.tensor([8 / 7, 10 / 7, 6 / 5, 1.0], dtype=torch.float64))
    quarter = attention_logit_scale(_grid((16, 16)), RopeExtrapolation(attn_scale="kept", train_keep=0.25))
    assert quarter.item() == pytest.approx(8 / 6, rel=1e-12)


@pytest.mark.parametrize("hw", [(16, 16), (10, 12), (20, 20), (20, 40), (32, 32), (1, 1)])
def test_kept_attention_scale_of_an_unmasked_run_is_fitv2_eq15(hw):
    paper = attention_logit_scale(_grid(hw), RopeExtrapolation(attn_scale="paper"))
    kept = attention_logit_scale(_grid(hw), RopeExtrapolation(attn_scale="kept", train_keep=1.0))
    torch.testing.assert_close(kept, paper, rtol=1e-12, atol=0)


def test_kept_attention_scale_multiplies_the_logits():
    # Folded into the tables like eq. 15: cos^2 + sin^2 is the factor on the logits.
    t = _tables(16, 16, 16, RopeExtrapolation(attn_scale="kept", train_keep=0.5))
    torch.testing.assert_close(t.cos**2 + t.sin**2, torch.full_like(t.cos, 8 / 7))


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_kept_fraction_out_of_range_is_refused(keep):
    with pytest.raises(ValueError, match=rf"train_keep={keep}: the fraction of tokens kept in training is in \(0, 1\]"):
        RopeExtrapolation(attn_scale="kept", train_keep=keep)
