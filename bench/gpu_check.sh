#!/usr/bin/env bash
# One prepared GPU check: every GPU figure of docs/benchmarks.md in one run, the most valuable
# first, each step under its own time limit, the whole within a budget. Whatever happens, --out
# holds what was measured: after every step the summary (bench/gpu_summary.py), the step table and
# a small tarball of logs and JSON files are rewritten there (each replaced atomically), so a run
# cut at any point returns what it has. Everything else (shards, checkpoints, exports, the full
# logs) stays in a work folder under /tmp, never in --out: a device machine returns at most
# 8 files of 16 MiB.
#
#   bash bench/gpu_check.sh [--rehearse] [--out DIR] [--budget SECONDS] [--work DIR] [--only STEP,...]
#
# --rehearse runs the same steps on a CPU with tiny presets, fp32 and small batches (a test runs
# it), so the script is known to work before GPU time is spent on it. --only reruns the named
# steps (and the data they need), e.g. the ones a cut run skipped.
#
# A GPU machine with torch but no network needs what it lacks carried in `.gpu_site/` at the
# repository root: bench/gpu_site.sh builds it on a development machine (wheels of webdataset,
# braceexpand, diffusers, pydantic and its parts, hjson; DeepSpeed's package folder as a tarball);
# this script unpacks it into GPU_SITE_DIR (default /tmp/imagen-gpu-site) on PYTHONPATH, and stops
# at once, saying so, where neither .gpu_site/ nor DeepSpeed is there.
#
# The plan on one H200 (budget 540 s; the device tool's timeout_s 600). "Expected" comes from the
# last GPU run (docs/benchmarks.md, "The GPU check": base64-500m b128 503.6 ms/step, sr256-400m
# b16 303.1 ms/step, the trainer at 182 and 38 samples/s) plus ~10 s per process for imports and
# CUDA start-up, and from the CPU rehearsal's step times for the scripts' own overhead. A limit is
# the step's expected time with the margin beside it; a step that overruns takes from the steps
# after it, and the memory table (last) gets whatever is left.
#
#   #  step                 expected s   limit s   margin   what it gives
#   1  env                       5          20      4x     device, versions, commit
#   2  data                     25          60      2.4x   shards, a 4096-wide T5, embeddings
#   3  smoke-default + matrix   70         150      2.1x   the default GPU path (ZeRO-2 bf16, fused AdamW)
#                                                          with ZeRO 1/3 bf16, ZeRO 1/2/3 fp16 beside it
#                                                          (tiny models, no timing), then the resume
#   4  step-base64              25          75      3x     MFU, base64-500m b128
#   5  step-sr256               20          60      3x     MFU, sr256-400m b16
#   6  trainer-base64           40         100      2.5x   trainer / bare step
#   7  trainer-sr256            35          80      2.3x
#   8  levers-norm              35          90      2.6x   GroupNorm's float32 copy, the fused region
#   9  levers-kernels           40         100      2.5x   cuDNN search, attention masks, channels_last
#  10  lever-batch              25          60      2.4x   batch 256
#  11  norm-region              15          45      3x     the GroupNorm/FiLM/SiLU region, numerics
#  12  lever-compile           150         200      1.3x   regional compile: compile time, speed-up
#  13  lever-compile-nhwc       60         120      2x     channels_last with compile (cache warm)
#  14  sampling                 80         150      1.9x   base64-2b b1, 30 steps, guided, bf16:
#                                                          eager and CUDA graphs; T5-XXL-shaped load
#  15  peer-base64              40          90      2.3x   ours / the matched IF-I peer
#  16  sampling-table         rest        rest             the inference-memory table
#      total                   ~665 (+ the table)
# The expected total is above the budget: compile (12-13) is the least known figure and may well
# take less; if it does not, sampling and the peer are the first to go. Rerun what was skipped
# with --only (e.g. `--only sampling,peer-base64 --budget 300`).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=gpu
OUT=gpu-check
BUDGET=540
WORK=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) MODE=rehearse ;;
    --out) OUT=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --work) WORK=$2; shift ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--rehearse] [--out DIR] [--budget S] [--work DIR] [--only STEP,...]" >&2
       exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/imagen-gpu-check.XXXXXX)}
mkdir -p "$WORK/logs" "$WORK/json" "$WORK/runs"
WORK=$(cd "$WORK" && pwd)
touch "$WORK/steps.tsv"
START=$(date +%s)
PY=${PYTHON:-python3}

export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}  # shared by the compile steps

# publish: the summary, the step table and the tarball into OUT, each written beside and renamed
# over the old one, so OUT always holds a whole, readable set (3 files). The tarball keeps the
# last 256 KiB of each log, the JSON files and the smoke runs' metrics: well under 16 MiB.
publish() {
  local pack="$WORK/pack"
  echo "$(( $(date +%s) - START ))" > "$WORK/elapsed.txt"
  rm -rf "$pack" && mkdir -p "$pack/logs" "$pack/json" "$pack/runs"
  for f in "$WORK"/logs/*.log; do [ -f "$f" ] && tail -c 262144 "$f" > "$pack/logs/$(basename "$f")"; done
  cp "$WORK"/json/*.json "$pack/json/" 2>/dev/null
  for m in "$WORK"/runs/*/metrics.jsonl; do
    [ -f "$m" ] && tail -c 65536 "$m" > "$pack/runs/$(basename "$(dirname "$m")").metrics.jsonl"
  done
  cp "$WORK/steps.tsv" "$pack/steps.tsv"
  "$PY" bench/gpu_summary.py "$WORK" --mode "$MODE" --budget "$BUDGET" > "$OUT/.summary.md.tmp" 2> "$WORK/logs/summary-error.log" \
    || printf '\n(summary incomplete: %s)\n' "$(tail -n 1 "$WORK/logs/summary-error.log")" >> "$OUT/.summary.md.tmp"
  mv -f "$OUT/.summary.md.tmp" "$OUT/summary.md"
  cp "$WORK/steps.tsv" "$OUT/.steps.tsv.tmp" && mv -f "$OUT/.steps.tsv.tmp" "$OUT/steps.tsv"
  tar -C "$pack" -czf "$OUT/.gpu-check.tar.gz.tmp" . && mv -f "$OUT/.gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz"
}

row() {  # row NAME STATUS SECONDS NOTE: one line of the step table
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/steps.tsv"
  echo "[gpu_check] $1: $2 ${4:+($4)}"
}

stop() {  # stop MESSAGE: end the check now, the message in the summary
  echo "$1" > "$WORK/stopped.txt"
  echo "[gpu_check] $1" >&2
  publish
  exit 3
}

STEP_PID=""
on_signal() {
  local pid
  for pid in $STEP_PID $(jobs -p); do kill -TERM "$pid" 2>/dev/null; done
  row interrupted stopped "$(( $(date +%s) - START ))" "the check got a signal"
  publish
  exit 143
}
trap on_signal TERM INT

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

budget_limit() {  # budget_limit LIMIT: LIMIT x LIMIT_SCALE, cut to what is left of the budget; 0 if < 15 s left
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( $1 * LIMIT_SCALE ))
  [ "$left" -lt 15 ] && { echo 0; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  echo "$limit"
}

status_of() {  # status_of RC: ok / failed / timeout
  case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac
}

# step NAME LIMIT_S COMMAND...: run under `timeout`, log in WORK/logs/NAME.log, a row in the
# step table, then publish.
step() {
  local name=$1 limit; shift
  wanted "$name" || return 0
  limit=$(budget_limit "$1"); shift
  if [ "$limit" -eq 0 ]; then row "$name" skipped 0 "budget spent"; publish; return; fi
  echo "[gpu_check] $name (limit ${limit} s)"
  local t0 rc; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 0<&0 > "$WORK/logs/$name.log" 2>&1 &  # 0<&0: a here-doc reaches it
  STEP_PID=$!
  wait "$STEP_PID"; rc=$?
  STEP_PID=""
  row "$name" "$(status_of $rc)" "$(( $(date +%s) - t0 ))" "rc=$rc limit=${limit}s"
  publish
}

free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

train_cmd() {  # train_cmd NAME PRECISION ZERO STEPS: sets TRAIN_CMD, the real launcher on one device
  local name=$1 precision=$2 zero=$3 steps=$4
  TRAIN_CMD=("$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$(free_port)"
    launch/train.py --config configs/base64-tiny.yaml
    --set run_dir="$WORK/runs/$name" --set data.train_shards="$WORK/data/emb/{00000..00007}.tar"
    --set text.embed_dim=$EMBED --set training.precision="$precision" --set training.zero_stage="$zero"
    --set training.max_steps="$steps" --set training.micro_batch_size=4 --set training.global_batch_size=4
    --set training.log_every_steps=1 --set checkpoint.every_steps=$SMOKE_EVERY --set lr_schedule.warmup_steps=0
    --set data.num_workers=1 --set logging.wandb_mode=disabled --set logging.progress_bar=false)
}

# smoke_group LIMIT: smoke-default then smoke-resume in one job, and the ZeRO/precision matrix in
# parallel jobs beside it; one row each. Tiny models: they neither fill the GPU nor time anything.
smoke_group() {
  wanted smoke-default || return 0
  local limit; limit=$(budget_limit "$1")
  if [ "$limit" -eq 0 ]; then row smoke-default skipped 0 "budget spent"; publish; return; fi
  echo "[gpu_check] smoke-default, smoke-resume and the matrix (limit ${limit} s)"
  local t0; t0=$(date +%s)
  declare -A pids
  train_cmd "smoke-zero2-$TRAIN_PRECISION" "$TRAIN_PRECISION" 2 "$SMOKE_STEPS"; local first=("${TRAIN_CMD[@]}")
  train_cmd "smoke-zero2-$TRAIN_PRECISION" "$TRAIN_PRECISION" 2 $(( SMOKE_STEPS + 3 )); local again=("${TRAIN_CMD[@]}")
  ( timeout --kill-after=10 "$limit" "${first[@]}" > "$WORK/logs/smoke-default.log" 2>&1; rc=$?
    echo "$rc $(( $(date +%s) - t0 ))" > "$WORK/smoke-default.rc"
    [ "$rc" -eq 0 ] || exit 0
    left=$(( limit - ($(date +%s) - t0) ))
    [ "$left" -gt 5 ] || { echo "124 0" > "$WORK/smoke-resume.rc"; exit 0; }
    t1=$(date +%s)
    timeout --kill-after=10 "$left" "${again[@]}" > "$WORK/logs/smoke-resume.log" 2>&1
    echo "$? $(( $(date +%s) - t1 ))" > "$WORK/smoke-resume.rc" ) &
  pids[main]=$!
  local precision zero name
  for precision in $SMOKE_PRECISIONS; do
    for zero in $SMOKE_ZEROS; do
      [ "$precision" = "$TRAIN_PRECISION" ] && [ "$zero" = 2 ] && continue  # smoke-default
      name="smoke-zero$zero-$precision"
      train_cmd "$name" "$precision" "$zero" "$SMOKE_STEPS"
      ( timeout --kill-after=10 "$limit" "${TRAIN_CMD[@]}" > "$WORK/logs/$name.log" 2>&1
        echo "$? $(( $(date +%s) - t0 ))" > "$WORK/$name.rc" ) &
      pids[$name]=$!
    done
  done
  STEP_PID=""
  for name in "${!pids[@]}"; do wait "${pids[$name]}"; done
  for name in smoke-default smoke-resume "${!pids[@]}"; do
    [ "$name" = main ] && continue
    if [ -f "$WORK/$name.rc" ]; then
      read -r rc secs < "$WORK/$name.rc"
      row "$name" "$(status_of "$rc")" "$secs" "rc=$rc limit=${limit}s"
    else
      row "$name" skipped 0 "smoke-default failed"
    fi
  done
  publish
}

# .gpu_site: what a GPU machine without a network lacks (bench/gpu_site.sh), unpacked once.
if [ "$MODE" = gpu ]; then
  if [ -d "$ROOT/.gpu_site/wheels" ]; then
    SITE=${GPU_SITE_DIR:-/tmp/imagen-gpu-site}
    if [ ! -d "$SITE/deepspeed" ]; then
      mkdir -p "$SITE" && tar -xzf "$ROOT/.gpu_site/deepspeed.tar.gz" -C "$SITE" \
        && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$ROOT"/.gpu_site/wheels/*.whl \
        || stop "stopped: unpacking .gpu_site/ into $SITE failed (see the lines above)"
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
  "$PY" -c "import deepspeed, webdataset, pydantic" > "$WORK/logs/imports.log" 2>&1 || stop \
    "stopped at once: this machine cannot import deepspeed, webdataset and pydantic ($(tail -n 1 "$WORK/logs/imports.log")), and $( \
    [ -d "$ROOT/.gpu_site" ] && echo ".gpu_site/ did not provide them" || echo "no .gpu_site/ was carried"). Build it with \
'bash bench/gpu_site.sh' on a development machine with PyPI and carry it (device tool: carry [\".gpu_site\"])."
fi

publish  # from here on OUT holds a summary, whenever the run ends

if [ "$MODE" = gpu ]; then
  export DS_ACCELERATOR=cuda
  BASE=configs/base64-500m.yaml; BASE_BATCH=128
  SR=configs/sr256-400m.yaml; SR_BATCH=16
  EMBED=4096; SAMPLES=512; TRAIN_PRECISION=bf16
  SMOKE_PRECISIONS="bf16 fp16"; SMOKE_ZEROS="1 2 3"; SMOKE_STEPS=10; SMOKE_EVERY=5
  STEP_SETS=(--steps 12 --rounds 2 --warmup 2)
  LEVER_SETS=(--steps 6 --rounds 2 --warmup 2)
  TRAINER_SETS=(--steps 4 --rounds 2 --warmup 2)
  NORM_ARGS=(--preset 500m --dtype bf16 --batch 32 --layout contiguous)
  COMPILE_ARGS=()
  SAMPLE_ARGS=(--presets real --precisions bf16 --network-calls eager cuda_graphs --batch-sizes 1 --steps 30
               --resolutions 64 --export-dtype bf16 --text-encoder xxl --budget-s 140)
  TABLE_ARGS=(--presets real --precisions 16 32 AMP --batch-sizes 1 8 --steps 4 --export-dtype bf16 --text-encoder xxl)
  LIMIT_SCALE=1
else
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BASE=configs/base64-tiny.yaml; BASE_BATCH=4
  SR=configs/sr256-tiny.yaml; SR_BATCH=2
  EMBED=64; SAMPLES=64; TRAIN_PRECISION=fp32
  SMOKE_PRECISIONS="fp32"; SMOKE_ZEROS="2 3"; SMOKE_STEPS=4; SMOKE_EVERY=2  # the matrix's command, once
  STEP_SETS=(--steps 1 --rounds 1 --warmup 1 --matmul-n 256 --matmul-reps 1)
  LEVER_SETS=("${STEP_SETS[@]}")
  TRAINER_SETS=(--steps 1 --rounds 1 --warmup 1)
  NORM_ARGS=(--preset smoke --dtype bf16 --batch 2 --no-compile)
  COMPILE_ARGS=(--compile-backend eager)  # dynamo without inductor's minutes of C++ on 2 cores
  SAMPLE_ARGS=(--presets tiny --precisions 32 --batch-sizes 1 --steps 2 --resolutions 64 --export-dtype bf16
               --text-encoder xxl-rehearsal --budget-s 300)
  TABLE_ARGS=(--presets tiny --precisions 32 --batch-sizes 1 --steps 1 --resolutions 64 --export-dtype bf16
              --text-encoder xxl-rehearsal)
  LIMIT_SCALE=4  # a 2-core machine shared with other jobs: the limits guard against hangs, not speed
fi
SHARDS="$WORK/data/emb/{00000..00007}.tar"

# 1. What machine, which versions.
step env 20 "$PY" - "$WORK/json/env.json" <<'EOF'
import json, platform, shutil, subprocess, sys, time
import torch
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "free_disk_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1)}
try:
    import deepspeed
    info["deepspeed"] = deepspeed.__version__
except Exception as err:  # recorded, not fatal: the training steps will say more
    info["deepspeed"] = f"not importable: {err}"
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    info["commit"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
EOF

# 2. Data: synthetic captioned shards, a random T5 of the presets' width, embeddings on the device.
if [ ! -f "$WORK/data/emb/00007.tar" ]; then
  ONLY_DATA=$ONLY; [ -n "$ONLY" ] && ONLY=",data,"  # every step after it needs the data
  step data 60 bash -c "set -e
    $PY -m data_tools synthetic --out '$WORK/data/raw' --num-samples $SAMPLES --resolution 256 --shard-size $(( SAMPLES / 8 ))
    $PY -m data_tools make-encoder --shards '$WORK/data/raw/00000.tar' --out '$WORK/data/t5' --d-model $EMBED --num-layers 1
    $PY -m data_tools precompute-embeddings --shards '$WORK/data/raw/{00000..00007}.tar' --encoder '$WORK/data/t5' --out '$WORK/data/emb'"
  ONLY=$ONLY_DATA
fi

# 3. The default GPU path through the real launcher (configs' default optimizer, torch's fused
# AdamW; ZeRO-2), its resume, and the ZeRO/precision matrix beside it.
smoke_group 150

# 4-5. The bare step: MFU against the same run's matmul peak.
step step-base64 75 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${STEP_SETS[@]}" --json "$WORK/json/step-base64.json"
step step-sr256 60 "$PY" bench/train_step.py --config "$SR" --precision "$TRAIN_PRECISION" --batch "$SR_BATCH" \
  "${STEP_SETS[@]}" --json "$WORK/json/step-sr256.json"

# 6-7. The trainer against the bare step, same config and batch, in one process.
step trainer-base64 100 "$PY" bench/trainer_overhead.py --config "$BASE" --batch "$BASE_BATCH" "${TRAINER_SETS[@]}" \
  --shards "$SHARDS" --set training.precision="$TRAIN_PRECISION" --json "$WORK/json/trainer-base64.json"
if [ "$MODE" = gpu ]; then
  step trainer-sr256 80 "$PY" bench/trainer_overhead.py --config "$SR" --batch "$SR_BATCH" "${TRAINER_SETS[@]}" \
    --shards "$SHARDS" --set training.precision="$TRAIN_PRECISION" --json "$WORK/json/trainer-sr256.json"
elif wanted trainer-sr256; then
  row trainer-sr256 skipped 0 "rehearsal: trainer-base64's command with another config"
fi

# 8-13. The levers, before / after in one process each.
# Ours and three copies per process: four base64-500m networks with their AdamW states (~7 GB
# each) and one step's activations (~56 GB at batch 128) fit an H200 with room to spare.
step levers-norm 90 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${LEVER_SETS[@]}" --baseline groupnorm-fp32-copy --baseline fused-norm-everywhere --json "$WORK/json/levers-norm.json"
step levers-kernels 100 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${LEVER_SETS[@]}" --baseline no-cudnn-benchmark --baseline unmasked-attention \
  --baseline set:training.channels_last=true --json "$WORK/json/levers-kernels.json"
if [ "$MODE" = gpu ]; then
  step lever-batch 60 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" \
    --batch $(( BASE_BATCH * 2 )) "${LEVER_SETS[@]}" --json "$WORK/json/lever-batch.json"
elif wanted lever-batch; then
  row lever-batch skipped 0 "rehearsal: step-base64's command at another batch"
fi
step norm-region 45 "$PY" bench/norm_act.py "${NORM_ARGS[@]}" --json "$WORK/json/norm-region.json"
step lever-compile 200 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${LEVER_SETS[@]}" "${COMPILE_ARGS[@]}" --set training.compile=true --baseline eager --json "$WORK/json/lever-compile.json"
if [ "$MODE" = gpu ]; then
  step lever-compile-nhwc 120 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" \
    --batch "$BASE_BATCH" "${LEVER_SETS[@]}" --set training.compile=true --baseline set:training.channels_last=true \
    --json "$WORK/json/lever-compile-nhwc.json"
elif wanted lever-compile-nhwc; then
  row lever-compile-nhwc skipped 0 "rehearsal: lever-compile's command with another --baseline"
fi

# 14. Sampling: base64-2b, batch 1, bf16, 30-step Heun with guidance, eager and through CUDA
# graphs; time to first image with a T5-XXL-shaped encoder's load.
step sampling 150 "$PY" bench/sampling.py "${SAMPLE_ARGS[@]}" --encoder "$WORK/data/t5" --work-dir "$WORK/sampling" \
  --out "$WORK/json/sampling.json"

# 15. Side by side with the matched diffusers IF-I peer (skipped where diffusers is missing).
if ! wanted peer-base64; then :
elif "$PY" -c "import diffusers" 2>/dev/null; then
  step peer-base64 90 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
    "${STEP_SETS[@]}" --peer --json "$WORK/json/peer-base64.json"
else
  row peer-base64 skipped 0 "diffusers not importable"
fi

# 16. The reference README's inference-memory table with what is left (exports reused).
if wanted sampling-table; then
  LEFT=$(( BUDGET - ($(date +%s) - START) - 10 ))
  step sampling-table "$(( LEFT > 20 ? LEFT / LIMIT_SCALE : 0 ))" "$PY" bench/sampling.py "${TABLE_ARGS[@]}" \
    --encoder "$WORK/data/t5" --work-dir "$WORK/sampling" --budget-s "$(( LEFT > 20 ? LEFT - 5 : 1 ))" \
    --out "$WORK/json/sampling-table.json"
fi

publish
echo "[gpu_check] done in $(( $(date +%s) - START )) s: $OUT/summary.md (work files in $WORK)"
cat "$OUT/summary.md"
