#!/usr/bin/env bash
# Install everything the tests need, then run the whole test suite.
# Used as-is by the README's quickstart and by CI (.ci/run). Needs Python 3.11+ and, for the
# browser tests, Debian/Ubuntu's chromium, and Go for the Ollama template tests (both installed here
# with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Go renders the Ollama TEMPLATEs with Go's own text/template, as Ollama does (tests/test_ollama.py).
if ! command -v chromium >/dev/null 2>&1 || ! command -v go >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium golang-go >/dev/null
fi

if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
# torch first and exactly: any other spec pulls several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
# checkov pins old versions of packages the workspace needs: it gets a venv of its own.
if [ ! -x .venv-checkov/bin/checkov ]; then "$PYTHON" -m venv .venv-checkov; fi
.venv-checkov/bin/pip install -q --disable-pip-version-check checkov==3.3.30

export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
