"""Masked forward: the backbone sees only kept tokens, with their true positions, in every model design."""
import math

import pytest
import torch

from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import masked_view, pack, to_padded


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


GRIDS = [(4, 4), (2, 6), (3, 5)]


def _batch(token_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, token_dim, generator=g) for h, w in GRIDS]
    keep = [torch.randperm(h * w, generator=g)[: (h * w) // 2].sort().values for h, w in GRIDS]
    y = torch.tensor([1, 5, 2])
    return tokens, keep, y


@pytest.mark.parametrize("preset", ["FiT-tiny", "FiTv2-tiny"])
def test_masked_forward_equals_full_forward_on_the_kept_tokens(preset):
    model = _perturbed(FiT(model_config(preset)))
    tokens, keep, y = _batch(model.cfg.token_dim)
    t = torch.tensor([5.0, 100.0, 700.0])
    full = pack(tokens, GRIDS, y)
    view = masked_view(full.layout, keep)
    # Reference: an unmasked forward over a stream that holds only the kept tokens (same positions).
    kept_only = pack([x[k] for x, k in zip(tokens, keep)], GRIDS, y, keep=keep)
    with torch.no_grad():
        masked = model(full.tokens, t, y, full.layout, mask=view)
        reference = model(kept_only.tokens, t, y, kept_only.layout)
    torch.testing.assert_close(masked[view.index], reference, atol=1e-5, rtol=1e-5)
    dropped = torch.ones(full.layout.num_tokens, dtype=torch.bool)
    dropped[view.index] = False
    assert masked[dropped].abs().max() == 0  # plain dropping predicts only what it saw


def test_masked_view_positions_survive_the_gather():
    tokens, keep, y = _batch(16)
    full = pack(tokens, GRIDS, y)
    view = masked_view(full.layout, keep)
    for b, ((h, w), k) in enumerate(zip(GRIDS, keep)):
        seg = slice(int(view.layout.cu_seqlens[b]), int(view.layout.cu_seqlens[b + 1]))
        expected = torch.stack([k // w, k % w], dim=1)
        assert torch.equal(view.layout.pos[seg], expected)
        assert torch.equal(view.layout.seq_id[seg], torch.full((len(k),), b))
        assert torch.equal(full.tokens[view.index[seg]], tokens[b][k])  # the right tokens were taken


def test_masked_view_on_padded_layout_matches_packed():
    model = _perturbed(FiT(model_config("FiT-tiny")))
    tokens, keep, y = _batch(model.cfg.token_dim)
    t = torch.tensor([1.0, 2.0, 3.0])
    packed = pack(tokens, GRIDS, y)
    padded = to_padded(packed, seq_len=16)
    with torch.no_grad():
        a = model(packed.tokens, t, y, packed.layout, mask=masked_view(packed.layout, keep))
        view_p = masked_view(padded.layout, keep)
        b = model(padded.tokens, t, y, padded.layout, mask=view_p)
    torch.testing.assert_close(a[masked_view(packed.layout, keep).index], b[view_p.index], atol=1e-5, rtol=1e-5)


def test_half_masking_halves_the_tokens_the_backbone_sees():
    model = FiT(model_config("FiT-tiny"))
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    grids = [(4, 4), (4, 8), (6, 6)]
    tokens = [torch.randn(h * w, 16) for h, w in grids]
    batch = pack(tokens, grids, torch.zeros(3, dtype=torch.long))
    keep = [torch.randperm(h * w)[: h * w // 2] for h, w in grids]
    t = torch.zeros(3)
    with torch.no_grad():
        model(batch.tokens, t, batch.y, batch.layout)
        full_count = seen[0]
        seen.clear()
        model(batch.tokens, t, batch.y, batch.layout, mask=masked_view(batch.layout, keep))
    assert full_count == 16 + 32 + 36
    assert seen == [full_count // 2] * model.cfg.depth


@pytest.mark.parametrize("design", ["decoder", "mixer", "side_interp"])
def test_each_design_trains_masked_and_samples_unmasked(design):
    overrides = dict(mask_design=design, decoder_depth=1, decoder_hidden=32, decoder_heads=2, mixer_depth=1, side_decode_depth=1)
    model = _perturbed(FiT(model_config("FiTv2-tiny", **overrides))).train()
    tokens, keep, y = _batch(model.cfg.token_dim)
    batch = pack(tokens, GRIDS, y)
    view = masked_view(batch.layout, keep)
    t = torch.rand(3)
    out = model(batch.tokens, t, y, batch.layout, mask=view)
    assert out.shape == (batch.layout.num_tokens, model.cfg.token_dim)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if design in ("decoder", "side_interp"):
        assert model.predicts_dropped_tokens()
        assert grads["mask_token"] is not None and grads["mask_token"].abs().sum() > 0
    with torch.no_grad():
        full = model(batch.tokens, t, y, batch.layout)  # sampling never masks
    assert torch.isfinite(full).all() and full.shape == out.shape


def test_mixer_sees_every_token_before_dropping():
    model = FiT(model_config("FiT-tiny", mask_design="mixer", mixer_depth=1))
    counts = []
    model.mixer_blocks[0].register_forward_hook(lambda m, i, o: counts.append(i[0].shape[0]))
    tokens, keep, y = _batch(model.cfg.token_dim)
    batch = pack(tokens, GRIDS, y)
    with torch.no_grad():
        model(batch.tokens, torch.zeros(3), y, batch.layout, mask=masked_view(batch.layout, keep))
    assert counts == [batch.layout.num_tokens]


def test_bad_mask_design_and_keep_indices_are_rejected():
    with pytest.raises(ValueError, match="mask_design='mae'"):
        model_config("FiT-tiny", mask_design="mae")
    batch = pack([torch.randn(4, 16)], [(2, 2)], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keep indices must lie in \[0, 4\)"):
        masked_view(batch.layout, [torch.tensor([0, 4])])


def test_with_mask_tokens_fills_dropped_rows_compiled_under_a_dtype_cast():
    # The form it replaces, token.to(dtype).expand(T, -1).index_copy(...), came out of Inductor (CPU and CUDA) with
    # every row equal to the last kept row when the cast made a new buffer (bf16 rows, fp32 token).
    from maskfit.models.transformer import with_mask_tokens

    token = torch.arange(4.0) + 100
    kept = torch.arange(12.0).view(3, 4).bfloat16()
    index = torch.tensor([1, 4, 7])
    expected = token.bfloat16().repeat(10, 1)
    expected[index] = kept
    assert torch.equal(with_mask_tokens(token, kept, index, 10), expected)
    assert torch.equal(torch.compile(with_mask_tokens)(token, kept, index, 10), expected)


@pytest.mark.parametrize("preset,design", [("FiT-tiny", d) for d in ("unmasked", "padded", "plain", "decoder", "mixer", "side_interp")]
                         + [("FiTv2-tiny", "unmasked"), ("FiTv2-tiny", "decoder")])
def test_compiled_designs_under_bf16_autocast_are_as_close_to_fp32_as_eager(preset, design):
    # tests/test_gpu.py::test_compiled_masked_gradients_agree_with_eager runs the published sizes with varlen on CUDA;
    # this runs on CPU Inductor. Both bf16 paths are judged against the fp32 eager forward: a miscompiled stream is
    # O(1) away, bf16 rounding ~1e-2. "padded" is FiT's layout (every image padded to the longest), unmasked.
    torch.manual_seed(0)
    masked = design not in ("unmasked", "padded")
    cfg = model_config(preset, mask_design=design if masked else "plain", side_decode_depth=1)
    model = _perturbed(FiT(cfg))
    tokens, keep, y = _batch(cfg.token_dim)
    batch = pack(tokens, GRIDS, y)
    mask = masked_view(batch.layout, keep) if masked else None
    t = torch.tensor([10.0, 500.0, 999.0])
    if design == "padded":
        batch = to_padded(batch, seq_len=max(h * w for h, w in GRIDS))
    exact = model(batch.tokens, t, y, batch.layout, mask=mask)
    errors = {}
    for name, forward in (("eager", model), ("compiled", torch.compile(model))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(batch.tokens, t, y, batch.layout, mask=mask).float()
        errors[name] = float((out - exact).norm() / exact.norm())
    assert errors["eager"] < 0.05 and errors["compiled"] < 2 * errors["eager"] + 0.01, errors


def test_sincos_2d_embedding_by_hand():
    from maskfit.models.transformer import sincos_2d_embedding

    # dim 8: a quarter of 2 frequencies, w = (1, 10000^-1/2 = 0.01); row half [sin, sin, cos, cos], column half alike
    emb = sincos_2d_embedding(torch.tensor([[0, 0], [1, 0], [0, 3]]), 8)
    assert torch.allclose(emb[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    s, c = math.sin, math.cos
    assert torch.allclose(emb[1], torch.tensor([s(1), s(0.01), c(1), c(0.01), 0, 0, 1, 1]))
    assert torch.allclose(emb[2], torch.tensor([0, 0, 1, 1, s(3), s(0.03), c(3), c(0.03)]))
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_2d_embedding(torch.zeros(1, 2, dtype=torch.long), 6)


def test_decoder_position_embedding_makes_the_decoder_see_absolute_positions():
    """RoPE alone is relative: moving an image's grid by a constant offset changes no output. MaskDiT's
    decoder_pos_embed adds absolute positions to the decoder's input, so then the outputs move."""
    import dataclasses

    from maskfit.models.transformer import sincos_2d_embedding

    outs = {}
    for pos_embed in (False, True):
        model = _perturbed(FiT(model_config("FiTv2-tiny", mask_design="decoder", decoder_depth=1, decoder_hidden=32,
                                            decoder_heads=2, decoder_pos_embed=pos_embed))).eval()
        tokens, keep, y = _batch(model.cfg.token_dim)
        batch = pack(tokens, GRIDS, y)
        shifted = dataclasses.replace(batch.layout, pos=batch.layout.pos + torch.tensor([2, 5]))
        t = torch.rand(3)
        with torch.no_grad():
            for name, layout in (("grid", batch.layout), ("shifted", shifted)):
                outs[pos_embed, name] = model(batch.tokens, t, y, layout, mask=masked_view(layout, keep))
    assert torch.allclose(outs[False, "grid"], outs[False, "shifted"], atol=1e-5)
    assert not torch.allclose(outs[True, "grid"], outs[True, "shifted"], atol=1e-3)
    assert not torch.allclose(outs[True, "grid"], outs[False, "grid"], atol=1e-3)  # the embedding reaches the output
    assert sincos_2d_embedding(batch.layout.pos, 32).shape == (batch.layout.num_tokens, 32)
    with pytest.raises(ValueError, match="decoder_pos_embed=True applies to mask_design='decoder'"):
        model_config("FiTv2-tiny", mask_design="plain", decoder_pos_embed=True)


@pytest.mark.parametrize("design", ["plain", "decoder", "mixer", "side_interp"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked_fine_tune"])
def test_every_parameter_gets_a_gradient_in_every_training_step(design, masked):
    """DDP (train.parallel='ddp') refuses a step in which a parameter got no gradient: a layer no design uses, or
    the mask token (and MDT's side-interpolator) in an unmasked fine-tune step, would stop a many-GPU run."""
    model = _perturbed(FiT(model_config("FiTv2-tiny", mask_design=design, decoder_depth=1, decoder_hidden=32,
                                        decoder_heads=2, mixer_depth=1, side_decode_depth=1))).train()
    tokens, keep, y = _batch(model.cfg.token_dim)
    batch = pack(tokens, GRIDS, y)
    view = masked_view(batch.layout, keep) if masked else None
    if design == "plain" and masked:  # plain trains on the kept stream alone (train.training_loss)
        out = model(batch.tokens[view.index], torch.rand(3), y, view.layout)
    else:
        out = model(batch.tokens, torch.rand(3), y, batch.layout, mask=view)
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    if not masked:  # the zero-weighted term changes no value: the eval forward (sampling) gives the same output
        t = torch.zeros(3)
        with torch.no_grad():
            trained = model(batch.tokens, t, y, batch.layout)
            sampled = model.eval()(batch.tokens, t, y, batch.layout)
        assert torch.equal(trained, sampled)
