"""Which tokens a training loss counts, and how much: the one place masked training changes the loss.

Every diffusion loss reduces per-token errors to one value per image as ``sum_i w_i * loss_i`` over the
image's tokens, then averages images, so each image counts once whatever its length (FiT, MaskDiT,
MicroDiT all normalise per image; reference/masked.md §6.3).

- no mask: w = 1 / n_real on real tokens, 0 on padding (FiT's N / N_valid normalisation);
- masked, plain dropping or mixer: w = 1 / n_kept on kept tokens, 0 elsewhere (MaskDiT's DSM term on
  unmasked patches);
- masked, full-grid designs (decoder, side-interpolator): additionally aux / n_dropped on dropped tokens.
  MaskDiT's auxiliary term reconstructs the noisy input; we use the same denoising target on dropped
  tokens instead (MDT trains on all tokens and MC-DiT argues the noisy-to-noisy target wastes signal),
  with the weight configurable (mask.aux_loss_weight, default MaskDiT's 0.1).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from maskfit.tokens import MaskedView, TokenLayout, segment_sum


def token_weights(
    layout: TokenLayout, mask: Optional[MaskedView] = None, aux_weight: float = 0.0, predicts_dropped: bool = False
) -> Tensor:
    """(T,) weights such that sum over an image's tokens of w * loss is that image's loss."""
    T, B = layout.num_tokens, layout.num_images
    real = torch.ones(T, dtype=torch.bool, device=layout.pos.device) if layout.valid is None else layout.valid
    if mask is None:
        counted = real
    else:
        # index_fill takes the value as a kernel argument; `counted[index] = True` would copy a host
        # scalar to the device and synchronise.
        # A kept padding token (the dummy segment of a constant token budget) counts nowhere.
        counted = torch.zeros_like(real).index_fill(0, mask.index, True) & real
    n_counted = segment_sum(counted.float(), layout.seq_id, B).clamp_min(1.0)  # (B,)
    w = torch.where(counted, 1.0 / n_counted[layout.seq_id], torch.zeros((), device=real.device))
    if mask is not None and predicts_dropped and aux_weight > 0:
        dropped = real & ~counted
        n_dropped = segment_sum(dropped.float(), layout.seq_id, B).clamp_min(1.0)
        w = w + torch.where(dropped, aux_weight / n_dropped[layout.seq_id], torch.zeros((), device=real.device))
    return w


def reduce_per_image(per_token: Tensor, weights: Tensor, layout: TokenLayout) -> Tensor:
    """(T,) per-token loss -> scalar: sum of weighted tokens per image, mean over the images that count.

    ``where`` instead of a product, so a non-finite value in an uncounted slot (padding) cannot leak in.
    An image with no counted token (the dummy segment that pads a packed stream to a fixed budget) is
    left out of the mean; the count stays on the device (no host sync).
    """
    counted = weights > 0
    weighted = torch.where(counted, per_token * weights, torch.zeros_like(per_token))
    per_image = segment_sum(weighted, layout.seq_id, layout.num_images)  # (B,)
    images = segment_sum(counted.float(), layout.seq_id, layout.num_images) > 0  # (B,)
    return per_image.sum() / images.sum().clamp_min(1)
