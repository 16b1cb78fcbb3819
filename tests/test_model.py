"""Backbone: exact parameter counts, layout equivalences (padded == packed == per image), RoPE, attention."""
import math

import pytest
import torch

from maskfit.models.attention import attention, prepare_attention
from maskfit.models.rope import apply_rope, rope_tables
from maskfit.models.transformer import (
    FiT,
    MODEL_PRESETS,
    ModelConfig,
    count_parameters,
    flops_per_image,
    model_config,
)
from maskfit.tokens import pack, patchify, to_padded, from_padded, unpatchify

# The published code's model classes configured as the papers' size tables (reference/fit.md §4.3).
EXPECTED_PARAMS = {
    "FiT-B/2": 158_664_224,
    "FiT-XL/2": 823_599_392,
    "FiT-B/2-dit": 130_328_096,
    "FiTv2-B/2": 128_149_072,
    "FiTv2-XL/2": 671_045_776,
    "FiTv2-3B/2": 2_971_928_080,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts_are_exact(name):
    with torch.device("meta"):  # no memory: the 3B model would need 12 GB
        model = FiT(model_config(name))
    assert count_parameters(model) == EXPECTED_PARAMS[name]


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown model preset 'FiT-Q/2'.*FiT-B/2"):
        model_config("FiT-Q/2")


def test_bad_head_dim_is_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        ModelConfig(hidden_size=60, num_heads=10)


def test_flops_convention_on_hand_computed_tiny_model():
    cfg = ModelConfig(1, depth=1, hidden_size=8, num_heads=2, ffn_hidden=16, patch_size=1, in_channels=1)
    n, d = 4, 8
    per_token = 2 * 1 * d + 2 * d * 2  # embed + final linear (2 out channels)
    block = n * 2 * (4 * d * d + 3 * d * 16) + 4 * n * n * d + 2 * 6 * d * d
    per_image = 2 * (256 * d + d * d) + 4 * d * d
    assert flops_per_image(cfg, n) == n * per_token + block + per_image
    assert flops_per_image(cfg, n, training=True) == 3 * flops_per_image(cfg, n)


def _random_images(grids, token_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(h * w, token_dim, generator=g) for h, w in grids]


def _trained_like(model: FiT, seed=0):
    # Zero-initialised layers make every output 0; perturb all weights so equalities mean something.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("preset", ["FiT-tiny", "FiTv2-tiny"])
def test_padded_packed_and_per_image_forward_agree(preset):
    torch.manual_seed(0)
    model = _trained_like(FiT(model_config(preset))).eval()
    grids = [(4, 4), (2, 6), (3, 1), (5, 3)]
    tokens = _random_images(grids, model.cfg.token_dim)
    y = torch.tensor([0, 3, 7, 1])
    t = torch.tensor([10.0, 500.0, 999.0, 0.0])
    packed = pack(tokens, grids, y)
    padded = to_padded(packed, seq_len=16)
    with torch.no_grad():
        out_packed = model(packed.tokens, t, y, packed.layout)
        out_padded = model(padded.tokens, t, y, padded.layout)
        singles = [model(x, t[i : i + 1], y[i : i + 1], pack([x], [grids[i]], y[i : i + 1]).layout) for i, x in enumerate(tokens)]
    assert out_packed.shape == (sum(h * w for h, w in grids), model.cfg.patch_size**2 * model.cfg.out_channels)
    back = from_padded(type(padded)(out_padded, y, padded.layout)).tokens
    torch.testing.assert_close(back, out_packed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(singles), out_packed, atol=1e-5, rtol=1e-5)
    # FiT zeroes the outputs on padding slots.
    assert out_padded[~padded.layout.valid].abs().max() == 0


def test_padding_values_do_not_leak_into_real_tokens():
    model = _trained_like(FiT(model_config("FiT-tiny"))).eval()
    grids = [(2, 3), (4, 4)]
    y, t = torch.tensor([1, 2]), torch.tensor([3.0, 4.0])
    padded = to_padded(pack(_random_images(grids, model.cfg.token_dim), grids, y), seq_len=20)
    noisy = padded.tokens.clone()
    noisy[~padded.layout.valid] = 1e3 * torch.randn_like(noisy[~padded.layout.valid])
    with torch.no_grad():
        a = model(padded.tokens, t, y, padded.layout)
        b = model(noisy, t, y, padded.layout)
    v = padded.layout.valid
    torch.testing.assert_close(a[v], b[v], atol=1e-5, rtol=1e-5)


def test_wrong_token_width_is_a_clear_error():
    model = FiT(model_config("FiT-tiny"))
    batch = pack([torch.randn(4, 7)], [(2, 2)], torch.tensor([0]))
    with pytest.raises(ValueError, match="expects patch\\^2 x channels = 2\\^2 x 4 = 16"):
        model(batch.tokens, torch.tensor([1.0]), batch.y, batch.layout)


@pytest.mark.parametrize("grid", [(3, 5), (1, 7), (6, 2)])
def test_patchify_roundtrip_non_square(grid):
    h, w, p, C = *grid, 2, 4
    latent = torch.randn(C, h * p, w * p)
    tokens = patchify(latent, p)
    assert tokens.shape == (h * w, C * p * p)
    torch.testing.assert_close(unpatchify(tokens, grid, p), latent)
    # Token (r, c) holds the patch at rows r*p.., cols c*p.., channel-major (c, p1, p2) like FiT.
    r, c = h - 1, w - 1
    torch.testing.assert_close(tokens[r * w + c], latent[:, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1))


def test_patchify_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible by patch size 2"):
        patchify(torch.randn(4, 5, 6), 2)


def test_rope_is_a_rotation_and_relative():
    head_dim, T = 16, 12
    pos = torch.randint(0, 30, (T, 2))
    seq = torch.zeros(T, dtype=torch.long)
    grid = torch.tensor([[30, 30]])
    tables = rope_tables(pos, seq, grid, head_dim)
    q, k = torch.randn(T, 3, head_dim), torch.randn(T, 3, head_dim)
    rq = apply_rope(q, tables)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # norms kept
    # Shifting every position by the same offset keeps all q.k products (relative positions only).
    shifted = rope_tables(pos + torch.tensor([5, 11]), seq, grid, head_dim)
    dots = torch.einsum("thd,shd->hts", rq, apply_rope(k, tables))
    dots_shifted = torch.einsum("thd,shd->hts", apply_rope(q, shifted), apply_rope(k, shifted))
    torch.testing.assert_close(dots, dots_shifted, atol=1e-4, rtol=1e-4)


def test_rope_rows_use_first_half_and_columns_second_half():
    head_dim = 8
    pos = torch.tensor([[3, 0], [0, 5]])
    tables = rope_tables(pos, torch.zeros(2, dtype=torch.long), torch.tensor([[8, 8]]), head_dim)
    # Token (3, 0): only the first half rotates; token (0, 5): only the second half.
    assert torch.allclose(tables.cos[0, 4:], torch.ones(4)) and not torch.allclose(tables.cos[0, :4], torch.ones(4))
    assert torch.allclose(tables.cos[1, :4], torch.ones(4)) and not torch.allclose(tables.cos[1, 4:], torch.ones(4))
    # The lowest-index pair of each half turns at theta_0 = 1 rad per step.
    assert math.isclose(float(tables.cos[0, 0]), math.cos(3.0), abs_tol=1e-6)
    assert math.isclose(float(tables.cos[1, 4]), math.cos(5.0), abs_tol=1e-6)


def test_dense_attention_equals_per_image_attention():
    torch.manual_seed(0)
    grids = [(2, 2), (1, 3), (3, 3)]
    batch = pack(_random_images(grids, 1), grids, torch.zeros(3, dtype=torch.long))
    T, H, D = batch.layout.num_tokens, 2, 8
    q, k, v = torch.randn(3, T, H, D).unbind(0)
    out = attention(q, k, v, prepare_attention(batch.layout, "dense"))
    assert out.shape == (T, H, D)
    cu = batch.layout.cu_seqlens.tolist()
    for b in range(3):
        s = slice(cu[b], cu[b + 1])
        ref = torch.softmax(torch.einsum("thd,shd->hts", q[s], k[s]) / math.sqrt(D), -1)
        ref = torch.einsum("hts,shd->thd", ref, v[s])
        torch.testing.assert_close(out[s], ref, atol=1e-5, rtol=1e-5)


def test_unknown_attention_backend():
    batch = pack([torch.randn(4, 1)], [(2, 2)], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        prepare_attention(batch.layout, "sdpa")


def test_every_preset_builds_a_valid_config():
    for name, cfg in MODEL_PRESETS.items():
        assert cfg.hidden_size % cfg.num_heads == 0, name
        assert (cfg.version == 2) == cfg.qk_norm == (cfg.adaln == "lora") == (not cfg.learn_sigma), name
