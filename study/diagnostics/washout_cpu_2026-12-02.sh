#!/usr/bin/env bash
# CPU diagnostic (2026-12-02, third session; REPORT.md Findings, "washed out"): does masked training wash samples
# out at small scale too, and does the "kept" attention scale undo it? Two CPU threads, about 45 minutes in all.
# Results: washout_cpu_2026-12-02.jsonl beside this file. Run from the repository root with the project's venv.
set -euo pipefail
PY=.venv/bin/python
D=${DIAG:-/tmp/diag}
# The 1.9 M-parameter FiT of the earlier CPU diagnostics (depth 4, width 128), Imagenette 64 px, 2 048 images,
# batch 32, lr 3e-4, dense attention; otherwise configs/study/base.toml (DDPM, EMA with warm-up).
COMMON=(--set 'model.attention="dense"'
  --set 'model.overrides={"depth": 4, "ffn_hidden": 512, "hidden_size": 128, "in_channels": 3, "num_classes": 10, "num_heads": 2, "patch_size": 4}'
  --set 'data.root="../shared/data/imagenette/train-64"' --set 'data.num_images=2048' --set 'data.num_workers=0'
  --set 'train.batch_size=32' --set 'train.device="cpu"' --set 'optim.lr=0.0003' --set 'train.compile=false')
for spec in "p25:0.25:0" "packed:1.0:0" "p25mix:0.25:10"; do  # name, kept fraction, one unmasked step in N (0: none)
  IFS=: read -r name keep every <<< "$spec"
  $PY -m maskfit.cli train configs/study/base.toml "${COMMON[@]}" --set "mask.keep_ratio=$keep" --set 'train.steps=2000' \
    --set "mask.unmasked_every=$every" --set "train.out_dir=\"$D/$name\"" --set 'train.ckpt_every=1000' \
    --set 'train.keep_checkpoints=0'
done
draw() {  # checkpoint, out, images, seed, batch size, extra sample flags
  $PY -m maskfit.cli sample "$1" -r 64 -n "$3" --labels per-class --sampler ddim --steps 25 --cfg-scale 1.5 \
    --seed "$4" --batch-size "$5" --device cpu --out "$2" "${@:6}"
}
# 64 samples (seed 0) per setting: contrast and detail of OUT/samples_64x64.npz (maskfit.evaluate.image_stats,
# against 256 images of the folder read as tools/probes/sample_sharpness.py --real reads them)
for ck in step_0001000 step_0002000; do
  draw "$D/p25/checkpoints/$ck" "$D/samples/p25/$ck/none" 64 0 64 --attn-scale none
  draw "$D/p25/checkpoints/$ck" "$D/samples/p25/$ck/kept" 64 0 64 --attn-scale kept
  draw "$D/packed/checkpoints/$ck" "$D/samples/packed/$ck/none" 64 0 64 --attn-scale none
done
draw "$D/p25/checkpoints/step_0002000" "$D/samples/p25/step_0002000/kept_k0.5" 64 0 64 --attn-scale kept --kept-fraction 0.5
draw "$D/p25mix/checkpoints/step_0002000" "$D/samples/p25mix/step_0002000/none" 64 0 64 --attn-scale none
# 256 samples (seed 1) at step 2 000: proxy FD against 1 000 images of the 64-px folder (relative comparison only)
for spec in "p25:none" "p25:kept" "packed:none" "p25mix:none"; do
  name=${spec%%:*}; scale=${spec#*:}
  draw "$D/$name/checkpoints/step_0002000" "$D/fd/$name/$scale" 256 1 128 --attn-scale "$scale"
  $PY -m maskfit.cli eval "$D/fd/$name/$scale/samples_64x64.npz" --reference ../shared/data/imagenette/train-64 \
    --reference-size 64 --reference-limit 1000 --proxy study/proxy/proxy_classifier.safetensors --device cpu
done
