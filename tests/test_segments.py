"""The windowed segment-sum backward of the per-token adaLN repeat against autograd's plain gather."""
import pytest
import torch

import maskfit.models.segments as segments
from maskfit.models.segments import TokensOfImages, segment_window_sum
from maskfit.models.transformer import FiT, model_config
from maskfit.packing import pad_stream_to_budget
from maskfit.tokens import masked_view, pack, segment_sum, to_padded

GRIDS = [(4, 4), (2, 6), (3, 5), (1, 1)]


def _batch(token_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, token_dim, generator=g) for h, w in GRIDS]
    keep = [torch.randperm(h * w, generator=g)[: max(1, (h * w) // 2)].sort().values for h, w in GRIDS]
    return tokens, keep, torch.tensor([1, 5, 2, 7])


def test_window_sum_equals_the_scatter_add_with_empty_and_uneven_segments():
    lengths = torch.tensor([3, 0, 5, 1, 0])
    values = torch.randn(int(lengths.sum()), 7)
    seq_id = torch.repeat_interleave(torch.arange(5), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    out = segment_window_sum(values, starts, lengths, max_len=5)
    torch.testing.assert_close(out, segment_sum(values, seq_id, 5))
    assert out[1].abs().max() == 0 and out[4].abs().max() == 0  # empty segments sum to 0


def test_window_sum_keeps_bf16_rows_accurate():
    values = torch.randn(300, 4, dtype=torch.bfloat16)
    out = segment_window_sum(values, torch.tensor([0]), torch.tensor([300]), max_len=300)
    assert out.dtype == torch.bfloat16  # accumulated in fp32, rounded once
    torch.testing.assert_close(out.float(), values.float().sum(0, keepdim=True), atol=0.05, rtol=0.01)


@pytest.fixture
def window_in_eager(monkeypatch):
    monkeypatch.setattr(segments, "WINDOW_IN_EAGER", True)


def test_repeat_forward_is_the_gather_and_backward_the_per_image_sum(window_in_eager):
    tokens, _, y = _batch(4)
    layout = pack(tokens, GRIDS, y).layout
    repeat = TokensOfImages(layout)
    assert repeat.windowed
    rows = torch.randn(len(GRIDS), 6, requires_grad=True)
    out = repeat(rows)
    assert torch.equal(out, rows.detach()[layout.seq_id])
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    torch.testing.assert_close(rows.grad, segment_sum(weights, layout.seq_id, len(GRIDS)))


def _grads(model, tokens, t, y, layout, mask=None, forward=None):
    model.zero_grad()
    out = (model if forward is None else forward)(tokens, t, y, layout, mask=mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layouts(token_dim: int):
    tokens, keep, y = _batch(token_dim)
    packed = pack(tokens, GRIDS, y)
    yield "packed", packed, None
    yield "padded", to_padded(packed, seq_len=16), None
    yield "masked", packed, masked_view(packed.layout, keep)
    yield "token_batched", pad_stream_to_budget(packed, budget=64, max_images=6), None


@pytest.mark.parametrize("preset,design", [("FiT-tiny", "plain"), ("FiTv2-tiny", "plain"), ("FiT-tiny", "decoder"),
                                           ("FiT-tiny", "mixer"), ("FiTv2-tiny", "side_interp")])
def test_model_gradients_equal_those_of_the_plain_gather(preset, design, monkeypatch, window_in_eager):
    torch.manual_seed(0)
    model = FiT(model_config(preset, mask_design=design, decoder_hidden=32, decoder_heads=4, mixer_depth=1,
                             side_decode_depth=1))
    with torch.no_grad():  # leave adaLN-Zero's zeros, so the modulation gradients are not trivially 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for name, batch, mask in _layouts(model.cfg.token_dim):
        B = batch.layout.num_images
        t, y = torch.linspace(10.0, 900.0, B), batch.y
        monkeypatch.setattr(segments, "SEGMENT_SUM_MAX_LEN", 0)  # autograd's scatter-add
        out_ref, ref = _grads(model, batch.tokens, t, y, batch.layout, mask)
        monkeypatch.setattr(segments, "SEGMENT_SUM_MAX_LEN", 1024)
        out, got = _grads(model, batch.tokens, t, y, batch.layout, mask)
        assert torch.equal(out, out_ref), name
        assert got.keys() == ref.keys(), name
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        assert ref["blocks.0.adaLN.weight" if preset == "FiT-tiny" else "blocks.0.adaLN.1.weight"].abs().max() > 0


def test_long_segments_keep_the_scatter_add():
    lengths = [2, 3, 1500]
    layout = pack([torch.zeros(n, 1) for n in lengths], [(1, n) for n in lengths], torch.zeros(3, dtype=torch.long)).layout
    assert not TokensOfImages(layout).windowed


def test_eager_keeps_the_scatter_add_and_compiled_gradients_equal_eager_ones(monkeypatch):
    calls = []  # the window's backward runs in eager autograd, or once while AOTAutograd traces the backward
    real_sum = segments.segment_window_sum
    monkeypatch.setattr(segments, "segment_window_sum", lambda *a: calls.append(1) or real_sum(*a))
    torch.manual_seed(0)
    model = FiT(model_config("FiT-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens, keep, y = _batch(model.cfg.token_dim)
    batch = pack(tokens, GRIDS, y)
    mask, t = masked_view(batch.layout, keep), torch.linspace(10.0, 900.0, len(GRIDS))
    out_ref, ref = _grads(model, batch.tokens, t, y, batch.layout, mask)
    assert not calls  # eager: autograd's index_add
    # a cached compiled graph (an earlier run of this test) would not trace the backward again: compile afresh
    import torch._inductor.utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    torch._dynamo.reset()
    with fresh():
        out, got = _grads(model, batch.tokens, t, y, batch.layout, mask, forward=torch.compile(model))
    assert calls  # the compiled backward is the window
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
