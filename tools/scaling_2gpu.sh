#!/usr/bin/env bash
# Multi-GPU scaling on 2 GPUs (issue "Measure multi-GPU scaling on two GPUs"): ready to run on the
# nvidia-h200-x2 device kind, in stages that each fit one 10-minute device command. Not run yet.
#
#   tools/scaling_2gpu.sh STAGE [OUT_DIR]      (repository root, on the 2-GPU machine)
#
# STAGE:
#   b2       FiT-B/2 (158.7 M), DDP, unmasked and 50 % kept: `maskfit bench --data` under torchrun with
#            1 and 2 processes, the same per-GPU batch (256) and command shape; prints per-GPU rate at 2 / at 1
#   xl-ddp   FiTv2-XL/2 (671 M), DDP, per-GPU batch 64, unmasked and 50 % kept, likewise
#   xl-fsdp  FiTv2-XL/2, FSDP2, likewise
#   resume   FiT-B/2 on 2 GPUs: RESUME_STEPS (400) steps straight; the same run killed (SIGKILL) as soon as its
#            first checkpoint (a quarter of the way) exists, then resumed on 2 GPUs: the logged losses must agree
#            (bf16 tolerance; "killed_after" says where the kill landed: a later checkpoint means it was late);
#            then the 2-GPU checkpoint samples on one process
# Data: a latent cache of random ImageNet-sized latents (`maskfit bench --write-random-cache`, written first).
# Results: OUT_DIR/STAGE.jsonl and .log (default: $OUT, else ./device_out). The ratio rows say whether each
# reaches the 0.9 floor. For a check on a CPU (gloo, tiny model): DEVICE=cpu PRESET_B2=FiTv2-tiny ... (see below).
set -uo pipefail
stage=${1:?usage: tools/scaling_2gpu.sh b2|xl-ddp|xl-fsdp|resume [OUT_DIR]}
out=${2:-${OUT:-device_out}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TORCHRUN=${TORCHRUN:-torchrun}
DEVICE=${DEVICE:-cuda}
ATTN=${ATTN:-varlen}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-8}
log="$out/$stage.log"
jsonl="$out/$stage.jsonl"
cache=${CACHE:-/tmp/rand_cache}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
[ -f "$cache/manifest.json" ] || $PY -m maskfit.cli bench --write-random-cache "$cache" --num-images "${CACHE_IMAGES:-8192}" \
  2>&1 | tee -a "$log"
lat=(--set data.source='"latents"' --set data.root="\"$cache\"" --set data.layout='"packed"'
     --set data.num_workers="${WORKERS:-8}" --set model.attention="\"$ATTN\"" --set train.device="\"$DEVICE\""
     --set train.compile="${COMPILE:-true}")

# scale CONFIG PARALLEL PER_GPU_BATCH [--set ...]: the same bench with 1 and 2 processes, then the ratio
scale() {
  local config=$1 parallel=$2 per_gpu=$3; shift 3
  for n in 1 2; do
    echo "== $config parallel=$parallel nproc=$n per-GPU batch $per_gpu $*" | tee -a "$log"
    timeout "${LIMIT:-240}" $TORCHRUN --nproc-per-node $n --master-port $((29600 + n)) -m maskfit.cli bench \
      --data "$config" "${lat[@]}" --set train.parallel="\"$parallel\"" --set train.batch_size=$((per_gpu * n)) \
      "$@" --steps "$STEPS" --warmup "$WARMUP" --out "$out/rows_${stage}.jsonl" 2>&1 | tee -a "$log"
  done
  $PY - "$out/rows_${stage}.jsonl" "$config" "$parallel" "$*" >>"$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
real = [r for r in rows if r.get("path") == "real"][-2:]  # the two just written: 1 process, then 2
one, two = (real + [None, None])[:2]
if one is None or two is None or one.get("world_size", 1) != 1 or two.get("world_size") != 2:
    print(json.dumps({"config": sys.argv[2], "parallel": sys.argv[3], "extra": sys.argv[4], "error": "a run failed"}))
else:
    per1 = one.get("images_per_s_per_gpu") or one["images_per_s"]
    per2 = two["images_per_s_per_gpu"]
    print(json.dumps({"config": sys.argv[2], "parallel": sys.argv[3], "extra": sys.argv[4],
                      "per_gpu_1": per1, "per_gpu_2": per2, "scaling": round(per2 / per1, 3),
                      "floor_0.9": per2 / per1 >= 0.9}))
PY
  tail -1 "$jsonl" | tee -a "$log"
}

b2=${CONFIG_B2:-configs/fit_b2_imagenet_packed.toml}
xl=${CONFIG_XL:-configs/fitv2_xl2_imagenet.toml}
xl_cache=(--set data.preprocess='"flexible"')  # the random cache stores no centre crops
case "$stage" in
  b2)
    scale "$b2" ddp "${BATCH_B2:-256}" ${PRESET_B2:+--set model.preset="\"$PRESET_B2\""}
    scale "$b2" ddp "${BATCH_B2:-256}" --set mask.keep_ratio=0.5 ${PRESET_B2:+--set model.preset="\"$PRESET_B2\""} ;;
  xl-ddp|xl-fsdp)
    mode=${stage#xl-}
    scale "$xl" "$mode" "${BATCH_XL:-64}" "${xl_cache[@]}" ${PRESET_XL:+--set model.preset="\"$PRESET_XL\""}
    scale "$xl" "$mode" "${BATCH_XL:-64}" "${xl_cache[@]}" --set mask.keep_ratio=0.5 \
      ${PRESET_XL:+--set model.preset="\"$PRESET_XL\""} ;;
  resume)
    run=(-m maskfit.cli train "$b2" "${lat[@]}" --set train.parallel='"ddp"' --set train.batch_size=$((2 * ${BATCH_B2:-64}))
         --set train.steps=${RESUME_STEPS:-400} --set train.log_every=1 --set train.ckpt_every=$((${RESUME_STEPS:-400} / 4)) --quiet
         ${PRESET_B2:+--set model.preset="\"$PRESET_B2\""})
    rm -rf /tmp/scale_straight /tmp/scale_killed
    $TORCHRUN --nproc-per-node 2 --master-port 29611 "${run[@]}" --set train.out_dir='"/tmp/scale_straight"' 2>&1 | tee -a "$log"
    # The killed run: started in the background, SIGKILLed once its step-20 checkpoint exists, then resumed.
    $TORCHRUN --nproc-per-node 2 --master-port 29612 "${run[@]}" --set train.out_dir='"/tmp/scale_killed"' >>"$log" 2>&1 &
    pid=$!
    first=$(printf 'step_%07d' $((${RESUME_STEPS:-400} / 4)))
    until [ -f "/tmp/scale_killed/checkpoints/$first/state.pt" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
    pkill -9 -f "scale_killed" ; wait $pid 2>/dev/null
    killed_at=$(cat /tmp/scale_killed/checkpoints/latest 2>/dev/null)
    echo "{\"killed_after\": \"$killed_at\", \"of_steps\": ${RESUME_STEPS:-400}}" | tee -a "$jsonl"
    $TORCHRUN --nproc-per-node 2 --master-port 29613 "${run[@]}" --set train.out_dir='"/tmp/scale_killed"' 2>&1 | tee -a "$log"
    $PY - /tmp/scale_straight/log.jsonl /tmp/scale_killed/log.jsonl <<'PY' | tee -a "$jsonl"
import json, sys
def losses(path):
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r["loss"]  # a resumed run re-logs the steps after its checkpoint: the last wins
    return rows
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(a) & set(b))
worst = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-8) for s in steps)
print(json.dumps({"resume_steps_compared": len(steps), "max_relative_loss_difference": worst,
                  "within_bf16_tolerance_0.02": worst < 0.02}))
PY
    # The 2-GPU checkpoint samples on one process (latent tokens: the random cache has no autoencoder to decode).
    $PY -c "
from pathlib import Path
import torch
from maskfit.runs import build_diffusion, load_model_from_checkpoint
from maskfit.sample import SamplerOptions, sample_tokens
dev = torch.device('$DEVICE')
model, cfg = load_model_from_checkpoint(Path('/tmp/scale_killed'), device=dev, attention='dense')
options = SamplerOptions(method='euler' if cfg.diffusion.objective == 'flow' else 'ddim', steps=4, cfg_scale=1.5)
tokens = sample_tokens(model, build_diffusion(cfg), [(16, 16), (12, 20)], torch.tensor([1, 2]), options,
                       torch.Generator(device=dev).manual_seed(0), dev)
print('the 2-GPU checkpoint sampled on one process:', [tuple(t.shape) for t in tokens],
      'finite:', all(bool(torch.isfinite(t).all()) for t in tokens))
" 2>&1 | tee -a "$log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
