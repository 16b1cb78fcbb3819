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
