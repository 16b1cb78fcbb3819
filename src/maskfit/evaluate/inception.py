"""Inception-v3 of the 2015-12-05 TensorFlow graph, the network behind ADM's evaluator.

ADM's ``evaluations/evaluator.py`` feeds float images (0..255, NHWC, any H x W) into the frozen TF
graph ``classify_image_graph_def.pb`` just *before* the graph's own ``ResizeBilinear`` to 299 x 299
and its normalisation ``(x - 128) / 128``; it reads three things out of it (see
``shared/reference/eval.md`` §1.2-1.3):

* ``pool_3:0``: the 2048-d global average pool (FID, Precision/Recall, and the input of IS);
* ``mixed_6/conv:0``: the ReLU output of the 1x1 branch of the 7th mixed block, 17x17x192; ADM keeps
  channels ``[..., :7]`` and flattens them in H, W, C order to **2023** values (sFID). In torchvision
  names the TF block ``mixed_6`` is ``Mixed_6d`` (not 6e): ``mixed``=5b, 5c, 5d, 6a, 6b, 6c, **6d**, ...;
* the weight ``w`` of ``softmax/logits/MatMul`` (2048 x 1008): IS uses ``softmax(pool3 @ w)``, with
  **no bias** (improved-GAN's IS code).

This module rebuilds that network in PyTorch with torchvision's module names, so the state dict
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's port of the same TF weights; torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` carries the same hash suffix) loads unchanged. The
differences from torchvision's Inception3 are those of the TF graph (eval.md §2.1): average pools in
the mixed blocks exclude padding, ``Mixed_7c``'s pool branch is a max pool, BN eps is 1e-3, 1008
classes, and the resize is TF1's bilinear (``align_corners=False`` *without* half-pixel centres).

The weights are never downloaded: the project's machines have no network. ``load_inception`` takes a
local path, checks its SHA-256 and says exactly what to fetch and where to put it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_NAME = "inception-v3-2015-12-05 (ADM/TF graph weights)"
INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub's file-name convention: the part after the last '-' is the start of the file's SHA-256
# (torch.hub's own ``check_hash`` verifies exactly this prefix). A full digest can be pinned with
# ``expected_sha256=`` once someone has hashed a trusted copy.
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME,
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth",
)
WEIGHTS_ENV_VAR = "MASKFIT_INCEPTION_WEIGHTS"

INPUT_SIZE = 299  # the TF graph resizes every input to 299 x 299 (aspect ratio not kept)
POOL3_DIM = 2048
NUM_LOGITS = 1008  # the 2015 graph's classifier has 1008 outputs (1000 ImageNet classes + 8 unused)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_GRID = 17  # Mixed_6d runs on a 17 x 17 grid for a 299 x 299 input
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023


class InceptionWeightsError(RuntimeError):
    """The Inception weight file is missing, corrupt, or not the 2015-12-05 FID weights."""


def default_inception_path() -> Path:
    """Where ``maskfit eval`` looks for the weights unless told otherwise (env var, then user cache)."""
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/maskfit").expanduser() / INCEPTION_FILENAME


def _how_to_get_weights(path: Path) -> str:
    return (
        f"Download {INCEPTION_FILENAME} (about 91 MiB) on a machine with network access from\n"
        f"  {INCEPTION_URLS[0]}\n"
        f"(torch-fidelity's copy {INCEPTION_URLS[1]} holds the same weights), then put it at\n"
        f"  {path}\n"
        f"or pass its location with --inception-weights PATH (or set ${WEIGHTS_ENV_VAR}). "
        "Without these weights only the proxy metrics (--proxy CHECKPOINT) can run."
    )


def sha256_file(path: Union[str, Path], chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_file(path: Union[str, Path], expected_sha256: Optional[str] = None) -> str:
    """Return the file's SHA-256 after checking it; raise ``InceptionWeightsError`` with the fix if not."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights not found at {path}.\n" + _how_to_get_weights(path))
    digest = sha256_file(path)
    expected = (expected_sha256 or INCEPTION_SHA256_PREFIX).lower()
    if not digest.startswith(expected):
        raise InceptionWeightsError(
            f"Inception weights at {path} have SHA-256 {digest}, expected "
            f"{'exactly ' + expected if expected_sha256 else 'a digest starting with ' + expected}: "
            "the file is truncated, corrupt, or another network (torchvision's ImageNet Inception "
            "'inception_v3_google-*.pth' is a different, retrained model and gives wrong FIDs).\n"
            + _how_to_get_weights(path)
        )
    return digest


# --------------------------------------------------------------------------------------------------
# TF1 bilinear resize
# --------------------------------------------------------------------------------------------------


def _tf1_source_index(in_size: int, out_size: int, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """Lower/upper source indices and lerp weights of TF1 ``ResizeBilinear(align_corners=False)``.

    TF1 (legacy, no half-pixel centres): ``scale = float(in) / out``; ``src = dst * scale`` in float32;
    ``lower = floor(src)``, ``upper = min(ceil(src), in - 1)``, ``lerp = src - floor(src)``. Unlike
    PyTorch's ``align_corners=False`` (``src = (dst + 0.5) * scale - 0.5``) the grid is anchored at
    the top-left pixel, so the result is shifted by up to half a source pixel.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale  # (out,) float32 exactly as TF computes it
    floor = torch.floor(src)
    lower = floor.long().clamp(0, in_size - 1)
    upper = torch.ceil(src).long().clamp(0, in_size - 1)
    lerp = src - floor
    return lower.to(device), upper.to(device), lerp.to(device)


def resize_bilinear_tf1(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Resize float (N, C, H, W) to (N, C, *size) exactly as TF1's ``ResizeBilinear`` (no antialias).

    Per axis the scale is separate (a 160x320 image is stretched to 299x299). The interpolation order
    is TF's: lerp along x on the top and bottom source rows, then along y.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 wants a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x  # scale 1: TF copies the input
    y_lo, y_hi, y_lerp = _tf1_source_index(in_h, out_h, x.device)
    x_lo, x_hi, x_lerp = _tf1_source_index(in_w, out_w, x.device)
    top_rows = x.index_select(2, y_lo)  # (N, C, out_h, W)
    bottom_rows = x.index_select(2, y_hi)  # (N, C, out_h, W)
    top_left, top_right = top_rows.index_select(3, x_lo), top_rows.index_select(3, x_hi)  # (N, C, oh, ow)
    bottom_left, bottom_right = bottom_rows.index_select(3, x_lo), bottom_rows.index_select(3, x_hi)
    x_lerp = x_lerp.to(x.dtype)
    top = top_left + (top_right - top_left) * x_lerp  # (N, C, oh, ow)
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp  # (N, C, oh, ow)
    return top + (bottom - top) * y_lerp.to(x.dtype)[:, None]  # (N, C, oh, ow)


# --------------------------------------------------------------------------------------------------
# The network (module names = torchvision's Inception3, so the FID state dict loads as is)
# --------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # The TF graph's average pools ignore the zero padding (TF 'SAME' pooling divides by the number of
    # real pixels); torchvision's default would count it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: Mixed_5b, 5c, 5d (TF mixed, mixed_1, mixed_2)."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)  # (N, 64, 35, 35)
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # (N, 64, 35, 35)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, 35, 35)
        bp = self.branch_pool(_avg_pool_3x3(x))  # (N, pool_features, 35, 35)
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: Mixed_6a (TF mixed_3)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)  # (N, 384, 17, 17)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, 17, 17)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, in_ch, 17, 17)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions: Mixed_6b..6e (TF mixed_4..mixed_7)."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward_with_1x1(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Block output and its 1x1 branch (for Mixed_6d this branch is TF's ``mixed_6/conv``)."""
        b1 = self.branch1x1(x)  # (N, 192, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (N, 192, 17, 17)
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))  # (N, 192, 17, 17)
        bp = self.branch_pool(_avg_pool_3x3(x))  # (N, 192, 17, 17)
        return torch.cat([b1, b7, bd, bp], 1), b1

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_1x1(x)[0]


class InceptionD(nn.Module):
    """17 -> 8 reduction: Mixed_7a (TF mixed_8)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))  # (N, 320, 8, 8)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))  # (N, 192, 8, 8)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, in_ch, 8, 8)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions: Mixed_7b (avg pool), Mixed_7c (max pool, as in TF)."""

    def __init__(self, in_ch: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)  # (N, 320, 8, 8)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # (N, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # (N, 768, 8, 8)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # the TF graph's last block (mixed_10) max-pools here
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)  # (N, 192, 8, 8)
        return torch.cat([b1, b3, bd, bp], 1)  # (N, 2048, 8, 8)


@dataclass
class InceptionOutputs:
    """What ADM's evaluator reads from the graph, per image."""

    pool3: Tensor  # (N, 2048) float32: FID, Precision/Recall
    spatial: Tensor  # (N, 2023) float32: Mixed_6d.branch1x1[:, :7] flattened H, W, C (sFID)
    logits: Tensor  # (N, 1008) float32: pool3 @ fc.weight.T, no bias (IS)


class InceptionV3(nn.Module):
    """The FID Inception-v3. Input: uint8 (N, H, W, 3) of any H x W (one size per batch)."""

    name = INCEPTION_NAME
    feature_dim = POOL3_DIM

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL3_DIM, NUM_LOGITS)
        # Filled by load_inception; a random-weight network says so in every report.
        self.weights_sha256: Optional[str] = None
        self.weights_path: Optional[str] = None

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, 299, 299) normalised as the TF graph: (x - 128) / 128."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"Inception input must be (N, H, W, 3) NHWC images, got shape {tuple(images.shape)}; "
                "ADM sample files store arr_0 as uint8 NHWC"
            )
        if images.dtype != torch.uint8:
            raise ValueError(
                f"Inception input must be uint8 0..255, got {images.dtype}; quantise samples first "
                "(e.g. clamp(127.5 * x + 128, 0, 255).to(torch.uint8) for x in [-1, 1])"
            )
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) 0..255
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))  # (N, 3, 299, 299), resize before normalising as TF
        x = (x - 128.0) * (1.0 / 128.0)
        if self.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last) and images.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)  # model was put in channels_last: match it
        return x

    def forward(self, images: Tensor) -> InceptionOutputs:
        x = self.preprocess(images)  # (N, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))  # (N, 768, 17, 17)
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)  # (N, 768, 17, 17), (N, 192, 17, 17)
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))  # (N, 2048)
        # NHWC flatten order matters: ADM's stored mu_s/sigma_s are in TF's H, W, C order.
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7 = 2023)
        logits = pool3 @ self.fc.weight.T  # (N, 1008), unbiased as ADM's IS
        return InceptionOutputs(pool3=pool3, spatial=spatial, logits=logits)


def build_random_inception(seed: int = 0) -> InceptionV3:
    """An Inception with random weights: for shape tests and timing (weights do not change the time).

    He-normal convolutions and BN at identity keep activations at a sane scale through 90+ layers,
    so the features of a random network still tell inputs apart (useful for smoke tests).
    """
    gen = torch.Generator().manual_seed(seed)
    model = InceptionV3()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        elif isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * module.in_features**-0.5)
                module.bias.zero_()
    return model.eval().requires_grad_(False)


def load_inception(
    path: Union[str, Path, None] = None,
    device: Union[str, torch.device] = "cpu",
    expected_sha256: Optional[str] = None,
) -> InceptionV3:
    """Load the FID Inception from a local file after checking its SHA-256.

    ``path`` defaults to ``default_inception_path()``. ``expected_sha256`` pins a full digest; by
    default the digest must start with the file name's hash suffix ``6726825d`` (torch.hub's rule).
    """
    path = Path(path).expanduser() if path is not None else default_inception_path()
    digest = check_weights_file(path, expected_sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle/zip error: the hash matched, so this is an unexpected format
        raise InceptionWeightsError(f"Could not read Inception weights at {path}: {err}.\n" + _how_to_get_weights(path))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = InceptionV3()
    result = model.load_state_dict(state, strict=False)
    # Old state dicts lack BN's num_batches_tracked; it plays no part in eval mode.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InceptionWeightsError(
            f"Inception weights at {path} do not match the FID Inception-v3: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}.\n" + _how_to_get_weights(path)
        )
    model.weights_sha256 = digest
    model.weights_path = str(path)
    # eval() is mandatory: BatchNorm in train mode moves FID by several points (pytorch-fid#118).
    return model.eval().requires_grad_(False).to(device)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run convolutions and matmuls in true FP32 (no TF32), as the TF graph the tables came from.

    PyTorch lets cuDNN convolutions use TF32 by default; that perturbs features at the 1e-3 level.
    Only the new fp32_precision API is touched (mixing it with the legacy allow_tf32 flags raises).
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    new_api = conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision")
    saved_benchmark = torch.backends.cudnn.benchmark
    if new_api:
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
    else:  # torch < 2.9: only the legacy flags exist
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
    # Fixed batch shapes: let cuDNN pick its fastest FP32 algorithm once per shape.
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
        if new_api:
            conv.fp32_precision, matmul.fp32_precision = saved
        else:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def as_uint8_nhwc_tensor(images: Union[np.ndarray, Tensor]) -> Tensor:
    """A uint8 NHWC batch from numpy or torch, without copying when possible."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return images
