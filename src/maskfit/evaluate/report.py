"""One entry point for the metrics, ``evaluate_samples``, and a Markdown/JSON report writer.

The order of work follows ADM's evaluator (``shared/reference/eval.md`` §1.1): reference activations
(from its images, when it has them), reference statistics (stored ones win), sample activations,
sample statistics, then IS, FID, sFID, Precision, Recall. With the proxy classifier the same pipeline
gives the Fréchet distance and Precision/Recall in its feature space and the samples' class accuracy.

Every report states the resolution protocol: samples go in at their raw H x W and are resized inside
the network (299² for Inception), so a non-square sample is stretched, then compared with the square
reference; this is how FiT/FiTv2 report non-square FIDs (FiT arXiv 2402.12376 §4.1, FiTv2 arXiv
2410.13925 §V-A: ADM's TF evaluator on the raw samples; eval.md §3).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from maskfit.evaluate import metrics as M
from maskfit.evaluate.adm_npz import (
    ADM_FEATURE_NETWORK,
    NpzImageReader,
    ReferenceBatch,
    check_images,
    read_labels,
    read_reference,
    reference_from_images,
)
from maskfit.evaluate.image_stats import ImageStats
from maskfit.evaluate.inception import INPUT_SIZE, InceptionV3, ieee_fp32
from maskfit.evaluate.proxy import ProxyClassifier

FeatureNetwork = Union[InceptionV3, ProxyClassifier]
PUBLISHED_SAMPLE_COUNT = 50_000  # FID-50K


@dataclass
class Features:
    """Per-image outputs of a feature network, kept on its device."""

    pool: Tensor  # (N, D): Inception pool3 (2048) or proxy features
    spatial: Optional[Tensor]  # (N, 2023) Inception only (sFID)
    logits: Optional[Tensor]  # (N, 1008) unbiased Inception logits (IS) or (N, K) proxy class logits


def network_id(network: FeatureNetwork) -> str:
    """The name stored with reference statistics: ADM's for the real Inception, a hash for a proxy."""
    if isinstance(network, InceptionV3):
        return ADM_FEATURE_NETWORK if network.weights_sha256 else "inception-v3-random-weights"
    return network.feature_network_id


def _to_device(batch: np.ndarray, device: torch.device) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch))
    if device.type == "cuda":
        # Pinned + non_blocking lets the next batch be read from disk while the GPU still computes.
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@torch.inference_mode()
def extract_features(network: FeatureNetwork, batches: Iterable[np.ndarray], device: Union[str, torch.device]) -> Features:
    """Run ``network`` over uint8 NHWC batches; outputs stay on ``device`` (no host sync per batch)."""
    device = torch.device(device)
    pools: List[Tensor] = []
    spatials: List[Tensor] = []
    logits: List[Tensor] = []
    with ieee_fp32():
        for batch in batches:
            out = network(_to_device(check_images(batch, "image batch"), device))
            if isinstance(network, InceptionV3):
                pools.append(out.pool3)
                spatials.append(out.spatial)
                logits.append(out.logits)
            else:
                pools.append(out.features)
                logits.append(out.logits)
    if not pools:
        raise ValueError("no images to evaluate (empty sample or reference batch)")
    return Features(
        pool=torch.cat(pools),
        spatial=torch.cat(spatials) if spatials else None,
        logits=torch.cat(logits),
    )


def check_features(feats: Features, what: str, network: FeatureNetwork) -> Features:
    """``feats`` unchanged, or one error when any is NaN/inf: the inputs are uint8 images, so the network itself is
    broken (NaN weights), and every metric computed from them would be NaN or hang in ``sqrtm``."""
    for name, t in (("features", feats.pool), ("spatial features", feats.spatial), ("logits", feats.logits)):
        if t is not None and not bool(torch.isfinite(t).all()):  # one device sync per feature set
            weights = getattr(network, "weights_path", None) or "in-memory weights"
            raise ValueError(
                f"{getattr(network, 'name', type(network).__name__)} ({weights}) gave NaN or infinite {name} for "
                f"{what}; its weights are broken: retrain or re-download the network"
            )
    return feats


@dataclass
class _Samples:
    batches: Iterator[np.ndarray]
    count: int
    hw: Tuple[int, int]
    labels: Optional[np.ndarray]
    source: str


def _open_samples(samples: Union[str, Path, np.ndarray], batch_size: int, limit: Optional[int], labels: Optional[np.ndarray]) -> _Samples:
    if isinstance(samples, np.ndarray):
        images = check_images(samples, "samples")[:limit]
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        return _Samples(batches, len(images), tuple(images.shape[1:3]), labels, "in-memory array")
    reader = NpzImageReader(samples)
    count = len(reader) if limit is None else min(limit, len(reader))
    if labels is None:
        labels = read_labels(samples)
    return _Samples(reader.batches(batch_size, limit), count, reader.image_hw, labels, str(samples))


def _protocol_lines(network: FeatureNetwork, sample_hw: Tuple[int, int], ref_hw: Optional[Tuple[int, int]]) -> List[str]:
    h, w = sample_hw
    ref = f"{ref_hw[0]}x{ref_hw[1]}" if ref_hw else "the reference statistics' resolution"
    if isinstance(network, InceptionV3):
        resize = (
            f"{INPUT_SIZE}x{INPUT_SIZE} with TF1 bilinear interpolation (align_corners=False, no half-pixel "
            "centres, no antialiasing), exactly as the TF graph in ADM's evaluator"
        )
    else:
        s = network.config.input_size
        resize = f"{s}x{s} with antialiased bilinear interpolation (the proxy's own training resolution)"
    lines = [
        f"Resolution protocol (FiT/FiTv2's): samples are fed at their raw {h}x{w} and resized inside the network "
        f"to {resize}; the aspect ratio is not kept, nothing is cropped or padded.",
        "Non-square samples are therefore stretched to a square and compared with the square reference "
        f"({ref}), as FiT (arXiv 2402.12376 §4.1) and FiTv2 (arXiv 2410.13925 §V-A) do with ADM's evaluator.",
    ]
    if h != w:
        lines.append(f"This run IS non-square ({h}x{w}, aspect {w / h:.3g}): numbers compare with FiT's non-square tables, not with square-resolution FIDs.")
    return lines


def _reference_stats(
    reference: ReferenceBatch, ref_features: Optional[Features], network: FeatureNetwork
) -> Tuple[Optional[M.GaussianStats], Optional[M.GaussianStats], str]:
    """Stored statistics when they come from this network, else statistics of the reference images."""
    stored_ok = reference.pool3 is not None and reference.feature_network == network_id(network)
    if stored_ok:
        return reference.pool3, reference.spatial, f"stored statistics in {reference.path}"
    if ref_features is None:
        raise ValueError(
            f"The reference {reference.path} holds statistics made with '{reference.feature_network}' but the "
            f"network is '{network_id(network)}', and it has no images to recompute them from. Use a reference "
            "with images (arr_0), e.g. an .npz of training images, or one whose statistics this network made."
        )
    pool = M.feature_statistics(ref_features.pool)
    spatial = M.feature_statistics(ref_features.spatial) if ref_features.spatial is not None else None
    return pool, spatial, f"computed from the {reference.num_images} reference images"


def evaluate_samples(
    samples: Union[str, Path, np.ndarray],
    reference: Union[str, Path, np.ndarray, ReferenceBatch],
    network: FeatureNetwork,
    batch_size: int = 250,
    device: Union[str, torch.device] = "cpu",
    *,
    labels: Optional[np.ndarray] = None,
    num_samples: Optional[int] = None,
    pr_precision: M.DistancePrecision = "adm",
    pr_block_size: int = M.PR_BLOCK_SIZE,
    reference_cache: Optional[Dict] = None,
) -> Dict:
    """Compute ADM's metrics (Inception) or the proxy metrics for a sample batch against a reference.

    ``reference_cache``: a dict kept by a caller that evaluates many sample batches against the same
    reference with the same network (the resolution sweep); the reference's activations are computed
    once and reused from it, for the same reference object only (a path or array read anew is a new one).

    ``samples``: an ADM sample ``.npz`` (``arr_0`` uint8 NHWC, optional ``arr_1`` labels) or an array.
    ``reference``: an ADM reference ``.npz`` (stored ``mu, sigma, mu_s, sigma_s`` and/or ``arr_0``
    images), an in-memory uint8 NHWC array, or a ``ReferenceBatch``. Returns a JSON-ready dict.
    """
    device = torch.device(device)
    network = network.to(device).eval()
    timings: Dict[str, float] = {}
    notes: List[str] = []
    if isinstance(reference, (str, Path)):
        reference = read_reference(reference)
    elif isinstance(reference, np.ndarray):
        reference = reference_from_images(reference)

    # 1. Reference activations (ADM computes them even when statistics are stored: P/R needs them).
    t0 = time.perf_counter()
    cache_key = (id(reference), id(network))
    cached = reference_cache.get(cache_key) if reference_cache is not None else None
    if cached is not None and cached[0] is reference and cached[1] is network:
        ref_features, ref_pixels = cached[2], cached[3]
    else:
        ref_pixels = ImageStats()  # detail and contrast of the reference images, on the same pass
        ref_features = (
            extract_features(network, ref_pixels.passing(reference.image_batches(batch_size)), device)
            if reference.num_images else None
        )
        if ref_features is not None:
            check_features(ref_features, f"the reference images ({reference.path or 'in-memory array'})", network)
        if reference_cache is not None:
            # The entry holds the reference and network themselves: ids are only unique among live objects, and a
            # reference read from a path per call would otherwise free its id for the next one to reuse.
            reference_cache[cache_key] = (reference, network, ref_features, ref_pixels)
    timings["reference_features_s"] = time.perf_counter() - t0
    ref_pool, ref_spatial, ref_source = _reference_stats(reference, ref_features, network)

    # 2. Sample activations and statistics.
    opened = _open_samples(samples, batch_size, num_samples, labels)
    t0 = time.perf_counter()
    sample_pixels = ImageStats()
    feats = check_features(extract_features(network, sample_pixels.passing(opened.batches), device),
                           f"the samples ({opened.source})", network)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["sample_features_s"] = time.perf_counter() - t0
    n = int(feats.pool.shape[0])

    t0 = time.perf_counter()
    values: Dict[str, Optional[float]] = {}
    sample_pool = M.feature_statistics(feats.pool)
    is_inception = isinstance(network, InceptionV3)
    fd_name = "fid" if is_inception else "proxy_fd"
    if sample_pool.dim != ref_pool.dim:
        raise ValueError(
            f"the reference's statistics ({ref_source}) have {ref_pool.dim} dimensions but the network's features "
            f"have {sample_pool.dim}: they were made by another network; use a reference made with this one"
        )
    values[fd_name] = M.frechet_distance(sample_pool, ref_pool)
    if is_inception:
        values["inception_score"] = M.inception_score(M.class_probabilities(feats.logits))
        if ref_spatial is not None:
            values["sfid"] = M.frechet_distance(M.feature_statistics(feats.spatial), ref_spatial)
        else:
            values["sfid"] = None
            notes.append("sFID skipped: the reference has no spatial statistics (mu_s, sigma_s) and no images.")
    if ref_features is not None:
        pr = M.precision_recall(ref_features.pool, feats.pool, block_size=pr_block_size, precision=pr_precision, device=device)
        prefix = "" if is_inception else "proxy_"
        values[prefix + "precision"], values[prefix + "recall"] = pr.precision, pr.recall
    else:
        notes.append("Precision/Recall skipped: the reference has statistics only; P/R needs its images (arr_0).")
    if not is_inception:
        if opened.labels is not None:
            sample_labels = torch.from_numpy(np.asarray(opened.labels[:n], dtype=np.int64)).to(device)
            values["proxy_class_accuracy"] = float((feats.logits.argmax(1) == sample_labels).double().mean())
        else:
            values["proxy_class_accuracy"] = None
            notes.append("Class accuracy skipped: the sample file has no labels (arr_1).")
    # Which way samples differ from real images, on the pixels (maskfit.evaluate.image_stats): 1 = as the references.
    ref_stats, sample_stats = ref_pixels.result(), sample_pixels.result()
    if ref_stats is not None and sample_stats is not None and min(ref_stats) > 0:
        values["detail_ratio"] = sample_stats[0] / ref_stats[0]
        values["contrast_ratio"] = sample_stats[1] / ref_stats[1]
    else:
        values["detail_ratio"] = values["contrast_ratio"] = None
        notes.append("Detail and contrast ratios skipped: they need the reference's images (arr_0), not flat ones.")
    timings["metrics_s"] = time.perf_counter() - t0

    result = _result_dict(network, opened, n, reference, ref_source, values, timings, notes, pr_precision)
    result["sampling"] = None if isinstance(samples, np.ndarray) else sampling_record(samples)
    return result


def sampling_record(samples: Union[str, Path]) -> Optional[Dict]:
    """What `maskfit sample` recorded beside a sample file (``sampling.json``: recipe, sampler, guidance, RoPE
    readings, precision), so a report says how its samples were drawn; None when there is no such file."""
    path = Path(samples).parent / "sampling.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _sampling_line(record: Dict) -> str:
    o = record.get("options") or {}
    rope = o.get("rope") or {}
    if o.get("method") == "dopri5" and o.get("atol") is not None:
        sampler = f"dopri5 (adaptive, atol {o['atol']:g}, rtol {o['rtol']:g})"
    else:
        sampler = f"{o.get('method')}, {o.get('steps')} steps"
    channels = f"the first {o['guidance_channels']} channels" if o.get("guidance_channels") else "all channels"
    return (
        f"- Sampling (`sampling.json` beside the samples): recipe {record.get('recipe') or 'none (the defaults)'}; "
        f"{sampler}; CFG {o.get('cfg_scale')} on {channels}; RoPE {rope.get('method')} (attention scale "
        f"{rope.get('attn_scale')}, YaRN ramp {rope.get('yarn_ramp')}, NTK exponent {rope.get('ntk_exponent')}); "
        f"network in {o.get('precision')} ({record.get('attention')} attention); checkpoint {record.get('checkpoint')}."
    )


def _result_dict(network, opened: _Samples, n: int, reference: ReferenceBatch, ref_source: str, values, timings, notes, pr_precision) -> Dict:
    is_inception = isinstance(network, InceptionV3)
    random_weights = is_inception and network.weights_sha256 is None
    warnings_: List[str] = []
    if not is_inception:
        warnings_.append(
            "PROXY METRICS: features of a classifier trained by this project, not the Inception network. Use them to "
            "compare our own models evaluated with the same classifier checkpoint; never compare them with published "
            "FID/IS/Precision/Recall numbers or across classifier checkpoints."
        )
    if random_weights:
        warnings_.append("RANDOM-WEIGHT Inception: these numbers are meaningless (tests and timing only).")
    if n != PUBLISHED_SAMPLE_COUNT:
        warnings_.append(
            f"{n} samples, not {PUBLISHED_SAMPLE_COUNT}: FID is biased upward at small N, so this is FID-{n}, "
            "not comparable with FID-50K tables."
        )
    if is_inception:
        notes.append(
            f"IS: softmax of unbiased logits (pool3 @ W, no bias), contiguous unshuffled splits of {M.IS_SPLIT_SIZE} "
            f"({M.num_is_splits(n)} split(s) here), mean over splits; sample order must be random over classes."
        )
    notes.append(
        f"Precision/Recall: k={M.PR_NEIGHBOURHOOD} nearest neighbours, squared Euclidean distances "
        f"({'float16 with float32 fallback, as ADM' if pr_precision == 'adm' else 'float32'})."
    )
    notes.append("Statistics: float64 mean and unbiased covariance; Fréchet distance via scipy.linalg.sqrtm with ADM's safeguards.")
    return {
        "metrics": values,
        "comparable_to_published": bool(is_inception and not random_weights and n == PUBLISHED_SAMPLE_COUNT),
        "feature_network": {
            "name": network.name if not random_weights else "inception-v3 (random weights)",
            "weights_sha256": network.weights_sha256,
            "weights_path": getattr(network, "weights_path", None),
            "kind": "inception" if is_inception else "proxy",
        },
        "samples": {"source": opened.source, "count": n, "height": opened.hw[0], "width": opened.hw[1],
                    "has_labels": opened.labels is not None},
        "reference": {
            "source": str(reference.path) if reference.path else "in-memory array",
            "num_images": reference.num_images,
            "image_hw": list(reference.image_hw) if reference.image_hw else None,
            "statistics": ref_source,
        },
        "protocol": _protocol_lines(network, opened.hw, reference.image_hw),
        "warnings": warnings_,
        "notes": notes,
        "timings_s": timings,
    }


# Every metric an evaluation reports: (label, better direction), in the order tables list them.
METRIC_INFO = {
    "fid": ("FID", "lower"),
    "sfid": ("sFID", "lower"),
    "inception_score": ("Inception Score", "higher"),
    "precision": ("Precision", "higher"),
    "recall": ("Recall", "higher"),
    "proxy_fd": ("Proxy Fréchet distance", "lower"),
    "proxy_precision": ("Proxy precision", "higher"),
    "proxy_recall": ("Proxy recall", "higher"),
    "proxy_class_accuracy": ("Sample class accuracy (proxy)", "higher"),
    "detail_ratio": ("Detail ÷ references' (Laplacian; 1 = as real)", "closer to 1"),
    "contrast_ratio": ("Contrast ÷ references' (1 = as real)", "closer to 1"),
}


def format_markdown(result: Dict) -> str:
    s, r, net = result["samples"], result["reference"], result["feature_network"]
    title = "ADM-compatible evaluation" if net["kind"] == "inception" else "Proxy evaluation (not comparable to published numbers)"
    lines = [f"# {title}", ""]
    for w in result["warnings"]:
        lines += [f"> **Warning:** {w}", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    for key, value in result["metrics"].items():
        shown = "skipped" if value is None else f"{value:.4f}"
        lines.append(f"| {METRIC_INFO.get(key, (key,))[0]} | {shown} |")
    lines += [
        "",
        "## Protocol",
        "",
        *[f"- {p}" for p in result["protocol"]],
        "",
        "## Inputs",
        "",
        f"- Samples: {s['source']}: {s['count']} images of {s['height']}x{s['width']}.",
        f"- Reference: {r['source']}: {r['num_images']} images"
        + (f" of {r['image_hw'][0]}x{r['image_hw'][1]}" if r["image_hw"] else "")
        + f"; statistics: {r['statistics']}.",
        f"- Feature network: {net['name']}" + (f", weights SHA-256 {net['weights_sha256']}" if net["weights_sha256"] else "") + ".",
        f"- Comparable to published tables: {'yes' if result['comparable_to_published'] else 'no'}.",
        *([_sampling_line(result["sampling"])] if result.get("sampling") else []),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in result["notes"]],
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)


def write_report(result: Dict, out_dir: Union[str, Path], stem: str = "eval") -> Tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(format_markdown(result))
    return json_path, md_path
