#!/usr/bin/env bash
# One prepared GPU check: every figure the GPU issue asks for, in priority order, each step under
# its own time limit, the whole within a budget (default 450 s, so a bare H200 finishes well
# inside 8 minutes with the machine's start). Every figure lands in OUT/summary.md (made by
# bench/gpu_summary.py); the logs and JSON files are packed into OUT/gpu-check.tar.gz.
#
#   bash bench/gpu_check.sh [--rehearse] [--out DIR] [--budget SECONDS]
#
# --rehearse runs the same steps on a CPU with tiny presets, fp32 and small batches (a test runs
# it), so the script is known to work before GPU time is spent on it.
#
# On a machine with torch but no network, carry what it lacks in a folder `.gpu_site/` at the
# repository root: bench/gpu_site.sh builds it on a development machine (wheels of webdataset,
# braceexpand, diffusers, pydantic and its parts, hjson; DeepSpeed's package folder as a tarball),
# and this script unpacks it into GPU_SITE_DIR (default /tmp/imagen-gpu-site) on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=gpu
OUT=gpu-check
BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) MODE=rehearse ;;
    --out) OUT=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--rehearse] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT/logs" "$OUT/json" "$OUT/runs"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/steps.tsv"

export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = gpu ] && [ -d "$ROOT/.gpu_site/wheels" ]; then  # carried (bench/gpu_site.sh), unpacked once
  SITE=${GPU_SITE_DIR:-/tmp/imagen-gpu-site}
  if [ ! -d "$SITE/deepspeed" ]; then
    mkdir -p "$SITE" && tar -xzf "$ROOT/.gpu_site/deepspeed.tar.gz" -C "$SITE"
    ${PYTHON:-python3} -m pip install -q --no-index --no-deps --target "$SITE" "$ROOT"/.gpu_site/wheels/*.whl
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
PY=${PYTHON:-python3}

if [ "$MODE" = gpu ]; then
  export DS_ACCELERATOR=cuda
  BASE=configs/base64-500m.yaml; BASE_BATCH=128
  SR=configs/sr256-400m.yaml; SR_BATCH=16
  EMBED=4096; SMOKE_PRECISIONS="bf16 fp16"; TRAIN_PRECISION=bf16
  SAMPLE_ARGS=(--presets real --precisions 16 --batch-sizes 1 --steps 30 --resolutions 64 --budget-s 80)
  TABLE_ARGS=(--presets real --precisions 16 32 AMP --batch-sizes 1 8 --steps 10 --budget-s 110)
  SAMPLES=512; STEP_SETS=(); SMOKE_STEPS=10; SMOKE_EVERY=5; LIMIT_SCALE=1
else
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BASE=configs/base64-tiny.yaml; BASE_BATCH=4
  SR=configs/sr256-tiny.yaml; SR_BATCH=2
  EMBED=64; SMOKE_PRECISIONS="fp32"; TRAIN_PRECISION=fp32
  SAMPLE_ARGS=(--presets tiny --precisions 32 --batch-sizes 1 --steps 2 --budget-s 300)
  SAMPLES=64; STEP_SETS=(--steps 2 --warmup 1 --rounds 1); SMOKE_STEPS=4; SMOKE_EVERY=2
  LIMIT_SCALE=4  # a 2-core machine shared with other jobs: the limits guard against hangs, not speed
fi
START=$(date +%s)

# step NAME LIMIT_S COMMAND...: run under `timeout` (LIMIT_S x LIMIT_SCALE), cut to what is left of
# the budget; its row in steps.tsv says ok / failed (exit code) / timeout / skipped (no budget
# left), and the seconds taken.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$OUT/steps.tsv"; echo "[gpu_check] $name: skipped (budget)"; return
  fi
  limit=$(( limit * LIMIT_SCALE ))
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_check] $name (limit ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -ne 0 ] && status="failed"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timeout"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "rc=$rc limit=${limit}s" >> "$OUT/steps.tsv"
  echo "[gpu_check] $name: $status"
}

train_cmd() {  # train_cmd NAME PRECISION ZERO STEPS: sets TRAIN_CMD, the real launcher on one device
  local name=$1 precision=$2 zero=$3 steps=$4
  TRAIN_CMD=("$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port $(( 29500 + RANDOM % 1000 ))
    launch/train.py --config configs/base64-tiny.yaml
    --set run_dir="$OUT/runs/$name" --set data.train_shards="$OUT/data/emb/{00000..00007}.tar"
    --set text.embed_dim=$EMBED --set training.precision="$precision" --set training.zero_stage="$zero"
    --set training.max_steps="$steps" --set training.micro_batch_size=4 --set training.global_batch_size=4
    --set training.log_every_steps=1 --set checkpoint.every_steps=$SMOKE_EVERY --set lr_schedule.warmup_steps=0
    --set data.num_workers=1 --set logging.wandb_mode=disabled --set logging.progress_bar=false)
}

# 1. What machine, which versions.
step env 30 "$PY" - "$OUT/json/env.json" <<'EOF'
import json, platform, subprocess, sys, time
import torch
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
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
step data 90 bash -c "set -e
  $PY -m data_tools synthetic --out '$OUT/data/raw' --num-samples $SAMPLES --resolution 256 --shard-size $(( SAMPLES / 8 ))
  $PY -m data_tools make-encoder --shards '$OUT/data/raw/00000.tar' --out '$OUT/data/t5' --d-model $EMBED --num-layers 1
  $PY -m data_tools precompute-embeddings --shards '$OUT/data/raw/{00000..00007}.tar' --encoder '$OUT/data/t5' --out '$OUT/data/emb'"

# 3. The default GPU path: DeepSpeed with the configs' default optimizer (torch's fused AdamW), ZeRO-2.
train_cmd smoke-zero2-$TRAIN_PRECISION "$TRAIN_PRECISION" 2 $SMOKE_STEPS
step smoke-default 60 "${TRAIN_CMD[@]}"

# 4-5. The bare step: MFU against the same run's matmul peak.
step step-base64 75 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${STEP_SETS[@]}" --json "$OUT/json/step-base64.json"
step step-sr256 75 "$PY" bench/train_step.py --config "$SR" --precision "$TRAIN_PRECISION" --batch "$SR_BATCH" \
  "${STEP_SETS[@]}" --json "$OUT/json/step-sr256.json"

# 6-7. The trainer against the bare step, same config and batch, in one process.
step trainer-base64 100 "$PY" bench/trainer_overhead.py --config "$BASE" --batch "$BASE_BATCH" --steps 5 --rounds 2 \
  --warmup 2 --shards "$OUT/data/emb/{00000..00007}.tar" --set training.precision="$TRAIN_PRECISION" \
  --json "$OUT/json/trainer-base64.json"
step trainer-sr256 100 "$PY" bench/trainer_overhead.py --config "$SR" --batch "$SR_BATCH" --steps 5 --rounds 2 \
  --warmup 2 --shards "$OUT/data/emb/{00000..00007}.tar" --set training.precision="$TRAIN_PRECISION" \
  --json "$OUT/json/trainer-sr256.json"

# 8. Sampling: base64-2b, batch 1, fp16, 30-step Heun with guidance; load time apart from sampling.
step sampling 90 "$PY" bench/sampling.py "${SAMPLE_ARGS[@]}" --encoder "$OUT/data/t5" --work-dir "$OUT/sampling" \
  --out "$OUT/json/sampling.json"

# 9. Side by side with the matched diffusers IF-I peer (skipped where diffusers is missing).
if "$PY" -c "import diffusers" 2>/dev/null; then
  step peer-base64 90 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
    "${STEP_SETS[@]}" --peer --json "$OUT/json/peer-base64.json"
else
  printf 'peer-base64\tskipped\t0\tdiffusers not importable\n' >> "$OUT/steps.tsv"
fi

# 10. The rest of the smoke matrix: ZeRO 1, 2, 3 in each precision, then a resume.
for precision in $SMOKE_PRECISIONS; do
  for zero in 1 2 3; do
    [ "$precision" = "$TRAIN_PRECISION" ] && [ "$zero" = 2 ] && continue  # step 3 ran it
    train_cmd "smoke-zero$zero-$precision" "$precision" "$zero" $SMOKE_STEPS
    step "smoke-zero$zero-$precision" 45 "${TRAIN_CMD[@]}"
  done
done
train_cmd smoke-zero2-$TRAIN_PRECISION "$TRAIN_PRECISION" 2 $(( SMOKE_STEPS + 3 ))
step smoke-resume 45 "${TRAIN_CMD[@]}"

# 11. Levers, before / after in one process each: what the attention masks cost (ours against the
# same step unmasked), and whether the fused GroupNorm/FiLM/SiLU region pays on this device.
step lever-attention 75 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${STEP_SETS[@]}" --baseline unmasked-attention --json "$OUT/json/lever-attention.json"
step lever-norm 75 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
  "${STEP_SETS[@]}" --baseline fused-norm-everywhere --json "$OUT/json/lever-norm.json"
if [ "$MODE" = gpu ]; then
  step lever-compile 120 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" --batch "$BASE_BATCH" \
    "${STEP_SETS[@]}" --set training.compile=true --json "$OUT/json/lever-compile.json"
  step lever-batch 75 "$PY" bench/train_step.py --config "$BASE" --precision "$TRAIN_PRECISION" \
    --batch $(( BASE_BATCH * 2 )) --json "$OUT/json/lever-batch.json"
else  # inductor takes minutes on 2 cores; the command is the other levers' with one --set more
  printf 'lever-compile\tskipped\t0\trehearsal: compiling takes minutes on a CPU\n' >> "$OUT/steps.tsv"
  printf 'lever-batch\tskipped\t0\trehearsal: the same command at another batch\n' >> "$OUT/steps.tsv"
fi

# 12. The reference README's inference-memory table (the rehearsal's step 8 ran the same script).
if [ "$MODE" = gpu ]; then
  step sampling-table 120 "$PY" bench/sampling.py "${TABLE_ARGS[@]}" --encoder "$OUT/data/t5" \
    --work-dir "$OUT/sampling" --out "$OUT/json/sampling-table.json"
else
  printf 'sampling-table\tskipped\t0\trehearsal: step 8 ran the same script\n' >> "$OUT/steps.tsv"
fi

"$PY" bench/gpu_summary.py "$OUT" --mode "$MODE" > "$OUT/summary.md"
tar -C "$OUT" -czf "$OUT/gpu-check.tar.gz" logs json steps.tsv
echo "[gpu_check] done in $(( $(date +%s) - START )) s: $OUT/summary.md"
cat "$OUT/summary.md"
