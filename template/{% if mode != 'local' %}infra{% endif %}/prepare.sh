# Shared by infra/job.sh and infra/serve.sh (sourced): the workspace as working directory,
# pip and Hugging Face caches inside it (on the share when remote, so a second run downloads
# nothing), and the CUDA requirements (torch first) unless SKIP_PIP_INSTALL=1.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$PWD/.cache/pip}
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface}
export PYTHONUNBUFFERED=1

if [ "${SKIP_PIP_INSTALL:-0}" != "1" ]; then
  # torch alone from the PyTorch index, then the rest from the default index only (as setup.sh).
  echo "== installing setup/requirements-torch-cuda.txt, then setup/requirements-cuda.txt (cache: $PIP_CACHE_DIR)"
  "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore --timeout 10 --retries 1 \
    -r setup/requirements-torch-cuda.txt
  "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -r setup/requirements-cuda.txt
fi
# The workspace's own code (tuner/), which the scripts import: from the share as it is, with no
# install step (the share is the workspace).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
