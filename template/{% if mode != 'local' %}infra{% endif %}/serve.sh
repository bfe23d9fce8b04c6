#!/usr/bin/env bash
# The inference app's command, written only here. Azure runs it from the file share
# (`bash /mount/infra/serve.sh`, see provision/inference.bicep); locally: `bash infra/serve.sh`.
# SKIP_PIP_INSTALL=1 skips installing requirements (an environment that already has them).
set -euo pipefail
source "$(dirname "$0")/prepare.sh"

read -r MODEL_PATH KEY_ENV < <("$PYTHON" -c 'import tomllib; s = tomllib.load(open("settings.toml", "rb")); print(s["model"]["path"], s["serve"]["api_key_env"] or "-")')
# A remote run left the base model on the share; otherwise (adapter trained elsewhere) get it.
if [ ! -f "$MODEL_PATH/config.json" ]; then
  "$PYTHON" setup/download_model.py
fi
# On Azure (Container Apps set CONTAINER_APP_NAME) the endpoint is public: never serve without a key.
if [ -n "${CONTAINER_APP_NAME:-}" ] && { [ "$KEY_ENV" = "-" ] || [ -z "${!KEY_ENV:-}" ]; }; then
  echo "error: no API key in \$$KEY_ENV; refusing to serve a public endpoint without one" >&2
  exit 1
fi
# Every interface: on Azure, the HTTPS ingress in front is the only way in.
exec "$PYTHON" inference/gradio_chat.py --host 0.0.0.0 --port "${PORT:-7860}"
