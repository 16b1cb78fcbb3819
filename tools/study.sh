#!/usr/bin/env bash
# The study (issue 12; README "The study"): `maskfit experiment` runs of configs/study/variants.toml, one or a
# few per 10-minute device command. Run from the repository root.
#
#   tools/study.sh carry                       HERE (CPU), once per checkout: the data the device needs, in the
#                                              ignored folder .carry/imagenette/train-128 (re-encoded, see below)
#   tools/study.sh proxy [OUT_DIR]             device (or CPU, ~15 min): the proxy classifier, trained on the training
#                                              split only; copy OUT_DIR/proxy_classifier.safetensors to
#                                              study/proxy/ and commit it (every result names its SHA-256)
#   tools/study.sh run NAME[:SEED] ... [-- EXPERIMENT ARGS]
#                                              device: each experiment in turn; results to OUT_DIR as NAME_sSEED.jsonl
#                                              (commit under study/results/) and NAME_sSEED.tar.gz (log, training
#                                              record, sample grids); pass the device call carry=[".carry/imagenette/train-128.zip"]
#   tools/study.sh next [N]                    the next N runs of study/queue.txt not yet in study/results/
#   tools/study.sh collect DIR [DIR ...]       HERE, after a device run: every NAME_sSEED.jsonl in the folders to
#                                              study/results/, NAME_sSEED_gap.jsonl to study/gap/, a sample sheet per
#                                              NAME_sSEED.tar.gz to study/sheets/, then REPORT.md's tables regenerated
#   tools/study.sh unpack                      device: the carried zip into DATA's folder when it is missing (run and
#                                              proxy do it themselves; tools/real_path.sh calls it)
#   tools/study.sh list                        the variants
#
# A first GPU session (no committed proxy yet), in one device command with carry=[".carry/imagenette/train-128.zip"]:
#   tools/study.sh proxy && PROXY=$OUT/proxy_classifier.safetensors tools/study.sh run packed:0
# (the proxy is a small CNN, 30 epochs of 8 522 images at 64 px, not yet timed on the H200; the printed
# estimate says whether the experiment still fits).
#
# Settings (environment; the defaults fit one experiment in one 10-minute command, see the printed estimate):
#   BUDGET=180        training seconds          NUM_IMAGES=200   samples per (resolution, method)
#   STEPS=25          sampler steps (Euler for flow, DDIM for DDPM; CFG 1.5)
#   MARKS=100000,200000   image counts also checkpointed and evaluated (equal images seen)
#   MARK_RES=64x64    resolutions evaluated at the marks (the final checkpoint gets the whole protocol)
#   ALSO_CFG=1.0      the final checkpoint is also sampled with this guidance at MARK_RES (1.0: unguided, as FiT's
#                     tables; from 2026-12-01 night on, ~4 s a run)
#   ALSO_ATTN=kept    a masked run's final checkpoint is also sampled at MARK_RES with its attention logits scaled by
#                     ln n / ln(kept keys) (models/rope.py "kept"; from 2026-12-02 third session on, ~4 s a run;
#                     ALSO_ATTN= turns it off)
#   SUBSETS=1         a run with uniform masking also samples its final checkpoint at MARK_RES through its masked
#                     forward on random token subsets of its keep ratio, as it trained (--also-subset-sampling; from
#                     2026-12-02 fourth session on, ~4 s a run, more for a decoder; SUBSETS= turns it off)
#   LIMIT=570         seconds before an experiment is cut (what it finished still comes back)
#   PROBE_LIMIT=150 PROBE_BATCHES=2   DDPM decoder runs: tools/probes/decoder_mask_token_gap.py on every checkpoint
#                     afterwards (NAME_sSEED_gap.jsonl beside the results; commit it under study/gap/, where
#                     study_report tables it); GAP_PROBE=1 also probes any other masked DDPM run (the plain control;
#                     ~35 s of device time a run, so off by default)
#   PROXY=study/proxy/proxy_classifier.safetensors   DATA=.carry/imagenette/train-128   OUT_DIR=$OUT or device_out
#
# The carried data: ../shared/data/imagenette/train-128 holds 59 MiB of JPEG bytes, which with the repository and
# the proxy is over the 64 MiB a device call carries. `carry` writes every image again as a progressive JPEG at
# quality 85 with optimised tables (~48 MiB; mean pixel change ~2.4 of 255; MANIFEST.json says exactly), same
# file names, so maskfit.data.split gives the same held-out split. Training, proxy and references all use this copy.
# It travels as one stored zip beside the folder (DATA.zip): the device call counts disk blocks, and 9 470 small files
# fill 70 MiB of them for 49 MiB of bytes; `run` and `proxy` unpack it there when the folder is missing.
set -uo pipefail
cmd=${1:?usage: tools/study.sh carry|proxy|run|next|collect|unpack|list}
shift
PY=${PYTHON:-python3}
# a relative interpreter path (.venv/bin/python) would break inside the `cd` of `carry`: resolve it here
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=${DATA:-.carry/imagenette/train-128}
PROXY=${PROXY:-study/proxy/proxy_classifier.safetensors}
unpack_data() { [ -d "$DATA" ] || [ ! -f "$DATA.zip" ] || $PY -m zipfile -e "$DATA.zip" "$(dirname "$DATA")"; }

case "$cmd" in
  carry)
    src=${1:-../shared/data/imagenette/train-128}
    git check-ignore -q .carry/x || { echo ".carry/ is not ignored by git; it must not be committed" >&2; exit 2; }
    # MANIFEST.json is written last, so a folder holding it is a finished copy: zip it again without re-encoding
    if [ -f "$DATA/MANIFEST.json" ]; then echo "reusing the finished copy $DATA (delete it to re-encode)"
    else $PY -m maskfit.data.reencode "$src" "$DATA" --quality "${QUALITY:-85}" || exit $?; fi
    rm -f "$DATA.zip"; (cd "$(dirname "$DATA")" && $PY -m zipfile -c "$(basename "$DATA").zip" "$(basename "$DATA")") || exit $?
    carried=$(du -sb "$DATA.zip" | cut -f1)
    tracked=$(git ls-files -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
    echo "carried $DATA.zip: $((carried / 1048576)) MiB; tracked files: $((tracked / 1048576)) MiB; limit 64 MiB together" ;;
  proxy)
    out=${1:-${OUT:-device_out}}
    unpack_data
    mkdir -p "$out"
    # 64 px input, width 16: 128-dimensional features, fewer than the samples per set (FD needs a full-rank covariance).
    $PY -m maskfit.cli train-classifier --data "$DATA" --data-split train --data-holdout-fraction 0.1 --size 64 \
      --width 16 --epochs 30 --out "$out/proxy_classifier.safetensors" 2>&1 | tee "$out/proxy.log" ;;
  run)
    out=${OUT_DIR:-${OUT:-device_out}}
    unpack_data
    work=${STUDY_WORK:-/tmp/study}
    mkdir -p "$out" "$work"
    out=$(cd "$out" && pwd)  # absolute: the archive is written from inside $work
    specs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do specs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    [ ${#specs[@]} -gt 0 ] || { echo "usage: tools/study.sh run NAME[:SEED] ... [-- EXPERIMENT ARGS]" >&2; exit 2; }
    also_attn=${ALSO_ATTN-kept}  # set and empty: off
    subsets=${SUBSETS-1}  # uniformly masked runs also sample on token subsets; SUBSETS= turns it off
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
    for spec in "${specs[@]}"; do
      name=${spec%%:*}; seed=0
      [[ $spec == *:* ]] && seed=${spec#*:}
      tag=${name}_s${seed}
      timeout "${LIMIT:-570}" $PY -m maskfit.cli experiment configs/study/base.toml --variant "$name" --seed "$seed" \
        --out "$work/$tag" --proxy "$PROXY" --set "data.root=\"$DATA\"" --budget-seconds "${BUDGET:-180}" \
        --num-images "${NUM_IMAGES:-200}" --sample-batch-size "${SAMPLE_BATCH:-100}" --steps "${STEPS:-25}" --eval-at-images "${MARKS:-100000,200000}" \
        --mark-resolutions "${MARK_RES:-64x64}" --also-cfg "${ALSO_CFG:-1.0}" \
        ${also_attn:+--also-attn-scale "$also_attn"} ${subsets:+--also-subset-sampling} --quiet "$@" 2>&1 | tee "$work/$tag.log"
      [ -f "$work/$tag/results.jsonl" ] && cp "$work/$tag/results.jsonl" "$out/$tag.jsonl"
      # A decoder run: does its decoder lean on mask tokens? (tools/probes/decoder_mask_token_gap.py, ~35 s); with
      # GAP_PROBE=1 any masked DDPM run, as the control.
      res="$work/$tag/results.jsonl"
      if [ -f "$res" ] && grep -q '"objective": "ddpm"' "$res" && { grep -q '"design": "decoder"' "$res" ||
           { [ "${GAP_PROBE:-0}" = 1 ] && ! grep -q '"keep_ratio": 1.0' "$res"; }; }; then
        timeout "${PROBE_LIMIT:-150}" $PY tools/probes/decoder_mask_token_gap.py "$work/$tag/run/checkpoints"/step_* \
          --batches "${PROBE_BATCHES:-2}" --out "$work/$tag/gap.jsonl" 2>&1 | tee -a "$work/$tag.log"
        [ -f "$work/$tag/gap.jsonl" ] && cp "$work/$tag/gap.jsonl" "$out/${tag}_gap.jsonl"
      fi
      (cd "$work" && tar czf "$out/$tag.tar.gz" "$tag.log" $(find "$tag" -maxdepth 1 -name '*.json') \
        $(find "$tag/run" -maxdepth 1 -name log.jsonl 2>/dev/null) $(find "$tag/eval" -name 'grid_*.png' 2>/dev/null))
    done ;;
  next)
    # The first N runs of study/queue.txt with no study/results/NAME_sSEED.jsonl yet and not started on this machine
    # (a device command: tools/study.sh run $(tools/study.sh next)). A warm device keeps the work folder between
    # commands, so chained commands each take a new run; one cut short is rerun by name, and resumes.
    n=${1:-1}
    work=${STUDY_WORK:-/tmp/study}
    grep -v '^\s*#' study/queue.txt | grep -v '^\s*$' | while read -r spec; do
      name=${spec%%:*}; seed=${spec#*:}
      [ -f "study/results/${name}_s${seed}.jsonl" ] || [ -d "$work/${name}_s${seed}" ] || echo "$spec"
    done | head -n "$n" ;;
  collect)
    # What a device run of `run` brought back (its files_at folders), into the committed places; REPORT.md's
    # generated block follows. Refuses to overwrite a committed result with different content.
    [ $# -ge 1 ] || { echo "usage: tools/study.sh collect DIR [DIR ...] (the device run's files_at folders)" >&2; exit 2; }
    py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # here: the project's venv
    mkdir -p study/results study/gap study/sheets
    found=0
    for dir in "$@"; do
      [ -d "$dir" ] || { echo "collect: $dir is not a folder" >&2; exit 2; }
      for f in "$dir"/*_s[0-9]*.jsonl; do
        [ -f "$f" ] || continue
        case "$f" in *_gap.jsonl) dest=study/gap/$(basename "$f") ;; *) dest=study/results/$(basename "$f") ;; esac
        if [ -f "$dest" ] && ! cmp -s "$f" "$dest"; then
          echo "collect: $dest exists with other content; move it away first if $f should replace it" >&2; exit 1
        fi
        cp "$f" "$dest" && echo "collect: $dest" && found=$((found + 1))
      done
      for a in "$dir"/*_s[0-9]*.tar.gz; do
        [ -f "$a" ] && $py -m maskfit.study_sheets "$a" --out study/sheets
      done
    done
    [ "$found" -gt 0 ] || { echo "collect: no NAME_sSEED.jsonl in $*" >&2; exit 1; }
    $py -m maskfit.study_report study/results --out REPORT.md ;;
  list)
    $PY -c 'from maskfit.experiment import load_variants
for name, v in load_variants("configs/study/variants.toml").items():
    print(name.ljust(15), v.get("description", ""))' ;;
  unpack)
    unpack_data ;;
  *) echo "unknown command $cmd: use carry, proxy, run, next, collect, unpack or list" >&2; exit 2 ;;
esac
