"""`maskfit` command line: models | train | sample | sweep | prepare | eval | train-classifier | bench | demo |
import-published | experiment."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def cmd_models(args) -> int:
    import torch

    from maskfit.models.transformer import FiT, MODEL_PRESETS, count_parameters, flops_per_image

    print(f"{'preset':<14} {'params':>10} {'depth':>5} {'width':>6} {'heads':>5} {'ffn':>6} {'GFLOPs@256':>11}")
    for name, cfg in MODEL_PRESETS.items():
        with torch.device("meta"):
            n = count_parameters(FiT(cfg))
        gflops = flops_per_image(cfg, 256) / 1e9
        print(f"{name:<14} {n / 1e6:>9.1f}M {cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.ffn_hidden:>6} {gflops:>11.1f}")
    print("GFLOPs: real forward FLOPs (2 per multiply-add) of one 256-token image; see flops_per_image().")
    return 0


def cmd_train(args) -> int:
    from maskfit.config import load_config
    from maskfit.train import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, resume=not args.no_resume, progress=not args.quiet,
                   fresh_into_existing=args.fresh_into_existing)
    summary = {"run_dir": str(result.run_dir), "step": result.step, "images_per_s": result.images_per_s,
               "skipped_steps": result.skipped_steps}
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 speaks for the run
        return 0 if result.stop_signal is None else 128 + result.stop_signal
    if result.stop_signal is not None:
        # Stopped by SIGTERM / SIGINT (checkpoint written): not finished, so 128 + the signal number, as a
        # shell reports a process the signal killed, after saying where the checkpoint is.
        summary["stopped_by"] = signal.Signals(result.stop_signal).name
        print(json.dumps(summary))
        print(f"maskfit train: {result.stop_message}", file=sys.stderr)
        return 128 + result.stop_signal
    print(json.dumps(summary))
    return 0


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    from maskfit.models.rope import ATTN_SCALES
    from maskfit.sampling_run import add_sampler_arguments, positive_int

    p.add_argument("checkpoint", help="checkpoint folder or run folder (its latest checkpoint)")
    p.add_argument("--resolution", "-r", action="append", default=None,
                   help="HxW or S (square), pixels; repeat for several (default: the training budget's square)")
    p.add_argument("--num-images", "-n", type=positive_int, default=16, help="images per resolution")
    p.add_argument("--cfg-schedule", default="constant", help="constant | power_cos (MDT's schedule)")
    p.add_argument("--distribution", default=None,
                   help="'imagenet': draw each image's size from FiT's ImageNet-like aspect mix at the run's budget")
    p.add_argument("--pack", action="store_true",
                   help="mix the listed resolutions in every batch (one packed stream) instead of one per batch")
    p.add_argument("--extrapolation", default="none",
                   help="RoPE extrapolation: none|pi|ntk|yarn|vision_ntk|vision_yarn")
    p.add_argument("--attn-scale", choices=ATTN_SCALES, default=None,
                   help="attention scale: none | paper | code (FiTv2 eq. 15; code: the released ntkpro2) | kept (eq. "
                        "15's argument for a masked run: ln n / ln(kept keys in training), models/rope.py); default "
                        "none, or --recipe's for a FiTv2 run")
    p.add_argument("--kept-fraction", type=float, default=None, metavar="K",
                   help="with --attn-scale kept: the kept fraction the scale assumes (default: the run's "
                        "mask.keep_ratio); a larger K is a milder scale")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples)")
    add_sampler_arguments(p)


def cmd_sample(args) -> int:
    from maskfit.sampling_run import run_sampling

    summary = run_sampling(args)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args) -> int:
    from maskfit.demo import run_demo

    summary = run_demo(Path(args.out), minutes=args.minutes, quick=args.quick)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskfit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list model presets with parameter counts")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train (or resume) a run from a JSON/TOML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--no-resume", action="store_true",
                   help="start at step 0; refused in a run folder that holds checkpoints (see --fresh-into-existing)")
    p.add_argument("--fresh-into-existing", action="store_true",
                   help="start at step 0 in a run folder that holds a run: its files (checkpoints/, log.jsonl, tb/, "
                        "config.json) move into OUT_DIR/previous_run_<time>/ first; nothing is deleted")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images at any resolution from a checkpoint")
    add_sample_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="train a tiny model on the synthetic set on CPU and sample a grid")
    p.add_argument("--out", default="demo")
    p.add_argument("--minutes", type=float, default=2.5, help="training time budget")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(func=cmd_demo)

    _add_module_commands(sub)
    return parser


def _add_module_commands(sub) -> None:
    """Commands whose argument parsers live beside their code (data, evaluation, sweep, benchmarks)."""
    from maskfit.bench import add_bench_arguments, run_bench
    from maskfit.data.prepare import add_prepare_arguments, run_prepare
    from maskfit.evaluate.cli import add_eval_arguments, add_train_classifier_arguments, run_eval, run_train_classifier
    from maskfit.experiment import add_experiment_arguments, cmd_experiment
    from maskfit.published import add_import_arguments, run_import
    from maskfit.sweep import add_sweep_arguments, cmd_sweep

    commands = [
        ("sweep", "sample + evaluate a checkpoint at FiT's ID/OOD resolutions with every RoPE method",
         add_sweep_arguments, cmd_sweep),
        ("prepare", "encode a run's images into a latent cache", add_prepare_arguments, run_prepare),
        ("eval", "FID/sFID/IS/precision/recall (ADM-compatible) or proxy metrics", add_eval_arguments, run_eval),
        ("train-classifier", "train the proxy feature network on the training images",
         add_train_classifier_arguments, run_train_classifier),
        ("bench", "training/sampling throughput, MFU and memory", add_bench_arguments, run_bench),
        ("import-published", "turn a released FiT/FiTv2 checkpoint (whlzy/FiT) into a maskfit checkpoint folder",
         add_import_arguments, run_import),
        ("experiment", "one run of the study: train for a GPU-time budget, evaluate its checkpoints at every "
         "resolution and RoPE method, one JSON line each", add_experiment_arguments, cmd_experiment),
    ]
    for name, help_text, add_arguments, func in commands:
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=func)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        # One clear line for bad input; tracebacks are for bugs.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"maskfit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
