#!/usr/bin/env bash
# The fine-tuning job's command, written only here. Azure runs it from the file share
# (`bash /mount/infra/job.sh`, see provision/finetuning.bicep); locally: `bash infra/job.sh`.
# SKIP_PIP_INSTALL=1 skips installing requirements (an environment that already has them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

# Caches inside the workspace (on the share when remote), so a second run downloads nothing.
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$PWD/.cache/pip}
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface}
export PYTHONUNBUFFERED=1

if [ "${SKIP_PIP_INSTALL:-0}" != "1" ]; then
  echo "== installing setup/requirements-cuda.txt (cache: $PIP_CACHE_DIR)"
  "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -r setup/requirements-cuda.txt
fi
echo "== getting the base model"
"$PYTHON" setup/download_model.py
echo "== fine-tuning"
"$PYTHON" finetuning/invoke_olive.py
