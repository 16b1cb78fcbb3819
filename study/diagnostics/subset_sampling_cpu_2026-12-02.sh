#!/usr/bin/env bash
# CPU diagnostic (2026-12-02, fourth session; REPORT.md Findings, "washed out"): does sampling a masked model the way
# it trained (every network call through its masked forward on random subsets of each image's tokens: `--subset-keep`,
# i.e. maskfit.sample.subset_denoiser) undo its washout? Reuses the checkpoints of washout_cpu_2026-12-02.sh (DIAG
# folder) and its 256-sample protocol (seed 1, proxy FD against 1 000 images of the 64-px folder, relative comparison
# only), then trains a MaskDiT decoder without the auxiliary loss the same way and samples it with and without.
# Results: subset_sampling_cpu_2026-12-02.jsonl beside this file. Run from the repository root with the project's venv.
set -euo pipefail
PY=.venv/bin/python
D=${DIAG:-/tmp/diag}
OUT=study/diagnostics/subset_sampling_cpu_2026-12-02.jsonl
# The decoder (50 % kept, no auxiliary loss: the GPU's decoder50_noaux), as washout_cpu_2026-12-02.sh trains its runs
COMMON=(--set 'model.attention="dense"'
  --set 'model.overrides={"depth": 4, "ffn_hidden": 512, "hidden_size": 128, "in_channels": 3, "num_classes": 10, "num_heads": 2, "patch_size": 4}'
  --set 'data.root="../shared/data/imagenette/train-64"' --set 'data.num_images=2048' --set 'data.num_workers=0'
  --set 'train.batch_size=32' --set 'train.device="cpu"' --set 'optim.lr=0.0003' --set 'train.compile=false')
[ -d "$D/dec50noaux/checkpoints/step_0002000" ] || $PY -m maskfit.cli train configs/study/base.toml "${COMMON[@]}" \
  --set 'mask.keep_ratio=0.5' --set 'mask.design="decoder"' --set 'mask.aux_loss_weight=0.0' \
  --set 'mask.decoder_hidden=128' --set 'mask.decoder_heads=2' --set 'train.steps=2000' \
  --set "train.out_dir=\"$D/dec50noaux\"" --set 'train.ckpt_every=1000' --set 'train.keep_checkpoints=0'
# and with its auxiliary loss (weight 0.1 on the dropped tokens: the GPU's decoder50); added the same session
[ -d "$D/dec50/checkpoints/step_0002000" ] || $PY -m maskfit.cli train configs/study/base.toml "${COMMON[@]}" \
  --set 'mask.keep_ratio=0.5' --set 'mask.design="decoder"' \
  --set 'mask.decoder_hidden=128' --set 'mask.decoder_heads=2' --set 'train.steps=2000' \
  --set "train.out_dir=\"$D/dec50\"" --set 'train.ckpt_every=1000' --set 'train.keep_checkpoints=0'
for spec in "p25:0.25" "p25:0.5" "packed:0.25" "p25mix:0.25" "dec50noaux:1" "dec50noaux:0.5" \
            "dec50:1" "dec50:0.5"; do  # run, fraction each network call sees
  IFS=: read -r name keep <<< "$spec"
  dir="$D/fd_subset/$name/$keep"
  mkdir -p "$(dirname "$dir")"
  $PY -m maskfit.cli sample "$D/$name/checkpoints/step_0002000" -r 64 -n 256 --labels per-class --sampler ddim \
    --steps 25 --cfg-scale 1.5 --seed 1 --batch-size 128 --device cpu --subset-keep "$keep" --out "$dir" > "$dir.log" 2>&1
  $PY -m maskfit.cli eval "$dir/samples_64x64.npz" --reference ../shared/data/imagenette/train-64 --reference-size 64 \
    --reference-limit 1000 --proxy study/proxy/proxy_classifier.safetensors --device cpu --out "$dir/eval" > "$dir.eval.log" 2>&1
  $PY - "$dir/eval/samples_64x64_proxy_eval.json" "$name" "$keep" >> "$OUT" <<'PYEOF'
import json, sys
path, name, keep = sys.argv[1], sys.argv[2], float(sys.argv[3])
m = json.load(open(path))["metrics"]
print(json.dumps({"run": name, "keep_ratio": {"p25": 0.25, "p25mix": 0.25, "packed": 1.0, "dec50noaux": 0.5, "dec50": 0.5}[name],
                  "checkpoint": "step_0002000", "images_seen": 64000, "subset_keep": keep, "samples": 256, "seed": 1,
                  "reference": "train-64, 1000 images at 64x64", **{k: m[k] for k in (
                      "proxy_fd", "proxy_precision", "proxy_recall", "proxy_class_accuracy", "detail_ratio",
                      "contrast_ratio") if k in m}}))
PYEOF
done
