#!/usr/bin/env bash
# CPU diagnostic (2026-12-02, fourth session; REPORT.md Findings, "washed out"): does sampling a plain masked model
# the way it trained (every network call on random subsets of 25 % of each image's tokens: `--subset-keep`, i.e.
# maskfit.sample.subset_denoiser) undo its washout? Reuses the checkpoints of washout_cpu_2026-12-02.sh (DIAG folder)
# and its 256-sample protocol (seed 1, proxy FD against 1 000 images of the 64-px folder, relative comparison only).
# Results: subset_sampling_cpu_2026-12-02.jsonl beside this file. Run from the repository root with the project's venv.
set -euo pipefail
PY=.venv/bin/python
D=${DIAG:-/tmp/diag}
OUT=study/diagnostics/subset_sampling_cpu_2026-12-02.jsonl
for spec in "p25:0.25" "p25:0.5" "packed:0.25" "p25mix:0.25"; do  # run, fraction each network call sees
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
print(json.dumps({"run": name, "keep_ratio": {"p25": 0.25, "p25mix": 0.25, "packed": 1.0}[name],
                  "checkpoint": "step_0002000", "images_seen": 64000, "subset_keep": keep, "samples": 256, "seed": 1,
                  "reference": "train-64, 1000 images at 64x64", **{k: m[k] for k in (
                      "proxy_fd", "proxy_precision", "proxy_recall", "proxy_class_accuracy", "detail_ratio",
                      "contrast_ratio") if k in m}}))
PYEOF
done
