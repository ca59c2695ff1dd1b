#!/usr/bin/env bash
# The one script to run when a session is lent a GPU (an H200 for ~15 minutes of device time,
# start-up included): `bash bench/gpu_check.sh` (or `make gpu-check`) from the repository root.
#
# Runs, in order of priority, each under `timeout` within a total budget of GPU_CHECK_BUDGET_S
# (default 540 s = 9 min; a step gets min(its cap, what is left) and is skipped when less than
# its minimum is left), continuing when a step fails:
#   a. tests  the CUDA unit tests (fused entropy head, static decoder, entropy), log saved
#   b. static_refill  bench/static_refill.py on the Qwen3-8B shape (refill vs retire vs
#      transformers' continuous batching)
#   c. delta_h_fisher  bench/gpu_delta_h_fisher.py on Qwen2.5-1.5B + LoRA r 64, E-batch 512 x 1,024
#   d. generation  bench/gpu_generation.py --prompts 0 --variable-prompts 128, if time is left
# Everything goes under $OUT if set (the device tool's folder that comes back), else
# bench/results: <step>.log, the benchmarks' gpu_*.json, and gpu_check_summary.json (every
# step's command, status, exit code and seconds; rewritten after each step).
#
# Without a GPU it stops at once with a clear line, unless GPU_CHECK_ALLOW_CPU=1: then it runs
# the same steps at tiny shapes on the CPU (a smoke test of the script; d is skipped).
# Python: $GPU_CHECK_PYTHON, else `python` (or `python3`) on PATH.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
PY=${GPU_CHECK_PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$(date +%s)
SUMMARY="$DEST/gpu_check_summary.json"
STEPS=()

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  MODE=cuda
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  MODE=cpu
  echo "gpu_check: no CUDA device; GPU_CHECK_ALLOW_CPU=1, so a CPU smoke test at tiny shapes"
else
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false or torch is missing);" \
    "nothing run. Set GPU_CHECK_ALLOW_CPU=1 for a CPU smoke test at tiny shapes."
  exit 0
fi

json_str() {  # a JSON string literal of $1
  "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}

write_summary() {
  local IFS=,
  {
    echo "{"
    echo " \"mode\": \"$MODE\","
    echo " \"budget_s\": $BUDGET,"
    echo " \"elapsed_s\": $(($(date +%s) - START)),"
    echo " \"date\": \"$(date -u +%FT%TZ)\","
    echo " \"git_commit\": $(json_str "$(git rev-parse HEAD 2>/dev/null || echo unknown)"),"
    echo " \"gpu\": $(json_str "$(nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader 2>/dev/null || echo none)"),"
    echo " \"steps\": [${STEPS[*]}]"
    echo "}"
  } > "$SUMMARY"
}

# step NAME CAP_S MIN_S OUTPUT_JSON COMMAND...: run COMMAND under timeout, log to $DEST/NAME.log
step() {
  local name=$1 cap=$2 min=$3 out=$4
  shift 4
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  local status code=null t0 seconds=0
  echo "== gpu_check: $name (limit ${limit} s, ${left} s of the budget left): $*"
  if [ "$limit" -lt "$min" ]; then
    status="skipped: ${left} s left, the step needs at least ${min} s"
    echo "   $status"
  else
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$DEST/$name.log" 2>&1
    code=$?
    seconds=$(($(date +%s) - t0))
    case $code in
      0) status=ok ;;
      124 | 137) status="timed out after ${limit} s" ;;
      *) status=failed ;;
    esac
    tail -n 5 "$DEST/$name.log" | sed 's/^/   /'
    echo "   $name: $status (exit $code, ${seconds} s)"
  fi
  STEPS+=("{\"name\": \"$name\", \"status\": $(json_str "$status"), \"exit_code\": $code, \
\"seconds\": $seconds, \"limit_s\": $limit, \"log\": \"$name.log\", \"json\": $(json_str "$out"), \
\"command\": $(json_str "$*")}")
  write_summary
}

skip() {  # skip NAME REASON
  echo "== gpu_check: $1 skipped: $2"
  STEPS+=("{\"name\": \"$1\", \"status\": $(json_str "skipped: $2"), \"exit_code\": null}")
  write_summary
}

# a. The CUDA unit tests (on CPU their CPU cases, cut at 60 s: a smoke test of the step). -v, not
# -q: if the limit cuts them, the log still names every test that passed.
TESTS=(tests/unit/test_fused_entropy.py tests/unit/test_static_decode.py tests/unit/test_entropy.py)
step tests $([ "$MODE" = cuda ] && echo 120 || echo 60) 30 "" \
  "$PY" -m pytest -v --durations=10 -p no:cacheprovider "${TESTS[@]}"

# b. Continuous batching on the 8B shape. The issue's sizes (256 prompts, mean 2,048 new tokens,
# cap 16,384) make ~524k tokens per mode, and retire's 4 batches of 64 rows each wait for their
# longest chain (~4.7 x the mean, ~9.6k steps): at ~5-8 ms per 8B step (16 GB of bf16 weights
# read per step is 3.4 ms at 4.8 TB/s) retire alone would take ~4-5 min, refill ~1 min, and
# transformers' uncompiled continuous batching longer. Scaled down with the same rows (64) and
# the same long tail (cap / mean = 8): 128 prompts, mean 128, cap 1,024, i.e. ~16k tokens per
# mode, ~1.2k decode steps for retire (2 batches, each ~600 steps to its longest chain) and
# ~0.9k for refill: ~5-10 s each, beside the one torch.compile of the decode step (~1-2 min on
# a fresh machine) and transformers' run. The script writes its JSON only at the end, so its
# limit (180 s) must cover all of it. On CPU: a tiny shape, without transformers' run (~1 min
# on 2 cores; it is transformers' code, not ours).
if [ "$MODE" = cuda ]; then
  step static_refill 180 90 gpu_static_refill.json "$PY" bench/static_refill.py --shape 8B \
    --prompts 128 --rows 64 --max-new 1024 --mean-length 128 --hf-continuous \
    --json "$DEST/gpu_static_refill.json"
else
  step static_refill 90 20 static_refill_tiny_cpu.json "$PY" bench/static_refill.py \
    --shape tiny --prompts 8 --rows 4 --max-new 64 --mean-length 16 \
    --json "$DEST/static_refill_tiny_cpu.json"
fi

# c. The ΔH and Fisher stages' work at 1.5B, E-batch 512 x 1,024. To fit ~4 min (a plain forward
# over the E-batch is estimated at ~10-15 s: float64 head accumulation, LoRA adapters in fp32
# without TF32, as the stage runs): 2 η points (4 shifted forwards) instead of the config's 6,
# since each point is one shifted forward per sign and the per-point cost is what is measured;
# the JVPs on the first 256 sequences and the Fisher parts on the first 128 (ratios against the
# same sequences' plain passes). The JSON is rewritten after each part.
if [ "$MODE" = cuda ]; then
  step delta_h_fisher 240 120 gpu_delta_h_fisher.json "$PY" bench/gpu_delta_h_fisher.py \
    --shape 1.5B --sequences 512 --tokens 1024 --rank 64 --eta-points 2 --jvp-sequences 256 \
    --fisher-sequences 128 --json "$DEST/gpu_delta_h_fisher.json"
else
  step delta_h_fisher 180 30 delta_h_fisher_tiny_cpu.json "$PY" bench/gpu_delta_h_fisher.py \
    --shape tiny --sequences 16 --tokens 64 --eta-points 2 --jvp-sequences 8 \
    --fisher-sequences 8 --json "$DEST/delta_h_fisher_tiny_cpu.json"
fi

# d. Variable-length generation, retiring vs whole batch (0.5B, 128 prompts), if time is left.
if [ "$MODE" = cuda ]; then
  step generation 240 60 gpu_generation.json "$PY" bench/gpu_generation.py --prompts 0 \
    --variable-prompts 128 --json "$DEST/gpu_generation.json"
else
  skip generation "bench/gpu_generation.py needs CUDA"
fi

echo "gpu_check: done in $(($(date +%s) - START)) s; summary: $SUMMARY"
