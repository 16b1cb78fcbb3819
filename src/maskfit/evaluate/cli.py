"""Command-line glue for ``maskfit eval`` and ``maskfit train-classifier`` (wired in ``maskfit.cli``)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from maskfit.paths import check_output_dir, check_output_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_image_folder(root: Path, size: Optional[int] = None, limit: Optional[int] = None, seed: int = 0,
                      split: str = "all", holdout_fraction: float = 0.1):
    """An ImageFolder-style tree (one sub-folder per class, sorted names = class indices) as uint8 arrays.

    All images must share one size unless ``size`` is given (then each is resized to size x size with
    PIL bicubic). ``limit`` keeps a seeded random subset. ``split`` keeps one side of the project's own
    held-out split (maskfit.data.split: "train" | "holdout", or "all").
    """
    from PIL import Image

    from maskfit.data.datasets import load_rgb
    from maskfit.evaluate.proxy import LabeledImages

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root} must hold one sub-folder per class (ImageFolder layout), found {len(classes)}")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if split != "all":
        from maskfit.data.split import select_split

        files = select_split(files, root, split, holdout_fraction)
    if limit is not None and limit < len(files):
        keep = np.random.default_rng(seed).choice(len(files), size=limit, replace=False)
        files = [files[i] for i in sorted(keep)]
    images, labels = [], []
    for path, label in files:
        img = load_rgb(path)  # an empty or corrupt file: one error naming it
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        images.append(np.asarray(img, dtype=np.uint8))
        labels.append(label)
    sizes = {im.shape[:2] for im in images}
    if len(sizes) != 1:
        raise ValueError(f"{root} holds images of {len(sizes)} sizes ({sorted(sizes)[:3]}...); pass a size to resize them to one")
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))


# --------------------------------------------------------------------------------------------------
# maskfit eval
# --------------------------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from maskfit.evaluate.inception import WEIGHTS_ENV_VAR, default_inception_path

    p.add_argument("samples", help="ADM sample batch .npz (arr_0 uint8 NHWC; arr_1 labels optional)")
    p.add_argument("--reference", required=True,
                   help="ADM reference batch .npz (mu/sigma/mu_s/sigma_s and/or arr_0), or an image folder "
                        "(statistics computed from its images; not comparable to ADM's reference)")
    p.add_argument("--inception-weights", default=None,
                   help=f"local {Path(str(default_inception_path())).name} (default: ${WEIGHTS_ENV_VAR} or {default_inception_path()})")
    p.add_argument("--inception-sha256", default=None, help="pin the weights' full SHA-256 (default: prefix 6726825d)")
    p.add_argument("--proxy", default=None, metavar="CHECKPOINT",
                   help="use the project's proxy classifier (maskfit train-classifier) instead of Inception")
    p.add_argument("--reference-size", type=int, default=None, help="resize an image-folder reference to SxS")
    p.add_argument("--reference-limit", type=int, default=10_000,
                   help="images taken from an image-folder reference (ADM's reference batches hold 10 000)")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--pr-precision", choices=("adm", "float32"), default="adm",
                   help="P/R distances: float16 with float32 fallback (ADM) or float32 only")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="report folder (default: beside the samples file)")
    p.add_argument("--stem", default=None, help="report file name without suffix (default: <samples>_eval)")


def _reference_arg(path: Path, args):
    if path.is_dir():
        folder = load_image_folder(path, size=args.reference_size, limit=args.reference_limit)
        return folder.images
    return path


def run_eval(args) -> int:
    from maskfit.evaluate.adm_npz import NpzImageReader, read_reference
    from maskfit.evaluate.inception import load_inception
    from maskfit.evaluate.metrics import require_scipy
    from maskfit.evaluate.proxy import load_proxy
    from maskfit.evaluate.report import evaluate_samples, format_markdown, write_report

    samples = Path(args.samples)
    out_dir = Path(args.out) if args.out else samples.parent
    stem = args.stem or f"{samples.stem}_{'proxy_' if args.proxy else ''}eval"
    check_output_dir(out_dir, "--out", "report folder")
    for suffix in (".json", ".md"):
        check_output_file(out_dir / f"{stem}{suffix}", "--out/--stem", "report file")
    # Cheap checks first: a damaged input or a missing package must not wait for the network and the features.
    require_scipy()
    NpzImageReader(args.samples)
    reference = Path(args.reference)
    if not reference.is_dir():
        read_reference(reference)
    reference_input = _reference_arg(reference, args)  # an image folder is decoded (and checked) here
    device = resolve_device(args.device)
    if args.proxy:
        network = load_proxy(args.proxy, device)
    else:
        network = load_inception(args.inception_weights, device, expected_sha256=args.inception_sha256)
    result = evaluate_samples(
        samples,
        reference_input,
        network,
        batch_size=args.batch_size,
        device=device,
        num_samples=args.num_samples,
        pr_precision=args.pr_precision,
    )
    json_path, md_path = write_report(result, out_dir, stem)
    print(format_markdown(result))
    print(f"report: {md_path} and {json_path}")
    return 0


# --------------------------------------------------------------------------------------------------
# maskfit train-classifier
# --------------------------------------------------------------------------------------------------


def add_train_classifier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training images, ImageFolder layout (sorted folder names = labels)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--size", type=int, default=64, help="network input resolution (images are resized to it)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="seeded random share of --data held out for an accuracy check (not an independent test set)")
    p.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N images (quick runs)")
    p.add_argument("--data-split", choices=("all", "train", "holdout"), default="all",
                   help="train on one side of the project's held-out split of --data (maskfit.data.split; the study "
                        "uses 'train', so the held-out images stay unseen)")
    p.add_argument("--data-holdout-fraction", type=float, default=0.1, help="that split's held-out share per class")
    p.add_argument("--reference-out", default=None,
                   help="also write a proxy reference .npz: statistics of all --data images + up to 10 000 of them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _write_proxy_reference(model, data, path: Path, device: torch.device, seed: int, max_images: int = 10_000) -> Path:
    from maskfit.evaluate.adm_npz import write_reference_npz
    from maskfit.evaluate.metrics import feature_statistics
    from maskfit.evaluate.report import extract_features

    batches = (data.images[i : i + 500] for i in range(0, len(data.images), 500))
    feats = extract_features(model, batches, device)
    keep = np.random.default_rng(seed).permutation(len(data.images))[:max_images]
    return write_reference_npz(path, model.feature_network_id, pool3=feature_statistics(feats.pool), images=data.images[np.sort(keep)])


def run_train_classifier(args) -> int:
    from maskfit.evaluate.proxy import ProxyTrainConfig, save_proxy, train_classifier

    # Both outputs are checked before the images load: a bad path must not cost the training.
    check_output_file(args.out, "--out", "checkpoint file")
    if args.reference_out:
        check_output_file(args.reference_out, "--reference-out", "reference file")
    device = resolve_device(args.device)
    data = load_image_folder(Path(args.data), size=args.size, limit=args.limit, seed=args.seed,
                             split=args.data_split, holdout_fraction=args.data_holdout_fraction)
    config = ProxyTrainConfig(
        input_size=args.size,
        width=args.width,
        num_stages=args.stages,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
    )
    model, summary = train_classifier(data, config, device)
    digest = save_proxy(model, args.out, summary)
    report = {k: v for k, v in asdict(summary).items() if k != "history"}
    report.update({"checkpoint": str(args.out), "sha256": digest, "classes": list(data.class_names), "config": asdict(config),
                   "data": {"folder": str(args.data), "split": args.data_split, "holdout_fraction": args.data_holdout_fraction,
                            "images": len(data.images)}})
    if args.reference_out:
        report["reference"] = str(_write_proxy_reference(model, data, Path(args.reference_out), device, args.seed))
    print(json.dumps(report, indent=2))
    return 0
