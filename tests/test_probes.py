"""tools/probes/decoder_mask_token_gap.py: its hybrid forward and its numbers (the probe backs a REPORT finding)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import masked_view, pack

ROOT = Path(__file__).resolve().parents[1]


def _probe():
    spec = importlib.util.spec_from_file_location("decoder_gap", ROOT / "tools/probes/decoder_mask_token_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _decoder_model():
    torch.manual_seed(0)
    model = FiT(model_config("FiT-tiny", patch_size=1, in_channels=4, num_classes=3, mask_design="decoder",
                             decoder_depth=1, decoder_hidden=32, decoder_heads=2))
    with torch.no_grad():  # adaLN-Zero and zero output layers would make every output 0
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.eval()


def _batch(keep_all: bool):
    grids = [(3, 4), (2, 5)]
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randn(h * w, 4, generator=g) for h, w in grids], grids, torch.tensor([0, 2]))
    keep = [torch.arange(h * w) if keep_all else torch.arange(0, h * w, 2) for h, w in grids]
    view = masked_view(batch.layout, keep)
    return type(batch)(batch.tokens, batch.y, batch.layout, mask=view)


def test_full_encoder_forward_with_every_token_kept_is_the_sampling_forward():
    probe, model = _probe(), _decoder_model()
    batch = _batch(keep_all=True)
    t = torch.tensor([100, 900])
    with torch.no_grad():
        hybrid = probe.full_encoder_forward(model, batch.tokens, t, batch.y, batch.layout, batch.mask)
        sampling = model(batch.tokens, t, batch.y, batch.layout)
    assert torch.allclose(hybrid, sampling, atol=1e-6)
    # Half kept: mask tokens reach the decoder, so the kept tokens' outputs change.
    half = _batch(keep_all=False)
    with torch.no_grad():
        hybrid = probe.full_encoder_forward(model, half.tokens, t, half.y, half.layout, half.mask)
    assert not torch.allclose(hybrid[half.mask.index], sampling[half.mask.index], atol=1e-3)


def test_gap_scores_each_way_at_each_timestep():
    probe, model = _probe(), _decoder_model()
    result = probe.gap(model, [_batch(keep_all=False)], torch.device("cpu"))
    assert set(result) == {"unmasked", "masked", "full_encoder"}
    for way in result.values():
        assert list(way) == list(probe.TIMESTEPS) and all(v > 0 and v == v for v in way.values())
    again = probe.gap(model, [_batch(keep_all=False)], torch.device("cpu"))
    assert again == result  # fixed noise per (batch, t): the numbers are reproducible
    # Every token kept: the training forward is the sampling forward, and both score the same tokens.
    full = probe.gap(model, [_batch(keep_all=True)], torch.device("cpu"))
    for t in probe.TIMESTEPS:
        assert full["masked"][t] == pytest.approx(full["unmasked"][t], rel=1e-5)
