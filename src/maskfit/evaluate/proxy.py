"""Proxy metrics: a small classifier trained by the project, for machines without the Inception weights.

The FID Inception cannot be downloaded on the project's machines, so ``maskfit train-classifier``
trains this CNN on the project's own training images and ``maskfit eval --proxy`` reports

* the Fréchet distance in its feature space (the global-average-pooled last stage, Heusel et al.'s
  formula on these features instead of Inception pool3), and Precision/Recall there;
* the class accuracy of samples: how often the classifier predicts the label the sample was
  generated for (a CAS-like measure of class-conditional fidelity).

These numbers are **proxies for comparing our own models with each other**, trained and evaluated
with the same classifier checkpoint (its SHA-256 is in every report). They are never comparable
with published FID/IS tables, nor across classifier checkpoints.

Any image size works: the network resizes its input to the training resolution (bilinear,
antialiased, aspect ratio not kept, like the Inception protocol's stretch to 299²) and ends in global
average pooling. Training uses random aspect-ratio crops so stretched images are in-distribution.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskfit.checkpoint import shared_mode
from maskfit.evaluate.inception import sha256_file

PathLike = Union[str, Path]


@dataclass(frozen=True)
class ProxyConfig:
    """Architecture of the proxy classifier (saved with its weights)."""

    num_classes: int
    input_size: int = 64  # every input is resized to input_size x input_size inside the network
    width: int = 32  # channels of the first stage, doubled at each later stage
    num_stages: int = 4  # each stage halves the resolution

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.input_size < 2**self.num_stages:
            raise ValueError(
                f"input_size {self.input_size} is too small for {self.num_stages} stride-2 stages; "
                f"use at least {2 ** self.num_stages} or fewer stages"
            )

    @property
    def feature_dim(self) -> int:
        return self.width * 2 ** (self.num_stages - 1)


@dataclass
class ProxyOutputs:
    features: Tensor  # (N, feature_dim) float32: global-average-pooled last stage (Fréchet distance)
    logits: Tensor  # (N, num_classes) float32 (sample class accuracy)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: features must not depend on what else is in the batch or on train/eval mode.
    return nn.GroupNorm(min(8, channels), channels)


class _Stage(nn.Module):
    """conv3x3 stride 2 -> GN -> SiLU -> conv3x3 -> GN -> SiLU, with a strided 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))  # (N, out, H/2, W/2)
        h = self.norm2(self.conv2(h))  # (N, out, H/2, W/2)
        return F.silu(h + self.shortcut(x))


class ProxyClassifier(nn.Module):
    """Small residual CNN. Input: uint8 (N, H, W, 3) of any size; output: pooled features and logits."""

    def __init__(self, config: ProxyConfig, class_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.config = config
        self.class_names: List[str] = list(class_names) if class_names is not None else [str(i) for i in range(config.num_classes)]
        if len(self.class_names) != config.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {config.num_classes} classes")
        w = config.width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), _norm(w), nn.SiLU())
        self.stages = nn.ModuleList(_Stage(w * 2 ** max(i - 1, 0), w * 2**i) for i in range(config.num_stages))
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.weights_sha256: Optional[str] = None  # set by load_proxy / save_proxy

    @property
    def name(self) -> str:
        digest = self.weights_sha256[:12] if self.weights_sha256 else "unsaved"
        return f"proxy-cnn (width {self.config.width}, {self.config.input_size}px, sha256 {digest})"

    @property
    def feature_network_id(self) -> str:
        """Identifies this exact checkpoint in reference files: stats from another one do not mix."""
        return f"proxy:{self.weights_sha256 or 'unsaved'}"

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [-1, 1], stretched to S = input_size."""
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"proxy classifier input must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        s = self.config.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x / 127.5 - 1.0

    def forward_normalized(self, x: Tensor) -> ProxyOutputs:
        h = self.stem(x)  # (N, w, S, S)
        for stage in self.stages:
            h = stage(h)  # (N, C, S/2^i, S/2^i)
        features = h.mean(dim=(2, 3))  # (N, feature_dim): global average pooling
        return ProxyOutputs(features=features, logits=self.head(features))

    def forward(self, images: Tensor) -> ProxyOutputs:
        return self.forward_normalized(self.preprocess(images))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledImages:
    """A training set in memory: uint8 (N, H, W, 3) images of one size and int labels."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64 in [0, num_classes)
    class_names: Tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}), got [{self.labels.min()}, {self.labels.max()}]")


@dataclass(frozen=True)
class ProxyTrainConfig:
    input_size: int = 64
    width: int = 32
    num_stages: int = 4
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    holdout_fraction: float = 0.1  # random split of the given images, for a held-out accuracy
    min_crop_area: float = 0.35  # random-resized-crop area range [min_crop_area, 1]
    max_aspect: float = 3.0  # crop aspect ratio in [1/max_aspect, max_aspect] (FiT's range is 1/3..3)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")


@dataclass
class TrainSummary:
    num_train: int
    num_holdout: int
    final_train_loss: float
    train_accuracy: float
    holdout_accuracy: Optional[float]  # None when holdout_fraction is 0
    epochs: int
    split: str = "random split of the given images (seeded); not the project's separately kept held-out set"
    history: List[dict] = field(default_factory=list)


def _random_crop_resize(x: Tensor, size: int, gen: torch.Generator, cfg: ProxyTrainConfig) -> Tensor:
    """Random-resized crop with random aspect ratio and horizontal flip, batched with grid_sample.

    (N, 3, H, W) float -> (N, 3, size, size). The crop is stretched to a square, which is what the
    network's own resize does to non-square samples at evaluation.
    """
    n = x.shape[0]
    area = torch.empty(n).uniform_(cfg.min_crop_area, 1.0, generator=gen)
    log_r = torch.empty(n).uniform_(-math.log(cfg.max_aspect), math.log(cfg.max_aspect), generator=gen)
    aspect = torch.exp(log_r)  # width / height of the crop
    crop_w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the image width
    crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - crop_w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - crop_h)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, cy
    grid = F.affine_grid(theta.to(x.device), [n, 3, size, size], align_corners=False)  # (N, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@torch.inference_mode()
def _accuracy(model: ProxyClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).to(device)
        pred = model(x).logits.argmax(1).cpu().numpy()
        correct += int((pred == labels[start : start + batch]).sum())
    return correct / max(len(images), 1)


def train_classifier(
    dataset: LabeledImages,
    config: ProxyTrainConfig = ProxyTrainConfig(),
    device: Union[str, torch.device] = "cpu",
    log: Optional[Callable[[str], None]] = print,
) -> Tuple[ProxyClassifier, TrainSummary]:
    """Train the proxy classifier on ``dataset``; returns the model (eval mode) and a summary."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    order = torch.randperm(len(dataset.images), generator=gen).numpy()
    num_holdout = int(round(config.holdout_fraction * len(order)))
    hold_idx, train_idx = order[:num_holdout], order[num_holdout:]
    if len(train_idx) == 0:
        raise ValueError(f"no training images left after holding out {num_holdout} of {len(order)}")
    model_cfg = ProxyConfig(len(dataset.class_names), config.input_size, config.width, config.num_stages)
    model = ProxyClassifier(model_cfg, dataset.class_names).to(device)

    # Resize the training images once to the network's resolution (the same antialiased resize the
    # network applies at evaluation), then keep them on the device as uint8.
    train_images = torch.from_numpy(dataset.images[train_idx])  # (N, H, W, 3) uint8
    s = config.input_size
    if tuple(train_images.shape[1:3]) != (s, s):
        resized = [
            F.interpolate(train_images[i : i + 1024].permute(0, 3, 1, 2).float(), size=(s, s), mode="bilinear", antialias=True)
            for i in range(0, len(train_images), 1024)
        ]
        train_images = torch.cat(resized).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    train_images = train_images.to(device)
    train_labels = torch.from_numpy(dataset.labels[train_idx]).to(device)

    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    )
    history: List[dict] = []
    loss_value = float("nan")
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(len(train_idx), generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(perm), config.batch_size):
            idx = perm[start : start + config.batch_size]
            x = train_images[idx].permute(0, 3, 1, 2).float()  # (B, 3, s, s) 0..255
            x = _random_crop_resize(x, s, gen, config) / 127.5 - 1.0  # (B, 3, s, s) in [-1, 1]
            out = model.forward_normalized(x)
            loss = F.cross_entropy(out.logits, train_labels[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.logits.argmax(1) == train_labels[idx]).sum())
        loss_value = loss_sum / len(perm)
        history.append({"epoch": epoch + 1, "loss": loss_value, "train_accuracy_augmented": correct / len(perm)})
        if log is not None:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_value:.4f}, augmented train accuracy {correct / len(perm):.3f}")
    model.eval()
    train_acc = _accuracy(model, dataset.images[train_idx], dataset.labels[train_idx], device)
    hold_acc = _accuracy(model, dataset.images[hold_idx], dataset.labels[hold_idx], device) if num_holdout else None
    summary = TrainSummary(
        num_train=len(train_idx),
        num_holdout=num_holdout,
        final_train_loss=loss_value,
        train_accuracy=train_acc,
        holdout_accuracy=hold_acc,
        epochs=config.epochs,
        history=history,
    )
    return model.requires_grad_(False), summary


# --------------------------------------------------------------------------------------------------
# Checkpoints (safetensors, written atomically)
# --------------------------------------------------------------------------------------------------


def save_proxy(model: ProxyClassifier, path: PathLike, summary: Optional[TrainSummary] = None) -> str:
    """Save weights + config + class names as safetensors; returns (and sets) the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "maskfit-proxy-classifier-v1",
        "config": json.dumps(asdict(model.config)),
        "class_names": json.dumps(model.class_names),
        "train_summary": json.dumps(asdict(summary) if summary is not None else None),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, shared_mode())  # mkstemp makes files private; the process umask decides, as for any tool
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    model.weights_sha256 = sha256_file(path)
    return model.weights_sha256


def load_proxy(path: PathLike, device: Union[str, torch.device] = "cpu") -> ProxyClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No proxy classifier at {path}; train one with `maskfit train-classifier --data DIR --out {path}`")
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"proxy classifier {path} cannot be read ({type(err).__name__}: {err}): the file is corrupt or truncated; "
            f"train it again (`maskfit train-classifier --out {path}`) or copy it again"
        ) from None
    if metadata.get("format") != "maskfit-proxy-classifier-v1":
        raise ValueError(f"{path} is not a maskfit proxy classifier (format {metadata.get('format')!r})")
    model = ProxyClassifier(ProxyConfig(**json.loads(metadata["config"])), json.loads(metadata["class_names"]))
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # every feature would be NaN: refused here, naming the file, not as a NaN distance later
        raise ValueError(f"{path} holds NaN or infinite weights ({', '.join(broken[:3])}...); retrain the classifier")
    model.load_state_dict(state)
    model.weights_sha256 = sha256_file(path)
    model.weights_path = str(path)  # named by error messages and reports
    return model.eval().requires_grad_(False).to(device)


def load_train_summary(path: PathLike) -> Optional[dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("train_summary")
    return json.loads(raw) if raw else None
