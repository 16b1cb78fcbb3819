"""`maskfit sweep`: one checkpoint sampled and evaluated at FiT's in- and out-of-distribution resolutions
with every RoPE extrapolation method; the results as ``sweep.csv``, ``sweep.md`` and ``sweep.png``.

Resolutions. FiT (arXiv 2402.12376, Table 2) evaluates a 256-token model at the grids (in patches)
16x16, 10x20, 8x24 (in-distribution: at most 256 tokens) and 20x20, 14x28, 10x30 (out-of-distribution),
i.e. 256², 160x320, 128x384 and 320², 224x448, 160x480 px with the SD-VAE (factor 8) and patch 2. For a
run with another token budget B each side is scaled by sqrt(B/256) and rounded half up to whole patches,
so a 64-token pixel-space model with patch 4 is swept at 8x8, 5x10, 4x12, 10x10, 7x14, 5x15 patches =
32², 20x40, 16x48, 40², 28x56, 20x60 px. ``--resolutions`` replaces the list.

Work. Per (resolution, method) the samples come from ``maskfit sample``'s machinery (shards, resumable)
under ``OUT/samples/<set>/``; a method whose RoPE tables at that grid equal another's (every method is
``none`` at scale 1, i.e. inside the training grid; ``ntk`` and ``vision_ntk`` coincide on square grids)
reuses that sample set instead of drawing the same images again. Each sample set is evaluated once
(``OUT/evals/``), against ``--reference`` with the FID Inception or the project's proxy classifier. A
rerun skips finished shards, sample files and evaluations, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from maskfit.evaluate.report import METRIC_INFO  # the metrics every evaluation reports, labelled once
from maskfit.extras import require
from maskfit.locks import folder_lock
from maskfit.models.rope import (
    ATTN_SCALES,
    EXTRAPOLATION_METHODS,
    RopeExtrapolation,
    attention_logit_scale,
    axis_frequencies,
    axis_scales,
    yarn_mscale,
)
from maskfit.sample import check_resolution, parse_resolution
from maskfit.sampling_run import add_sampler_arguments, positive_int

IN_DIST = "in-distribution"
OUT_DIST = "out-of-distribution"
FIT_TOKEN_BUDGET = 256
# FiT's evaluation grids (rows, cols) in patches for its 256-token budget (FiT §4.1, Table 2).
FIT_GRIDS: Tuple[Tuple[Tuple[int, int], str], ...] = (
    ((16, 16), IN_DIST), ((10, 20), IN_DIST), ((8, 24), IN_DIST),
    ((20, 20), OUT_DIST), ((14, 28), OUT_DIST), ((10, 30), OUT_DIST),
)
PLOT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# --------------------------------------------------------------------------------------------------
# Resolutions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResolution:
    height: int  # pixels
    width: int
    grid: Tuple[int, int]  # (rows, cols) in patch tokens
    split: str  # IN_DIST | OUT_DIST

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (2.5 -> 2, 3.5 -> 4): half up keeps one rule for every side.
    return int(math.floor(x + 0.5))


def scaled_fit_grids(token_budget: int) -> List[Tuple[Tuple[int, int], str]]:
    """FiT's six grids with each side scaled by sqrt(token_budget / 256), rounded half up, >= 1 patch."""
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}; a run holds at least one token per image")
    scale = math.sqrt(token_budget / FIT_TOKEN_BUDGET)
    out: List[Tuple[Tuple[int, int], str]] = []
    for (h, w), split in FIT_GRIDS:
        gh, gw = max(1, _round_half_up(h * scale)), max(1, _round_half_up(w * scale))
        if split == IN_DIST:
            # When sqrt(B) is not whole, rounding up can push an in-distribution grid past the budget;
            # trim the longer side so "in-distribution" keeps meaning "a token count seen in training".
            while gh * gw > token_budget:
                if gw >= gh:
                    gw -= 1
                else:
                    gh -= 1
        if any(grid == (gh, gw) for grid, _ in out):
            continue  # very small budgets collapse neighbouring grids onto one
        out.append(((gh, gw), split))
    return out


def derive_resolutions(token_budget: int, multiple: int) -> List[SweepResolution]:
    """The sweep's resolutions for a run: ``multiple`` = autoencoder factor x patch size (px per token side)."""
    return [SweepResolution(gh * multiple, gw * multiple, (gh, gw), split) for (gh, gw), split in scaled_fit_grids(token_budget)]


def parse_resolutions(texts: Sequence[str], token_budget: int, multiple: int) -> List[SweepResolution]:
    """``--resolutions`` items ('256', '160x320', comma lists allowed); at most the budget = in-distribution."""
    out: List[SweepResolution] = []
    for text in texts:
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            h, w = parse_resolution(item)
            check_resolution(h, w, multiple)
            grid = (h // multiple, w // multiple)
            res = SweepResolution(h, w, grid, IN_DIST if grid[0] * grid[1] <= token_budget else OUT_DIST)
            if res not in out:
                out.append(res)
    if not out:
        raise ValueError(f"--resolutions {list(texts)!r} names no resolution; give e.g. --resolutions 256,160x320")
    # In-distribution first (stable), so the table and the plot have one block of each.
    return [r for r in out if r.split == IN_DIST] + [r for r in out if r.split == OUT_DIST]


# --------------------------------------------------------------------------------------------------
# Methods and shared sample sets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of the table: an extrapolation method and the FiTv2 attention scale used with it, with the
    sweep's readings of NTK and YaRN (one pair per sweep, so they are not in the label)."""

    method: str
    attn_scale: str = "none"
    yarn_ramp: str = "paper"
    ntk_exponent: str = "axis"

    @property
    def label(self) -> str:
        return self.method if self.attn_scale == "none" else f"{self.method}+attn_{self.attn_scale}"

    def rope(self, train_grid: Tuple[int, int], train_keep: float = 1.0) -> RopeExtrapolation:
        return RopeExtrapolation(self.method, train_grid, attn_scale=self.attn_scale, yarn_ramp=self.yarn_ramp,
                                 ntk_exponent=self.ntk_exponent, train_keep=train_keep)


# Every (method, attention scale) in a fixed order: a shared sample set is named by the first member
# of its class here, so its folder name does not depend on which methods a given sweep asked for.
ALL_VARIANTS = tuple(Variant(m, a) for m, a in product(EXTRAPOLATION_METHODS, ATTN_SCALES))


def _split_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_variants(methods: str, attn_scales: str = "none", yarn_ramp: str = "paper",
                   ntk_exponent: str = "axis") -> List[Variant]:
    """Rows of the sweep from ``--methods`` and ``--attn-scale`` (comma lists; every pair is swept)."""
    names, scales = _split_list(methods), _split_list(attn_scales)
    bad = [m for m in names if m not in EXTRAPOLATION_METHODS]
    if bad or not names:
        raise ValueError(
            f"--methods {methods!r}: unknown method(s) {bad or '(none given)'}; choose a comma list from "
            f"{','.join(EXTRAPOLATION_METHODS)}, e.g. --methods none,vision_ntk"
        )
    bad = [a for a in scales if a not in ATTN_SCALES]
    if bad or not scales:
        raise ValueError(
            f"--attn-scale {attn_scales!r}: unknown value(s) {bad or '(none given)'}; choose a comma list from "
            f"{','.join(ATTN_SCALES)} (FiTv2 eq. 15), e.g. --attn-scale none,paper"
        )
    out: List[Variant] = []
    for m, a in product(names, scales):
        if Variant(m, a, yarn_ramp, ntk_exponent) not in out:
            out.append(Variant(m, a, yarn_ramp, ntk_exponent))
    return out


def attn_scales_arg(text: str) -> str:
    """--attn-scale for the sweep: a comma list of ATTN_SCALES (argparse type: a typo fails at parsing)."""
    bad = [a for a in _split_list(text) if a not in ATTN_SCALES]
    if bad or not _split_list(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown value(s) {bad or '(none given)'}; a comma list from {','.join(ATTN_SCALES)}"
        )
    return text


def model_head_dims(model_cfg) -> Tuple[int, ...]:
    """Head widths whose RoPE tables the model builds: the backbone's, and the MaskDiT decoder's if any."""
    dims = [model_cfg.head_dim]
    if model_cfg.mask_design == "decoder":
        dims.append(model_cfg.decoder_hidden // model_cfg.decoder_heads)
    return tuple(dict.fromkeys(dims))


def rope_signature(variant: Variant, grid: Tuple[int, int], train_grid: Tuple[int, int],
                   head_dim: Union[int, Sequence[int]], theta: float, train_keep: float = 1.0) -> np.ndarray:
    """What the model sees of a RoPE setting at one grid: row and column frequencies and the q/k factor.

    ``rope_tables`` builds every attention layer's cos/sin from exactly these (and the positions, which
    depend only on the grid), so two settings with equal signatures give the same model function.
    """
    g = torch.tensor([grid])  # (1, 2)
    cfg = variant.rope(train_grid, train_keep)
    parts = []
    for d in ([head_dim] if isinstance(head_dim, int) else head_dim):
        f_h, f_w = axis_frequencies(g, d, cfg, theta)  # (1, d/4) each
        parts += [f_h[0], f_w[0]]
    factor = yarn_mscale(g, cfg) * attention_logit_scale(g, cfg).sqrt()  # (1,), as rope_tables folds it in
    return torch.cat(parts + [factor]).numpy()


def sample_set_for(variant: Variant, grid: Tuple[int, int], train_grid: Tuple[int, int],
                   head_dim: Union[int, Sequence[int]], theta: float, train_keep: float = 1.0) -> Variant:
    """The first variant of ALL_VARIANTS (read with ``variant``'s YaRN ramp and NTK exponent) with the same
    RoPE tables as ``variant`` at ``grid``.

    Equality is up to float64 rounding (rtol 1e-12): at scale 1 YaRN's (1-g) f/1 + g f is f
    mathematically but may differ from f in the last bit; such settings are the same model.
    """
    own = rope_signature(variant, grid, train_grid, head_dim, theta, train_keep)
    for other in ALL_VARIANTS:
        other = replace(other, yarn_ramp=variant.yarn_ramp, ntk_exponent=variant.ntk_exponent)
        if np.allclose(rope_signature(other, grid, train_grid, head_dim, theta, train_keep), own, rtol=1e-12, atol=0.0):
            return other
    return variant  # unreachable: variant itself is in ALL_VARIANTS


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def _load_network(args, device):
    if args.proxy:
        from maskfit.evaluate.proxy import load_proxy

        return load_proxy(args.proxy, device)
    from maskfit.evaluate.inception import load_inception

    return load_inception(args.inception, device)


def _reference_key(path: Path, args) -> dict:
    """What identifies the reference for the evaluation cache: a changed file means new numbers."""
    if path.is_dir():
        return {"path": str(path.resolve()), "size": args.reference_size, "limit": args.reference_limit}
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


RESOLUTION_FIELD = "{resolution}"


def reference_for(reference: str, res: SweepResolution) -> Path:
    """The reference of one resolution: ``--reference`` with ``{resolution}`` replaced by HxW (e.g.
    ``refs/ref_{resolution}.npz`` -> ``refs/ref_64x128.npz``), so each size has its own statistics (the
    study's reference images are brought to each size as training images are: maskfit.experiment)."""
    return Path(reference.replace(RESOLUTION_FIELD, res.label))


def _checkpoint_name(ckpt: Path) -> str:
    # <run>/checkpoints/step_N reads better as "<run>/step_N" in titles.
    return f"{ckpt.parent.parent.name}/{ckpt.name}" if ckpt.parent.name == "checkpoints" else ckpt.name


def _checked_checkpoint(args) -> Path:
    """The checks that need no model (a typo must not cost a model load or an hour of sampling, nor leave
    a folder behind), then the checkpoint, resolved once: the folder locked is the one written."""
    from maskfit.checkpoint import resolve_checkpoint
    from maskfit.evaluate.metrics import require_scipy

    require_scipy()  # a missing package must not cost a model load or an hour of sampling either
    plot_classes()
    parse_variants(args.methods, args.attn_scales or "none")
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError(f"--num-images {args.num_images} and --batch-size {args.batch_size} must be >= 1")
    per_resolution = RESOLUTION_FIELD in args.reference  # one reference per resolution (reference_for)
    reference_path = Path(args.reference)
    if not per_resolution and not reference_path.exists():
        raise FileNotFoundError(
            f"--reference {reference_path} does not exist; pass an ADM reference batch .npz (arr_0 images and/or "
            "mu/sigma statistics) or an ImageFolder-style image folder (one sub-folder per class)"
        )
    return resolve_checkpoint(Path(args.checkpoint))


def run_sweep(args) -> dict:
    from maskfit.paths import check_output_dir

    ckpt = _checked_checkpoint(args)
    out = Path(args.out) if args.out else ckpt / "sweep"
    check_output_dir(out, "--out", "sweep folder")  # before the model loads and sampling starts
    # One process per sweep folder: two sweeps into one would write each other's samples (maskfit.locks).
    with folder_lock(out, "sweep folder"):
        return _run_sweep(args, ckpt, out)


def _run_sweep(args, ckpt: Path, out: Path) -> dict:
    from maskfit.data.pipeline import autoencoder_factor
    from maskfit.evaluate.cli import load_image_folder
    from maskfit.evaluate.report import evaluate_samples, network_id
    from maskfit.finetune import rope_train_grid, rope_train_keep
    from maskfit.sampling_run import (
        load_autoencoder, load_sampling_model, record_settings, resolve_precision, resolve_sampling_choices,
        sample_resolution, sampler_options,
    )
    from maskfit.runs import build_diffusion, resolve_device

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    network = _load_network(args, device)
    is_proxy = bool(args.proxy)
    model, run_cfg = load_sampling_model(ckpt, args, device, precision)
    # --recipe's choices with the explicit flags on top; without --attn-scale the rows use the recipe's one.
    choices = resolve_sampling_choices(args, run_cfg.diffusion.objective)
    variants = parse_variants(args.methods, args.attn_scales or choices["attn_scale"], choices["yarn_ramp"],
                              choices["ntk_exponent"])
    diffusion = build_diffusion(run_cfg)
    factor = autoencoder_factor(run_cfg.data)  # known from the config: the VAE loads only if sampling is needed
    p = model.cfg.patch_size
    multiple = factor * p
    budget = run_cfg.data.token_budget
    train_grid = rope_train_grid(run_cfg)  # as `maskfit sample`: RoPE scales count from this square grid
    train_keep = rope_train_keep(run_cfg)  # read by the "kept" attention scale only
    derived = not args.resolutions
    resolutions = derive_resolutions(budget, multiple) if derived else parse_resolutions(args.resolutions, budget, multiple)

    reference_paths = {res.label: reference_for(args.reference, res) for res in resolutions}
    missing = [str(path) for path in reference_paths.values() if not path.exists()]
    if missing:
        raise FileNotFoundError(f"--reference {args.reference}: {', '.join(missing)} do(es) not exist; write one "
                                f"reference per resolution ({RESOLUTION_FIELD} is replaced by HxW, e.g. 64x128)")
    out.mkdir(parents=True, exist_ok=True)
    # Everything that changes the pixels of a sample set (the attention scale is per row, in the set's name).
    settings = {
        "checkpoint": str(ckpt.resolve()), "use_ema": not args.no_ema, "num_images": args.num_images,
        "batch_size": args.batch_size, "seed": args.seed, "labels": args.labels, "sampler": choices["sampler"],
        "steps": choices["steps"], "atol": choices["atol"], "rtol": choices["rtol"], "cfg_scale": args.cfg_scale,
        "guidance_channels": choices["guidance_channels"], "yarn_ramp": choices["yarn_ramp"],
        "ntk_exponent": choices["ntk_exponent"], "precision": precision, "attention": model.cfg.attention,
    }
    subset_keep = getattr(args, "subset_keep", 1.0)
    if subset_keep != 1.0:  # added later: absent from the settings of every folder sampled on the full grid
        settings["subset_keep"] = subset_keep
    record_settings(out, settings)  # refuses a folder sampled with other settings

    # Each reference is read once: an image folder is decoded at its first use, not once per evaluation.
    from maskfit.evaluate.report import read_reference, reference_from_images

    references: dict = {}

    def reference_at(path: Path):
        if path not in references:
            references[path] = reference_from_images(
                load_image_folder(path, size=args.reference_size, limit=args.reference_limit).images
            ) if path.is_dir() else read_reference(path)
        return references[path]

    reference_cache: dict = {}  # each reference's activations, computed at its first evaluation only
    net_id = network_id(network)
    net_tag = f"proxy_{network.weights_sha256[:12]}" if is_proxy else "inception"
    cache_key = {"network": net_id, "weights_sha256": network.weights_sha256, "pr_precision": "adm"}
    head_dim, theta = model_head_dims(model.cfg), model.cfg.rope_theta
    autoencoder = None
    sample_args = SimpleNamespace(num_images=args.num_images, batch_size=args.batch_size, seed=args.seed, labels=args.labels)

    rows: List[dict] = []
    results: Dict[Tuple[str, str], dict] = {}  # (set label, resolution label) -> evaluation result
    t0 = time.perf_counter()
    for res in resolutions:
        sets = {v: sample_set_for(v, res.grid, train_grid, head_dim, theta, train_keep) for v in variants}
        for set_variant in dict.fromkeys(sets.values()):  # each distinct set once, in row order
            set_dir = out / "samples" / set_variant.label
            npz = set_dir / f"samples_{res.label}.npz"
            if not npz.exists():  # finished sets are skipped whole; unfinished ones resume from their shards
                if autoencoder is None:
                    autoencoder, _ = load_autoencoder(run_cfg, args.vae_path, device)
                options = sampler_options(choices, set_variant.rope(train_grid, train_keep), args.cfg_scale, precision,
                                          subset_keep=subset_keep)
                set_dir.mkdir(parents=True, exist_ok=True)
                sample_resolution(model, diffusion, autoencoder, (res.height, res.width), multiple, p, options,
                                  sample_args, set_dir, device)
            ref_path = reference_paths[res.label]
            results[(set_variant.label, res.label)] = _evaluate_cached(
                npz, out / "evals" / set_variant.label / f"{res.label}.{net_tag}.json",
                {**cache_key, "reference": _reference_key(ref_path, args)},
                lambda npz=npz, ref_path=ref_path: evaluate_samples(
                    npz, reference_at(ref_path), network, batch_size=args.eval_batch_size, device=device,
                    reference_cache=reference_cache),
            )
        for v in variants:
            s = sets[v]
            result = results[(s.label, res.label)]
            scales = axis_scales(torch.tensor([res.grid]), v.rope(train_grid, train_keep))[0].tolist()  # (s_h, s_w)
            row = {
                "variant": v.label, "method": v.method, "attn_scale": v.attn_scale, "yarn_ramp": v.yarn_ramp,
                "ntk_exponent": v.ntk_exponent, "split": res.split,
                "resolution": res.label, "height": res.height, "width": res.width, "grid_h": res.grid[0],
                "grid_w": res.grid[1], "tokens": res.tokens, "rope_scale_h": scales[0], "rope_scale_w": scales[1],
                # Shared: this sample set is also another row's at this resolution (same images, same numbers).
                "sample_set": s.label, "shared": sum(sets[u] == s for u in variants) > 1,
                "num_images": result["samples"]["count"], "network": result["feature_network"]["name"],
                "comparable_to_published": result["comparable_to_published"],
                # The sweep-wide choices on every row, so a row read alone says how it was sampled.
                "recipe": choices["recipe"], "sampler": choices["sampler"], "steps": choices["steps"],
                "guidance_channels": choices["guidance_channels"], "precision": precision, "subset_keep": subset_keep,
            }
            row.update(result["metrics"])
            rows.append(row)
        print(f"sweep: {res.label} done ({len(set(sets.values()))} sample set(s) for {len(variants)} method(s))", flush=True)

    context = {
        "checkpoint": str(ckpt), "checkpoint_name": _checkpoint_name(ckpt), "settings": settings,
        "recipe": choices["recipe"],
        "is_proxy": is_proxy, "network_name": getattr(network, "name", net_id), "network_id": net_id,
        "reference": str(args.reference), "token_budget": budget, "patch_size": p, "factor": factor,
        "train_grid": train_grid, "derived": derived, "variants": variants, "resolutions": resolutions,
        "results": results,
    }
    csv_path, md_path, png_path = out / "sweep.csv", out / "sweep.md", out / "sweep.png"
    write_csv(rows, csv_path)
    md_path.write_text(format_markdown(rows, context))
    write_plot(rows, context, png_path)
    return {"csv": str(csv_path), "markdown": str(md_path), "plot": str(png_path), "rows": len(rows),
            "sample_sets": len(results), "resolutions": [r.label for r in resolutions],
            "seconds": round(time.perf_counter() - t0, 1)}


def _evaluate_cached(npz: Path, path: Path, key: dict, evaluate) -> dict:
    """The stored evaluation of ``npz`` when it was made with the same network, reference and samples."""
    key = {**key, "samples_mtime_ns": npz.stat().st_mtime_ns}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("cache_key") == key:
            return stored["result"]
    from maskfit.checkpoint import atomic_write_text

    result = evaluate()
    # A unique temporary name, then rename: an interrupted write never leaves a half file that looks cached.
    atomic_write_text(path, json.dumps({"cache_key": key, "result": result}, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _metric_keys(results: Dict) -> List[str]:
    """Metric names the evaluations gave, in METRIC_INFO's order, unknown ones last."""
    found = list(dict.fromkeys(k for res in results.values() for k in res["metrics"]))
    return [k for k in METRIC_INFO if k in found] + [k for k in found if k not in METRIC_INFO]


def write_csv(rows: List[dict], path: Path) -> None:
    columns = list(rows[0].keys()) if rows else []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key in ("precision", "recall", "proxy_precision", "proxy_recall", "proxy_class_accuracy", "detail_ratio",
               "contrast_ratio"):
        return f"{value:.3f}"
    return f"{value:.2f}"


def _resolution_text(ctx: dict) -> str:
    B, p, f = ctx["token_budget"], ctx["patch_size"], ctx["factor"]
    px = f"one patch token = {f} (autoencoder factor) x {p} (patch size) = {f * p} px per side"
    if not ctx["derived"]:
        return f"given with --resolutions; in-distribution = at most the training budget of {B} tokens; {px}."
    fit = "16x16, 10x20, 8x24 in-distribution; 20x20, 14x28, 10x30 out-of-distribution (patches)"
    if B == FIT_TOKEN_BUDGET:
        return f"FiT's grids for its 256-token budget ({fit}); {px}."
    scale = math.sqrt(B / FIT_TOKEN_BUDGET)
    return (
        f"derived from FiT's grids for a 256-token budget ({fit}): each side scaled by sqrt({B}/256) = {scale:.4g} and "
        f"rounded half up to whole patches (in-distribution grids trimmed to at most {B} tokens where rounding "
        f"overshoots; aspect ratios can differ slightly from FiT's 1:1, 1:2, 1:3); {px}."
    )


def _sampler_text(s: dict) -> str:
    if s["sampler"] == "dopri5":
        return f"dopri5 (adaptive, atol {s['atol']:g}, rtol {s['rtol']:g})"
    return f"{s['sampler']}, {s['steps']} steps"


def _recipe_text(recipe) -> str:
    if recipe is None:
        return "none (the project's defaults)"
    return f"`{recipe}` ({'as the papers write it' if recipe == 'paper' else 'as the released whlzy/FiT code runs it'})"


def format_markdown(rows: List[dict], ctx: dict) -> str:
    s = ctx["settings"]
    resolutions: List[SweepResolution] = ctx["resolutions"]
    variants: List[Variant] = ctx["variants"]
    by_cell = {(r["variant"], r["resolution"]): r for r in rows}
    any_result = next(iter(ctx["results"].values()))
    tg = ctx["train_grid"]
    network_line = (
        f"**PROXY** classifier `{ctx['network_name']}` (`{ctx['network_id']}`): Fréchet distance and class accuracy "
        "in the features of a classifier trained by this project; compare only runs evaluated with this same "
        "checkpoint, **never published FID numbers**."
        if ctx["is_proxy"] else f"**Inception** (FID Inception-v3, ADM's evaluator network): `{ctx['network_name']}`."
    )
    # The protocol lines of a non-square evaluation say how FiT scores non-square samples.
    protocol_src = next((res for res in ctx["results"].values()
                         if res["samples"]["height"] != res["samples"]["width"]), any_result)
    ph, pw = protocol_src["samples"]["height"], protocol_src["samples"]["width"]
    warnings = list(dict.fromkeys(w for res in ctx["results"].values() for w in res["warnings"]))
    lines = [f"# Resolution sweep: {ctx['checkpoint_name']}", ""]
    lines += [f"> **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    lines += [
        f"- Checkpoint: `{ctx['checkpoint']}` ({'EMA' if s['use_ema'] else 'raw'} weights).",
        f"- Feature network: {network_line}",
        f"- Reference: `{ctx['reference']}` ({any_result['reference']['statistics']}).",
        f"- Samples: {s['num_images']} per (method, resolution); labels `{s['labels']}`, seed {s['seed']}: every "
        "method sees the same noise and labels at a resolution (a paired comparison).",
        f"- Sampler: {_sampler_text(s)}, classifier-free guidance scale {s['cfg_scale']}"
        + (f" on the first {s['guidance_channels']} channels" if s["guidance_channels"] else " on all channels") + ".",
        f"- Recipe: {_recipe_text(ctx['recipe'])}; YaRN ramp `{s['yarn_ramp']}`, NTK exponent `{s['ntk_exponent']}`, "
        f"attention scale per row; network in {s['precision']} ({s['attention']} attention), sampler and "
        "guidance in fp32.",
        f"- Resolutions: {_resolution_text(ctx)} RoPE training grid {tg[0]}x{tg[1]} patches (scale 1 inside it).",
        "- Baseline: `none` (no extrapolation) at the in-distribution sizes.",
        "- Shared samples (marked \\*): where a method's RoPE tables at a grid equal another's, one sample set "
        f"serves both. Every method equals `none` at scale 1 (grids within {tg[0]}x{tg[1]}; not with attention "
        "scale `code`, whose factor exceeds 1 there), and `ntk`/`yarn` equal `vision_ntk`/`vision_yarn` on square "
        "grids; those cells are the same samples, hence the same numbers.",
        f"- Non-square protocol (from the evaluation report, shown for {ph}x{pw}):",
        *[f"  - {line}" for line in protocol_src["protocol"]],
        "",
        "Columns: ID = in-distribution (at most the training token budget), OOD = out-of-distribution.",
        "",
    ]
    header = ["method"] + [f"{'ID' if r.split == IN_DIST else 'OOD'} {r.label}" for r in resolutions]
    for key in _metric_keys(ctx["results"]):
        name, better = METRIC_INFO.get(key, (key, "lower"))
        lines += [f"## {name} ({better} is better)", "",
                  "| " + " | ".join(header) + " |",
                  "| --- | " + " | ".join("---:" for _ in resolutions) + " |",
                  "| *grid (tokens)* | " + " | ".join(f"*{r.grid[0]}x{r.grid[1]} ({r.tokens})*" for r in resolutions) + " |"]
        for v in variants:
            cells = []
            for r in resolutions:
                row = by_cell[(v.label, r.label)]
                mark = "\\*" if row["shared"] else ""
                cells.append(_fmt(key, row.get(key)) + mark)
            lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Sample sets", "", "| resolution | sample set | methods | rope scale (h, w) |", "| --- | --- | --- | --- |"]
    for r in resolutions:
        members: Dict[str, List[dict]] = {}
        for v in variants:
            row = by_cell[(v.label, r.label)]
            members.setdefault(row["sample_set"], []).append(row)
        for set_label, group in members.items():
            scales = ", ".join(f"{g['variant']}: ({g['rope_scale_h']:.3g}, {g['rope_scale_w']:.3g})" for g in group)
            lines.append(f"| {r.label} | `samples/{set_label}/samples_{r.label}.npz` | "
                         f"{', '.join(g['variant'] for g in group)} | {scales} |")
    lines.append("")
    return "\n".join(lines)


def plot_classes():
    """(FigureCanvasAgg, Figure), or the error naming the extra: run_sweep asks before any sampling."""
    agg = require("matplotlib.backends.backend_agg", "the sweep plot")
    return agg.FigureCanvasAgg, require("matplotlib.figure", "the sweep plot").Figure


def write_plot(rows: List[dict], ctx: dict, path: Path) -> None:
    """Metric against resolution, one line per method, in-distribution and OOD regions shaded (Agg)."""
    FigureCanvasAgg, Figure = plot_classes()

    resolutions: List[SweepResolution] = ctx["resolutions"]
    keys = _metric_keys(ctx["results"])
    primary = "proxy_fd" if ctx["is_proxy"] else "fid"
    secondary = next((k for k in ("proxy_class_accuracy", "inception_score") if k in keys), None)
    panels = [k for k in (primary, secondary) if k is not None and any(r.get(k) is not None for r in rows)]
    if not panels:
        raise ValueError(f"no metric to plot: the evaluations gave {keys}")
    # A Figure with its own Agg canvas: no pyplot, so no global backend is switched and no window opens.
    fig = Figure(figsize=(1.6 * len(resolutions) + 3.0, 4.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(resolutions))
    n_in = sum(r.split == IN_DIST for r in resolutions)
    net = "proxy classifier features (not comparable to published FID)" if ctx["is_proxy"] else "Inception-v3"
    for i, key in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        name, better = METRIC_INFO.get(key, (key, "lower"))
        percent = key.endswith(("accuracy", "precision", "recall"))
        variants = ctx["variants"]
        # Methods often tie (shared sample sets, or a model indifferent to the RoPE change): each method is
        # dodged sideways and has its own marker, so tied lines stay visible instead of hiding each other.
        dodge = min(0.06, 0.5 / max(len(variants), 1))
        for j, v in enumerate(variants):
            y = []
            for r in resolutions:
                value = next((row.get(key) for row in rows if row["variant"] == v.label and row["resolution"] == r.label), None)
                y.append(np.nan if value is None else value * (100 if percent else 1))
            offset = (j - (len(variants) - 1) / 2) * dodge
            ax.plot(x + offset, y, marker=PLOT_MARKERS[j % len(PLOT_MARKERS)], label=v.label)
        if n_in:
            ax.axvspan(-0.5, n_in - 0.5, color="tab:green", alpha=0.08)
            ax.text((n_in - 1) / 2, 1.01, "in-distribution", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        if n_in < len(resolutions):
            ax.axvspan(n_in - 0.5, len(resolutions) - 0.5, color="tab:red", alpha=0.08)
            ax.text((n_in + len(resolutions) - 1) / 2, 1.01, "out-of-distribution", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom")
        ax.set_xlim(-0.5, len(resolutions) - 0.5)
        ax.set_xticks(x, [f"{r.height}×{r.width}\n{r.grid[0]}×{r.grid[1]} patches" for r in resolutions])
        unit = "%" if percent else "dimensionless"
        ax.set_ylabel(f"{name} ({unit}; {better} is better)")
        ax.set_xlabel("resolution, height × width (pixels) and token grid")
        ax.grid(True, alpha=0.3)
        ax.legend(title="RoPE method", fontsize="small")
    s = ctx["settings"]
    fig.suptitle(f"{ctx['checkpoint_name']}: {METRIC_INFO[primary][0]} vs resolution, {net}\n"
                 f"{s['num_images']} samples per point, {_sampler_text(s)}, CFG {s['cfg_scale']}; "
                 "methods are drawn side by side at each resolution")
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_sweep_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint folder or run folder (its latest checkpoint)")
    p.add_argument("--reference", required=True,
                   help="ADM reference batch .npz (arr_0 and/or mu/sigma) or an ImageFolder-style image folder; "
                        "'{resolution}' in the path names one per resolution (replaced by HxW)")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--inception-weights", "--inception", dest="inception", default=None, metavar="PATH",
                     help="FID Inception weights (default: $MASKFIT_INCEPTION_WEIGHTS or the user cache)")
    net.add_argument("--proxy", default=None, metavar="PATH", help="proxy classifier checkpoint (maskfit train-classifier)")
    p.add_argument("--num-images", "-n", type=positive_int, default=1000, help="images per (method, resolution)")
    p.add_argument("--methods", default=",".join(EXTRAPOLATION_METHODS),
                   help=f"comma list of RoPE extrapolation methods (default: all: {','.join(EXTRAPOLATION_METHODS)})")
    p.add_argument("--attn-scale", dest="attn_scales", type=attn_scales_arg, default=None,
                   help="comma list of attention scales (none|paper|code: FiTv2 eq. 15; kept: its masked-training form, "
                        "models/rope.py); every method x scale is a row "
                        "(default: none, or --recipe's for a FiTv2 run)")
    p.add_argument("--resolutions", action="append", default=None,
                   help="HxW or S pixels, comma list or repeated (default: FiT's six grids scaled to the run's budget)")
    add_sampler_arguments(p)
    p.add_argument("--eval-batch-size", type=positive_int, default=250)
    p.add_argument("--reference-size", type=int, default=None, help="resize an image-folder reference to SxS")
    p.add_argument("--reference-limit", type=int, default=10_000, help="images taken from an image-folder reference")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/sweep)")


def cmd_sweep(args) -> int:
    summary = run_sweep(args)
    print(json.dumps(summary, indent=2))
    return 0
