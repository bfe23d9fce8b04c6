#!/usr/bin/env bash
# GPU check: one command that renders a CUDA workspace from this checkout, builds a random model of
# SmolLM2-135M's shape offline (bench/gpu_check.py model: the GPU machine has no network), then
# fine-tunes it with QLoRA and LoRA through invoke_olive.py and train_sft.py (a few steps, no
# evaluation), records the precision policy's choices and runs bench/train_speed.py and
# bench/decode_speed.py at a reduced size. Ends with ONE table on stdout; the table, all logs and
# the raw measurements go to $OUT (the device tool brings that folder back) or scratch/gpu-check.
#
#   bash scripts/gpu_wheels.sh                      # here: the packages the GPU machine lacks, in .whl/
#   bash bench/gpu_check.sh                         # there: device tool run, carry [".whl"], timeout_s 600
#   GPU_CHECK_CPU=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh  # plumbing: tiny, on the CPU
set -uo pipefail  # no -e: a step that fails is recorded in the table and the others still run
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
CPU=${GPU_CHECK_CPU:-0}
OUT=${OUT:-$REPO/scratch/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for everything: the device tool stops a command at 600
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
WS=$WORK/ws
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OLIVE_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$CPU" = 1 ]; then
  MODE=plumbing PLATFORM=cpu STEPS=${GPU_CHECK_STEPS:-3} SMALL=--small SHOWN="smollm2-135m-random, tiny shape"
  SPEED=(--steps 2) DECODE=(--tokens 8 --clients 2 --repeats 1)
else
  MODE=gpu PLATFORM=cuda STEPS=${GPU_CHECK_STEPS:-60} SMALL= SHOWN="smollm2-135m-random, SmolLM2-135M's shape"
  SPEED=(--steps 10) DECODE=(--tokens 64 --clients 16 --repeats 2)
  # The packages the machine lacks travel as wheels (scripts/gpu_wheels.sh); never in plumbing
  # mode, whose Python is this machine's own environment, not the GPU machine's 3.12.
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "error: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "warning: no .whl/ (bash scripts/gpu_wheels.sh, then carry .whl): using this Python's packages" >&2
  fi
fi
failed=()

# step NAME CAP COMMAND...: run one step in the workspace, its output in $WORK/NAME.log, stopped
# at CAP seconds or at what is left of the budget, so the table is always printed in time.
step() {
  local name=$1 cap=$2 left=$((BUDGET - SECONDS))
  shift 2
  if ((left < 20)); then
    echo "$name: skipped, out of time" | tee "$WORK/$name.log"
    failed+=("$name")
    return
  fi
  ((cap > left)) && cap=$left
  local start=$SECONDS code=0
  (cd "$WS" && PYTHONPATH="$WS${PYTHONPATH:+:$PYTHONPATH}" timeout "$cap" "$@") >"$WORK/$name.log" 2>&1 || code=$?
  echo "$name: exit $code in $((SECONDS - start)) s"
  if ((code != 0)); then
    tail -n 5 "$WORK/$name.log" | sed 's/^/  | /'
    # QLoRA refused by the CPU of a plumbing run is expected (the GPU run has the QLoRA rows).
    if [ "$CPU" = 1 ] && [[ $name == run-*qlora ]] && grep -q "QLoRA needs" "$WORK/$name.log"; then
      return
    fi
    failed+=("$name")
  fi
}

mkdir -p "$WS"
step render 120 "$PY" "$REPO/bench/gpu_check.py" render "$WS" "$PLATFORM"
step model 120 "$PY" "$REPO/bench/gpu_check.py" model "$WS" $SMALL
step meta 60 "$PY" "$REPO/bench/gpu_check.py" meta "$WORK" "$MODE"
step precision 60 sh -c "'$PY' '$REPO/bench/gpu_check.py' precision . > '$WORK/precision.json'"
for script in invoke_olive train_sft; do
  for method in qlora lora; do
    name=run-$script-$method
    # A QLoRA run computes in bfloat16 where the GPU has it; LoRA on the CPU in float32.
    dtype=$([ "$CPU" = 1 ] && echo float32 || echo bfloat16)
    step "$name" 150 "$PY" "$REPO/bench/gpu_check.py" run "$WORK/$name.json" -- "finetuning/$script.py" \
      --no-eval --fresh --set "train.method=$method" --set "train.compute_dtype=$dtype" --set "train.max_steps=$STEPS"
    # A run killed by the time limit writes no measurements: say so in the table.
    [ -f "$WORK/$name.json" ] || echo '{"code": 124, "wall_s": 0, "train": {}, "peak_alloc_mib": null,
      "peak_device_mib": null, "peak_rss_mib": null}' >"$WORK/$name.json"
  done
done
step train_speed 120 "$PY" "$REPO/bench/train_speed.py" --workspace "$WS" --model "$SHOWN" "${SPEED[@]}"
sed -n '/optimizer steps each/,$p' "$WORK/train_speed.log" | grep -v '^{' >"$WORK/train_speed.txt"
step decode_speed 120 "$PY" "$REPO/bench/decode_speed.py" --workspace "$WS" --model "$SHOWN" "${DECODE[@]}"
sed -n '/new tokens per request/,$p' "$WORK/decode_speed.log" >"$WORK/decode_speed.txt"

# What comes back: at most 8 files (the device tool's limit), so the logs travel as one file.
for log in "$WORK"/*.log; do printf '\n===== %s\n' "$(basename "$log")"; cat "$log"; done >"$OUT/logs.txt"
"$PY" -c 'import json, sys; from pathlib import Path
print(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}, indent=1))' \
  "$WORK" >"$OUT/measurements.json" || true
"$PY" "$REPO/bench/gpu_check.py" table "$WORK" | tee "$OUT/table.txt"
echo "total: $SECONDS s; files in $OUT"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]} (see $OUT/logs.txt)" >&2
  exit 1
fi
rm -rf "$WORK"
