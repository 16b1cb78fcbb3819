"""The flat transfer form of a batch (maskfit.data.transfer) holds exactly the batch's values."""
import dataclasses

import pytest
import torch

from maskfit.data.pipeline import pad_to_budget
from maskfit.data.transfer import FlatBatch, flatten
from maskfit.tokens import TokenBatch, masked_view, pack, to_padded


def _batches():
    g = torch.Generator().manual_seed(0)
    grids = [(2, 3), (4, 4), (1, 5)]
    packed = pack([torch.randn(h * w, 12, generator=g) for h, w in grids], grids, torch.tensor([3, 1, 2]), max_seqlen=16)
    keep = [torch.tensor([0, 4]), torch.tensor([1, 2, 3, 9, 15]), torch.tensor([0, 1, 2, 3, 4])]
    masked = TokenBatch(packed.tokens, packed.y, packed.layout, mask=masked_view(packed.layout, keep, max_seqlen=16))
    budget = pad_to_budget(packed, keep, budget=20, max_images=5)  # dummy segment + empty segments, valid flags
    return {"packed": packed, "padded": to_padded(packed, 16), "masked": masked, "budget": budget}


def _assert_same(a: TokenBatch, b: TokenBatch) -> None:
    def same(x, y, what):
        if x is None or y is None:
            assert x is None and y is None, what
            return
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), what
        else:
            assert x == y, what

    def same_layout(la, lb, where):
        for f in dataclasses.fields(la):
            same(getattr(la, f.name), getattr(lb, f.name), f"{where}.{f.name}")

    same(a.tokens, b.tokens, "tokens")
    same(a.y, b.y, "y")
    same_layout(a.layout, b.layout, "layout")
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        same(a.mask.index, b.mask.index, "mask.index")
        same_layout(a.mask.layout, b.mask.layout, "mask.layout")


@pytest.mark.parametrize("kind", ["packed", "padded", "masked", "budget"])
def test_flatten_then_unflatten_gives_the_same_batch(kind):
    batch = _batches()[kind]
    flat = flatten(batch)
    assert isinstance(flat, FlatBatch) and flat.ints.dtype == torch.int64 and flat.ints.dim() == 1
    _assert_same(flat.unflatten(), batch)
    _assert_same(flat.to("cpu"), batch)


def test_a_masked_batch_crosses_as_two_tensors():
    flat = flatten(_batches()["budget"])
    tensors = [v for v in vars(flat).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 2


def test_flatten_refuses_a_float_index():
    batch = _batches()["packed"]
    bad = TokenBatch(batch.tokens, batch.y.float(), batch.layout)
    with pytest.raises(TypeError, match="y has dtype torch.float32"):
        flatten(bad)


def _pixel_batch(kind: str) -> TokenBatch:
    """A batch of real 8-bit pixel tokens (as the datasets make them), in the given layout."""
    from maskfit.data.datasets import to_tensor_image
    from maskfit.tokens import patchify

    g = torch.Generator().manual_seed(1)
    grids = [(2, 3), (4, 4), (1, 5)]
    images = [to_tensor_image(torch.randint(0, 256, (h * 2, w * 2, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in grids]
    tokens = [patchify(x, 2) for x in images]
    packed = pack(tokens, grids, torch.tensor([0, 1, 2]), max_seqlen=16)
    if kind == "padded":
        return to_padded(packed, 16)
    if kind == "budget":
        keep = [torch.tensor([0, 4]), torch.tensor([1, 2, 3, 9, 15]), torch.tensor([0, 1, 2, 3, 4])]
        return pad_to_budget(packed, keep, budget=20, max_images=5)
    return packed


@pytest.mark.parametrize("kind", ["packed", "padded", "budget"])
def test_pixel_tokens_travel_as_8_bit_codes_and_come_back_bit_for_bit(kind):
    batch = _pixel_batch(kind)
    flat = flatten(batch, pixel_codes=True)
    assert flat.tokens.dtype == torch.uint8 and flat.tokens.nbytes * 4 == batch.tokens.nbytes
    _assert_same(flat.unflatten(), batch)  # padding (0.0) included, exactly


def test_pixel_codes_refuse_values_off_the_8_bit_grid():
    batch = _pixel_batch("packed")
    off = TokenBatch(batch.tokens + 1e-3, batch.y, batch.layout)
    with pytest.raises(ValueError, match="not 8-bit values"):
        flatten(off, pixel_codes=True)


def test_the_training_loader_sends_pixel_codes_for_pixel_data_and_floats_for_latents():
    from maskfit.config import config_from_dict
    from maskfit.data.pipeline import build_training_data

    cfg = config_from_dict({
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 16, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed"},
        "diffusion": {"objective": "flow"}, "mask": {"keep_ratio": 0.5},
        "train": {"steps": 4, "batch_size": 4, "device": "cpu"},
    })
    data = build_training_data(cfg, 4)
    flat = data._next_flat(0)
    assert flat.pixel_codes and flat.tokens.dtype == torch.uint8
    assert data.next_batch(1).tokens.dtype == torch.float32
