#!/usr/bin/env bash
# The real `maskfit train` path beside the synthetic-layout step (issue "Masked training fast in practice"),
# in stages that each fit one 10-minute device command.
#
#   tools/real_path.sh STAGE [OUT_DIR]        (repository root, on the GPU machine)
#
# STAGE:
#   tests     tests/test_gpu.py (no host sync in the real masked step, compiled image batching compiles once,
#             backends and layouts agree, sampling in bf16)
#   pixels    Imagenette 64 px in pixel space (configs/imagenette_pixels.toml as the issue ran it: 256-token
#             budget, batch 256, 10 workers, varlen, compiled), unmasked and 50 % kept; needs the images in
#             the ignored folder .carry/imagenette/train-64 (carry .carry)
#   sampling  `maskfit sample` images/s beside `maskfit bench --sampling` (FiTv2-B/2, 512 images, 50 Euler steps)
#   rest      FiT-B/2-dit from the random latent cache and FiT-B/2 (patch 4 px) from the Imagenette folder,
#             unmasked, 50 % plain, 50 % decoder
#   workers   FiT-B/2 from the image folder at 50 % kept with 10 and 15 workers, longer windows
#   folder    FiT-B/2 from the image folder: 50 % plain, 50 % decoder, unmasked (40 timed steps)
#   folder128 the study's folder (Imagenette 128 px, decoded once), MODEL=FiT-B/2 or FiT-B/2-dit: unmasked, 50 %
#             plain, 50 % decoder; needs .carry/imagenette/train-128 (tools/study.sh carry)
#   folder128_tokens  the study's folder under token batching (random crops replayed by the packer: constant
#             shapes), MODEL (default FiT-B/2), unmasked (65 536 tokens a step) and 50 % plain (32 768 kept), each
#             at most 320 images, or with ROWS=decoder 50 % kept with the decoder (its full-grid stream padded to a
#             static length since 2026-12-02, so CUDA graphs apply to it too); COMPILE_MODE (default
#             reduce-overhead, i.e. CUDA graphs; or default); PROFILE=1 adds `--profile`: where the real row's main
#             thread spent its timed window (maskfit.hostprofile); carry .carry/imagenette/train-128.zip
#   host      the one folder row under the 0.95 floor (FiT-B/2-dit, 50 % plain, 0.844 on 2026-12-02) again, after
#             the bin planner's two speed-ups (counts read once per bin; an epoch's crop draws replayed at once,
#             sizes from the decoded arrays), with PROFILE=1: does it now reach the floor, and if not, where does
#             the main process spend the time the GPU waits (its first try, 2026-12-02 sixth session, failed on
#             the profiler's kept frames under CUDA graphs, since fixed); first without the profiler, then with it
#             (about 4.5 minutes)
#   remaining the two folder rows still unmeasured: ROWS=plain50 MODEL=FiT-B/2-dit and ROWS=decoder MODEL=FiT-B/2 of
#             folder128_tokens, one command (ROWS: plain = unmasked and 50 % plain, or unmasked, plain50, decoder)
#   graphs    CUDA graphs in maskfit train (train.compile_mode) on the small pixel model, token batching,
#             unmasked and 50 % kept, default against reduce-overhead
#   latents   FiT-B/2 (158.7 M) from a latent cache of random latents at ImageNet-like sizes (written first,
#             8192 images), unmasked, 50 % plain, 50 % decoder
# Each writes JSON lines and a log under OUT_DIR (default: $OUT, else ./device_out).
set -uo pipefail
stage=${1:?usage: tools/real_path.sh tests|pixels|sampling|latents|rest|workers|folder|folder128|folder128_tokens|host|remaining|graphs [OUT_DIR]}
out=${2:-${OUT:-device_out}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
log="$out/$stage.log"
# .carry/imagenette/train-128 travels as one zip (tools/study.sh carry explains why); unpacked here when missing
PYTHON=python3 tools/study.sh unpack || exit $?
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
python3 -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])' | tee -a "$log"
bench() { local limit=$1; shift
  timeout "$limit" python3 -m maskfit.cli bench --out "$out/$stage.jsonl" "$@" 2>&1 | tee -a "$log"; }
# FiT-B/2 (patch 4 px, 3 channels) on the Imagenette folder in pixel space, as the configuration runs it
fitb2_folder=(--set data.root='".carry/imagenette/train-64"' --set data.token_budget=256 --set train.batch_size=256
  --set model.attention='"varlen"' --set train.compile=true --set model.preset='"FiT-B/2"'
  --set model.overrides='{"patch_size": 4, "in_channels": 3, "num_classes": 10}' --set diffusion.objective='"ddpm"')
case "$stage" in
  tests)
    timeout 500 python3 -m pytest -q tests/test_gpu.py 2>&1 | tee -a "$log" ;;
  pixels)
    common=(--set data.root='".carry/imagenette/train-64"' --set data.token_budget=256 --set train.batch_size=256
            --set data.num_workers=10 --set model.attention='"varlen"' --set train.compile=true)
    bench 280 --data configs/imagenette_pixels.toml "${common[@]}" --steps 60 --warmup 15
    bench 280 --data configs/imagenette_pixels.toml "${common[@]}" --set mask.keep_ratio=0.5 --steps 60 --warmup 15 ;;
  latents)
    rm -rf /tmp/rand_cache; python3 -m maskfit.cli bench --write-random-cache /tmp/rand_cache --num-images 8192 2>&1 | tee -a "$log"
    common=(--set data.source='"latents"' --set data.root='"/tmp/rand_cache"' --set model.attention='"varlen"'
            --set data.layout='"packed"' --set data.num_workers=10)
    bench 170 --data configs/fit_b2_imagenet.toml "${common[@]}" --steps 20 --warmup 8
    bench 170 --data configs/fit_b2_imagenet.toml "${common[@]}" --set mask.keep_ratio=0.5 --steps 20 --warmup 8
    bench 170 --data configs/fit_b2_imagenet.toml "${common[@]}" --set mask.keep_ratio=0.5 --set mask.design='"decoder"' --steps 20 --warmup 8 ;;
  sampling)
    # `maskfit sample` beside `maskfit bench --sampling` on the same model (FiTv2-B/2, random weights, pixel space
    # so no autoencoder weights are needed; token grids from FiT's ImageNet-like mix at 256 tokens, as the bench).
    python3 -m maskfit.cli train configs/imagenette_pixels.toml --set model.preset='"FiTv2-B/2"' \
      --set model.overrides='{"patch_size": 2, "in_channels": 3}' --set model.attention='"varlen"' \
      --set data.source='"synthetic"' --set data.num_images=64 --set data.random_aspect_crop=false \
      --set data.token_budget=256 --set train.steps=1 --set train.batch_size=8 --set train.out_dir='"/tmp/samp"' \
      --quiet 2>&1 | tee -a "$log"
    timeout 200 python3 -m maskfit.cli sample /tmp/samp --distribution imagenet -n 512 --batch-size 128 --steps 50 \
      --cfg-scale 1.5 --sampler euler --out /tmp/samp_out 2>&1 | tee -a "$log" | tail -40
    bench 200 --sampling --models FiTv2-B/2 --num-images 512 --batch 128 --sample-steps 50 --cfg-scale 1.5 ;;
  rest)
    # FiT-B/2-dit from the random latent cache, and FiT-B/2 (patch 4 px, 3 channels) from the Imagenette folder.
    rm -rf /tmp/rand_cache; python3 -m maskfit.cli bench --write-random-cache /tmp/rand_cache --num-images 8192 2>&1 | tee -a "$log"
    lat=(--set data.source='"latents"' --set data.root='"/tmp/rand_cache"' --set model.attention='"varlen"'
         --set data.layout='"packed"' --set data.num_workers=10 --set model.preset='"FiT-B/2-dit"')
    bench 100 --data configs/fit_b2_imagenet.toml "${lat[@]}" --steps 15 --warmup 8
    bench 100 --data configs/fit_b2_imagenet.toml "${lat[@]}" --set mask.keep_ratio=0.5 --steps 15 --warmup 8
    bench 120 --data configs/fit_b2_imagenet.toml "${lat[@]}" --set mask.keep_ratio=0.5 --set mask.design='"decoder"' --steps 15 --warmup 8
    img=("${fitb2_folder[@]}" --set data.num_workers=10)
    bench 100 --data configs/imagenette_pixels.toml "${img[@]}" --steps 15 --warmup 8
    bench 100 --data configs/imagenette_pixels.toml "${img[@]}" --set mask.keep_ratio=0.5 --steps 15 --warmup 8
    bench 120 --data configs/imagenette_pixels.toml "${img[@]}" --set mask.keep_ratio=0.5 --set mask.design='"decoder"' --steps 15 --warmup 8 ;;
  workers)
    # FiT-B/2 from the Imagenette folder at 50 % kept (real/synthetic 0.75 in the rest stage): longer windows,
    # 10 and 15 workers: is the real path loader-bound?
    img=("${fitb2_folder[@]}" --set mask.keep_ratio=0.5)
    bench 150 --data configs/imagenette_pixels.toml "${img[@]}" --set data.num_workers=10 --steps 40 --warmup 24
    bench 150 --data configs/imagenette_pixels.toml "${img[@]}" --set data.num_workers=15 --steps 40 --warmup 24 ;;
  folder)
    # FiT-B/2 (patch 4 px) from the Imagenette folder, 40 timed steps.
    img=("${fitb2_folder[@]}" --set data.num_workers=10)
    bench 110 --data configs/imagenette_pixels.toml "${img[@]}" --set mask.keep_ratio=0.5 --steps 40 --warmup 24
    bench 110 --data configs/imagenette_pixels.toml "${img[@]}" --set mask.keep_ratio=0.5 --set mask.design='"decoder"' --steps 40 --warmup 24
    bench 110 --data configs/imagenette_pixels.toml "${img[@]}" --steps 40 --warmup 24 ;;
  folder128)
    # The study's data path (configs/study/base.toml: the Imagenette 128-px folder's training split, decoded once,
    # crops that fill the 256-token budget, 10 workers), compiled; MODEL (default FiT-B/2) unmasked, 50 % plain,
    # 50 % decoder; needs .carry/imagenette/train-128 (tools/study.sh carry). About 2.5 minutes a row.
    model=${MODEL:-FiT-B/2}
    img=(--set train.compile=true --set model.preset="\"$model\"")
    bench 180 --data configs/study/base.toml "${img[@]}" --steps 40 --warmup 10
    bench 180 --data configs/study/base.toml "${img[@]}" --set mask.keep_ratio=0.5 --steps 40 --warmup 10
    bench 180 --data configs/study/base.toml "${img[@]}" --set mask.keep_ratio=0.5 --set mask.design='"decoder"' --steps 40 --warmup 10 ;;
  folder128_tokens)
    mode=${COMPILE_MODE:-reduce-overhead}
    tok=(--set train.compile=true --set model.preset="\"${MODEL:-FiT-B/2}\"" --set data.batching='"tokens"' --set train.batch_size=null
         --set data.max_images_per_step=320 --set train.compile_mode="\"$mode\"")
    [ "${PROFILE:-0}" = 1 ] && tok+=(--profile)
    rows=${ROWS:-plain}
    if [ "$rows" = plain ] || [ "$rows" = unmasked ]; then
      bench 200 --data configs/study/base.toml "${tok[@]}" --set data.tokens_per_step=65536 --steps 40 --warmup 10
    fi
    if [ "$rows" = plain ] || [ "$rows" = plain50 ]; then
      bench 200 --data configs/study/base.toml "${tok[@]}" --set data.tokens_per_step=32768 --set mask.keep_ratio=0.5 --steps 40 --warmup 10
    fi
    if [ "$rows" = decoder ]; then  # 50 % kept with the MaskDiT decoder (the decoder sees the full grid)
      bench 250 --data configs/study/base.toml "${tok[@]}" --set data.tokens_per_step=32768 --set mask.keep_ratio=0.5 \
        --set mask.design='"decoder"' --steps 40 --warmup 10
    fi ;;
  host)
    # The floor's row as measured before (no profiler: its sampler takes up to ~1.4 % of the interpreter), then the
    # same row profiled (about 2 minutes each; each its own folder, as a stage's log starts afresh)
    ROWS=plain50 MODEL=FiT-B/2-dit "$0" folder128_tokens "$out/unprofiled"
    ROWS=plain50 MODEL=FiT-B/2-dit PROFILE=1 "$0" folder128_tokens "$out/profiled" ;;
  remaining)
    # The folder rows of item 2 not measured by 2026-12-02: FiT-B/2-dit at 50 % plain and FiT-B/2 with the decoder,
    # both under token batching with CUDA graphs (about 2 minutes each; carry .carry/imagenette/train-128.zip).
    ROWS=plain50 MODEL=FiT-B/2-dit "$0" folder128_tokens "$out/dit_plain50"  # each its own folder: a stage's log
    ROWS=decoder MODEL=FiT-B/2 "$0" folder128_tokens "$out/b2_decoder" ;;     # starts afresh
  graphs)
    # CUDA graphs in the real path (train.compile_mode="reduce-overhead") on the launch-bound small model of the
    # issue (configs/imagenette_pixels.toml: 6.1 M, 256-token budget) from the synthetic set (no files to carry),
    # token batching (one shape every step): unmasked (65 536 tokens a step) and 50 % kept (32 768 backbone
    # tokens a step, the same ~280 images), each with the default compiled step and with CUDA graphs.
    small=(--data configs/imagenette_pixels.toml --set data.source='"synthetic"' --set data.num_images=16384
      --set data.num_classes=8 --set model.overrides='{"depth": 6, "hidden_size": 256, "num_heads": 4, "ffn_hidden": 688, "adaln_lora_rank": 64, "patch_size": 4, "num_classes": 8}'
      --set data.token_budget=256 --set data.batching='"tokens"' --set train.batch_size=null
      --set data.max_images_per_step=320 --set data.num_workers=10 --set model.attention='"varlen"'
      --set train.compile=true --steps 60 --warmup 15)
    for mode in default reduce-overhead; do
      bench 140 "${small[@]}" --set data.tokens_per_step=65536 --set train.compile_mode="\"$mode\""
      bench 140 "${small[@]}" --set data.tokens_per_step=32768 --set mask.keep_ratio=0.5 --set train.compile_mode="\"$mode\""
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
