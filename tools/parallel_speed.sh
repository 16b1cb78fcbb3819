#!/usr/bin/env bash
# Issue 11 item 5: one GPU under torchrun with DDP and with FSDP2 against the plain loop (target >= 0.97x), and
# torchrun without a wrapper (the launcher's own cost).
#
#   tools/parallel_speed.sh [OUT_DIR]        (repository root, on the GPU machine; about 7 minutes)
#
# Each run is `maskfit bench --data` (the real `maskfit train` loop: loader workers, compiled varlen step)
# on FiT-B/2 at 256 tokens, batch 256, in pixel space from the synthetic set (no files needed); the four
# "real" rows are compared at the end. Writes OUT_DIR/parallel_speed.jsonl and .log (default: $OUT, else ./device_out).
set -uo pipefail
out=${1:-${OUT:-device_out}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
log="$out/parallel_speed.log"
jsonl="$out/parallel_speed.jsonl"
rm -f "$jsonl"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
common=(--data configs/fit_b2_imagenet.toml --steps 40 --set data.source='"synthetic"' --set data.num_images=8192
  --set data.autoencoder='"identity"' --set data.num_workers=10 --set train.batch_size=256
  --set model.overrides='{"patch_size": 4, "in_channels": 3, "num_classes": 8}' --set data.num_classes=8
  --set model.attention='"varlen"' --set train.compile=true)
# "launcher": train.parallel="none" started by torchrun (no process group, no wrapper): what the launcher alone
# costs, so the ddp and fsdp rows separate the wrapper's cost from the environment's.
for mode in none launcher ddp fsdp; do
  if [ "$mode" = none ]; then launch=(python3 -m maskfit.cli)
  else launch=(torchrun --nproc-per-node 1 --master-port 29517 -m maskfit.cli); fi
  parallel=$mode; [ "$mode" = launcher ] && parallel=none
  echo "== $mode: train.parallel=$parallel" | tee -a "$log"
  timeout 170 "${launch[@]}" bench "${common[@]}" --set train.parallel="\"$parallel\"" --out "$out/parallel_$mode.jsonl" \
    2>&1 | tee -a "$log"
  python3 - "$out/parallel_$mode.jsonl" "$mode" >>"$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
real = [r for r in rows if r.get("path") == "real"][-1]
print(json.dumps({"parallel": sys.argv[2], "images_per_s": real["images_per_s"], "mfu": real.get("mfu")}))
PY
done
python3 - "$jsonl" <<'PY' | tee -a "$log"
import json, sys
rows = {r["parallel"]: r for r in map(json.loads, open(sys.argv[1]))}
base = rows["none"]["images_per_s"]
for mode in ("launcher", "ddp", "fsdp"):
    if mode in rows:
        ratio = rows[mode]["images_per_s"] / base
        print(f"{mode}: {rows[mode]['images_per_s']:.1f} img/s = {ratio:.3f} x none ({base:.1f}); target >= 0.97: "
              f"{'ok' if ratio >= 0.97 else 'BELOW'}")
PY
