"""CPU probe (not part of the study's protocol): does the MaskDiT decoder design lose class fidelity under CFG
when sampled without masks, at the demo's scale?

    PYTHONPATH=src python tools/probes/decoder_cfg_probe.py unmasked|plain|decoder SECONDS [SUFFIX]

The demo's model (maskfit.demo, ~1 M parameters, synthetic 8-class set, 32-px budget) with FiT v1's objective
(DDPM, learned sigma), 50 % kept for plain/decoder, EMA with warm-up, trained for SECONDS on the CPU; then 80
samples per CFG scale (1, 1.5, 3; DDIM 25, the demo's five aspect ratios) scored by the synthetic set's
class-accuracy rule. Prints one JSON line. Written to test one reading of the study's decoder50 run (its samples
degraded under CFG 1.5 on the GPU); see the session note of 2026-12-01.
"""
import json, sys, torch
from pathlib import Path
from maskfit.config import config_from_dict
from maskfit.demo import demo_config, DEMO_RESOLUTIONS, PATCH
from maskfit.train import train
from maskfit.runs import build_diffusion, load_model_from_checkpoint
from maskfit.sample import SamplerOptions, sample_tokens, tokens_to_images
from maskfit.data.latents import IdentityAutoencoder
from maskfit.data.synthetic import synthetic_class_accuracy

design, seconds = sys.argv[1], float(sys.argv[2])
suffix = sys.argv[3] if len(sys.argv) > 3 else ""
out = Path(f"/tmp/probe/{design}{suffix}")
raw = demo_config(out, 100000)
raw["diffusion"] = {"objective": "ddpm"}; raw["model"]["overrides"]["learn_sigma"] = True
if design != "unmasked":
    raw["mask"] = {"keep_ratio": 0.5, "design": design, "decoder_hidden": 64, "decoder_heads": 2}
raw["optim"]["ema_decay"] = 0.999; raw["optim"]["ema_warmup"] = True
cfg = config_from_dict(raw)
torch.set_num_threads(2)
res = train(cfg, resume=False, fresh_into_existing=True, progress=False, max_seconds=seconds)
model, _ = load_model_from_checkpoint(res.run_dir, use_ema=True)
diffusion = build_diffusion(cfg)
row = {"design": design, "steps": res.step, "images_per_s": round(res.images_per_s, 1)}
for cfg_scale in (1.0, 1.5, 3.0):
    gen = torch.Generator().manual_seed(0)
    imgs, labs = [], []
    for h, w in DEMO_RESOLUTIONS:
        labels = torch.arange(8).repeat(2)
        grids = [(h // PATCH, w // PATCH)] * 16
        tok = sample_tokens(model, diffusion, grids, labels, SamplerOptions(method="ddim", steps=25, cfg_scale=cfg_scale), gen, torch.device("cpu"))
        imgs += tokens_to_images(tok, grids, PATCH, IdentityAutoencoder()); labs += labels.tolist()
    row[f"acc_cfg{cfg_scale:g}"] = round(synthetic_class_accuracy(imgs, labs), 3)
print(json.dumps(row), flush=True)
