#!/usr/bin/env bash
# Render a workspace with the embedded defaults and the offline tiny-random model, then run its
# main job: build the model, fine-tune it (LoRA on CPU), and ask the fine-tuned model one question.
# Needs only Python 3.11+ and PyPI; no GPU, no Hugging Face Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${1:-demo}

if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
# torch first and exactly: any other spec pulls several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 copier==9.19.1
rm -rf "$DEST"
.venv/bin/copier copy --defaults --quiet --data project_name=demo --data model=tiny-random \
  --data platform=cpu "$PWD" "$DEST"
.venv/bin/pip install -q --disable-pip-version-check -r "$DEST/setup/requirements-cpu.txt"
cd "$DEST"
../.venv/bin/python setup/download_model.py
../.venv/bin/python finetuning/invoke_olive.py 2>&1 | grep -E "Fine-tuning|Resuming|Adapter written|error" || true
test -f models/lora/adapter/adapter_config.json
echo
echo 'Q: "We finally got the keys to our first home!"'
printf 'A: '
../.venv/bin/python inference/console_chat.py --prompt "We finally got the keys to our first home!" 2>/dev/null
