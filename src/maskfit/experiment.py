"""`maskfit experiment CONFIG --out DIR`: one run of the study (issue 12) in one command, resumable.

1. **Train** for a fixed wall-clock budget (``--budget-seconds``, ``train()``'s ``max_seconds``) on the one
   device, checkpointing when images seen cross each of ``--eval-at-images`` (``train.ckpt_at_images``; every
   checkpoint is kept). ``--finetune-unmasked F`` spends the last fraction F of the budget on an unmasked
   fine-tune: a second ``train()`` call resumes the run (weights, EMA, optimizer, data order, step) with every
   token kept. Training is all or nothing: an interrupted training starts over, because a resumed one would
   pay its start-up (loader, compilation) twice and the budget would no longer mean the same time.
2. **Evaluate** the final checkpoint (equal GPU time across runs) and each mark's (equal images seen) with
   ``maskfit sweep``'s machinery (:func:`maskfit.sweep.run_sweep`): samples at every resolution of the
   protocol, per-class labels, one fixed-step sampler, CFG stated; in-distribution sizes with no RoPE
   extrapolation, out-of-distribution ones with none, VisionNTK and VisionYaRN; proxy FD, precision, recall
   and class accuracy from the project's proxy classifier.
3. **Reference statistics per resolution** from the held-out side of our own split of the evaluation folder
   (:mod:`maskfit.data.split`), each image brought to the size the way training images are
   (:func:`reference_image`), cached under ``--reference-cache``.
4. **One JSON line per (run, checkpoint, resolution, RoPE method)** in ``DIR/results.jsonl`` with everything a
   plot needs (:func:`result_line`). ``python -m maskfit.study_report`` turns the committed lines into REPORT.md.

Rerunning skips finished parts: finished training (``DIR/training.json``), finished sample shards and
evaluations (the sweep's own caches) and result lines already written. The plan and an estimate of the time it
will take are printed before any work (``--dry-run`` prints them only).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from maskfit.config import RunConfig, config_from_dict, load_config, to_dict
from maskfit.models.rope import ATTN_SCALES

# The protocol (issue 12): in distribution at most 256 tokens of 4 px, out of distribution beyond.
PROTOCOL_RESOLUTIONS = ("64x64", "48x80", "80x48", "44x88", "96x96", "64x128", "128x64")
ID_METHODS = "none"  # inside the training lengths every method is plain RoPE on square grids
OOD_METHODS = "none,vision_ntk,vision_yarn"  # no extrapolation and FiT's two best methods (FiT Tab. 4)
# One fixed-step sampler per objective: the same compute per image in every run (dopri5 adapts its steps).
FIXED_SAMPLERS = {"flow": ("euler", 50), "ddpm": ("ddim", 50)}
DEFAULT_CFG_SCALE = 1.5
RESULT_VERSION = 1
REFERENCE_RULE = (
    "held-out images, each cropped at the target's aspect ratio W/H the way training crops are "
    "(maskfit.data.resize.random_aspect_crop with the ratio range collapsed onto W/H, area fraction drawn from "
    "[max(crop_min_area, H*W / image area), 1], position random, seeded per image), then resized bicubic to "
    "HxW; the area floor keeps every crop at least HxW (FiT's no-upscale rule), which changes nothing at "
    "in-distribution sizes of a 128-px folder"
)
REFERENCE_RULE_VERSION = 1  # result lines name the rule "train-crop-v1"; bump it when REFERENCE_RULE changes
# Time-estimate assumptions (printed with the estimate). Eager bf16 sampling of a B/2 model ran at ~112
# TFLOP/s effective on the H200 (BENCHMARKS.md: FiTv2-B/2, 19.6 images/s x 100 evaluations x 57 GFLOP).
ASSUMED_SAMPLING_TFLOPS = {"cuda": 100.0, "cpu": 0.05}
ASSUMED_STARTUP_SECONDS = 60.0  # process, data, model, references, proxy
ASSUMED_SWEEP_CALL_SECONDS = {False: 10.0, True: 70.0}  # model load (+ compile for every stream length)
VARIANT_KEYS = {"description", "set", "finetune_unmasked"}


# --------------------------------------------------------------------------------------------------
# The run: config, variant, digest, design
# --------------------------------------------------------------------------------------------------


def load_variants(path: Path) -> Dict[str, dict]:
    """``[name]`` tables of a variants TOML: description, set (a list of section.key=value), finetune_unmasked."""
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10 (as maskfit.config)
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"variants file {path} does not exist (the study's is configs/study/variants.toml)")
    raw = tomllib.loads(path.read_text())
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: '{name}' must be a table [{name}] with description and set")
        unknown = set(table) - VARIANT_KEYS
        if unknown:
            raise ValueError(f"{path}: [{name}] has unknown key(s) {sorted(unknown)}; known: {sorted(VARIANT_KEYS)}")
        if not isinstance(table.get("set", []), list) or not all(isinstance(s, str) for s in table.get("set", [])):
            raise ValueError(f"{path}: [{name}].set must be a list of 'section.key=value' strings")
        f = table.get("finetune_unmasked", 0.0)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{path}: [{name}].finetune_unmasked={f} must be a fraction of the budget in [0, 1)")
    return raw


# Train fields that only place, schedule or execute a run, left out of the recipe's digest. The last three run the
# same computation another way (Inductor's compile mode, DDP's all-reduce buckets, the checkpoint files' format);
# they were added after the study's first runs, so keeping them in would split one recipe's seeds by code age.
EXECUTION_ONLY_TRAIN_FIELDS = ("out_dir", "seed", "device", "ckpt_at_images", "keep_checkpoints", "ckpt_every",
                               "max_seconds", "log_every", "compile_mode", "ddp_bucket_mb", "checkpoint_format")


# Recipe fields added after runs were recorded, with the value every earlier run had: left out of the digest while
# they hold it, so a new option does not split one recipe's seeds across sessions; any other value enters it.
LATER_RECIPE_DEFAULTS = {("mask", "decoder_pos_embed"): False, ("mask", "unmasked_every"): 0}


def config_digest(cfg: RunConfig) -> str:
    """SHA-256 (16 hex) of the recipe: the config without what only places, schedules or executes a run
    (``EXECUTION_ONLY_TRAIN_FIELDS``, ``data.decode_once``) and without later fields at their earlier value
    (``LATER_RECIPE_DEFAULTS``). Seeds of one recipe share it; the budget is recorded apart."""
    raw = to_dict(cfg)
    for key in EXECUTION_ONLY_TRAIN_FIELDS:
        raw["train"].pop(key, None)
    for (section, key), earlier in LATER_RECIPE_DEFAULTS.items():
        if raw[section].get(key) == earlier:
            raw[section].pop(key)
    raw["data"].pop("decode_once", None)  # where pixels are decoded, not which: bit-identical batches
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_masked(cfg: RunConfig) -> bool:
    return cfg.mask.keep_count is not None or cfg.mask.keep_ratio < 1.0


def subset_sampling_applies(cfg: RunConfig) -> bool:
    """Whether subset sampling reproduces the run's training view: uniform masking at a ratio (its mean ratio where
    drawn per image) below 1, any design; the unmasked fine-tune, if any, does not change that."""
    return cfg.mask.keep_count is None and cfg.mask.keep_ratio < 1.0 and cfg.mask.strategy == "uniform"


def design_label(cfg: RunConfig) -> str:
    """'padded' (FiT's layout) | 'packed' (unmasked, no padding) | the masked design (plain, decoder, ...)."""
    if is_masked(cfg):
        return cfg.mask.design
    return cfg.data.layout


# --------------------------------------------------------------------------------------------------
# Reference images per resolution
# --------------------------------------------------------------------------------------------------


def reference_image(img, height: int, width: int, rng: np.random.Generator, crop_min_area: float) -> np.ndarray:
    """One held-out image brought to ``height x width`` as training images are (REFERENCE_RULE): (H, W, 3) uint8."""
    from PIL import Image

    from maskfit.data.resize import random_aspect_crop

    ratio = width / height
    floor = min(1.0, height * width / float(img.width * img.height))
    crop = random_aspect_crop(img, rng, (ratio, ratio), max(crop_min_area, floor))
    if crop.size != (width, height):
        crop = crop.resize((width, height), resample=Image.BICUBIC)
    return np.asarray(crop, dtype=np.uint8)


def _reference_dataset(cfg: RunConfig, eval_data: Path, eval_split: str):
    """The evaluation folder's ``eval_split`` side as a dataset of the run's transform (crop area, ratios)."""
    from maskfit.data.pipeline import build_dataset
    from maskfit.runs import run_patch_size

    data = dataclasses.replace(cfg.data, source="folder", root=str(eval_data), split=eval_split, autoencoder="identity",
                               batching="images", tokens_per_step=0, max_images_per_step=None)
    return build_dataset(data, run_patch_size(cfg), seed=0, train=False)


def reference_crop_min_area(dataset) -> float:
    """The smallest crop area the references take, as training crops do (without random crops training keeps
    whole images)."""
    t = dataset.transform
    return t.crop_min_area if t.random_crop else 1.0


def check_eval_data(cfg: RunConfig, eval_data: Path, eval_split: str) -> None:
    """The reference must be images the run never trained on: refuse the training folder's training side."""
    if cfg.data.source != "folder" or not cfg.data.root:
        return
    if Path(eval_data).resolve() != Path(cfg.data.root).resolve():
        return
    if cfg.data.split != "train" or eval_split != "holdout":
        raise ValueError(
            f"--eval-data {eval_data} is the folder the run trains on, with data.split={cfg.data.split!r} and "
            f"--eval-split {eval_split}: the reference would hold training images. Train with data.split='train' "
            "and evaluate against --eval-split holdout (the default)"
        )


def ensure_references(cfg: RunConfig, resolutions: Sequence, eval_data: Path, eval_split: str, cache: Path,
                      log=print) -> str:
    """Write ``cache/ref_HxW.npz`` (images + labels, ADM layout) for each resolution not cached yet; returns
    the sweep's per-resolution template ``cache/ref_{resolution}.npz``."""
    from maskfit.data.datasets import item_rng, load_rgb
    from maskfit.evaluate.adm_npz import write_sample_npz

    dataset = _reference_dataset(cfg, eval_data, eval_split)
    min_area = reference_crop_min_area(dataset)
    rel = [p.relative_to(dataset.root).as_posix() for p, _ in dataset.samples]
    files_digest = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    todo = []
    for res in resolutions:
        key = {"version": REFERENCE_RULE_VERSION, "rule": REFERENCE_RULE, "eval_data": str(Path(eval_data).resolve()),
               "split": eval_split, "holdout_fraction": cfg.data.holdout_fraction, "files_sha256": files_digest,
               "images": len(rel), "crop_min_area": min_area, "height": res.height, "width": res.width}
        meta = cache / f"ref_{res.label}.json"
        if (cache / f"ref_{res.label}.npz").exists() and meta.exists() and json.loads(meta.read_text()) == key:
            continue
        todo.append((res, key, meta))
    if todo:
        t0 = time.perf_counter()
        arrays = {res.label: [] for res, _, _ in todo}
        labels = []
        for index, (path, label) in enumerate(dataset.samples):
            img = load_rgb(path)
            for res, _, _ in todo:
                arrays[res.label].append(reference_image(img, res.height, res.width, item_rng(0, 0, index), min_area))
            labels.append(label)
        for res, key, meta in todo:
            write_sample_npz(cache / f"ref_{res.label}.npz", np.stack(arrays[res.label]), np.asarray(labels))
            meta.write_text(json.dumps(key, indent=2) + "\n")  # after the npz: a key never vouches for a half file
        log(f"experiment: references {', '.join(r.label for r, _, _ in todo)} from {len(rel)} {eval_split} images of "
            f"{eval_data} ({time.perf_counter() - t0:.1f} s)")
    return str(cache / "ref_{resolution}.npz")


# --------------------------------------------------------------------------------------------------
# Plan and time estimate
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalGroup:
    """Resolutions swept together with one list of RoPE methods (one run_sweep call)."""

    name: str  # "id" | "ood"
    resolutions: list  # SweepResolution
    methods: str  # comma list


def eval_groups(resolutions: Sequence, id_methods: str, ood_methods: str) -> List[EvalGroup]:
    from maskfit.sweep import IN_DIST

    groups = [EvalGroup("id", [r for r in resolutions if r.split == IN_DIST], id_methods),
              EvalGroup("ood", [r for r in resolutions if r.split != IN_DIST], ood_methods)]
    return [g for g in groups if g.resolutions]


def sample_sets(cfg: RunConfig, mcfg, group: EvalGroup) -> List[Tuple[object, object]]:
    """Distinct (resolution, sample-set variant) pairs the sweep will draw for ``group`` (methods whose RoPE
    tables agree at a grid share one set: maskfit.sweep.sample_set_for)."""
    from maskfit.finetune import rope_train_grid
    from maskfit.sweep import model_head_dims, parse_variants, sample_set_for

    variants = parse_variants(group.methods)
    out = []
    for res in group.resolutions:
        sets = {sample_set_for(v, res.grid, rope_train_grid(cfg), model_head_dims(mcfg), mcfg.rope_theta)
                for v in variants}
        out += [(res, s) for s in sorted(sets, key=lambda v: v.label)]
    return out


def evaluations_per_image(sampler: str, steps: int, cfg_scale: float) -> int:
    """Network evaluations per sampled image: steps (x2 for Heun's corrector) x2 with classifier-free guidance."""
    per_step = 2 if sampler == "heun" else 1
    return steps * per_step * (2 if cfg_scale != 1.0 else 1)


def sampling_flops(mcfg, grids: Sequence[Tuple[int, int]], num_images: int, nfe: int) -> float:
    """Forward FLOPs of sampling ``num_images`` at each grid (the design's full-grid forward, no masking)."""
    from maskfit.throughput import design_flops

    return sum(num_images * nfe * design_flops(mcfg, h * w, h * w) / 3.0 for h, w in grids)


def estimate_seconds(budget: float, eval_flops: Sequence[float], calls: int, tflops: float, compile: bool) -> dict:
    """The plan's time: training budget + start-up + sampling FLOPs at ``tflops`` + per-sweep-call overhead."""
    sampling = sum(eval_flops) / (tflops * 1e12)
    overhead = calls * ASSUMED_SWEEP_CALL_SECONDS[compile]
    total = budget + ASSUMED_STARTUP_SECONDS + sampling + overhead
    return {"train_s": budget, "startup_s": ASSUMED_STARTUP_SECONDS, "sampling_s": round(sampling, 1),
            "sweep_overhead_s": overhead, "total_s": round(total, 1), "assumed_sampling_tflops": tflops}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def unmasked_config(cfg: RunConfig) -> RunConfig:
    """The run with every token kept (the fine-tune phase): same model, same data, no mask."""
    raw = to_dict(cfg)
    raw["mask"].update(keep_ratio=1.0, keep_count=None, ratio_distribution="constant", resolution_dependent=False,
                       schedule="constant", final_unmasked_steps=0, unmasked_every=0)
    return config_from_dict(raw)


def run_training(cfg: RunConfig, out: Path, budget: float, finetune: float, progress: bool, log=print) -> dict:
    """Train (phase "main", then "unmasked_finetune" when ``finetune`` > 0) unless ``out/training.json`` exists."""
    from maskfit.train import train

    done = out / "training.json"
    if done.exists():
        log(f"experiment: training finished earlier ({done}), skipped")
        return json.loads(done.read_text())
    run_dir = Path(cfg.train.out_dir)
    if run_dir.exists():
        log(f"experiment: {run_dir} holds an unfinished training; it starts over (a resumed run would pay its "
            "start-up twice inside the budget)")
        shutil.rmtree(run_dir)
    phases = [("main", cfg, budget * (1.0 - finetune))]
    if finetune > 0:
        if not is_masked(cfg):
            raise ValueError(f"--finetune-unmasked {finetune} needs a masked run; this one keeps every token")
        phases.append(("unmasked_finetune", unmasked_config(cfg), budget * finetune))
    device = torch.device("cuda") if torch.cuda.is_available() and cfg.train.device != "cpu" else torch.device("cpu")
    records = []
    for i, (name, phase_cfg, seconds) in enumerate(phases):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = train(phase_cfg, resume=i > 0, progress=progress, max_seconds=seconds)
        wall = time.perf_counter() - t0
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        records.append({"phase": name, "budget_seconds": round(seconds, 3), "wall_seconds": round(wall, 2),
                        "final_step": result.step, "images_seen": result.images_seen,
                        "compile_seconds": result.compile_seconds, "compile_graphs": result.compile_graphs,
                        "peak_mem_gib": peak})
        log(f"experiment: phase {name}: {result.step} steps, {result.images_seen} images seen, "
            f"{result.images_per_s:.0f} images/s over {wall:.0f} s")
    gc.collect()  # the loader's workers and the optimizer state go before sampling starts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    summary = {"phases": records, "checkpoints": describe_checkpoints(run_dir, records),
               "steady_images_per_s": steady_rate(run_dir / "log.jsonl", records),
               "peak_mem_gib": max((r["peak_mem_gib"] for r in records if r["peak_mem_gib"] is not None), default=None)}
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def describe_checkpoints(run_dir: Path, phases: List[dict]) -> List[dict]:
    """Every checkpoint of the run: step, images seen, training seconds over all phases up to it."""
    from maskfit import checkpoint as ckpt_io

    ends = [p["final_step"] for p in phases]
    out = []
    phase_states: Dict[int, float] = {}  # phase index -> its loop seconds at its last checkpoint
    for path in sorted((run_dir / "checkpoints").glob("step_*")):
        if not path.is_dir():
            continue
        state = ckpt_io.load_state(path)
        step = int(state["step"])
        phase = next(i for i, end in enumerate(ends) if step <= end or i == len(ends) - 1)
        seconds = float(state.get("train_seconds", float("nan")))
        if step == ends[phase]:
            phase_states[phase] = seconds
        out.append({"name": path.name, "step": step, "images_seen": int(state.get("images_seen", 0)),
                    "phase": phases[phase]["phase"], "phase_seconds": seconds})
    for c in out:
        i = next(k for k, p in enumerate(phases) if p["phase"] == c["phase"])
        c["train_seconds"] = round(sum(phase_states.get(k, 0.0) for k in range(i)) + c["phase_seconds"], 3)
    return out


def steady_rate(log_path: Path, phases: List[dict]) -> Optional[float]:
    """Median images/s over the log windows of the run, each phase's first window (start-up, compile) left out."""
    if not log_path.exists():
        return None
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    starts, rates = [0] + [p["final_step"] for p in phases[:-1]], []
    for start, end in zip(starts, [p["final_step"] for p in phases]):
        window = [r["speed/images_per_s"] for r in lines if start < r["step"] <= end and "speed/images_per_s" in r]
        rates += window[1:]
    return round(statistics.median(rates), 1) if rates else None


def checkpoints_to_evaluate(training: dict, marks: Sequence[int]) -> List[dict]:
    """The final checkpoint (equal GPU time) and each mark's first checkpoint at or past it (equal images)."""
    ckpts = sorted(training["checkpoints"], key=lambda c: c["step"])
    if not ckpts:
        raise RuntimeError("the training wrote no checkpoint; nothing to evaluate")
    chosen: Dict[str, dict] = {}
    final = dict(ckpts[-1], is_final=True, marks=[])
    chosen[final["name"]] = final
    for m in sorted(marks):
        c = next((c for c in ckpts if c["images_seen"] >= m), None)
        if c is None:
            continue  # not reached within the budget (the plan says so)
        entry = chosen.setdefault(c["name"], dict(c, is_final=False, marks=[]))
        entry["marks"].append(m)
    return sorted(chosen.values(), key=lambda c: (not c["is_final"], c["step"]))  # the final one first


# --------------------------------------------------------------------------------------------------
# Evaluation and result lines
# --------------------------------------------------------------------------------------------------


def _sweep_args(ckpt: Path, reference: str, group: EvalGroup, ev: dict, out: Path):
    """``maskfit sweep``'s arguments for one group, parsed by its own parser (its defaults stay its own)."""
    from maskfit.sweep import add_sweep_arguments

    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    argv = [str(ckpt), "--reference", reference, "--proxy", ev["proxy"], "--num-images", str(ev["num_images"]),
            "--methods", group.methods, "--resolutions", ",".join(r.label for r in group.resolutions),
            "--labels", "per-class", "--cfg-scale", str(ev["cfg_scale"]), "--sampler", ev["sampler"],
            "--steps", str(ev["steps"]), "--seed", str(ev["seed"]), "--batch-size", str(ev["batch_size"]),
            "--device", ev["device"], "--out", str(out)]
    if ev.get("attn_scale", "none") != "none":  # only an extra evaluation sets it (--also-attn-scale)
        argv += ["--attn-scale", ev["attn_scale"]]
    if ev.get("subset_keep", 1.0) != 1.0:  # only an extra evaluation sets it (--also-subset-sampling)
        argv += ["--subset-keep", str(ev["subset_keep"])]
    if ev["weights"] == "raw":
        argv.append("--no-ema")
    if ev["compile"]:
        argv.append("--compile")
    return parser.parse_args(argv)


def _number(text: str):
    if text in ("", None):
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_sweep_rows(path: Path) -> List[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def eval_id(ev: dict) -> str:
    """Identifies what changes sampled pixels or metrics (not the device or compilation): a folder per setting."""
    keys = ("num_images", "sampler", "steps", "cfg_scale", "seed", "batch_size", "weights", "proxy_sha256",
            "labels", "reference_rule_version")
    setting = {k: ev[k] for k in keys}
    if ev.get("attn_scale", "none") != "none":  # added later: absent from every id made without it
        setting["attn_scale"] = ev["attn_scale"]
    if ev.get("subset_keep", 1.0) != 1.0:  # the same
        setting["subset_keep"] = ev["subset_keep"]
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]


def result_line(run: dict, ckpt: dict, ev: dict, row: dict, training: dict) -> dict:
    """One JSON line: run, checkpoint, sampling settings, resolution, method and the proxy metrics."""
    seconds = ckpt["train_seconds"]
    return {
        "result_version": RESULT_VERSION,
        # the run
        **run,
        # the checkpoint
        "checkpoint": ckpt["name"], "step": ckpt["step"], "images_seen": ckpt["images_seen"], "phase": ckpt["phase"],
        "is_final": ckpt["is_final"], "marks": ckpt["marks"], "train_seconds": seconds,
        "images_per_s": round(ckpt["images_seen"] / seconds, 1) if seconds and seconds > 0 else None,
        "images_per_s_steady": training["steady_images_per_s"], "peak_mem_gib": training["peak_mem_gib"],
        "compile_seconds": round(sum(p["compile_seconds"] for p in training["phases"]), 2),
        # sampling and evaluation
        "weights": ev["weights"], "sampler": ev["sampler"], "sampler_steps": ev["steps"], "cfg_scale": ev["cfg_scale"],
        "guidance_channels": "all", "labels": "per-class", "sample_seed": ev["seed"],
        "num_samples": _number(row["num_images"]), "precision": row["precision"], "eval_id": ev["eval_id"],
        "proxy_sha256": ev["proxy_sha256"], "reference": ev["reference"],
        # where
        "resolution": row["resolution"], "height": _number(row["height"]), "width": _number(row["width"]),
        "tokens": _number(row["tokens"]), "split": "ID" if row["split"] == "in-distribution" else "OOD",
        "method": row["method"], "attn_scale": row.get("attn_scale") or "none",
        "subset_keep": float(row.get("subset_keep") or 1.0),
        "sample_set": row["sample_set"], "shared_sample_set": row["shared"] == "True",
        # the numbers
        **{k: _number(row.get(k, "")) for k in ("proxy_fd", "proxy_precision", "proxy_recall", "proxy_class_accuracy",
                                                 "detail_ratio", "contrast_ratio")},
    }


def read_results(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _result_key(line: dict) -> tuple:
    return (line["checkpoint"], line["resolution"], line["method"], line["eval_id"])


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> Optional[str]:
    return _git("rev-parse", "HEAD") or None


def code_digest() -> str:
    """SHA-256 (16 hex) of the maskfit package's Python sources as they ran: names the code even where the copy's
    .git is stale or absent (a device command runs the working tree, committed or not)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git_dirty() -> Optional[bool]:
    """Whether tracked files differ from the commit: a device copy of an uncommitted tree (or a stale .git
    beside it) reports True, so git_commit alone never passes for the code that ran."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _device_name(device: str) -> str:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _int_list(text: str) -> List[int]:
    try:
        values = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of image counts, e.g. 250000,500000") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: image counts must be positive")
    return values


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (TOML/JSON), e.g. configs/study/base.toml")
    p.add_argument("--out", required=True, help="the experiment's folder (run, samples, references, results.jsonl)")
    p.add_argument("--variant", default=None, help="a [name] of --variants whose overrides apply before --set")
    p.add_argument("--variants", default="configs/study/variants.toml", help="the variants table (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--seed", type=int, default=None, help="train.seed (weights, data order, masks)")
    p.add_argument("--budget-seconds", type=float, default=240.0, help="training wall-clock budget on this device")
    p.add_argument("--eval-at-images", type=_int_list, default=[], metavar="N,N,...",
                   help="also checkpoint and evaluate when images seen cross these counts (equal-images comparison)")
    p.add_argument("--finetune-unmasked", type=float, default=None, metavar="F",
                   help="last fraction F of the budget trains unmasked (default: the variant's, else 0)")
    p.add_argument("--resolutions", default=",".join(PROTOCOL_RESOLUTIONS), help="HxW comma list (final checkpoint)")
    p.add_argument("--mark-resolutions", default=None, help="HxW comma list for the marks' checkpoints (default: --resolutions)")
    p.add_argument("--id-methods", default=ID_METHODS, help="RoPE methods at in-distribution sizes")
    p.add_argument("--ood-methods", default=OOD_METHODS, help="RoPE methods at out-of-distribution sizes")
    p.add_argument("--num-images", type=int, default=250, help="samples per (resolution, method); per-class labels")
    p.add_argument("--sample-batch-size", type=int, default=125)
    p.add_argument("--sampler", default=None, help="default: euler (flow) / ddim (ddpm), a fixed number of steps")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE, help="classifier-free guidance, all channels")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights are sampled")
    p.add_argument("--raw-final", choices=("auto", "yes", "no"), default="auto",
                   help="also sample the final checkpoint's raw (non-EMA) weights at the mark resolutions; auto: when "
                        "the run ends with an unmasked fine-tune, shorter than the EMA's memory of the masked phase")
    p.add_argument("--also-cfg", type=float, default=None, metavar="SCALE",
                   help="also sample the final checkpoint with this guidance scale at the mark resolutions (1.0: no "
                        "guidance, as FiT's and MaskDiT's no-CFG tables; MaskDiT's CFG numbers need its unmasked "
                        "fine-tune, its no-CFG numbers do not)")
    p.add_argument("--also-attn-scale", choices=[a for a in ATTN_SCALES if a != "none"], default=None,
                   help="a masked run also samples its final checkpoint with this attention scale at the mark "
                        "resolutions (kept: logits times ln n / ln(kept keys in training), models/rope.py; the test "
                        "of whether masked runs' washed-out samples come from attending over more keys than in "
                        "training); an unmasked run skips it")
    p.add_argument("--also-subset-sampling", action="store_true",
                   help="a masked run with uniform masking also samples its final checkpoint at the mark "
                        "resolutions the way it trained: every network call through its masked forward on random "
                        "subsets of its keep ratio of each image's tokens (maskfit sample --subset-keep); other runs "
                        "skip it")
    p.add_argument("--sample-compile", action="store_true", help="torch.compile the sampler's network (per sweep call)")
    p.add_argument("--proxy", required=True, help="proxy classifier (maskfit train-classifier --data-split train)")
    p.add_argument("--eval-data", default=None, help="folder of the reference images (default: the run's data.root)")
    p.add_argument("--eval-split", choices=("holdout", "all"), default="holdout",
                   help="which side of --eval-data's split (maskfit.data.split) the references use")
    p.add_argument("--reference-cache", default=None, help="cached references per resolution (default: OUT/reference)")
    p.add_argument("--device", default="auto")
    p.add_argument("--assume-sampling-tflops", type=float, default=None,
                   help="effective sampling TFLOP/s for the time estimate (default 100 on CUDA, 0.05 on a CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, do nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def experiment_config(args, out: Path) -> Tuple[RunConfig, dict]:
    """The run's config: CONFIG, the variant's overrides, --set, --seed, then the experiment's own train fields."""
    variant: dict = {}
    overrides: List[str] = []
    if args.variant:
        variants = load_variants(Path(args.variants))
        if args.variant not in variants:
            raise KeyError(f"--variant {args.variant!r} is not in {args.variants}; known: {', '.join(variants)}")
        variant = variants[args.variant]
        overrides += variant.get("set", [])
    overrides += args.set
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    overrides += [f"train.out_dir={json.dumps(str(out / 'run'))}",
                  f"train.ckpt_at_images={json.dumps(sorted(args.eval_at_images))}",
                  "train.keep_checkpoints=0", "train.ckpt_every=1000000000", f"train.device={json.dumps(args.device)}"]
    return load_config(args.config, overrides), variant


def run_experiment(args) -> dict:
    from maskfit.data.pipeline import autoencoder_factor
    from maskfit.evaluate.inception import sha256_file
    from maskfit.sweep import parse_resolutions, run_sweep
    from maskfit.runs import resolved_model_config, run_patch_size

    out = Path(args.out)
    cfg, variant = experiment_config(args, out)
    finetune = args.finetune_unmasked if args.finetune_unmasked is not None else float(variant.get("finetune_unmasked", 0.0))
    if not 0.0 <= finetune < 1.0:
        raise ValueError(f"--finetune-unmasked {finetune} must be a fraction of the budget in [0, 1)")
    if finetune > 0 and not is_masked(cfg):
        raise ValueError(f"--finetune-unmasked {finetune}: this run keeps every token, there is nothing to unmask")
    if args.budget_seconds <= 0 or args.num_images < 1 or args.sample_batch_size < 1:
        raise ValueError("--budget-seconds, --num-images and --sample-batch-size must be positive")
    proxy = Path(args.proxy)
    if not proxy.is_file():
        raise FileNotFoundError(f"--proxy {proxy} does not exist; train it once with `tools/study.sh proxy` "
                                "(maskfit train-classifier --data-split train) and commit it")
    objective = cfg.diffusion.objective
    sampler, steps = FIXED_SAMPLERS[objective]
    sampler, steps = args.sampler or sampler, args.steps or steps
    if sampler == "dopri5":
        raise ValueError("--sampler dopri5 adapts its steps to each model, so runs would get different compute; "
                         "use a fixed-step sampler (euler or heun for flow, ddim or ddpm for ddpm)")
    eval_data = Path(args.eval_data or cfg.data.root)
    check_eval_data(cfg, eval_data, args.eval_split)

    mcfg = resolved_model_config(cfg, 3 if cfg.data.autoencoder == "identity" else 4)
    multiple = autoencoder_factor(cfg.data) * run_patch_size(cfg)
    budget_tokens = cfg.data.token_budget
    final_res = parse_resolutions([args.resolutions], budget_tokens, multiple)
    mark_res = parse_resolutions([args.mark_resolutions or args.resolutions], budget_tokens, multiple)
    final_groups = eval_groups(final_res, args.id_methods, args.ood_methods)
    mark_groups = eval_groups(mark_res, args.id_methods, args.ood_methods)

    device_kind = "cuda" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    tflops = args.assume_sampling_tflops or ASSUMED_SAMPLING_TFLOPS[device_kind]
    nfe = evaluations_per_image(sampler, steps, args.cfg_scale)

    def group_flops(groups):
        return [sampling_flops(mcfg, [res.grid for res, _ in sample_sets(cfg, mcfg, g)], args.num_images, nfe)
                for g in groups]

    marks = sorted(args.eval_at_images)
    raw_final = args.weights == "ema" and (args.raw_final == "yes" or (args.raw_final == "auto" and finetune > 0))
    also_cfg = args.also_cfg is not None and args.also_cfg != args.cfg_scale
    if args.also_cfg is not None and args.also_cfg < 1.0:
        raise ValueError(f"--also-cfg {args.also_cfg:g}: a guidance scale is >= 1 (1.0 = no guidance)")
    also_attn = args.also_attn_scale is not None and is_masked(cfg)
    also_subsets = getattr(args, "also_subset_sampling", False) and subset_sampling_applies(cfg)
    # The final checkpoint's extra evaluations at the marks' resolutions: each overrides the main setting ``ev``.
    extras = (([{"weights": "raw"}] if raw_final else []) + ([{"cfg_scale": args.also_cfg}] if also_cfg else [])
              + ([{"attn_scale": args.also_attn_scale}] if also_attn else [])
              + ([{"subset_keep": cfg.mask.keep_ratio}] if also_subsets else []))
    mark_flops = group_flops(mark_groups)
    flops = group_flops(final_groups) + mark_flops * len(marks)
    for extra in extras:  # an unguided pass costs half: one network evaluation per step instead of two
        scale = evaluations_per_image(sampler, steps, extra.get("cfg_scale", args.cfg_scale)) / nfe
        flops += [f * scale for f in mark_flops]
    calls = len(final_groups) + len(mark_groups) * (len(marks) + len(extras))
    estimate = estimate_seconds(args.budget_seconds, flops, calls, tflops, args.sample_compile)
    name = out.name
    sets_final = sum(len(sample_sets(cfg, mcfg, g)) for g in final_groups)
    print(f"experiment {name}: {args.variant or args.config}, design {design_label(cfg)}, seed {cfg.train.seed}, "
          f"config {config_digest(cfg)}\n"
          f"  training: {args.budget_seconds:g} s on {_device_name(args.device)}"
          + (f" ({finetune:.0%} of it unmasked fine-tune)" if finetune else "")
          + (f", checkpoints at {marks} images" if marks else "") + "\n"
          f"  evaluation: {sets_final} sample sets at the final checkpoint, "
          f"{sum(len(sample_sets(cfg, mcfg, g)) for g in mark_groups)} at each mark; {args.num_images} images each, "
          f"{sampler} {steps} steps, CFG {args.cfg_scale:g} ({nfe} network evaluations per image), "
          f"{args.weights.upper()} weights" + (", and the final checkpoint's raw weights at the marks' resolutions"
                                               if raw_final else "")
          + (f", and the final checkpoint with CFG {args.also_cfg:g} at the marks' resolutions" if also_cfg else "")
          + (f", and the final checkpoint with attention scale {args.also_attn_scale!r} at the marks' resolutions"
             if also_attn else "")
          + (f", and the final checkpoint on token subsets of {cfg.mask.keep_ratio:g} at the marks' resolutions"
             if also_subsets else "")
          + "\n"
          f"  estimate: {estimate['total_s']:.0f} s = training {estimate['train_s']:g} + start-up "
          f"{estimate['startup_s']:g} + sampling {estimate['sampling_s']:g} (at an assumed {tflops:g} TFLOP/s) "
          f"+ {calls} sweep calls {estimate['sweep_overhead_s']:g}", flush=True)
    if estimate["total_s"] > 570:
        print("  warning: more than one 10-minute device command; lower --num-images, --budget-seconds, the marks or "
              "--mark-resolutions", flush=True)
    if args.dry_run:
        return {"estimate": estimate, "dry_run": True}

    out.mkdir(parents=True, exist_ok=True)
    plan = {"name": name, "variant": args.variant, "description": variant.get("description", ""),
            "config_file": str(args.config), "config_digest": config_digest(cfg), "config": to_dict(cfg),
            "budget_seconds": args.budget_seconds, "finetune_unmasked": finetune, "eval_at_images": marks}
    plan_path = out / "experiment.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        changed = [k for k in plan if json.dumps(old.get(k), sort_keys=True) != json.dumps(plan[k], sort_keys=True)]
        if changed:
            raise ValueError(f"{out} holds an experiment trained with other settings ({', '.join(changed)} differ); "
                             "use another --out, or delete the folder to start over")
    plan_path.write_text(json.dumps(plan, indent=2, default=str) + "\n")

    training = run_training(cfg, out, args.budget_seconds, finetune, progress=not args.quiet)
    reached = [m for m in marks if any(c["images_seen"] >= m for c in training["checkpoints"])]
    if len(reached) < len(marks):
        print(f"experiment: marks {[m for m in marks if m not in reached]} not reached within the budget", flush=True)

    reference = ensure_references(cfg, list(dict.fromkeys(final_res + mark_res)), eval_data, args.eval_split,
                                  Path(args.reference_cache) if args.reference_cache else out / "reference")
    ev = {"proxy": str(proxy), "proxy_sha256": sha256_file(proxy), "num_images": args.num_images,
          "sampler": sampler, "steps": steps, "cfg_scale": args.cfg_scale, "seed": args.sample_seed,
          "batch_size": args.sample_batch_size, "weights": args.weights, "compile": args.sample_compile,
          "device": args.device, "labels": "per-class", "reference_rule_version": REFERENCE_RULE_VERSION,
          "reference": {"folder": str(eval_data), "split": args.eval_split,
                        "holdout_fraction": cfg.data.holdout_fraction, "rule": f"train-crop-v{REFERENCE_RULE_VERSION}"}}
    ev["eval_id"] = eval_id(ev)
    run = {"run": name, "variant": args.variant, "description": variant.get("description", ""),
           "config_digest": config_digest(cfg), "design": design_label(cfg), "layout": cfg.data.layout,
           "objective": objective, "model": cfg.model.preset, "keep_ratio": cfg.mask.keep_ratio if is_masked(cfg) else 1.0,
           "keep_count": cfg.mask.keep_count, "strategy": cfg.mask.strategy if is_masked(cfg) else None,
           "ratio_distribution": cfg.mask.ratio_distribution if is_masked(cfg) else None,
           "resolution_dependent": cfg.mask.resolution_dependent if is_masked(cfg) else None,
           "finetune_unmasked": finetune, "seed": cfg.train.seed, "budget_seconds": args.budget_seconds,
           "ema_decay": cfg.optim.ema_decay, "ema_warmup": cfg.optim.ema_warmup, "batch_size": cfg.train.batch_size,
           "device": _device_name(args.device), "torch": torch.__version__, "git_commit": _git_commit(),
           "git_dirty": _git_dirty(), "code_sha256": code_digest()}

    results_path = out / "results.jsonl"
    done = {_result_key(line) for line in read_results(results_path)}
    t_eval, flops_done, written = time.perf_counter(), 0.0, 0

    def evaluate(ckpt: dict, groups, ev: dict) -> None:
        nonlocal flops_done, written
        ckpt_path = Path(cfg.train.out_dir) / "checkpoints" / ckpt["name"]
        for group in groups:
            sets = sample_sets(cfg, mcfg, group)
            wanted = {(ckpt["name"], res.label, m, ev["eval_id"]) for res in group.resolutions
                      for m in group.methods.split(",") if m.strip()}
            if wanted <= done:
                continue
            folder = out / "eval" / ev["eval_id"] / ckpt["name"] / group.name
            t0 = time.perf_counter()
            summary = run_sweep(_sweep_args(ckpt_path, reference, group, ev, folder))
            seconds = time.perf_counter() - t0
            nfe_here = evaluations_per_image(ev["sampler"], ev["steps"], ev["cfg_scale"])
            flops_done += sampling_flops(mcfg, [res.grid for res, _ in sets], args.num_images, nfe_here)
            lines = [result_line(run, ckpt, ev, row, training) for row in read_sweep_rows(Path(summary["csv"]))]
            with open(results_path, "a") as f:
                for line in lines:
                    if _result_key(line) not in done:
                        f.write(json.dumps(line) + "\n")
                        done.add(_result_key(line))
                        written += 1
            rate = flops_done / max(time.perf_counter() - t_eval, 1e-9) / 1e12
            print(f"experiment: {ckpt['name']} {group.name} ({ev['weights']} weights) evaluated in {seconds:.0f} s "
                  f"(sampling so far {rate:.3g} TFLOP/s effective, incl. evaluation and start-up)", flush=True)

    evaluated = checkpoints_to_evaluate(training, marks)
    for ckpt in evaluated:
        evaluate(ckpt, final_groups if ckpt["is_final"] else mark_groups, ev)
    # Raw weights: the EMA of a run whose last phase is short still holds mostly the weights before it
    # (REPORT.md), the raw weights show what that phase itself reached. Another CFG: see --also-cfg.
    for extra in extras:
        ev_extra = dict(ev, **extra)
        ev_extra["eval_id"] = eval_id(ev_extra)
        evaluate(evaluated[0], mark_groups, ev_extra)  # the final checkpoint comes first
    return {"results": str(results_path), "lines_written": written, "estimate": estimate,
            "eval_seconds": round(time.perf_counter() - t_eval, 1)}


def cmd_experiment(args) -> int:
    summary = run_experiment(args)
    print(json.dumps(summary, indent=2))
    return 0
