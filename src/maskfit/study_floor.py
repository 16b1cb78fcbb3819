"""The floor and the noise of the study's proxy metrics: real training images scored as if they were samples.

    python -m maskfit.study_floor configs/study/base.toml --proxy study/proxy/proxy_classifier.safetensors \
        --data .carry/imagenette/train-128 --out study/floor.jsonl

For every resolution of the protocol and each of ``--draws`` draws, ``--num-images`` images of the training side
of the split (per class in turn, as the samples' labels are; never the held-out side the references come from)
are brought to HxW by the references' own rule (:func:`maskfit.experiment.reference_image`, with other random
crops) and scored against the same held-out reference as a run's samples (:func:`maskfit.evaluate.report.
evaluate_samples` with the proxy classifier). The mean over draws is what a generator of the training images
themselves would score at this sample count (Fréchet distances at 200 samples are biased upward, so the floor is
not 0); the spread over draws is the noise of one sample set, the least difference between two runs worth
reading. Runs on the CPU in a few minutes; one JSON line per (resolution, draw).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

FLOOR_SEED_OFFSET = 1_000  # crop streams of the floor's draws: item_rng(FLOOR_SEED_OFFSET + draw, 0, index)
METRIC_KEYS = ("proxy_fd", "proxy_precision", "proxy_recall", "proxy_class_accuracy", "detail_ratio", "contrast_ratio")


def balanced_indices(labels: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices, the classes in turn (0, 1, ..., 0, 1, ...) as per-class sample labels are, each class's
    images drawn without replacement in a random order."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    out = []
    for k in range(count):
        c = classes[k % len(classes)]
        if not pools[c]:
            raise ValueError(f"class {c} has fewer than {count // len(classes) + 1} training images; lower --num-images")
        out.append(pools[c].pop())
    return np.asarray(out)


def floor_lines(cfg, proxy_path: Path, data: Path, resolutions: Sequence[str], num_images: int, draws: int,
                device: str = "cpu", reference_cache: Optional[Path] = None, log=print) -> List[dict]:
    from maskfit.data.datasets import item_rng, load_rgb
    from maskfit.evaluate.inception import sha256_file
    from maskfit.evaluate.proxy import load_proxy
    from maskfit.evaluate.adm_npz import read_reference
    from maskfit.evaluate.report import evaluate_samples
    from maskfit.experiment import (REFERENCE_RULE_VERSION, _reference_dataset, ensure_references,
                                    reference_crop_min_area, reference_image)
    from maskfit.runs import run_patch_size
    from maskfit.sweep import parse_resolutions

    res_list = parse_resolutions(list(resolutions), cfg.data.token_budget, run_patch_size(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(reference_cache) if reference_cache else Path(tmp) / "reference"
        template = ensure_references(cfg, res_list, data, "holdout", cache, log=log)
        train_side = _reference_dataset(cfg, data, "train")  # the references' dataset, other side of the split
        min_area = reference_crop_min_area(train_side)
        labels = [label for _, label in train_side.samples]
        network = load_proxy(proxy_path, device)
        digest = sha256_file(proxy_path)  # as the runs' lines name it
        references = {res.label: read_reference(template.format(resolution=res.label)) for res in res_list}
        ref_cache: Dict = {}  # each reference's activations, computed at its first draw only
        lines = []
        for draw in range(draws):
            chosen = balanced_indices(labels, num_images, np.random.default_rng([FLOOR_SEED_OFFSET, draw]))
            images = {int(i): load_rgb(train_side.samples[i][0]) for i in chosen}
            for res in res_list:
                batch = np.stack([reference_image(images[int(i)], res.height, res.width,
                                                  item_rng(FLOOR_SEED_OFFSET + draw, 0, int(i)), min_area) for i in chosen])
                result = evaluate_samples(batch, references[res.label], network, device=device,
                                          labels=np.asarray([labels[i] for i in chosen]), reference_cache=ref_cache)
                metrics = {k: result["metrics"].get(k) for k in METRIC_KEYS}
                lines.append({"kind": "real-image floor", "resolution": res.label, "split": res.split, "draw": draw,
                              "num_samples": num_images, "proxy_sha256": digest, "reference_rule": REFERENCE_RULE_VERSION,
                              "data": str(data), **metrics})
                log(f"floor: draw {draw} {res.label}: proxy FD {metrics['proxy_fd']:.2f}")
    return lines


def summarise(lines: Sequence[dict]) -> Dict[str, dict]:
    """Per resolution: mean and sample std over draws of each metric."""
    out: Dict[str, dict] = {}
    for res in dict.fromkeys(l["resolution"] for l in lines):
        rows = [l for l in lines if l["resolution"] == res]
        out[res] = {}
        for key in METRIC_KEYS:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                out[res][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def main(argv=None) -> int:
    from maskfit.config import load_config
    from maskfit.experiment import PROTOCOL_RESOLUTIONS

    p = argparse.ArgumentParser(prog="python -m maskfit.study_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the study's base config (configs/study/base.toml)")
    p.add_argument("--proxy", required=True, help="the proxy classifier the runs are scored with")
    p.add_argument("--data", default=None, help="the image folder (default: the config's data.root)")
    p.add_argument("--resolutions", default=",".join(PROTOCOL_RESOLUTIONS))
    p.add_argument("--num-images", type=int, default=200, help="images per set: the runs' --num-images")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="JSON lines, one per (resolution, draw)")
    args = p.parse_args(argv)
    if args.draws < 2 or args.num_images < 1:
        print(f"study_floor: error: --draws {args.draws} (at least 2, for a spread) and --num-images "
              f"{args.num_images} (at least 1)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        data = Path(args.data or cfg.data.root)
        lines = floor_lines(cfg, Path(args.proxy), data, args.resolutions.split(","), args.num_images, args.draws,
                            args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"study_floor: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(l) + "\n" for l in lines))
    for res, metrics in summarise(lines).items():
        print(res, "  ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in metrics.items()))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
