#!/usr/bin/env bash
# The inference app's command, written only here. Azure runs it from the file share
# (`bash /mount/infra/serve.sh`, see provision/inference.bicep); locally: `bash infra/serve.sh`.
# SKIP_PIP_INSTALL=1 skips installing requirements (an environment that already has them).
set -euo pipefail
source "$(dirname "$0")/prepare.sh"

read -r MODEL_PATH KEY_ENV BACKEND < <("$PYTHON" -c 'import tomllib; s = tomllib.load(open("settings.toml", "rb")); print(s["model"]["path"], s["serve"]["api_key_env"] or "-", s["serve"].get("backend", "engine"))')
# A remote run left the base model on the share; otherwise (adapter trained elsewhere) get it.
if [ ! -f "$MODEL_PATH/config.json" ]; then
  "$PYTHON" setup/download_model.py
fi
# On Azure (Container Apps set CONTAINER_APP_NAME) the endpoint is public: never serve without a key.
if [ -n "${CONTAINER_APP_NAME:-}" ] && { [ "$KEY_ENV" = "-" ] || [ -z "${!KEY_ENV:-}" ]; }; then
  echo "error: no API key in \$$KEY_ENV; refusing to serve a public endpoint without one" >&2
  exit 1
fi
ARGS=()
if [ "$BACKEND" = vllm ]; then
  # [serve] backend = "vllm": gradio_chat.py starts vLLM on 127.0.0.1 and stays in front (API key,
  # prompt format). vLLM pins an older torch and transformers than the workspace, so it gets a venv
  # of its own, made at each start like the packages above: on the container's disk (a venv on the
  # share would import thousands of files over SMB), from the pip cache on the share (only the first
  # start downloads). The vllm/vllm-openai image would bring vLLM but not this front door, and one
  # image serves both here.
  VLLM_VENV=${VLLM_VENV:-/opt/venv-vllm}
  [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
  if [ "${SKIP_PIP_INSTALL:-0}" != "1" ]; then
    echo "== installing setup/requirements-vllm.txt into $VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install --disable-pip-version-check --root-user-action=ignore \
      -r setup/requirements-vllm.txt
  fi
  # Triton (under vLLM) compiles small kernel launchers with the system C compiler when it starts;
  # the slim Python image has none.
  if ! command -v gcc >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
  fi
  export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}  # compiled graphs, kept for the next start
  # This container has an NVIDIA GPU, whatever platform the workspace was made for.
  ARGS=(--set "serve.vllm_python=$VLLM_VENV/bin/python" --set model.platform=cuda)
fi
# Every interface: on Azure, the HTTPS ingress in front is the only way in.
exec "$PYTHON" inference/gradio_chat.py --host 0.0.0.0 --port "${PORT:-7860}" ${ARGS[@]+"${ARGS[@]}"}
