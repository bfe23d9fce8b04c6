#!/usr/bin/env bash
# The fine-tuning job's command, written only here. Azure runs it from the file share
# (`bash /mount/infra/job.sh`, see provision/finetuning.bicep); locally: `bash infra/job.sh`.
# SKIP_PIP_INSTALL=1 skips installing requirements (an environment that already has them).
set -euo pipefail
source "$(dirname "$0")/prepare.sh"
echo "== getting the base model"
"$PYTHON" setup/download_model.py
echo "== fine-tuning"
"$PYTHON" finetuning/invoke_olive.py
