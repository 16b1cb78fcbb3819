#!/usr/bin/env bash
# The GPU measurements that BENCHMARKS.md still lacks, in stages that each fit one 10-minute device command.
#
#   tools/device_measurements.sh STAGE [OUT_DIR]        (run from the repository root, on the GPU machine)
#
# STAGE:
#   checks     GPU tests (backends agree, bf16 layouts agree, no host sync), the sampling-throughput bench
#              (FiTv2-B/2, 50 Euler steps, CFG 1.5, packed mixed resolutions vs one resolution per batch),
#              and the published FiT code beside our padded / packed / 50 % rows (needs third_party/FiT)
#   designs    every masked design at 25 % and 75 % kept on the 130.3 M model, then FlexAttention in the full step
#   designs-b2 plain masking and every design at 25 %, 50 % and 75 % kept on the papers' 158.7 M FiT-B/2
#              (about 11 rows: more than one 10-minute command; the rows finished before the cut are kept)
#   missing    the one row not yet measured (2026-11-23): the side-interpolator at 75 % kept on FiT-B/2
#   profile    the kernels that cost (self CUDA time of 3 profiled steps) for the rows issue 14 item 3 asks to speed
#              up: FiT-B/2-dit unmasked and 50 % kept with the decoder, FiT-B/2 unmasked, FiTv2-XL/2 unmasked and
#              50 % kept at batch 64; read before any kernel work (about 6 minutes)
#   item3      the rows of issue 14 item 3 each beside the published code (FiT-B/2-dit unmasked and 50 % kept with
#              the decoder, profiled; FiT-B/2 unmasked); needs third_party/FiT (about 5 minutes)
#   item3-xl   FiTv2-XL/2 unmasked and 50 % kept beside the published FiTv2 at batch 64 (profiled), then ours at
#              batch 128; needs third_party/FiT (about 8 minutes)
#   xl-graphs  FiTv2-XL/2 at 50 % kept under CUDA graphs (compile mode reduce-overhead), batch 64 and 128
#   autotune   FiT-B/2-dit unmasked beside the published code, then FiT-B/2 unmasked, with torch.compile's
#              max-autotune-no-cudagraphs (Triton matmul templates, elementwise work in their epilogues)
#   rope       tools/probes/rope_variants.py: four forms of the RoPE pair rotation, compiled, forward + backward
#   kernels    tools/probes/swiglu_backward.py (the SwiGLU backward as the model has it, as two matmuls on the
#              weight's halves, and as one hand-written Triton kernel; hidden 2048 and 3072), then
#              tools/probes/attention_rope.py (RoPE and the qkv gradient, with a hand-written Triton backward) (~4 min)
#   tuning     FiT-B/2-dit unmasked beside the published code with Inductor's coordinate-descent tuning of its
#              pointwise and reduction kernels (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1; the profile has SwiGLU's
#              backward at about half the bandwidth its forward reaches), then FiT-B/2 the same way
#   recheck    after the fix of the compiled mask-token fill (BENCHMARKS "Correction"): the GPU tests, then the
#              decoder row of item 3 beside the published code (FiT-B/2-dit, 50 % kept; needs third_party/FiT),
#              then tools/probes/attention_rope.py (RoPE's cost inside 12 attention layers, and a joint q/k form)
#   attention  tools/probes/attention_buckets.py: FA2 varlen against one dense SDPA call per run of equal token
#              counts and against nested-jagged SDPA (flash, cuDNN, efficient backends), 12 calls forward +
#              backward, ImageNet-like and uniform; then the FiT-B/2-dit unmasked step with varlen (measured
#              2026-12-02: varlen is fastest; the model's "jagged" backend was removed after it)
#   swiglu     SwiGLU's Triton backward (MASKFIT_SWIGLU_BACKWARD=triton) in the whole compiled step: its GPU tests,
#              FiT-B/2-dit unmasked beside the published code with it, then FiT-B/2-dit and FiT-B/2 without and with
#              it (needs third_party/FiT; about 8 minutes)
#
# The published code is not part of this repository: put a checkout of github.com/whlzy/FiT (its fit/ and
# configs/ folders suffice) in the ignored folder third_party/FiT and carry that path to the device; from a bare
# clone of it (commit b22b7b0 measured so far): mkdir -p third_party/FiT && git --git-dir=CLONE archive HEAD fit
# configs | tar -x -C third_party/FiT (260 KB). Each
# stage writes JSON lines and a log under OUT_DIR (default: $OUT, else ./device_out); copy them into
# bench_results/ and the figures, with date, device and command, into BENCHMARKS.md.
set -uo pipefail
stage=${1:?usage: tools/device_measurements.sh checks|designs|designs-b2|missing|profile|item3|item3-xl|xl-graphs|autotune|rope|kernels|recheck|tuning|attention|swiglu [OUT_DIR]}
out=${2:-${OUT:-device_out}}
mkdir -p "$out"
export PYTHONPATH=src
# Profiled stages: Inductor kernels named after the aten ops they fuse, so the table says what each one computes
name_kernels() { export TORCHINDUCTOR_DESCRIPTIVE_NAMES=original_aten TORCHINDUCTOR_UNIQUE_KERNEL_NAMES=1; }
# bench SECONDS ARGS...: one `maskfit bench` call, cut at SECONDS so one slow part cannot take the stage's others
bench() { local limit=$1; shift
  timeout "$limit" python3 -m maskfit.cli bench --steps 12 --warmup 4 --out "$out/$stage.jsonl" "$@" 2>&1 | tee -a "$out/$stage.log"; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/$stage.log"
python3 -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])' | tee -a "$out/$stage.log"
case "$stage" in
  checks)
    timeout 120 python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -15 | tee -a "$out/$stage.log"
    if [ -f third_party/FiT/fit/model/fit_model.py ]; then
      bench 220 --published-fit third_party/FiT --models FiT-B/2-dit --modes padded,packed,keep0.5 --designs plain
    else
      echo "third_party/FiT missing: published-code row skipped" | tee -a "$out/$stage.log"
    fi
    bench 200 --sampling --models FiTv2-B/2 --num-images 1024 --batch 256
    ;;
  designs)
    bench 420 --models FiT-B/2-dit --modes keep0.75,keep0.25 --designs decoder,mixer,side_interp
    bench 150 --models FiT-B/2-dit --modes packed,keep0.5 --attention flex
    ;;
  designs-b2)
    bench 570 --models FiT-B/2 --modes keep0.75,keep0.25 --designs plain,decoder
    bench 300 --models FiT-B/2 --modes keep0.5 --designs decoder,mixer,side_interp
    bench 300 --models FiT-B/2 --modes keep0.75,keep0.25 --designs mixer,side_interp
    ;;
  missing)
    bench 150 --models FiT-B/2 --modes keep0.75 --designs side_interp
    ;;
  profile)
    name_kernels
    bench 150 --profile --models FiT-B/2-dit --modes packed,keep0.5 --designs decoder
    bench 100 --profile --models FiT-B/2 --modes packed
    bench 200 --profile --models FiTv2-XL/2 --batch 64 --modes packed,keep0.5 --designs plain
    ;;
  item3)
    # issue 14 item 3: each row beside the published code in the same command (needs third_party/FiT)
    name_kernels
    bench 200 --profile --published-fit third_party/FiT --models FiT-B/2-dit --modes packed,keep0.5 --designs decoder
    bench 130 --published-fit third_party/FiT --models FiT-B/2 --modes packed
    ;;
  item3-xl)
    # FiTv2-XL/2 beside the published FiTv2 network (its flow transport), batch 64 as the issue measured, then ours
    # at batch 128 (a larger batch is one of the candidates; images/s compare across batch sizes)
    name_kernels
    bench 300 --profile --published-fit third_party/FiT --models FiTv2-XL/2 --batch 64 --modes packed,keep0.5 --designs plain
    bench 240 --models FiTv2-XL/2 --batch 128 --modes packed,keep0.5 --designs plain
    ;;
  xl-graphs)
    # the launch-bound XL step at 50 % kept (MFU 24 % in the issue) under CUDA graphs, batch 64 and 128
    bench 250 --models FiTv2-XL/2 --batch 64 --modes keep0.5 --designs plain --compile-mode reduce-overhead
    bench 250 --models FiTv2-XL/2 --batch 128 --modes keep0.5 --designs plain --compile-mode reduce-overhead
    ;;
  autotune)
    # Inductor's Triton matmul templates can take the elementwise work after a matmul into its epilogue (SwiGLU's
    # silu * value, the adaLN gates); max-autotune tries them. FiT-B/2-dit first: its floor (2.5x the published
    # code) is the nearest (2.37x on 2026-12-02), and the published row is measured in the same command. The
    # compile is long; if the command runs out of time, run the stage again on the still-warm machine: Inductor's
    # caches (/tmp/torchinductor_$USER) keep the autotuning results, and the second compile reuses them.
    bench 330 --published-fit third_party/FiT --models FiT-B/2-dit --modes packed --compile-mode max-autotune-no-cudagraphs
    bench 250 --models FiT-B/2 --modes packed --compile-mode max-autotune-no-cudagraphs
    ;;
  rope)
    timeout 300 python3 tools/probes/rope_variants.py 2>&1 | tee -a "$out/$stage.log"
    ;;
  kernels)
    # The two backward kernels of the profile that move their bytes at half the forward's speed, each beside a
    # hand-written Triton form that reads every input once: the SwiGLU backward (12 compiled sublayers at FiT-B/2-dit's
    # and FiT-B/2's hidden width; also as two matmuls on the weight's halves), then RoPE with the qkv gradient's
    # assembly (12 compiled attention layers)
    timeout 170 python3 tools/probes/swiglu_backward.py 256 2048 2>&1 | tee -a "$out/$stage.log"
    timeout 170 python3 tools/probes/swiglu_backward.py 256 3072 2>&1 | tee -a "$out/$stage.log"
    timeout 200 python3 tools/probes/attention_rope.py 2>&1 | tee -a "$out/$stage.log"
    ;;
  tuning)
    export TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
    bench 280 --published-fit third_party/FiT --models FiT-B/2-dit --modes packed
    bench 250 --models FiT-B/2 --modes packed
    ;;
  recheck)
    timeout 330 python3 -m pytest -q -p no:logging tests/test_gpu.py 2>&1 | grep -v DEBUG | tail -30 | tee -a "$out/$stage.log"
    bench 200 --published-fit third_party/FiT --models FiT-B/2-dit --modes keep0.5 --designs decoder
    timeout 120 python3 tools/probes/attention_rope.py 2>&1 | tee -a "$out/$stage.log"
    ;;
  attention)
    timeout 120 python3 tools/probes/attention_buckets.py 2>&1 | tee -a "$out/$stage.log"
    bench 220 --models FiT-B/2-dit --modes packed --attention varlen
    ;;
  swiglu)
    # SwiGLU's hand-written Triton backward in the whole compiled step (models/swiglu_backward.py; the kernel alone
    # saved 6-7 % of 12 FFN sublayers, BENCHMARKS.md): its GPU tests, then FiT-B/2-dit unmasked beside the
    # published code with the kernel, FiT-B/2-dit and FiT-B/2 without and with it (each row its own JSON file)
    timeout 150 python3 -m pytest -q -p no:logging tests/test_gpu.py -k "swiglu or triton" 2>&1 | tail -5 | tee -a "$out/$stage.log"
    MASKFIT_SWIGLU_BACKWARD=triton timeout 200 python3 -m maskfit.cli bench --steps 12 --warmup 4 \
      --published-fit third_party/FiT --models FiT-B/2-dit --modes packed --out "$out/swiglu_triton.jsonl" 2>&1 | tee -a "$out/$stage.log"
    for model in FiT-B/2-dit FiT-B/2; do
      timeout 100 python3 -m maskfit.cli bench --steps 12 --warmup 4 --models $model --modes packed \
        --out "$out/swiglu_autograd.jsonl" 2>&1 | tee -a "$out/$stage.log"
      MASKFIT_SWIGLU_BACKWARD=triton timeout 100 python3 -m maskfit.cli bench --steps 12 --warmup 4 --models $model \
        --modes packed --out "$out/swiglu_triton.jsonl" 2>&1 | tee -a "$out/$stage.log"
    done ;;
  *) echo "unknown stage $stage: use checks, designs, designs-b2, missing, profile, item3, item3-xl, xl-graphs, autotune, rope, kernels, recheck, tuning, attention or swiglu" >&2; exit 2 ;;
esac
