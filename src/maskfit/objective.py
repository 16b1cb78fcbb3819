"""Which tokens a training loss counts, how much, and against which target: where masking changes the loss.

Every diffusion loss reduces per-token errors to one value per image as ``sum_i w_i * loss_i`` over the
image's tokens, then averages images, so each image counts once whatever its length (FiT, MaskDiT,
MicroDiT all normalise per image; reference/masked.md §6.3).

- no mask: w = 1 / n_real on real tokens, 0 on padding (FiT's N / N_valid normalisation);
- masked, plain dropping or mixer: w = 1 / n_kept on kept tokens, 0 elsewhere (MaskDiT's DSM term on
  unmasked patches);
- masked, full-grid designs (decoder, side-interpolator): additionally aux / n_dropped on dropped tokens
  (mask.aux_loss_weight, default MaskDiT's 0.1).

The target on dropped tokens. The model never sees a dropped token's noisy input, so it can only predict
E[target | visible tokens, t]. Per objective:

- DDPM (ε-prediction): E[ε | visible] = 0 (a dropped token's noise is independent of everything the model
  sees), so an ε target on dropped tokens would only pull outputs to 0. The auxiliary term instead fits the
  ε channels to ``mask.aux_target`` (:data:`AUX_TARGETS`):
  "noisy_input" (default) = x_t, MaskDiT's MAE-style reconstruction of the noisy input (Zheng et al. 2023,
  the auxiliary loss of its ``train_utils/loss.py``, reference/masked.md §1.3; that code also normalises
  each target patch, ``norm_pix_loss``, which we do not);
  "x0" = the clean tokens (MC-DiT's clean-to-clean argument; E[x0 | visible] is the in-painting mean).
  E[x_t | visible] = sqrt(ᾱ_t) E[x0 | visible] (DDPM eq. 4), so both targets carry the same information.
  The variational-bound term (learned Σ, iDDPM eq. 16) counts kept tokens only: it scores a predicted
  posterior of x_{t-1} given x_t, which is meaningless where x_t was never seen.
- Flow (FiTv2, velocity u = x1 − x0): E[u | visible] = E[x1 | visible] − E[x0 | visible] = E[x1 | visible]
  (the noise of a dropped token has mean 0), a meaningful in-painting target, so dropped tokens keep the
  velocity target; ``mask.aux_target`` does not apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from maskfit.tokens import MaskedView, TokenLayout, segment_sum

# DDPM targets of the auxiliary loss on dropped tokens (see the module docstring).
AUX_TARGETS = ("noisy_input", "x0")


def token_weights(
    layout: TokenLayout, mask: Optional[MaskedView] = None, aux_weight: float = 0.0, predicts_dropped: bool = False
) -> Tensor:
    """(T,) weights such that sum over an image's tokens of w * loss is that image's loss."""
    B = layout.num_images
    real = _real(layout)
    # A kept padding token (the dummy segment of a constant token budget) counts nowhere.
    counted = real if mask is None else _kept(layout, mask) & real
    n_counted = segment_sum(counted.float(), layout.seq_id, B).clamp_min(1.0)  # (B,)
    w = torch.where(counted, 1.0 / n_counted[layout.seq_id], torch.zeros((), device=real.device))
    if mask is not None and predicts_dropped and aux_weight > 0:
        dropped = dropped_tokens(layout, mask)
        n_dropped = segment_sum(dropped.float(), layout.seq_id, B).clamp_min(1.0)
        w = w + torch.where(dropped, aux_weight / n_dropped[layout.seq_id], torch.zeros((), device=real.device))
    return w


def dropped_tokens(layout: TokenLayout, mask: MaskedView) -> Tensor:
    """(T,) bool: real tokens the backbone does not see (padding is neither kept nor dropped)."""
    return _real(layout) & ~_kept(layout, mask)


def _real(layout: TokenLayout) -> Tensor:
    """(T,) bool: the tokens that belong to an image (not padding)."""
    if layout.valid is None:
        return torch.ones(layout.num_tokens, dtype=torch.bool, device=layout.pos.device)
    return layout.valid


def _kept(layout: TokenLayout, mask: MaskedView) -> Tensor:
    """(T,) bool: the tokens at ``mask.index`` (padding included, if a kept slot is padding)."""
    # index_fill takes the value as a kernel argument; `kept[index] = True` would copy a host scalar to
    # the device and synchronise.
    none = torch.zeros(layout.num_tokens, dtype=torch.bool, device=layout.pos.device)
    return none.index_fill(0, mask.index, True)


def reduce_per_image(
    per_token: Tensor, weights: Tensor, layout: TokenLayout, images_of: Optional[Tensor] = None
) -> Tensor:
    """(T,) per-token loss -> scalar: sum of weighted tokens per image, mean over the images that count.

    ``where`` instead of a product, so a non-finite value in an uncounted slot (padding) cannot leak in.
    An image with no counted token (the dummy segment that pads a packed stream to a fixed budget) is
    left out of the mean; the count stays on the device (no host sync).
    ``images_of`` (T,): the weights whose images the mean runs over (default ``weights``). Terms of one loss
    split over token subsets (kept / dropped) pass the whole loss's weights, so they share one denominator
    and add up to the loss of the whole.
    """
    counted = weights > 0
    weighted = torch.where(counted, per_token * weights, torch.zeros_like(per_token))
    per_image = segment_sum(weighted, layout.seq_id, layout.num_images)  # (B,)
    in_mean = counted if images_of is None else images_of > 0  # (T,)
    images = segment_sum(in_mean.float(), layout.seq_id, layout.num_images) > 0  # (B,)
    return per_image.sum() / images.sum().clamp_min(1)
